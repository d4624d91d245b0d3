//! End-to-end PEC benchmark: two real `pec-gateway` processes (A =
//! `pec-aN.test` with mailbox mario, B = `pec-bN.test` with ten mailboxes
//! r00..r09), a SoftHSM2 token and a real clamd, started with the gateway
//! tests' harness (`tests/support/mod.rs`).
//!
//! What it measures, for 1 KiB and 1 MiB messages to 1 and 10 recipients:
//! - **PEC**: N messages submitted on A's port 465 by C concurrent sessions
//!   (one TLS login per session, many messages per session). Per message,
//!   the time from the start of `MAIL FROM` until the delivery receipts
//!   (`X-Ricevuta: avvenuta-consegna`, one per recipient, matched by the
//!   unique Subject `bench-<case>-<n>`) are in mario's Maildir `new/`, as a
//!   poller thread sees it (every 5 ms; it moves what it has read to
//!   `cur/`, as a mail reader does, so its listing stays short). Reported:
//!   messages per second
//!   (messages fully receipted / wall time from the first `MAIL FROM` to the
//!   last receipt), p50 and p99 latency. Each case gets a fresh pair of
//!   gateways, so mailboxes and queues start empty.
//! - **Unsecured gateways**: the same case once more through a fresh pair
//!   of the same gateways started with `PEC_GATEWAY_BENCH_UNSECURED=1`
//!   (read only by a build with the `bench-floor` feature, which tests and
//!   benchmarks get): nothing signed, no signature checked, nothing
//!   scanned, everything else as in the PEC run (TLS, login, the same
//!   receipts and envelopes, queue, legal log, mailboxes). The ratio to it
//!   is what signing and scanning cost.
//! - **Floor**: the same sizes, recipients, N and C through a minimal plain
//!   SMTP relay pair written here (tokio, plain TCP, no TLS, no AUTH):
//!   relay A writes the message durably to its spool (the gateway's own
//!   `store::write_durably`: temporary file, fsync, rename, directory
//!   fsync), replies 250 and forwards it over a persistent SMTP connection
//!   (4 forwarders; the gateway runs up to 64 jobs at once) to relay B, which
//!   delivers it into each recipient's Maildir (the gateway's
//!   `store::Maildirs::deliver`, fsync'd) before its 250. Latency is from
//!   `MAIL FROM` to the message being in every recipient's Maildir on B.
//!   No signing, no scanning, no receipts.
//! - **postfix**: the same path once more through two instances of Debian's
//!   postfix (`pec_e2e/postfix.rs`), the plain relay a provider would
//!   otherwise run: A accepts on plain TCP and relays to B, whose
//!   `virtual(8)` agent delivers into each recipient's Maildir. Latency as
//!   for the floor. Each case starts fresh instances and first sends a few
//!   messages per session to a mailbox of their own, unmeasured: postfix
//!   starts its daemons on demand. Needs root and the package postfix; skipped, with the
//!   reason printed, without them.
//! - **Signatures**: `pec_gateway_signing_seconds_sum/_count` from A's and
//!   B's `/metrics` after each PEC case (mean time of the gateway's whole
//!   sign step: CMS over the entity plus the token call, behind the
//!   signer's lock), and signatures per message; plus 1000 direct
//!   `pec_core::hsm::Token::sign` calls (ECDSA P-256) in a child process
//!   (the harness's token keeps its `Token` private and a PKCS#11 module
//!   initialises once per process), and 1000 through the harness's
//!   `token().sign` (which also looks the key up each time).
//! - Where the PEC time goes: the median time, since `MAIL FROM`, at which
//!   each step appears in the legal logs of A and B, and the CPU time per
//!   message of each process (from `/proc`).
//!
//! Nothing about timings is asserted. The program exits non-zero only when
//! something fails functionally: a refused submission, an unexpected
//! receipt or anomaly, or no receipt/delivery progress for 60 s.
//!
//! Run (a release build; the run itself takes about 1 to 2 minutes on 2 idle
//! cores, several more on a loaded machine):
//!     . e2e/lib/hsm.sh && init_hsm "$(mktemp -d)" && cargo bench -p pec-gateway --bench pec_e2e
//!
//! Knobs (environment): messages per case `PEC_BENCH_N_1K1` (default 300),
//! `PEC_BENCH_N_1K10` (60), `PEC_BENCH_N_1M1` (30), `PEC_BENCH_N_1M10` (30);
//! `PEC_BENCH_SESSIONS` (default 8); `PEC_BENCH_ONLY` (comma-separated case
//! tags to run: 1k1, 1k10, 1m1, 1m10); `PEC_TEST_CLAMD_TMPDIR` (the
//! directory clamd spools scanned streams to; clamd's default otherwise).
//! The sessions submit as fast as A answers 250, so with large N the
//! latency is mostly queueing inside the gateways: p50/p99 grow with N,
//! compare them at equal N only.

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "pec_e2e/postfix.rs"]
mod postfix;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    ffi::OsString,
    io::Read as _,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use pec_gateway::store::{Maildirs, write_durably};
use support::{Client, Domain, Gateway, MARIO_PASSWORD, free_port, header_block, message, token};

/// Set in the child process that times `Token::sign` directly: the key id.
const SIGN_CHILD_ENV: &str = "PEC_BENCH_SIGN_KEY";
/// How often the poller lists the Maildirs.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// No new receipt or delivery for this long is a functional failure.
const STALL: Duration = Duration::from_secs(60);
/// Mailboxes on B.
const MAILBOXES: usize = 10;
/// Forwarding connections of the floor's relay A.
const FLOOR_FORWARDERS: usize = 4;

type Res<T> = Result<T, String>;

fn main() -> ExitCode {
    if let Ok(key) = std::env::var(SIGN_CHILD_ENV) {
        return match sign_child(&key) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("pec_e2e (sign child): {e}");
                ExitCode::FAILURE
            }
        };
    }
    let started = Instant::now();
    match run() {
        Ok(()) => {
            println!("\ntotal run time: {:.0} s", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\npec_e2e FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One benchmark case.
#[derive(Clone)]
struct Case {
    label: String,
    tag: String,
    size: usize,
    rcpts: usize,
    n: usize,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cases() -> Vec<Case> {
    let only: Option<Vec<String>> = std::env::var("PEC_BENCH_ONLY")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect());
    let mut out = Vec::new();
    for (size, size_label, size_tag) in [(1024, "1KiB", "1k"), (1 << 20, "1MiB", "1m")] {
        for rcpts in [1, 10] {
            let tag = format!("{size_tag}{rcpts}");
            if only.as_ref().is_some_and(|o| !o.contains(&tag)) {
                continue;
            }
            let default = match tag.as_str() {
                "1k1" => 300,
                "1k10" => 60,
                _ => 30,
            };
            out.push(Case {
                label: format!("{size_label} x{rcpts} rcpt"),
                n: env_usize(
                    &format!("PEC_BENCH_N_{}", tag.to_ascii_uppercase()),
                    default,
                ),
                tag,
                size,
                rcpts,
            });
        }
    }
    out
}

fn run() -> Res<()> {
    let sessions = env_usize("PEC_BENCH_SESSIONS", 8).max(1);
    let cases = cases();
    let base = TimeBase::now();
    println!(
        "pec_e2e: PEC gateway end to end vs the same gateways unsecured and two plain SMTP relay floors (in-process, postfix)"
    );
    print_machine("at start");

    // Signatures straight in the token, before anything else runs.
    let (sign_key, _) = token().new_key("bench-sign");
    let direct = direct_sign_seconds(&sign_key)?;
    let harness = {
        let data = [0x5au8; 256];
        for _ in 0..20 {
            token().sign(&sign_key, &data).map_err(|e| e.to_string())?;
        }
        let t = Instant::now();
        for _ in 0..1000 {
            token().sign(&sign_key, &data).map_err(|e| e.to_string())?;
        }
        t.elapsed().as_secs_f64() / 1000.0
    };

    let clamd = support::shared_clamd();
    let no_postfix = postfix::unavailable();
    if let Some(why) = &no_postfix {
        println!("postfix floor: not run ({why})");
    }
    let mut results = Vec::new();
    for case in &cases {
        println!(
            "\n== {}: {} messages of {} bytes, {} session(s) ==",
            case.label, case.n, case.size, sessions
        );
        let gateway_run = |what: &str, unsecured: bool| {
            let run = run_pec(case, sessions, &clamd, &base, unsecured)?;
            let m = &run.measured;
            println!(
                "   {what}: {:.1} msg/s, p50 {:.0} ms, p99 {:.0} ms",
                m.rate(),
                m.p(0.5),
                m.p(0.99)
            );
            Ok::<_, String>(run)
        };
        let pec = gateway_run("PEC", false)?;
        let unsecured = gateway_run("unsecured gateways", true)?;
        let floor = run_floor(case, sessions)?;
        println!(
            "   floor: {:.1} msg/s, p50 {:.1} ms, p99 {:.1} ms",
            floor.rate(),
            floor.p(0.5),
            floor.p(0.99)
        );
        let postfix = match no_postfix {
            Some(_) => None,
            None => {
                let postfix = run_postfix(case, sessions)?;
                println!(
                    "   postfix: {:.1} msg/s, p50 {:.1} ms, p99 {:.1} ms",
                    postfix.rate(),
                    postfix.p(0.5),
                    postfix.p(0.99)
                );
                Some(postfix)
            }
        };
        results.push(CaseResult {
            case: case.clone(),
            pec,
            unsecured,
            floor,
            postfix,
        });
    }
    report(sessions, &results, direct, harness);
    Ok(())
}

// ---------------------------------------------------------------- the report

/// One case on the gateway and on the floors.
struct CaseResult {
    case: Case,
    pec: PecRun,
    /// The same gateways with signing, signature checks and the antivirus
    /// switched off.
    unsecured: PecRun,
    floor: Measured,
    /// None when postfix cannot run here.
    postfix: Option<Measured>,
}

fn report(sessions: usize, results: &[CaseResult], direct: f64, harness: f64) {
    println!("\n================================================================================");
    println!(
        "Submission (start of MAIL FROM) to delivery receipt(s) in the sender's Maildir (PEC),\n\
         to the message in every recipient's Maildir on B (floor). {sessions} concurrent client\n\
         sessions, each reusing its connection (one login), messages handed out in order."
    );
    println!();
    println!(
        "{:<15} {:>5} {:>9} {:>7} {:>7} | {:>11} {:>7} {:>7} | {:>9}",
        "case",
        "N",
        "PEC msg/s",
        "p50 ms",
        "p99 ms",
        "floor msg/s",
        "p50 ms",
        "p99 ms",
        "PEC/floor"
    );
    for CaseResult {
        case, pec, floor, ..
    } in results
    {
        println!(
            "{:<15} {:>5} {:>9.1} {:>7.0} {:>7.0} | {:>11.1} {:>7.1} {:>7.1} | {:>9.3}",
            case.label,
            case.n,
            pec.measured.rate(),
            pec.measured.p(0.5),
            pec.measured.p(0.99),
            floor.rate(),
            floor.p(0.5),
            floor.p(0.99),
            pec.measured.rate() / floor.rate()
        );
    }
    println!(
        "  msg/s = messages complete / (last completion - first MAIL FROM); PEC/floor = ratio of msg/s."
    );
    println!(
        "\nThe same path through the same gateways with signing, signature checks and the\n\
         antivirus switched off (every receipt and envelope still built, sent and delivered):"
    );
    println!(
        "{:<15} {:>5} {:>9} | {:>15} {:>7} {:>7} | {:>19} | {:>13}",
        "case",
        "N",
        "PEC msg/s",
        "unsecured msg/s",
        "p50 ms",
        "p99 ms",
        "CPU ms/msg A, B",
        "PEC/unsecured"
    );
    for CaseResult {
        case,
        pec,
        unsecured,
        ..
    } in results
    {
        let per = |k: &str| unsecured.cpu.get(k).copied().unwrap_or(0.0) * 1000.0 / case.n as f64;
        println!(
            "{:<15} {:>5} {:>9.1} | {:>15.1} {:>7.0} {:>7.0} | {:>9.1} {:>9.1} | {:>13.3}",
            case.label,
            case.n,
            pec.measured.rate(),
            unsecured.measured.rate(),
            unsecured.measured.p(0.5),
            unsecured.measured.p(0.99),
            per("A"),
            per("B"),
            pec.measured.rate() / unsecured.measured.rate()
        );
    }
    if results.iter().any(|r| r.postfix.is_some()) {
        println!(
            "\nThe same path through two postfix instances (A relays to B, B delivers into Maildirs):"
        );
        println!(
            "{:<15} {:>5} {:>9} | {:>13} {:>7} {:>7} {:>12} | {:>11}",
            "case",
            "N",
            "PEC msg/s",
            "postfix msg/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/msg",
            "PEC/postfix"
        );
        for CaseResult {
            case, pec, postfix, ..
        } in results
        {
            let Some(postfix) = postfix else { continue };
            println!(
                "{:<15} {:>5} {:>9.1} | {:>13.1} {:>7.1} {:>7.1} {:>12.2} | {:>11.3}",
                case.label,
                case.n,
                pec.measured.rate(),
                postfix.rate(),
                postfix.p(0.5),
                postfix.p(0.99),
                postfix.cpu_s * 1000.0 / case.n as f64,
                pec.measured.rate() / postfix.rate()
            );
        }
        println!(
            "  CPU = every postfix process of both instances plus this program's client and poller."
        );
    }

    println!(
        "\nPEC steps, median ms since MAIL FROM (legal logs of A and B; 'seen' = this poller):"
    );
    println!(
        "{:<15} {:>6} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "case",
        "250",
        "acc.sgn",
        "env.q'd",
        "relayed",
        "B deliv*",
        "B rcpt.e*",
        "A rcpt.d*",
        "seen B*",
        "seen A*"
    );
    for CaseResult { case, pec, .. } in results {
        let s = &pec.steps;
        println!(
            "{:<15} {:>6.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>8.0}",
            case.label,
            median(&pec.measured.accept_ms),
            median(&s.acceptance_emitted),
            median(&s.envelope_queued),
            median(&s.relayed),
            median(&s.b_delivered),
            median(&s.b_receipt_emitted),
            median(&s.a_receipt_delivered),
            median(&pec.measured.deliver_ms),
            median(&pec.measured.lat_ms),
        );
    }
    println!(
        "  250 = reply to DATA; acc.sgn = acceptance signed+delivered; env.q'd = envelope signed+queued;\n\
         \x20 relayed = envelope handed to B; B deliv = in the recipients' mailboxes; B rcpt.e = delivery\n\
         \x20 receipts signed+queued on B; A rcpt.d = receipts in mario's mailbox. * = last recipient."
    );

    println!("\nCPU ms per message (utime+stime from /proc, whole case):");
    println!(
        "{:<15} {:>10} {:>10} {:>8} {:>14} | {:>14}",
        "case", "gateway A", "gateway B", "clamd", "bench process", "floor (all)"
    );
    for CaseResult {
        case, pec, floor, ..
    } in results
    {
        let per = |k: &str| pec.cpu.get(k).copied().unwrap_or(0.0) * 1000.0 / case.n as f64;
        println!(
            "{:<15} {:>10.1} {:>10.1} {:>8.1} {:>14.1} | {:>14.1}",
            case.label,
            per("A"),
            per("B"),
            per("clamd"),
            per("self"),
            floor.cpu_s * 1000.0 / case.n as f64
        );
    }

    println!("\nHSM signatures:");
    println!(
        "{:<15} {:>8} {:>8} {:>10} {:>14}",
        "case", "sigs A", "sigs B", "sigs/msg", "mean ms/sig"
    );
    for CaseResult { case, pec, .. } in results {
        let m = &pec.signing;
        let count = m.a_count + m.b_count;
        println!(
            "{:<15} {:>8} {:>8} {:>10.2} {:>14.2}",
            case.label,
            m.a_count,
            m.b_count,
            count / case.n as f64,
            if count > 0.0 {
                (m.a_sum + m.b_sum) / count * 1000.0
            } else {
                0.0
            }
        );
    }
    println!(
        "  (gateway figure: pec_gateway_signing_seconds = the whole sign step: CMS over the entity,\n\
         \x20 the token call, waiting for the signer's lock)"
    );
    println!(
        "  Token::sign direct, ECDSA P-256, 256 bytes, 1000 calls (child process): {:.3} ms/sig = {:.0} sig/s",
        direct * 1000.0,
        1.0 / direct
    );
    println!(
        "  harness token().sign (key lookup + sign), 1000 calls:                   {:.3} ms/sig = {:.0} sig/s",
        harness * 1000.0,
        1.0 / harness
    );
    println!();
    print_machine("at end");
    println!(
        "  messages: text/plain, unique pseudo-random body, total size incl. headers ~ the case size;\n\
         \x20 gateways: {} job workers, RUST_LOG=info, antivirus on (own clamd, 1 signature);\n\
         \x20 gateway config from the harness with maxMessageBytes 64 MiB, maxRecipients 20 and SMTP\n\
         \x20 timeouts 120 s; floor: plain TCP (no TLS, no AUTH), in this process; postfix: its\n\
         \x20 defaults apart from listeners, relay domain, next hop, mailboxes and chroot = n.",
        std::env::var("PEC_GATEWAY_WORKERS").unwrap_or_else(|_| "the default number of".into())
    );
}

fn print_machine(when: &str) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(std::env::temp_dir())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "machine ({when}): {cores} cores ({model}), load average {}, temp dir {} on {fs}",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        std::env::temp_dir().display()
    );
}

// ------------------------------------------------------------- measurements

/// Maps gateway wall-clock times (legal log) onto this process's `Instant`s.
struct TimeBase {
    instant: Instant,
    wall: chrono::DateTime<chrono::Utc>,
}

impl TimeBase {
    fn now() -> Self {
        Self {
            instant: Instant::now(),
            wall: pec_gateway::clock::now(),
        }
    }

    fn ms_of_instant(&self, i: Instant) -> f64 {
        i.duration_since(self.instant).as_secs_f64() * 1000.0
    }

    fn ms_of_wall(&self, t: chrono::DateTime<chrono::Utc>) -> f64 {
        (t - self.wall).num_microseconds().unwrap_or(0) as f64 / 1000.0
    }
}

/// What the sessions and the poller record.
struct Progress {
    tag: String,
    rcpts: usize,
    start: Vec<Option<Instant>>,
    accepted: Vec<Option<Instant>>,
    ident: Vec<String>,
    receipts: Vec<usize>,
    done_at: Vec<Option<Instant>>,
    delivered: Vec<usize>,
    delivered_at: Vec<Option<Instant>>,
    done: usize,
    last_progress: Instant,
    failure: Option<String>,
}

impl Progress {
    fn new(case: &Case) -> Self {
        Self {
            tag: case.tag.clone(),
            rcpts: case.rcpts,
            start: vec![None; case.n],
            accepted: vec![None; case.n],
            ident: vec![String::new(); case.n],
            receipts: vec![0; case.n],
            done_at: vec![None; case.n],
            delivered: vec![0; case.n],
            delivered_at: vec![None; case.n],
            done: 0,
            last_progress: Instant::now(),
            failure: None,
        }
    }

    fn index(&self, subject: &str) -> Option<usize> {
        let marker = format!("bench-{}-", self.tag);
        let at = subject.find(&marker)? + marker.len();
        let digits: String = subject[at..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok().filter(|i| *i < self.start.len())
    }

    fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            self.failure = Some(why);
        }
    }
}

/// The outcome of one case on one system.
struct Measured {
    n: usize,
    wall: Duration,
    lat_ms: Vec<f64>,
    deliver_ms: Vec<f64>,
    accept_ms: Vec<f64>,
    starts: Vec<Instant>,
    idents: Vec<String>,
    cpu_s: f64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.n as f64 / self.wall.as_secs_f64()
    }

    fn p(&self, q: f64) -> f64 {
        percentile(&self.lat_ms, q)
    }
}

fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// Which Maildir a poller watches and what it expects there.
#[derive(Clone, Copy, PartialEq)]
enum Watch {
    /// The PEC sender's mailbox: acceptance and delivery receipts.
    SenderReceipts,
    /// A PEC recipient's mailbox: transport envelopes.
    PecRecipient,
    /// A floor recipient's mailbox: the message itself.
    FloorRecipient,
}

/// The first header block of the file (at most 64 KiB read), with CRLF line
/// ends (postfix writes Maildir files with LF ones).
fn head_of(path: &Path) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = 0;
    while len < buf.len() {
        let n = file.read(&mut buf[len..]).ok()?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n")
            || buf[..len].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
    }
    let head = &buf[..len];
    if head.contains(&b'\r') {
        Some(header_block(head))
    } else {
        let crlf = String::from_utf8_lossy(head).replace('\n', "\r\n");
        Some(header_block(crlf.as_bytes()))
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// Lists the watched Maildirs' `new/` every few ms until `stop`, recording
/// what arrives in `progress` and moving it to `cur/`.
fn poller(dirs: Vec<(PathBuf, Watch)>, progress: Arc<Mutex<Progress>>, stop: Arc<AtomicBool>) {
    let mut seen: HashSet<(usize, OsString)> = HashSet::new();
    while !stop.load(Ordering::Relaxed) {
        for (k, (dir, watch)) in dirs.iter().enumerate() {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                let name = entry.file_name();
                if name.to_string_lossy().starts_with('.') || seen.contains(&(k, name.clone())) {
                    continue;
                }
                let Some(head) = head_of(&entry.path()) else {
                    continue;
                };
                // Read: into cur/, as a mail reader moves it, so that new/
                // and this listing stay short however long the run.
                let read = dir
                    .with_file_name("cur")
                    .join(format!("{}:2,S", name.to_string_lossy()));
                if std::fs::rename(entry.path(), read).is_err() {
                    seen.insert((k, name));
                }
                let now = Instant::now();
                let subject = header(&head, "Subject").unwrap_or_default().to_string();
                let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                let index = p.index(&subject);
                match watch {
                    Watch::SenderReceipts => match header(&head, "X-Ricevuta") {
                        Some("accettazione") => {}
                        Some("avvenuta-consegna") => match index {
                            Some(i) => {
                                p.receipts[i] += 1;
                                p.last_progress = now;
                                if p.receipts[i] == p.rcpts {
                                    p.done_at[i] = Some(now);
                                    p.done += 1;
                                }
                            }
                            None => p.fail(format!("a delivery receipt for {subject:?}")),
                        },
                        other => p.fail(format!(
                            "unexpected message in the sender's mailbox: X-Ricevuta {other:?}, Subject {subject:?}"
                        )),
                    },
                    Watch::PecRecipient | Watch::FloorRecipient => {
                        if *watch == Watch::PecRecipient
                            && header(&head, "X-Trasporto") != Some("posta-certificata")
                        {
                            p.fail(format!(
                                "unexpected message in a recipient's mailbox: X-Trasporto {:?}, Subject {subject:?}",
                                header(&head, "X-Trasporto")
                            ));
                            continue;
                        }
                        let Some(i) = index else {
                            p.fail(format!("unexpected Subject {subject:?} in {}", dir.display()));
                            continue;
                        };
                        p.delivered[i] += 1;
                        p.last_progress = now;
                        if p.delivered[i] == p.rcpts {
                            p.delivered_at[i] = Some(now);
                            if *watch == Watch::FloorRecipient {
                                p.done_at[i] = Some(now);
                                p.done += 1;
                            }
                        }
                    }
                }
            }
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// A message of about `size` bytes (headers included) with a body unique to
/// `seed`.
fn make_message(from: &str, to: &[&str], subject: &str, size: usize, seed: u64) -> String {
    let head = message(from, to, subject, "").len();
    let mut remaining = size.saturating_sub(head).max(1);
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut body = String::with_capacity(remaining);
    while remaining > 0 {
        let line = if remaining > 78 { 76 } else { remaining };
        for _ in 0..line {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            body.push(alphabet[(x % alphabet.len() as u64) as usize] as char);
        }
        remaining -= line;
        if remaining >= 2 {
            body.push_str("\r\n");
            remaining -= 2;
        }
    }
    message(from, to, subject, &body)
}

/// Sends the case's messages through `connect`ed sessions while the poller
/// watches `dirs`; returns once every message is complete.
fn drive(
    case: &Case,
    sessions: usize,
    from: &str,
    rcpts: &[String],
    dirs: Vec<(PathBuf, Watch)>,
    connect: &(dyn Fn() -> Client + Sync),
    on_stall: &dyn Fn() -> String,
) -> Res<Measured> {
    let progress = Arc::new(Mutex::new(Progress::new(case)));
    let stop = Arc::new(AtomicBool::new(false));
    let poll = {
        let (progress, stop) = (progress.clone(), stop.clone());
        std::thread::spawn(move || poller(dirs, progress, stop))
    };
    let next = AtomicUsize::new(0);
    let to: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let cpu0 = cpu_ticks_self();
    let outcome: Res<()> = std::thread::scope(|scope| {
        for _ in 0..sessions.min(case.n) {
            scope.spawn(|| {
                let mut c = connect();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= case.n {
                        break;
                    }
                    let subject = format!("bench-{}-{i}", case.tag);
                    let msg = make_message(from, &to, &subject, case.size, i as u64 + 1);
                    let t0 = Instant::now();
                    progress.lock().unwrap_or_else(|e| e.into_inner()).start[i] = Some(t0);
                    let sent = send_one(&mut c, from, &to, &msg);
                    let now = Instant::now();
                    let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                    match sent {
                        Ok(text) => {
                            p.accepted[i] = Some(now);
                            p.last_progress = now;
                            p.ident[i] = text
                                .split_once("accepted as ")
                                .map(|(_, id)| id.trim().to_string())
                                .unwrap_or_default();
                        }
                        Err(e) => {
                            p.fail(format!("{subject}: {e}"));
                            return;
                        }
                    }
                }
                let _ = c.cmd("QUIT");
            });
        }
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let p = progress.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(f) = &p.failure {
                return Err(f.clone());
            }
            if p.done == case.n {
                return Ok(());
            }
            if p.last_progress.elapsed() > STALL {
                let missing: Vec<usize> = (0..case.n).filter(|i| p.done_at[*i].is_none()).collect();
                return Err(format!(
                    "no progress for {STALL:?}: {} of {} messages incomplete (first: bench-{}-{}; accepted: {}, deliveries: {}, receipts: {})\n{}",
                    missing.len(),
                    case.n,
                    case.tag,
                    missing[0],
                    p.accepted[missing[0]].is_some(),
                    p.delivered[missing[0]],
                    p.receipts[missing[0]],
                    on_stall()
                ));
            }
        }
    });
    stop.store(true, Ordering::Relaxed);
    let _ = poll.join();
    outcome?;
    let cpu_s = ticks_to_s(cpu_ticks_self().saturating_sub(cpu0));
    let p = progress.lock().unwrap_or_else(|e| e.into_inner());
    let starts: Vec<Instant> = p.start.iter().map(|s| s.expect("started")).collect();
    let ms = |from: Instant, to: Option<Instant>| {
        to.map(|t| t.duration_since(from).as_secs_f64() * 1000.0)
    };
    let first = *starts.iter().min().expect("messages");
    let last = p.done_at.iter().flatten().max().copied().expect("done");
    Ok(Measured {
        n: case.n,
        wall: last.duration_since(first),
        lat_ms: (0..case.n)
            .filter_map(|i| ms(starts[i], p.done_at[i]))
            .collect(),
        deliver_ms: (0..case.n)
            .filter_map(|i| ms(starts[i], p.delivered_at[i]))
            .collect(),
        accept_ms: (0..case.n)
            .filter_map(|i| ms(starts[i], p.accepted[i]))
            .collect(),
        starts,
        idents: p.ident.clone(),
        cpu_s,
    })
}

/// One SMTP transaction; the final reply's text on 250.
fn send_one(c: &mut Client, from: &str, to: &[&str], msg: &str) -> Res<String> {
    let (code, text) = c.cmd(&format!("MAIL FROM:<{from}>"));
    if code != 250 {
        return Err(format!("MAIL FROM: {code} {text}"));
    }
    for t in to {
        let (code, text) = c.cmd(&format!("RCPT TO:<{t}>"));
        if code != 250 {
            return Err(format!("RCPT TO {t}: {code} {text}"));
        }
    }
    let (code, text) = c.data(msg);
    if code != 250 {
        return Err(format!("DATA: {code} {text}"));
    }
    Ok(text)
}

// ---------------------------------------------------------------------- PEC

struct PecRun {
    measured: Measured,
    steps: Steps,
    signing: Signing,
    cpu: BTreeMap<&'static str, f64>,
}

#[derive(Default)]
struct Signing {
    a_sum: f64,
    a_count: f64,
    b_sum: f64,
    b_count: f64,
}

/// Per message, ms since MAIL FROM at which each legal-log step happened.
#[derive(Default)]
struct Steps {
    acceptance_emitted: Vec<f64>,
    envelope_queued: Vec<f64>,
    relayed: Vec<f64>,
    b_delivered: Vec<f64>,
    b_receipt_emitted: Vec<f64>,
    a_receipt_delivered: Vec<f64>,
}

/// Rewrites one line of the harness's gateway.yaml.
fn set_line(config: &str, old: &str, new: &str) -> Res<String> {
    if !config.contains(old) {
        return Err(format!(
            "the harness's gateway.yaml no longer has {old:?}; update the bench"
        ));
    }
    Ok(config.replacen(old, new, 1))
}

fn tune(config: String) -> Res<String> {
    let c = set_line(
        &config,
        "maxMessageBytes: 200000\n",
        "maxMessageBytes: 67108864\n",
    )?;
    let c = set_line(&c, "maxRecipients: 5\n", "maxRecipients: 20\n")?;
    let c = set_line(&c, "idleTimeoutSeconds: 3\n", "idleTimeoutSeconds: 120\n")?;
    set_line(&c, "dataTimeoutSeconds: 5\n", "dataTimeoutSeconds: 120\n")
}

/// Two gateways routing to each other: A with mario, B with r00..r09.
struct PecPair {
    a: Gateway,
    b: Gateway,
    da: Domain,
    db: Domain,
    _root: tempfile::TempDir,
}

/// A gateway pair; `unsecured` starts both with signing, signature checks
/// and the antivirus switched off.
fn pec_pair(clamd: &str, unsecured: bool) -> Res<PecPair> {
    static PAIRS: AtomicUsize = AtomicUsize::new(0);
    let k = PAIRS.fetch_add(1, Ordering::Relaxed);
    let root = tempfile::tempdir().map_err(|e| e.to_string())?;
    let da = Domain::new(
        root.path(),
        &format!("pec-a{k}.test"),
        &[("mario", MARIO_PASSWORD)],
    );
    let names: Vec<(String, String)> = (0..MAILBOXES)
        .map(|i| (format!("r{i:02}"), format!("r{i:02}-secret")))
        .collect();
    let boxes: Vec<(&str, &str)> = names
        .iter()
        .map(|(m, p)| (m.as_str(), p.as_str()))
        .collect();
    let db = Domain::new(root.path(), &format!("pec-b{k}.test"), &boxes);
    let providers = root.path().join("providers");
    std::fs::create_dir_all(&providers).map_err(|e| e.to_string())?;
    std::fs::write(providers.join("a.pem"), &da.cert_pem).map_err(|e| e.to_string())?;
    std::fs::write(providers.join("b.pem"), &db.cert_pem).map_err(|e| e.to_string())?;
    let pin_file = root.path().join("pin");
    std::fs::write(&pin_file, &token().pin).map_err(|e| e.to_string())?;
    let config_a = tune(da.config(clamd, &providers, &[(&db.name, db.smtp)], &pin_file))?;
    let config_b = tune(db.config(clamd, &providers, &[(&da.name, da.smtp)], &pin_file))?;
    let env: &[(&str, &str)] = if unsecured {
        &[(pec_gateway::gateway::UNSECURED_ENV, "1")]
    } else {
        &[]
    };
    let a = Gateway::start(&da, &config_a, env);
    let b = Gateway::start(&db, &config_b, env);
    support::wait_for(Duration::from_secs(30), "both gateways ready", || {
        a.ready() && b.ready()
    });
    Ok(PecPair {
        a,
        b,
        da,
        db,
        _root: root,
    })
}

/// Runs `case` through a fresh gateway pair; `unsecured` as for [`pec_pair`].
fn run_pec(
    case: &Case,
    sessions: usize,
    clamd: &str,
    base: &TimeBase,
    unsecured: bool,
) -> Res<PecRun> {
    let pair = pec_pair(clamd, unsecured)?;
    let mario = format!("mario@{}", pair.da.name);
    let rcpts: Vec<String> = (0..case.rcpts)
        .map(|i| format!("r{i:02}@{}", pair.db.name))
        .collect();
    let mut dirs = vec![(
        pair.a.dir.join("mailboxes/mario/new"),
        Watch::SenderReceipts,
    )];
    for i in 0..case.rcpts {
        dirs.push((
            pair.b.dir.join(format!("mailboxes/r{i:02}/new")),
            Watch::PecRecipient,
        ));
    }
    let port = pair.a.submissions;
    let connect = || Client::login(port, &mario, MARIO_PASSWORD);
    let on_stall = || {
        let tail = |g: &Gateway| {
            let log = g.output();
            let lines: Vec<&str> = log.lines().rev().take(10).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        format!(
            "gateway A log ends:\n{}\ngateway B log ends:\n{}",
            tail(&pair.a),
            tail(&pair.b)
        )
    };
    let cpu0 = cpu_snapshot(&pair);
    let measured = drive(case, sessions, &mario, &rcpts, dirs, &connect, &on_stall)?;
    let cpu1 = cpu_snapshot(&pair);
    let cpu = cpu1
        .iter()
        .map(|(k, v)| {
            (
                *k,
                ticks_to_s(v.saturating_sub(cpu0.get(k).copied().unwrap_or(0))),
            )
        })
        .collect();
    let signing = signing_metrics(&pair);
    if unsecured && signing.a_count + signing.b_count > 0.0 {
        return Err(format!(
            "the unsecured gateways signed {} times: {} did not reach them",
            signing.a_count + signing.b_count,
            pec_gateway::gateway::UNSECURED_ENV
        ));
    }
    let steps = steps(&pair, &measured, base);
    drop(pair);
    Ok(PecRun {
        measured,
        steps,
        signing,
        cpu,
    })
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn signing_metrics(pair: &PecPair) -> Signing {
    let (_, _, a) = pair.a.http_get("/metrics");
    let (_, _, b) = pair.b.http_get("/metrics");
    Signing {
        a_sum: metric(&a, "pec_gateway_signing_seconds_sum"),
        a_count: metric(&a, "pec_gateway_signing_seconds_count"),
        b_sum: metric(&b, "pec_gateway_signing_seconds_sum"),
        b_count: metric(&b, "pec_gateway_signing_seconds_count"),
    }
}

/// (kind, outcome, identificativo) -> times (ms on `base`) from a legal log.
fn legal_log(dir: &Path, base: &TimeBase) -> HashMap<(String, String, String), Vec<f64>> {
    let mut out: HashMap<(String, String, String), Vec<f64>> = HashMap::new();
    let text = std::fs::read_to_string(dir.join("log/legal.log")).unwrap_or_default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or_default();
        let Ok(time) = chrono::DateTime::parse_from_rfc3339(field("time")) else {
            continue;
        };
        out.entry((
            field("kind").to_string(),
            field("outcome").to_string(),
            field("identificativo").to_string(),
        ))
        .or_default()
        .push(base.ms_of_wall(time.with_timezone(&chrono::Utc)));
    }
    out
}

fn steps(pair: &PecPair, m: &Measured, base: &TimeBase) -> Steps {
    let a = legal_log(&pair.a.dir, base);
    let b = legal_log(&pair.b.dir, base);
    let mut s = Steps::default();
    for (i, ident) in m.idents.iter().enumerate() {
        let start = base.ms_of_instant(m.starts[i]);
        let last = |log: &HashMap<(String, String, String), Vec<f64>>,
                    kind: &str,
                    outcome: &str,
                    out: &mut Vec<f64>| {
            if let Some(times) = log.get(&(kind.to_string(), outcome.to_string(), ident.clone()))
                && let Some(t) = times.iter().copied().reduce(f64::max)
            {
                out.push(t - start);
            }
        };
        last(&a, "accettazione", "emitted", &mut s.acceptance_emitted);
        last(&a, "posta-certificata", "queued", &mut s.envelope_queued);
        last(&a, "inoltro", "relayed", &mut s.relayed);
        last(&b, "consegna", "delivered", &mut s.b_delivered);
        last(&b, "avvenuta-consegna", "emitted", &mut s.b_receipt_emitted);
        last(
            &a,
            "avvenuta-consegna",
            "delivered",
            &mut s.a_receipt_delivered,
        );
    }
    s
}

// ------------------------------------------------------------ CPU from /proc

fn clock_ticks() -> f64 {
    static TCK: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

fn ticks_to_s(ticks: u64) -> f64 {
    ticks as f64 / clock_ticks()
}

/// What a `/proc/<pid>/stat` says of a process's CPU.
struct Stat {
    ppid: u32,
    /// utime + stime.
    ticks: u64,
    /// cutime + cstime: its children it has waited for.
    reaped_ticks: u64,
}

fn stat_of(path: &Path) -> Option<Stat> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ppid(1) ... utime(11) stime(12)
    // cutime(13) cstime(14).
    let field = |i: usize| fields.get(i)?.parse::<u64>().ok();
    Some(Stat {
        ppid: fields.get(1)?.parse().ok()?,
        ticks: field(11)? + field(12)?,
        reaped_ticks: field(13)? + field(14)?,
    })
}

fn cpu_ticks_self() -> u64 {
    stat_of(Path::new("/proc/self/stat")).map_or(0, |s| s.ticks)
}

/// CPU ticks so far of this process, gateway A, gateway B and clamd (the
/// children of this process, told apart by their command lines).
fn cpu_snapshot(pair: &PecPair) -> BTreeMap<&'static str, u64> {
    let me = std::process::id();
    let mut out = BTreeMap::new();
    out.insert("self", cpu_ticks_self());
    let a_dir = pair.a.dir.display().to_string();
    let b_dir = pair.b.dir.display().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.filter_map(Result::ok) {
        let Some(Stat { ppid, ticks, .. }) = stat_of(&p.path().join("stat")) else {
            continue;
        };
        if ppid != me {
            continue;
        }
        let cmdline = std::fs::read(p.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let label = if cmdline.contains(&format!("{a_dir}/")) {
            "A"
        } else if cmdline.contains(&format!("{b_dir}/")) {
            "B"
        } else if cmdline.contains("clamd") && !cmdline.starts_with("sh ") {
            "clamd"
        } else {
            continue;
        };
        *out.entry(label).or_default() += ticks;
    }
    out
}

// ------------------------------------------------------------------- floor

fn run_floor(case: &Case, sessions: usize) -> Res<Measured> {
    let floor = Floor::start()?;
    let errors = floor.errors.clone();
    let on_stall = || {
        format!(
            "floor errors: {:?}",
            errors.lock().unwrap_or_else(|e| e.into_inner())
        )
    };
    drive_plain(case, sessions, floor.port_a, &floor.b_root, &on_stall)
}

fn run_postfix(case: &Case, sessions: usize) -> Res<Measured> {
    let relay = postfix::Postfix::start(MAILBOXES)?;
    let on_stall = || format!("postfix's logs:\n{}", relay.log_tail());
    // postfix starts its daemons on demand, so the first messages after a
    // start pay for process creation: a few per session go first, unmeasured,
    // to a mailbox no case watches. (The gateways get no warm-up, so this
    // can only favour the floor.)
    let warm_up = Case {
        label: "warm-up".into(),
        tag: "warm".into(),
        n: sessions * 5,
        rcpts: 1,
        ..case.clone()
    };
    let mailbox = postfix::WARM_UP_MAILBOX;
    drive(
        &warm_up,
        sessions,
        "mario@floor-a.test",
        &[format!("{mailbox}@floor-b.test")],
        vec![(relay.mail.join(mailbox).join("new"), Watch::FloorRecipient)],
        &|| plain_client(relay.port_a),
        &on_stall,
    )?;
    let cpu0 = relay.cpu_ticks();
    let mut measured = drive_plain(case, sessions, relay.port_a, &relay.mail, &on_stall)?;
    measured.cpu_s += ticks_to_s(relay.cpu_ticks().saturating_sub(cpu0));
    Ok(measured)
}

/// Drives a case through a plain relay pair: plain SMTP to A on `port`,
/// done when the message is in each recipient's Maildir under `mail` (B's).
fn drive_plain(
    case: &Case,
    sessions: usize,
    port: u16,
    mail: &Path,
    on_stall: &dyn Fn() -> String,
) -> Res<Measured> {
    let rcpts: Vec<String> = (0..case.rcpts)
        .map(|i| format!("r{i:02}@floor-b.test"))
        .collect();
    let dirs = (0..case.rcpts)
        .map(|i| (mail.join(format!("r{i:02}/new")), Watch::FloorRecipient))
        .collect();
    drive(
        case,
        sessions,
        "mario@floor-a.test",
        &rcpts,
        dirs,
        &|| plain_client(port),
        on_stall,
    )
}

/// A client session with a plain relay on `port`, past its greeting.
fn plain_client(port: u16) -> Client {
    let mut c = Client::plain(port);
    c.expect("EHLO client.test", 250);
    c
}

/// The floor: two plain SMTP relays on loopback in a runtime of their own.
struct Floor {
    port_a: u16,
    b_root: PathBuf,
    errors: Arc<Mutex<Vec<String>>>,
    runtime: Option<tokio::runtime::Runtime>,
    _dir: tempfile::TempDir,
}

impl Drop for Floor {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A message relay A holds until B has it.
struct Spooled {
    path: PathBuf,
    from: String,
    rcpts: Vec<String>,
}

enum Role {
    /// Spool durably, reply, queue for forwarding.
    A {
        spool: PathBuf,
        queue: tokio::sync::mpsc::UnboundedSender<Spooled>,
        seq: AtomicUsize,
    },
    /// Deliver into the recipients' Maildirs, then reply.
    B { maildirs: Maildirs },
}

impl Floor {
    fn start() -> Res<Floor> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let spool = dir.path().join("a-spool");
        let b_root = dir.path().join("b-mailboxes");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let (la, lb) = runtime
            .block_on(async {
                Ok::<_, std::io::Error>((
                    tokio::net::TcpListener::bind("127.0.0.1:0").await?,
                    tokio::net::TcpListener::bind("127.0.0.1:0").await?,
                ))
            })
            .map_err(|e| e.to_string())?;
        let port_a = la.local_addr().map_err(|e| e.to_string())?.port();
        let addr_b = lb.local_addr().map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        runtime.spawn(floor_serve(
            la,
            Arc::new(Role::A {
                spool,
                queue: tx,
                seq: AtomicUsize::new(0),
            }),
            errors.clone(),
        ));
        runtime.spawn(floor_serve(
            lb,
            Arc::new(Role::B {
                maildirs: Maildirs::new(&b_root),
            }),
            errors.clone(),
        ));
        for _ in 0..FLOOR_FORWARDERS {
            runtime.spawn(floor_forward(rx.clone(), addr_b, errors.clone()));
        }
        Ok(Floor {
            port_a,
            b_root,
            errors,
            runtime: Some(runtime),
            _dir: dir,
        })
    }
}

async fn floor_serve(
    listener: tokio::net::TcpListener,
    role: Arc<Role>,
    errors: Arc<Mutex<Vec<String>>>,
) {
    while let Ok((stream, _)) = listener.accept().await {
        let (role, errors) = (role.clone(), errors.clone());
        tokio::spawn(async move {
            if let Err(e) = floor_session(stream, &role).await {
                errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(format!("session: {e}"));
            }
        });
    }
}

fn angle(line: &str) -> String {
    line.split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(a, _)| a.to_string())
        .unwrap_or_default()
}

async fn floor_session(stream: tokio::net::TcpStream, role: &Role) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = tokio::io::BufReader::new(r);
    w.write_all(b"220 floor ESMTP\r\n").await?;
    let (mut from, mut rcpts) = (String::new(), Vec::<String>::new());
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line).to_string();
        let verb = text
            .get(..4)
            .map(str::to_ascii_uppercase)
            .unwrap_or_default();
        let reply: String = match verb.as_str() {
            "EHLO" | "HELO" => "250-floor\r\n250 8BITMIME\r\n".into(),
            "MAIL" => {
                from = angle(&text);
                rcpts.clear();
                "250 ok\r\n".into()
            }
            "RCPT" => {
                rcpts.push(angle(&text));
                "250 ok\r\n".into()
            }
            "RSET" => {
                rcpts.clear();
                "250 ok\r\n".into()
            }
            "NOOP" => "250 ok\r\n".into(),
            "QUIT" => {
                w.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            "DATA" => {
                w.write_all(b"354 go ahead\r\n").await?;
                let mut body = Vec::new();
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0 {
                        return Ok(());
                    }
                    if line == b".\r\n" {
                        break;
                    }
                    body.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
                }
                match floor_take(
                    role,
                    std::mem::take(&mut from),
                    std::mem::take(&mut rcpts),
                    body,
                )
                .await
                {
                    Ok(()) => "250 ok\r\n".into(),
                    Err(e) => format!("451 {e}\r\n"),
                }
            }
            _ => "502 not implemented\r\n".into(),
        };
        w.write_all(reply.as_bytes()).await?;
    }
}

/// What a relay does with a complete message before its 250.
async fn floor_take(role: &Role, from: String, rcpts: Vec<String>, body: Vec<u8>) -> Res<()> {
    match role {
        Role::A { spool, queue, seq } => {
            let name = format!("{}.eml", seq.fetch_add(1, Ordering::Relaxed));
            let spool = spool.clone();
            let path = tokio::task::spawn_blocking(move || write_durably(&spool, &name, &body))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            queue
                .send(Spooled { path, from, rcpts })
                .map_err(|e| e.to_string())
        }
        Role::B { maildirs } => {
            let maildirs = maildirs.clone();
            tokio::task::spawn_blocking(move || {
                for r in &rcpts {
                    let local = r.split('@').next().unwrap_or_default().to_ascii_lowercase();
                    maildirs
                        .deliver(&local, &body)
                        .map_err(|e| format!("{r}: {e}"))?;
                }
                Ok(())
            })
            .await
            .map_err(|e| e.to_string())?
        }
    }
}

/// A persistent SMTP client connection from relay A to relay B.
struct Conn {
    r: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> std::io::Result<Conn> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        let (r, w) = s.into_split();
        let mut c = Conn {
            r: tokio::io::BufReader::new(r),
            w,
        };
        c.expect(220).await?;
        c.command(b"EHLO floor-a.test\r\n", 250).await?;
        Ok(c)
    }

    async fn expect(&mut self, code: u16) -> std::io::Result<()> {
        use tokio::io::AsyncBufReadExt as _;
        let mut line = String::new();
        loop {
            line.clear();
            if self.r.read_line(&mut line).await? == 0 {
                return Err(std::io::Error::other("relay B hung up"));
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                break;
            }
        }
        if line.get(..3).and_then(|c| c.parse::<u16>().ok()) == Some(code) {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "expected {code}, got {line:?}"
            )))
        }
    }

    async fn command(&mut self, bytes: &[u8], code: u16) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        self.w.write_all(bytes).await?;
        self.expect(code).await
    }

    async fn send(&mut self, job: &Spooled, data: &[u8]) -> std::io::Result<()> {
        self.command(format!("MAIL FROM:<{}>\r\n", job.from).as_bytes(), 250)
            .await?;
        for r in &job.rcpts {
            self.command(format!("RCPT TO:<{r}>\r\n").as_bytes(), 250)
                .await?;
        }
        self.command(b"DATA\r\n", 354).await?;
        let mut stuffed = Vec::with_capacity(data.len() + data.len() / 64 + 8);
        for line in data.split_inclusive(|b| *b == b'\n') {
            if line.first() == Some(&b'.') {
                stuffed.push(b'.');
            }
            stuffed.extend_from_slice(line);
        }
        if !stuffed.ends_with(b"\r\n") {
            stuffed.extend_from_slice(b"\r\n");
        }
        stuffed.extend_from_slice(b".\r\n");
        self.command(&stuffed, 250).await
    }
}

/// One forwarder: takes spooled messages, hands them to B, drops them.
async fn floor_forward(
    rx: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Spooled>>>,
    addr_b: std::net::SocketAddr,
    errors: Arc<Mutex<Vec<String>>>,
) {
    let mut conn: Option<Conn> = None;
    loop {
        let next = rx.lock().await.recv().await;
        let Some(job) = next else { return };
        let result: std::io::Result<()> = async {
            let data = tokio::fs::read(&job.path).await?;
            if conn.is_none() {
                conn = Some(Conn::open(addr_b).await?);
            }
            if let Some(c) = conn.as_mut() {
                c.send(&job, &data).await?;
            }
            tokio::fs::remove_file(&job.path).await
        }
        .await;
        if let Err(e) = result {
            conn = None;
            errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("forwarding {}: {e}", job.path.display()));
        }
    }
}

// ------------------------------------------------------------- signatures

/// Seconds per direct `Token::sign`, timed in a child process of this
/// program (the PKCS#11 module here is already initialised by the harness).
fn direct_sign_seconds(key_hex: &str) -> Res<f64> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let out = std::process::Command::new(exe)
        .env(SIGN_CHILD_ENV, key_hex)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "the signing child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .map(|total| total / 1000.0)
        .map_err(|e| format!("the signing child printed no time: {e}"))
}

/// The child: log in, then 1000 ECDSA P-256 signatures; prints the seconds.
fn sign_child(key_hex: &str) -> Res<()> {
    use pec_core::hsm::{Algorithm, AuthPin, Hsm};
    let var = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
    let hsm = Hsm::open(Path::new(&var("PEC_PKCS11_MODULE")?)).map_err(|e| e.to_string())?;
    let token = hsm
        .login(
            &var("PEC_E2E_HSM_TOKEN")?,
            &AuthPin::from(var("PEC_E2E_HSM_PIN")?),
        )
        .map_err(|e| e.to_string())?;
    let id = pec_core::der::from_hex(key_hex).ok_or("key id is not hex")?;
    let key = token.existing_key(&id).map_err(|e| e.to_string())?;
    let data = [0x5au8; 256];
    for _ in 0..20 {
        token
            .sign(key, Algorithm::EcdsaP256, &data)
            .map_err(|e| e.to_string())?;
    }
    let t = Instant::now();
    for _ in 0..1000 {
        token
            .sign(key, Algorithm::EcdsaP256, &data)
            .map_err(|e| e.to_string())?;
    }
    println!("{}", t.elapsed().as_secs_f64());
    Ok(())
}
