//! `clipdex train` and `clipdex eval`.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use super::{EvalArgs, EvalCommand, TrainArgs};
use crate::eval;
use crate::model::{Clip, ClipConfig, HubOptions, ModelSource, Precision};
use crate::train::data::{self, DEFAULT_TEMPLATES, ImageSet};
use crate::train::{self, Start, TrainOptions, TrainProgress};

fn templates(file: Option<&Path>) -> Result<Vec<String>> {
    match file {
        None => Ok(DEFAULT_TEMPLATES.iter().map(|t| t.to_string()).collect()),
        Some(f) => {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?;
            let t: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(String::from)
                .collect();
            if t.is_empty() || t.iter().any(|l| !l.contains("{}")) {
                bail!(
                    "{}: one template per line, each with {{}} where the class name goes",
                    f.display()
                );
            }
            Ok(t)
        }
    }
}

fn start(args: &TrainArgs) -> Result<Start> {
    match (&args.init, &args.config) {
        (Some(_), Some(_)) => {
            bail!("give --init (fine-tune a checkpoint) or --config (train from scratch), not both")
        }
        (Some(init), None) => Ok(Start::Checkpoint(ModelSource::parse(init)?)),
        (None, config) => {
            let name = config.as_deref().unwrap_or("small-32");
            match ClipConfig::preset(name) {
                Some(c) => Ok(Start::Scratch(c)),
                None if Path::new(name).is_file() => {
                    let text = std::fs::read_to_string(name)?;
                    Ok(Start::Scratch(ClipConfig::from_json(&text)?))
                }
                None => bail!(
                    "--config {name} is neither a preset ({}) nor a config.json",
                    ClipConfig::PRESETS.join(", ")
                ),
            }
        }
    }
}

pub fn train(args: &TrainArgs) -> Result<()> {
    let start = start(args)?;
    let fine_tuning = matches!(start, Start::Checkpoint(_));
    let opts = TrainOptions {
        data: args.data.clone(),
        val: args.val.clone(),
        val_percent: args.val_percent,
        out: args.out.clone(),
        start,
        epochs: args.epochs,
        batch: args.batch,
        lr: args.lr.unwrap_or(if fine_tuning { 1e-5 } else { 5e-4 }),
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        seed: args.seed,
        freeze: args
            .freeze
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))?,
        loss: args
            .loss
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: String| anyhow::anyhow!(e))?,
        templates: templates(args.templates.as_deref())?,
        checkpoint_every: Duration::from_secs(args.checkpoint_every),
        hub: HubOptions::from_env(args.offline, true),
    };
    if args.batch < 2 {
        bail!("--batch must be at least 2: the loss contrasts the pairs of a batch");
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] step {pos}/{len}  {msg}  ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    let mut printed_epochs = 0;
    let json = args.json;
    let mut callback = |p: &TrainProgress| {
        bar.set_length(p.total_steps);
        bar.set_position(p.step);
        bar.set_message(format!(
            "epoch {}/{}  loss {:.4}  lr {:.2e}  temp {:.1}  {:.1} samples/s",
            p.epoch + 1,
            p.epochs,
            p.loss,
            p.lr,
            p.temperature,
            p.samples_per_second
        ));
        if let Some(v) = &p.validation {
            if v.epoch > printed_epochs && !json {
                printed_epochs = v.epoch;
                bar.println(format!(
                    "epoch {:>3}: val loss {:.4}  image->text R@1 {:.1}  R@5 {:.1}  text->image R@1 {:.1}  R@5 {:.1}  ({} pairs)",
                    v.epoch, v.loss, v.image_to_text_r1, v.image_to_text_r5, v.text_to_image_r1, v.text_to_image_r5, v.samples
                ));
            }
        }
    };
    let stop = AtomicBool::new(false);
    let summary = train::train(&opts, &mut callback, &stop);
    bar.finish_and_clear();
    let summary = summary?;
    if json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    println!(
        "trained {} steps on {} pairs ({} for validation) in {:.0} s ({:.0} s of it validating and saving), {:.1} samples/s",
        summary.steps,
        summary.train_samples,
        summary.val_samples,
        summary.seconds,
        summary.overhead_seconds,
        summary.samples_per_second
    );
    println!(
        "{} parameters, {} trained; the model is in {} (a Hugging Face checkpoint)",
        summary.parameters,
        summary.trainable_parameters,
        summary.out.display()
    );
    if !summary.skipped.is_empty() {
        println!("{} items skipped:", summary.skipped.len());
        for p in summary.skipped.iter().take(20) {
            println!("  {}: {}", p.item, p.reason);
        }
        if summary.skipped.len() > 20 {
            println!("  ... ({} more)", summary.skipped.len() - 20);
        }
    }
    Ok(())
}

fn load_model(model: &str, offline: bool, precision: Precision) -> Result<Clip> {
    super::load_model(&ModelSource::parse(model)?, offline, precision)
}

fn load_images(
    clip: &Clip,
    path: &Path,
    templates: &[String],
) -> Result<(Vec<data::Sample>, ImageSet, usize)> {
    let d =
        data::load(path, templates).with_context(|| format!("cannot read {}", path.display()))?;
    let problems = d.problems.len();
    let (images, kept, bad) = ImageSet::prepare(&d.samples, clip.preprocessor());
    for p in d.problems.iter().chain(&bad) {
        tracing::warn!(item = %p.item, reason = %p.reason, "skipping");
    }
    let samples = kept.iter().map(|&i| d.samples[i].clone()).collect();
    Ok((samples, images, problems + bad.len()))
}

pub fn eval(args: &EvalArgs) -> Result<()> {
    let clip = load_model(&args.model, args.offline, args.precision)?;
    match &args.command {
        EvalCommand::Retrieval { data } => eval_retrieval(args, &clip, data),
        EvalCommand::ZeroShot {
            data,
            templates: file,
        } => eval_zero_shot(args, &clip, data, file.as_deref()),
        EvalCommand::LinearProbe { train, test } => eval_linear_probe(args, &clip, train, test),
    }
}

/// The sorted class names of labelled samples, and each sample's class index.
fn classes_of<'s>(
    samples: impl Iterator<Item = &'s data::Sample> + Clone,
) -> (Vec<String>, Vec<u32>) {
    let mut classes: Vec<String> = samples.clone().filter_map(|s| s.label.clone()).collect();
    classes.sort();
    classes.dedup();
    let labels = samples
        .map(|s| {
            s.label
                .as_ref()
                .and_then(|l| classes.binary_search(l).ok())
                .unwrap_or(0) as u32
        })
        .collect();
    (classes, labels)
}

fn eval_retrieval(args: &EvalArgs, clip: &Clip, data: &Path) -> Result<()> {
    let (samples, images, skipped) = load_images(clip, data, &[])?;
    if samples.len() < 2 {
        bail!("{} has fewer than two usable pairs", data.display());
    }
    let m = eval::retrieval(clip, &samples, &images, args.batch)?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"task": "retrieval", "model": clip.info().id, "skipped": skipped, "metrics": m})
        );
        return Ok(());
    }
    println!(
        "retrieval on {} images, {} texts ({skipped} skipped)",
        m.images, m.texts
    );
    println!(
        "{:<16}{:>8}{:>8}{:>8}{:>14}",
        "", "R@1", "R@5", "R@10", "median rank"
    );
    for (name, r) in [
        ("image -> text", m.image_to_text),
        ("text -> image", m.text_to_image),
    ] {
        println!(
            "{name:<16}{:>8.2}{:>8.2}{:>8.2}{:>14.1}",
            r.r1, r.r5, r.r10, r.median_rank
        );
    }
    Ok(())
}

fn eval_zero_shot(args: &EvalArgs, clip: &Clip, data: &Path, file: Option<&Path>) -> Result<()> {
    let t = templates(file)?;
    let (samples, images, skipped) = load_images(clip, data, &t)?;
    let (classes, labels) = classes_of(samples.iter());
    if classes.len() < 2 {
        bail!(
            "{} needs labelled images of at least two classes (class sub-folders, or JSONL with \"label\")",
            data.display()
        );
    }
    let labels: Vec<usize> = labels.into_iter().map(|l| l as usize).collect();
    let class_emb = eval::class_embeddings(clip, &classes, &t)?;
    let emb = eval::embed_samples(clip, &images, args.batch)?;
    let m = eval::zero_shot_from_embeddings(&emb, &labels, &classes, &class_emb);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"task": "zero-shot", "model": clip.info().id, "templates": t.len(), "skipped": skipped, "metrics": m})
        );
        return Ok(());
    }
    println!(
        "zero-shot on {} images, {} classes, {} templates ({skipped} skipped): top-1 {:.2}%, top-5 {:.2}%",
        m.images,
        m.classes,
        t.len(),
        m.top1,
        m.top5
    );
    println!(
        "{:<24}{:>8}{:>10}  most often taken for",
        "class", "images", "accuracy"
    );
    for c in &m.per_class {
        let conf = c
            .confused_with
            .as_ref()
            .map(|(n, p)| format!("{n} ({p:.1}%)"))
            .unwrap_or_default();
        println!("{:<24}{:>8}{:>9.1}%  {conf}", c.class, c.images, c.accuracy);
    }
    Ok(())
}

fn eval_linear_probe(args: &EvalArgs, clip: &Clip, train: &Path, test: &Path) -> Result<()> {
    let (train_s, train_i, s1) = load_images(clip, train, &[])?;
    let (test_s, test_i, s2) = load_images(clip, test, &[])?;
    let (classes, mut labels) = classes_of(train_s.iter().chain(&test_s));
    if classes.len() < 2 {
        bail!(
            "the linear probe needs labelled images (class sub-folders, or JSONL with \"label\")"
        );
    }
    let vy = labels.split_off(train_s.len());
    let ty = labels;
    let tx = eval::embed_samples(clip, &train_i, args.batch)?;
    let vx = eval::embed_samples(clip, &test_i, args.batch)?;
    let m = eval::linear_probe(&tx, &ty, &vx, &vy, classes.len())?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"task": "linear-probe", "model": clip.info().id, "skipped": s1 + s2, "metrics": m})
        );
        return Ok(());
    }
    println!(
        "linear probe: {} train and {} test images, {} classes ({} skipped): accuracy {:.2}% (L2 {:e})",
        m.train_images,
        m.test_images,
        m.classes,
        s1 + s2,
        m.accuracy,
        m.l2
    );
    Ok(())
}
