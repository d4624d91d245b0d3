//! The second floor: the same path through Debian's postfix, the plain relay
//! a provider would otherwise run. Two private instances on loopback, each
//! with a configuration directory, queue and data directory of its own:
//! relay A accepts mail for `floor-b.test` and relays it over SMTP to relay
//! B, whose `virtual(8)` agent delivers it into one Maildir per recipient.
//!
//! The configuration is postfix's defaults apart from what this path needs
//! (the listeners, the relayed domain and its next hop, the mailboxes) and
//! `chroot = n` for every service, since the instances live in a temporary
//! directory without the files a chroot needs. postfix writes a message's
//! queue file with fsync before its 250, and `virtual(8)` syncs each Maildir
//! file, so both floors are durable at the same points as the gateway.
//!
//! Starting postfix needs root (its master process runs as root and its
//! daemons as the `postfix` user); without root or without postfix this
//! floor is not run, and the benchmark says why.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
};

use super::{Res, free_port, stat_of};

/// The mailbox the warm-up messages go to, which no case watches.
pub const WARM_UP_MAILBOX: &str = "warm-up";

const POSTFIX: &str = "/usr/sbin/postfix";
const POSTCONF: &str = "/usr/sbin/postconf";
/// Debian's service table, the base of each instance's `master.cf`.
const MASTER_CF: &str = "/etc/postfix/master.cf";

/// Why this floor cannot run on this machine, if it cannot.
pub fn unavailable() -> Option<String> {
    if !Path::new(POSTFIX).exists() || !Path::new(MASTER_CF).exists() {
        return Some(format!(
            "{POSTFIX} or {MASTER_CF} missing (Debian's package postfix; e2e/bench.sh installs it)"
        ));
    }
    match id("-u", "") {
        Ok(0) => None,
        _ => Some("postfix's master process must be started by root".to_string()),
    }
}

/// Two running postfix instances, stopped on drop.
pub struct Postfix {
    /// Relay A's SMTP port.
    pub port_a: u16,
    /// Relay B's Maildirs: `<mailbox>/new`.
    pub mail: PathBuf,
    instances: [PathBuf; 2],
    _dir: tempfile::TempDir,
}

impl Postfix {
    /// Starts relay B (mailboxes `r00`..) and relay A in front of it.
    pub fn start(mailboxes: usize) -> Res<Postfix> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (port_a, port_b) = (free_port(), free_port());
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mail = dir.path().join("mail");
        std::fs::create_dir(&mail).map_err(|e| e.to_string())?;
        let (uid, gid) = (id("-u", "nobody")?, id("-g", "nobody")?);
        std::os::unix::fs::chown(&mail, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
        let maps = (0..mailboxes)
            .map(|i| format!("r{i:02}@floor-b.test=r{i:02}/"))
            .chain([format!("{WARM_UP_MAILBOX}@floor-b.test={WARM_UP_MAILBOX}/")])
            .collect::<Vec<_>>()
            .join(", ");
        let shared = |name: &str, root: &Path| {
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {root}/queue\n\
                 data_directory = {root}/data\n\
                 myhostname = relay-{name}.floor.test\n\
                 mydestination =\n\
                 inet_protocols = ipv4\n\
                 mynetworks = 127.0.0.0/8\n\
                 maillog_file_prefixes = {root}\n\
                 maillog_file = {root}/maillog\n",
                root = root.display()
            )
        };
        instance(
            &b,
            port_b,
            &format!(
                "{}virtual_mailbox_domains = floor-b.test\n\
                 virtual_mailbox_base = {}\n\
                 virtual_mailbox_maps = inline:{{ {maps} }}\n\
                 virtual_uid_maps = static:{uid}\n\
                 virtual_gid_maps = static:{gid}\n",
                shared("b", &b),
                mail.display()
            ),
        )?;
        let relay = Postfix {
            port_a,
            mail,
            instances: [b.clone(), a.clone()],
            _dir: dir,
        };
        postfix(&b, "start")?;
        instance(
            &a,
            port_a,
            &format!(
                "{}relay_domains = floor-b.test\n\
                 transport_maps = inline:{{ floor-b.test=smtp:[127.0.0.1]:{port_b} }}\n",
                shared("a", &a)
            ),
        )?;
        postfix(&a, "start")?;
        Ok(relay)
    }

    /// CPU ticks so far of both instances: every process under each master,
    /// and the children the masters have reaped.
    pub fn cpu_ticks(&self) -> u64 {
        let masters: Vec<u32> = self
            .instances
            .iter()
            .filter_map(|root| {
                std::fs::read_to_string(root.join("queue/pid/master.pid"))
                    .ok()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect();
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return 0;
        };
        let stats: HashMap<u32, (u32, u64)> = procs
            .filter_map(Result::ok)
            .filter_map(|p| {
                let pid = p.file_name().to_str()?.parse().ok()?;
                let stat = stat_of(&p.path().join("stat"))?;
                Some((pid, (stat.ppid, stat.ticks + stat.reaped_ticks)))
            })
            .collect();
        let under_a_master = |mut pid: u32| {
            for _ in 0..16 {
                if masters.contains(&pid) {
                    return true;
                }
                match stats.get(&pid) {
                    Some(&(ppid, _)) if ppid > 1 => pid = ppid,
                    _ => return false,
                }
            }
            false
        };
        stats
            .iter()
            .filter(|(pid, _)| under_a_master(**pid))
            .map(|(_, (_, ticks))| ticks)
            .sum()
    }

    /// The last lines of both instances' logs, for a stalled run.
    pub fn log_tail(&self) -> String {
        self.instances
            .iter()
            .map(|root| {
                let log = std::fs::read_to_string(root.join("maillog")).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                lines[lines.len().saturating_sub(5)..].join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        for root in &self.instances {
            let _ = postfix(root, "stop");
        }
    }
}

/// Writes one instance's `main.cf`, and a `master.cf` that is Debian's with
/// the SMTP listener on `127.0.0.1:<port>` and no chroot; creates its queue
/// and data directories.
fn instance(root: &Path, port: u16, main_cf: &str) -> Res<()> {
    let queue = root.join("queue");
    let data = root.join("data");
    for d in [&queue, &data] {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    let (uid, gid) = (id("-u", "postfix")?, id("-g", "postfix")?);
    std::os::unix::fs::chown(&data, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
    std::fs::write(root.join("main.cf"), main_cf).map_err(|e| e.to_string())?;
    std::fs::copy(MASTER_CF, root.join("master.cf")).map_err(|e| e.to_string())?;
    let listener = format!("127.0.0.1:{port}");
    postconf(root, &["-MX", "smtp/inet"])?;
    postconf(
        root,
        &[
            "-M",
            &format!("{listener}/inet = {listener} inet n - n - - smtpd"),
        ],
    )?;
    postconf(root, &["-F", "*/*/chroot = n"])
}

fn postconf(root: &Path, args: &[&str]) -> Res<()> {
    run(Command::new(POSTCONF).arg("-c").arg(root).args(args))
}

fn postfix(root: &Path, verb: &str) -> Res<()> {
    run(Command::new(POSTFIX).arg("-c").arg(root).arg(verb)).map_err(|e| {
        let log = std::fs::read_to_string(root.join("maillog")).unwrap_or_default();
        format!("{e}; its log: {log}")
    })
}

fn run(command: &mut Command) -> Res<()> {
    let out = command.output().map_err(|e| format!("{command:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A user's uid (`-u`) or primary gid (`-g`); this process's with `user`
/// empty.
fn id(flag: &str, user: &str) -> Res<u32> {
    let out = Command::new("id")
        .arg(flag)
        .args(Some(user).filter(|u| !u.is_empty()))
        .output()
        .map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| format!("no user {user}"))
}
