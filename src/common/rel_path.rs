//! A file's path inside the library as the index keeps it: a `String`,
//! `/`-separated, that holds any file name, UTF-8 or not.
//!
//! Disks from older cameras and Windows machines carry names in Latin-1 or
//! Shift-JIS, which are not UTF-8. Each byte that is not part of valid
//! UTF-8 is kept as one character of the last private-use block,
//! U+10FF00 + byte, and so are the bytes of any such character a name
//! really holds, so every name comes back byte for byte
//! ([`to_path`]). Names that are valid UTF-8, nearly all of them, are
//! kept as they are. [`display`] shows the kept bytes as U+FFFD, the
//! replacement character.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// The first of the 256 characters that stand for single bytes.
const BYTE_BASE: u32 = 0x10_FF00;

fn is_byte_char(c: char) -> bool {
    (c as u32) >= BYTE_BASE
}

fn push_byte(out: &mut String, b: u8) {
    out.push(char::from_u32(BYTE_BASE + u32::from(b)).expect("a valid scalar value"));
}

/// One name (a path component) as the index keeps it.
fn encode_name(name: &OsStr, out: &mut String) {
    let mut bytes = name.as_bytes();
    while !bytes.is_empty() {
        let (valid, rest) = match std::str::from_utf8(bytes) {
            Ok(all) => (all, &[][..]),
            Err(e) => {
                let (good, bad) = bytes.split_at(e.valid_up_to());
                // The good part is valid by construction.
                (std::str::from_utf8(good).unwrap_or_default(), bad)
            }
        };
        for c in valid.chars() {
            if is_byte_char(c) {
                let mut buf = [0u8; 4];
                c.encode_utf8(&mut buf)
                    .bytes()
                    .for_each(|b| push_byte(out, b));
            } else {
                out.push(c);
            }
        }
        // One invalid byte, then go on after it.
        if let Some((&b, after)) = rest.split_first() {
            push_byte(out, b);
            bytes = after;
        } else {
            bytes = rest;
        }
    }
}

/// `rel` (relative to the library) as the index keeps it: its names joined
/// with `/`.
pub fn encode(rel: &Path) -> String {
    let mut out = String::new();
    for c in rel.components() {
        if let Component::Normal(name) = c {
            if !out.is_empty() {
                out.push('/');
            }
            encode_name(name, &mut out);
        }
    }
    out
}

/// The path a kept string stands for, relative to the library, byte for byte.
pub fn to_path(kept: &str) -> PathBuf {
    if !kept.chars().any(is_byte_char) {
        return PathBuf::from(kept);
    }
    let mut bytes = Vec::with_capacity(kept.len());
    for c in kept.chars() {
        if is_byte_char(c) {
            bytes.push((c as u32 - BYTE_BASE) as u8);
        } else {
            let mut buf = [0u8; 4];
            bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(bytes))
}

/// A kept path for people: each byte that was not UTF-8 shows as U+FFFD.
pub fn display(kept: &str) -> Cow<'_, str> {
    if !kept.chars().any(is_byte_char) {
        return Cow::Borrowed(kept);
    }
    // The bytes of a real character of the private-use block come back as
    // that character; only the others are replaced.
    Cow::Owned(to_path(kept).to_string_lossy().into_owned())
}

/// The folder and the file name of a path (the folder `""` at the root).
pub fn split_folder(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

/// The folder of a path and every folder above it, shallowest first
/// (`a`, `a/b` for `a/b/c.jpg`; none at the root).
pub fn folders(path: &str) -> Vec<&str> {
    let (folder, _) = split_folder(path);
    if folder.is_empty() {
        return Vec::new();
    }
    folder
        .match_indices('/')
        .map(|(at, _)| &folder[..at])
        .chain(std::iter::once(folder))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_are_named_from_the_top() {
        assert_eq!(split_folder("a/b/c.jpg"), ("a/b", "c.jpg"));
        assert_eq!(split_folder("c.jpg"), ("", "c.jpg"));
        assert_eq!(folders("a/b/c.jpg"), ["a", "a/b"]);
        assert_eq!(folders("a/c.jpg"), ["a"]);
        assert!(folders("c.jpg").is_empty());
    }

    #[test]
    fn every_name_comes_back_byte_for_byte() {
        let names: [&[u8]; 7] = [
            b"holidays/IMG_2041.jpg",
            b"caf\xe9/cr\xe8me.jpg",
            b"\x82\xa0\x82\xa2.jpg",
            "caf\u{e9}/\u{65e5}\u{672c}.jpg".as_bytes(),
            // A real character of the block the kept bytes use.
            "odd\u{10FF41}name.jpg".as_bytes(),
            b"\xff\xfe\xfd",
            b"a\xe2\x82.jpg",
        ];
        for name in names {
            let path = Path::new(OsStr::from_bytes(name));
            let kept = encode(path);
            assert_eq!(to_path(&kept).as_os_str().as_bytes(), name, "{kept:?}");
        }
        assert_eq!(encode(Path::new("a/b.jpg")), "a/b.jpg");
        assert_eq!(
            display(&encode(Path::new(OsStr::from_bytes(b"caf\xe9.jpg")))),
            "caf\u{fffd}.jpg"
        );
        let real = encode(Path::new("odd\u{10FF41}name.jpg"));
        assert_eq!(display(&real), "odd\u{10FF41}name.jpg");
        assert_ne!(
            encode(Path::new(OsStr::from_bytes(b"caf\xe9.jpg"))),
            encode(Path::new(OsStr::from_bytes(b"caf\xe8.jpg"))),
            "two names that show alike are kept apart"
        );
    }
}
