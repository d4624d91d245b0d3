//! The spool and the outbound queue: nothing accepted is lost.
//!
//! A job is one JSON file in `jobs/`, its message one file in `data/`, both
//! written durably (temporary file, fsync, rename, fsync of the directory)
//! before the gateway says 250. The job is the unit of retry and carries its
//! own schedule, so a restarted gateway picks up exactly where it stopped.
//! Every step a job takes is idempotent: mailbox deliveries are keyed by
//! Message-ID, and what the gateway emits is recorded in `emitted/` before
//! its job is dropped, so a replayed job neither delivers nor sends twice.
//!
//! `sent/` holds the transmissions that still wait for receipts from other
//! providers, for the 12-hour warning and the 24-hour final notice.

use std::{
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
    sync::Mutex,
};

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::write_durably;

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
    tracked_lock: Mutex<()>,
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
    /// Opens (creating) the queue under `root`.
    pub fn open(root: &Path) -> io::Result<Self> {
        for dir in ["jobs", "data", "sent", "emitted"] {
            std::fs::create_dir_all(root.join(dir))?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            tracked_lock: Mutex::new(()),
        })
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Stores `job` and its message durably: the message first, so a job
    /// file never points at nothing.
    pub fn put(&self, job: &Job, data: &[u8]) -> io::Result<()> {
        let name = safe_name(&job.id);
        write_durably(&self.dir("data"), &format!("{name}.eml"), data)?;
        self.update(job)
    }

    /// Rewrites the job record (its schedule after an attempt).
    pub fn update(&self, job: &Job) -> io::Result<()> {
        let json = serde_json::to_vec(job).map_err(invalid)?;
        write_durably(
            &self.dir("jobs"),
            &format!("{}.json", safe_name(&job.id)),
            &json,
        )?;
        Ok(())
    }

    /// The job `id`, if it is still queued.
    pub fn get(&self, id: &str) -> io::Result<Option<Job>> {
        let path = self.dir("jobs").join(format!("{}.json", safe_name(id)));
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(invalid),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The message of job `id`.
    pub fn data(&self, id: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.dir("data").join(format!("{}.eml", safe_name(id))))
    }

    /// Drops a finished job: the record first, then its message.
    pub fn done(&self, id: &str) -> io::Result<()> {
        let name = safe_name(id);
        remove_if_present(&self.dir("jobs").join(format!("{name}.json")))?;
        remove_if_present(&self.dir("data").join(format!("{name}.eml")))
    }

    /// Every job on disk. A record that does not parse is moved aside
    /// (never deleted) and reported in the error log by the caller.
    pub fn pending(&self) -> io::Result<(Vec<Job>, Vec<PathBuf>)> {
        let mut jobs = Vec::new();
        let mut broken = Vec::new();
        for entry in std::fs::read_dir(self.dir("jobs"))? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path).map(|b| serde_json::from_slice::<Job>(&b)) {
                Ok(Ok(job)) => jobs.push(job),
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
                    .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("json"))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Whether something with this Message-ID was already emitted.
    pub fn was_emitted(&self, message_id: &str) -> bool {
        self.dir("emitted").join(safe_name(message_id)).exists()
    }

    /// Records that something with this Message-ID was emitted.
    pub fn mark_emitted(&self, message_id: &str) -> io::Result<()> {
        write_durably(
            &self.dir("emitted"),
            &safe_name(message_id),
            message_id.as_bytes(),
        )?;
        Ok(())
    }

    /// Starts waiting for receipts of a transmission.
    pub fn track(&self, t: &Tracked) -> io::Result<()> {
        let _guard = self.tracked_lock.lock().unwrap_or_else(|e| e.into_inner());
        let json = serde_json::to_vec(t).map_err(invalid)?;
        write_durably(
            &self.dir("sent"),
            &format!("{}.json", safe_name(&t.identificativo)),
            &json,
        )?;
        Ok(())
    }

    /// Changes a tracked transmission; `None` if it is not tracked. The
    /// record is dropped once every recipient is settled.
    pub fn update_tracked(
        &self,
        identificativo: &str,
        change: impl FnOnce(&mut Tracked),
    ) -> io::Result<Option<Tracked>> {
        let _guard = self.tracked_lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self
            .dir("sent")
            .join(format!("{}.json", safe_name(identificativo)));
        let mut t: Tracked = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(invalid)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        change(&mut t);
        if t.unsettled().is_empty() {
            remove_if_present(&path)?;
        } else {
            let json = serde_json::to_vec(&t).map_err(invalid)?;
            write_durably(
                &self.dir("sent"),
                &format!("{}.json", safe_name(identificativo)),
                &json,
            )?;
        }
        Ok(Some(t))
    }

    /// Whether a transmission is tracked (a receipt for it is expected).
    pub fn is_tracked(&self, identificativo: &str) -> bool {
        self.dir("sent")
            .join(format!("{}.json", safe_name(identificativo)))
            .exists()
    }

    /// Every tracked transmission.
    pub fn tracked(&self) -> io::Result<Vec<Tracked>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(self.dir("sent"))? {
            let path = entry?.path();
            if let Ok(Ok(t)) = std::fs::read(&path).map(|b| serde_json::from_slice::<Tracked>(&b)) {
                out.push(t);
            }
        }
        Ok(out)
    }
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
        std::fs::write(dir.path().join("jobs/x.json"), b"{torn").expect("write");
        let (jobs, broken) = q.pending().expect("pending");
        assert!(jobs.is_empty());
        assert_eq!(broken.len(), 1);
        assert!(broken[0].exists());
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
