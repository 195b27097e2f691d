//! `clipdex index`, `reindex` and `status` as a user runs them, on a temporary
//! library of shared photos plus every kind of bad file.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use clipdex::indexer::{self, Index};
use clipdex::store::PhotoRecord;

use crate::common::{clipdex, copy_photos, fixture_model, fixtures, shared_photos, stderr, stdout};

/// Files of the test library that must be skipped, with words of their reason.
const BAD: &[(&str, &str)] = &[
    ("bad/empty.jpg", "empty file"),
    ("bad/truncated.jpg", "ends early"),
    ("bad/text.jpg", "not an image"),
    ("bad/bomb.png", "exceeds the limit"),
    ("bad/broken-link.jpg", "broken symbolic link"),
    ("bad/loop", "symbolic link loop"),
    ("bad/strip.png", "aspect ratio over 100:1"),
    ("bad/huge.jpg", "exceeds the limit of 1073741824 bytes"),
    ("bad/pipe.jpg", "not a regular file (a FIFO)"),
    ("bad/album.jpg", "a folder named like an image"),
    ("bad/cycle1.jpg", "symbolic link loop"),
    ("bad/cycle2.jpg", "symbolic link loop"),
];

struct Library {
    _dir: tempfile::TempDir,
    root: PathBuf,
    index: PathBuf,
    /// Images that index cleanly.
    good: usize,
}

fn model() -> String {
    fixture_model("openai-tiny").display().to_string()
}

/// A PNG that claims to be 30,000 x 30,000 pixels (900 megapixels).
fn bomb_png() -> Vec<u8> {
    let mut png = Vec::new();
    image::RgbImage::new(8, 8)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    // IHDR data starts at byte 16: width, height (big-endian), then its CRC at 29.
    png[16..20].copy_from_slice(&30_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&30_000u32.to_be_bytes());
    let mut crc = flate2::Crc::new();
    crc.update(&png[12..29]);
    png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
    png
}

fn library(with_bad_files: bool) -> Library {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    let photos = shared_photos();
    let mut good = 0;
    good += copy_photos(
        &photos.join("gcompris/fishes"),
        &root.join("sea/fishes"),
        12,
    )
    .len();
    good += copy_photos(
        &photos.join("gcompris/monuments"),
        &root.join("travel/monuments"),
        12,
    )
    .len();
    good += copy_photos(&photos.join("gcompris/tools"), &root.join("tools"), 8).len();
    std::fs::create_dir_all(root.join("wallpapers")).unwrap();
    for w in [
        "debian_mate-backgrounds_nature/LadyBird.jpg",
        "pypi_scikit-image/camera.jpg",
    ] {
        let src = photos.join("wallpapers").join(w);
        std::fs::copy(&src, root.join("wallpapers").join(src.file_name().unwrap())).unwrap();
        good += 1;
    }
    for f in [
        "alpha.png",
        "palette.gif",
        "photo.webp",
        "orientation6.jpg",
        "cmyk.jpg",
    ] {
        std::fs::create_dir_all(root.join("formats")).unwrap();
        std::fs::copy(
            fixtures().join("images").join(f),
            root.join("formats").join(f),
        )
        .unwrap();
        good += 1;
    }
    std::fs::write(
        root.join("sea/fishes/fish1.txt"),
        "a striped fish near the reef",
    )
    .unwrap();
    if with_bad_files {
        let bad = root.join("bad");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join("empty.jpg"), b"").unwrap();
        let jpg = std::fs::read(fixtures().join("images/photo.jpg")).unwrap();
        std::fs::write(bad.join("truncated.jpg"), &jpg[..jpg.len() / 2]).unwrap();
        std::fs::write(bad.join("text.jpg"), b"hello, I am a text file\n").unwrap();
        std::fs::write(bad.join("bomb.png"), bomb_png()).unwrap();
        std::os::unix::fs::symlink(bad.join("nowhere.jpg"), bad.join("broken-link.jpg")).unwrap();
        std::os::unix::fs::symlink(&root, bad.join("loop")).unwrap();
        // A Latin-1 name, not UTF-8: indexed like any other.
        let name = std::ffi::OsStr::from_bytes(b"caf\xe9.jpg");
        std::fs::copy(fixtures().join("images/photo.png"), bad.join(name)).unwrap();
        good += 1;
        // 1 x 300,000 pixels in a few KB: resizing its short side to the
        // model's input would take gigabytes.
        std::fs::write(bad.join("strip.png"), crate::common::flat_png(1, 300_000)).unwrap();
        // 2 GiB, sparse: refused before a byte is read.
        std::fs::File::create(bad.join("huge.jpg"))
            .unwrap()
            .set_len(2 << 30)
            .unwrap();
        crate::common::mkfifo(&bad.join("pipe.jpg"));
        std::fs::create_dir_all(bad.join("album.jpg")).unwrap();
        std::os::unix::fs::symlink(bad.join("cycle2.jpg"), bad.join("cycle1.jpg")).unwrap();
        std::os::unix::fs::symlink(bad.join("cycle1.jpg"), bad.join("cycle2.jpg")).unwrap();
        // A date with a non-ASCII byte where a digit belongs (once a panic
        // that stopped every run): indexed, without a date.
        std::fs::write(
            bad.join("exif-date.jpg"),
            crate::common::jpeg_with_exif_date("2019:07:1\u{e9} 12:30:05".as_bytes()),
        )
        .unwrap();
        good += 1;
        // A 2 GiB sparse caption sidecar: only its start is read.
        std::fs::File::create(bad.join("exif-date.txt"))
            .unwrap()
            .set_len(2 << 30)
            .unwrap();
        // Not images at all: ignored, not reported.
        std::fs::write(bad.join("notes.md"), b"# notes").unwrap();
    }
    let index = dir.path().join("index");
    Library {
        root,
        index,
        good,
        _dir: dir,
    }
}

fn index_cmd(lib: &Library, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "index",
        lib.root.to_str().unwrap(),
        "--index",
        lib.index.to_str().unwrap(),
    ];
    let m = model();
    args.extend(["--model", m.as_str(), "--json"]);
    args.extend(extra);
    clipdex(&args)
}

fn reindex(lib: &Library) -> serde_json::Value {
    let out = clipdex(&["reindex", "--index", lib.index.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "reindex failed: {}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).unwrap()
}

fn status(lib: &Library) -> serde_json::Value {
    let out = clipdex(&[
        "status",
        "--index",
        lib.index.to_str().unwrap(),
        "--json",
        "--check",
    ]);
    assert!(
        out.status.success(),
        "status failed: {}\n{}",
        stderr(&out),
        stdout(&out)
    );
    serde_json::from_str(&stdout(&out)).unwrap()
}

fn records(lib: &Library) -> Vec<PhotoRecord> {
    let index = crate::common::open_index(&lib.index);
    index
        .store()
        .records()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn by_path<'a>(records: &'a [PhotoRecord], path: &str) -> &'a PhotoRecord {
    records
        .iter()
        .find(|r| r.path == path)
        .unwrap_or_else(|| panic!("no record for {path}"))
}

fn counts(run: &serde_json::Value) -> [u64; 8] {
    let n = |k: &str| {
        run[k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {run}"))
    };
    [
        n("added"),
        n("replaced"),
        n("moved"),
        n("duplicates"),
        n("updated"),
        n("removed"),
        n("skipped"),
        n("unchanged"),
    ]
}

fn assert_consistent(lib: &Library, photos: usize) {
    let s = status(lib);
    let check = &s["check"];
    assert_eq!(check["consistent"], true, "{check}");
    assert_eq!(
        check["records"].as_u64().unwrap() as usize,
        photos,
        "{check}"
    );
    assert_eq!(check["vectors"], check["records"]);
    assert_eq!(check["keywords"], check["records"]);
}

#[test]
fn index_skips_bad_files_with_reasons_and_keeps_metadata() {
    let lib = library(true);
    // The same photo twice in the first run: embedded once, listed twice.
    std::fs::create_dir_all(lib.root.join("copies")).unwrap();
    std::fs::copy(
        lib.root.join("wallpapers/LadyBird.jpg"),
        lib.root.join("copies/LadyBird.jpg"),
    )
    .unwrap();
    let out = index_cmd(&lib, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let run: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(run["added"].as_u64().unwrap() as usize, lib.good);
    assert_eq!(run["duplicates"], 1);
    assert_eq!(run["skipped"].as_u64().unwrap() as usize, BAD.len());
    let photos = lib.good + 1;
    assert_consistent(&lib, photos);

    let s = status(&lib);
    let skipped: Vec<(String, String)> = s["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["path"].as_str().unwrap().to_string(),
                k["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (path, why) in BAD {
        let found = skipped.iter().find(|(p, _)| p == path);
        let (_, reason) = found.unwrap_or_else(|| panic!("{path} not reported in {skipped:?}"));
        assert!(
            reason.contains(why),
            "{path}: {reason:?} should mention {why:?}"
        );
    }
    assert_eq!(
        s["library"].as_str().unwrap(),
        std::fs::canonicalize(&lib.root).unwrap().to_str().unwrap()
    );
    // 16 hex digits, then the precision unless exact.
    let fingerprint = s["model"]["fingerprint"].as_str().unwrap();
    let (hash, precision) = fingerprint
        .split_once('/')
        .unwrap_or((fingerprint, "exact"));
    assert!(hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(precision, s["model"]["precision"]);
    assert_eq!(precision, clipdex::model::default_precision().name());
    assert!(s["size_on_disk"]["thumbnails"].as_u64().unwrap() > 0);

    let recs = records(&lib);
    // The name that is not UTF-8 is kept byte for byte and shown with U+FFFD.
    let cafe = recs
        .iter()
        .find(|r| clipdex::common::rel_path::display(&r.path) == "bad/caf\u{fffd}.jpg")
        .expect("the Latin-1 name is indexed");
    assert_eq!(
        lib.root
            .join(clipdex::common::rel_path::to_path(&cafe.path)),
        lib.root
            .join(std::ffi::OsStr::from_bytes(b"bad/caf\xe9.jpg"))
    );
    let fish = by_path(&recs, "sea/fishes/fish1.jpg");
    assert_eq!(
        fish.caption.as_deref(),
        Some("a striped fish near the reef")
    );
    let dated = by_path(&recs, "bad/exif-date.jpg");
    assert_eq!(
        (dated.taken.as_deref(), dated.caption.as_deref()),
        (None, None)
    );
    let turned = by_path(&recs, "formats/orientation6.jpg");
    assert_eq!(
        (turned.width, turned.height, turned.orientation),
        (150, 100, 6)
    );
    let ladybird = by_path(&recs, "wallpapers/LadyBird.jpg");
    assert_eq!(
        (ladybird.width, ladybird.height, ladybird.format.as_str()),
        (2560, 1600, "jpeg")
    );
    // Thumbnails exist for every photo and fit 256 px.
    let index = crate::common::open_index(&lib.index);
    for r in &recs {
        let thumb = image::open(index.thumbnail_path(r)).unwrap();
        assert!(thumb.width().max(thumb.height()) <= 256, "{}", r.path);
    }
    // Find-similar on every stored vector: itself first, no panic.
    for r in &recs {
        let v = index.store().vector(r.id).unwrap().unwrap();
        let hits = index.vectors().nearest(&v, 5).unwrap();
        assert!(hits[0].1 > 0.999, "{}: {hits:?}", r.path);
        assert!(hits.iter().any(|(id, _)| *id == r.id));
    }
    drop(index);

    // Nothing changed: nothing embedded, bad files not retried.
    let again = reindex(&lib);
    assert_eq!(
        counts(&again),
        [0, 0, 0, 0, 0, 0, BAD.len() as u64, photos as u64]
    );
}

#[test]
fn reindex_finds_exactly_what_changed() {
    let lib = library(false);
    assert!(index_cmd(&lib, &[]).status.success());
    let before = records(&lib);
    let photos = shared_photos();
    let root = &lib.root;

    // New file.
    std::fs::copy(
        photos
            .join("gcompris/others")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
        root.join("new.jpg"),
    )
    .unwrap();
    // Content changed at the same path.
    std::fs::copy(
        photos.join("wallpapers/pypi_scikit-image/coffee.jpg"),
        root.join("tools").join(&before_name(&before, "tools/")),
    )
    .unwrap();
    // Deleted.
    let deleted = before_name_full(&before, "travel/monuments/");
    std::fs::remove_file(root.join(&deleted)).unwrap();
    // Renamed into another folder.
    let renamed = before_name_full(&before, "sea/fishes/fish2");
    std::fs::create_dir_all(root.join("archive")).unwrap();
    std::fs::rename(root.join(&renamed), root.join("archive/renamed.jpg")).unwrap();
    // Duplicate: the same content at a second path.
    std::fs::copy(
        root.join("wallpapers/camera.jpg"),
        root.join("wallpapers/camera-copy.jpg"),
    )
    .unwrap();
    // Caption edited; another file only touched.
    std::fs::write(root.join("sea/fishes/fish1.txt"), "an orange fish").unwrap();
    let touched = root.join("formats/photo.webp");
    let f = std::fs::File::options()
        .append(true)
        .open(&touched)
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(f);

    let run = reindex(&lib);
    // added, replaced, moved, duplicates, updated, removed, skipped, unchanged
    let unchanged = lib.good as u64 - 1 /*replaced*/ - 1 /*deleted*/ - 1 /*renamed*/ - 2 /*caption, touch*/;
    assert_eq!(counts(&run), [1, 1, 1, 1, 2, 1, 0, unchanged]);
    assert_eq!(run["embedded"], 2);

    let after = records(&lib);
    assert_eq!(
        after.len(),
        lib.good + 1 /*new*/ + 1 /*duplicate*/ - 1 /*deleted*/
    );
    // The renamed photo kept its id; the changed one got a new id.
    let old = by_path(&before, &renamed);
    let moved = by_path(&after, "archive/renamed.jpg");
    assert_eq!((moved.id, &moved.hash), (old.id, &old.hash));
    let changed_path = format!("tools/{}", before_name(&before, "tools/"));
    assert_ne!(
        by_path(&after, &changed_path).id,
        by_path(&before, &changed_path).id
    );
    assert!(after.iter().all(|r| r.path != deleted));
    let (a, b) = (
        by_path(&after, "wallpapers/camera.jpg"),
        by_path(&after, "wallpapers/camera-copy.jpg"),
    );
    assert_eq!(a.hash, b.hash);
    assert_ne!(a.id, b.id);
    assert_eq!(
        by_path(&after, "sea/fishes/fish1.jpg").caption.as_deref(),
        Some("an orange fish")
    );
    // Removed and replaced ids are gone from every part of the index.
    let index = crate::common::open_index(&lib.index);
    let ids: BTreeSet<u64> = after.iter().map(|r| r.id).collect();
    assert_eq!(index.vectors().ids().unwrap(), ids);
    assert_eq!(index.keywords().ids().unwrap(), ids);
    let gone = by_path(&before, &changed_path).id;
    let v = by_path(&after, &changed_path);
    let hits = index
        .vectors()
        .nearest(&index.store().vector(v.id).unwrap().unwrap(), 50)
        .unwrap();
    assert!(hits.iter().all(|(id, _)| *id != gone));
    drop(index);

    let quiet = reindex(&lib);
    assert_eq!(quiet["embedded"], 0);
    assert_eq!(quiet["unchanged"].as_u64().unwrap() as usize, after.len());
    assert_consistent(&lib, after.len());
    quick_status_agrees(&lib.index);
    assert!(lib.index.join("db.summary.json").is_file());
}

/// `clipdex status` without `--check`, which reads the store's summary
/// where one is kept, says what the store does (`--check` reads the store).
/// Run first, it reads whatever the last process left.
pub(crate) fn quick_status_agrees(index: &Path) -> serde_json::Value {
    let out = clipdex(&["status", "--index", index.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "status failed: {}", stderr(&out));
    let quick: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let full = status_of(index);
    // (`vectors` and `keywords` are read from those indexes as saved, which
    // `--check` first brings up to date with the store.)
    for key in [
        "photos",
        "last_run",
        "skipped",
        "model",
        "format_version",
        "library",
    ] {
        assert_eq!(quick[key], full[key], "{key}: {quick} against {full}");
    }
    full
}

fn before_name(records: &[PhotoRecord], prefix: &str) -> String {
    before_name_full(records, prefix)
        .rsplit('/')
        .next()
        .unwrap()
        .to_string()
}

fn before_name_full(records: &[PhotoRecord], prefix: &str) -> String {
    let mut paths: Vec<&str> = records
        .iter()
        .map(|r| r.path.as_str())
        .filter(|p| p.starts_with(prefix))
        .collect();
    paths.sort();
    paths[0].to_string()
}

/// The Tux Paint pictures in `../shared/datasets/tuxpaint` (643 small PNGs).
fn tuxpaint_images() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/tuxpaint");
    let pairs = std::fs::read_to_string(root.join("pairs.jsonl"))
        .expect("../shared/datasets/tuxpaint/pairs.jsonl");
    let mut images: Vec<PathBuf> = pairs
        .lines()
        .map(|l| {
            root.join(
                serde_json::from_str::<serde_json::Value>(l).unwrap()["image"]
                    .as_str()
                    .unwrap(),
            )
        })
        .collect();
    images.sort();
    images.dedup();
    images
}

/// The progress file of a run, when `pid` wrote it.
/// Kills (SIGKILL) an indexing run once its progress file shows `target`
/// files done with files still to do; whether it was killed (not finished).
pub(crate) fn kill_mid_run(mut child: std::process::Child, index: &Path, target: u64) -> bool {
    let killed = loop {
        if child.try_wait().unwrap().is_some() {
            break false;
        }
        let mid_run = progress_of(index, child.id()).is_some_and(|p| {
            p["phase"] == "indexing"
                && p["processed"].as_u64().unwrap_or(0)
                    >= target.min(p["to_process"].as_u64().unwrap_or(0).saturating_sub(1))
                && p["processed"].as_u64() < p["to_process"].as_u64()
        });
        if mid_run {
            child.kill().unwrap();
            break true;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    child.wait().unwrap();
    killed
}

/// Every file under `root`, by its path relative to it.
pub(crate) fn library_files(root: &Path) -> BTreeSet<String> {
    let mut files = BTreeSet::new();
    for entry in walkdir::WalkDir::new(root) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            files.insert(
                entry
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_string(),
            );
        }
    }
    files
}

pub(crate) fn progress_of(index: &Path, pid: u32) -> Option<serde_json::Value> {
    let p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(index.join("progress.json")).ok()?).ok()?;
    (p["pid"].as_u64() == Some(pid as u64)).then_some(p)
}

/// The index holds exactly the library: the same paths, and for each the
/// size, time and content hash of the file there now; vectors and keywords
/// for exactly those photos.
pub(crate) fn assert_index_is_library(index: &Path, root: &Path) {
    let files = library_files(root);
    let index = crate::common::open_index(index);
    let recs: Vec<PhotoRecord> = index.store().records().collect::<Result<_, _>>().unwrap();
    let paths: BTreeSet<String> = recs.iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths.len(), recs.len(), "a path was indexed twice");
    assert_eq!(paths, files, "indexed paths differ from the library");
    for r in &recs {
        let path = root.join(&r.path);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            r.hash,
            clipdex::store::ContentHash::of(&bytes),
            "{}: content",
            r.path
        );
        assert_eq!(
            r.sig,
            clipdex::library::scan::file_sig(&std::fs::metadata(&path).unwrap()),
            "{}: size and time",
            r.path
        );
        assert!(
            index.store().vector(r.id).unwrap().is_some(),
            "{}: no vector",
            r.path
        );
    }
    let ids: BTreeSet<u64> = recs.iter().map(|r| r.id).collect();
    assert_eq!(index.vectors().ids().unwrap(), ids);
    assert_eq!(index.keywords().ids().unwrap(), ids);
}

#[test]
fn killed_runs_resume_and_end_consistent() {
    // A library that changes between runs (new, changed, renamed, deleted
    // files), indexed and re-indexed by processes killed at random points
    // of their work. Each kill is made to land mid-run: the test waits for
    // the run's own progress file to show a random number of files done,
    // with files still to do, and only then sends SIGKILL.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    let index = dir.path().join("index");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::create_dir_all(root.join("b")).unwrap();
    let mut pool = tuxpaint_images().into_iter();
    let mut next_name = 0;
    let mut add = |n: usize, root: &Path| {
        for src in pool.by_ref().take(n) {
            next_name += 1;
            std::fs::copy(
                &src,
                root.join(["a", "b"][next_name % 2])
                    .join(format!("p{next_name:04}.png")),
            )
            .unwrap();
        }
    };
    add(60, &root);
    let m = model();
    let mut rng = 0x5eed_u64;
    let mut random = |n: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % n
    };
    let mut kills = 0;
    let mut finished = 0;
    for round in 0..60 {
        if kills >= 24 {
            break;
        }
        if round > 0 {
            // Change the library: new files, changed contents, renames, deletions.
            add(14, &root);
            let mut present: Vec<PathBuf> = walkdir::WalkDir::new(&root)
                .into_iter()
                .map(|e| e.unwrap().into_path())
                .filter(|p| p.is_file())
                .collect();
            present.sort();
            for _ in 0..2 {
                let victim = present.remove(random(present.len() as u64) as usize);
                std::fs::remove_file(victim).unwrap();
            }
            for _ in 0..2 {
                let from = present.remove(random(present.len() as u64) as usize);
                let other = if from.starts_with(root.join("a")) {
                    "b"
                } else {
                    "a"
                };
                std::fs::rename(
                    &from,
                    root.join(other).join(format!(
                        "moved-{round}-{}",
                        from.file_name().unwrap().to_str().unwrap()
                    )),
                )
                .unwrap();
            }
            let changed = present.remove(random(present.len() as u64) as usize);
            let mut bytes = std::fs::read(&changed).unwrap();
            // A PNG with bytes after its end still decodes: new content, same picture.
            bytes.extend_from_slice(format!("round {round}").as_bytes());
            std::fs::write(&changed, bytes).unwrap();
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clipdex"));
        if round % 2 == 1 && index.join("db").exists() {
            cmd.args(["reindex", "--index", index.to_str().unwrap()]);
        } else {
            cmd.args([
                "index",
                root.to_str().unwrap(),
                "--index",
                index.to_str().unwrap(),
                "--model",
                &m,
            ]);
        }
        cmd.args(["--workers", "1", "--batch", "2", "--commit-every", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().unwrap();
        let killed = kill_mid_run(child, &index, 1 + random(10));
        if killed {
            kills += 1;
            // Whatever the moment of the kill, the index opens consistent,
            // and status without opening the store says as much.
            let s = quick_status_agrees(&index);
            assert_eq!(
                s["check"]["consistent"], true,
                "after kill {kills}: {}",
                s["check"]
            );
        } else {
            finished += 1;
        }
    }
    eprintln!("{kills} runs killed mid-way, {finished} finished");
    assert!(kills >= 20, "only {kills} runs were killed mid-way");
    let out = clipdex(&["reindex", "--index", index.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_index_is_library(&index, &root);
    // And a run with nothing to do changes nothing.
    let quiet: serde_json::Value = serde_json::from_str(
        stdout(&clipdex(&[
            "reindex",
            "--index",
            index.to_str().unwrap(),
            "--json",
        ]))
        .trim(),
    )
    .unwrap();
    assert_eq!(quiet["embedded"], 0);
    assert_eq!(quiet["removed"], 0);
    assert_index_is_library(&index, &root);
}

fn status_of(index: &Path) -> serde_json::Value {
    let out = clipdex(&[
        "status",
        "--index",
        index.to_str().unwrap(),
        "--json",
        "--check",
    ]);
    assert!(
        out.status.success(),
        "status failed: {}\n{}",
        stderr(&out),
        stdout(&out)
    );
    serde_json::from_str(&stdout(&out)).unwrap()
}

#[test]
fn a_panic_on_one_file_skips_that_file_and_the_run_goes_on() {
    // The per-file step is run in-process with a fail point that panics on
    // one file, standing for any parser bug met on a hostile file.
    let lib = library(false);
    let clip = clipdex::model::Clip::load(
        &clipdex::model::ModelSource::Dir(fixture_model("openai-tiny")),
        &clipdex::model::HubOptions {
            offline: true,
            progress: false,
        },
    )
    .unwrap();
    let index = Index::create_or_open(&lib.index, &lib.root, clip.info()).unwrap();
    let mut opts = clipdex::indexer::RunOptions::default();
    opts.fail_point = Some(|path: &str| {
        if path == "formats/cmyk.jpg" {
            panic!("injected failure on {path}");
        }
    });
    let stop = std::sync::atomic::AtomicBool::new(false);
    let summary = clipdex::indexer::run(&index, &clip, &opts, &mut |_| {}, &stop).unwrap();
    assert_eq!(summary.counts.skipped, 1, "{summary:?}");
    assert_eq!(summary.counts.added as usize, lib.good - 1);
    let skipped = index.store().skipped().unwrap();
    let (path, skip) = &skipped[0];
    assert_eq!(path, "formats/cmyk.jpg");
    assert!(
        skip.reason.contains("internal error") && skip.reason.contains("injected failure"),
        "{}",
        skip.reason
    );
    // Recorded as skipped: the next run does not retry the unchanged file.
    let again = clipdex::indexer::run(&index, &clip, &opts, &mut |_| {}, &stop).unwrap();
    assert_eq!(
        (
            again.counts.skipped,
            again.counts.added,
            again.counts.unchanged as usize
        ),
        (1, 0, lib.good - 1)
    );
}

#[test]
fn a_second_process_is_refused_while_the_index_is_open() {
    let lib = library(false);
    assert!(index_cmd(&lib, &[]).status.success());
    let held = crate::common::open_index(&lib.index);
    let out = clipdex(&["reindex", "--index", lib.index.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("in use by another clipdex process"),
        "{}",
        stderr(&out)
    );
    let out = index_cmd(&lib, &[]);
    assert!(
        !out.status.success() && stderr(&out).contains("in use"),
        "{}",
        stderr(&out)
    );
    // status reports the run in progress instead of failing.
    let out = clipdex(&["status", "--index", lib.index.to_str().unwrap()]);
    assert!(
        out.status.success() && stdout(&out).contains("in use"),
        "{}",
        stdout(&out)
    );
    drop(held);
    assert_consistent(&lib, lib.good);
}

#[test]
fn unreadable_files_are_skipped() {
    let lib = library(false);
    let secret = lib.root.join("secret.jpg");
    std::fs::copy(fixtures().join("images/photo.jpg"), &secret).unwrap();
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
    };
    mode(&secret, 0o000);
    let root_user = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout)
        .unwrap()
        .trim()
        == "0";
    let m = model();
    let args = [
        "index",
        lib.root.to_str().unwrap(),
        "--index",
        lib.index.to_str().unwrap(),
        "--model",
        m.as_str(),
        "--json",
    ];
    let out = if root_user {
        // Root reads everything: run as nobody, with the folders opened up to it.
        let top = lib.root.parent().unwrap();
        for entry in walkdir::WalkDir::new(top) {
            let e = entry.unwrap();
            if e.path() != secret {
                mode(e.path(), if e.file_type().is_dir() { 0o777 } else { 0o644 });
            }
        }
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_clipdex"),
            ])
            .args(args)
            .output()
            .unwrap()
    } else {
        clipdex(&args)
    };
    assert!(out.status.success(), "{}", stderr(&out));
    let run: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(run["skipped"], 1);
    assert_eq!(run["added"].as_u64().unwrap() as usize, lib.good);
    let index = crate::common::open_index(&lib.index);
    let skipped = index.store().skipped().unwrap();
    assert_eq!(skipped.len(), 1);
    assert!(
        skipped[0].1.reason.contains("permission denied"),
        "{:?}",
        skipped[0]
    );
}

#[test]
fn opens_an_index_of_the_previous_format() {
    let lib = library(false);
    assert!(index_cmd(&lib, &[]).status.success());
    // Turn it into a format-1 index: no content-hash lookup, version 1.
    {
        let index = crate::common::open_index(&lib.index);
        let tree = index.store().raw_tree();
        let keys: Vec<_> = tree.scan_prefix(b"h:").keys().map(|k| k.unwrap()).collect();
        assert!(!keys.is_empty());
        for k in keys {
            tree.remove(k).unwrap();
        }
        // Nor the record count of format 3.
        tree.remove(clipdex::store::COUNT_KEY).unwrap().unwrap();
        let mut meta = index.store().meta().unwrap();
        meta.format_version = 1;
        index.store().set_meta(&meta).unwrap();
    }
    // A rename needs the hash lookup that migration 2 rebuilds.
    let before = records(&lib);
    let old = by_path(&before, "wallpapers/camera.jpg").clone();
    std::fs::rename(
        lib.root.join("wallpapers/camera.jpg"),
        lib.root.join("wallpapers/cameraman.jpg"),
    )
    .unwrap();
    let run = reindex(&lib);
    assert_eq!(run["moved"], 1, "{run}");
    assert_eq!(run["embedded"], 0, "{run}");
    let s = status(&lib);
    assert_eq!(s["format_version"], 3);
    // Migration 3 counted the records, and commits kept the count.
    assert_eq!(s["photos"].as_u64().unwrap() as usize, records(&lib).len());
    assert_eq!(s["photos"], s["check"]["records"]);
    assert_eq!(
        by_path(&records(&lib), "wallpapers/cameraman.jpg").id,
        old.id
    );
}

#[test]
fn newer_formats_and_other_models_are_refused() {
    let lib = library(false);
    assert!(index_cmd(&lib, &[]).status.success());
    // Continued without --model, an index keeps its own (no download of
    // the default model).
    let out = clipdex(&[
        "index",
        lib.root.to_str().unwrap(),
        "--index",
        lib.index.to_str().unwrap(),
        "--offline",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let laion = fixture_model("laion-tiny").display().to_string();
    let out = clipdex(&[
        "index",
        lib.root.to_str().unwrap(),
        "--index",
        lib.index.to_str().unwrap(),
        "--model",
        &laion,
    ]);
    let err = stderr(&out);
    assert!(
        !out.status.success()
            && err.contains("was built with model")
            && err.contains("another space"),
        "{err}"
    );

    let other = tempfile::tempdir().unwrap();
    let out = clipdex(&[
        "index",
        other.path().to_str().unwrap(),
        "--index",
        lib.index.to_str().unwrap(),
        "--model",
        &model(),
    ]);
    assert!(
        !out.status.success() && stderr(&out).contains("belongs to the library"),
        "{}",
        stderr(&out)
    );

    {
        let index = crate::common::open_index(&lib.index);
        let mut meta = index.store().meta().unwrap();
        meta.format_version = 99;
        index.store().set_meta(&meta).unwrap();
    }
    let out = clipdex(&["status", "--index", lib.index.to_str().unwrap()]);
    assert!(
        !out.status.success() && stderr(&out).contains("newer than this clipdex"),
        "{}",
        stderr(&out)
    );

    let out = clipdex(&["reindex", "--index", "/no/such/index"]);
    assert!(
        !out.status.success() && stderr(&out).contains("no index at"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_torn_vector_graph_is_rebuilt_from_the_store() {
    let lib = library(false);
    assert!(index_cmd(&lib, &[]).status.success());
    let vectors = lib.index.join("vectors");
    let current = std::fs::read_to_string(vectors.join("CURRENT")).unwrap();
    let data = vectors.join(current.trim()).join("clipdex.hnsw.data");
    let bytes = std::fs::read(&data).unwrap();
    let mut f = std::fs::File::create(&data).unwrap();
    f.write_all(&bytes[..bytes.len() / 3]).unwrap();
    drop(f);
    assert_consistent(&lib, lib.good);
    // And a missing CURRENT.
    std::fs::remove_file(vectors.join("CURRENT")).unwrap();
    assert_consistent(&lib, lib.good);
}

fn switch(lib: &Library, model: &str) -> std::process::Output {
    clipdex(&[
        "reindex",
        "--index",
        lib.index.to_str().unwrap(),
        "--model",
        model,
        "--json",
    ])
}

fn family(lib: &Library) -> String {
    status(lib)["model"]["family"].as_str().unwrap().to_string()
}

/// Searching works on the index at this moment, whatever its generation.
fn searchable(lib: &Library) -> bool {
    let out = clipdex(&[
        "search",
        "a fish",
        "--index",
        lib.index.to_str().unwrap(),
        "--json",
        "-k",
        "3",
    ]);
    out.status.success() && stdout(&out).lines().count() == 3
}

/// `clipdex search --all`: every photo once, best first, as JSON lines; a
/// filter narrows it; a reader that stops early ends it quietly.
#[test]
fn search_all_streams_every_result() {
    let lib = library(false);
    assert!(index_cmd(&lib, &[]).status.success());
    let idx = lib.index.to_str().unwrap();
    let photos = status(&lib)["photos"].as_u64().unwrap() as usize;
    let lines = |out: &std::process::Output| -> Vec<serde_json::Value> {
        assert!(out.status.success(), "{}", stderr(out));
        stdout(out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let all = lines(&clipdex(&["search", "a fish", "--index", idx, "--all"]));
    assert_eq!(all.len(), photos);
    let ids: BTreeSet<u64> = all.iter().map(|h| h["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), photos, "each photo once");
    let scores: Vec<f64> = all.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "best first");
    // The first page is the start of it.
    let top = lines(&clipdex(&[
        "search", "a fish", "--index", idx, "--json", "-k", "5",
    ]));
    assert_eq!(top[..], all[..5]);
    // A filter narrows it to that folder, all of it.
    let tools = lines(&clipdex(&[
        "search", "a fish", "--index", idx, "--all", "--folder", "tools",
    ]));
    assert!(!tools.is_empty() && tools.len() < photos);
    assert!(
        tools
            .iter()
            .all(|h| h["path"].as_str().unwrap().starts_with("tools/"))
    );
    // -k and --all contradict each other.
    let out = clipdex(&["search", "a fish", "--index", idx, "--all", "-k", "3"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
    // `| head -1`: the reader goes away after one line; the command ends
    // as `status` does then (hardening::a_closed_pipe_ends_the_cli_quietly).
    let mut child = Command::new(env!("CARGO_BIN_EXE_clipdex"))
        .args(["search", "a fish", "--index", idx, "--all"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.contains("\"id\""), "{first}");
    let out = child.wait_with_output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?} {}",
        out.status,
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn switching_the_model_re_embeds_every_photo_into_a_new_generation() {
    let lib = library(true);
    assert!(index_cmd(&lib, &[]).status.success());
    let before = status(&lib);
    assert_eq!(family(&lib), "clip");
    let siglip = fixture_model("siglip-tiny");
    let out = switch(&lib, siglip.to_str().unwrap());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("now uses"), "{}", stderr(&out));
    let after = status(&lib);
    assert_eq!(after["model"]["family"], "siglip", "{after}");
    assert_eq!(
        after["photos"].as_u64().unwrap(),
        before["photos"].as_u64().unwrap(),
        "every photo is in the new generation"
    );
    assert_consistent(&lib, lib.good);
    assert!(
        !indexer::generation::next_path(&lib.index).exists(),
        "the old generation is gone"
    );
    // Its results carry SigLIP's probability; the skipped files are skipped again.
    let out = clipdex(&[
        "search",
        "a fish",
        "--index",
        lib.index.to_str().unwrap(),
        "--json",
        "-k",
        "3",
    ]);
    assert!(
        stdout(&out).lines().all(|l| l.contains("\"probability\"")),
        "{}",
        stdout(&out)
    );
    let skipped = |s: &serde_json::Value| s["skipped"].as_array().unwrap().len();
    assert!(skipped(&before) > 0);
    assert_eq!(skipped(&after), skipped(&before));
    // Switching to the model it already uses is a plain re-index.
    let out = switch(&lib, siglip.to_str().unwrap());
    assert!(
        out.status.success() && stderr(&out).contains("already uses"),
        "{}",
        stderr(&out)
    );
    // And back.
    assert!(switch(&lib, &model()).status.success());
    assert_eq!(family(&lib), "clip");
}

#[test]
fn a_killed_switch_leaves_a_searchable_index_and_resumes() {
    let lib = library(false);
    assert!(index_cmd(&lib, &[]).status.success());
    let siglip = fixture_model("siglip-tiny");
    let args = [
        "reindex",
        "--index",
        lib.index.to_str().unwrap(),
        "--model",
        siglip.to_str().unwrap(),
        "--batch",
        "2",
        "--workers",
        "1",
    ];
    for delay in [300, 700, 1200] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_clipdex"))
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay));
        let _ = child.kill();
        child.wait().unwrap();
        // Whatever the moment of the kill, the index answers (old or new).
        assert!(
            searchable(&lib),
            "not searchable after a kill at {delay} ms"
        );
    }
    let out = clipdex(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(family(&lib), "siglip");
    assert_consistent(&lib, lib.good);
    assert!(!indexer::generation::next_path(&lib.index).exists());
}

#[test]
fn a_served_index_answers_while_its_next_generation_is_built() {
    let lib = library(false);
    assert!(index_cmd(&lib, &[]).status.success());
    let server = crate::web::serve(&lib.index, &[]);
    let siglip = fixture_model("siglip-tiny");
    let out = switch(&lib, siglip.to_str().unwrap());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("in use now"), "{}", stderr(&out));
    assert!(indexer::generation::pending(&lib.index));
    // The server still answers, from the old generation.
    let (code, body) = crate::web::get_json(&server.url, "/api/search?q=a%20fish&k=3");
    assert_eq!(code, 200, "{body}");
    assert!(body["hits"][0].get("probability").is_none(), "{body}");
    drop(server);
    // The next open switches.
    assert_eq!(family(&lib), "siglip");
    assert!(
        !indexer::generation::pending(&lib.index)
            && !indexer::generation::next_path(&lib.index).exists()
    );
    assert!(searchable(&lib));
}
