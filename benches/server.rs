//! Load on `clipdex serve`: 32 concurrent clients for 60 s on a 10,000-photo
//! index, text queries (each one new, so each is embedded) and find-similar.
//!
//!     cargo build --release && cargo bench --bench model && cargo bench --bench server
//!     cargo bench --bench server -- [--clients 32] [--seconds 60] [--photos 10000] [--precision exact|fast|int8] [--queries short|mixed]
//!     cargo bench --bench server -- --index DIR [--clients 32] [--seconds 60]
//!     cargo bench --bench server -- --photos 10000 --library-only   # writes the library, prints its path
//!
//! `--precision fast` or `int8` indexes (once, into its own folder) and
//! serves with the bf16 or int8 towers. Text queries are "a {adjective}
//! {noun} near the {noun} number {n}" (10 to 12 tokens); `--queries mixed`
//! makes them 1 to 12 words and the number instead (5 to 18 tokens), as
//! users' queries vary.
//!
//! The first run writes a library of distinct pictures (crops, flips and
//! tints of the shared photos, 320 px) under target/bench/library-N and
//! indexes it with the random-weight ViT-B/32 of the model benchmark (about
//! six minutes for 10,000); later runs reuse both. `--index` serves an
//! existing index instead (the million photos of `scale library`). Each run
//! also reports how long `serve` took to answer ready, its resident set
//! then and after the load, and how many text queries each forward pass
//! embedded (from the server's debug log of its text batches).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clipdex::model::init::NormalRng;
use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView};

struct Args {
    clients: usize,
    seconds: u64,
    photos: usize,
    precision: String,
    index: Option<PathBuf>,
    library_only: bool,
    /// Text queries of 1 to 12 words, not all of about the same length.
    mixed: bool,
}

fn args() -> Args {
    let mut a = Args {
        clients: 32,
        seconds: 60,
        photos: 10_000,
        precision: "exact".into(),
        index: None,
        library_only: false,
        mixed: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--clients" => a.clients = it.next().and_then(|v| v.parse().ok()).expect("--clients N"),
            "--seconds" => a.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds N"),
            "--photos" => a.photos = it.next().and_then(|v| v.parse().ok()).expect("--photos N"),
            "--precision" => a.precision = it.next().expect("--precision exact|fast|int8"),
            "--index" => a.index = it.next().map(PathBuf::from),
            "--library-only" => a.library_only = true,
            "--queries" => {
                a.mixed = match it.next().as_deref() {
                    Some("short") => false,
                    Some("mixed") => true,
                    _ => panic!("--queries short|mixed"),
                }
            }
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes `n` distinct pictures derived from the shared photos.
fn make_library(dir: &Path, n: usize) {
    if dir.join(".complete").exists() {
        return;
    }
    let photos = root().join("../shared/datasets/photos");
    let sources: Vec<PathBuf> = walkdir::WalkDir::new(&photos)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "jpg"))
        .map(|e| e.path().to_path_buf())
        .collect();
    let sources: Vec<DynamicImage> = sources
        .iter()
        .filter_map(|p| image::open(p).ok())
        .map(|im| im.resize(640, 640, FilterType::Triangle))
        .collect();
    let mut rng = NormalRng::new(42);
    for i in 0..n {
        let src = &sources[i % sources.len()];
        let (w, h) = src.dimensions();
        let side = ((w.min(h) as f64) * (0.5 + 0.5 * rng.uniform())) as u32;
        let x = ((w - side) as f64 * rng.uniform()) as u32;
        let y = ((h - side) as f64 * rng.uniform()) as u32;
        let mut im = src
            .crop_imm(x, y, side, side)
            .resize_exact(320, 320, FilterType::Triangle)
            .to_rgb8();
        if rng.uniform() < 0.5 {
            image::imageops::flip_horizontal_in_place(&mut im);
        }
        let tint = [
            0.85 + 0.3 * rng.uniform(),
            0.85 + 0.3 * rng.uniform(),
            0.85 + 0.3 * rng.uniform(),
        ];
        for p in im.pixels_mut() {
            for c in 0..3 {
                p[c] = (p[c] as f64 * tint[c]).min(255.0) as u8;
            }
        }
        let folder = dir.join(format!("{:03}", i / 100));
        std::fs::create_dir_all(&folder).unwrap();
        im.save(folder.join(format!("photo-{i:05}.jpg"))).unwrap();
    }
    std::fs::write(dir.join(".complete"), b"").unwrap();
}

const NOUNS: &[&str] = &[
    "dog", "cat", "beach", "mountain", "sunset", "car", "flower", "tree", "bridge", "river",
    "city", "fish", "bird", "house", "boat", "snow", "forest", "road", "child", "tower", "field",
    "lake", "garden", "street",
];
const ADJ: &[&str] = &[
    "red", "old", "small", "bright", "dark", "green", "wet", "quiet", "busy", "tall", "blue",
    "sunny",
];

struct Stats {
    latencies: Vec<f64>,
    errors: u64,
}

fn load(
    base: &str,
    clients: usize,
    seconds: u64,
    kind: &'static str,
    ids: Arc<Vec<u64>>,
    mixed: bool,
) -> (f64, Stats) {
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, counter, base, ids) =
                (stop.clone(), counter.clone(), base.to_string(), ids.clone());
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into();
                let mut rng = NormalRng::new(1000 + c as u64);
                let mut stats = Stats {
                    latencies: Vec::new(),
                    errors: 0,
                };
                while !stop.load(Ordering::Relaxed) {
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    let url = if kind == "text" {
                        // Every query is new: no cache hit, the text is embedded.
                        let pick = |xs: &[&'static str], r: &mut NormalRng| {
                            xs[(r.uniform() * xs.len() as f64) as usize % xs.len()]
                        };
                        let q = if mixed {
                            let words = 1 + (rng.uniform() * 12.0) as usize % 12;
                            let mut q: Vec<&str> = (0..words)
                                .map(|w| match w % 2 {
                                    0 => pick(ADJ, &mut rng),
                                    _ => pick(NOUNS, &mut rng),
                                })
                                .collect();
                            let n = n.to_string();
                            q.push(&n);
                            q.join(" ")
                        } else {
                            format!(
                                "a {} {} near the {} number {n}",
                                pick(ADJ, &mut rng),
                                pick(NOUNS, &mut rng),
                                pick(NOUNS, &mut rng)
                            )
                        };
                        format!("{base}/api/search?k=24&q={}", q.replace(' ', "%20"))
                    } else {
                        let id = ids[(rng.uniform() * ids.len() as f64) as usize % ids.len()];
                        format!("{base}/api/photos/{id}/similar?k=24")
                    };
                    let t = Instant::now();
                    match agent.get(&url).call() {
                        Ok(mut r) if r.status() == 200 => {
                            let _ = r.body_mut().read_to_vec();
                            stats.latencies.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        _ => stats.errors += 1,
                    }
                }
                stats
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut all = Stats {
        latencies: Vec::new(),
        errors: 0,
    };
    for h in handles {
        let s = h.join().unwrap();
        all.latencies.extend(s.latencies);
        all.errors += s.errors;
    }
    (start.elapsed().as_secs_f64(), all)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The benchmark's own library and index (written once), for `--photos`
/// and `--precision`.
fn prepare(args: &Args, binary: &Path) -> PathBuf {
    let model = root().join("target/bench/vit-b-32");
    assert!(
        model.join("model.safetensors").exists(),
        "run `cargo bench --bench model` first (it writes the ViT-B/32 checkpoint)"
    );
    let library = root().join(format!("target/bench/library-{}", args.photos));
    let index = root().join(match args.precision.as_str() {
        "exact" => format!("target/bench/index-{}", args.photos),
        other => format!("target/bench/index-{}-{other}", args.photos),
    });
    make_library(&library, args.photos);
    if !index.join("db").exists() || !index.join(".complete").exists() {
        eprintln!("indexing {} photos with ViT-B/32 (once)...", args.photos);
        let status = Command::new(binary)
            .args([
                "index",
                library.to_str().unwrap(),
                "--index",
                index.to_str().unwrap(),
                "--model",
                model.to_str().unwrap(),
                "--precision",
                &args.precision,
            ])
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::write(index.join(".complete"), b"").unwrap();
    }
    index
}

fn main() {
    let args = args();
    if args.library_only {
        // For indexing the same pictures another way (the Milvus engine).
        let library = root().join(format!("target/bench/library-{}", args.photos));
        make_library(&library, args.photos);
        println!("{}", library.display());
        return;
    }
    let binary = root().join("target/release/clipdex");
    assert!(binary.exists(), "build first: cargo build --release");
    let index = match &args.index {
        Some(index) => index.clone(),
        None => prepare(&args, &binary),
    };
    let started = Instant::now();
    let mut server = Command::new(&binary)
        .args([
            "serve",
            "--index",
            index.to_str().unwrap(),
            "--bind",
            "127.0.0.1:0",
            "--offline",
            // The text batcher's "text batch embedded" lines: batch sizes.
            "--log",
            "warn,clipdex::search=debug",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("serve exited").unwrap();
        if let Some(url) = line.strip_prefix("clipdex is up at ") {
            break url.trim().to_string();
        }
    };
    // The size of every text batch the server embeds (a binary from
    // before the batcher logged them reports none).
    let batches: Arc<std::sync::Mutex<Vec<usize>>> = Arc::default();
    let sizes = batches.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Some(n) = batch_size(&line) {
                sizes.lock().unwrap().push(n);
            }
        }
    });
    let pid = server.id();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    loop {
        if let Ok(mut r) = agent.get(&format!("{base}/api/status")).call() {
            let v: serde_json::Value = r.body_mut().read_json().unwrap_or_default();
            if v["state"] == "ready" {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready = started.elapsed().as_secs_f64();
    let rss_ready = rss_mib(pid);
    // Photo ids to ask similar photos of.
    let mut r = agent
        .get(&format!("{base}/api/search?q=photo&k=200"))
        .call()
        .unwrap();
    let v: serde_json::Value = r.body_mut().read_json().unwrap();
    let ids: Arc<Vec<u64>> = Arc::new(
        v["hits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["id"].as_u64().unwrap())
            .collect(),
    );

    let model = agent
        .get(&format!("{base}/api/status"))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_json::<serde_json::Value>().ok())
        .unwrap_or_default();
    println!(
        "clipdex serve, {} photos ({}), {} clients, {} s each:",
        model["photos"],
        model["model"].as_str().unwrap_or("?"),
        args.clients,
        args.seconds
    );
    println!("ready in {ready:.1} s, resident {rss_ready:.0} MiB");
    println!(
        "{:<32}{:>10}{:>10}{:>10}{:>8}",
        "", "req/s", "p50 ms", "p99 ms", "errors"
    );
    for kind in ["text", "similar"] {
        let (secs, mut stats) = load(
            &base,
            args.clients,
            args.seconds,
            kind,
            ids.clone(),
            args.mixed,
        );
        stats.latencies.sort_by(f64::total_cmp);
        let label = match (kind, args.mixed) {
            ("text", false) => "text query (embedding included)",
            ("text", true) => "text query, 1 to 12 words",
            _ => "find-similar",
        };
        println!(
            "{label:<32}{:>10.1}{:>10.1}{:>10.1}{:>8}",
            stats.latencies.len() as f64 / secs,
            percentile(&stats.latencies, 0.5),
            percentile(&stats.latencies, 0.99),
            stats.errors
        );
        let sizes = std::mem::take(&mut *batches.lock().unwrap());
        if kind == "text" && !sizes.is_empty() {
            let texts: usize = sizes.iter().sum();
            println!(
                "  {} forward passes, {:.1} queries each on average, the largest {} \
                 (the server takes up to 32); {:.0}% of the queries in passes of fewer than 16",
                sizes.len(),
                texts as f64 / sizes.len() as f64,
                sizes.iter().max().unwrap(),
                100.0 * sizes.iter().filter(|&&n| n < 16).sum::<usize>() as f64 / texts as f64
            );
        }
    }
    println!("resident after the load: {:.0} MiB", rss_mib(pid));
    let _ = server.kill();
    let _ = server.wait();
}

/// The number of texts in a "text batch embedded" line of the server's log
/// (`texts=N`, with or without colour codes).
fn batch_size(line: &str) -> Option<usize> {
    if !line.contains("text batch embedded") {
        return None;
    }
    // Colour codes (ESC [ ... m) hold digits of their own.
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                chars.by_ref().find(|&c| c == 'm');
            }
            c => plain.push(c),
        }
    }
    let after = &plain[plain.find("texts=")? + "texts=".len()..];
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The resident set of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
