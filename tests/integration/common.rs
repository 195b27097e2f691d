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
    assert!(dir.is_dir(), "shared photos not found at {}: the tests need ../shared/datasets", dir.display());
    dir
}

/// Names of every fixture checkpoint under tests/fixtures/models.
pub fn fixture_models() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("models"))
        .expect("tests/fixtures/models")
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert!(names.len() >= 2, "expected at least two fixture models, found {names:?}");
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
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("models-{}", std::process::id())).join(name);
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
    made.insert(name.to_string(), dir.clone());
    dir
}

/// The reference outputs of a fixture model.
pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub texts: Vec<String>,
    pub token_ids: Vec<Vec<u32>>,
    pub photos: Vec<String>,
}

pub fn reference(name: &str) -> Reference {
    let dir = fixtures().join("models").join(name);
    let tensors = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let strings = |key: &str| -> Vec<String> {
        meta[key].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    let token_ids = meta["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect())
        .collect();
    Reference { tensors, texts: strings("texts"), token_ids, photos: strings("photos") }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Runs the clipdex binary.
pub fn clipdex(args: &[&str]) -> Output {
    clipdex_with_env(args, &[])
}

pub fn clipdex_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clipdex"));
    cmd.args(args).env_remove("RUST_LOG").env_remove("CLIPDEX_MODEL").env("HF_HUB_OFFLINE", "0");
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
