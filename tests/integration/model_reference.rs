//! The model against transformers' `CLIPModel` on every fixture checkpoint:
//! token ids, features, embeddings and logits, batched and one at a time.

use candle_core::{DType, Device, Tensor};
use clipdex::library::{DecodeLimits, decode_file};
use clipdex::model::checkpoint::{self, HubOptions, ModelSource};
use clipdex::model::{Clip, Precision, RgbView, normalize};

use crate::common::{
    copy_model, fixture_model, fixture_models, fixture_models_of, max_abs_diff, reference,
    shared_photos,
};

/// Model outputs against the reference, from the same token ids and pixels.
const EXACT: f32 = 1e-4;
/// Embeddings through clipdex's own decoding and preprocessing of real photos.
const PIPELINE: f32 = 1e-3;

fn load(name: &str) -> Clip {
    let source = ModelSource::Dir(fixture_model(name));
    Clip::load(
        &source,
        &HubOptions {
            offline: true,
            progress: false,
        },
    )
    .unwrap()
}

fn rows(t: &Tensor, i: usize) -> Tensor {
    t.narrow(0, i, 1).unwrap()
}

#[test]
fn token_ids_match_reference() {
    for name in fixture_models() {
        let clip = load(&name);
        let r = reference(&name);
        for (text, ids) in r.texts.iter().zip(&r.token_ids) {
            assert_eq!(
                &clip.tokenizer().encode(text).unwrap(),
                ids,
                "{name}: {text:?}"
            );
        }
    }
}

#[test]
fn features_match_reference_batched_and_single() {
    for name in fixture_models() {
        let clip = load(&name);
        let r = reference(&name);
        let want_text = &r.tensors["text_features"];
        let want_image = &r.tensors["image_features"];

        // Texts: one batch padded to its longest text, then one at a time.
        let text = clip.text_features(&r.token_ids).unwrap();
        let d = max_abs_diff(&text, want_text);
        assert!(d <= EXACT, "{name}: batched text features differ by {d}");
        for (i, ids) in r.token_ids.iter().enumerate() {
            let one = clip.text_features(std::slice::from_ref(ids)).unwrap();
            let d = max_abs_diff(&one, &rows(want_text, i));
            assert!(d <= EXACT, "{name}: text {i} alone differs by {d}");
        }

        // Images: from the reference's own pixel tensors.
        let pixels = &r.tensors["pixel_values"];
        let image = clip.image_features(pixels).unwrap();
        let d = max_abs_diff(&image, want_image);
        assert!(d <= EXACT, "{name}: batched image features differ by {d}");
        for i in 0..pixels.dim(0).unwrap() {
            let one = clip.image_features(&rows(pixels, i)).unwrap();
            let d = max_abs_diff(&one, &rows(want_image, i));
            assert!(d <= EXACT, "{name}: image {i} alone differs by {d}");
        }

        // Normalised embeddings and logits, as CLIPModel.forward returns them.
        let d = max_abs_diff(&normalize(&text).unwrap(), &r.tensors["text_embeds"]);
        assert!(d <= EXACT, "{name}: text embeds differ by {d}");
        let d = max_abs_diff(&normalize(&image).unwrap(), &r.tensors["image_embeds"]);
        assert!(d <= EXACT, "{name}: image embeds differ by {d}");
        let logits = clip.model().logits_per_image(&image, &text).unwrap();
        let d = max_abs_diff(&logits, &r.tensors["logits_per_image"]);
        assert!(d <= EXACT, "{name}: logits differ by {d}");
        let scale = r.tensors["logit_scale"].to_vec1::<f32>().unwrap()[0];
        assert!((clip.logit_scale().unwrap() - scale.exp()).abs() < 1e-4);
    }
}

#[test]
fn prompts_that_begin_alike_embed_as_they_do_alone() {
    // Four templates of 20 names each, as the tag vocabulary's prompts are,
    // and texts of their own: a causal tower computes each template's
    // beginning once for its 20 prompts (`Clip::embed_texts`).
    let templates = [
        "a photo of a {}.",
        "a photo of the {}.",
        "a close-up photo of a {}.",
        "a good photo of a {}.",
    ];
    let names = [
        "dog",
        "cat",
        "red bicycle",
        "lighthouse",
        "snowy mountain peak",
        "fish",
        "hammer",
        "bridge",
        "wind turbine",
        "sunflower",
        "old wooden boat",
        "car",
        "tree",
        "beach",
        "tower",
        "owl",
        "apple",
        "city at night",
        "cow",
        "violin",
    ];
    let mut texts: Vec<String> = templates
        .iter()
        .flat_map(|t| names.iter().map(move |n| t.replace("{}", n)))
        .collect();
    texts.extend(["a diagram", "two dogs playing in the snow"].map(String::from));
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut shared = 0;
    for name in fixture_models() {
        for precision in [Precision::Exact, Precision::Fast, Precision::Int8] {
            let mut clip = load(&name);
            clip.set_precision(precision).unwrap();
            shared += usize::from(clip.model().shares_text_beginnings());
            let together = clip.embed_texts(&texts).unwrap();
            for (text, got) in texts.iter().zip(&together) {
                let alone = &clip.embed_texts(&[text]).unwrap()[0];
                let d = got
                    .iter()
                    .zip(alone)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(d <= 2e-6, "{name}, {precision:?}, {text:?}: {d}");
            }
        }
    }
    // The CLIP fixtures of OpenAI, LAION and open_clip are causal.
    assert!(
        shared >= 9,
        "{shared} fixtures and precisions share beginnings"
    );
    // Batches the tower cannot lay out are refused: no shared token, a text
    // with no token of its own, pooling outside a text's own tokens, more
    // positions than the model has.
    for name in fixture_models() {
        let clip = load(&name);
        let model = clip.model();
        if !model.shares_text_beginnings() {
            continue;
        }
        let (first, a, b): (&[u32], &[u32], &[u32]) = (&[1, 2], &[3, 4, 5], &[6]);
        let got = model
            .get_text_features_after(first, &[a, b], &[4, 2])
            .unwrap();
        assert_eq!(got.dim(0).unwrap(), 2, "{name}");
        assert!(
            model
                .get_text_features_after(&[], &[a, b], &[2, 0])
                .is_err()
        );
        assert!(
            model
                .get_text_features_after(first, &[a, &[]], &[4, 2])
                .is_err()
        );
        assert!(
            model
                .get_text_features_after(first, &[a, b], &[5, 2])
                .is_err()
        );
        assert!(
            model
                .get_text_features_after(first, &[a, b], &[4, 1])
                .is_err()
        );
        assert!(model.get_text_features_after(first, &[a], &[4, 2]).is_err());
        let long = vec![3u32; clip.config().text_config.max_position_embeddings];
        assert!(
            model
                .get_text_features_after(first, &[a, &long], &[4, 2])
                .is_err()
        );
    }
}

#[test]
fn short_texts_unpadded_match_padded_to_full_context() {
    // CLIP only: SigLIP's text tower attends both ways over a fixed length.
    for name in fixture_models_of("clip") {
        let clip = load(&name);
        let r = reference(&name);
        // The reference's own padded ids: 77 positions each.
        let padded = r.tensors["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap();
        assert!(padded.iter().all(|row| row.len() == 77));
        let full = clip.text_features(&padded).unwrap();
        let short = clip.text_features(&r.token_ids).unwrap();
        let d = max_abs_diff(&full, &short);
        assert!(d <= 1e-5, "{name}: padding changes text features by {d}");
        let d = max_abs_diff(&full, &r.tensors["text_features"]);
        assert!(
            d <= EXACT,
            "{name}: padded text features differ from the reference by {d}"
        );
    }
}

#[test]
fn real_photos_through_our_pipeline_match_reference_embeddings() {
    let photos = shared_photos();
    for name in fixture_models() {
        let clip = load(&name);
        let r = reference(&name);
        let limits = DecodeLimits::default();
        let decoded: Vec<_> = r
            .photos
            .iter()
            .map(|p| decode_file(&photos.join(p), &limits).unwrap())
            .collect();
        let views: Vec<RgbView> = decoded.iter().map(|d| d.view()).collect();
        let pixels = clip.pixels(&views).unwrap();
        let pixel_diff = max_abs_diff(&pixels, &r.tensors["pixel_values"]);
        let ours = clip.embed_images(&views).unwrap();
        let ours = Tensor::new(ours, &Device::Cpu).unwrap();
        let want = &r.tensors["image_embeds"];
        let d = max_abs_diff(&ours, want);
        eprintln!(
            "{name}: real photos: pixel max diff {pixel_diff:.4}, embedding max diff {d:.2e}"
        );
        assert!(
            d <= PIPELINE,
            "{name}: embeddings of real photos differ by {d} (pixels by {pixel_diff})"
        );
    }
}

#[test]
fn vocab_merges_and_tokenizer_json_give_the_same_model_outputs() {
    // The two fixtures ship different tokenizer files; both must resolve.
    let kinds: Vec<_> = fixture_models_of("clip")
        .iter()
        .map(|name| {
            let files = checkpoint::resolve(
                &ModelSource::Dir(fixture_model(name)),
                &HubOptions::default(),
            )
            .unwrap();
            matches!(files.tokenizer, checkpoint::TokenizerFiles::Json(_))
        })
        .collect();
    assert!(
        kinds.contains(&true) && kinds.contains(&false),
        "fixtures should cover both tokenizer layouts"
    );
}

#[test]
fn pytorch_pickle_weights_load_like_safetensors() {
    let src = fixture_model("laion-tiny");
    assert!(
        src.join("pytorch_model.bin").is_file(),
        "the laion-tiny fixture ships a pickle too"
    );
    let dir = tempfile::tempdir().unwrap();
    copy_model(&src, dir.path(), &["model.safetensors"]);
    let files = checkpoint::resolve(
        &ModelSource::Dir(dir.path().to_path_buf()),
        &HubOptions::default(),
    )
    .unwrap();
    assert!(matches!(files.weights, checkpoint::WeightsFile::Pickle(_)));
    let clip = Clip::from_files(&files, "pickle".into()).unwrap();
    let r = reference("laion-tiny");
    let d = max_abs_diff(
        &clip.text_features(&r.token_ids).unwrap(),
        &r.tensors["text_features"],
    );
    assert!(d <= EXACT, "pickle text features differ by {d}");
    let d = max_abs_diff(
        &clip.image_features(&r.tensors["pixel_values"]).unwrap(),
        &r.tensors["image_features"],
    );
    assert!(d <= EXACT, "pickle image features differ by {d}");
}

#[test]
fn reduced_size_jpeg_decoding_stays_close_to_exact() {
    // The indexer decodes large JPEGs at 1/2..1/8 size in the DCT, keeping the
    // short side at least twice the model's input. How far that moves the
    // embeddings, on the real photos of the reference set:
    let photos = shared_photos();
    let limits = DecodeLimits::default();
    for name in fixture_models() {
        let clip = load(&name);
        let r = reference(&name);
        let min_side = 2 * clip.preprocessor().image_size() as u32;
        let (mut worst_cos, mut worst_abs) = (1f32, 0f32);
        for p in &r.photos {
            let bytes = std::fs::read(photos.join(p)).unwrap();
            let exact = clipdex::library::decode_bytes(&bytes, &limits).unwrap();
            let scaled =
                clipdex::library::decode_bytes_scaled(&bytes, &limits, Some(min_side)).unwrap();
            assert!(
                scaled.rgb.width().min(scaled.rgb.height())
                    >= min_side.min(exact.rgb.width().min(exact.rgb.height()))
            );
            let a = clip.embed_images(&[exact.view()]).unwrap().remove(0);
            let b = clip.embed_images(&[scaled.view()]).unwrap().remove(0);
            let cos: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let abs = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            worst_cos = worst_cos.min(cos);
            worst_abs = worst_abs.max(abs);
        }
        eprintln!(
            "{name}: DCT-scaled decoding: worst cosine to exact {worst_cos:.5}, worst max abs {worst_abs:.4}"
        );
        // Random tiny towers at 32-64 px amplify pixel differences (0.988 to
        // 0.9996 here); the bound catches a scaling that loses the picture.
        assert!(worst_cos > 0.985, "{name}: cosine {worst_cos}");
    }
}
