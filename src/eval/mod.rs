//! Evaluation as the CLIP paper measures: retrieval recall (image to text and
//! text to image, R@1/5/10 and median rank), zero-shot classification with
//! prompt-template ensembling (top-1/top-5 and where the classifier goes
//! wrong), and a linear probe (multinomial logistic regression on frozen image
//! features, its L2 strength chosen on a held-out part of the training set).

use candle_core::{Device, Tensor, Var};
use serde::Serialize;

use crate::common::RgbView;
use crate::model::Clip;
use crate::train::data::{ImageSet, Sample, fill};
pub use crate::train::metrics::{Recall, RetrievalMetrics, retrieval_from_similarity};

/// Why an evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] crate::model::Error),
    #[error(transparent)]
    Optimizer(#[from] crate::train::optim::Error),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Model(e.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Embeds images of samples in batches (inference preprocessing).
pub fn embed_samples(clip: &Clip, images: &ImageSet, batch: usize) -> Result<Vec<Vec<f32>>> {
    let s = clip.preprocessor().image_size();
    let plane = 3 * s * s;
    let mut out = Vec::with_capacity(images.len());
    for start in (0..images.len()).step_by(batch) {
        let end = (start + batch).min(images.len());
        let mut pixels = vec![0f32; (end - start) * plane];
        for (k, i) in (start..end).enumerate() {
            images.centered(i, &mut pixels[k * plane..(k + 1) * plane]);
        }
        out.extend(clip.embed_pixels(pixels, end - start)?);
    }
    Ok(out)
}

/// Retrieval over (image, caption) pairs: images are grouped by path, so an
/// image with several captions counts once.
pub fn retrieval(
    clip: &Clip,
    samples: &[Sample],
    images: &ImageSet,
    batch: usize,
) -> Result<RetrievalMetrics> {
    // One embedding per distinct image.
    let mut first_of: std::collections::HashMap<&std::path::Path, usize> =
        std::collections::HashMap::new();
    let mut image_of = Vec::with_capacity(samples.len());
    let mut distinct = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        let next = first_of.len();
        let k = *first_of.entry(s.image.as_path()).or_insert_with(|| {
            distinct.push(i);
            next
        });
        image_of.push(k);
    }
    let all = embed_samples(clip, images, batch)?;
    let image_emb: Vec<&Vec<f32>> = distinct.iter().map(|&i| &all[i]).collect();
    let captions: Vec<&str> = samples.iter().map(|s| s.caption.as_str()).collect();
    let text_emb = clip.embed_texts(&captions)?;
    let sim: Vec<Vec<f32>> = image_emb
        .iter()
        .map(|i| text_emb.iter().map(|t| dot(i, t)).collect())
        .collect();
    Ok(retrieval_from_similarity(&sim, &image_of))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One classifier weight per class: the mean of the normalised embeddings of
/// the class name in every template, normalised (CLIP's prompt ensembling).
pub fn class_embeddings(
    clip: &Clip,
    classes: &[String],
    templates: &[String],
) -> Result<Vec<Vec<f32>>> {
    let prompts: Vec<Vec<String>> = classes
        .iter()
        .map(|c| templates.iter().map(|t| fill(t, c)).collect())
        .collect();
    Ok(clip.ensemble(&prompts)?)
}

#[derive(Clone, Debug, Serialize)]
pub struct ClassReport {
    pub class: String,
    pub images: usize,
    pub accuracy: f32,
    /// The class this one is most often taken for, and how often (percent).
    pub confused_with: Option<(String, f32)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ZeroShotMetrics {
    pub images: usize,
    pub classes: usize,
    pub top1: f32,
    pub top5: f32,
    pub per_class: Vec<ClassReport>,
}

/// Zero-shot accuracy of image embeddings against class embeddings.
pub fn zero_shot_from_embeddings(
    images: &[Vec<f32>],
    labels: &[usize],
    classes: &[String],
    class_emb: &[Vec<f32>],
) -> ZeroShotMetrics {
    let k = classes.len();
    let mut confusion = vec![vec![0usize; k]; k];
    let (mut top1, mut top5) = (0usize, 0usize);
    for (e, &y) in images.iter().zip(labels) {
        let scores: Vec<f32> = class_emb.iter().map(|c| dot(e, c)).collect();
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        confusion[y][order[0]] += 1;
        top1 += usize::from(order[0] == y);
        top5 += usize::from(order.iter().take(5).any(|&c| c == y));
    }
    let n = images.len().max(1) as f32;
    let per_class = (0..k)
        .map(|c| {
            let total: usize = confusion[c].iter().sum();
            let wrong = (0..k).filter(|&o| o != c).max_by_key(|&o| confusion[c][o]);
            ClassReport {
                class: classes[c].clone(),
                images: total,
                accuracy: 100.0 * confusion[c][c] as f32 / total.max(1) as f32,
                confused_with: wrong.filter(|&o| confusion[c][o] > 0).map(|o| {
                    (
                        classes[o].clone(),
                        100.0 * confusion[c][o] as f32 / total.max(1) as f32,
                    )
                }),
            }
        })
        .collect();
    ZeroShotMetrics {
        images: images.len(),
        classes: k,
        top1: 100.0 * top1 as f32 / n,
        top5: 100.0 * top5 as f32 / n,
        per_class,
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProbeMetrics {
    pub train_images: usize,
    pub test_images: usize,
    pub classes: usize,
    pub accuracy: f32,
    /// The L2 strength chosen on the held-out part of the training set.
    pub l2: f64,
}

/// Trains multinomial logistic regression (full-batch Adam, L2 penalty) and
/// returns the weights (dim+1, classes).
fn fit_logistic(x: &Tensor, y: &Tensor, classes: usize, l2: f64, steps: usize) -> Result<Tensor> {
    let d = x.dim(1)?;
    let w = Var::zeros((d, classes), candle_core::DType::F32, x.device())?;
    let b = Var::zeros(classes, candle_core::DType::F32, x.device())?;
    let mut opt = crate::train::optim::AdamW::new(
        vec![("w.weight".into(), w.clone()), ("b.bias".into(), b.clone())],
        crate::train::optim::AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    for step in 0..steps {
        let logits = x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
        let loss = (candle_nn::loss::cross_entropy(&logits, y)?
            + (w.as_tensor().sqr()?.sum_all()? * l2)?)?;
        let grads = loss.backward()?;
        let lr = crate::train::optim::learning_rate(step as u64, 0.05, 10, steps as u64);
        opt.step(&grads, lr)?;
    }
    Ok(Tensor::cat(
        &[w.as_tensor().detach(), b.as_tensor().detach().unsqueeze(0)?],
        0,
    )?)
}

fn accuracy(x: &Tensor, y: &[u32], wb: &Tensor) -> Result<f32> {
    let d = x.dim(1)?;
    let logits = x
        .matmul(&wb.narrow(0, 0, d)?)?
        .broadcast_add(&wb.narrow(0, d, 1)?)?;
    let pred = logits.argmax(1)?.to_vec1::<u32>()?;
    Ok(100.0 * pred.iter().zip(y).filter(|(p, t)| p == t).count() as f32 / y.len().max(1) as f32)
}

/// Logistic regression on frozen features, as the paper's linear probe.
pub fn linear_probe(
    train_x: &[Vec<f32>],
    train_y: &[u32],
    test_x: &[Vec<f32>],
    test_y: &[u32],
    classes: usize,
) -> Result<ProbeMetrics> {
    let dev = Device::Cpu;
    let d = train_x.first().map_or(0, Vec::len);
    // Standardise with the training statistics.
    let mut mean = vec![0f32; d];
    for r in train_x {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v / train_x.len() as f32;
        }
    }
    let mut std = vec![0f32; d];
    for r in train_x {
        for ((s, v), m) in std.iter_mut().zip(r).zip(&mean) {
            *s += (v - m).powi(2) / train_x.len() as f32;
        }
    }
    let std: Vec<f32> = std.into_iter().map(|s| s.sqrt().max(1e-6)).collect();
    let to_tensor = |rows: &[Vec<f32>]| -> Result<Tensor> {
        let flat: Vec<f32> = rows
            .iter()
            .flat_map(|r| r.iter().zip(&mean).zip(&std).map(|((v, m), s)| (v - m) / s))
            .collect();
        Ok(Tensor::from_vec(flat, (rows.len(), d), &dev)?)
    };
    // Hold out every fifth training image to pick the L2 strength.
    let (fit_idx, held_idx): (Vec<usize>, Vec<usize>) =
        (0..train_x.len()).partition(|i| i % 5 != 0);
    let pick = |idx: &[usize]| {
        (
            idx.iter().map(|&i| train_x[i].clone()).collect::<Vec<_>>(),
            idx.iter().map(|&i| train_y[i]).collect::<Vec<_>>(),
        )
    };
    let (fx, fy) = pick(&fit_idx);
    let (hx, hy) = pick(&held_idx);
    let (fx, hx) = (to_tensor(&fx)?, to_tensor(&hx)?);
    let fy_t = Tensor::new(fy.as_slice(), &dev)?;
    let mut best = (f32::NEG_INFINITY, 1e-4);
    for l2 in [1e-6, 1e-5, 1e-4, 1e-3, 1e-2] {
        let wb = fit_logistic(&fx, &fy_t, classes, l2, 300)?;
        let acc = accuracy(&hx, &hy, &wb)?;
        if acc > best.0 {
            best = (acc, l2);
        }
    }
    let x = to_tensor(train_x)?;
    let y = Tensor::new(train_y, &dev)?;
    let wb = fit_logistic(&x, &y, classes, best.1, 500)?;
    let acc = accuracy(&to_tensor(test_x)?, test_y, &wb)?;
    Ok(ProbeMetrics {
        train_images: train_x.len(),
        test_images: test_x.len(),
        classes,
        accuracy: acc,
        l2: best.1,
    })
}

/// Embeds one decoded RGB image (for callers outside the batch pipeline).
pub fn embed_view(clip: &Clip, view: RgbView) -> Result<Vec<f32>> {
    Ok(clip.embed_images(&[view])?.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_on_a_known_matrix() {
        // 3 images, 4 texts; text 3 also describes image 0.
        let sim = vec![
            vec![0.9, 0.1, 0.8, 0.2],
            vec![0.3, 0.2, 0.1, 0.0],
            vec![0.1, 0.5, 0.7, 0.1],
        ];
        let image_of = [0, 1, 2, 0];
        let m = retrieval_from_similarity(&sim, &image_of);
        // Text to image ranks: t0 -> 1, t1 -> img1 0.2 vs img2 0.5 -> 2, t2 -> img2 0.7 vs img0 0.8 -> 2, t3 -> 1.
        assert_eq!(m.text_to_image.r1, 50.0);
        assert_eq!(m.text_to_image.median_rank, 1.5);
        // Image to text: img0 best 0.9 -> 1; img1 best 0.2 (t1), beaten by t0 0.3 -> 2; img2 0.7 -> 1.
        assert!((m.image_to_text.r1 - 200.0 / 3.0).abs() < 1e-4);
        assert_eq!(m.image_to_text.r5, 100.0);
    }

    #[test]
    fn zero_shot_counts_and_confusion() {
        let classes = vec!["a".to_string(), "b".to_string()];
        let class_emb = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let images = vec![vec![0.9, 0.1], vec![0.2, 0.8], vec![0.7, 0.3]];
        let labels = [0, 1, 1];
        let m = zero_shot_from_embeddings(&images, &labels, &classes, &class_emb);
        assert!((m.top1 - 200.0 / 3.0).abs() < 1e-4);
        assert_eq!(m.top5, 100.0);
        assert_eq!(m.per_class[1].confused_with, Some(("a".to_string(), 50.0)));
    }

    #[test]
    fn linear_probe_separates_separable_data() {
        let mut rng = crate::common::rng::NormalRng::new(5);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..300 {
            let c = (i % 3) as u32;
            x.push(vec![
                c as f32 * 3.0 + rng.normal() as f32,
                rng.normal() as f32,
                -(c as f32) + rng.normal() as f32 * 0.5,
            ]);
            y.push(c);
        }
        let m = linear_probe(&x[..240], &y[..240], &x[240..], &y[240..], 3).unwrap();
        assert!(m.accuracy > 90.0, "{m:?}");
    }
}
