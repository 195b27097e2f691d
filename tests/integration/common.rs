//! Shared test helpers: fixture checkpoints, reference tensors, shared photos,
//! and running the real binary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `../shared/datasets/photos`, which the tests read in place.
pub fn shared_photos() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/datasets/photos");
    assert!(
        dir.is_dir(),
        "shared photos not found at {}: the tests need ../shared/datasets",
        dir.display()
    );
    dir
}

/// Names of every fixture checkpoint under tests/fixtures/models.
pub fn fixture_models() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("models"))
        .expect("tests/fixtures/models")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(
        names.len() >= 2,
        "expected at least two fixture models, found {names:?}"
    );
    names
}

/// A fixture checkpoint as a normal Hugging Face folder (gzipped files unpacked).
pub fn fixture_model(name: &str) -> PathBuf {
    static MADE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let made = MADE.get_or_init(Default::default);
    let mut made = made.lock().unwrap();
    if let Some(dir) = made.get(name) {
        return dir.clone();
    }
    let src = fixtures().join("models").join(name);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("models-{}", std::process::id()))
        .join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        if file.starts_with("reference") {
            continue;
        }
        match file.strip_suffix(".gz") {
            Some(plain) => {
                let mut reader = flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap());
                let mut out = std::fs::File::create(dir.join(plain)).unwrap();
                std::io::copy(&mut reader, &mut out).unwrap();
            }
            None => {
                std::fs::copy(&path, dir.join(&file)).unwrap();
            }
        }
    }
    // The text model an open_clip fixture names by hub id, beside it as a
    // folder of that name (a local folder wins over the hub, as in open_clip).
    for (repo, files) in fixture_hub_repos(name) {
        unpack(&files, &dir.join(&repo));
    }
    made.insert(name.to_string(), dir.clone());
    dir
}

/// The files of the model folder `src` copied into `dir`, but for those
/// named in `leaving`.
pub fn copy_model(src: &Path, dir: &Path, leaving: &[&str]) {
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap();
        if !leaving.iter().any(|l| name == *l) {
            std::fs::copy(&path, dir.join(name)).unwrap();
        }
    }
}

/// The hub repositories a fixture names (`"hub"` in its reference.json):
/// repository id and the folder of its files under tests/fixtures.
pub fn fixture_hub_repos(name: &str) -> Vec<(String, PathBuf)> {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("models").join(name).join("reference.json"))
            .unwrap(),
    )
    .unwrap();
    meta["hub"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(repo, path)| (repo.clone(), fixtures().join(path.as_str().unwrap())))
                .collect()
        })
        .unwrap_or_default()
}

/// Copies a fixture folder's files, gzipped ones unpacked.
pub fn unpack(src: &Path, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        match file.strip_suffix(".gz") {
            Some(plain) => {
                let mut reader = flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap());
                let mut out = std::fs::File::create(dir.join(plain)).unwrap();
                std::io::copy(&mut reader, &mut out).unwrap();
            }
            None => {
                std::fs::copy(&path, dir.join(&file)).unwrap();
            }
        }
    }
}

/// A Hugging Face hub cache (`HF_HUB_CACHE` layout: refs/main and a
/// snapshot) holding the hub repositories fixtures name.
pub fn fixture_hub_cache(root: &Path, name: &str) -> PathBuf {
    for (repo, files) in fixture_hub_repos(name) {
        let base = root.join(format!("models--{}", repo.replace('/', "--")));
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(base.join("refs")).unwrap();
        std::fs::write(base.join("refs/main"), commit).unwrap();
        unpack(&files, &base.join("snapshots").join(commit));
    }
    root.to_path_buf()
}

/// The reference outputs of a fixture model.
pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub texts: Vec<String>,
    pub token_ids: Vec<Vec<u32>>,
    pub photos: Vec<String>,
    /// "clip" or "siglip".
    pub family: String,
}

/// The fixture models of one family.
pub fn fixture_models_of(family: &str) -> Vec<String> {
    fixture_models()
        .into_iter()
        .filter(|name| reference(name).family == family)
        .collect()
}

pub fn reference(name: &str) -> Reference {
    let dir = fixtures().join("models").join(name);
    let tensors =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let strings = |key: &str| -> Vec<String> {
        meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let token_ids = meta["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    let family = meta["family"].as_str().unwrap_or("clip").to_string();
    Reference {
        tensors,
        texts: strings("texts"),
        token_ids,
        photos: strings("photos"),
        family,
    }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The texts `tokenizer` encodes to other ids than the reference's (`want`:
/// one JSON array of ids per text), by index, each with both lists.
pub fn token_id_mismatches<'a>(
    tokenizer: &clipdex::model::TextTokenizer,
    texts: impl IntoIterator<Item = &'a str>,
    want: &[serde_json::Value],
) -> Vec<(usize, String)> {
    let mut wrong = Vec::new();
    for (i, (text, want)) in texts.into_iter().zip(want).enumerate() {
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tokenizer.encode(text).unwrap();
        if got != want {
            wrong.push((i, format!("{text:?}\n  ours {got:?}\n  want {want:?}")));
        }
    }
    wrong
}

/// Fails with the first few of `wrong` (of `total` texts), if any.
pub fn assert_no_token_mismatches(label: &str, wrong: &[(usize, String)], total: usize) {
    let first: Vec<&str> = wrong.iter().take(3).map(|(_, w)| w.as_str()).collect();
    assert!(
        wrong.is_empty(),
        "{label}: {} of {total} differ, first:\n{}",
        wrong.len(),
        first.join("\n")
    );
}

/// Runs the clipdex binary.
/// Opens an index in this process. A lock that this process itself still
/// holds is waited for (up to a minute): a child that another test is
/// starting holds copies of this process's descriptors, the lock of an index
/// dropped a moment ago among them, from its fork until its exec, and on a
/// loaded machine that can outlast the drop.
pub fn open_index(index: &Path) -> clipdex::indexer::Index {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match clipdex::indexer::Index::open(index) {
            Err(clipdex::indexer::Error::InUse { holder, .. })
                if holder.pid == std::process::id() && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            opened => return opened.unwrap(),
        }
    }
}

pub fn clipdex(args: &[&str]) -> Output {
    clipdex_with_env(args, &[])
}

pub fn clipdex_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clipdex"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("CLIPDEX_MODEL")
        .env("HF_HUB_OFFLINE", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run clipdex")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A small JPEG whose EXIF block holds `date` as its DateTimeOriginal, byte
/// for byte (any bytes: cameras and editors write what they like).
pub fn jpeg_with_exif_date(date: &[u8]) -> Vec<u8> {
    jpeg_with_exif_date_tinted(date, 90)
}

/// The same, with `blue` as the picture's blue: distinct pictures.
pub fn jpeg_with_exif_date_tinted(date: &[u8], blue: u8) -> Vec<u8> {
    let mut jpeg = Vec::new();
    let picture = image::RgbImage::from_fn(64, 48, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 5) as u8, blue])
    });
    picture
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    // TIFF, little-endian: IFD0 (one entry: the Exif IFD pointer) at 8, the
    // Exif IFD (one entry: DateTimeOriginal, ASCII) at 26, the text at 44.
    let mut tiff = b"II\x2a\x00\x08\x00\x00\x00".to_vec();
    let entry = |tag: u16, kind: u16, count: u32, value: u32| {
        [
            tag.to_le_bytes().as_slice(),
            &kind.to_le_bytes(),
            &count.to_le_bytes(),
            &value.to_le_bytes(),
        ]
        .concat()
    };
    tiff.extend_from_slice(&1u16.to_le_bytes());
    tiff.extend(entry(0x8769, 4, 1, 26));
    tiff.extend_from_slice(&0u32.to_le_bytes());
    tiff.extend_from_slice(&1u16.to_le_bytes());
    let mut text = date.to_vec();
    text.push(0);
    if text.len() <= 4 {
        text.resize(4, 0);
        tiff.extend(entry(
            0x9003,
            2,
            4,
            u32::from_le_bytes(text[..4].try_into().unwrap()),
        ));
        tiff.extend_from_slice(&0u32.to_le_bytes());
    } else {
        tiff.extend(entry(0x9003, 2, text.len() as u32, 44));
        tiff.extend_from_slice(&0u32.to_le_bytes());
        tiff.extend_from_slice(&text);
    }
    let mut app1 = vec![0xFF, 0xE1];
    app1.extend_from_slice(&((2 + 6 + tiff.len()) as u16).to_be_bytes());
    app1.extend_from_slice(b"Exif\0\0");
    app1.extend_from_slice(&tiff);
    [&jpeg[..2], &app1[..], &jpeg[2..]].concat()
}

/// A valid PNG of `width` x `height` pixels of one colour (compresses to little).
pub fn flat_png(width: u32, height: u32) -> Vec<u8> {
    let mut png = Vec::new();
    let encoder = image::codecs::png::PngEncoder::new_with_quality(
        &mut png,
        image::codecs::png::CompressionType::Default,
        image::codecs::png::FilterType::NoFilter,
    );
    let row = vec![120u8; width as usize * 3];
    let pixels: Vec<u8> = std::iter::repeat_n(row.as_slice(), height as usize)
        .flatten()
        .copied()
        .collect();
    image::ImageEncoder::write_image(
        encoder,
        &pixels,
        width,
        height,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    png
}

/// Makes a FIFO at `path`.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::mkfifo(c.as_ptr(), 0o600) },
        0,
        "mkfifo {}",
        path.display()
    );
}

/// Copies the first `take` files of `from` (by name) into `to`; returns the copies.
pub fn copy_photos(from: &Path, to: &Path, take: usize) -> Vec<PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(from)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    names
        .iter()
        .take(take)
        .map(|p| {
            let copy = to.join(p.file_name().unwrap());
            std::fs::copy(p, &copy).unwrap();
            copy
        })
        .collect()
}
