//! The append-only files of the queue (`emitted.log`, `sent.log`): one
//! record per line, each append synced before it counts.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    path::Path,
};

/// Opens (creating) the log at `path` in `dir` for appending, and returns
/// it with its whole lines. A torn last line (a crash in the middle of an
/// append: that record was never acknowledged) is cut off the file.
pub fn open(path: &Path, dir: &Path) -> io::Result<(File, Vec<u8>)> {
    let created = !path.exists();
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    if created {
        File::open(dir)?.sync_all()?;
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < bytes.len() {
        file.set_len(whole as u64)?;
        file.sync_all()?;
        bytes.truncate(whole);
    }
    Ok((file, bytes))
}

/// Appends `lines` (whole lines) to `file`, whose whole lines end at `len`,
/// and syncs. On failure the file is cut back to `len`, so the next append
/// does not glue onto a torn line; on success `len` grows.
pub fn append(file: &mut File, len: &mut u64, lines: &[u8]) -> io::Result<()> {
    if let Err(e) = file.write_all(lines).and_then(|()| file.sync_data()) {
        let _ = file.set_len(*len).and_then(|()| file.sync_data());
        return Err(e);
    }
    *len += lines.len() as u64;
    Ok(())
}
