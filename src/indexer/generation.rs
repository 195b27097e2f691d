//! Switching an index to another model without a moment of no index.
//!
//! The next generation is a whole index built beside the current one, in
//! `DIR.next`, by the ordinary indexing run (so a killed build resumes). When
//! it is complete it is marked ready, and the two folders are exchanged in
//! one `renameat2(RENAME_EXCHANGE)`: the path names the old index or the new
//! one at every instant. The old generation, now in `DIR.next`, is deleted
//! after. A process that holds the current index (a server) keeps answering
//! from it during the build; the exchange waits until no one holds it, and
//! every open of the index finishes a pending one first (`settle`).
//!
//! States, and what `settle` does with each:
//! - `DIR.next` without the ready mark: a build in progress or killed; left
//!   alone (`clipdex reindex --model` resumes it).
//! - `DIR.next/READY`: complete; exchanged when no one holds either index.
//! - `DIR/READY`: exchanged, the old generation maybe not yet deleted:
//!   `DIR.next` is removed, then the mark.

use std::path::{Path, PathBuf};

use super::{Error, IndexPaths, Result, io_err, lock};

/// The mark of a complete next generation.
const READY: &str = "generation-ready";

/// Where the next generation of the index at `root` is built.
pub fn next_path(root: &Path) -> PathBuf {
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "index".into());
    root.with_file_name(format!("{name}.next"))
}

/// Whether a complete next generation waits to replace the index at `root`.
pub fn pending(root: &Path) -> bool {
    next_path(root).join(READY).is_file()
}

/// Marks the next generation of `root` complete (written and synced).
pub fn mark_ready(root: &Path) -> Result<()> {
    let next = next_path(root);
    crate::common::fs::write_synced(&next.join(READY), b"").map_err(io_err(&next))?;
    crate::common::fs::sync_dir(&next).map_err(io_err(&next))
}

/// What `settle` did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Nothing was pending.
    Nothing,
    /// The next generation replaced the index.
    Switched,
    /// A switch interrupted after the exchange was finished.
    CleanedUp,
}

/// Finishes whatever a switch left: exchanges a ready next generation
/// (taking both locks first; `Error::InUse` when someone holds either) and
/// deletes the old one.
pub fn settle(root: &Path) -> Result<Settled> {
    let next = next_path(root);
    if root.join(READY).is_file() {
        remove_old(root, &next)?;
        return Ok(Settled::CleanedUp);
    }
    if !next.join(READY).is_file() {
        return Ok(Settled::Nothing);
    }
    {
        let _current = lock(&IndexPaths::new(root))?;
        let _next = lock(&IndexPaths::new(&next))?;
        exchange(root, &next)?;
        // The locks are files inside the folders just exchanged; they go with them.
    }
    let parent = root
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    crate::common::fs::sync_dir(parent).map_err(io_err(parent))?;
    remove_old(root, &next)?;
    Ok(Settled::Switched)
}

/// After the exchange: the old generation goes, then the mark.
fn remove_old(root: &Path, next: &Path) -> Result<()> {
    match std::fs::remove_dir_all(next) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(next)(e)),
    }
    let mark = root.join(READY);
    match std::fs::remove_file(&mark) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&mark)(e)),
    }
    crate::common::fs::sync_dir(root).map_err(io_err(root))
}

/// Swaps two folders atomically.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Io {
            path: p.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"),
        })
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two valid NUL-terminated paths relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(io_err(a)(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, _b: &Path) -> Result<()> {
    Err(io_err(a)(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "switching an index's model in place needs Linux's renameat2; build a new index with `clipdex index`",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(root: &Path, name: &str, marker: &str) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("which"), marker).unwrap();
        dir
    }

    #[test]
    fn every_state_settles_to_one_index() {
        let tmp = tempfile::tempdir().unwrap();
        let root = folder(tmp.path(), "index", "old");
        assert_eq!(next_path(&root), tmp.path().join("index.next"));
        assert_eq!(settle(&root).unwrap(), Settled::Nothing);

        // A build in progress is left alone.
        let next = folder(tmp.path(), "index.next", "new");
        assert_eq!(settle(&root).unwrap(), Settled::Nothing);
        assert!(next.is_dir() && !pending(&root));

        // Ready: exchanged, the old one removed.
        mark_ready(&root).unwrap();
        assert!(pending(&root));
        assert_eq!(settle(&root).unwrap(), Settled::Switched);
        assert_eq!(std::fs::read_to_string(root.join("which")).unwrap(), "new");
        assert!(!next.exists() && !root.join(READY).exists());

        // Killed after the exchange, before the cleanup.
        let old = folder(tmp.path(), "index.next", "old");
        std::fs::write(root.join(READY), b"").unwrap();
        assert_eq!(settle(&root).unwrap(), Settled::CleanedUp);
        assert!(!old.exists() && !root.join(READY).exists());
        assert_eq!(std::fs::read_to_string(root.join("which")).unwrap(), "new");
    }

    #[test]
    fn a_held_index_is_not_switched() {
        let tmp = tempfile::tempdir().unwrap();
        let root = folder(tmp.path(), "index", "old");
        folder(tmp.path(), "index.next", "new");
        mark_ready(&root).unwrap();
        let held = lock(&IndexPaths::new(&root)).unwrap();
        assert!(matches!(settle(&root), Err(Error::InUse { .. })));
        assert_eq!(std::fs::read_to_string(root.join("which")).unwrap(), "old");
        drop(held);
        assert_eq!(settle(&root).unwrap(), Settled::Switched);
    }
}
