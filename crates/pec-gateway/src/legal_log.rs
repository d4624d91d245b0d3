//! The legal log ("log dei messaggi"): one JSON line for every step of every
//! transmission, kept by the provider for 30 months as evidence.
//!
//! Each line carries, in `prev`, the SHA-256 of the previous line's bytes
//! (the first line carries 64 zeros), so deleting, altering or reordering
//! lines breaks the chain and [`verify`] names the first line where it
//! breaks. A step is on disk (`sync_data`) before [`LegalLog::append`]
//! returns, so the gateway never acts on a step the log could lose.
//!
//! Each line is written with a single `write_all` of the whole line and its
//! newline, so a crash leaves at most one partial last line without a
//! newline. That line was never acknowledged; [`LegalLog::open`] cuts it
//! away and continues the chain from the last whole line.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The file name of the log inside its directory.
pub const FILE_NAME: &str = "legal.log";

/// The `prev` of the first line: 64 hexadecimal zeros.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One step of one transmission.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// When the step happened, written as RFC 3339 in UTC.
    #[serde(with = "rfc3339")]
    pub time: DateTime<Utc>,
    /// The PEC message identifier the step belongs to.
    pub identificativo: String,
    /// The `Message-ID` of the message handled in this step.
    pub message_id: String,
    /// What the step was: `accettazione`, `posta-certificata`,
    /// `presa-in-carico`, …
    pub kind: String,
    /// The sender of the transmission.
    pub sender: String,
    /// Its recipients.
    pub recipients: Vec<String>,
    /// How the step ended: `ok`, `refused`, `virus`, …
    pub outcome: String,
}

/// chrono's own serde support is not enabled in this crate, and RFC 3339
/// is what anyone reading the log by hand expects anyway.
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(time: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&time.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DateTime::parse_from_rfc3339(&s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(D::Error::custom)
    }
}

/// The line as written: the entry's fields, then `prev`, in this order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Line<'a> {
    #[serde(with = "rfc3339")]
    time: DateTime<Utc>,
    identificativo: &'a str,
    message_id: &'a str,
    kind: &'a str,
    sender: &'a str,
    recipients: &'a [String],
    outcome: &'a str,
    prev: &'a str,
}

impl<'a> Line<'a> {
    fn new(entry: &'a Entry, prev: &'a str) -> Self {
        Line {
            time: entry.time,
            identificativo: &entry.identificativo,
            message_id: &entry.message_id,
            kind: &entry.kind,
            sender: &entry.sender,
            recipients: &entry.recipients,
            outcome: &entry.outcome,
            prev,
        }
    }
}

/// An open legal log, shared by every task that handles a transmission.
#[derive(Debug)]
pub struct LegalLog {
    path: PathBuf,
    state: Mutex<State>,
    /// Lines written so far (their sequence numbers, from 1).
    written: AtomicU64,
    /// The highest sequence number known to be on disk; held while syncing.
    synced: Mutex<u64>,
    /// A second handle on the file, for syncing outside the write lock.
    sync_file: File,
}

#[derive(Debug)]
struct State {
    file: File,
    /// Hex SHA-256 of the last line written, or [`GENESIS`].
    prev: String,
    /// Length of the file up to the end of the last acknowledged line.
    len: u64,
    /// A failed write left bytes that could not be cut away.
    unusable: bool,
}

impl LegalLog {
    /// Opens `dir/legal.log` for appending, creating the directory and the
    /// file if needed, and finds where the chain stands.
    ///
    /// Bytes after the last newline are the remains of a line whose write
    /// was interrupted by a crash: it was never acknowledged, so they are
    /// truncated away (and the truncation synced) before anything else is
    /// written. Only the tail of the file is read, however long it is.
    pub fn open(dir: &Path) -> io::Result<LegalLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let len = file.metadata()?.len();
        let whole = match last_newline(&mut file, len)? {
            Some(nl) => nl + 1,
            None => 0,
        };
        if whole < len {
            file.set_len(whole)?;
            file.sync_all()?;
        }
        // `sync_data` on the file does not make a newly created file's
        // directory entry durable; without this the first lines could vanish
        // with the whole file after a power cut.
        #[cfg(unix)]
        File::open(dir)?.sync_all()?;
        let prev = if whole == 0 {
            GENESIS.to_owned()
        } else {
            let line_end = whole - 1;
            let line_start = match last_newline(&mut file, line_end)? {
                Some(nl) => nl + 1,
                None => 0,
            };
            let mut line = vec![0; usize_len(line_end - line_start)?];
            file.seek(SeekFrom::Start(line_start))?;
            file.read_exact(&mut line)?;
            sha256_hex(&line)
        };
        let sync_file = file.try_clone()?;
        Ok(LegalLog {
            path,
            state: Mutex::new(State {
                file,
                prev,
                len: whole,
                unusable: false,
            }),
            written: AtomicU64::new(0),
            synced: Mutex::new(0),
            sync_file,
        })
    }

    /// Appends one entry and syncs it to disk before returning.
    ///
    /// Safe to call from many threads at once: appends are serialised, so
    /// lines never interleave and each `prev` is the line written just
    /// before. Syncs are shared (group commit): a caller whose line an
    /// earlier caller's sync already covered returns without a sync of its
    /// own, and one sync covers every line written before it started.
    ///
    /// If the write fails, the caller must treat the step as not logged: the
    /// chain does not advance and whatever part of the line reached the file
    /// is cut away again. If that fails, or a sync fails, every later append
    /// fails too until the log is reopened (which repairs the tail), because
    /// a line glued to a partial one would break the chain for good.
    /// The file must have no other writer, in this process or another.
    pub fn append(&self, entry: &Entry) -> io::Result<()> {
        let seq = self.write(entry)?;
        let mut synced = self.synced.lock().unwrap_or_else(PoisonError::into_inner);
        if *synced >= seq {
            return Ok(());
        }
        // Every line numbered up to `target` finished its write before this
        // load, so the sync below covers it.
        let target = self.written.load(Ordering::SeqCst);
        if let Err(e) = self.sync_file.sync_data() {
            self.state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .unusable = true;
            return Err(e);
        }
        *synced = target;
        Ok(())
    }

    /// Writes the line of `entry` (not yet synced) and returns its sequence
    /// number.
    fn write(&self, entry: &Entry) -> io::Result<u64> {
        // State changes only after a successful write, so a lock poisoned by
        // a panic elsewhere still guards a consistent state.
        let mut guard = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let state = &mut *guard;
        if state.unusable {
            return Err(io::Error::other(
                "legal log: a failed write could not be undone; reopen the log to repair it",
            ));
        }
        let mut line =
            serde_json::to_vec(&Line::new(entry, &state.prev)).map_err(io::Error::other)?;
        let hash = sha256_hex(&line);
        line.push(b'\n');
        if let Err(e) = state.file.write_all(&line) {
            let undone = state
                .file
                .set_len(state.len)
                .and_then(|()| state.file.sync_data());
            state.unusable = undone.is_err();
            return Err(e);
        }
        state.len += line.len() as u64;
        state.prev = hash;
        Ok(self.written.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// The path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The first broken line of a log, as [`verify`] found it.
#[derive(Debug, PartialEq)]
pub struct Broken {
    /// The line number, from 1; 0 when the file itself cannot be opened.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for Broken {}

/// Checks the whole chain of the log at `path` and returns how many lines
/// it has.
///
/// Each line must be a JSON entry with a `prev` equal to the SHA-256 of the
/// line before it (64 zeros for line 1). When a line's content is altered
/// but still valid JSON, it is the *next* line that is named, because its
/// `prev` no longer matches; a line that is no longer a valid entry is
/// named itself. A removed line or two swapped lines show up as a `prev`
/// mismatch at the first line whose predecessor changed. Bytes after the
/// last newline (a torn line not yet repaired by [`LegalLog::open`]) count
/// as a line and must verify like any other.
pub fn verify(path: &Path) -> Result<usize, Broken> {
    let file = File::open(path).map_err(|e| Broken {
        line: 0,
        reason: format!("cannot open {}: {e}", path.display()),
    })?;
    let mut reader = BufReader::new(file);
    let mut expected = GENESIS.to_owned();
    let mut count = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| Broken {
            line: count + 1,
            reason: format!("cannot read: {e}"),
        })?;
        if n == 0 {
            return Ok(count);
        }
        count += 1;
        let broken = |reason: String| Broken {
            line: count,
            reason,
        };
        if buf.last() == Some(&b'\n') {
            buf.pop();
        }
        let value: serde_json::Value =
            serde_json::from_slice(&buf).map_err(|e| broken(format!("not JSON: {e}")))?;
        Entry::deserialize(&value).map_err(|e| broken(format!("not a log entry: {e}")))?;
        let prev = match value.get("prev") {
            Some(serde_json::Value::String(p)) => p,
            Some(_) => return Err(broken("prev is not a string".to_owned())),
            None => return Err(broken("missing prev".to_owned())),
        };
        if *prev != expected {
            return Err(broken(format!(
                "prev {prev} does not match the hash {expected} of the line before: \
                 an earlier line was altered, removed or reordered"
            )));
        }
        expected = sha256_hex(&buf);
    }
}

/// Every entry of the log at `path`, in order, without checking the chain.
pub fn entries(path: &Path) -> io::Result<Vec<Entry>> {
    let reader = BufReader::new(File::open(path)?);
    let mut out = Vec::new();
    for line in reader.split(b'\n') {
        let entry = serde_json::from_slice(&line?)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        out.push(entry);
    }
    Ok(out)
}

fn sha256_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

fn usize_len(len: u64) -> io::Result<usize> {
    usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "line too long"))
}

/// The offset of the last `\n` before `end`, reading backwards in chunks so
/// that a 30-month log is not read whole at every start.
fn last_newline(file: &mut File, end: u64) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut buf = vec![0; usize_len(CHUNK)?];
    let mut hi = end;
    while hi > 0 {
        let lo = hi.saturating_sub(CHUNK);
        let chunk = &mut buf[..usize_len(hi - lo)?];
        file.seek(SeekFrom::Start(lo))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn entry(n: usize) -> Entry {
        Entry {
            time: DateTime::from_timestamp(1_795_000_000 + n as i64, 123_000_000).unwrap(),
            identificativo: format!("opec.{n}@pec.a.it"),
            message_id: format!("<{n}@client>"),
            kind: "accettazione".into(),
            sender: "mario.rossi@pec.a.it".into(),
            recipients: vec!["anna@pec.b.it".into(), "\"quoted\" <x@y.it>\n".into()],
            outcome: "ok".into(),
        }
    }

    fn log_with(lines: usize) -> (tempfile::TempDir, LegalLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = LegalLog::open(dir.path()).unwrap();
        for n in 0..lines {
            log.append(&entry(n)).unwrap();
        }
        (dir, log)
    }

    fn lines_of(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_fresh_log_verifies_and_reads_back() {
        let (dir, log) = log_with(5);
        assert_eq!(log.path(), dir.path().join("legal.log"));
        assert_eq!(verify(log.path()), Ok(5));
        let read: Vec<Entry> = entries(log.path()).unwrap();
        assert_eq!(read, (0..5).map(entry).collect::<Vec<_>>());
    }

    #[test]
    fn an_empty_log_verifies_with_zero_lines() {
        let (_dir, log) = log_with(0);
        assert_eq!(verify(log.path()), Ok(0));
    }

    #[test]
    fn lines_have_the_documented_shape() {
        let (_dir, log) = log_with(2);
        let lines = lines_of(log.path());
        let first = &lines[0];
        assert!(first.starts_with(r#"{"time":"2026-11-18T"#), "{first}");
        assert!(
            first.ends_with(&format!(r#","outcome":"ok","prev":"{GENESIS}"}}"#)),
            "{first}"
        );
        assert!(first.contains(r#""messageId":"<0@client>""#), "{first}");
        let hash = sha256_hex(first.as_bytes());
        assert!(lines[1].ends_with(&format!(r#""prev":"{hash}"}}"#)));
    }

    #[test]
    fn concurrent_appends_from_eight_threads_keep_the_chain() {
        let (_dir, log) = log_with(0);
        let log = Arc::new(log);
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    for n in 0..50 {
                        log.append(&entry(t * 1000 + n)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(verify(log.path()), Ok(400));
        assert_eq!(entries(log.path()).unwrap().len(), 400);
    }

    #[test]
    fn reopening_continues_the_chain() {
        let (dir, log) = log_with(3);
        drop(log);
        let log = LegalLog::open(dir.path()).unwrap();
        log.append(&entry(3)).unwrap();
        drop(log);
        let log = LegalLog::open(dir.path()).unwrap();
        log.append(&entry(4)).unwrap();
        assert_eq!(verify(log.path()), Ok(5));
    }

    /// Line 3 is still valid JSON after the change, so nothing is wrong with
    /// it on its own; what breaks is line 4, whose `prev` is the hash of
    /// line 3 as it was.
    #[test]
    fn altering_a_byte_of_line_three_is_reported_at_line_four() {
        let (_dir, log) = log_with(6);
        let mut lines = lines_of(log.path());
        lines[2] = lines[2].replace("opec.2@", "opec.9@");
        write_lines(log.path(), &lines);
        let broken = verify(log.path()).unwrap_err();
        assert_eq!(broken.line, 4, "{broken}");
        assert!(broken.reason.contains("does not match"), "{broken}");
    }

    /// A change that leaves line 3 unparseable is reported at line 3 itself.
    #[test]
    fn breaking_the_json_of_line_three_is_reported_at_line_three() {
        let (_dir, log) = log_with(6);
        let mut lines = lines_of(log.path());
        lines[2] = lines[2].replacen('{', "[", 1);
        write_lines(log.path(), &lines);
        let broken = verify(log.path()).unwrap_err();
        assert_eq!(broken.line, 3, "{broken}");
        assert!(broken.reason.starts_with("not JSON"), "{broken}");
        assert!(broken.to_string().starts_with("line 3: not JSON"));
    }

    #[test]
    fn deleting_line_two_is_reported_at_line_two() {
        let (_dir, log) = log_with(5);
        let mut lines = lines_of(log.path());
        lines.remove(1);
        write_lines(log.path(), &lines);
        let broken = verify(log.path()).unwrap_err();
        assert_eq!(broken.line, 2, "{broken}");
    }

    #[test]
    fn swapping_two_lines_is_caught() {
        let (_dir, log) = log_with(5);
        let mut lines = lines_of(log.path());
        lines.swap(1, 3);
        write_lines(log.path(), &lines);
        let broken = verify(log.path()).unwrap_err();
        assert_eq!(broken.line, 2, "{broken}");
    }

    #[test]
    fn a_line_without_prev_is_named() {
        let (_dir, log) = log_with(3);
        let mut lines = lines_of(log.path());
        let cut = lines[1].find(r#","prev""#).unwrap();
        lines[1] = format!("{}}}", &lines[1][..cut]);
        write_lines(log.path(), &lines);
        assert_eq!(
            verify(log.path()),
            Err(Broken {
                line: 2,
                reason: "missing prev".into()
            })
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_away_on_open() {
        let (dir, log) = log_with(3);
        drop(log);
        let path = dir.path().join(FILE_NAME);
        let whole = std::fs::read(&path).unwrap();
        let mut torn = whole.clone();
        torn.extend_from_slice(br#"{"time":"2026-11-18T10:00:00Z","identifi"#);
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(verify(&path).unwrap_err().line, 4);

        let log = LegalLog::open(dir.path()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), whole);
        log.append(&entry(3)).unwrap();
        assert_eq!(verify(&path), Ok(4));
    }

    #[test]
    fn a_torn_only_line_leaves_an_empty_log_that_starts_from_genesis() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"{\"time\":").unwrap();
        let log = LegalLog::open(dir.path()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        log.append(&entry(0)).unwrap();
        assert_eq!(verify(&path), Ok(1));
    }

    #[test]
    fn open_finds_the_last_line_across_read_chunks() {
        let (dir, log) = log_with(1);
        let mut big = entry(1);
        big.recipients = (0..5000).map(|n| format!("r{n}@pec.b.it")).collect();
        log.append(&big).unwrap();
        drop(log);
        let log = LegalLog::open(dir.path()).unwrap();
        log.append(&entry(2)).unwrap();
        assert_eq!(verify(log.path()), Ok(3));
    }

    /// `/dev/full` refuses every write and cannot be truncated, the worst
    /// case: the log must refuse to go on rather than glue lines to garbage.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_write_that_cannot_be_undone_makes_later_appends_fail() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.path().join(FILE_NAME)).unwrap();
        let log = LegalLog::open(dir.path()).unwrap();
        assert!(log.append(&entry(0)).is_err());
        let second = log.append(&entry(1)).unwrap_err();
        assert!(second.to_string().contains("reopen"), "{second}");
    }

    #[test]
    fn open_creates_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let log = LegalLog::open(&nested).unwrap();
        log.append(&entry(0)).unwrap();
        assert!(nested.join(FILE_NAME).exists());
    }
}
