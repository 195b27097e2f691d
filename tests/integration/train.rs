//! Training and evaluation: gradients reach every parameter, a tiny model
//! overfits a fixed batch, a killed run resumes exactly, the exported
//! checkpoint loads through the normal loader, bad rows are skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use candle_core::{Device, Tensor};
use clipdex::model::init::{NormalRng, init_weights};
use clipdex::model::loss::{Objective, clip_loss};
use clipdex::model::{Clip, ClipConfig, HubOptions, ModelSource};
use clipdex::train::optim::{AdamW, AdamWConfig};
use clipdex::train::{Freeze, build_model};
use serde_json::Value;

use crate::common::{clipdex, fixture_model, stderr, stdout};

const COLORS: &[(&str, [u8; 3])] = &[
    ("red", [220, 30, 30]),
    ("green", [30, 180, 60]),
    ("blue", [40, 60, 220]),
    ("yellow", [230, 210, 40]),
];
const SHAPES: &[&str] = &["square", "circle", "cross"];

/// Pictures of coloured shapes on grey, at random places and sizes, captioned
/// "a {colour} {shape}"; written as `pairs.jsonl` and as class folders.
pub fn shapes(dir: &Path, n: usize, seed: u64) -> PathBuf {
    let mut rng = NormalRng::new(seed);
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut jsonl = String::new();
    for i in 0..n {
        let (cname, color) = COLORS[i % COLORS.len()];
        let shape = SHAPES[(i / COLORS.len()) % SHAPES.len()];
        let mut img = image::RgbImage::from_pixel(40, 40, image::Rgb([128, 128, 128]));
        let r = 6.0 + 6.0 * rng.uniform();
        let cx = r + (40.0 - 2.0 * r) * rng.uniform();
        let cy = r + (40.0 - 2.0 * r) * rng.uniform();
        for (x, y, p) in img.enumerate_pixels_mut() {
            let (dx, dy) = (x as f64 - cx, y as f64 - cy);
            let inside = match shape {
                "square" => dx.abs() < r && dy.abs() < r,
                "circle" => dx * dx + dy * dy < r * r,
                _ => (dx.abs() < r / 3.0 && dy.abs() < r) || (dy.abs() < r / 3.0 && dx.abs() < r),
            };
            if inside {
                *p = image::Rgb(color);
            }
        }
        let name = format!("img/{i:04}.png");
        img.save(dir.join(&name)).unwrap();
        let class = dir.join("classes").join(format!("{cname}_{shape}"));
        std::fs::create_dir_all(&class).unwrap();
        img.save(class.join(format!("{i:04}.png"))).unwrap();
        jsonl.push_str(
            &serde_json::json!({"image": name, "caption": format!("a {cname} {shape}")})
                .to_string(),
        );
        jsonl.push('\n');
    }
    let pairs = dir.join("pairs.jsonl");
    std::fs::write(&pairs, jsonl).unwrap();
    pairs
}

fn pixels(dir: &Path, n: usize, size: usize) -> Tensor {
    let mut data = Vec::new();
    for i in 0..n {
        let img = image::open(dir.join(format!("img/{i:04}.png")))
            .unwrap()
            .resize_exact(
                size as u32,
                size as u32,
                image::imageops::FilterType::Triangle,
            )
            .to_rgb8();
        for c in 0..3 {
            for p in img.pixels() {
                data.push(p[c] as f32 / 127.5 - 1.0);
            }
        }
    }
    Tensor::from_vec(data, (n, 3, size, size), &Device::Cpu).unwrap()
}

fn captions(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            format!(
                "a {} {}",
                COLORS[i % COLORS.len()].0,
                SHAPES[(i / COLORS.len()) % SHAPES.len()]
            )
        })
        .collect()
}

fn builtin_tokenizer(ctx: usize) -> clipdex::model::ClipTokenizer {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, clipdex::train::builtin_tokenizer_json()).unwrap();
    clipdex::model::ClipTokenizer::from_tokenizer_json(&path, ctx).unwrap()
}

fn token_batch(tok: &clipdex::model::ClipTokenizer, texts: &[String]) -> (Tensor, Vec<usize>) {
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    let len = ids.iter().map(Vec::len).max().unwrap();
    let mut flat = Vec::new();
    let mut pool = Vec::new();
    for row in &ids {
        flat.extend_from_slice(row);
        flat.extend(std::iter::repeat_n(tok.eos_id(), len - row.len()));
        pool.push(tok.pool_position(row));
    }
    (
        Tensor::from_vec(flat, (ids.len(), len), &Device::Cpu).unwrap(),
        pool,
    )
}

#[test]
fn every_parameter_gets_a_gradient() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 8, 1);
    for config in [ClipConfig::preset("tiny-32").unwrap(), {
        // The OpenAI-like activation and a non-square patch grid remainder.
        let mut c = ClipConfig::preset("tiny-32").unwrap();
        c.text_config.hidden_act = clipdex::model::Activation::QuickGelu;
        c.vision_config.hidden_act = clipdex::model::Activation::QuickGelu;
        c
    }] {
        for objective in [Objective::Softmax, Objective::Sigmoid] {
            let weights = init_weights(&config, 0, &Device::Cpu).unwrap();
            let count = weights.len() + usize::from(objective == Objective::Sigmoid);
            let m = build_model(&config, weights, Freeze::None, objective).unwrap();
            assert_eq!(
                m.trainable.len(),
                count,
                "every tensor is trainable, the sigmoid loss's bias too"
            );
            let tok = clipdex::model::TextTokenizer::Clip(builtin_tokenizer(
                config.text_config.max_position_embeddings,
            ));
            assert_no_dead_parameters(&m, &tok, &pixels(dir.path(), 8, 32), objective);
        }
    }
    // The paper's ResNet: every convolution, batch-norm gain and bias, the
    // attention pooling. Its running statistics are state, not parameters.
    let config = ClipConfig::preset("rn-tiny-64").unwrap();
    for objective in [Objective::Softmax, Objective::Sigmoid] {
        let mut weights = init_weights(&config, 0, &Device::Cpu).unwrap();
        // open_clip starts each block's last gain at zero (the block is its
        // shortcut), which leaves the block's convolutions without a gradient
        // on the first step only; any other gain shows them all reached.
        for (name, t) in weights.iter_mut() {
            if name.ends_with("bn3.weight") {
                *t = t.ones_like().unwrap();
            }
        }
        let buffers = weights
            .keys()
            .filter(|k| k.ends_with(".running_mean") || k.ends_with(".running_var"))
            .count();
        assert!(buffers > 0);
        let count = weights.len() - buffers + usize::from(objective == Objective::Sigmoid);
        let m = build_model(&config, weights, Freeze::None, objective).unwrap();
        assert_eq!(m.trainable.len(), count);
        assert_eq!(m.model.buffers().len(), buffers);
        let tok = clipdex::model::TextTokenizer::Clip(builtin_tokenizer(
            config.text_config.max_position_embeddings,
        ));
        assert_no_dead_parameters(&m, &tok, &pixels(dir.path(), 8, 64), objective);
    }
    // SigLIP, from a checkpoint: its own tokenizer, fixed-length text, the pooling head.
    let (clip, tensors) = siglip_fixture();
    let count = tensors.len();
    let m = build_model(clip.config(), tensors, Freeze::None, Objective::Sigmoid).unwrap();
    assert_eq!(m.trainable.len(), count);
    let size = clip.preprocessor().image_size();
    assert_no_dead_parameters(
        &m,
        clip.tokenizer(),
        &pixels(dir.path(), 8, size),
        Objective::Sigmoid,
    );
}

/// The SigLIP fixture loaded for inference, and its weights as f32 tensors for training.
fn siglip_fixture() -> (Clip, HashMap<String, Tensor>) {
    let model = fixture_model("siglip-tiny");
    let clip = Clip::load(
        &ModelSource::Dir(model.clone()),
        &HubOptions {
            offline: true,
            progress: false,
        },
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(candle_core::DType::F32).unwrap()))
        .collect();
    (clip, tensors)
}

/// One step's loss reaches every trainable parameter with a non-zero gradient.
fn assert_no_dead_parameters(
    m: &clipdex::train::TrainableModel,
    tok: &clipdex::model::TextTokenizer,
    px: &Tensor,
    objective: Objective,
) {
    let texts = captions(px.dim(0).unwrap());
    let rows: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t).unwrap()).collect();
    let len = rows.iter().map(Vec::len).max().unwrap();
    let mut flat = Vec::new();
    let mut pool = Vec::new();
    for row in &rows {
        flat.extend(
            row.iter()
                .copied()
                .chain(std::iter::repeat_n(tok.pad_id(), len - row.len())),
        );
        pool.push(tok.pool_position(row));
    }
    let ids = Tensor::from_vec(flat, (rows.len(), len), &Device::Cpu).unwrap();
    let find = |name: &str| {
        m.trainable
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_tensor().clone())
    };
    let (loss, _) = objective
        .loss(
            &m.model.get_image_features(px).unwrap(),
            &m.model.get_text_features(&ids, &pool).unwrap(),
            &find("logit_scale").unwrap(),
            find("logit_bias").as_ref(),
        )
        .unwrap();
    let grads = loss.backward().unwrap();
    let mut dead = Vec::new();
    for (name, var) in &m.trainable {
        match grads.get(var.as_tensor()) {
            None => dead.push(format!("{name} (none)")),
            Some(g)
                if g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0 =>
            {
                dead.push(format!("{name} (zero)"))
            }
            Some(_) => {}
        }
    }
    assert!(
        dead.is_empty(),
        "{objective:?}: {} of {} parameters get no gradient: {dead:?}",
        dead.len(),
        m.trainable.len()
    );
}

#[test]
fn a_tiny_model_overfits_a_fixed_batch() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 12, 2);
    let config = ClipConfig::preset("tiny-32").unwrap();
    let m = build_model(
        &config,
        init_weights(&config, 0, &Device::Cpu).unwrap(),
        Freeze::None,
        Objective::Softmax,
    )
    .unwrap();
    let tok = builtin_tokenizer(32);
    let (ids, pool) = token_batch(&tok, &captions(12));
    let px = pixels(dir.path(), 12, 32);
    let log_scale = m
        .trainable
        .iter()
        .find(|(k, _)| k == "logit_scale")
        .unwrap()
        .1
        .clone();
    let mut opt = AdamW::new(
        m.trainable.clone(),
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..150 {
        let (loss, _) = clip_loss(
            &m.model.get_image_features(&px).unwrap(),
            &m.model.get_text_features(&ids, &pool).unwrap(),
            log_scale.as_tensor(),
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads, 2e-3).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
    }
    // The forward pass sees the optimiser's updates: a model rebuilt from the
    // current weights computes the same features (no layer kept a copy).
    let current: HashMap<String, Tensor> = m
        .trainable
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let rebuilt = build_model(&config, current, Freeze::None, Objective::Softmax).unwrap();
    let a = m.model.get_image_features(&px).unwrap();
    let b = rebuilt.model.get_image_features(&px).unwrap();
    let d = crate::common::max_abs_diff(&a, &b);
    assert!(
        d < 1e-5,
        "the trained model's image features differ from its weights' by {d}"
    );
    let a = m.model.get_text_features(&ids, &pool).unwrap();
    let b = rebuilt.model.get_text_features(&ids, &pool).unwrap();
    let d = crate::common::max_abs_diff(&a, &b);
    assert!(
        d < 1e-5,
        "the trained model's text features differ from its weights' by {d}"
    );
    let first = losses[0];
    let last = *losses.last().unwrap();
    // 12 pairs start near ln(12) = 2.48.
    assert!(first > 2.0, "{losses:?}");
    assert!(last < 0.1, "loss only fell from {first} to {last}");
}

fn train_cmd(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--config",
        "tiny-32",
        "--batch",
        "8",
        "--seed",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn run_train(args: &[String]) -> Value {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = clipdex(&[&refs[..], &["--json"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).unwrap()
}

fn step_losses(out: &Path) -> HashMap<u64, f32> {
    std::fs::read_to_string(out.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap() as f32,
            )
        })
        .collect()
}

/// `clipdex train` fine-tuning `init`, batches of 8.
fn fine_tune_cmd(data: &Path, out: &Path, init: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--init",
        init.to_str().unwrap(),
        "--batch",
        "8",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// How far each weight moved from the `init` checkpoint to the `out` one (max abs).
fn weight_change(init: &Path, out: &Path) -> impl Fn(&str) -> f32 {
    let before =
        candle_core::safetensors::load(init.join("model.safetensors"), &Device::Cpu).unwrap();
    let after =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    move |k: &str| {
        let a = before[k].to_dtype(candle_core::DType::F32).unwrap();
        crate::common::max_abs_diff(&a, &after[k])
    }
}

/// The mean training loss of a run's first and last four steps.
fn loss_trend(out: &Path) -> (f32, f32) {
    let steps = step_losses(out);
    let mut keys: Vec<u64> = steps.keys().copied().collect();
    keys.sort();
    let losses: Vec<f32> = keys.iter().map(|k| steps[k]).collect();
    assert!(losses.len() >= 8, "{losses:?}");
    let mean = |xs: &[f32]| xs.iter().sum::<f32>() / xs.len() as f32;
    (mean(&losses[..4]), mean(&losses[losses.len() - 4..]))
}

/// The last whole step line of a run's `steps.jsonl` (0 before any).
fn last_logged_step(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("steps.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .last()
        .unwrap_or(0)
}

#[test]
fn a_killed_run_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(&dir.path().join("data"), 96, 4);
    let common = [
        "--epochs",
        "6",
        "--checkpoint-every",
        "0",
        "--val-percent",
        "10",
    ];
    // Uninterrupted.
    let whole = dir.path().join("whole");
    let summary = run_train(&train_cmd(&data, &whole, &common));
    let steps = summary["steps"].as_u64().unwrap();
    assert!(steps >= 40, "{summary}");
    // Killed mid-way (twice, at a third and at two thirds of the steps), then resumed.
    let resumed = dir.path().join("resumed");
    let args = train_cmd(&data, &resumed, &common);
    for target in [steps / 3, 2 * steps / 3] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_clipdex"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Killed as soon as its log reaches the target step: the moment
        // depends on the run's progress, not on how fast this machine is.
        loop {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before step {target}"
            );
            if last_logged_step(&resumed) >= target {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let state: Value =
        serde_json::from_slice(&std::fs::read(resumed.join("checkpoint/state.json")).unwrap())
            .unwrap();
    let at = state["step"].as_u64().unwrap();
    assert!(
        at >= 2 * steps / 3 - 1 && at < steps,
        "the kills should land mid-run (checkpoint at step {at} of {steps})"
    );
    run_train(&args);
    // The log holds each step once, in order, whole lines only (a kill may
    // have torn the last line, and steps past the checkpoint were run twice).
    let logged: Vec<u64> = std::fs::read_to_string(resumed.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l:?}"))["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(logged, (1..=steps).collect::<Vec<_>>());
    // Every step after the resume point has exactly the loss of the uninterrupted run.
    let (a, b) = (step_losses(&whole), step_losses(&resumed));
    for s in at + 1..=steps {
        assert_eq!(a[&s], b[&s], "step {s}");
    }
    let wa = candle_core::safetensors::load(whole.join("model.safetensors"), &Device::Cpu).unwrap();
    let wb =
        candle_core::safetensors::load(resumed.join("model.safetensors"), &Device::Cpu).unwrap();
    for (k, t) in &wa {
        let d = crate::common::max_abs_diff(&t, &wb[k]);
        assert_eq!(d, 0.0, "{k} differs");
    }
}

#[test]
fn the_exported_checkpoint_loads_and_embeds_as_in_training() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(&dir.path().join("data"), 48, 5);
    let out = dir.path().join("model");
    run_train(&train_cmd(&data, &out, &["--epochs", "2"]));
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from the output");
    }
    // The normal loader (inference path) against the training path on the same weights.
    let clip = Clip::load(
        &ModelSource::Dir(out.clone()),
        &HubOptions {
            offline: true,
            progress: false,
        },
    )
    .unwrap();
    let tensors =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let m = build_model(clip.config(), tensors, Freeze::None, Objective::Softmax).unwrap();
    let px = pixels(&dir.path().join("data"), 8, 32);
    let a = clip.image_features(&px).unwrap();
    let b = m.model.get_image_features(&px).unwrap();
    let d = crate::common::max_abs_diff(&a, &b);
    assert!(d < 1e-4, "image features differ by {d}");
    let texts = captions(8);
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| clip.tokenizer().encode(t).unwrap())
        .collect();
    let a = clip.text_features(&ids).unwrap();
    let (tid, pool) = token_batch(clip.tokenizer().as_clip().unwrap(), &texts);
    let b = m.model.get_text_features(&tid, &pool).unwrap();
    let d = crate::common::max_abs_diff(&a, &b);
    assert!(d < 1e-4, "text features differ by {d}");
    // It indexes and embeds like any checkpoint.
    let emb = clipdex(&[
        "embed",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "a red square",
        "--image",
        data.parent()
            .unwrap()
            .join("img/0000.png")
            .to_str()
            .unwrap(),
    ]);
    assert!(emb.status.success(), "{}", stderr(&emb));
}

/// The paper's ResNet trains from scratch: batch statistics while training,
/// running statistics saved with the weights, and the exported checkpoint
/// (batch normalisation folded into the convolutions) embeds as the trained
/// model does in evaluation mode.
#[test]
fn the_papers_resnet_trains_from_scratch_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(&dir.path().join("data"), 48, 11);
    let out = dir.path().join("model");
    let args: Vec<String> = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--config",
        "rn-tiny-64",
        "--batch",
        "8",
        "--seed",
        "3",
        "--epochs",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let summary = run_train(&args);
    assert!(summary["steps"].as_u64().unwrap() >= 8, "{summary}");
    let clip = Clip::load(
        &ModelSource::Dir(out.clone()),
        &HubOptions {
            offline: true,
            progress: false,
        },
    )
    .unwrap();
    assert!(clip.config().vision_config.resnet.is_some());
    let tensors =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    // Training moved the running statistics away from their start (0 and 1),
    // and the resumable checkpoint holds them as the export does.
    let var = tensors["vision_model.bn1.running_var"]
        .to_vec1::<f32>()
        .unwrap();
    assert!(var.iter().any(|v| (v - 1.0).abs() > 1e-3), "{var:?}");
    let ckpt =
        candle_core::safetensors::load(out.join("checkpoint/model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(
        ckpt["vision_model.bn1.running_var"]
            .to_vec1::<f32>()
            .unwrap(),
        var
    );
    let m = build_model(clip.config(), tensors, Freeze::None, Objective::Softmax).unwrap();
    m.model.set_training(false);
    let px = pixels(&dir.path().join("data"), 8, 64);
    let a = clip.image_features(&px).unwrap();
    let b = m.model.get_image_features(&px).unwrap();
    let d = crate::common::max_abs_diff(&a, &b);
    assert!(d < 1e-4, "image features differ by {d}");
}

#[test]
fn training_learns_and_eval_measures_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(&dir.path().join("data"), 192, 6);
    let out = dir.path().join("model");
    let summary = run_train(&train_cmd(
        &data,
        &out,
        &["--epochs", "8", "--lr", "1e-3", "--val-percent", "20"],
    ));
    let history = summary["history"].as_array().unwrap();
    assert_eq!(history.len(), 8);
    // Learning, measured against chance: a model that knows nothing has a
    // contrastive loss of ln(n) over n validation pairs. (The last epoch
    // against the first is no test: on 38 pairs the validation loss moves by
    // a few hundredths from run to run as the model starts to overfit.)
    let n = history[0]["samples"].as_f64().unwrap();
    let losses: Vec<f64> = history
        .iter()
        .map(|h| h["loss"].as_f64().unwrap())
        .collect();
    let best = losses.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        best < 0.5 * n.ln(),
        "best validation loss {best} is not under half of chance ({}): {losses:?}",
        n.ln()
    );
    // Zero-shot on the class folders: 12 classes, chance is 8.3%.
    let classes = dir.path().join("data/classes");
    let out_zs = clipdex(&[
        "eval",
        "zero-shot",
        "--model",
        out.to_str().unwrap(),
        "--data",
        classes.to_str().unwrap(),
        "--json",
    ]);
    assert!(out_zs.status.success(), "{}", stderr(&out_zs));
    let zs: Value = serde_json::from_str(stdout(&out_zs).trim()).unwrap();
    assert_eq!(zs["metrics"]["classes"], 12);
    assert!(
        zs["metrics"]["top1"].as_f64().unwrap() > 20.0,
        "{}",
        zs["metrics"]["top1"]
    );
    // Retrieval on the held-out pairs the run wrote.
    let out_r = clipdex(&[
        "eval",
        "retrieval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        out.join("val.jsonl").to_str().unwrap(),
        "--json",
    ]);
    assert!(out_r.status.success(), "{}", stderr(&out_r));
    let r: Value = serde_json::from_str(stdout(&out_r).trim()).unwrap();
    // Better than chance: a random ranking puts the right match at median
    // rank (n + 1) / 2 of n; the learned one must do clearly better.
    let images = r["metrics"]["images"].as_f64().unwrap();
    let chance_median = (images + 1.0) / 2.0;
    for direction in ["text_to_image", "image_to_text"] {
        let median = r["metrics"][direction]["median_rank"].as_f64().unwrap();
        assert!(
            median < 0.6 * chance_median,
            "{direction} median rank {median}, chance {chance_median}: {}",
            r["metrics"]
        );
    }
    // The plain table too.
    let table = clipdex(&[
        "eval",
        "retrieval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        out.join("val.jsonl").to_str().unwrap(),
    ]);
    assert!(stdout(&table).contains("image -> text") && stdout(&table).contains("median rank"));
    // Linear probe on frozen features, train and test from the class folders.
    let probe = clipdex(&[
        "eval",
        "linear-probe",
        "--model",
        out.to_str().unwrap(),
        "--train",
        classes.to_str().unwrap(),
        "--test",
        classes.to_str().unwrap(),
        "--json",
    ]);
    assert!(probe.status.success(), "{}", stderr(&probe));
    let p: Value = serde_json::from_str(stdout(&probe).trim()).unwrap();
    assert!(p["metrics"]["accuracy"].as_f64().unwrap() > 30.0, "{p}");
}

#[test]
fn bad_rows_are_skipped_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(&dir.path().join("data"), 24, 7);
    let base = data.parent().unwrap();
    std::fs::write(base.join("broken.png"), b"not a png").unwrap();
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"image\": \"missing.png\", \"caption\": \"gone\"}\n");
    text.push_str("{\"image\": \"broken.png\", \"caption\": \"corrupt\"}\n");
    text.push_str("{\"image\": \"img/0001.png\", \"caption\": \"  \"}\n");
    text.push_str("this line is not json\n");
    std::fs::write(&data, text).unwrap();
    let summary = run_train(&train_cmd(
        &data,
        &dir.path().join("out"),
        &["--epochs", "1", "--val-percent", "0"],
    ));
    let skipped = summary["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 4, "{skipped:?}");
    let reasons: Vec<&str> = skipped
        .iter()
        .map(|s| s["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("cannot read")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("not an image")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("caption")), "{reasons:?}");
    assert_eq!(summary["train_samples"], 24);
    // No usable data at all is an error, not a crash.
    std::fs::write(
        base.join("empty.jsonl"),
        "{\"image\": \"missing.png\", \"caption\": \"x\"}\n",
    )
    .unwrap();
    let args = train_cmd(
        &base.join("empty.jsonl"),
        &dir.path().join("out2"),
        &["--epochs", "1"],
    );
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = clipdex(&refs);
    assert!(
        !out.status.success() && stderr(&out).contains("fewer than one batch"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn fine_tuning_siglip_with_the_sigmoid_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(&dir.path().join("data"), 48, 9);
    let init = fixture_model("siglip-tiny");
    let out = dir.path().join("tuned");
    let summary = run_train(&fine_tune_cmd(
        &data,
        &out,
        &init,
        &["--epochs", "8", "--lr", "3e-3", "--val-percent", "25"],
    ));
    // The family's own objective, learning: the training loss falls (the
    // validation set of 12 pairs is too small to show it every time).
    let (early, late) = loss_trend(&out);
    eprintln!("sigmoid fine-tuning: training loss {early:.3} -> {late:.3}");
    assert!(late < 0.85 * early, "training loss {early} -> {late}");
    assert_eq!(summary["history"].as_array().unwrap().len(), 8);
    // The export is a SigLIP checkpoint with the init's tokenizer, and it
    // embeds as the trained weights do.
    assert!(out.join("spiece.model").is_file() && out.join("tokenizer_config.json").is_file());
    let clip = Clip::load(
        &ModelSource::Dir(out.clone()),
        &HubOptions {
            offline: true,
            progress: false,
        },
    )
    .unwrap();
    assert_eq!(clip.config().family, clipdex::model::Family::Siglip);
    let change = weight_change(&init, &out);
    for k in [
        "logit_bias",
        "vision_model.head.probe",
        "text_model.head.weight",
    ] {
        assert!(change(k) > 0.0, "{k} did not move");
    }
    let emb = clipdex(&[
        "embed",
        "--model",
        out.to_str().unwrap(),
        "--text",
        "a red square",
        "--image",
        data.parent()
            .unwrap()
            .join("img/0000.png")
            .to_str()
            .unwrap(),
        "--json",
    ]);
    assert!(emb.status.success(), "{}", stderr(&emb));
    assert!(stdout(&emb).contains("\"probability\""));
    // The three evaluations run on it (the numbers of a 3-epoch tiny model mean little).
    let m = out.to_str().unwrap();
    let classes = dir.path().join("data/classes");
    let classes = classes.to_str().unwrap();
    let val = out.join("val.jsonl");
    for args in [
        vec![
            "eval",
            "zero-shot",
            "--model",
            m,
            "--data",
            classes,
            "--json",
        ],
        vec![
            "eval",
            "retrieval",
            "--model",
            m,
            "--data",
            val.to_str().unwrap(),
            "--json",
        ],
        vec![
            "eval",
            "linear-probe",
            "--model",
            m,
            "--train",
            classes,
            "--test",
            classes,
            "--json",
        ],
    ] {
        let run = clipdex(&args);
        assert!(run.status.success(), "{args:?}: {}", stderr(&run));
        let v: Value = serde_json::from_str(stdout(&run).trim()).unwrap();
        assert!(v["metrics"].is_object(), "{v}");
    }
}

#[test]
fn a_clip_architecture_trains_with_the_sigmoid_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(&dir.path().join("data"), 48, 10);
    let out = dir.path().join("model");
    run_train(&train_cmd(
        &data,
        &out,
        &["--epochs", "6", "--loss", "sigmoid", "--lr", "2e-3"],
    ));
    // The loss falls from the paper's init (t = log 10, b = -10) to about the
    // best constant logit for batches of 8 (-ln(1/8) - 7 ln(7/8) = 3.01) in
    // this short run; that the sigmoid loss then tells pairs apart is
    // `a_siglip_model_overfits_a_fixed_batch_with_the_sigmoid_loss`.
    let (early, late) = loss_trend(&out);
    eprintln!("sigmoid loss, CLIP architecture: training loss {early:.3} -> {late:.3}");
    assert!(late < 0.7 * early, "training loss {early} -> {late}");
    // CLIPModel has no bias: the export leaves it out.
    let exported =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(!exported.contains_key("logit_bias") && exported.contains_key("logit_scale"));
    // Another objective is another run: its checkpoint is not resumed.
    let again = clipdex(
        &train_cmd(
            &data,
            &out,
            &["--epochs", "3", "--loss", "softmax", "--lr", "2e-3"],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(
        !again.status.success() && stderr(&again).contains("another run"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn fine_tuning_with_frozen_towers_moves_only_the_projections() {
    let dir = tempfile::tempdir().unwrap();
    let data = shapes(&dir.path().join("data"), 32, 8);
    let init = fixture_model("openai-tiny");
    let out = dir.path().join("tuned");
    let summary = run_train(&fine_tune_cmd(
        &data,
        &out,
        &init,
        &["--freeze", "towers", "--epochs", "2", "--lr", "1e-3"],
    ));
    assert!(
        summary["trainable_parameters"].as_u64().unwrap()
            < summary["parameters"].as_u64().unwrap() / 10
    );
    let diff = weight_change(&init, &out);
    assert_eq!(diff("vision_model.encoder.layers.0.mlp.fc1.weight"), 0.0);
    assert_eq!(diff("text_model.embeddings.token_embedding.weight"), 0.0);
    assert!(diff("visual_projection.weight") > 0.0);
    assert!(diff("text_projection.weight") > 0.0);
    // The tokenizer and preprocessing of the init checkpoint carry over.
    assert!(out.join("tokenizer.json").is_file());
    assert_eq!(
        std::fs::read_to_string(out.join("config.json"))
            .unwrap()
            .contains("quick_gelu"),
        true
    );
}

#[test]
fn a_siglip_model_overfits_a_fixed_batch_with_the_sigmoid_loss() {
    let dir = tempfile::tempdir().unwrap();
    shapes(dir.path(), 12, 2);
    let (clip, tensors) = siglip_fixture();
    let m = build_model(clip.config(), tensors, Freeze::None, Objective::Sigmoid).unwrap();
    let tok = clip.tokenizer();
    let rows: Vec<Vec<u32>> = captions(12)
        .iter()
        .map(|t| tok.encode(t).unwrap())
        .collect();
    let len = rows[0].len();
    let ids = Tensor::from_vec(rows.concat(), (12, len), &Device::Cpu).unwrap();
    let pool = vec![len - 1; 12];
    let px = pixels(dir.path(), 12, clip.preprocessor().image_size());
    let find = |name: &str| {
        m.trainable
            .iter()
            .find(|(k, _)| k == name)
            .unwrap()
            .1
            .clone()
    };
    let (scale, bias) = (find("logit_scale"), find("logit_bias"));
    let mut opt = AdamW::new(
        m.trainable.clone(),
        AdamWConfig {
            weight_decay: 0.0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut losses = Vec::new();
    for _ in 0..120 {
        let (loss, _) = Objective::Sigmoid
            .loss(
                &m.model.get_image_features(&px).unwrap(),
                &m.model.get_text_features(&ids, &pool).unwrap(),
                scale.as_tensor(),
                Some(bias.as_tensor()),
            )
            .unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads, 2e-3).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
    }
    // A model that cannot tell the pairs apart does no better than the best
    // constant logit: -ln(1/12) - 11 ln(11/12) = 3.44 for 12 pairs.
    let floor = -(1.0f32 / 12.0).ln() - 11.0 * (11.0f32 / 12.0).ln();
    let last = *losses.last().unwrap();
    assert!(
        last < 0.3 * floor,
        "loss {} -> {last} (no-discrimination floor {floor})",
        losses[0]
    );
}
