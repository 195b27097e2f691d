//! Retrieval recall as the CLIP paper reports it (R@1/5/10 and median
//! rank, both directions): validation during training and `clipdex eval`
//! compute it the same way.

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Recall {
    pub r1: f32,
    pub r5: f32,
    pub r10: f32,
    /// Median rank of the first correct result (1 = top).
    pub median_rank: f32,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RetrievalMetrics {
    pub images: usize,
    pub texts: usize,
    pub image_to_text: Recall,
    pub text_to_image: Recall,
}

fn recall(ranks: &mut [usize]) -> Recall {
    if ranks.is_empty() {
        return Recall::default();
    }
    let n = ranks.len() as f32;
    ranks.sort_unstable();
    let ranks = &*ranks;
    let within = |k: usize| 100.0 * ranks.iter().filter(|&&r| r <= k).count() as f32 / n;
    let m = ranks.len();
    let median = if m % 2 == 1 {
        ranks[m / 2] as f32
    } else {
        (ranks[m / 2 - 1] + ranks[m / 2]) as f32 / 2.0
    };
    Recall {
        r1: within(1),
        r5: within(5),
        r10: within(10),
        median_rank: median,
    }
}

/// Retrieval metrics from an (images x texts) similarity matrix; `image_of[t]`
/// is the image text `t` describes (an image may have several texts).
pub fn retrieval_from_similarity(sim: &[Vec<f32>], image_of: &[usize]) -> RetrievalMetrics {
    let n_images = sim.len();
    let n_texts = image_of.len();
    // Text to image: rank of the described image among all images.
    let mut t2i: Vec<usize> = (0..n_texts)
        .map(|t| {
            let target = sim[image_of[t]][t];
            1 + (0..n_images).filter(|&i| sim[i][t] > target).count()
        })
        .collect();
    // Image to text: rank of its best-ranked text.
    let mut i2t: Vec<usize> = (0..n_images)
        .filter_map(|i| {
            let best = (0..n_texts)
                .filter(|&t| image_of[t] == i)
                .map(|t| sim[i][t])
                .fold(f32::NEG_INFINITY, f32::max);
            if best == f32::NEG_INFINITY {
                return None;
            }
            Some(
                1 + (0..n_texts)
                    .filter(|&t| image_of[t] != i && sim[i][t] > best)
                    .count(),
            )
        })
        .collect();
    RetrievalMetrics {
        images: n_images,
        texts: n_texts,
        image_to_text: recall(&mut i2t),
        text_to_image: recall(&mut t2i),
    }
}
