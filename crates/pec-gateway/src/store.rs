//! The mailboxes, as Maildirs on disk, and the one durable-write routine the
//! spool, queue and quarantine share.
//!
//! A message handed to [`Maildirs::deliver`] is on stable storage when it
//! returns: the file is fsync'd, renamed into `new/`, and the directory entry
//! fsync'd too, because a delivery receipt is signed on the strength of it.
//!
//! A delivery keyed by Message-ID happens once per key: an empty marker per
//! key in the key index ([`KEY_INDEX`], beside the mailboxes and shared
//! with them by every replica) is claimed before the message is written, so
//! telling a first delivery from a repeated one takes one file creation, not
//! a listing of a mailbox that grows with every receipt.
//!
//! This module touches only the directories it is given; every function here
//! blocks, so async callers use `spawn_blocking`.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::OnceLock,
    time::UNIX_EPOCH,
};

use sha2::{Digest, Sha256};

/// The directory under a domain's mailbox root that holds the key index:
/// `.keys/<mailbox>/<tag>`, one empty marker per keyed delivery, named like
/// the message's tag. A dot directory, so no mailbox name can clash with it
/// and Maildir readers pass it by.
pub const KEY_INDEX: &str = ".keys";

/// The longest local part RFC 5321 allows, and so the longest mailbox name.
const MAX_MAILBOX_LEN: usize = 64;

/// Whether `local_part` may name a mailbox: 1 to 64 characters from
/// `[a-z0-9._+-]`, not starting with `.`. Lowercase only: callers fold case
/// first, so that one mailbox never has two directories.
pub fn is_valid_mailbox(local_part: &str) -> bool {
    !local_part.is_empty()
        && local_part.len() <= MAX_MAILBOX_LEN
        && !local_part.starts_with('.')
        && local_part
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'+' | b'-'))
}

/// The mailboxes of one domain: `<root>/<local part>/{tmp,new,cur}`.
#[derive(Debug, Clone)]
pub struct Maildirs {
    root: PathBuf,
}

impl Maildirs {
    /// Mailboxes under `root`; nothing is created until the first delivery.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Delivers `message` into `mailbox`'s `new/` and returns the file's
    /// path once it is durable. Creates the Maildir on first use. A mailbox
    /// name that [`is_valid_mailbox`] refuses is `InvalidInput`.
    pub fn deliver(&self, mailbox: &str, message: &[u8]) -> io::Result<PathBuf> {
        let maildir = self.prepare(mailbox)?;
        // A collision needs the same second, host and 64 random bits; the
        // retry is for the impossible, not the likely.
        let mut attempts = 0;
        loop {
            let tag = format!("{:016x}", rand::random::<u64>());
            match write_into_new(&maildir, &tag, message, None) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 3 => attempts += 1,
                other => return other,
            }
        }
    }

    /// Delivers `message` into `mailbox` at most once per `key` (the
    /// Message-ID), and returns the message's path. The random part of the
    /// file name is a digest of `key`, and the key index (see
    /// [`KEY_INDEX`]) holds a marker per digest, claimed before the message
    /// is written. A second delivery with the same key (a job replayed
    /// after a crash, or a message a sender retried to another replica)
    /// finds the claim taken and the message in `new/` or `cur/`, and
    /// writes nothing. A claim with no message (a crash between the two, or
    /// a reader that deleted the message some other way than
    /// [`Maildirs::remove`]) delivers again. So a first delivery costs no
    /// directory listing; only a repeated one does. A delivery that finds
    /// the claim taken waits for the claimant's lock on the marker, so two
    /// deliveries of one key at once write one message; what is left is the
    /// moment between the claimant creating the marker and locking it.
    pub fn deliver_keyed(&self, mailbox: &str, key: &str, message: &[u8]) -> io::Result<PathBuf> {
        let maildir = self.prepare(mailbox)?;
        let tag = key_tag(key);
        let (marker, claim) = self.claim(mailbox, &maildir, &tag)?;
        if let Some(claim) = claim {
            // The marker is empty: its name is all it says. It stays locked
            // while the message is written, and its directory is synced
            // before the message is renamed into `new/`, so no crash leaves
            // a message whose claim is lost.
            claim.lock()?;
            let index = marker.parent().unwrap_or(Path::new("."));
            return write_into_new(&maildir, &tag, message, Some(index));
        }
        // Wait for a delivery of the same key still in progress; a crashed
        // one's lock went with its process.
        let claim = File::open(&marker)?;
        claim.lock()?;
        match find_tagged(&maildir, &tag)? {
            Some(existing) => Ok(existing),
            None => write_into_new(&maildir, &tag, message, None),
        }
    }

    /// Creates the marker of `tag` in `mailbox`'s key index, and returns
    /// its path with the new file, or with `None` when it was claimed
    /// before.
    fn claim(
        &self,
        mailbox: &str,
        maildir: &Path,
        tag: &str,
    ) -> io::Result<(PathBuf, Option<File>)> {
        let mut attempts = 0;
        loop {
            let marker = self.key_index(mailbox, maildir)?.join(tag);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
            {
                Ok(file) => return Ok((marker, Some(file))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok((marker, None)),
                // Two deliveries that built the index at once: the later
                // rename replaced the empty index this path led to.
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes the message named `name` (a file name in `new/` or `cur/`)
    /// from `mailbox`, and its key's marker, so the index holds only the
    /// keys of messages still there. `Ok(false)` when there is no such
    /// message.
    pub fn remove(&self, mailbox: &str, name: &str) -> io::Result<bool> {
        let maildir = self.maildir(mailbox)?;
        // A name with a separator or a leading dot is no message of ours.
        if !is_plain_name(name) || name.starts_with('.') {
            return Ok(false);
        }
        let mut removed = false;
        for sub in ["new", "cur"] {
            match fs::remove_file(maildir.join(sub).join(name)) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if !removed {
            return Ok(false);
        }
        if let Some(tag) = tag_of(name) {
            let marker = self.root.join(KEY_INDEX).join(mailbox).join(tag);
            match fs::remove_file(marker) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(true)
    }

    /// The key index of `mailbox`, built from the names in its Maildir the
    /// first time it is needed (a mailbox delivered to before the index
    /// existed): built aside, then renamed into place, so a reader of the
    /// index never sees half of it.
    fn key_index(&self, mailbox: &str, maildir: &Path) -> io::Result<PathBuf> {
        let indexes = self.root.join(KEY_INDEX);
        let index = indexes.join(mailbox);
        if index.is_dir() {
            return Ok(index);
        }
        create_dir_durably(&indexes)?;
        let mut tags = Vec::new();
        for sub in ["new", "cur"] {
            for entry in fs::read_dir(maildir.join(sub))? {
                if let Some(tag) = tag_of(&entry?.file_name().to_string_lossy()) {
                    tags.push(tag.to_owned());
                }
            }
        }
        if tags.is_empty() {
            // Nothing to index: an empty index is made in place, so that a
            // build's rename replaces one another delivery is using only when
            // a plain delivery lands in between (the claim then retries).
            create_dir_durably(&index)?;
            return Ok(index);
        }
        let building = indexes.join(format!(".{mailbox}.{:016x}", rand::random::<u64>()));
        let built = fs::create_dir(&building).and_then(|()| {
            for tag in &tags {
                File::create(building.join(tag))?;
            }
            sync_dir(&building)?;
            fs::rename(&building, &index)
        });
        match built {
            Ok(()) => sync_dir(&indexes)?,
            // Another delivery built it first.
            Err(_) if index.is_dir() => fs::remove_dir_all(&building)?,
            Err(e) => {
                let _ = fs::remove_dir_all(&building);
                return Err(e);
            }
        }
        Ok(index)
    }

    /// The messages of `mailbox` (in `new/` and `cur/`), sorted by file
    /// name, which starts with the delivery time. A mailbox never delivered
    /// to has none.
    pub fn messages(&self, mailbox: &str) -> io::Result<Vec<PathBuf>> {
        let maildir = self.maildir(mailbox)?;
        let mut found = Vec::new();
        for sub in ["new", "cur"] {
            let entries = match fs::read_dir(maildir.join(sub)) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                // Dot files are other tools' work in progress, per Maildir.
                if entry.file_type()?.is_file()
                    && !entry.file_name().to_string_lossy().starts_with('.')
                {
                    found.push(entry.path());
                }
            }
        }
        found.sort_by(|a, b| a.file_name().cmp(&b.file_name()).then_with(|| a.cmp(b)));
        Ok(found)
    }

    /// The Maildir of a valid `mailbox`, with its three directories.
    fn prepare(&self, mailbox: &str) -> io::Result<PathBuf> {
        let maildir = self.maildir(mailbox)?;
        for sub in ["tmp", "new", "cur"] {
            create_dir_durably(&maildir.join(sub))?;
        }
        Ok(maildir)
    }

    fn maildir(&self, mailbox: &str) -> io::Result<PathBuf> {
        if is_valid_mailbox(mailbox) {
            Ok(self.root.join(mailbox))
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{mailbox:?} is not a valid mailbox name"),
            ))
        }
    }
}

/// Whether `name` names a file in a directory, not a path: not empty, not
/// `.` or `..`, no `/` and no NUL.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

/// Writes `bytes` to `dir/name` so that, once this returns, the file is on
/// stable storage with exactly these bytes, or (after a crash) absent or
/// still its previous version — never partial. An existing `name` is
/// replaced atomically. Creates `dir` if it is missing.
///
/// The bytes go first to `dir/.<name>.tmp`; a leftover from a crash is
/// overwritten by the next write of the same name. `name` must be a plain
/// file name (no `/`, not `.` or `..`), else `InvalidInput`.
pub fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    if !is_plain_name(name) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a plain file name"),
        ));
    }
    create_dir_durably(dir)?;
    write_then_rename(
        &dir.join(format!(".{name}.tmp")),
        dir,
        name,
        bytes,
        false,
        None,
    )
}

/// The one copy of the durability dance: write `temp`, fsync it, rename it
/// to `dir/name`, fsync `dir` so the rename itself survives a crash. With
/// `exclusive`, an existing `temp` is an error instead of being truncated.
/// `first`, a directory fsync'd before the rename, makes an entry created
/// there earlier durable no later than `dir/name`. The temporary file is
/// removed if anything fails.
fn write_then_rename(
    temp: &Path,
    dir: &Path,
    name: &str,
    bytes: &[u8],
    exclusive: bool,
    first: Option<&Path>,
) -> io::Result<PathBuf> {
    let mut options = OpenOptions::new();
    options.write(true);
    if exclusive {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    let mut file = options.open(temp)?;
    let target = dir.join(name);
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| first.map_or(Ok(()), sync_dir))
        .and_then(|()| {
            drop(file);
            fs::rename(temp, &target)
        });
    if let Err(e) = written {
        let _ = fs::remove_file(temp);
        return Err(e);
    }
    sync_dir(dir)?;
    Ok(target)
}

/// Creates `dir` and any missing parents, fsyncing each parent after the
/// entry is added: a message fsync'd into a directory whose own entry was
/// never persisted would vanish with it.
fn create_dir_durably(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        create_dir_durably(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Another delivery to the same new mailbox got there first; it may
        // not have fsync'd the parent yet, so fsync it here too.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(e),
    }
    sync_dir(parent.unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `message` as `tmp/<name>` and moves it to `new/<name>`, where
/// `<name>` is `<unix seconds>.<tag>.<host>`, the classic Maildir shape:
/// sortable by time, unique across processes and hosts sharing a volume as
/// long as `tag` is. `first` as for [`write_then_rename`].
fn write_into_new(
    maildir: &Path,
    tag: &str,
    message: &[u8],
    first: Option<&Path>,
) -> io::Result<PathBuf> {
    let name = format!("{}.{tag}.{}", unix_seconds(), host_tag());
    let temp = maildir.join("tmp").join(&name);
    write_then_rename(&temp, &maildir.join("new"), &name, message, true, first)
}

/// The tag of a keyed delivery: 64 bits of SHA-256, like the random tags.
fn key_tag(key: &str) -> String {
    let digest = Sha256::new()
        .chain_update(b"pec-gateway maildir key\0")
        .chain_update(key.as_bytes())
        .finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// The tag of a message's file name: its second dot-separated part,
/// whatever its time, host or (in `cur/`) flags. `None` for a dot file or a
/// name without one, and for a tag that could not name a marker.
fn tag_of(name: &str) -> Option<&str> {
    if name.starts_with('.') {
        return None;
    }
    let base = name.split(':').next().unwrap_or_default();
    base.split('.')
        .nth(1)
        .filter(|tag| !tag.is_empty() && tag.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// The message in `new/` or `cur/` whose name carries `tag`.
fn find_tagged(maildir: &Path, tag: &str) -> io::Result<Option<PathBuf>> {
    for sub in ["new", "cur"] {
        for entry in fs::read_dir(maildir.join(sub))? {
            let entry = entry?;
            if tag_of(&entry.file_name().to_string_lossy()) == Some(tag) {
                return Ok(Some(entry.path()));
            }
        }
    }
    Ok(None)
}

fn unix_seconds() -> u64 {
    crate::clock::system_now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The host name, reduced to characters that are safe in a Maildir name
/// (`/` and `:` are not), or `pec` when there is none.
fn host_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let raw = fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let tag: String = raw
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
            .take(64)
            .collect();
        if tag.is_empty() {
            "pec".to_owned()
        } else {
            tag
        }
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, sync::Arc, thread};

    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_delivery_lands_in_new_with_the_exact_bytes() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Maildirs::new(root.path());
        let message = b"From: a@b\r\nSubject: x\r\n\r\n\x00\xffbinary\r\n";
        let path = maildirs.deliver("mario.rossi", message).unwrap();
        assert_eq!(path.parent().unwrap(), root.path().join("mario.rossi/new"));
        assert_eq!(fs::read(&path).unwrap(), message);
        for sub in ["tmp", "new", "cur"] {
            assert!(root.path().join("mario.rossi").join(sub).is_dir(), "{sub}");
        }
        assert_eq!(maildirs.messages("mario.rossi").unwrap(), vec![path]);
    }

    #[test]
    fn the_file_name_is_time_random_and_host() {
        let root = tempfile::tempdir().unwrap();
        let path = Maildirs::new(root.path()).deliver("info", b"x").unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let parts: Vec<&str> = name.splitn(3, '.').collect();
        assert_eq!(parts.len(), 3, "{name}");
        assert!(parts[0].parse::<u64>().unwrap() > 1_600_000_000);
        assert_eq!(parts[1].len(), 16);
        assert!(parts[1].chars().all(|c| c.is_ascii_hexdigit()));
        assert!(!parts[2].is_empty() && !parts[2].contains(['/', ':']));
    }

    #[test]
    fn bad_mailbox_names_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Maildirs::new(root.path());
        let too_long = "a".repeat(65);
        for bad in [
            "../x",
            "a/b",
            "",
            ".x",
            "Mario",
            "a b",
            "a:b",
            "..",
            too_long.as_str(),
        ] {
            let err = maildirs.deliver(bad, b"x").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            let err = maildirs.messages(bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(names_in(root.path()).is_empty(), "nothing was created");
        assert!(is_valid_mailbox(&"a".repeat(64)));
        assert!(is_valid_mailbox("info+pec_2024-x.y"));
    }

    #[test]
    fn twenty_concurrent_deliveries_give_twenty_distinct_files() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Arc::new(Maildirs::new(root.path()));
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let maildirs = maildirs.clone();
                thread::spawn(move || maildirs.deliver("info", format!("message {i}").as_bytes()))
            })
            .collect();
        let paths: HashSet<PathBuf> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        assert_eq!(paths.len(), 20);
        let bodies: HashSet<Vec<u8>> = paths.iter().map(|p| fs::read(p).unwrap()).collect();
        assert_eq!(bodies.len(), 20, "every message kept its own bytes");
        assert_eq!(maildirs.messages("info").unwrap().len(), 20);
        assert!(
            names_in(&root.path().join("info/tmp")).is_empty(),
            "tmp is empty"
        );
    }

    #[test]
    fn a_keyed_delivery_happens_once_even_after_the_reader_moved_it() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Maildirs::new(root.path());
        let key = "<opec.20240101.1@example.pec.it>";
        let first = maildirs.deliver_keyed("info", key, b"receipt").unwrap();
        assert_eq!(
            maildirs.deliver_keyed("info", key, b"receipt").unwrap(),
            first
        );
        assert_eq!(maildirs.messages("info").unwrap(), vec![first.clone()]);
        let name = first.file_name().unwrap().to_string_lossy().into_owned();
        let seen = root.path().join("info/cur").join(format!("{name}:2,S"));
        fs::rename(&first, &seen).unwrap();
        assert_eq!(
            maildirs.deliver_keyed("info", key, b"receipt").unwrap(),
            seen
        );
        let other = maildirs
            .deliver_keyed("info", "<another@x>", b"other")
            .unwrap();
        assert_ne!(other, seen);
        assert_eq!(maildirs.messages("info").unwrap().len(), 2);
        assert_eq!(
            maildirs
                .deliver_keyed("../x", key, b"x")
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
    }

    fn marker_of(root: &Path, mailbox: &str, message: &Path) -> PathBuf {
        let name = message.file_name().unwrap().to_string_lossy().into_owned();
        let tag = tag_of(&name).unwrap().to_owned();
        root.join(KEY_INDEX).join(mailbox).join(tag)
    }

    #[test]
    fn a_keyed_delivery_leaves_an_empty_marker_named_by_its_tag() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Maildirs::new(root.path());
        let path = maildirs.deliver_keyed("info", "<k@x>", b"receipt").unwrap();
        let marker = marker_of(root.path(), "info", &path);
        assert_eq!(fs::read(&marker).unwrap(), b"", "{marker:?}");
        assert_eq!(names_in(&root.path().join(KEY_INDEX).join("info")).len(), 1);
        assert!(
            !maildirs.messages("info").unwrap().is_empty(),
            "the index is not a message"
        );
        assert_eq!(names_in(root.path()), vec![".keys", "info"]);
    }

    #[test]
    fn a_claim_whose_message_never_arrived_delivers_it() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Maildirs::new(root.path());
        // A gateway that crashed after claiming the key, before the message.
        let index = root.path().join(KEY_INDEX).join("info");
        fs::create_dir_all(&index).unwrap();
        fs::write(index.join(key_tag("<k@x>")), b"").unwrap();
        let path = maildirs.deliver_keyed("info", "<k@x>", b"receipt").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"receipt");
        assert_eq!(maildirs.messages("info").unwrap(), vec![path.clone()]);
        assert_eq!(
            maildirs.deliver_keyed("info", "<k@x>", b"receipt").unwrap(),
            path
        );
    }

    #[test]
    fn a_mailbox_from_before_the_index_gets_one_built_from_its_names() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Maildirs::new(root.path());
        let keyed = maildirs.deliver_keyed("info", "<k@x>", b"receipt").unwrap();
        let plain = maildirs.deliver("info", b"plain").unwrap();
        let seen = root.path().join("info/cur").join(format!(
            "{}:2,S",
            keyed.file_name().unwrap().to_string_lossy()
        ));
        fs::rename(&keyed, &seen).unwrap();
        fs::remove_dir_all(root.path().join(KEY_INDEX)).unwrap();

        assert_eq!(
            maildirs.deliver_keyed("info", "<k@x>", b"receipt").unwrap(),
            seen,
            "the key of a message delivered before the index is still known"
        );
        assert!(marker_of(root.path(), "info", &seen).exists());
        assert!(marker_of(root.path(), "info", &plain).exists());
        assert_eq!(maildirs.messages("info").unwrap().len(), 2);
        assert_eq!(
            names_in(&root.path().join(KEY_INDEX)),
            vec!["info".to_owned()],
            "nothing is left of the build"
        );
    }

    #[test]
    fn removing_a_message_forgets_its_key() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Maildirs::new(root.path());
        let first = maildirs.deliver_keyed("info", "<k@x>", b"receipt").unwrap();
        let name = first.file_name().unwrap().to_string_lossy().into_owned();
        let marker = marker_of(root.path(), "info", &first);
        assert!(maildirs.remove("info", &name).unwrap());
        assert!(!first.exists() && !marker.exists());
        assert!(!maildirs.remove("info", &name).unwrap(), "already gone");
        assert!(!maildirs.remove("nobody", &name).unwrap());
        let again = maildirs.deliver_keyed("info", "<k@x>", b"receipt").unwrap();
        assert!(again.exists() && marker.exists());
        let plain = maildirs.deliver("info", b"plain").unwrap();
        let plain_name = plain.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            maildirs.remove("info", &plain_name).unwrap(),
            "a message without a marker"
        );
        assert_eq!(maildirs.messages("info").unwrap(), vec![again]);
    }

    #[test]
    fn a_repeat_waits_for_the_claimant_and_then_finds_its_message() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Arc::new(Maildirs::new(root.path()));
        maildirs.deliver("info", b"unrelated").unwrap();
        // A claimant holding the marker's lock, its message not yet written.
        let index = maildirs
            .key_index("info", &root.path().join("info"))
            .unwrap();
        let tag = key_tag("<k@x>");
        let claim = File::create_new(index.join(&tag)).unwrap();
        claim.lock().unwrap();
        let repeat = {
            let maildirs = maildirs.clone();
            thread::spawn(move || maildirs.deliver_keyed("info", "<k@x>", b"second"))
        };
        thread::sleep(std::time::Duration::from_millis(300));
        assert!(!repeat.is_finished(), "the repeat waits for the lock");
        let name = format!("1.{tag}.elsewhere");
        let written = root.path().join("info/new").join(&name);
        fs::write(&written, b"first").unwrap();
        drop(claim);
        assert_eq!(repeat.join().unwrap().unwrap(), written);
        assert_eq!(maildirs.messages("info").unwrap().len(), 2);
    }

    #[test]
    fn eight_deliveries_of_one_key_at_once_write_one_message() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Arc::new(Maildirs::new(root.path()));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let maildirs = maildirs.clone();
                thread::spawn(move || {
                    loop {
                        match maildirs.deliver_keyed("info", "<k@x>", b"receipt") {
                            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                            other => {
                                break other
                                    .map_err(|e| {
                                        format!(
                                            "{e:?} {}",
                                            std::backtrace::Backtrace::force_capture()
                                        )
                                    })
                                    .unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        let paths: HashSet<PathBuf> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(paths.len(), 1, "{paths:?}");
        assert_eq!(maildirs.messages("info").unwrap().len(), 1);
    }

    #[test]
    fn messages_lists_new_and_cur_sorted_and_a_missing_mailbox_is_empty() {
        let root = tempfile::tempdir().unwrap();
        let maildirs = Maildirs::new(root.path());
        assert!(maildirs.messages("nobody").unwrap().is_empty());
        maildirs.deliver("info", b"one").unwrap();
        let cur = root.path().join("info/cur");
        fs::write(cur.join("1.seen.pec:2,S"), b"read").unwrap();
        fs::write(cur.join(".in-progress"), b"ignored").unwrap();
        let listed = maildirs.messages("info").unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed[0].ends_with("cur/1.seen.pec:2,S"), "{listed:?}");
    }

    #[test]
    fn write_durably_writes_and_replaces_without_leaving_temp_files() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("queue/outbound");
        let path = write_durably(&dir, "msg-1", b"first").unwrap();
        assert_eq!(path, dir.join("msg-1"));
        fs::write(dir.join(".msg-1.tmp"), b"left over from a crash").unwrap();
        write_durably(&dir, "msg-1", b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(names_in(&dir), vec!["msg-1".to_owned()]);
    }

    #[test]
    fn write_durably_refuses_names_that_are_not_plain() {
        let root = tempfile::tempdir().unwrap();
        for bad in ["", ".", "..", "a/b", "../x", "nul\0"] {
            let err = write_durably(root.path(), bad, b"x").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(names_in(root.path()).is_empty());
    }
}
