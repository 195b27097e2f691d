//! `clipdex embed`: embeddings of texts and images, and their similarities.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use serde::Serialize;

use super::EmbedArgs;
use crate::library::{DecodeLimits, decode_file};
use crate::model::{ModelInfo, RgbView, Towers};

/// Images per forward pass.
const IMAGE_BATCH: usize = 16;

#[derive(Serialize)]
struct Output<'a> {
    model: ModelOutput<'a>,
    inputs: Inputs<'a>,
    text: Vec<Vec<f32>>,
    image: Vec<Vec<f32>>,
    /// Cosine similarity, one row per image, one column per text.
    #[serde(skip_serializing_if = "Option::is_none")]
    similarity: Option<Vec<Vec<f32>>>,
    /// `exp(t) * cosine` (plus `b` for SigLIP), as the reference's `logits_per_image`.
    #[serde(skip_serializing_if = "Option::is_none")]
    logits_per_image: Option<Vec<Vec<f32>>>,
    /// SigLIP: `sigmoid(logits_per_image)`, the match probability of each pair.
    #[serde(skip_serializing_if = "Option::is_none")]
    probability: Option<Vec<Vec<f32>>>,
}

#[derive(Serialize)]
struct ModelOutput<'a> {
    #[serde(flatten)]
    info: &'a ModelInfo,
    logit_scale: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    logit_bias: Option<f32>,
}

#[derive(Serialize)]
struct Inputs<'a> {
    text: &'a [String],
    image: Vec<String>,
}

pub fn run(args: &EmbedArgs) -> Result<()> {
    if args.texts.is_empty() && args.images.is_empty() {
        bail!("nothing to embed: pass --text TEXT and/or --image PATH");
    }
    // Check every input before loading a model (which may mean a download).
    let mut problems = Vec::new();
    for (i, text) in args.texts.iter().enumerate() {
        if text.trim().is_empty() {
            problems.push(format!("text {i}: empty text"));
        }
    }
    let limits = DecodeLimits::default();
    let decoded: Vec<_> = args
        .images
        .par_iter()
        .map(|p| decode_file(p, &limits))
        .collect();
    let mut images = Vec::new();
    for (i, (path, result)) in args.images.iter().zip(decoded).enumerate() {
        match result {
            Ok(image) => images.push(image.rgb),
            Err(e) => problems.push(format!("image {i} ({}): {e}", path.display())),
        }
    }
    if !problems.is_empty() {
        for problem in &problems {
            eprintln!("error: {problem}");
        }
        bail!(
            "{} of {} inputs cannot be embedded",
            problems.len(),
            args.texts.len() + args.images.len()
        );
    }

    let source = args.model.source()?;
    // Texts alone leave the image tower in the checkpoint.
    let towers = match images.is_empty() {
        true => Towers::TextFirst,
        false => Towers::Both,
    };
    let clip = args
        .model
        .load_towers(&source, args.model.precision.unwrap_or_default(), towers)?;

    let texts: Vec<&str> = args.texts.iter().map(String::as_str).collect();
    let text = clip.embed_texts(&texts).context("cannot embed the texts")?;
    let mut image = Vec::with_capacity(images.len());
    for chunk in images.chunks(IMAGE_BATCH) {
        let views = chunk
            .iter()
            .map(|im| RgbView::new(im.width() as usize, im.height() as usize, im.as_raw()))
            .collect::<Result<Vec<_>, _>>()?;
        image.extend(
            clip.embed_images(&views)
                .context("cannot embed the images")?,
        );
    }
    let scale = clip.logit_scale()?;
    let bias = clip.logit_bias()?;
    let calibration = bias.map(|bias| crate::model::Calibration { scale, bias });
    let similarity = (!text.is_empty() && !image.is_empty()).then(|| {
        image
            .iter()
            .map(|i| text.iter().map(|t| dot(i, t)).collect::<Vec<f32>>())
            .collect::<Vec<_>>()
    });
    let each = |f: &dyn Fn(f32) -> f32| -> Option<Vec<Vec<f32>>> {
        similarity.as_ref().map(|s| {
            s.iter()
                .map(|row| row.iter().map(|&c| f(c)).collect())
                .collect()
        })
    };
    let output = Output {
        model: ModelOutput {
            info: clip.info(),
            logit_scale: scale,
            logit_bias: bias,
        },
        inputs: Inputs {
            text: &args.texts,
            image: args
                .images
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
        },
        logits_per_image: each(&|c| c * scale + bias.unwrap_or(0.0)),
        probability: calibration.and_then(|cal| each(&|c| cal.probability(c))),
        similarity,
        text,
        image,
    };
    if args.json {
        println!("{}", serde_json::to_string(&output)?);
    } else {
        print_plain(&output, &args.images);
    }
    Ok(())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn preview(v: &[f32]) -> String {
    let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:+.4}")).collect();
    format!("[{}, ... {} values]", head.join(", "), v.len())
}

fn print_plain(out: &Output, paths: &[PathBuf]) {
    let info = out.model.info;
    println!(
        "model {} ({}-d, {} px, {} precision, fingerprint {})",
        info.id, info.embedding_dim, info.image_size, info.precision, info.fingerprint
    );
    for (i, (t, v)) in out.inputs.text.iter().zip(&out.text).enumerate() {
        println!("text[{i}]  {t:?}\n          {}", preview(v));
    }
    for (i, (p, v)) in paths.iter().zip(&out.image).enumerate() {
        println!("image[{i}] {}\n          {}", p.display(), preview(v));
    }
    let (Some(sim), Some(logits)) = (&out.similarity, &out.logits_per_image) else {
        return;
    };
    // In brackets, per pair: SigLIP's match probability, or CLIP's softmax over the texts.
    let (label, shares) = match &out.probability {
        Some(p) => (
            "SigLIP's match probability, sigmoid of the logit",
            p.clone(),
        ),
        None => (
            "softmax over texts, as CLIP zero-shot",
            logits.iter().map(|row| softmax(row)).collect(),
        ),
    };
    println!("\ncosine similarity ({label}, in brackets):");
    print!("{:>10}", "");
    for j in 0..out.text.len() {
        print!("{:>18}", format!("text[{j}]"));
    }
    println!();
    for (i, (row, share_row)) in sim.iter().zip(&shares).enumerate() {
        print!("{:>10}", format!("image[{i}]"));
        for (c, p) in row.iter().zip(share_row) {
            print!("{:>18}", format!("{c:+.4} ({:5.1}%)", 100.0 * p));
        }
        println!();
    }
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = row.iter().map(|l| (l - max).exp()).collect();
    let total: f32 = exp.iter().sum();
    exp.iter().map(|e| e / total).collect()
}
