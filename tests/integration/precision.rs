//! `--precision fast`: bf16 towers against exact ones on every fixture
//! model, and an index that keeps the precision its vectors were made with.

use clipdex::common::RgbView;
use clipdex::library::{DecodeLimits, decode_file};
use clipdex::model::checkpoint::{HubOptions, ModelSource};
use clipdex::model::{Clip, Precision, Towers};

use crate::common::{
    clipdex, copy_model, copy_photos, fixture_model, fixture_models, reference, shared_photos,
    stderr, stdout,
};

/// The fidelity bar: every fast embedding within this cosine of
/// its exact one.
const FIDELITY: f32 = 0.995;

fn offline() -> HubOptions {
    HubOptions {
        offline: true,
        progress: false,
    }
}

fn load(name: &str, precision: Precision) -> Clip {
    let mut clip = Clip::load(&ModelSource::Dir(fixture_model(name)), &offline()).unwrap();
    clip.set_precision(precision).unwrap();
    clip
}

/// Cosine of each row pair (rows are normalised embeddings).
fn cosines(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<f32> {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum())
        .collect()
}

#[test]
fn reduced_embeddings_stay_within_the_fidelity_bar_on_every_fixture() {
    // Every shared photo, decoded once.
    let mut paths = Vec::new();
    for dir in ["gcompris", "wallpapers"] {
        for entry in walkdir::WalkDir::new(shared_photos().join(dir)).sort_by_file_name() {
            let path = entry.unwrap().into_path();
            if path
                .extension()
                .is_some_and(|e| e == "jpg" || e == "png" || e == "jpeg")
            {
                paths.push(path);
            }
        }
    }
    let decoded: Vec<_> = paths
        .iter()
        .map(|p| decode_file(p, &DecodeLimits::default()).unwrap())
        .collect();
    let views: Vec<RgbView> = decoded.iter().map(|d| d.view()).collect();
    assert!(views.len() > 100, "{} shared photos", views.len());
    for name in fixture_models() {
        let texts = reference(&name).texts;
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let exact = load(&name, Precision::Exact);
        same_when_the_image_tower_loads_later(&name, &exact, &views[..8], &texts);
        let mut reduced = Vec::new();
        for precision in [Precision::Fast, Precision::Int8] {
            reduced.push(check_fidelity(&name, &exact, precision, &views, &texts));
        }
        // Where the CPU has AMX-INT8, int8 is a computation of its own.
        if clipdex::model::int8::available() {
            assert_ne!(reduced[0], reduced[1], "{name}: int8 computes as fast does");
        }
    }
}

/// Checks `precision`'s embeddings of `name` against exact ones, and that
/// converting while loading gives the same model as converting after; the
/// embeddings of the first eight photos.
fn check_fidelity(
    name: &str,
    exact: &Clip,
    precision: Precision,
    views: &[RgbView],
    texts: &[&str],
) -> Vec<Vec<f32>> {
    let fast = load(name, precision);
    assert_eq!(fast.info().precision, precision);
    assert!(fast.info().fingerprint.ends_with(&format!("/{precision}")));
    assert_ne!(exact.info().fingerprint, fast.info().fingerprint);
    let mut image = Vec::new();
    for chunk in views.chunks(32) {
        image.extend(cosines(
            &fast.embed_images(chunk).unwrap(),
            &exact.embed_images(chunk).unwrap(),
        ));
    }
    let text = cosines(
        &fast.embed_texts(texts).unwrap(),
        &exact.embed_texts(texts).unwrap(),
    );
    let min = |v: &[f32]| v.iter().copied().fold(f32::INFINITY, f32::min);
    let (min_image, min_text) = (min(&image), min(&text));
    eprintln!(
        "{name}: {precision} against exact, smallest cosine {min_image:.5} over {} photos, {min_text:.5} over {} texts",
        image.len(),
        text.len()
    );
    assert!(
        min_image >= FIDELITY,
        "{name} {precision}: an image at cosine {min_image}"
    );
    assert!(
        min_text >= FIDELITY,
        "{name} {precision}: a text at cosine {min_text}"
    );
    // The reduced towers really are another computation.
    assert!(
        image.iter().chain(&text).any(|&c| c < 1.0 - 1e-6),
        "{name}: {precision} embeddings are exactly the exact ones"
    );
    // Converted layer by layer while loading, or after: the same model.
    let loaded = Clip::load_with(
        &ModelSource::Dir(fixture_model(name)),
        &offline(),
        precision,
    )
    .unwrap();
    assert_eq!(loaded.info(), fast.info(), "{name}");
    let first = fast.embed_images(&views[..8]).unwrap();
    assert_eq!(
        loaded.embed_images(&views[..8]).unwrap(),
        first,
        "{name} {precision}: images"
    );
    assert_eq!(
        loaded.embed_texts(texts).unwrap(),
        fast.embed_texts(texts).unwrap(),
        "{name} {precision}: texts"
    );
    same_when_the_image_tower_loads_later(name, &fast, &views[..8], texts);
    first
}

/// A model loaded with its image tower left for later ([`Towers::TextFirst`])
/// embeds as `clip` (loaded at once, at the same precision) does: texts
/// before the tower loads, then images, as they are first asked for.
fn same_when_the_image_tower_loads_later(
    name: &str,
    clip: &Clip,
    views: &[RgbView],
    texts: &[&str],
) {
    let precision = clip.info().precision;
    let later = Clip::load_towers(
        &ModelSource::Dir(fixture_model(name)),
        &offline(),
        precision,
        Towers::TextFirst,
    )
    .unwrap();
    assert_eq!(later.info(), clip.info(), "{name}");
    assert_eq!(
        later.embed_texts(texts).unwrap(),
        clip.embed_texts(texts).unwrap(),
        "{name} {precision}: texts, the image tower not loaded"
    );
    assert_eq!(
        later.embed_images(views).unwrap(),
        clip.embed_images(views).unwrap(),
        "{name} {precision}: images from the tower loaded later"
    );
}

/// The fixture `name` copied into `dir` without the tensor `left_out`.
fn without_tensor(name: &str, left_out: &str, dir: &std::path::Path) {
    let src = fixture_model(name);
    copy_model(&src, dir, &["model.safetensors"]);
    let mut tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(
        tensors.remove(left_out).is_some(),
        "{name} has no {left_out}"
    );
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
}

#[test]
fn an_image_tower_left_for_later_loads_once_and_a_broken_one_says_so() {
    let name = "openai-tiny";
    let texts = reference(name).texts;
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let photos = ["gcompris/fishes", "wallpapers"].map(|dir| {
        let path = walkdir::WalkDir::new(shared_photos().join(dir))
            .sort_by_file_name()
            .into_iter()
            .map(|e| e.unwrap().into_path())
            .find(|p| p.extension().is_some_and(|e| e == "jpg" || e == "png"))
            .unwrap();
        decode_file(&path, &DecodeLimits::default()).unwrap()
    });
    let views: Vec<RgbView> = photos.iter().map(|d| d.view()).collect();
    let both = load(name, Precision::Fast);
    let expected = both.embed_images(&views).unwrap();

    // Threads that ask for images at once share one load of the tower.
    let later = Clip::load_towers(
        &ModelSource::Dir(fixture_model(name)),
        &offline(),
        Precision::Fast,
        Towers::TextFirst,
    )
    .unwrap();
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| later.embed_images(&views).unwrap()))
            .collect();
        for run in runs {
            assert_eq!(run.join().unwrap(), expected);
        }
    });

    // A checkpoint whose image tower lacks a weight: loading both towers
    // refuses it; loading the text tower first answers texts, and every
    // image asks for the tower again and says what is wrong.
    let dir = tempfile::tempdir().unwrap();
    let missing = "vision_model.encoder.layers.1.mlp.fc2.weight";
    without_tensor(name, missing, dir.path());
    let source = ModelSource::Dir(dir.path().to_path_buf());
    let err = Clip::load_with(&source, &offline(), Precision::Fast).unwrap_err();
    assert!(err.to_string().contains(missing), "{err}");
    let broken =
        Clip::load_towers(&source, &offline(), Precision::Fast, Towers::TextFirst).unwrap();
    assert_eq!(
        broken.embed_texts(&texts).unwrap(),
        both.embed_texts(&texts).unwrap()
    );
    for _ in 0..2 {
        let err = broken.embed_images(&views).unwrap_err();
        assert!(err.to_string().contains(missing), "{err}");
    }
}

#[test]
fn a_broken_checkpoint_names_its_first_broken_part() {
    // The tokenizer is read on a thread of its own while the weights load;
    // its error still comes first, as the parts are named.
    let missing = "vision_model.encoder.layers.1.mlp.fc2.weight";
    let load = |dir: &std::path::Path| {
        Clip::load_with(
            &ModelSource::Dir(dir.to_path_buf()),
            &offline(),
            Precision::Fast,
        )
        .unwrap_err()
        .to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    without_tensor("openai-tiny", missing, dir.path());
    let err = load(dir.path());
    assert!(err.contains(missing), "{err}");
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": ").unwrap();
    let err = load(dir.path());
    assert!(err.contains("tokenizer"), "{err}");
    assert!(!err.contains(missing), "{err}");
}

#[test]
fn an_index_keeps_the_precision_its_vectors_were_made_with() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("lib");
    copy_photos(&shared_photos().join("gcompris/fishes"), &lib, 12);
    let index = dir.path().join("index");
    let (lib, index) = (lib.to_str().unwrap(), index.to_str().unwrap());
    let model = fixture_model("openai-tiny");
    let model = model.to_str().unwrap();
    let out = clipdex(&[
        "index",
        lib,
        "--index",
        index,
        "--model",
        model,
        "--precision",
        "fast",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = |index: &str| -> serde_json::Value {
        let out = clipdex(&["status", "--index", index, "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    assert_eq!(status(index)["model"]["precision"], "fast");

    // Queries are embedded as the index was: fast by default, exact refused.
    let out = clipdex(&["search", "a cat", "--index", index, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let hits = stdout(&out).lines().count();
    assert!(hits > 0);
    // A picture from outside the library: the one-off search loaded only
    // the text tower, and loads the image tower for it.
    let first = walkdir::WalkDir::new(lib)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.unwrap().into_path())
        .find(|p| p.is_file())
        .unwrap();
    let outside = dir
        .path()
        .join("outside")
        .with_extension(first.extension().unwrap());
    std::fs::copy(&first, &outside).unwrap();
    let out = clipdex(&[
        "similar",
        outside.to_str().unwrap(),
        "--index",
        index,
        "--json",
        "-k",
        "1",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let top: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().next().unwrap()).unwrap();
    assert_eq!(
        top["path"],
        first.strip_prefix(lib).unwrap().to_str().unwrap()
    );
    assert!(top["similarity"].as_f64().unwrap() > 0.99, "{top}");
    let out = clipdex(&["search", "a cat", "--index", index, "--precision", "exact"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("reindex --precision exact"),
        "{}",
        stderr(&out)
    );
    // Continuing the index keeps its precision; asking for another is refused.
    let out = clipdex(&["index", lib, "--index", index, "--model", model]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = clipdex(&[
        "index",
        lib,
        "--index",
        index,
        "--model",
        model,
        "--precision",
        "exact",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("fast-precision embeddings"),
        "{}",
        stderr(&out)
    );

    // Switching re-embeds every photo into exact vectors.
    let out = clipdex(&["reindex", "--index", index, "--precision", "exact"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = status(index);
    assert_eq!(s["model"]["precision"], "exact");
    assert!(!s["model"]["fingerprint"].as_str().unwrap().contains('/'));
    assert_eq!(s["photos"], 12);
    let out = clipdex(&[
        "search",
        "a cat",
        "--index",
        index,
        "--precision",
        "exact",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), hits);

    // And to int8: a precision of its own, that fast queries do not match.
    let out = clipdex(&["reindex", "--index", index, "--precision", "int8"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = status(index);
    assert_eq!(s["model"]["precision"], "int8");
    assert!(
        s["model"]["fingerprint"]
            .as_str()
            .unwrap()
            .ends_with("/int8")
    );
    let out = clipdex(&["search", "a cat", "--index", index, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), hits);
    let out = clipdex(&["search", "a cat", "--index", index, "--precision", "fast"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("reindex --precision fast"),
        "{}",
        stderr(&out)
    );
}
