//! Files that must survive a crash whole: written under a temporary name,
//! fsynced, renamed into place, and the folder fsynced.

use std::io::Write;
use std::path::Path;

/// Writes a file through a temporary name, fsyncs it and renames it into
/// place: a reader sees the old file or the new one, never a torn one.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Makes a folder's entries (a rename into it) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}
