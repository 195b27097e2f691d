//! Training and evaluation data: (image, caption) pairs from JSONL, CSV
//! (open_clip's `filepath`/`title` columns), a folder of images with sidecar
//! `.txt` captions, or a folder of class sub-folders (captions made from the
//! class names with prompt templates). Paths are relative to the data file.
//! Rows that cannot be used are reported and left out, never fatal.
//!
//! Images are decoded once, resized (shortest side to 9/8 of the model's
//! input) and kept in memory when they fit, so an epoch costs only random
//! square crops; the crop of a sample depends only on the seed, the epoch and
//! the sample, so a resumed run sees exactly the batches it would have seen.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::common::rng::NormalRng;
use crate::common::{Resample, RgbView, resample};
use crate::library::{DecodeLimits, decode_file};
use crate::model::Preprocessor;

/// Prompt templates for class names (a subset of CLIP's ImageNet ensemble).
pub const DEFAULT_TEMPLATES: &[&str] = &[
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
];

/// Memory for decoded training images; past it they are decoded per batch.
const CACHE_BUDGET: usize = 3 << 30;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub image: PathBuf,
    pub caption: String,
    /// Class name, for class-folder and labelled data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// A row or file left out, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub item: String,
    pub reason: String,
}

#[derive(Debug, Default)]
pub struct Dataset {
    pub samples: Vec<Sample>,
    pub problems: Vec<Problem>,
}

impl Dataset {
    /// Sorted distinct labels.
    pub fn classes(&self) -> Vec<String> {
        let mut c: Vec<String> = self
            .samples
            .iter()
            .filter_map(|s| s.label.clone())
            .collect();
        c.sort();
        c.dedup();
        c
    }
}

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        crate::library::scan::IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
    })
}

/// A class folder's name as words: `ankle_boot` -> `ankle boot`.
pub fn class_name(folder: &str) -> String {
    folder
        .replace(['_', '-'], " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Fills a template with a class name.
pub fn fill(template: &str, class: &str) -> String {
    template.replace("{}", class).replace("{c}", class)
}

/// Reads a dataset. `templates` make captions from class names.
pub fn load(path: &Path, templates: &[String]) -> std::io::Result<Dataset> {
    if path.is_dir() {
        return Ok(load_folder(path, templates));
    }
    let text = std::fs::read_to_string(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    Ok(match ext.as_str() {
        "csv" | "tsv" => load_csv(&text, base),
        _ => load_jsonl(&text, base, templates),
    })
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn load_jsonl(text: &str, base: &Path, templates: &[String]) -> Dataset {
    #[derive(Deserialize)]
    struct Row {
        image: Option<String>,
        caption: Option<String>,
        label: Option<String>,
    }
    let mut d = Dataset::default();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item = format!("line {}", n + 1);
        let row: Row = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                d.problems.push(Problem {
                    item,
                    reason: format!("not a JSON object: {e}"),
                });
                continue;
            }
        };
        let Some(image) = row.image.filter(|s| !s.trim().is_empty()) else {
            d.problems.push(Problem {
                item,
                reason: "no \"image\"".into(),
            });
            continue;
        };
        let caption = match (
            row.caption
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty()),
            &row.label,
        ) {
            (Some(c), _) => c,
            (None, Some(label)) if !templates.is_empty() => {
                fill(&templates[n % templates.len()], label)
            }
            _ => {
                d.problems.push(Problem {
                    item,
                    reason: "no \"caption\"".into(),
                });
                continue;
            }
        };
        d.samples.push(Sample {
            image: resolve(base, &image),
            caption,
            label: row.label,
        });
    }
    d
}

/// Splits one CSV line, honouring double quotes.
fn csv_fields(line: &str, sep: char) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            c if c == sep && !quoted => fields.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

fn load_csv(text: &str, base: &Path) -> Dataset {
    let mut d = Dataset::default();
    let mut lines = text.lines();
    let Some(header) = lines.next() else { return d };
    let sep = if header.contains('\t') { '\t' } else { ',' };
    let cols = csv_fields(header, sep);
    let find = |names: &[&str]| {
        cols.iter()
            .position(|c| names.contains(&c.trim().to_ascii_lowercase().as_str()))
    };
    let (Some(fi), Some(ti)) = (
        find(&["filepath", "image", "path"]),
        find(&["title", "caption", "text"]),
    ) else {
        d.problems.push(Problem {
            item: "header".into(),
            reason: "needs filepath and title columns".into(),
        });
        return d;
    };
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f = csv_fields(line, sep);
        let item = format!("row {}", n + 2);
        match (
            f.get(fi).map(|s| s.trim()).filter(|s| !s.is_empty()),
            f.get(ti).map(|s| s.trim()).filter(|s| !s.is_empty()),
        ) {
            (Some(path), Some(title)) => d.samples.push(Sample {
                image: resolve(base, path),
                caption: title.to_string(),
                label: None,
            }),
            (None, _) => d.problems.push(Problem {
                item,
                reason: "no file path".into(),
            }),
            (_, None) => d.problems.push(Problem {
                item,
                reason: "no title".into(),
            }),
        }
    }
    d
}

fn load_folder(root: &Path, templates: &[String]) -> Dataset {
    let mut d = Dataset::default();
    let mut images: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .sort_by_file_name()
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file() && is_image(e.path()))
        .map(|e| e.path().to_path_buf())
        .collect();
    images.sort();
    let has_sidecars = images.iter().any(|p| p.with_extension("txt").is_file());
    let top_level_images = images.iter().any(|p| p.parent() == Some(root));
    if !has_sidecars && !top_level_images {
        // Class sub-folders.
        for (i, p) in images.into_iter().enumerate() {
            let rel = p.strip_prefix(root).unwrap_or(&p);
            let class = rel
                .components()
                .next()
                .map(|c| class_name(&c.as_os_str().to_string_lossy()))
                .unwrap_or_default();
            let caption = if templates.is_empty() {
                class.clone()
            } else {
                fill(&templates[i % templates.len()], &class)
            };
            d.samples.push(Sample {
                image: p,
                caption,
                label: Some(class),
            });
        }
        return d;
    }
    for p in images {
        let side = [
            p.with_extension("txt"),
            PathBuf::from(format!("{}.txt", p.display())),
        ];
        match side
            .iter()
            .find_map(|s| std::fs::read_to_string(s).ok())
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
        {
            Some(caption) => d.samples.push(Sample {
                image: p,
                caption,
                label: None,
            }),
            None => d.problems.push(Problem {
                item: p.display().to_string(),
                reason: "no caption (.txt beside it)".into(),
            }),
        }
    }
    d
}

/// Deterministic split: a sample goes to validation when the hash of its
/// image path (relative to `base`, the dataset's folder, so that the split
/// does not depend on where the dataset lives) and caption falls in the
/// first `percent` of the range.
pub fn split(samples: Vec<Sample>, percent: f64, base: &Path) -> (Vec<Sample>, Vec<Sample>) {
    samples.into_iter().partition(|s| {
        let image = s.image.strip_prefix(base).unwrap_or(&s.image);
        let h = blake3::hash(format!("{}\u{0}{}", image.display(), s.caption).as_bytes());
        let v = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
        ((v % 1_000_000) as f64) >= percent * 10_000.0
    })
}

/// Writes samples as JSONL (absolute paths), the manifest of a split.
pub fn write_jsonl(path: &Path, samples: &[Sample]) -> std::io::Result<()> {
    let mut out = String::new();
    for s in samples {
        out.push_str(&serde_json::to_string(s).expect("sample serialises"));
        out.push('\n');
    }
    std::fs::write(path, out)
}

enum Pixels {
    /// Resized to the augmentation base, kept in memory.
    Cached {
        data: Vec<u8>,
        width: usize,
        height: usize,
    },
    /// Decoded again for every batch (the cache would not fit).
    Lazy(PathBuf),
}

/// Images ready for training: decoded, checked, resized.
pub struct ImageSet {
    items: Vec<Pixels>,
    pub preprocessor: Preprocessor,
    base: usize,
}

fn base_side(image_size: usize) -> usize {
    (image_size * 9).div_ceil(8)
}

fn resize_short(view: RgbView, side: usize) -> (Vec<u8>, usize, usize) {
    let (w, h) = (view.width, view.height);
    let (nw, nh) = if w <= h {
        (side, ((side * h) as f64 / w as f64).round() as usize)
    } else {
        (((side * w) as f64 / h as f64).round() as usize, side)
    };
    let (nw, nh) = (nw.max(side), nh.max(side));
    if (nw, nh) == (w, h) {
        return (view.data.to_vec(), w, h);
    }
    (resample(view, nw, nh, Resample::Bicubic), nw, nh)
}

impl ImageSet {
    /// Decodes every sample's image in parallel; returns the usable ones
    /// (with their sample indices) and a problem for each that is not.
    pub fn prepare(
        samples: &[Sample],
        preprocessor: &Preprocessor,
    ) -> (ImageSet, Vec<usize>, Vec<Problem>) {
        let base = base_side(preprocessor.image_size());
        let limits = DecodeLimits::default();
        let cache = samples.len().saturating_mul(base * base * 3 * 3 / 2) <= CACHE_BUDGET;
        let decoded: Vec<Result<Pixels, String>> = samples
            .par_iter()
            .map(|s| {
                let img = decode_file(&s.image, &limits).map_err(|e| e.to_string())?;
                if !cache {
                    return Ok(Pixels::Lazy(s.image.clone()));
                }
                let (data, width, height) = resize_short(img.view(), base);
                Ok(Pixels::Cached {
                    data,
                    width,
                    height,
                })
            })
            .collect();
        let mut items = Vec::new();
        let mut kept = Vec::new();
        let mut problems = Vec::new();
        for (i, r) in decoded.into_iter().enumerate() {
            match r {
                Ok(p) => {
                    items.push(p);
                    kept.push(i);
                }
                Err(reason) => problems.push(Problem {
                    item: samples[i].image.display().to_string(),
                    reason,
                }),
            }
        }
        (
            ImageSet {
                items,
                preprocessor: preprocessor.clone(),
                base,
            },
            kept,
            problems,
        )
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn base_image(&self, i: usize) -> (std::borrow::Cow<'_, [u8]>, usize, usize) {
        match &self.items[i] {
            Pixels::Cached {
                data,
                width,
                height,
            } => (std::borrow::Cow::Borrowed(data), *width, *height),
            Pixels::Lazy(path) => {
                let img = decode_file(path, &DecodeLimits::default());
                match img {
                    Ok(img) => {
                        let (d, w, h) = resize_short(img.view(), self.base);
                        (std::borrow::Cow::Owned(d), w, h)
                    }
                    // Read fine when prepared; gone since: a grey square keeps the batch whole.
                    Err(_) => (
                        std::borrow::Cow::Owned(vec![128; self.base * self.base * 3]),
                        self.base,
                        self.base,
                    ),
                }
            }
        }
    }

    /// Item `i` with a random square crop (training), as (3, s, s) floats.
    pub fn augmented(&self, i: usize, rng: &mut NormalRng, out: &mut [f32]) {
        let s = self.preprocessor.image_size();
        let (data, w, h) = self.base_image(i);
        let x = ((w - s + 1) as f64 * rng.uniform()) as usize;
        let y = ((h - s + 1) as f64 * rng.uniform()) as usize;
        let mut crop = Vec::with_capacity(s * s * 3);
        for row in y..y + s {
            crop.extend_from_slice(&data[(row * w + x) * 3..(row * w + x + s) * 3]);
        }
        self.preprocessor.normalize_into(&crop, out);
    }

    /// Item `i` preprocessed as for inference (centre crop), as (3, s, s) floats.
    pub fn centered(&self, i: usize, out: &mut [f32]) {
        let (data, w, h) = self.base_image(i);
        let view = RgbView {
            width: w,
            height: h,
            data: &data,
        };
        let crop = self.preprocessor.resize_and_crop(view);
        self.preprocessor.normalize_into(&crop, out);
    }
}

/// The augmentation randomness of one sample in one epoch.
pub fn sample_rng(seed: u64, epoch: usize, index: usize) -> NormalRng {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&(epoch as u64).to_le_bytes());
    h.update(&(index as u64).to_le_bytes());
    NormalRng::new(u64::from_le_bytes(
        h.finalize().as_bytes()[..8].try_into().expect("8 bytes"),
    ))
}

/// The order of the samples in an epoch.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = sample_rng(seed, epoch, usize::MAX);
    for i in (1..n).rev() {
        let j = (rng.uniform() * (i + 1) as f64) as usize;
        order.swap(i, j.min(i));
    }
    order
}

/// Counts per label, for reports.
pub fn label_counts(samples: &[Sample]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in samples {
        if let Some(l) = &s.label {
            *m.entry(l.clone()).or_default() += 1;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_format_and_reports_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("a.jsonl"), "{\"image\": \"x.png\", \"caption\": \"a cat\"}\nnot json\n{\"image\": \"y.png\"}\n{\"caption\": \"no image\"}\n\n").unwrap();
        let d = load(&p.join("a.jsonl"), &[]).unwrap();
        assert_eq!(d.samples.len(), 1);
        assert_eq!(d.samples[0].image, p.join("x.png"));
        assert_eq!(d.problems.len(), 3);
        std::fs::write(
            p.join("b.csv"),
            "filepath,title\nimg/1.jpg,\"a dog, running\"\n,empty\nimg/2.jpg,\n",
        )
        .unwrap();
        let d = load(&p.join("b.csv"), &[]).unwrap();
        assert_eq!(
            d.samples,
            vec![Sample {
                image: p.join("img/1.jpg"),
                caption: "a dog, running".into(),
                label: None
            }]
        );
        assert_eq!(d.problems.len(), 2);
        std::fs::write(p.join("c.csv"), "title\tfilepath\ta sunset\tsun.jpg\n").unwrap();
        let d = load(&p.join("c.csv"), &[]).unwrap();
        assert!(d.samples.is_empty()); // header only
        // Class folders.
        let classes = p.join("classes");
        for (c, n) in [("ankle_boot", 2), ("bag", 1)] {
            std::fs::create_dir_all(classes.join(c)).unwrap();
            for i in 0..n {
                std::fs::write(classes.join(c).join(format!("{i}.png")), b"x").unwrap();
            }
        }
        let t = vec!["a photo of a {}.".to_string()];
        let d = load(&classes, &t).unwrap();
        assert_eq!(d.samples.len(), 3);
        assert_eq!(d.samples[0].caption, "a photo of a ankle boot.");
        assert_eq!(d.classes(), vec!["ankle boot", "bag"]);
        // Sidecars.
        let side = p.join("side");
        std::fs::create_dir_all(&side).unwrap();
        std::fs::write(side.join("a.jpg"), b"x").unwrap();
        std::fs::write(side.join("a.txt"), "a red kite").unwrap();
        std::fs::write(side.join("b.jpg"), b"x").unwrap();
        let d = load(&side, &[]).unwrap();
        assert_eq!(d.samples.len(), 1);
        assert_eq!(d.problems.len(), 1);
    }

    #[test]
    fn splits_and_orders_deterministically() {
        let samples: Vec<Sample> = (0..1000)
            .map(|i| Sample {
                image: format!("{i}.png").into(),
                caption: format!("c{i}"),
                label: None,
            })
            .collect();
        let (train, val) = split(samples.clone(), 20.0, Path::new("/data"));
        assert!((150..250).contains(&val.len()), "{}", val.len());
        assert_eq!(split(samples.clone(), 20.0, Path::new("/data")).1, val);
        // The same dataset in another place splits the same way.
        let moved = |root: &str| -> Vec<Sample> {
            samples
                .iter()
                .map(|s| Sample {
                    image: Path::new(root).join(&s.image),
                    ..s.clone()
                })
                .collect()
        };
        let names = |v: Vec<Sample>| v.into_iter().map(|s| s.caption).collect::<Vec<_>>();
        assert_eq!(
            names(split(moved("/a/data"), 20.0, Path::new("/a/data")).1),
            names(split(moved("/elsewhere/x"), 20.0, Path::new("/elsewhere/x")).1)
        );
        let a = epoch_order(100, 7, 3);
        assert_eq!(a, epoch_order(100, 7, 3));
        assert_ne!(a, epoch_order(100, 7, 4));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(train.len() + val.len(), 1000);
    }
}
