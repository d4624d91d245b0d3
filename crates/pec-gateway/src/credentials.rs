//! Mailbox passwords (argon2id PHC strings, one per mailbox) and the
//! per-address limit on failed `AUTH` attempts.
//!
//! It reads the credentials file it is pointed at and nothing else; it keeps
//! no password, in any form, except the digest of proven-right ones in a
//! memory-only cache (see [`Credentials::verify`]). Nothing here logs.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use argon2::{
    Argon2, Params,
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng},
};
use sha2::{Digest, Sha256};

use crate::store::is_valid_mailbox;

/// How a mailbox may log in.
enum Login {
    /// With the password whose argon2id PHC string this is.
    Password(String),
    /// Never: the mailbox only receives (`!` in the file).
    Disabled,
}

/// The mailboxes of the domain and their password hashes, from the
/// credentials file (`local-part:PHC`, one a line; `!` for a mailbox that
/// exists but cannot log in; blank lines and `#` comments allowed).
pub struct Credentials {
    mailboxes: BTreeMap<String, Login>,
    /// SHA-256 of `mailbox \0 password \0 phc` for each login already proven
    /// right, so a client that authenticates on every connection pays
    /// argon2's deliberate cost once. Safe enough: it only ever holds
    /// digests of passwords that matched, lives only in memory, and an
    /// attacker able to read process memory could read the passwords as
    /// they arrive anyway. It is bounded by the number of mailboxes, since
    /// each hash has one matching password and keys are per mailbox.
    proven: Mutex<HashSet<[u8; 32]>>,
    /// The logins under argon2 right now, by the same key as `proven`. A
    /// connection with the same credentials waits for that check instead
    /// of starting its own: a fresh replica sees a client's connections
    /// all at once, and N checks side by side would each take N times as
    /// long on the CPU they share.
    checking: Mutex<HashMap<[u8; 32], Arc<Mutex<()>>>>,
    /// A hash with the cost of the file's own, checked against for unknown
    /// and receive-only mailboxes; made on first need.
    decoy: OnceLock<Option<String>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Hashes stay out of logs and panics too.
        f.debug_struct("Credentials")
            .field("mailboxes", &self.mailboxes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Parses the credentials file's text. The error names the line and the
    /// problem, and never contains the hash.
    pub fn parse(text: &str) -> Result<Credentials, String> {
        let mut mailboxes = BTreeMap::new();
        let mut first_seen = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((local, hash)) = line.split_once(':') else {
                return Err(format!("line {number}: expected `local-part:hash`"));
            };
            let local = local.trim();
            let hash = hash.trim();
            if !is_valid_mailbox(local) {
                return Err(format!(
                    "line {number}: {local:?} is not a mailbox name (lowercase letters, digits and `._+-`, not starting with `.`, at most 64)"
                ));
            }
            if let Some(first) = first_seen.insert(local.to_owned(), number) {
                return Err(format!(
                    "line {number}: mailbox {local:?} already appears on line {first}"
                ));
            }
            let login = if hash == "!" {
                Login::Disabled
            } else {
                check_phc(hash)
                    .map_err(|why| format!("line {number}: the hash of {local:?} {why}"))?;
                Login::Password(hash.to_owned())
            };
            mailboxes.insert(local.to_owned(), login);
        }
        Ok(Credentials {
            mailboxes,
            proven: Mutex::new(HashSet::new()),
            checking: Mutex::new(HashMap::new()),
            decoy: OnceLock::new(),
        })
    }

    /// Reads and parses the credentials file at `path`; the error names the
    /// file.
    pub fn load(path: &Path) -> Result<Credentials, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Whether `local_part` (any case) is a mailbox of the domain, whether
    /// or not it can log in.
    pub fn mailbox_exists(&self, local_part: &str) -> bool {
        self.mailboxes
            .contains_key(local_part.to_ascii_lowercase().as_str())
    }

    /// The mailboxes' local parts, in order.
    pub fn mailboxes(&self) -> impl Iterator<Item = &str> {
        self.mailboxes.keys().map(String::as_str)
    }

    /// Checks a login. `user` is `local` or `local@domain` (any case; a
    /// domain other than `domain` fails). Returns the mailbox's local part
    /// when `password` is right; `None` for a wrong password, an unknown
    /// user, another domain, or a mailbox that cannot log in.
    ///
    /// Unknown and disabled mailboxes still pay for one argon2 verification,
    /// so the time taken does not tell which mailboxes exist. Apart from a
    /// repeat of a proven login, this blocks for argon2's deliberate cost
    /// (tens of milliseconds): async callers use `spawn_blocking`.
    pub fn verify(&self, user: &str, password: &str, domain: &str) -> Option<String> {
        let local = match user.rsplit_once('@') {
            Some((local, user_domain)) => {
                let user_domain = user_domain.trim_end_matches('.');
                let domain = domain.trim_end_matches('.');
                if !user_domain.eq_ignore_ascii_case(domain) {
                    return None;
                }
                local
            }
            None => user,
        }
        .to_ascii_lowercase();
        let Some(Login::Password(phc)) = self.mailboxes.get(&local) else {
            if let Some(decoy) = self.decoy() {
                let _ = argon2_verifies(password, decoy);
            }
            return None;
        };
        let key = proof_key(&local, password, phc);
        if lock(&self.proven).contains(&key) {
            return Some(local);
        }
        self.check_once(key, || argon2_verifies(password, phc))
            .then_some(local)
    }

    /// Runs `check` for the login `key` stands for, unless it is proven
    /// already, one check at a time per key: a second caller waits for the
    /// first and then finds the login proven (or, for a wrong password,
    /// checks it again itself). A right answer is kept in `proven`.
    fn check_once(&self, key: [u8; 32], check: impl FnOnce() -> bool) -> bool {
        let gate = lock(&self.checking).entry(key).or_default().clone();
        let right = {
            let _turn = lock(&gate);
            if lock(&self.proven).contains(&key) {
                true
            } else {
                let right = check();
                if right {
                    lock(&self.proven).insert(key);
                }
                right
            }
        };
        // Gates are handed out and given back only under this lock, so the
        // last caller to give its gate back sees the map's the only one
        // left and removes it.
        let mut checking = lock(&self.checking);
        drop(gate);
        if checking
            .get(&key)
            .is_some_and(|gate| Arc::strong_count(gate) == 1)
        {
            checking.remove(&key);
        }
        right
    }

    /// A hash no password was ever checked against, costing what the
    /// file's first hash costs, so a refusal of an unknown mailbox takes as
    /// long as one of a wrong password.
    fn decoy(&self) -> Option<&str> {
        self.decoy
            .get_or_init(|| {
                let params = self
                    .mailboxes
                    .values()
                    .find_map(|login| match login {
                        Login::Password(phc) => PasswordHash::new(phc)
                            .ok()
                            .and_then(|parsed| Params::try_from(&parsed).ok()),
                        Login::Disabled => None,
                    })
                    .unwrap_or_default();
                hash_with(b"decoy", params).ok()
            })
            .as_deref()
    }
}

/// An argon2id PHC string for `password` with a fresh random salt and the
/// argon2 crate's default (OWASP-recommended) cost. Fails only for a
/// password argon2 cannot take (longer than 4 GiB), which is an error
/// rather than a panic because the password is input.
pub fn hash_password(password: &str) -> Result<String, String> {
    hash_with(password.as_bytes(), Params::default())
}

fn hash_with(password: &[u8], params: Params) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Says what is wrong with a PHC string, so a bad line fails at load time
/// rather than as a login that can never succeed.
fn check_phc(phc: &str) -> Result<(), &'static str> {
    let parsed = PasswordHash::new(phc).map_err(|_| "is not a PHC string")?;
    if parsed.algorithm != argon2::Algorithm::Argon2id.ident() {
        return Err("is not argon2id");
    }
    if parsed.salt.is_none() || parsed.hash.is_none() {
        return Err("lacks a salt or an output");
    }
    Params::try_from(&parsed).map_err(|_| "has parameters argon2 refuses")?;
    Ok(())
}

fn argon2_verifies(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .and_then(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed))
        .is_ok()
}

fn proof_key(mailbox: &str, password: &str, phc: &str) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update(mailbox.as_bytes());
    digest.update([0]);
    digest.update(password.as_bytes());
    digest.update([0]);
    digest.update(phc.as_bytes());
    digest.finalize().into()
}

/// A poisoned lock only means another thread panicked mid-update of a set
/// or map whose every state is valid, so carry on with it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Past this many tracked addresses, forgotten ones are dropped first.
const MAX_TRACKED: usize = 10_000;

/// Failures of one address (or IPv6 /64) in the current window.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    /// The first failure of the window.
    since: Instant,
    /// When the address was locked out, if it is.
    locked_at: Option<Instant>,
}

impl Failures {
    fn is_over(&self, now: Instant, window: Duration) -> bool {
        now.saturating_duration_since(self.locked_at.unwrap_or(self.since)) >= window
    }
}

/// Refuses `AUTH` from an address after too many failures: once
/// `failures_allowed` failures happen within `lockout` of the first, the
/// address waits `lockout` from the last of them. IPv6 addresses count per
/// /64, the block one subscriber usually holds. Time is passed in, so tests
/// and callers own the clock.
#[derive(Debug)]
pub struct AuthLimiter {
    failures_allowed: u32,
    lockout: Duration,
    by_address: Mutex<HashMap<IpAddr, Failures>>,
}

impl AuthLimiter {
    /// A limiter allowing `failures_allowed` failures (0 counts as 1) per
    /// `lockout` window.
    pub fn new(failures_allowed: u32, lockout: Duration) -> Self {
        Self {
            failures_allowed: failures_allowed.max(1),
            lockout,
            by_address: Mutex::new(HashMap::new()),
        }
    }

    /// `Ok` if `ip` may try to authenticate now, else how long it must wait.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let map = lock(&self.by_address);
        match map.get(&bucket(ip)).and_then(|f| f.locked_at) {
            Some(locked_at) => {
                let waited = now.saturating_duration_since(locked_at);
                if waited < self.lockout {
                    Err(self.lockout - waited)
                } else {
                    Ok(())
                }
            }
            None => Ok(()),
        }
    }

    /// Records a failed attempt from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        let mut map = lock(&self.by_address);
        let key = bucket(ip);
        if !map.contains_key(&key) && map.len() >= MAX_TRACKED {
            self.make_room(&mut map, now);
        }
        let fresh = Failures {
            count: 0,
            since: now,
            locked_at: None,
        };
        let entry = map.entry(key).or_insert(fresh);
        if entry.is_over(now, self.lockout) {
            *entry = fresh;
        }
        entry.count = entry.count.saturating_add(1);
        if entry.count >= self.failures_allowed {
            entry.locked_at = Some(now);
        }
    }

    /// Forgets `ip`'s failures after it authenticated.
    pub fn succeeded(&self, ip: IpAddr) {
        lock(&self.by_address).remove(&bucket(ip));
    }

    /// Drops finished windows; if every entry is still live (many addresses
    /// failing at once), drops the oldest, so memory stays bounded even then.
    fn make_room(&self, map: &mut HashMap<IpAddr, Failures>, now: Instant) {
        map.retain(|_, f| !f.is_over(now, self.lockout));
        if map.len() >= MAX_TRACKED {
            let oldest = map
                .iter()
                .min_by_key(|(_, f)| f.locked_at.unwrap_or(f.since))
                .map(|(ip, _)| *ip);
            if let Some(ip) = oldest {
                map.remove(&ip);
            }
        }
    }
}

/// The key an address is counted under: IPv4 (also when IPv4-mapped) as is,
/// IPv6 by its /64.
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// A real argon2id hash at the lowest cost argon2 allows: the tests
    /// are about this module's logic, and debug builds of argon2 at the
    /// default cost take about a second per hash.
    fn cheap_hash(password: &str) -> String {
        hash_with(password.as_bytes(), Params::new(8, 1, 1, None).unwrap()).unwrap()
    }

    fn sample() -> &'static Credentials {
        static SAMPLE: OnceLock<Credentials> = OnceLock::new();
        SAMPLE.get_or_init(|| {
            let text = format!(
                "# mailboxes of example.pec.it\n\nmario.rossi:{}\n  info : {}\nnoreply:!\n",
                cheap_hash("correct horse"),
                cheap_hash("battery staple"),
            );
            Credentials::parse(&text).unwrap()
        })
    }

    #[test]
    fn a_good_file_lists_its_mailboxes_in_order() {
        let credentials = sample();
        assert_eq!(
            credentials.mailboxes().collect::<Vec<_>>(),
            vec!["info", "mario.rossi", "noreply"]
        );
        assert!(credentials.mailbox_exists("noreply"));
        assert!(credentials.mailbox_exists("Mario.Rossi"));
        assert!(!credentials.mailbox_exists("nobody"));
        assert!(!format!("{credentials:?}").contains("argon2"));
    }

    #[test]
    fn bad_lines_are_refused_with_their_number_and_without_the_hash() {
        let good = cheap_hash("x");
        let argon2i = good.replacen("$argon2id$", "$argon2i$", 1);
        let cases = [
            ("a:!\nno colon here\n".to_owned(), "line 2"),
            ("\n\nMario:!\n".to_owned(), "line 3"),
            ("../x:!\n".to_owned(), "line 1"),
            (":!\n".to_owned(), "line 1"),
            ("a:!\n# c\na:!\n".to_owned(), "line 3"),
            ("a:$argon2id$secretgarbage\n".to_owned(), "line 1"),
            ("a:plaintext-secretgarbage\n".to_owned(), "line 1"),
            (format!("a:{argon2i}\n"), "line 1"),
        ];
        for (text, line) in cases {
            let err = Credentials::parse(&text).unwrap_err();
            assert!(err.starts_with(line), "{err:?} should name {line}");
            assert!(!err.contains("secretgarbage"), "{err:?} echoes the hash");
            assert!(!err.contains("$argon2"), "{err:?} echoes the hash");
        }
        assert!(Credentials::parse("a:!\nappears twice:!\n").is_err());
    }

    #[test]
    fn load_names_the_file_in_its_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        assert!(Credentials::load(&path).unwrap_err().contains("passwd"));
        std::fs::write(&path, "a:!\nbad\n").unwrap();
        let err = Credentials::load(&path).unwrap_err();
        assert!(err.contains("passwd") && err.contains("line 2"), "{err}");
        std::fs::write(&path, "a:!\n").unwrap();
        assert!(Credentials::load(&path).unwrap().mailbox_exists("a"));
    }

    #[test]
    fn the_right_password_logs_in_with_or_without_the_domain() {
        let credentials = sample();
        let domain = "example.pec.it";
        let mario = Some("mario.rossi".to_owned());
        assert_eq!(
            credentials.verify("mario.rossi", "correct horse", domain),
            mario
        );
        assert_eq!(
            credentials.verify("Mario.Rossi@Example.PEC.it", "correct horse", domain),
            mario
        );
        assert_eq!(
            credentials.verify("info@example.pec.it", "battery staple", domain),
            Some("info".to_owned())
        );
    }

    #[test]
    fn a_wrong_password_another_domain_or_an_unknown_user_fails() {
        let credentials = sample();
        let domain = "example.pec.it";
        assert_eq!(
            credentials.verify("mario.rossi", "Correct horse", domain),
            None
        );
        assert_eq!(credentials.verify("mario.rossi", "", domain), None);
        assert_eq!(credentials.verify("info", "correct horse", domain), None);
        assert_eq!(
            credentials.verify("mario.rossi@other.pec.it", "correct horse", domain),
            None
        );
        assert_eq!(credentials.verify("nobody", "correct horse", domain), None);
        assert_eq!(credentials.verify("", "", domain), None);
    }

    #[test]
    fn a_receive_only_mailbox_never_logs_in() {
        let credentials = sample();
        for password in ["", "!", "x"] {
            assert_eq!(
                credentials.verify("noreply", password, "example.pec.it"),
                None
            );
        }
    }

    #[test]
    fn refusing_an_unknown_mailbox_costs_a_verification_at_the_file_s_cost() {
        let credentials = sample();
        assert_eq!(credentials.verify("nobody", "x", "example.pec.it"), None);
        let decoy = credentials.decoy().unwrap();
        assert!(decoy.starts_with("$argon2id$v=19$m=8,t=1,p=1$"), "{decoy}");
        let empty = Credentials::parse("noreply:!\n").unwrap();
        assert!(empty.decoy().unwrap().contains("m=19456"));
    }

    #[test]
    fn a_repeated_right_login_is_answered_from_the_cache_with_the_same_result() {
        let credentials = Credentials::parse(&format!("anna:{}\n", cheap_hash("s3cret"))).unwrap();
        let first = credentials.verify("anna", "s3cret", "d.it");
        assert_eq!(lock(&credentials.proven).len(), 1);
        let second = credentials.verify("anna@d.it", "s3cret", "d.it");
        assert_eq!(first, Some("anna".to_owned()));
        assert_eq!(second, first);
        assert_eq!(lock(&credentials.proven).len(), 1, "one entry per mailbox");
        assert_eq!(credentials.verify("anna", "wrong", "d.it"), None);
        assert_eq!(
            lock(&credentials.proven).len(),
            1,
            "failures are not cached"
        );
    }

    /// Four connections logging in with the same credentials at once, each
    /// on a thread of its own as `spawn_blocking` runs them.
    fn four_at_once(credentials: &Credentials, right: bool) -> (Vec<bool>, usize) {
        let checks = std::sync::atomic::AtomicUsize::new(0);
        let barrier = std::sync::Barrier::new(4);
        let key = proof_key("anna", "s3cret", "phc");
        let answers = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        credentials.check_once(key, || {
                            checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(Duration::from_millis(50));
                            right
                        })
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        });
        (answers, checks.into_inner())
    }

    #[test]
    fn logins_with_the_same_credentials_at_once_pay_for_one_check() {
        let credentials = Credentials::parse("").unwrap();
        let (answers, checks) = four_at_once(&credentials, true);
        assert_eq!(answers, [true; 4]);
        assert_eq!(checks, 1, "the others waited for the first check");
        assert!(lock(&credentials.checking).is_empty(), "no gate left");
    }

    #[test]
    fn a_wrong_password_tried_at_once_is_checked_every_time() {
        let credentials = Credentials::parse("").unwrap();
        let (answers, checks) = four_at_once(&credentials, false);
        assert_eq!(answers, [false; 4]);
        assert_eq!(checks, 4, "a failure proves nothing to the next caller");
        assert!(lock(&credentials.proven).is_empty());
        assert!(lock(&credentials.checking).is_empty(), "no gate left");
    }

    #[test]
    fn no_gate_is_left_however_the_callers_interleave() {
        let credentials = Credentials::parse("").unwrap();
        for round in 0..1000u32 {
            let key = proof_key("anna", &round.to_string(), "phc");
            let barrier = std::sync::Barrier::new(4);
            std::thread::scope(|scope| {
                for _ in 0..4 {
                    scope.spawn(|| {
                        barrier.wait();
                        credentials.check_once(key, || round % 2 == 0)
                    });
                }
            });
            assert!(
                lock(&credentials.checking).is_empty(),
                "a gate was left after round {round}"
            );
        }
    }

    #[test]
    fn hashes_are_argon2id_with_a_fresh_salt() {
        let a = hash_password("same").unwrap();
        let b = hash_password("same").unwrap();
        assert!(a.starts_with("$argon2id$v=19$"), "{a}");
        assert_ne!(a, b);
        assert!(check_phc(&a).is_ok());
    }

    const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

    #[test]
    fn the_limiter_locks_after_n_failures_and_releases_after_the_window() {
        let limiter = AuthLimiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(limiter.check(IP, t0 + Duration::from_secs(i)), Ok(()));
            limiter.failed(IP, t0 + Duration::from_secs(i));
        }
        let locked_at = t0 + Duration::from_secs(2);
        assert_eq!(
            limiter.check(IP, locked_at + Duration::from_secs(10)),
            Err(Duration::from_secs(50))
        );
        let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8));
        assert_eq!(limiter.check(other, locked_at), Ok(()));
        assert_eq!(
            limiter.check(IP, locked_at + Duration::from_secs(60)),
            Ok(())
        );
        // A failure after the window starts a new count rather than relocking.
        limiter.failed(IP, locked_at + Duration::from_secs(61));
        assert_eq!(
            limiter.check(IP, locked_at + Duration::from_secs(62)),
            Ok(())
        );
    }

    #[test]
    fn failures_spread_wider_than_the_window_never_lock() {
        let limiter = AuthLimiter::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..5 {
            let now = t0 + Duration::from_secs(11 * i);
            limiter.failed(IP, now);
            assert_eq!(limiter.check(IP, now), Ok(()));
        }
    }

    #[test]
    fn a_success_resets_the_count() {
        let limiter = AuthLimiter::new(2, Duration::from_secs(60));
        let now = Instant::now();
        limiter.failed(IP, now);
        limiter.succeeded(IP);
        limiter.failed(IP, now);
        assert_eq!(limiter.check(IP, now), Ok(()));
        limiter.failed(IP, now);
        assert!(limiter.check(IP, now).is_err());
    }

    #[test]
    fn ipv6_addresses_in_one_64_share_a_count() {
        let limiter = AuthLimiter::new(2, Duration::from_secs(60));
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let elsewhere: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        limiter.failed(a, now);
        limiter.failed(b, now);
        assert!(limiter.check(a, now).is_err());
        assert_eq!(limiter.check(elsewhere, now), Ok(()));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(bucket(mapped), IP);
        assert_eq!(
            bucket(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn the_limiter_stays_bounded_under_many_addresses() {
        let limiter = AuthLimiter::new(5, Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..(MAX_TRACKED as u32 + 500) {
            limiter.failed(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), now);
        }
        assert!(lock(&limiter.by_address).len() <= MAX_TRACKED);
        let later = now + Duration::from_secs(61);
        limiter.failed(IP, later);
        assert_eq!(
            lock(&limiter.by_address).len(),
            1,
            "finished windows were dropped"
        );
    }
}
