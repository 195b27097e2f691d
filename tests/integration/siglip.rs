//! SigLIP and SigLIP 2 against transformers: tokenizer ids on 1,200 varied
//! strings through both tokenizer layouts (`spiece.model` as `SiglipTokenizer`
//! runs it, a Gemma `tokenizer.json`), the logit bias, and what a folder that
//! is neither says. Features and embeddings are checked with every other
//! fixture model in `model_reference.rs`.

use std::io::Read;

use clipdex::model::checkpoint::{HubOptions, ModelSource};
use clipdex::model::{Clip, Family};

use crate::common::{
    clipdex, copy_model, fixture_model, fixture_models_of, fixtures, reference, stderr, stdout,
};

fn load(name: &str) -> Clip {
    Clip::load(
        &ModelSource::Dir(fixture_model(name)),
        &HubOptions {
            offline: true,
            progress: false,
        },
    )
    .unwrap()
}

struct Cases {
    texts: Vec<String>,
    /// Per tokenizer ("spiece", "gemma"): the reference's padded ids per text.
    ids: serde_json::Value,
}

fn cases() -> Cases {
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(fixtures().join("siglip-tokenizer-cases.json.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let texts = value["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    Cases { texts, ids: value }
}

#[test]
fn tokenizer_ids_match_reference_on_varied_strings() {
    let cases = cases();
    assert!(
        cases.texts.len() >= 1000,
        "only {} cases",
        cases.texts.len()
    );
    for (model, key) in [("siglip-tiny", "spiece"), ("siglip2-tiny", "gemma")] {
        let clip = load(model);
        let want = cases.ids[key].as_array().unwrap();
        let texts = cases.texts.iter().map(String::as_str);
        let wrong = crate::common::token_id_mismatches(clip.tokenizer(), texts, want);
        crate::common::assert_no_token_mismatches(model, &wrong, cases.texts.len());
    }
}

#[test]
fn siglip_fixtures_are_siglip_with_their_bias() {
    let names = fixture_models_of("siglip");
    assert!(names.len() >= 2, "{names:?}");
    for name in names {
        let clip = load(&name);
        assert_eq!(clip.config().family, Family::Siglip);
        let r = reference(&name);
        let bias = r.tensors["logit_bias"].to_vec1::<f32>().unwrap()[0];
        assert!(
            (clip.logit_bias().unwrap().unwrap() - bias).abs() < 1e-6,
            "{name}"
        );
        // Every text is padded to the context the checkpoint was trained at.
        let ids = clip.tokenizer().encode("a").unwrap();
        assert_eq!(ids.len(), clip.config().text_config.max_position_embeddings);
    }
}

#[test]
fn unknown_layouts_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("open_clip_config.json"), "{}").unwrap();
    std::fs::write(dir.path().join("open_clip_model.safetensors"), "").unwrap();
    let err = Clip::load(&ModelSource::Dir(dir.path().into()), &HubOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("open_clip"), "{err}");

    // A SigLIP 2 NaFlex config, and a model type from elsewhere.
    let src = fixture_model("siglip-tiny");
    for (model_type, says) in [("siglip2", "NaFlex"), ("blip", "\"blip\"")] {
        let dir = tempfile::tempdir().unwrap();
        copy_model(&src, dir.path(), &[]);
        let config = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            config.replace("\"siglip\"", &format!("\"{model_type}\"")),
        )
        .unwrap();
        let err = Clip::load(&ModelSource::Dir(dir.path().into()), &HubOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(says) && err.contains("siglip") && err.contains("clip"),
            "{err}"
        );
    }

    // A SigLIP config with CLIP's BPE files.
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_model("laion-tiny")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let err = Clip::load(&ModelSource::Dir(dir.path().into()), &HubOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("siglip model with vocab.json and merges.txt"),
        "{err}"
    );
}

/// Index, search, find similar and embed with a SigLIP model, as a user runs them.
#[test]
fn index_search_and_embed_with_siglip() {
    let model = fixture_model("siglip-tiny");
    let model = model.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (root, index) = (dir.path().join("lib"), dir.path().join("index"));
    let names = crate::common::copy_photos(
        &crate::common::shared_photos().join("gcompris/fishes"),
        &root,
        8,
    );
    let out = clipdex(&[
        "index",
        root.to_str().unwrap(),
        "--index",
        index.to_str().unwrap(),
        "--model",
        model,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: serde_json::Value = serde_json::from_str(&stdout(&clipdex(&[
        "status",
        "--index",
        index.to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(status["model"]["family"], "siglip", "{status}");

    let search = |extra: &[&str]| -> Vec<serde_json::Value> {
        let mut args = vec![
            "search",
            "a fish",
            "--index",
            index.to_str().unwrap(),
            "--json",
            "--no-keywords",
        ];
        args.extend_from_slice(extra);
        let out = clipdex(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let hits = search(&[]);
    assert_eq!(hits.len(), 8);
    let clip = load("siglip-tiny");
    let calibration = clip.calibration().unwrap().unwrap();
    let mut probabilities = Vec::new();
    for hit in &hits {
        let (cos, p) = (
            hit["similarity"].as_f64().unwrap() as f32,
            hit["probability"].as_f64().unwrap() as f32,
        );
        assert!(
            (calibration.probability(cos) - p).abs() < 1e-6 && (0.0..=1.0).contains(&p),
            "{hit}"
        );
        probabilities.push(p);
    }
    // min_score is a probability for SigLIP: a cutoff between two hits keeps those above it.
    probabilities.sort_by(|a, b| b.total_cmp(a));
    let cut = (probabilities[2] + probabilities[3]) / 2.0;
    let kept = search(&["--min-score", &cut.to_string()]);
    assert_eq!(kept.len(), 3, "cut at {cut}: {probabilities:?}");
    assert!(
        kept.iter()
            .all(|h| h["probability"].as_f64().unwrap() as f32 >= cut)
    );

    // Find similar: the photo itself is never among its similar photos.
    let first = hits[0]["id"].as_u64().unwrap().to_string();
    let out = clipdex(&[
        "similar",
        &first,
        "--index",
        index.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out)
            .lines()
            .all(|l| !l.contains(&format!("\"id\":{first},")))
    );

    // Embed: logits with the bias, probabilities as the reference's sigmoid.
    let photo = names[0].to_str().unwrap();
    let out = clipdex(&[
        "embed", "--model", model, "--text", "a fish", "--image", photo, "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let cos = json["similarity"][0][0].as_f64().unwrap() as f32;
    let logit = json["logits_per_image"][0][0].as_f64().unwrap() as f32;
    assert!((logit - (calibration.scale * cos + calibration.bias)).abs() < 1e-5);
    assert!(
        (json["probability"][0][0].as_f64().unwrap() as f32 - calibration.probability(cos)).abs()
            < 1e-6
    );
}

/// `clipdex models`: the catalogue, which entries are cached, and their speed here.
#[test]
fn models_lists_the_catalogue_and_measures_what_is_cached() {
    let cache = tempfile::tempdir().unwrap();
    // A hub cache holding one of the recommended ids (the SigLIP fixture stands in).
    let repo = cache.path().join("models--google--siglip-base-patch16-224");
    let snapshot = repo.join("snapshots/0123456789abcdef");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef").unwrap();
    for entry in std::fs::read_dir(fixture_model("siglip-tiny")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
    }
    let out = crate::common::clipdex_with_env(
        &["models", "--json", "--measure"],
        &[("HF_HUB_CACHE", cache.path().to_str().unwrap())],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(rows.len() >= 8);
    for family in ["clip", "siglip"] {
        assert!(rows.iter().any(|r| r["family"] == family), "{family}");
    }
    let cached: Vec<_> = rows.iter().filter(|r| r["cached"] == true).collect();
    assert_eq!(cached.len(), 1, "{rows:?}");
    assert_eq!(cached[0]["id"], "google/siglip-base-patch16-224");
    let speed = &cached[0]["speed"];
    assert!(
        speed["images_per_second"].as_f64().unwrap() > 0.0
            && speed["query_ms"].as_f64().unwrap() > 0.0,
        "{speed}"
    );
    assert!(
        rows.iter()
            .filter(|r| r["cached"] == false)
            .all(|r| r.get("speed").is_none())
    );
    // The table names the columns a user chooses by.
    let out = crate::common::clipdex_with_env(
        &["models"],
        &[("HF_HUB_CACHE", cache.path().to_str().unwrap())],
    );
    let text = stdout(&out);
    assert!(
        text.contains("languages") && text.contains("download") && text.contains("multilingual"),
        "{text}"
    );
}
