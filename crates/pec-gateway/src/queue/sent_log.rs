//! The transmissions waiting for receipts from other providers, as one
//! append-only file, `sent.log`, and a map in memory.
//!
//! Every change is one line of JSON appended and synced before it counts:
//! `{"put": <the whole record>}` when a transmission starts waiting or
//! changes, `{"drop": "<identificativo>"}` once every recipient is settled.
//! Opening replays the lines in order. A file per transmission, rewritten
//! on each receipt and deleted at the end, made the file system allocate and
//! free an inode for every step; a log appends instead, and the 2-second
//! deadline sweep reads memory rather than every file. The log is rewritten
//! with only the records still waiting once it holds at least
//! [`COMPACT_AT_LEAST`] lines and twice as many as there are records, so
//! its size stays proportional to what waits. A `sent/` directory of one
//! JSON file per transmission (the earlier layout) is folded in when the
//! log opens.

use std::{
    collections::HashMap,
    fs::File,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{Tracked, invalid};
use crate::{queue::log_file, store::write_durably};

/// The fewest lines at which the log is compacted.
pub const COMPACT_AT_LEAST: usize = 4096;

/// One line of the log.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
enum Entry {
    /// A transmission starts waiting, or changed (boxed: far larger than
    /// a `Drop`; the line is the same).
    Put(Box<Tracked>),
    /// A transmission stopped waiting.
    Drop(String),
}

/// The waiting transmissions and the file that makes them durable.
pub struct SentLog {
    root: PathBuf,
    file: File,
    /// The length of the file's whole lines.
    len: u64,
    /// Lines in the file.
    lines: usize,
    /// The fewest lines at which the log is compacted.
    compact_at_least: usize,
    waiting: HashMap<String, Tracked>,
}

impl SentLog {
    const FILE: &str = "sent.log";
    const DIRECTORY: &str = "sent";
    const BROKEN_FILE: &str = "sent.broken.log";

    /// Opens the log under `root`: replays it (a torn last line, from a
    /// crash in the middle of an append, was never acknowledged and is
    /// dropped), then folds in a `sent/` directory of the earlier layout.
    pub fn open(root: &Path) -> io::Result<Self> {
        Self::open_compacting_at(root, COMPACT_AT_LEAST)
    }

    fn open_compacting_at(root: &Path, compact_at_least: usize) -> io::Result<Self> {
        let (file, whole) = log_file::open(&root.join(Self::FILE), root)?;
        let mut log = Self {
            root: root.to_path_buf(),
            file,
            len: whole.len() as u64,
            lines: 0,
            compact_at_least,
            waiting: HashMap::new(),
        };
        let mut unreadable = Vec::new();
        for line in whole.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            log.lines += 1;
            match serde_json::from_slice(line) {
                Ok(entry) => log.apply(entry),
                // A whole line that does not parse was not written by this
                // gateway: kept aside, since compacting would drop it.
                Err(_) => {
                    unreadable.extend_from_slice(line);
                    unreadable.push(b'\n');
                }
            }
        }
        log.fold_directory()?;
        if !unreadable.is_empty() {
            let path = root.join(Self::BROKEN_FILE);
            tracing::warn!(path = %path.display(), "unreadable lines of sent.log set aside");
            let (mut broken, whole) = log_file::open(&path, root)?;
            log_file::append(&mut broken, &mut (whole.len() as u64), &unreadable)?;
            // Out of the log, so the next start does not set them aside again.
            log.compact()?;
        }
        Ok(log)
    }

    /// Whether `identificativo` waits for receipts.
    pub fn contains(&self, identificativo: &str) -> bool {
        self.waiting.contains_key(identificativo)
    }

    /// The record of `identificativo`, if it waits for receipts.
    pub fn get(&self, identificativo: &str) -> Option<&Tracked> {
        self.waiting.get(identificativo)
    }

    /// Every waiting transmission, oldest first.
    pub fn all(&self) -> Vec<Tracked> {
        let mut all: Vec<Tracked> = self.waiting.values().cloned().collect();
        all.sort_by(|a, b| (a.sent_at, &a.identificativo).cmp(&(b.sent_at, &b.identificativo)));
        all
    }

    /// Starts (or replaces) the record of `t`, durably.
    pub fn put(&mut self, t: &Tracked) -> io::Result<()> {
        self.append(&[Entry::Put(Box::new(t.clone()))])?;
        self.waiting.insert(t.identificativo.clone(), t.clone());
        self.compact_if_due()
    }

    /// Changes the record of `identificativo`, durably; `None` if it is not
    /// waiting. The record is dropped once every recipient is settled.
    pub fn update(
        &mut self,
        identificativo: &str,
        change: impl FnOnce(&mut Tracked),
    ) -> io::Result<Option<Tracked>> {
        let Some(mut t) = self.waiting.get(identificativo).cloned() else {
            return Ok(None);
        };
        change(&mut t);
        if t.unsettled().is_empty() {
            self.append(&[Entry::Drop(identificativo.to_owned())])?;
            self.waiting.remove(identificativo);
        } else {
            self.append(&[Entry::Put(Box::new(t.clone()))])?;
            self.waiting.insert(identificativo.to_owned(), t.clone());
        }
        self.compact_if_due()?;
        Ok(Some(t))
    }

    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Put(t) => {
                self.waiting.insert(t.identificativo.clone(), *t);
            }
            Entry::Drop(id) => {
                self.waiting.remove(&id);
            }
        }
    }

    fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        let mut lines = Vec::new();
        for entry in entries {
            serde_json::to_writer(&mut lines, entry).map_err(invalid)?;
            lines.push(b'\n');
        }
        log_file::append(&mut self.file, &mut self.len, &lines)?;
        self.lines += entries.len();
        Ok(())
    }

    fn compact_if_due(&mut self) -> io::Result<()> {
        if self.lines < self.compact_at_least.max(2 * self.waiting.len()) {
            return Ok(());
        }
        self.compact()
    }

    /// Rewrites the log with only the waiting records, atomically: a crash
    /// leaves either the old log or the new one.
    fn compact(&mut self) -> io::Result<()> {
        let mut bytes = Vec::new();
        for t in self.all() {
            serde_json::to_writer(&mut bytes, &Entry::Put(Box::new(t))).map_err(invalid)?;
            bytes.push(b'\n');
        }
        write_durably(&self.root, Self::FILE, &bytes)?;
        let (file, whole) = log_file::open(&self.root.join(Self::FILE), &self.root)?;
        self.file = file;
        self.len = whole.len() as u64;
        self.lines = self.waiting.len();
        Ok(())
    }

    /// Moves the records of a `sent/` directory (the earlier layout) into
    /// the log, then removes the directory. A record the log already holds
    /// is the newer one and stays.
    fn fold_directory(&mut self) -> io::Result<()> {
        let dir = self.root.join(Self::DIRECTORY);
        if !dir.is_dir() {
            return Ok(());
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // A dot file is the temporary file of a write that never
            // finished: that record was never acknowledged.
            if name.starts_with('.') {
                continue;
            }
            match std::fs::read(entry.path()).map(|b| serde_json::from_slice::<Tracked>(&b)) {
                Ok(Ok(t)) if !self.contains(&t.identificativo) => found.push(t),
                Ok(Ok(_)) => {}
                _ => {
                    let aside = self.root.join(format!("sent.{name}.broken"));
                    tracing::warn!(path = %aside.display(), "an unreadable record of sent/ set aside");
                    std::fs::rename(entry.path(), aside)?;
                }
            }
        }
        let entries: Vec<Entry> = found
            .iter()
            .cloned()
            .map(|t| Entry::Put(Box::new(t)))
            .collect();
        if !entries.is_empty() {
            self.append(&entries)?;
        }
        for t in found {
            self.waiting.insert(t.identificativo.clone(), t);
        }
        std::fs::remove_dir_all(&dir)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use chrono::{TimeZone, Utc};

    use super::*;

    fn tracked(n: u32) -> Tracked {
        Tracked {
            identificativo: format!("opec.{n}@pec.a.it"),
            sender: "a@pec.a.it".into(),
            message_id: format!("m{n}@c"),
            subject: "s".into(),
            recipients: vec!["b@pec.b.it".into(), "c@pec.c.it".into()],
            all_recipients: vec!["b@pec.b.it".into(), "c@pec.c.it".into()],
            sent_at: Utc
                .with_ymd_and_hms(2026, 11, 23, 10, 0, n)
                .single()
                .expect("valid"),
            taken: BTreeSet::new(),
            settled: BTreeSet::new(),
            warned: false,
            original_sha256: None,
        }
    }

    fn settle(t: &mut Tracked, rcpt: &str) {
        t.settled.insert(rcpt.into());
    }

    fn lines_of(root: &Path, name: &str) -> usize {
        let bytes = std::fs::read(root.join(name)).expect("log");
        bytes.iter().filter(|&&b| b == b'\n').count()
    }

    #[test]
    fn changes_survive_reopening_and_a_settled_transmission_is_dropped() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = SentLog::open(root.path()).expect("open");
        log.put(&tracked(1)).expect("put");
        log.put(&tracked(2)).expect("put");
        let changed = log
            .update("opec.1@pec.a.it", |t| {
                t.taken.insert("pec.b.it".into());
                settle(t, "b@pec.b.it");
            })
            .expect("update")
            .expect("tracked");
        log.update("opec.2@pec.a.it", |t| {
            settle(t, "b@pec.b.it");
            settle(t, "c@pec.c.it");
        })
        .expect("settle");
        assert!(!log.contains("opec.2@pec.a.it"));
        drop(log);

        let log = SentLog::open(root.path()).expect("reopen");
        assert_eq!(log.all(), vec![changed]);
        assert_eq!(lines_of(root.path(), SentLog::FILE), 4);
        assert!(
            !root.path().join(SentLog::DIRECTORY).exists(),
            "no file per transmission"
        );
    }

    #[test]
    fn an_update_of_an_unknown_transmission_is_none_and_writes_nothing() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = SentLog::open(root.path()).expect("open");
        assert_eq!(log.update("opec.9@x", |_| {}).expect("update"), None);
        assert_eq!(lines_of(root.path(), SentLog::FILE), 0);
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_the_next_append_stays_whole() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = SentLog::open(root.path()).expect("open");
        log.put(&tracked(1)).expect("put");
        drop(log);
        let path = root.path().join(SentLog::FILE);
        let mut torn = std::fs::read(&path).expect("log");
        torn.extend_from_slice(b"{\"put\":{\"identif");
        std::fs::write(&path, torn).expect("tear");

        let mut log = SentLog::open(root.path()).expect("reopen");
        log.put(&tracked(2)).expect("put after the tear");
        let log = SentLog::open(root.path()).expect("reopen again");
        assert_eq!(log.all(), vec![tracked(1), tracked(2)]);
        assert!(!root.path().join(SentLog::BROKEN_FILE).exists());
    }

    #[test]
    fn the_log_is_compacted_to_what_still_waits() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = SentLog::open_compacting_at(root.path(), 8).expect("open");
        log.put(&tracked(1)).expect("put");
        for n in 2..40 {
            log.put(&tracked(n)).expect("put");
            log.update(&tracked(n).identificativo, |t| {
                settle(t, "b@pec.b.it");
                settle(t, "c@pec.c.it");
            })
            .expect("settle");
            assert!(log.lines < 8, "{} lines after {n}", log.lines);
        }
        assert_eq!(lines_of(root.path(), SentLog::FILE), log.lines);
        let log = SentLog::open(root.path()).expect("reopen");
        assert_eq!(log.all(), vec![tracked(1)]);
    }

    #[test]
    fn the_log_holds_at_least_every_waiting_record_before_compacting() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = SentLog::open_compacting_at(root.path(), 4).expect("open");
        for n in 0..10 {
            log.put(&tracked(n)).expect("put");
        }
        assert_eq!(log.all().len(), 10);
        assert_eq!(lines_of(root.path(), SentLog::FILE), 10, "not compacted");
        let log = SentLog::open(root.path()).expect("reopen");
        assert_eq!(log.all().len(), 10);
    }

    #[test]
    fn records_of_the_directory_layout_are_folded_in() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join(SentLog::DIRECTORY);
        std::fs::create_dir_all(&dir).expect("dir");
        let json = serde_json::to_vec(&tracked(1)).expect("json");
        std::fs::write(dir.join("aa.json"), &json).expect("record");
        std::fs::write(dir.join(".bb.json.tmp"), b"{\"ident").expect("temp");
        std::fs::write(dir.join("cc.json"), b"not json").expect("broken");

        let log = SentLog::open(root.path()).expect("open");
        assert_eq!(log.all(), vec![tracked(1)]);
        assert!(!dir.exists());
        assert_eq!(
            std::fs::read(root.path().join("sent.cc.json.broken")).expect("set aside"),
            b"not json"
        );
        drop(log);
        let log = SentLog::open(root.path()).expect("reopen");
        assert_eq!(log.all(), vec![tracked(1)], "folded once, kept in the log");
    }

    #[test]
    fn an_unreadable_line_is_set_aside_and_the_rest_counts() {
        let root = tempfile::tempdir().expect("tempdir");
        let mut log = SentLog::open(root.path()).expect("open");
        log.put(&tracked(1)).expect("put");
        drop(log);
        let path = root.path().join(SentLog::FILE);
        let mut bytes = b"{\"future\":1}\n".to_vec();
        bytes.extend(std::fs::read(&path).expect("log"));
        std::fs::write(&path, bytes).expect("write");

        for _ in 0..2 {
            let log = SentLog::open(root.path()).expect("reopen");
            assert_eq!(log.all(), vec![tracked(1)]);
            assert_eq!(
                std::fs::read(root.path().join(SentLog::BROKEN_FILE)).expect("set aside"),
                b"{\"future\":1}\n",
                "set aside once, however often the log is opened"
            );
        }
        assert_eq!(lines_of(root.path(), SentLog::FILE), 1);
    }
}
