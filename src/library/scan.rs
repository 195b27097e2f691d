//! Walking a photo library: every image file with its size and modification
//! time, its caption sidecar if any, and every file or link that cannot be
//! indexed with the reason. Reads no file contents.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use crate::common::FileSig;

/// File extensions indexed as images (compared lower-case).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "webp", "gif", "bmp", "tif", "tiff",
];

/// An image file found in the library.
#[derive(Clone, Debug)]
pub struct ScannedFile {
    /// Path relative to the library root, `/`-separated.
    pub rel: String,
    pub abs: PathBuf,
    pub sig: FileSig,
    /// A caption file beside it (`photo.txt` or `photo.jpg.txt`).
    pub sidecar: Option<(PathBuf, FileSig)>,
}

/// A library entry that cannot be indexed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanProblem {
    pub rel: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Scan {
    pub files: Vec<ScannedFile>,
    pub problems: Vec<ScanProblem>,
}

pub fn file_sig(meta: &std::fs::Metadata) -> FileSig {
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos().min(i64::MAX as u128) as i64)
        .unwrap_or(0);
    FileSig {
        size: meta.len(),
        mtime_ns,
    }
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// `path` relative to the library as the index keeps it: any name, UTF-8
/// or not ([`crate::common::rel_path`]).
fn rel_path(root: &Path, path: &Path) -> String {
    crate::common::rel_path::encode(path.strip_prefix(root).unwrap_or(path))
}

/// Walks `root`, following symbolic links, skipping hidden entries (names
/// starting with `.`) and the folders in `exclude` (the index itself, when it
/// lives inside the library).
pub fn scan(root: &Path, exclude: &[PathBuf]) -> Scan {
    let mut scan = Scan::default();
    let mut sidecars: HashMap<String, (PathBuf, FileSig)> = HashMap::new();
    let walker = walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter();
    let walker = walker.filter_entry(|e| {
        let hidden = e.depth() > 0 && e.file_name().to_str().is_some_and(|n| n.starts_with('.'));
        !hidden && !exclude.iter().any(|x| e.path() == x)
    });
    for entry in walker {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                let path = err
                    .path()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| root.to_path_buf());
                let rel = rel_path(root, &path);
                let link_loop =
                    err.io_error().and_then(std::io::Error::raw_os_error) == Some(libc::ELOOP);
                let reason = if err.loop_ancestor().is_some() || link_loop {
                    "symbolic link loop".to_string()
                } else if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink())
                    && std::fs::metadata(&path).is_err()
                {
                    "broken symbolic link".to_string()
                } else {
                    match err.io_error() {
                        Some(io) => format!("cannot read: {}", io_reason(io)),
                        None => err.to_string(),
                    }
                };
                // Report what could have been a photo, or a folder of them.
                if is_image(&path) || err.loop_ancestor().is_some() || path.extension().is_none() {
                    scan.problems.push(ScanProblem { rel, reason });
                }
                continue;
            }
        };
        let path = entry.path();
        if !entry.file_type().is_file() {
            // Something named like a photo that is not a file: say so, and
            // never open it (a FIFO would block its reader forever).
            if entry.depth() > 0 && is_image(path) {
                let reason = match entry.file_type() {
                    k if k.is_dir() => {
                        "a folder named like an image (its contents are indexed)".to_string()
                    }
                    k => format!("not a regular file ({})", super::decode::kind_name(k)),
                };
                let rel = rel_path(root, path);
                scan.problems.push(ScanProblem { rel, reason });
            }
            continue;
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        let is_txt = ext.as_deref() == Some("txt");
        if !is_image(path) && !is_txt {
            continue;
        }
        let rel = rel_path(root, path);
        let meta = match entry.metadata() {
            Ok(m) => m,
            Err(e) => {
                if !is_txt {
                    let reason = e.io_error().map(io_reason).unwrap_or_else(|| e.to_string());
                    scan.problems.push(ScanProblem {
                        rel,
                        reason: format!("cannot read: {reason}"),
                    });
                }
                continue;
            }
        };
        if is_txt {
            sidecars.insert(rel, (path.to_path_buf(), file_sig(&meta)));
        } else {
            scan.files.push(ScannedFile {
                rel,
                abs: path.to_path_buf(),
                sig: file_sig(&meta),
                sidecar: None,
            });
        }
    }
    for file in &mut scan.files {
        let stem = file
            .rel
            .rsplit_once('.')
            .map_or(file.rel.as_str(), |(s, _)| s);
        file.sidecar = sidecars
            .get(&format!("{}.txt", file.rel))
            .or_else(|| sidecars.get(&format!("{stem}.txt")))
            .cloned();
    }
    scan
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        std::io::ErrorKind::NotFound => "not found".into(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_images_sidecars_and_problems() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(root.join(".hidden")).unwrap();
        std::fs::write(root.join("a/b/one.JPG"), b"x").unwrap();
        std::fs::write(root.join("a/b/one.txt"), b"caption").unwrap();
        std::fs::write(root.join("two.png"), b"x").unwrap();
        std::fs::write(root.join("two.png.txt"), b"caption").unwrap();
        std::fs::write(root.join("notes.md"), b"x").unwrap();
        std::fs::write(root.join(".hidden/three.jpg"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("missing.jpg"), root.join("broken.jpg")).unwrap();
        std::os::unix::fs::symlink(root, root.join("a/loop")).unwrap();
        std::os::unix::fs::symlink(root.join("cycle2.jpg"), root.join("cycle1.jpg")).unwrap();
        std::os::unix::fs::symlink(root.join("cycle1.jpg"), root.join("cycle2.jpg")).unwrap();
        std::fs::create_dir_all(root.join("album.jpg")).unwrap();
        std::fs::write(root.join("album.jpg/inside.png"), b"x").unwrap();
        let fifo = std::ffi::CString::new(root.join("pipe.jpg").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let scan = scan(root, &[]);
        let rels: Vec<&str> = scan.files.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(rels, vec!["a/b/one.JPG", "album.jpg/inside.png", "two.png"]);
        assert!(
            scan.files
                .iter()
                .all(|f| f.sidecar.is_some() == !f.rel.starts_with("album.jpg/"))
        );
        let reasons: Vec<(&str, &str)> = scan
            .problems
            .iter()
            .map(|p| (p.rel.as_str(), p.reason.as_str()))
            .collect();
        assert!(
            reasons.contains(&("broken.jpg", "broken symbolic link")),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&("a/loop", "symbolic link loop")),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&("cycle1.jpg", "symbolic link loop")),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&("cycle2.jpg", "symbolic link loop")),
            "{reasons:?}"
        );
        assert!(
            reasons.contains(&("pipe.jpg", "not a regular file (a FIFO)")),
            "{reasons:?}"
        );
        assert!(
            reasons
                .iter()
                .any(|(p, r)| *p == "album.jpg" && r.starts_with("a folder")),
            "{reasons:?}"
        );
    }
}
