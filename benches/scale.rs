//! The vector index at a million photos, on realistic vectors.
//!
//!     cargo bench --bench scale -- vectors --model DIR --out DIR [--photos N] [--seed S]
//!     cargo bench --bench scale -- run --data DIR [--photos N] [--queries Q] [--json] [--keep]
//!     cargo bench --bench scale -- open --data DIR [--photos N]
//!     cargo bench --bench scale -- save --data DIR [--photos N]
//!     cargo bench --bench scale -- filtered --data DIR [--photos N] [--queries Q]
//!     cargo bench --bench scale -- rebuild --data DIR [--photos N]
//!     cargo bench --bench scale -- library --data DIR [--photos N] [--out INDEX]
//!
//! `vectors` writes the benchmark's data once (`scripts/bench/scale_data.sh`
//! trains the model first): N augmented Fashion-MNIST training images (a
//! random crop of 20 to 28 pixels scaled to the model's 32, a horizontal
//! flip, a tint of object and background; each image's draws come from its
//! own seed, so any N is a prefix of a larger one) embedded as the photos;
//! the test images, augmented with another seed, as image queries; and
//! caption-style texts (template x modifier x class) as text queries.
//!
//! `run` measures clipdex's vector index ([`clipdex::vector::VectorIndex`],
//! the one `clipdex index` and `serve` use) on the first N photos: build
//! time on the pool's threads, save and load, recall@10 of text and image
//! queries against exact search at the default settings and over a sweep
//! of the search breadth, single-thread queries/s, and the growth of the
//! resident set while building (the graph and its copy of the vectors). Exact top-10 lists
//! are kept in `DIR/truth-N.u32` for `scripts/reference/bench_hnswlib.py`,
//! which measures hnswlib on the same vectors (`scripts/bench/scale.sh`
//! runs both and prints the ratios). `--keep` leaves the saved graph in
//! `DIR/index-N`; `open` then times opening it again, for profiling, and
//! `filtered` measures filtered searches on it: filters that allow 0.1%,
//! 1%, 10% and 50% of the photos, searched in the graph and by an exact
//! scan of the allowed vectors, and the way the index chooses per query,
//! each against the exact filtered top-10; `rebuild` removes a tenth of the
//! photos, then a quarter (past the rebuild threshold), and rebuilds the
//! graph on the pool's threads while one thread goes on searching: the
//! searches' latency before, during and after shows whether anything waits.
//!
//! `library` assembles a whole clipdex index of N photos (store, keyword
//! index, graph) from the benchmark's vectors, for `clipdex serve` and
//! `benches/server.rs --index` at a million photos: the records are those
//! of a family archive (`YEAR/YEAR-MM-event/IMG_N.jpg`, a date taken that
//! grows with N over twenty years, one of six cameras per event or none),
//! written through the store's and the keyword index's own calls in
//! commits of 10,000, and the graph is the one `run --keep` saved (its ids
//! are the store's). The files themselves are not written: searches,
//! filters and find-similar work, thumbnails answer 404.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clipdex::model::Clip;
use clipdex::model::checkpoint::{HubOptions, ModelSource};

/// The embedding width the benchmark's model projects to.
const DIM: usize = 512;
/// Fashion-MNIST's side.
const SIDE: usize = 28;
/// Images per forward pass while embedding.
const BATCH: usize = 512;
/// Results compared per query.
const K: usize = 10;

const CLASSES: [&str; 10] = [
    "t shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
];

/// Templates beyond the training ones (`clipdex::train::data::DEFAULT_TEMPLATES`,
/// which the captions were made from): phrasings the model never saw.
const MORE_TEMPLATES: [&str; 4] = [
    "my {}",
    "a {} on a plain background",
    "{}",
    "a bright photo of a {}.",
];

const MODIFIERS: [&str; 16] = [
    "", "red", "blue", "green", "black", "white", "grey", "yellow", "pink", "purple", "brown",
    "orange", "dark", "light", "striped", "old",
];

/// splitmix64: a small, seedable generator; one per image.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, index: u64) -> Self {
        let mut r = Rng(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The images of an idx3 file (gzip), each SIDE x SIDE bytes.
fn read_images(path: &Path) -> Vec<Vec<u8>> {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("Fashion-MNIST images"))
        .read_to_end(&mut bytes)
        .expect("gzip");
    let n = u32::from_be_bytes(bytes[4..8].try_into().unwrap()) as usize;
    assert_eq!(
        &bytes[8..16],
        &[0, 0, 0, 28, 0, 0, 0, 28],
        "{}",
        path.display()
    );
    bytes[16..]
        .chunks_exact(SIDE * SIDE)
        .take(n)
        .map(|c| c.to_vec())
        .collect()
}

/// One augmented image, `size` x `size`, channels first, normalised with
/// `mean` and `std`, appended to `out`.
fn augment(
    image: &[u8],
    rng: &mut Rng,
    size: usize,
    mean: [f32; 3],
    std: [f32; 3],
    out: &mut Vec<f32>,
) {
    let crop = 20 + rng.below(SIDE - 20 + 1);
    let (x0, y0) = (rng.below(SIDE - crop + 1), rng.below(SIDE - crop + 1));
    let flip = rng.unit() < 0.5;
    let tint = [
        0.35 + 0.65 * rng.unit(),
        0.35 + 0.65 * rng.unit(),
        0.35 + 0.65 * rng.unit(),
    ];
    let background = [0.3 * rng.unit(), 0.3 * rng.unit(), 0.3 * rng.unit()];
    let scale = crop as f32 / size as f32;
    let at = |x: usize, y: usize| image[(y0 + y) * SIDE + x0 + x] as f32 / 255.0;
    let mut grey = vec![0f32; size * size];
    for (y, row) in grey.chunks_exact_mut(size).enumerate() {
        let sy = ((y as f32 + 0.5) * scale - 0.5).clamp(0.0, (crop - 1) as f32);
        let (y1, fy) = (sy as usize, sy.fract());
        let y2 = (y1 + 1).min(crop - 1);
        for (x, v) in row.iter_mut().enumerate() {
            let xx = if flip { size - 1 - x } else { x };
            let sx = ((xx as f32 + 0.5) * scale - 0.5).clamp(0.0, (crop - 1) as f32);
            let (x1, fx) = (sx as usize, sx.fract());
            let x2 = (x1 + 1).min(crop - 1);
            let top = at(x1, y1) * (1.0 - fx) + at(x2, y1) * fx;
            let bottom = at(x1, y2) * (1.0 - fx) + at(x2, y2) * fx;
            *v = top * (1.0 - fy) + bottom * fy;
        }
    }
    for c in 0..3 {
        out.extend(
            grey.iter()
                .map(|&v| ((v * tint[c] + (1.0 - v) * background[c]) - mean[c]) / std[c]),
        );
    }
}

/// Embeds `count` augmented images drawn from `images` (image `i` is
/// `images[i % len]` with seed `(seed, i)`) into `path`, f32 little-endian.
fn embed_augmented(clip: &Clip, images: &[Vec<u8>], count: usize, seed: u64, path: &Path) {
    let size = clip.preprocessor().image_size();
    let (mean, std) = (clip.preprocessor().mean(), clip.preprocessor().std());
    let tmp = path.with_extension("partial");
    let mut out = std::io::BufWriter::new(std::fs::File::create(&tmp).expect("create vectors"));
    let start = Instant::now();
    for b0 in (0..count).step_by(BATCH) {
        let n = BATCH.min(count - b0);
        let mut pixels = Vec::with_capacity(n * 3 * size * size);
        for i in b0..b0 + n {
            let mut rng = Rng::new(seed, i as u64);
            augment(
                &images[i % images.len()],
                &mut rng,
                size,
                mean,
                std,
                &mut pixels,
            );
        }
        for v in clip.embed_pixels(pixels, n).expect("embed") {
            assert_eq!(v.len(), DIM, "the model must project to {DIM}");
            for x in v {
                out.write_all(&x.to_le_bytes()).unwrap();
            }
        }
        if (b0 / BATCH).is_multiple_of(200) {
            eprintln!(
                "  {}: {} of {count}, {:.0} images/s",
                path.display(),
                b0 + n,
                (b0 + n) as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    out.into_inner().unwrap().sync_all().unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn texts() -> Vec<String> {
    let mut out = Vec::new();
    let templates = clipdex::train::data::DEFAULT_TEMPLATES
        .iter()
        .chain(&MORE_TEMPLATES);
    for template in templates {
        for modifier in MODIFIERS {
            for class in CLASSES {
                let subject = match modifier {
                    "" => class.to_string(),
                    m => format!("{m} {class}"),
                };
                out.push(template.replace("{}", &subject));
            }
        }
    }
    out
}

fn make_vectors(args: &Args) {
    let model = args.model.as_ref().expect("--model DIR");
    let out = &args.data;
    std::fs::create_dir_all(out).unwrap();
    let clip = Clip::load_with(
        &ModelSource::Dir(model.clone()),
        &HubOptions {
            offline: true,
            progress: false,
        },
        args.precision,
    )
    .expect("load the model");
    let shared = Path::new("../shared/datasets/fashion-mnist");
    let train = read_images(&shared.join("train-images-idx3-ubyte.gz"));
    let test = read_images(&shared.join("t10k-images-idx3-ubyte.gz"));
    let texts = texts();
    let mut list = std::fs::File::create(out.join("texts.txt")).unwrap();
    for t in &texts {
        writeln!(list, "{t}").unwrap();
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut file =
        std::io::BufWriter::new(std::fs::File::create(out.join("text-queries.f32")).unwrap());
    for v in clip.embed_texts(&refs).expect("embed texts") {
        for x in v {
            file.write_all(&x.to_le_bytes()).unwrap();
        }
    }
    file.flush().unwrap();
    embed_augmented(
        &clip,
        &test,
        args.queries,
        args.seed + 1,
        &out.join("image-queries.f32"),
    );
    let start = Instant::now();
    embed_augmented(
        &clip,
        &train,
        args.photos,
        args.seed,
        &out.join("photos.f32"),
    );
    let meta = serde_json::json!({
        "photos": args.photos,
        "image_queries": args.queries,
        "text_queries": texts.len(),
        "dim": DIM,
        "seed": args.seed,
        "model": model,
        "precision": args.precision.name(),
        "photos_per_second": args.photos as f64 / start.elapsed().as_secs_f64(),
    });
    std::fs::write(
        out.join("meta.json"),
        serde_json::to_string_pretty(&meta).unwrap(),
    )
    .unwrap();
    println!("{meta}");
}

struct Args {
    mode: String,
    model: Option<PathBuf>,
    data: PathBuf,
    photos: usize,
    queries: usize,
    seed: u64,
    precision: clipdex::model::Precision,
    json: bool,
    keep: bool,
    /// `save`: also rebuild the graph without a tenth of it, and save.
    rebuild: bool,
    /// `library`'s index folder.
    index: Option<PathBuf>,
    milvus: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        mode: String::new(),
        model: None,
        data: PathBuf::from("target/bench/scale"),
        photos: 1_000_000,
        queries: 2000,
        seed: 0,
        precision: clipdex::model::Precision::Exact,
        json: false,
        keep: false,
        rebuild: false,
        index: None,
        milvus: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "vectors" | "run" | "open" | "save" | "filtered" | "rebuild" | "library" | "milvus" => {
                a.mode = arg
            }
            "--model" => a.model = it.next().map(PathBuf::from),
            "--out" | "--data" => a.data = PathBuf::from(it.next().expect("--data DIR")),
            "--photos" => a.photos = it.next().and_then(|v| v.parse().ok()).expect("--photos N"),
            "--queries" => a.queries = it.next().and_then(|v| v.parse().ok()).expect("--queries N"),
            "--seed" => a.seed = it.next().and_then(|v| v.parse().ok()).expect("--seed S"),
            "--precision" => {
                a.precision = it
                    .next()
                    .and_then(|v| v.parse::<clipdex::model::Precision>().ok())
                    .expect("--precision exact|fast|int8")
            }
            "--index" => a.index = it.next().map(PathBuf::from),
            "--milvus" => a.milvus = it.next(),
            "--json" => a.json = true,
            "--keep" => a.keep = true,
            "--rebuild" => a.rebuild = true,
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

fn main() {
    let args = args();
    // RUST_LOG=clipdex=debug shows where a save or a load spends its time.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    // SAFETY: single-threaded here, before any pool exists.
    unsafe { libmimalloc_sys::mi_option_set(clipdex::library::memory::MI_OPTION_PURGE_DELAY, -1) };
    match args.mode.as_str() {
        "vectors" => make_vectors(&args),
        "run" => run(&args),
        "open" => open(&args),
        "save" => save(&args),
        "filtered" => filtered(&args),
        "rebuild" => rebuild(&args),
        "library" => library(&args),
        "milvus" => milvus(&args),
        _ => eprintln!("usage: scale vectors --model DIR --out DIR | scale run --data DIR"),
    }
}

/// The first `--photos` photos, every text query and the first `--queries`
/// image queries.
fn bench_vectors(args: &Args) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let dir = &args.data;
    let photos = read_vectors(&dir.join("photos.f32"), 0, args.photos);
    let text = read_vectors(
        &dir.join("text-queries.f32"),
        0,
        count_vectors(&dir.join("text-queries.f32")),
    );
    let image_count = args
        .queries
        .min(count_vectors(&dir.join("image-queries.f32")));
    let image = read_vectors(&dir.join("image-queries.f32"), 0, image_count);
    (photos, text, image)
}

/// `count` vectors of DIM from `path`, starting at vector `from`.
fn read_vectors(path: &Path, from: usize, count: usize) -> Vec<f32> {
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let available = file.metadata().unwrap().len() as usize / (4 * DIM);
    assert!(
        from + count <= available,
        "{} holds {available} vectors, {} wanted: run scripts/bench/scale_data.sh with a larger N",
        path.display(),
        from + count
    );
    use std::io::Seek;
    file.seek(std::io::SeekFrom::Start((from * DIM * 4) as u64))
        .unwrap();
    let mut bytes = vec![0u8; count * DIM * 4];
    file.read_exact(&mut bytes).unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn count_vectors(path: &Path) -> usize {
    std::fs::metadata(path)
        .map(|m| m.len() as usize / (4 * DIM))
        .unwrap_or(0)
}

/// The exact top-K photo indices of every query (rows of `queries`), by
/// dot product over all `photos`: blocks of photos against all queries,
/// queries in parallel.
fn exact_top(photos: &[f32], queries: &[f32]) -> Vec<[u32; K]> {
    use rayon::prelude::*;
    let (n, q) = (photos.len() / DIM, queries.len() / DIM);
    let qt = candle_core::Tensor::from_slice(queries, (q, DIM), &candle_core::Device::Cpu).unwrap();
    let mut best: Vec<Vec<(f32, u32)>> = vec![Vec::with_capacity(K + 1); q];
    const B: usize = 16384;
    for b0 in (0..n).step_by(B) {
        let len = B.min(n - b0);
        let block = candle_core::Tensor::from_slice(
            &photos[b0 * DIM..(b0 + len) * DIM],
            (len, DIM),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let scores = qt
            .matmul(&block.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap();
        let scores = scores.to_vec1::<f32>().unwrap();
        best.par_iter_mut()
            .zip(scores.par_chunks_exact(len))
            .for_each(|(best, row)| {
                for (j, &s) in row.iter().enumerate() {
                    if best.len() < K || s > best[K - 1].0 {
                        let at = best.partition_point(|&(b, _)| b >= s);
                        best.insert(at, (s, (b0 + j) as u32));
                        best.truncate(K);
                    }
                }
            });
    }
    best.into_iter()
        .map(|b| std::array::from_fn(|i| b.get(i).map_or(u32::MAX, |x| x.1)))
        .collect()
}

/// Exact top-K lists for the first `n` photos, from `DIR/truth-n.u32` or
/// computed and written there: text queries first, then image queries.
fn truth(dir: &Path, photos: &[f32], queries: &[f32]) -> Vec<[u32; K]> {
    let n = photos.len() / DIM;
    let q = queries.len() / DIM;
    let path = dir.join(format!("truth-{n}.u32"));
    if let Ok(bytes) = std::fs::read(&path)
        && bytes.len() == q * K * 4
    {
        let ids: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        return ids.chunks_exact(K).map(|c| c.try_into().unwrap()).collect();
    }
    let start = Instant::now();
    let top = exact_top(photos, queries);
    eprintln!(
        "  exact top-{K} of {q} queries over {n}: {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let bytes: Vec<u8> = top.iter().flatten().flat_map(|i| i.to_le_bytes()).collect();
    std::fs::write(&path, bytes).unwrap();
    top
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Recall@K against `truth` (photo index i is id i + 1) and single-thread
/// queries/s of `search` over `queries`.
fn measure(
    queries: &[f32],
    truth: &[[u32; K]],
    search: impl Fn(&[f32]) -> Vec<(u64, f32)>,
) -> (f64, f64, f64) {
    let mut hits = 0usize;
    let mut times = Vec::with_capacity(truth.len());
    let start = Instant::now();
    for (q, want) in queries.chunks_exact(DIM).zip(truth) {
        let t = Instant::now();
        let found = search(q);
        times.push(t.elapsed().as_secs_f64());
        hits += found
            .iter()
            .filter(|(id, _)| want.contains(&((*id - 1) as u32)))
            .count();
    }
    let qps = truth.len() as f64 / start.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let p50 = times[times.len() / 2] * 1e3;
    (hits as f64 / (truth.len() * K) as f64, qps, p50)
}

fn run(args: &Args) {
    let dir = &args.data;
    let n = args.photos;
    // Reading and the exact search free large buffers; they go back to the
    // system, so that the growth of the resident set below is the index's.
    let release = clipdex::library::memory::ReleaseWindow::open();
    let (photos, text, image) = bench_vectors(args);
    let all_queries = [text.as_slice(), image.as_slice()].concat();
    let truth = truth(dir, &photos, &all_queries);
    drop(release);
    let (text_truth, image_truth) = truth.split_at(text.len() / DIM);
    let extra = match count_vectors(&dir.join("photos.f32")) >= n + 10_000 {
        true => Some(read_vectors(&dir.join("photos.f32"), n, 10_000)),
        false => None,
    };

    // `--keep` leaves the saved graph in DIR/index-N (for `scale open`).
    let kept = dir.join(format!("index-{n}"));
    let temporary = tempfile::tempdir_in(dir).unwrap();
    let index_dir = match args.keep {
        true => {
            let _ = std::fs::remove_dir_all(&kept);
            kept.as_path()
        }
        false => temporary.path(),
    };
    let rss_before = rss_mib();
    let index = clipdex::vector::VectorIndex::open(index_dir, DIM).unwrap();
    let start = Instant::now();
    // In batches, as the indexer adds a library's vectors.
    const CHUNK: usize = 50_000;
    for (c, chunk) in photos.chunks(CHUNK * DIM).enumerate() {
        let items: Vec<(u64, Vec<f32>)> = chunk
            .chunks_exact(DIM)
            .enumerate()
            .map(|(i, v)| ((c * CHUNK + i + 1) as u64, v.to_vec()))
            .collect();
        index.insert_batch(&items).unwrap();
        eprintln!(
            "  inserted {} in {:.0} s",
            c * CHUNK + items.len(),
            start.elapsed().as_secs_f64()
        );
    }
    let build = start.elapsed().as_secs_f64();
    let rss = rss_mib() - rss_before;
    let start = Instant::now();
    index.save().unwrap();
    let save = start.elapsed().as_secs_f64();
    drop(index);
    let start = Instant::now();
    let index = clipdex::vector::VectorIndex::open(index_dir, DIM).unwrap();
    let load = start.elapsed().as_secs_f64();
    assert_eq!(index.len(), n, "the saved graph came back whole");
    let disk = index.size_on_disk();

    let default_text = measure(&text, text_truth, |q| index.search(q, K, None).unwrap());
    let default_image = measure(&image, image_truth, |q| index.search(q, K, None).unwrap());
    let mut sweep = Vec::new();
    for ef in [16, 32, 48, 64, 96, 128, 192, 256] {
        let t = measure(&text, text_truth, |q| {
            index.search_with(q, K, ef, None).unwrap()
        });
        let i = measure(&image, image_truth, |q| {
            index.search_with(q, K, ef, None).unwrap()
        });
        sweep.push(serde_json::json!({
            "ef": ef, "text_recall": t.0, "text_qps": t.1, "image_recall": i.0, "image_qps": i.1,
        }));
        eprintln!(
            "  ef {ef:4}: text recall {:.4} at {:.0}/s, image {:.4} at {:.0}/s",
            t.0, t.1, i.0, i.1
        );
    }
    let add = extra.map(|extra| {
        let items: Vec<(u64, Vec<f32>)> = extra
            .chunks_exact(DIM)
            .enumerate()
            .map(|(i, v)| ((n + i + 1) as u64, v.to_vec()))
            .collect();
        let start = Instant::now();
        index.insert_batch(&items).unwrap();
        start.elapsed().as_secs_f64()
    });
    let result = serde_json::json!({
        "impl": "clipdex",
        "photos": n,
        "threads": rayon::current_num_threads(),
        "build_s": build,
        "save_s": save,
        "load_s": load,
        "add_10000_s": add,
        "built_rss_mib": rss,
        "disk_mib": disk as f64 / (1 << 20) as f64,
        "text_recall": default_text.0,
        "text_qps": default_text.1,
        "text_p50_ms": default_text.2,
        "image_recall": default_image.0,
        "image_qps": default_image.1,
        "image_p50_ms": default_image.2,
        "sweep": sweep,
    });
    if args.json {
        println!("{result}");
    } else {
        println!("clipdex vector index, {n} photos x {DIM}");
        println!(
            "  build {build:.1} s ({} threads), save {save:.1} s, load {load:.1} s",
            rayon::current_num_threads()
        );
        println!(
            "  recall@{K} text {:.4} at {:.0} queries/s, image {:.4} at {:.0}/s (default settings, one thread)",
            default_text.0, default_text.1, default_image.0, default_image.1
        );
        println!(
            "  resident {rss:.0} MiB, on disk {:.0} MiB",
            disk as f64 / (1 << 20) as f64
        );
        if let Some(add) = add {
            println!("  adding 10,000: {add:.1} s");
        }
    }
}

/// Opens the graph `run --keep` left, and says how long that took.
fn open(args: &Args) {
    let dir = args.data.join(format!("index-{}", args.photos));
    let start = Instant::now();
    let index = clipdex::vector::VectorIndex::open(&dir, DIM).unwrap();
    println!(
        "opened {} vectors from {} in {:.2} s, resident {:.0} MiB",
        index.len(),
        dir.display(),
        start.elapsed().as_secs_f64(),
        rss_mib()
    );
}

/// Saving the graph `run --keep` left, as a re-index does after a change:
/// on a copy of it (one photo removed), written and synced to disk.
fn save(args: &Args) {
    let kept = args.data.join(format!("index-{}", args.photos));
    let dir = args.data.join("save-copy");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&kept).unwrap() {
        let entry = entry.unwrap();
        let to = dir.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&to).unwrap();
            for file in std::fs::read_dir(entry.path()).unwrap() {
                let file = file.unwrap();
                std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
            }
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
    // The copy's writes go to disk first, not during the save.
    let _ = std::process::Command::new("sync").status();
    let index = clipdex::vector::VectorIndex::open(&dir, DIM).unwrap();
    index.remove([1]);
    let start = Instant::now();
    index.save().unwrap();
    println!(
        "saved {} vectors in {:.2} s (all written, hashed and synced: a first save, or one after a rebuild)",
        index.len(),
        start.elapsed().as_secs_f64()
    );
    // What a re-index that adds photos saves: the graph, and the new
    // vectors appended to the saved ones.
    let added = 10_000;
    let extra = read_vectors(&args.data.join("photos.f32"), args.photos, added);
    let items: Vec<(u64, Vec<f32>)> = extra
        .chunks_exact(DIM)
        .enumerate()
        .map(|(i, v)| ((args.photos + 1 + i) as u64, v.to_vec()))
        .collect();
    index.insert_batch(&items).unwrap();
    index.remove([2]);
    let start = Instant::now();
    index.save().unwrap();
    println!(
        "saved {} vectors in {:.2} s after adding {added} (the graph and the new vectors written)",
        index.len(),
        start.elapsed().as_secs_f64()
    );
    drop(index);
    let start = Instant::now();
    let index = clipdex::vector::VectorIndex::open(&dir, DIM).unwrap();
    println!(
        "loaded {} vectors in {:.2} s",
        index.len(),
        start.elapsed().as_secs_f64()
    );
    if args.rebuild {
        // The rebuild policy's case: a tenth removed, the graph rebuilt
        // from the rest (which writes their vectors ahead), then saved.
        let live: Vec<(u64, Vec<f32>)> = index
            .ids()
            .into_iter()
            .filter(|id| id % 10 != 0)
            .map(|id| (id, index.vector(id).unwrap()))
            .collect();
        let start = Instant::now();
        index.rebuild(live).unwrap();
        println!(
            "rebuilt {} vectors in {:.0} s (their vectors written ahead)",
            index.len(),
            start.elapsed().as_secs_f64()
        );
        let start = Instant::now();
        index.save().unwrap();
        println!(
            "saved {} vectors in {:.2} s after the rebuild",
            index.len(),
            start.elapsed().as_secs_f64()
        );
    }
    drop(index);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Filtered searches on the graph `run --keep` left: recall@10 against the
/// exact filtered top-10, and latency (p50, p99) of the graph search with
/// the filter and of an exact scan over the allowed vectors.
fn filtered(args: &Args) {
    let dir = &args.data;
    let n = args.photos;
    let photos = read_vectors(&dir.join("photos.f32"), 0, n);
    // Forced scans of half the photos take half a second each: --queries
    // keeps the run short.
    let q = args.queries.min(500);
    let text = read_vectors(&dir.join("text-queries.f32"), 0, q);
    let image = read_vectors(&dir.join("image-queries.f32"), 0, q);
    let index = clipdex::vector::VectorIndex::open(&dir.join(format!("index-{n}")), DIM).unwrap();
    assert_eq!(index.len(), n, "run `scale run --keep --photos {n}` first");
    let percentile = |times: &mut Vec<f64>, p: f64| {
        times.sort_by(f64::total_cmp);
        times[((times.len() - 1) as f64 * p) as usize] * 1e3
    };
    let mut rows = Vec::new();
    let no_exclusions = std::collections::HashSet::new();
    // A folder filter is a set of photo ids: every `every`-th id, spread over
    // the whole graph as a folder's photos are; a date range or a camera
    // imported at one time is a block of consecutive ids.
    let n64 = n as u64;
    let mut filters: Vec<(String, Vec<u64>)> = [1000u64, 100, 10, 2]
        .iter()
        .map(|&every| {
            let ids = (1..=n64).filter(|id| id % every == 0).collect();
            (format!("every {every}th"), ids)
        })
        .collect();
    for share in [100u64, 10] {
        let from = n64 / 3;
        filters.push((
            format!("a block of 1/{share}"),
            (from..from + n64 / share).collect(),
        ));
    }
    for (filter, allowed) in &filters {
        let set: std::collections::HashSet<u64> = allowed.iter().copied().collect();
        let allow = |id: u64| set.contains(&id);
        for (kind, queries) in [("text", &text), ("image", &image)] {
            let mut times = [Vec::new(), Vec::new(), Vec::new()];
            let mut hits = [0usize; 3];
            let mut total = 0;
            let scanned = std::cell::Cell::new(0usize);
            for q in queries.chunks_exact(DIM) {
                // The truth, from the benchmark's own copy of the vectors.
                let mut exact: Vec<(u64, f32)> = allowed
                    .iter()
                    .map(|&id| {
                        let v = &photos[(id as usize - 1) * DIM..id as usize * DIM];
                        (id, clipdex::vector::distance::dot(q, v))
                    })
                    .collect();
                let k = K.min(exact.len());
                exact.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
                exact.truncate(k);
                let want: std::collections::HashSet<u64> = exact.iter().map(|e| e.0).collect();
                total += want.len();
                let ways: [&dyn Fn() -> Vec<(u64, f32)>; 3] = [
                    &|| index.search(q, K, Some(&allow)).unwrap(),
                    &|| index.scan(q, K, Some(&set), &no_exclusions).unwrap(),
                    &|| {
                        let (found, plan) = index
                            .search_among(q, K, Some(&set), &no_exclusions)
                            .unwrap();
                        if plan == clipdex::vector::Plan::Scan {
                            scanned.set(scanned.get() + 1);
                        }
                        found
                    },
                ];
                for (way, run) in ways.iter().enumerate() {
                    let start = Instant::now();
                    let found = run();
                    times[way].push(start.elapsed().as_secs_f64());
                    hits[way] += found.iter().filter(|(id, _)| want.contains(id)).count();
                }
            }
            let queries = times[0].len();
            let mut row = serde_json::json!({
                "filter": filter,
                "allowed_fraction": allowed.len() as f64 / n as f64,
                "queries": kind,
                "chosen_scan_share": scanned.get() as f64 / queries as f64,
            });
            for (way, name) in ["graph", "scan", "chosen"].iter().enumerate() {
                row[format!("{name}_recall")] = (hits[way] as f64 / total as f64).into();
                row[format!("{name}_p50_ms")] = percentile(&mut times[way], 0.5).into();
                row[format!("{name}_p99_ms")] = percentile(&mut times[way], 0.99).into();
            }
            eprintln!("  {row}");
            rows.push(row);
        }
    }
    eprintln!("  learned costs: {:?}", index.cost_estimates());
    println!("{}", serde_json::json!({ "photos": n, "filtered": rows }));
}

/// Deletions and the rebuild at scale, on the graph `run --keep` left
/// (nothing is saved: the kept graph stays as it was). Removes every 10th photo and times
/// searches that skip them; then every 4th too, which passes
/// `REBUILD_DEAD_FRACTION`, and rebuilds from the live vectors on the
/// pool's threads while this thread searches without pause. A search that
/// waited for the rebuild would show as a maximum near the rebuild's time.
fn rebuild(args: &Args) {
    use clipdex::vector::VectorIndex;
    let dir = &args.data;
    let n = args.photos;
    let photos = read_vectors(&dir.join("photos.f32"), 0, n);
    let text = read_vectors(&dir.join("text-queries.f32"), 0, 500);
    let index = VectorIndex::open(&dir.join(format!("index-{n}")), DIM).unwrap();
    assert_eq!(index.len(), n, "run `scale run --keep --photos {n}` first");
    let percentile = |times: &mut Vec<f64>, p: f64| {
        times.sort_by(f64::total_cmp);
        times[((times.len() - 1) as f64 * p) as usize] * 1e3
    };
    let search_all = |index: &VectorIndex| -> Vec<f64> {
        text.chunks_exact(DIM)
            .map(|q| {
                let start = Instant::now();
                index.search(q, K, None).unwrap();
                start.elapsed().as_secs_f64()
            })
            .collect()
    };
    let mut report = serde_json::json!({ "photos": n });
    let mut before = search_all(&index);
    report["p50_ms_before"] = percentile(&mut before, 0.5).into();
    let start = Instant::now();
    index.remove((1..=n as u64).filter(|id| id % 10 == 0));
    report["remove_10pct_s"] = start.elapsed().as_secs_f64().into();
    let mut tenth = search_all(&index);
    report["p50_ms_10pct_removed"] = percentile(&mut tenth, 0.5).into();
    index.remove((1..=n as u64).filter(|id| id % 4 == 0));
    let dead = index.dead_fraction();
    report["dead_fraction"] = dead.into();
    assert!(dead > clipdex::vector::REBUILD_DEAD_FRACTION);
    let live: Vec<(u64, Vec<f32>)> = (1..=n as u64)
        .filter(|id| id % 10 != 0 && id % 4 != 0)
        .map(|id| {
            (
                id,
                photos[(id as usize - 1) * DIM..id as usize * DIM].to_vec(),
            )
        })
        .collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let (mut during, rebuild_s) = std::thread::scope(|s| {
        let builder = s.spawn(|| {
            let start = Instant::now();
            index.rebuild(live).unwrap();
            done.store(true, std::sync::atomic::Ordering::Release);
            start.elapsed().as_secs_f64()
        });
        let mut during = Vec::new();
        for q in text.chunks_exact(DIM).cycle() {
            if done.load(std::sync::atomic::Ordering::Acquire) {
                break;
            }
            let start = Instant::now();
            let found = index.search(q, K, None).unwrap();
            during.push(start.elapsed().as_secs_f64());
            assert!(found.iter().all(|(id, _)| id % 10 != 0 && id % 4 != 0));
        }
        (during, builder.join().unwrap())
    });
    report["rebuild_s"] = rebuild_s.into();
    report["searches_during_rebuild"] = during.len().into();
    report["p50_ms_during"] = percentile(&mut during, 0.5).into();
    report["p99_ms_during"] = percentile(&mut during, 0.99).into();
    report["max_ms_during"] = percentile(&mut during, 1.0).into();
    let mut after = search_all(&index);
    report["p50_ms_after"] = percentile(&mut after, 0.5).into();
    report["live_after"] = index.len().into();
    report["dead_fraction_after"] = index.dead_fraction().into();
    println!("{report}");
}

/// The cameras of the assembled library's events (`None`: no EXIF).
const CAMERAS: [(Option<&str>, Option<&str>); 7] = [
    (Some("Canon"), Some("Canon EOS 5D Mark III")),
    (Some("NIKON CORPORATION"), Some("NIKON D750")),
    (Some("Apple"), Some("iPhone 12")),
    (Some("Google"), Some("Pixel 7")),
    (Some("FUJIFILM"), Some("X-T3")),
    (Some("SONY"), Some("ILCE-7M3")),
    (None, None),
];

/// Photos per event folder in the assembled library.
const EVENT: usize = 200;

/// The record of photo `i` (0-based) of an assembled library of `n`.
fn archive_record(i: usize, n: usize, id: u64) -> clipdex::store::PhotoRecord {
    // Twenty years, 2005 to 2024, in order of i.
    const START: i64 = 1_104_537_600; // 2005-01-01T00:00:00Z
    const SPAN: i64 = 20 * 365 * 86_400;
    let taken = START + (SPAN as f64 * i as f64 / n as f64) as i64;
    let date = clipdex::common::time::format_datetime(taken);
    let (year, month) = (&date[..4], &date[5..7]);
    let event = i / EVENT;
    let (make, model) = CAMERAS[event % CAMERAS.len()];
    let format = if i % 10 == 9 { "png" } else { "jpeg" };
    let extension = if format == "png" { "png" } else { "jpg" };
    let mut rng = Rng::new(7, i as u64);
    clipdex::store::PhotoRecord {
        id,
        path: format!("{year}/{year}-{month}-event{event:05}/IMG_{i:07}.{extension}"),
        sig: clipdex::common::FileSig {
            size: 1_000_000 + rng.below(4_000_000) as u64,
            mtime_ns: taken * 1_000_000_000,
        },
        hash: clipdex::common::ContentHash::of(&(i as u64).to_le_bytes()),
        width: 4000,
        height: 3000,
        format: format.into(),
        taken: make.map(|_| date.clone()),
        camera_make: make.map(String::from),
        camera_model: model.map(String::from),
        orientation: 1,
        caption: None,
        tags: Vec::new(),
        caption_source: None,
        sidecar: None,
        indexed_at: taken,
    }
}

/// Assembles a clipdex index of the first N photos (see the module doc).
fn library(args: &Args) {
    use clipdex::indexer::{Index, IndexPaths};
    use clipdex::store::Change;
    let dir = &args.data;
    let n = args.photos;
    let graph = dir.join(format!("index-{n}"));
    assert!(
        graph.join("CURRENT").exists(),
        "run `scale run --photos {n} --keep` first: it saves the graph"
    );
    let root = args
        .index
        .clone()
        .unwrap_or_else(|| dir.join(format!("library-{n}")));
    let _ = std::fs::remove_dir_all(&root);
    let files = root.join("files");
    std::fs::create_dir_all(&files).unwrap();
    let model = args.model.clone().unwrap_or_else(|| dir.join("model"));
    let clip = Clip::load(
        &ModelSource::Dir(model),
        &HubOptions {
            offline: true,
            progress: false,
        },
    )
    .expect("load the model");
    let index_dir = root.join("index");
    let start = Instant::now();
    {
        let index = Index::create_or_open(&index_dir, &files, clip.info()).unwrap();
        assert_eq!(
            index.store().reserve_ids(n as u64).unwrap(),
            1,
            "a new store's ids start at 1"
        );
        const COMMIT: usize = 10_000;
        for from in (0..n).step_by(COMMIT) {
            let count = COMMIT.min(n - from);
            let vectors = read_vectors(&dir.join("photos.f32"), from, count);
            let changes: Vec<Change> = vectors
                .chunks_exact(DIM)
                .enumerate()
                .map(|(j, v)| Change::Put {
                    record: archive_record(from + j, n, (from + j + 1) as u64),
                    vector: Some(v.to_vec()),
                    old_path: None,
                })
                .collect();
            index.store().commit(&changes).unwrap();
            for change in &changes {
                if let Change::Put { record, .. } = change {
                    index
                        .keywords()
                        .upsert(&clipdex::keyword::Doc {
                            id: record.id,
                            path: &record.path,
                            format: &record.format,
                            caption: None,
                            camera: record.camera(),
                            taken: record.taken.as_deref(),
                            tags: record.tags.iter().map(|t| t.name.as_str()).collect(),
                        })
                        .unwrap();
                }
            }
            index.keywords().commit().unwrap();
            if (from + count) % 100_000 == 0 || from + count == n {
                eprintln!(
                    "  {} records in {:.0} s",
                    from + count,
                    start.elapsed().as_secs_f64()
                );
            }
        }
        index.store().flush().unwrap();
    }
    let records = start.elapsed().as_secs_f64();
    // The saved graph, linked in as the index's current generation.
    let vectors = IndexPaths::new(&index_dir).vectors();
    let _ = std::fs::remove_dir_all(&vectors);
    let name = std::fs::read_to_string(graph.join("CURRENT")).unwrap();
    let target = vectors.join(name.trim());
    std::fs::create_dir_all(&target).unwrap();
    for entry in std::fs::read_dir(graph.join(name.trim())).unwrap() {
        let entry = entry.unwrap();
        std::fs::hard_link(entry.path(), target.join(entry.file_name())).unwrap();
    }
    std::fs::write(vectors.join("CURRENT"), name.trim()).unwrap();
    let start = Instant::now();
    let index = Index::open(&index_dir).unwrap();
    let open = start.elapsed().as_secs_f64();
    let consistency = index.check().unwrap();
    println!(
        "{}",
        serde_json::json!({
            "photos": n,
            "index": index_dir,
            "records_s": records,
            "open_s": open,
            "records": index.store().count(),
            "vectors": index.vectors().count().expect("the vectors count"),
            "keywords": index.keywords().count(),
            "consistent": consistency.consistent,
        })
    );
}

/// The same vectors and queries in a Milvus collection (HNSW, M 24,
/// efConstruction 200, ef 64: the embedded graph's settings): the time to
/// write them, to build its index, and single-thread recall and queries/s,
/// each query a round trip as `clipdex serve` makes it.
///
///     scripts/milvus_server.sh start target/bench/milvus   # prints HOST:PORT
///     cargo bench --bench scale -- milvus --milvus HOST:PORT --photos 100000
fn milvus(args: &Args) {
    use clipdex::vector::milvus::{AnnIndex, Fields, MilvusConfig, MilvusVectors};
    let address = args.milvus.clone().expect("--milvus HOST:PORT");
    let dir = &args.data;
    let n = args.photos;
    let (photos, text, image) = bench_vectors(args);
    let all_queries = [text.as_slice(), image.as_slice()].concat();
    let truth_all = truth(dir, &photos, &all_queries);
    let (truth_text, truth_image) = truth_all.split_at(text.len() / DIM);
    let config = MilvusConfig {
        address: address.clone(),
        collection: format!("clipdex_bench_{n}"),
        index: AnnIndex::Hnsw,
        shard: None,
        owner: None,
        replica: false,
        bounded: false,
    };
    let engine = MilvusVectors::open(&config, DIM, "scale-bench", None).expect("milvus");
    let have = engine.count().expect("count");
    let mut write_s = 0.0;
    if have != n {
        let start = Instant::now();
        for (b, chunk) in photos.chunks(50_000 * DIM).enumerate() {
            let items: Vec<(u64, Vec<f32>, Fields)> = chunk
                .chunks_exact(DIM)
                .enumerate()
                .map(|(i, v)| ((b * 50_000 + i + 1) as u64, v.to_vec(), Fields::default()))
                .collect();
            engine.put(items).expect("put");
        }
        write_s = start.elapsed().as_secs_f64();
    }
    let start = Instant::now();
    engine
        .settle(std::time::Duration::from_secs(1800))
        .expect("the index builds");
    let settle_s = start.elapsed().as_secs_f64();
    let search = |q: &[f32]| {
        engine
            .search(
                q,
                K,
                clipdex::vector::milvus::expression(engine.scope(), None, &Default::default()),
            )
            .expect("search")
    };
    let (text_recall, text_qps, text_p50) = measure(&text, truth_text, search);
    let (image_recall, image_qps, image_p50) = measure(&image, truth_image, search);
    match write_s > 0.0 {
        true => println!(
            "milvus at {address}, {n} photos: written in {write_s:.1} s ({:.0}/s), flushed in {settle_s:.1} s \
             (Milvus may still be indexing: run again to measure the built index)",
            n as f64 / write_s
        ),
        false => println!(
            "milvus at {address}, {n} photos already in {}",
            config.collection
        ),
    }
    println!(
        "  text:  recall@{K} {text_recall:.4}, {text_qps:.0} q/s, p50 {text_p50:.2} ms (one thread, ef 64)"
    );
    println!("  image: recall@{K} {image_recall:.4}, {image_qps:.0} q/s, p50 {image_p50:.2} ms");
}
