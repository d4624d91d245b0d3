//! The spool and the outbound queue: nothing accepted is lost.
//!
//! A job is one file in `jobs/`: its record (one line of JSON) and then its
//! message, written durably (temporary file, fsync, rename, fsync of the
//! directory) before the gateway says 250. One file, not a record and a
//! message apart, halves the files a message creates and deletes, which is
//! what the file system spends most of its time on. The job is the unit of
//! retry and carries its own schedule, so a restarted gateway picks up
//! exactly where it stopped. A queue written in the earlier two-file layout
//! (`jobs/<name>.json` and `data/<name>.eml`) is converted when opened.
//! Every step a job takes is idempotent: mailbox deliveries are keyed by
//! Message-ID, and what the gateway emits is recorded before its job is
//! dropped, so a replayed job neither delivers nor sends twice. Those
//! records are lines of `emitted.log` (hashed ids, appended and fsync'd),
//! held in memory too; the file is started afresh as `emitted.old.log` after
//! [`EMITTED_PER_GENERATION`] lines, and both generations are remembered, so
//! a replay is recognised for at least that many emissions while memory
//! stays bounded. An `emitted/` directory of one file per record (the
//! earlier layout) is folded into the log when the queue opens.
//!
//! The transmissions that still wait for receipts from other providers,
//! for the 12-hour warning and the 24-hour final notice, are lines of
//! `sent.log` held in memory too ([`sent_log`]).

use std::{
    collections::{BTreeSet, HashSet},
    fs::{File, OpenOptions},
    io::{self, BufRead},
    path::{Path, PathBuf},
    sync::Mutex,
};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::write_durably;

mod log_file;
mod sent_log;

use sent_log::SentLog;

/// What a job does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Work {
    /// A message the access point accepted: acceptance receipt, then
    /// transport envelopes.
    #[serde(rename_all = "camelCase")]
    Submitted {
        /// The transmission identifier.
        identificativo: String,
        /// The sender.
        sender: String,
        /// Every forward path.
        recipients: Vec<String>,
        /// To addresses.
        to: Vec<String>,
        /// Cc addresses.
        cc: Vec<String>,
        /// The subject.
        subject: String,
        /// The original Message-ID.
        message_id: String,
        /// The delivery receipt kind asked for.
        tipo_ricevuta: String,
    },
    /// A message the incoming point took: to classify and deliver.
    #[serde(rename_all = "camelCase")]
    Received {
        /// Who sent it (an address and port, or `local`).
        peer: String,
        /// `MAIL FROM`.
        reverse_path: String,
        /// The forward paths in this domain.
        recipients: Vec<String>,
    },
    /// A message to hand to another provider.
    #[serde(rename_all = "camelCase")]
    Send {
        /// The envelope sender.
        from: String,
        /// The envelope recipients, all in `domain`.
        to: Vec<String>,
        /// Their domain.
        domain: String,
        /// The transmission a transport envelope belongs to, so a permanent
        /// failure becomes a non-delivery notice for its sender.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        envelope_of: Option<String>,
    },
}

/// A job and its schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    /// Unique and deterministic: the same work gets the same id.
    pub id: String,
    /// What to do.
    pub work: Work,
    /// When it was queued.
    pub created: DateTime<Utc>,
    /// Attempts so far.
    pub attempts: u32,
    /// Not before this.
    pub next_attempt: DateTime<Utc>,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl Job {
    /// A job due now.
    pub fn new(id: impl Into<String>, work: Work, now: DateTime<Utc>) -> Self {
        Self {
            id: id.into(),
            work,
            created: now,
            attempts: 0,
            next_attempt: now,
            last_error: None,
        }
    }

    /// Schedules the next attempt after a temporary failure: 1, 2, 4, ...
    /// minutes, at most 30 minutes apart.
    pub fn retry_later(&mut self, error: String, now: DateTime<Utc>) {
        self.attempts += 1;
        let minutes = 1i64 << self.attempts.saturating_sub(1).min(5);
        self.next_attempt = now + Duration::minutes(minutes.min(30));
        self.last_error = Some(error);
    }
}

/// A transmission waiting for receipts from other providers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Tracked {
    /// The transmission identifier.
    pub identificativo: String,
    /// The sender (a mailbox of this domain).
    pub sender: String,
    /// The original Message-ID.
    pub message_id: String,
    /// The subject.
    pub subject: String,
    /// Recipients on other providers.
    pub recipients: Vec<String>,
    /// Every recipient (for the certification data of notices).
    pub all_recipients: Vec<String>,
    /// When the envelopes were queued.
    pub sent_at: DateTime<Utc>,
    /// Domains that took the message in charge.
    #[serde(default)]
    pub taken: BTreeSet<String>,
    /// Recipients with a delivery receipt or a non-delivery notice.
    #[serde(default)]
    pub settled: BTreeSet<String>,
    /// Whether the 12-hour warning went out.
    #[serde(default)]
    pub warned: bool,
    /// The SHA-256 (hex) of the original as it was scanned at submission:
    /// a complete delivery receipt that carries it back byte for byte need
    /// not have clamd read it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_sha256: Option<String>,
}

/// What the clock asks of a tracked transmission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deadline {
    /// Nothing yet.
    Wait,
    /// Warn the sender about these recipients (preavviso).
    Warn(Vec<String>),
    /// Give up on these recipients (final notice).
    GiveUp(Vec<String>),
}

impl Tracked {
    /// Recipients still without a delivery receipt.
    pub fn unsettled(&self) -> Vec<String> {
        self.recipients
            .iter()
            .filter(|r| !self.settled.contains(*r))
            .cloned()
            .collect()
    }

    /// What is due at `now`: a warning after `warn` without a taking-charge
    /// or delivery receipt, the final notice after `give_up`.
    pub fn deadline(&self, now: DateTime<Utc>, warn: Duration, give_up: Duration) -> Deadline {
        let open = self.unsettled();
        if open.is_empty() {
            return Deadline::Wait;
        }
        if now >= self.sent_at + give_up {
            return Deadline::GiveUp(open);
        }
        if !self.warned && now >= self.sent_at + warn {
            let silent: Vec<String> = open
                .into_iter()
                .filter(|r| !self.taken.contains(&crate::pec::checks::domain_of(r)))
                .collect();
            if !silent.is_empty() {
                return Deadline::Warn(silent);
            }
        }
        Deadline::Wait
    }
}

/// The on-disk queue.
pub struct Queue {
    root: PathBuf,
    sent: Mutex<SentLog>,
    emitted: Mutex<EmittedLog>,
}

/// Emission records per generation of `emitted.log`.
pub const EMITTED_PER_GENERATION: usize = 500_000;

/// A hashed id, as `emitted.log` holds it.
type Key = [u8; 16];

/// The emission records: the log file being appended to, and what both
/// generations hold.
struct EmittedLog {
    file: File,
    /// The length of the file's whole lines.
    len: u64,
    /// Records a generation holds before the next one starts.
    per_generation: usize,
    current: HashSet<Key>,
    old: HashSet<Key>,
}

impl EmittedLog {
    const FILE: &str = "emitted.log";
    const OLD_FILE: &str = "emitted.old.log";

    /// Opens the log under `root`, dropping a torn last line.
    fn open(root: &Path, per_generation: usize) -> io::Result<Self> {
        let (file, whole) = log_file::open(&root.join(Self::FILE), root)?;
        let old = match std::fs::read(root.join(Self::OLD_FILE)) {
            Ok(old) => keys(&old),
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            file,
            len: whole.len() as u64,
            per_generation,
            current: keys(&whole),
            old,
        })
    }

    fn contains(&self, key: &Key) -> bool {
        self.current.contains(key) || self.old.contains(key)
    }

    /// Appends `keys` not yet recorded and syncs; starts a new generation
    /// first when the current one is full.
    fn record(&mut self, root: &Path, keys: &[Key]) -> io::Result<()> {
        let mut new: Vec<&Key> = keys.iter().filter(|k| !self.contains(k)).collect();
        new.sort_unstable();
        new.dedup();
        if new.is_empty() {
            return Ok(());
        }
        if self.current.len() >= self.per_generation {
            self.rotate(root)?;
        }
        let mut lines = Vec::with_capacity(new.len() * 33);
        for key in &new {
            lines.extend(key.iter().flat_map(|b| hex_digits(*b)));
            lines.push(b'\n');
        }
        log_file::append(&mut self.file, &mut self.len, &lines)?;
        self.current.extend(new.into_iter().copied());
        Ok(())
    }

    fn rotate(&mut self, root: &Path) -> io::Result<()> {
        std::fs::rename(root.join(Self::FILE), root.join(Self::OLD_FILE))?;
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(root.join(Self::FILE))?;
        File::open(root)?.sync_all()?;
        self.file = file;
        self.len = 0;
        self.old = std::mem::take(&mut self.current);
        Ok(())
    }
}

fn key_of(id: &str) -> Key {
    let h = Sha256::digest(id.as_bytes());
    let mut key = [0; 16];
    key.copy_from_slice(&h[..16]);
    key
}

fn hex_digits(b: u8) -> [u8; 2] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]
}

/// The keys of the whole lines of an emission log (or of file names of the
/// earlier layout); anything else is skipped.
fn keys(text: &[u8]) -> HashSet<Key> {
    text.split(|&b| b == b'\n').filter_map(parse_key).collect()
}

fn parse_key(hex: &[u8]) -> Option<Key> {
    if hex.len() != 32 {
        return None;
    }
    let mut key = [0; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        key[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(key)
}

fn safe_name(id: &str) -> String {
    // Ids come from identifiers other providers chose: hash them into names.
    let h = Sha256::digest(id.as_bytes());
    h[..16].iter().map(|b| format!("{b:02x}")).collect()
}

fn invalid(e: serde_json::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Queue {
    /// Opens (creating) the queue under `root`, converting jobs of the
    /// earlier two-file layout.
    pub fn open(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root.join("jobs"))?;
        let queue = Self {
            root: root.to_path_buf(),
            sent: Mutex::new(SentLog::open(root)?),
            emitted: Mutex::new(EmittedLog::open(root, EMITTED_PER_GENERATION)?),
        };
        queue.convert_two_file_jobs()?;
        queue.convert_emitted_directory()?;
        Ok(queue)
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn job_path(&self, id: &str) -> PathBuf {
        self.dir("jobs")
            .join(format!("{}.{JOB_EXTENSION}", safe_name(id)))
    }

    /// Stores `job` and its message durably, in one file.
    pub fn put(&self, job: &Job, data: &[u8]) -> io::Result<()> {
        let mut bytes = serde_json::to_vec(job).map_err(invalid)?;
        // JSON escapes every newline inside strings: the first one ends the record.
        bytes.push(b'\n');
        bytes.extend_from_slice(data);
        write_durably(
            &self.dir("jobs"),
            &format!("{}.{JOB_EXTENSION}", safe_name(&job.id)),
            &bytes,
        )?;
        Ok(())
    }

    /// Rewrites the job record (its schedule after an attempt), keeping its
    /// message.
    pub fn update(&self, job: &Job) -> io::Result<()> {
        let data = self.data(&job.id)?;
        self.put(job, &data)
    }

    /// The job `id`, if it is still queued.
    pub fn get(&self, id: &str) -> io::Result<Option<Job>> {
        match read_record(&self.job_path(id)) {
            Ok(record) => parse_job(&record).map(|(job, _)| Some(job)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The size of job `id`'s file (its record and message), in bytes.
    pub fn size(&self, id: &str) -> io::Result<u64> {
        std::fs::metadata(self.job_path(id)).map(|m| m.len())
    }

    /// The message of job `id`.
    pub fn data(&self, id: &str) -> io::Result<Vec<u8>> {
        let mut bytes = std::fs::read(self.job_path(id))?;
        let start = record_end(&bytes)?;
        Ok(bytes.split_off(start + 1))
    }

    /// Drops a finished job.
    pub fn done(&self, id: &str) -> io::Result<()> {
        remove_if_present(&self.job_path(id))
    }

    /// Rewrites each `jobs/<name>.json` with its `data/<name>.eml` as one
    /// job file, then removes the pair (the record last: a crash midway
    /// leaves a pair to convert again, never a job without its message).
    fn convert_two_file_jobs(&self) -> io::Result<()> {
        let data_dir = self.dir("data");
        if !data_dir.is_dir() {
            return Ok(());
        }
        for entry in std::fs::read_dir(self.dir("jobs"))? {
            let record = entry?.path();
            if record.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Some(stem) = record.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let message = data_dir.join(format!("{stem}.eml"));
            let converted = std::fs::read(&record)
                .and_then(|b| serde_json::from_slice::<Job>(&b).map_err(invalid))
                .and_then(|job| Ok((job, std::fs::read(&message)?)));
            match converted {
                Ok((job, data)) => {
                    self.put(&job, &data)?;
                    remove_if_present(&message)?;
                    remove_if_present(&record)?;
                }
                // Left for pending() to set aside and report.
                Err(_) => continue,
            }
        }
        Ok(())
    }

    /// Every job on disk. A file that does not parse is moved aside
    /// (never deleted) and reported in the error log by the caller.
    pub fn pending(&self) -> io::Result<(Vec<Job>, Vec<PathBuf>)> {
        let mut jobs = Vec::new();
        let mut broken = Vec::new();
        for entry in std::fs::read_dir(self.dir("jobs"))? {
            let path = entry?.path();
            let extension = path.extension().and_then(|e| e.to_str());
            if extension != Some(JOB_EXTENSION) && extension != Some("json") {
                continue;
            }
            match read_record(&path).map(|b| parse_job(&b)) {
                Ok(Ok((job, _))) if extension == Some(JOB_EXTENSION) => jobs.push(job),
                _ => {
                    let aside = path.with_extension("broken");
                    std::fs::rename(&path, &aside)?;
                    broken.push(aside);
                }
            }
        }
        jobs.sort_by(|a, b| a.created.cmp(&b.created).then_with(|| a.id.cmp(&b.id)));
        Ok((jobs, broken))
    }

    /// How many jobs wait.
    pub fn depth(&self) -> usize {
        std::fs::read_dir(self.dir("jobs"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| {
                        e.path().extension().and_then(|x| x.to_str()) == Some(JOB_EXTENSION)
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    /// Whether something with this Message-ID was already emitted.
    pub fn was_emitted(&self, message_id: &str) -> bool {
        self.emitted_log().contains(&key_of(message_id))
    }

    /// Records, durably, that something with this Message-ID was emitted.
    pub fn mark_emitted(&self, message_id: &str) -> io::Result<()> {
        self.emitted_log().record(&self.root, &[key_of(message_id)])
    }

    fn emitted_log(&self) -> std::sync::MutexGuard<'_, EmittedLog> {
        self.emitted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Moves the records of an `emitted/` directory (one file per record,
    /// named by the hashed id) into the log, then removes the directory.
    fn convert_emitted_directory(&self) -> io::Result<()> {
        let dir = self.dir("emitted");
        if !dir.is_dir() {
            return Ok(());
        }
        let names: Vec<Key> = std::fs::read_dir(&dir)?
            .filter_map(Result::ok)
            .filter_map(|e| parse_key(e.file_name().as_encoded_bytes()))
            .collect();
        self.emitted_log().record(&self.root, &names)?;
        std::fs::remove_dir_all(&dir)
    }

    /// Starts waiting for receipts of a transmission.
    pub fn track(&self, t: &Tracked) -> io::Result<()> {
        self.sent_log().put(t)
    }

    /// Changes a tracked transmission; `None` if it is not tracked. The
    /// record is dropped once every recipient is settled.
    pub fn update_tracked(
        &self,
        identificativo: &str,
        change: impl FnOnce(&mut Tracked),
    ) -> io::Result<Option<Tracked>> {
        self.sent_log().update(identificativo, change)
    }

    /// Whether a transmission is tracked (a receipt for it is expected).
    pub fn is_tracked(&self, identificativo: &str) -> bool {
        self.sent_log().contains(identificativo)
    }

    /// The digest of a tracked transmission's original as it was scanned
    /// at submission ([`Tracked::original_sha256`]).
    pub fn scanned_original(&self, identificativo: &str) -> Option<String> {
        self.sent_log()
            .get(identificativo)
            .and_then(|t| t.original_sha256.clone())
    }

    /// Every tracked transmission, oldest first.
    pub fn tracked(&self) -> io::Result<Vec<Tracked>> {
        Ok(self.sent_log().all())
    }

    fn sent_log(&self) -> std::sync::MutexGuard<'_, SentLog> {
        self.sent.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The extension of a job file.
const JOB_EXTENSION: &str = "job";

/// Where the record of a job file ends (its first newline).
fn record_end(bytes: &[u8]) -> io::Result<usize> {
    bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a job file without its message"))
}

/// The first line of a job file, its record, without reading the message
/// after it: the 2-second sweep reads every job's record.
fn read_record(path: &Path) -> io::Result<Vec<u8>> {
    let mut record = Vec::new();
    io::BufReader::new(File::open(path)?).read_until(b'\n', &mut record)?;
    Ok(record)
}

/// The record of a job file, and where its message starts.
fn parse_job(bytes: &[u8]) -> io::Result<(Job, usize)> {
    let end = record_end(bytes)?;
    let job = serde_json::from_slice(&bytes[..end]).map_err(invalid)?;
    Ok((job, end + 1))
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0)
            .single()
            .expect("valid")
    }

    fn send_job(id: &str) -> Job {
        Job::new(
            id,
            Work::Send {
                from: "a@pec.a.it".into(),
                to: vec!["b@pec.b.it".into()],
                domain: "pec.b.it".into(),
                envelope_of: Some("opec.1@pec.a.it".into()),
            },
            t0(),
        )
    }

    #[test]
    fn a_job_survives_reopening_with_its_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(dir.path()).expect("open");
        q.put(&send_job("j1"), b"message").expect("put");
        let q = Queue::open(dir.path()).expect("reopen");
        let (jobs, broken) = q.pending().expect("pending");
        assert_eq!(jobs, vec![send_job("j1")]);
        assert_eq!(q.get("j1").expect("get"), Some(send_job("j1")));
        assert_eq!(q.get("j2").expect("get"), None);
        assert!(broken.is_empty());
        assert_eq!(q.data("j1").expect("data"), b"message");
        assert_eq!(q.depth(), 1);
        q.done("j1").expect("done");
        q.done("j1").expect("done twice is fine");
        assert_eq!(q.depth(), 0);
    }

    #[test]
    fn the_same_work_twice_is_one_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(dir.path()).expect("open");
        q.put(&send_job("j1"), b"m").expect("put");
        q.put(&send_job("j1"), b"m").expect("put again");
        assert_eq!(q.pending().expect("pending").0.len(), 1);
    }

    #[test]
    fn a_broken_record_is_set_aside_not_lost() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(dir.path()).expect("open");
        std::fs::write(dir.path().join("jobs/x.job"), b"{torn").expect("write");
        std::fs::write(dir.path().join("jobs/y.job"), b"{\"kind\":1}\nmessage").expect("write");
        let (jobs, broken) = q.pending().expect("pending");
        assert!(jobs.is_empty());
        assert_eq!(broken.len(), 2);
        assert!(broken.iter().all(|b| b.exists()));
    }

    #[test]
    fn a_retry_keeps_the_message() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(dir.path()).expect("open");
        let mut job = send_job("j1");
        let message = b"line one\r\nline two\r\n";
        q.put(&job, message).expect("put");
        job.retry_later("421 busy".into(), t0());
        q.update(&job).expect("update");
        assert_eq!(q.get("j1").expect("get"), Some(job));
        assert_eq!(q.data("j1").expect("data"), message);
    }

    #[test]
    fn a_queue_in_the_two_file_layout_is_converted_when_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        for d in ["jobs", "data"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("dir");
        }
        let name = safe_name("j1");
        let record = serde_json::to_vec(&send_job("j1")).expect("json");
        std::fs::write(dir.path().join(format!("jobs/{name}.json")), record).expect("record");
        std::fs::write(dir.path().join(format!("data/{name}.eml")), b"old message").expect("data");
        // A record whose message is missing is not converted, and not lost.
        std::fs::write(dir.path().join("jobs/orphan.json"), b"{}").expect("orphan");

        let q = Queue::open(dir.path()).expect("open");
        let (jobs, broken) = q.pending().expect("pending");
        assert_eq!(jobs, vec![send_job("j1")]);
        assert_eq!(q.data("j1").expect("data"), b"old message");
        assert!(!dir.path().join(format!("jobs/{name}.json")).exists());
        assert!(!dir.path().join(format!("data/{name}.eml")).exists());
        assert_eq!(broken, vec![dir.path().join("jobs/orphan.broken")]);
    }

    #[test]
    fn retries_back_off_and_cap_at_thirty_minutes() {
        let mut job = send_job("j");
        let mut gaps = Vec::new();
        for _ in 0..8 {
            job.retry_later("421 busy".into(), t0());
            gaps.push((job.next_attempt - t0()).num_minutes());
        }
        assert_eq!(gaps, vec![1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(job.attempts, 8);
    }

    fn tracked() -> Tracked {
        Tracked {
            identificativo: "opec.1@pec.a.it".into(),
            sender: "a@pec.a.it".into(),
            message_id: "m@c".into(),
            subject: "s".into(),
            recipients: vec!["b@pec.b.it".into(), "c@pec.c.it".into()],
            all_recipients: vec!["b@pec.b.it".into(), "c@pec.c.it".into()],
            sent_at: t0(),
            taken: BTreeSet::new(),
            settled: BTreeSet::new(),
            warned: false,
            original_sha256: None,
        }
    }

    #[test]
    fn silence_warns_at_twelve_hours_and_gives_up_at_twenty_four() {
        let (warn, give_up) = (Duration::hours(12), Duration::hours(24));
        let mut t = tracked();
        t.taken.insert("pec.c.it".into());
        assert_eq!(
            t.deadline(t0() + Duration::hours(11), warn, give_up),
            Deadline::Wait
        );
        assert_eq!(
            t.deadline(t0() + Duration::hours(12), warn, give_up),
            Deadline::Warn(vec!["b@pec.b.it".into()])
        );
        t.warned = true;
        assert_eq!(
            t.deadline(t0() + Duration::hours(13), warn, give_up),
            Deadline::Wait
        );
        t.settled.insert("c@pec.c.it".into());
        assert_eq!(
            t.deadline(t0() + Duration::hours(24), warn, give_up),
            Deadline::GiveUp(vec!["b@pec.b.it".into()])
        );
        t.settled.insert("b@pec.b.it".into());
        assert_eq!(
            t.deadline(t0() + Duration::hours(30), warn, give_up),
            Deadline::Wait
        );
    }

    #[test]
    fn a_settled_transmission_stops_being_tracked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(dir.path()).expect("open");
        q.track(&tracked()).expect("track");
        assert!(q.is_tracked("opec.1@pec.a.it"));
        q.update_tracked("opec.1@pec.a.it", |t| {
            t.settled.insert("b@pec.b.it".into());
        })
        .expect("update");
        assert!(q.is_tracked("opec.1@pec.a.it"));
        q.update_tracked("opec.1@pec.a.it", |t| {
            t.settled.insert("c@pec.c.it".into());
        })
        .expect("update");
        assert!(!q.is_tracked("opec.1@pec.a.it"));
        assert_eq!(
            q.update_tracked("opec.1@pec.a.it", |_| {}).expect("update"),
            None
        );
    }

    #[test]
    fn a_torn_emission_record_is_dropped_and_the_log_stays_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(dir.path()).expect("open");
        q.mark_emitted("r1@pec.a.it").expect("mark");
        drop(q);
        let log = dir.path().join("emitted.log");
        let mut torn = std::fs::read(&log).expect("log");
        torn.extend_from_slice(b"0123abc");
        std::fs::write(&log, &torn).expect("tear");
        let q = Queue::open(dir.path()).expect("reopen");
        q.mark_emitted("r2@pec.a.it").expect("mark after the tear");
        let q = Queue::open(dir.path()).expect("reopen again");
        assert!(q.was_emitted("r1@pec.a.it") && q.was_emitted("r2@pec.a.it"));
        assert_eq!(std::fs::read(&log).expect("log").len(), 2 * 33);
    }

    #[test]
    fn emission_records_of_the_directory_layout_are_folded_into_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("emitted")).expect("dir");
        std::fs::write(
            dir.path().join("emitted").join(safe_name("r1@pec.a.it")),
            b"r1@pec.a.it",
        )
        .expect("record");
        let q = Queue::open(dir.path()).expect("open");
        assert!(q.was_emitted("r1@pec.a.it"));
        assert!(!dir.path().join("emitted").exists());
        assert!(
            Queue::open(dir.path())
                .expect("reopen")
                .was_emitted("r1@pec.a.it")
        );
    }

    #[test]
    fn a_full_generation_starts_a_new_one_and_both_are_remembered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = EmittedLog::open(dir.path(), 3).expect("open");
        let ids: Vec<Key> = (0..7).map(|i| key_of(&i.to_string())).collect();
        log.record(dir.path(), &ids[..3]).expect("fill");
        log.record(dir.path(), &ids[3..4]).expect("one more");
        assert!(dir.path().join(EmittedLog::OLD_FILE).exists());
        let mut log = EmittedLog::open(dir.path(), 3).expect("reopen");
        assert_eq!((log.old.len(), log.current.len()), (3, 1));
        assert!(ids[..4].iter().all(|k| log.contains(k)));
        // The generation before the old one is forgotten: memory stays bounded.
        log.record(dir.path(), &ids[4..6]).expect("fill the second");
        log.record(dir.path(), &ids[6..7])
            .expect("a third generation");
        assert!(!log.contains(&ids[0]));
        assert!(ids[3..7].iter().all(|k| log.contains(k)));
    }

    #[test]
    fn emitted_marks_are_remembered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = Queue::open(dir.path()).expect("open");
        assert!(!q.was_emitted("r1@pec.a.it"));
        q.mark_emitted("r1@pec.a.it").expect("mark");
        assert!(
            Queue::open(dir.path())
                .expect("reopen")
                .was_emitted("r1@pec.a.it")
        );
    }
}
