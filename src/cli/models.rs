//! `clipdex models`: the recommended checkpoints, which are in the local hub
//! cache, and (with `--measure`) how fast each cached one runs here.

use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use super::ModelsArgs;
use crate::model::catalog::{RECOMMENDED, Recommended};
use crate::model::checkpoint::is_cached;
use crate::model::{Clip, HubOptions, ModelSource};

#[derive(Serialize)]
struct Row {
    #[serde(flatten)]
    model: Recommended,
    cached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    speed: Option<Speed>,
}

/// Measured on this machine with the current thread count.
#[derive(Clone, Copy, Serialize)]
struct Speed {
    images_per_second: f64,
    query_ms: f64,
}

/// Images/s at batch 16 (random pixels: decoding is not the model's cost) and
/// the median latency of an 8-word query.
fn measure(clip: &Clip) -> Result<Speed> {
    let s = clip.preprocessor().image_size();
    let mut rng = crate::common::rng::NormalRng::new(1);
    let data: Vec<f32> = (0..16 * 3 * s * s).map(|_| rng.normal() as f32).collect();
    let pixels = candle_core::Tensor::from_vec(data, (16, 3, s, s), clip.device())?;
    clip.image_features(&pixels)?;
    let runs = 2;
    let start = Instant::now();
    for _ in 0..runs {
        clip.image_features(&pixels)?;
    }
    let images_per_second = (16 * runs) as f64 / start.elapsed().as_secs_f64();
    let mut times: Vec<f64> = (0..11)
        .map(|_| {
            let t = Instant::now();
            clip.embed_texts(&["a photo of a dog on the beach"])
                .map(|_| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    times.sort_by(f64::total_cmp);
    Ok(Speed {
        images_per_second,
        query_ms: times[times.len() / 2],
    })
}

pub fn run(args: &ModelsArgs) -> Result<()> {
    let mut rows = Vec::new();
    for model in RECOMMENDED {
        let cached = is_cached(model.id);
        let speed = if args.measure && cached {
            let source = ModelSource::parse(model.id)?;
            let clip = Clip::load(
                &source,
                &HubOptions {
                    offline: true,
                    progress: false,
                },
            )
            .with_context(|| format!("cannot load the cached {}", model.id))?;
            Some(measure(&clip)?)
        } else {
            None
        };
        rows.push(Row {
            model: *model,
            cached,
            speed,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<46} {:<7} {:<22} {:>4} {:<12} {:>8} {:<7}{}",
        "model",
        "family",
        "architecture",
        "dim",
        "languages",
        "download",
        "cached",
        if args.measure {
            "  images/s  query ms"
        } else {
            ""
        }
    );
    for row in &rows {
        let m = &row.model;
        let speed = match row.speed {
            Some(s) => format!("  {:>8.1}  {:>8.1}", s.images_per_second, s.query_ms),
            None if args.measure => format!("  {:>8}  {:>8}", "-", "-"),
            None => String::new(),
        };
        println!(
            "{:<46} {:<7} {:<22} {:>4} {:<12} {:>6} MB {:<7}{speed}",
            m.id,
            m.family.name(),
            m.architecture,
            m.embedding_dim,
            m.languages,
            m.download_mb,
            if row.cached { "yes" } else { "no" },
        );
    }
    println!();
    if let Some(m) = RECOMMENDED.first() {
        println!("Best all-round: {} ({}).", m.id, m.note);
    }
    println!(
        "Use one with --model ID on index, embed, train and eval; switch an index with `clipdex reindex --model ID`."
    );
    if !args.measure {
        println!(
            "--measure times every cached model on this machine (images/s at batch 16, one query)."
        );
    }
    Ok(())
}
