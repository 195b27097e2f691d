//! Model speed on a full-size architecture (random weights): image
//! embeddings per second at batch 1 and 16, the latency of an 8-word text
//! query (10 CLIP tokens) and of 32 queries of 1 to 12 words embedded
//! together, with a fixed number of threads.
//!
//!     cargo bench --bench model -- [--threads 2] [--dir target/bench/vit-b-32] [--json]
//!         [--only batch1|batch16|text|texts32|fidelity|gemm|bf16] [--unpacked] [--precision exact|fast]
//!         [--layers KIND,KIND,...|none] [--int8 KIND,KIND,...|none] [--photos DIR] [--repeat N]
//!
//! `--only bf16` times the bf16 AMX product alone, weights in cache and
//! streamed. `--precision fast` measures the bf16 towers (`model::bf16`), and prints
//! the smallest cosine between their embeddings and exact ones: on random
//! pixels, and with `--photos DIR` on every picture under DIR and a set of
//! captions. `--layers` converts only the layer kinds named (`patch`, `qkv`,
//! `attn-out`, `mlp-up`, `mlp-down`, `conv`, `projection`; `none`), for the
//! per-layer table of BENCHMARKS.md (`scripts/bench/precision_layers.sh`).
//!
//! `--unpacked` loads the model with candle's matrix product instead of the
//! packed-weight kernel (`model::gemm`), to compare the two in one run;
//! `--only gemm` times single products both ways at the towers' shapes.
//! `--repeat N` times N times as many runs, for a profile of one measurement.
//!
//! Without a checkpoint in `--dir` it writes a ViT-B/32 one (config, weights,
//! tokenizer); `scripts/reference/bench_model.py` loads the same folder into
//! transformers' `CLIPModel`, so `scripts/bench/model.sh` compares both on the
//! same weights in one run. Any other folder (the SigLIP one that
//! `FAMILY=siglip scripts/bench/model.sh` writes) is measured as it is.

use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use clipdex::model::checkpoint::{HubOptions, ModelSource};
use clipdex::model::init::{NormalRng, init_weights};
use clipdex::model::{Clip, ClipConfig, Precision, TextTokenizer};

/// Ten tokens with start and end: eight words of CLIP BPE.
pub const QUERY: &str = "a photo of a dog on the beach";

/// The words of [`mixed_queries`], as `scripts/reference/bench_ort.py` has them.
const MIXED_WORDS: [&str; 12] = [
    "red", "dog", "old", "cat", "small", "beach", "bright", "mountain", "dark", "sunset", "green",
    "car",
];

/// 32 queries of 1 to 12 words and a number (5 to 17 CLIP tokens), embedded
/// together as the server embeds concurrent queries.
fn mixed_queries() -> Vec<String> {
    (0..32)
        .map(|i| format!("{} {}", MIXED_WORDS[..1 + i % 12].join(" "), 1000 + i))
        .collect()
}

struct Args {
    threads: usize,
    dir: PathBuf,
    json: bool,
    /// Run one measurement only (`batch1`, `batch16`, `text` or `texts32`),
    /// for profiling.
    only: Option<String>,
    /// candle's matrix product instead of the packed kernel (`model::gemm`).
    unpacked: bool,
    precision: Precision,
    /// The layer kinds `fast` converts (`model::bf16::LayerKind` names).
    layers: Option<String>,
    /// The converted layer kinds that go to int8 instead of bf16.
    int8: Option<String>,
    /// Pictures to measure fidelity on.
    photos: Option<PathBuf>,
    /// Times as many timed runs as usual, for profiling (`--repeat N`).
    repeat: usize,
}

/// Captions for the text side of the fidelity measurement.
const CAPTIONS: &[&str] = &[
    QUERY,
    "a diagram of a bicycle",
    "two children playing football in a park",
    "a red car parked in front of a house",
    "a bowl of soup on a wooden table",
    "the night sky full of stars",
    "a cat sleeping on a sofa",
    "a map of the city centre",
    "a screenshot of a spreadsheet",
    "snow on the mountains at sunrise",
    "a wind turbine on a hill",
    "an old black and white portrait of a woman",
    "fish swimming in a coral reef",
    "a hammer and a screwdriver",
    "a birthday cake with candles",
    "a crowded train station",
    "a handwritten letter",
    "a close-up of a sunflower",
    "a bridge over a river at night",
    "a dog catching a frisbee",
];

fn args() -> Args {
    let mut a = Args {
        threads: 2,
        dir: PathBuf::from("target/bench/vit-b-32"),
        json: false,
        only: None,
        unpacked: false,
        precision: Precision::Exact,
        layers: None,
        photos: None,
        int8: None,
        repeat: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--threads" => a.threads = it.next().and_then(|v| v.parse().ok()).expect("--threads N"),
            "--dir" => a.dir = PathBuf::from(it.next().expect("--dir DIR")),
            "--json" => a.json = true,
            "--unpacked" => a.unpacked = true,
            "--only" => a.only = it.next(),
            "--layers" => a.layers = Some(it.next().expect("--layers KIND,KIND,...|none")),
            "--int8" => a.int8 = Some(it.next().expect("--int8 KIND,KIND,...|none")),
            "--photos" => a.photos = Some(PathBuf::from(it.next().expect("--photos DIR"))),
            "--precision" => {
                a.precision = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--precision exact|fast")
            }
            "--repeat" => a.repeat = it.next().and_then(|v| v.parse().ok()).expect("--repeat N"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// Writes a random-weight ViT-B/32 checkpoint with the real CLIP tokenizer.
fn write_checkpoint(dir: &PathBuf) {
    if dir.join("model.safetensors").is_file() || dir.join("open_clip_config.json").is_file() {
        return;
    }
    std::fs::create_dir_all(dir).unwrap();
    let config = ClipConfig::vit_base_patch32();
    std::fs::write(dir.join("config.json"), config.to_json()).unwrap();
    let weights = init_weights(&config, 0, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    let tokenizer = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models/openai-tiny/tokenizer.json.gz");
    let mut reader = flate2::read::GzDecoder::new(std::fs::File::open(tokenizer).unwrap());
    let mut out = std::fs::File::create(dir.join("tokenizer.json")).unwrap();
    std::io::copy(&mut reader, &mut out).unwrap();
}

fn time<F: FnMut()>(warmup: usize, runs: usize, mut f: F) -> Vec<f64> {
    for _ in 0..warmup {
        f();
    }
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect()
}

/// The bf16 AMX product alone (`--only bf16`), on the pool's threads: one
/// weight used again and again (in cache), and 12 in turn (streamed from
/// memory, as a tower's layers are).
fn bf16_products(threads: usize) {
    use clipdex::model::bf16::{Bf16Matrix, dense};
    use clipdex::model::ops::Pointwise;
    // ViT-B's MLP, attention and (2048, 512) its text tower's contraction,
    // (4096, 1024) ViT-L's: activation rows of 4 and 8 KB.
    let shapes = [
        (768, 3072),
        (3072, 768),
        (768, 2304),
        (768, 768),
        (2048, 512),
        (4096, 1024),
    ];
    for m in [800, 64, 50, 10] {
        for (k, n) in shapes {
            let a = Tensor::ones((m, k), candle_core::DType::F32, &Device::Cpu).unwrap();
            let ws: Vec<_> = (0..12)
                .filter_map(|_| {
                    let w = Tensor::ones((n, k), candle_core::DType::F32, &Device::Cpu).unwrap();
                    Bf16Matrix::new(&w).unwrap().map(std::sync::Arc::new)
                })
                .collect();
            if ws.is_empty() {
                println!("no AMX here");
                return;
            }
            let flop = 2.0 * (m * k * n) as f64;
            let hot = median(time(3, 30, || {
                rayon::join(
                    || dense(&a, &ws[0], None, Pointwise::Identity).unwrap(),
                    || (),
                );
            }));
            let cold = median(time(2, 10, || {
                rayon::join(
                    || {
                        for w in &ws {
                            dense(&a, w, None, Pointwise::Identity).unwrap();
                        }
                    },
                    || (),
                );
            })) / 12.0;
            println!(
                "bf16 {m}x{k}x{n}, {threads} threads: {:.0} GFLOP/s in cache, {:.0} streamed ({:.1} GB/s of weights)",
                flop / hot / 1e9,
                flop / cold / 1e9,
                (2 * k * n) as f64 / cold / 1e9
            );
        }
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    let args = args();
    // SAFETY: single-threaded here; candle reads this when it first multiplies.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string()) };
    // As the clipdex binary does (src/main.rs): keep freed pages (each
    // return costs page faults on the next tensor), and spin less.
    // SAFETY: a plain option setter, called before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(clipdex::library::memory::MI_OPTION_PURGE_DELAY, -1) };
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "2000") };
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .ok();
    if args.only.as_deref() == Some("bf16") {
        bf16_products(args.threads);
        return;
    }
    if args.only.as_deref() == Some("gemm") {
        // The matrix multiply alone, at an MLP's shape, for as many rows as
        // 16 ViT-B/16 or B/32 images, one image, a SigLIP text, a query;
        // weights stored (in, out) as clipdex stores them, and (out, in) read
        // transposed. (Alone, the second is faster at 32 to 150 rows; inside
        // the towers it made SigLIP queries and batch-1 images slower.)
        let shapes = [(768, 3072), (3072, 768), (768, 2304), (768, 768)];
        for (m, (k, n)) in [3152, 800, 197, 64, 50, 10, 1]
            .into_iter()
            .flat_map(|m| shapes.into_iter().map(move |s| (m, s)))
        {
            let a = Tensor::ones((m, k), candle_core::DType::F32, &Device::Cpu).unwrap();
            let b = Tensor::ones((k, n), candle_core::DType::F32, &Device::Cpu).unwrap();
            let bt = Tensor::ones((n, k), candle_core::DType::F32, &Device::Cpu).unwrap();
            if let Some(packed) = clipdex::model::gemm::PackedMatrix::new(&bt).unwrap() {
                let packed = std::sync::Arc::new(packed);
                let t = median(time(3, 30 * args.repeat, || {
                    clipdex::model::gemm::dense(
                        &a,
                        &packed,
                        None,
                        clipdex::model::ops::Pointwise::Identity,
                    )
                    .unwrap();
                }));
                println!(
                    "gemm {m}x{k}x{n}, weights packed, {} threads: {:.1} GFLOP/s",
                    args.threads,
                    2.0 * (m * k * n) as f64 / t / 1e9
                );
            }
            for (label, rhs) in [("(in, out)", b), ("(out, in)^T", bt.t().unwrap())] {
                let t = median(time(3, 30 * args.repeat, || {
                    a.matmul(&rhs).unwrap();
                }));
                println!(
                    "gemm {m}x{k}x{n}, weights {label}, {} threads: {:.1} GFLOP/s",
                    args.threads,
                    2.0 * (m * k * n) as f64 / t / 1e9
                );
            }
        }
        // Cold weights, as a tower streams them: 12 layers' worth in turn.
        for m in [800, 64, 50] {
            let (k, n) = (768, 3072);
            let a = Tensor::ones((m, k), candle_core::DType::F32, &Device::Cpu).unwrap();
            let bs: Vec<Tensor> = (0..12)
                .map(|_| Tensor::ones((k, n), candle_core::DType::F32, &Device::Cpu).unwrap())
                .collect();
            let t = median(time(2, 10, || {
                for b in &bs {
                    a.matmul(b).unwrap();
                }
            }));
            println!(
                "gemm {m}x{k}x{n}, 12 cold weights (in, out), {} threads: {:.1} GFLOP/s",
                args.threads,
                12.0 * 2.0 * (m * k * n) as f64 / t / 1e9
            );
            let packed: Vec<_> = bs
                .iter()
                .filter_map(|b| clipdex::model::gemm::PackedMatrix::new(&b.t().unwrap()).unwrap())
                .map(std::sync::Arc::new)
                .collect();
            if !packed.is_empty() {
                let t = median(time(2, 10, || {
                    for p in &packed {
                        clipdex::model::gemm::dense(
                            &a,
                            p,
                            None,
                            clipdex::model::ops::Pointwise::Identity,
                        )
                        .unwrap();
                    }
                }));
                println!(
                    "gemm {m}x{k}x{n}, 12 cold weights packed, {} threads: {:.1} GFLOP/s",
                    args.threads,
                    12.0 * 2.0 * (m * k * n) as f64 / t / 1e9
                );
            }
            let t = median(time(2, 10, || {
                for b in &bs {
                    let (l, r) = rayon::join(
                        || a.matmul(&b.narrow(1, 0, n / 2).unwrap()).unwrap(),
                        || a.matmul(&b.narrow(1, n / 2, n / 2).unwrap()).unwrap(),
                    );
                    Tensor::cat(&[l, r], 1).unwrap();
                }
            }));
            println!(
                "gemm {m}x{k}x{n}, 12 cold weights (in, out), split in columns, {} threads: {:.1} GFLOP/s",
                args.threads,
                12.0 * 2.0 * (m * k * n) as f64 / t / 1e9
            );
        }
        return;
    }
    write_checkpoint(&args.dir);
    clipdex::model::gemm::set_enabled(!args.unpacked);
    let load_with = |precision| {
        Clip::load_with(
            &ModelSource::Dir(args.dir.clone()),
            &HubOptions {
                offline: true,
                progress: false,
            },
            precision,
        )
        .unwrap()
    };
    let load = || load_with(Precision::Exact);
    if let Some(list) = &args.layers {
        clipdex::model::bf16::set_converted(&layer_kinds("--layers", list));
    }
    if let Some(list) = &args.int8 {
        clipdex::model::bf16::set_int8(&layer_kinds("--int8", list));
    }
    let clip = load_with(args.precision);
    let tokenizer = clip.tokenizer();
    let ids = tokenizer.encode(QUERY).unwrap();
    // The query's own tokens; SigLIP pads every text to its fixed length.
    let tokens = match tokenizer {
        TextTokenizer::Clip(_) | TextTokenizer::OpenClip(_) | TextTokenizer::Hf(_) => ids.len(),
        TextTokenizer::Fixed(_) => ids.iter().filter(|&&t| t != tokenizer.pad_id()).count() + 1,
    };
    if matches!(
        tokenizer,
        TextTokenizer::Clip(_) | TextTokenizer::OpenClip(_)
    ) {
        assert_eq!(tokens, 10, "the query should be 10 CLIP tokens");
    }

    let mut rng = NormalRng::new(1);
    let size = clip.preprocessor().image_size();
    let pixels = |b: usize, rng: &mut NormalRng| {
        let data: Vec<f32> = (0..b * 3 * size * size)
            .map(|_| rng.normal() as f32)
            .collect();
        Tensor::from_vec(data, (b, 3, size, size), &Device::Cpu).unwrap()
    };
    let p1 = pixels(1, &mut rng);
    let p16 = pixels(16, &mut rng);
    let mut fidelity = serde_json::Map::new();
    if args.precision != Precision::Exact && args.only.as_deref().is_none_or(|o| o == "fidelity") {
        let exact = load();
        let image = smallest_cosine(
            &rows(&clip.image_features(&p16).unwrap()),
            &rows(&exact.image_features(&p16).unwrap()),
        );
        let text = smallest_cosine(
            &clip.embed_texts(&CAPTIONS[..2]).unwrap(),
            &exact.embed_texts(&CAPTIONS[..2]).unwrap(),
        );
        println!(
            "{} against exact: smallest cosine {image:.6} (16 random images), {text:.6} (2 texts)",
            args.precision
        );
        fidelity.insert("random_image_cosine_min".into(), image.into());
        fidelity.insert("random_text_cosine_min".into(), text.into());
        if let Some(dir) = &args.photos {
            let (images, texts) = photo_fidelity(&clip, &exact, dir);
            println!(
                "{} against exact on {} photos: cosine min {:.6} mean {:.7}; on {} captions: min {:.6} mean {:.7}",
                args.precision, images.0, images.1, images.2, texts.0, texts.1, texts.2
            );
            fidelity.insert("photos".into(), images.0.into());
            fidelity.insert("photo_cosine_min".into(), images.1.into());
            fidelity.insert("photo_cosine_mean".into(), images.2.into());
            fidelity.insert("text_cosine_min".into(), texts.1.into());
            fidelity.insert("text_cosine_mean".into(), texts.2.into());
        }
    }
    let want = |name: &str| args.only.as_deref().is_none_or(|only| only == name);
    let b1 = if want("batch1") {
        median(time(3, 30 * args.repeat, || {
            clip.image_features(&p1).unwrap();
        }))
    } else {
        f64::NAN
    };
    let b16 = if want("batch16") {
        median(time(1, 6 * args.repeat, || {
            clip.image_features(&p16).unwrap();
        }))
    } else {
        f64::NAN
    };
    let text = if want("text") {
        time(5, 100 * args.repeat, || {
            clip.embed_texts(&[QUERY]).unwrap();
        })
    } else {
        vec![f64::NAN]
    };
    let mixed = mixed_queries();
    let mixed: Vec<&str> = mixed.iter().map(String::as_str).collect();
    let texts32 = if want("texts32") {
        median(time(2, 20 * args.repeat, || {
            clip.embed_texts(&mixed).unwrap();
        }))
    } else {
        f64::NAN
    };
    let text_p50 = median(text.clone());
    let mut sorted = text;
    sorted.sort_by(f64::total_cmp);
    let text_p90 = sorted[sorted.len() * 9 / 10];

    let b1_rate = 1.0 / b1;
    let b16_rate = 16.0 / b16;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "impl": "clipdex", "threads": args.threads,
                "image_per_s_batch1": b1_rate, "image_per_s_batch16": b16_rate,
                "text_ms_p50": text_p50 * 1e3, "text_ms_p90": text_p90 * 1e3, "query_tokens": tokens,
                "texts32_ms_p50": texts32 * 1e3,
                "precision": args.precision.to_string(), "layers": args.layers, "fidelity": fidelity,
            })
        );
    } else {
        println!("clipdex, {}, {} threads", args.dir.display(), args.threads);
        println!("  images/s, batch 1:   {b1_rate:8.2}");
        println!("  images/s, batch 16:  {b16_rate:8.2}");
        println!(
            "  text query ({tokens} tokens): p50 {:.2} ms, p90 {:.2} ms",
            text_p50 * 1e3,
            text_p90 * 1e3
        );
        println!(
            "  32 queries of 1 to 12 words together: p50 {:.2} ms",
            texts32 * 1e3
        );
    }
}

/// The layer kinds a comma-separated list names (`none` for none).
fn layer_kinds(flag: &str, list: &str) -> Vec<clipdex::model::bf16::LayerKind> {
    use clipdex::model::bf16::LayerKind;
    list.split(',')
        .filter(|n| *n != "none")
        .map(|n| {
            LayerKind::from_name(n).unwrap_or_else(|| {
                let names: Vec<&str> = LayerKind::ALL.iter().map(|k| k.name()).collect();
                panic!("{flag}: no kind {n:?}; the kinds are {}", names.join(", "))
            })
        })
        .collect()
}

/// The rows of a (n, d) tensor, L2-normalised.
fn rows(features: &Tensor) -> Vec<Vec<f32>> {
    clipdex::model::normalize(features)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn cosines(a: &[Vec<f32>], b: &[Vec<f32>]) -> Vec<f32> {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p * q).sum())
        .collect()
}

fn smallest_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    cosines(a, b).into_iter().fold(f32::INFINITY, f32::min)
}

/// (count, smallest, mean) cosine between `fast` and `exact` embeddings of
/// every picture under `dir`, and of [`CAPTIONS`].
fn photo_fidelity(
    fast: &Clip,
    exact: &Clip,
    dir: &std::path::Path,
) -> ((usize, f32, f32), (usize, f32, f32)) {
    use clipdex::library::{DecodeLimits, decode_file};
    let summary = |c: Vec<f32>| {
        let min = c.iter().copied().fold(f32::INFINITY, f32::min);
        (c.len(), min, c.iter().sum::<f32>() / c.len().max(1) as f32)
    };
    let mut all = Vec::new();
    let mut paths: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .sort_by_file_name()
        .into_iter()
        .filter_map(|e| e.ok().map(|e| e.into_path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        })
        .collect();
    paths.sort();
    for chunk in paths.chunks(16) {
        let decoded: Vec<_> = chunk
            .iter()
            .filter_map(|p| decode_file(p, &DecodeLimits::default()).ok())
            .collect();
        let views: Vec<_> = decoded.iter().map(|d| d.view()).collect();
        all.extend(cosines(
            &fast.embed_images(&views).unwrap(),
            &exact.embed_images(&views).unwrap(),
        ));
    }
    let texts = cosines(
        &fast.embed_texts(CAPTIONS).unwrap(),
        &exact.embed_texts(CAPTIONS).unwrap(),
    );
    (summary(all), summary(texts))
}
