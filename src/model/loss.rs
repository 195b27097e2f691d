//! CLIP's training objective (Radford et al. 2021, section 2.3): in a batch
//! of N (image, text) pairs, image and text features are L2-normalised, the
//! N x N cosine similarities are scaled by `exp(t)` (t the learned
//! log-temperature), and the loss is the mean of the cross-entropies over rows
//! (each image against all texts) and over columns (each text against all
//! images), with the true pairs on the diagonal.

use candle_core::{DType, Tensor};

use super::{normalize, Result};

/// The symmetric contrastive loss and the (image, text) logits.
pub fn clip_loss(image_features: &Tensor, text_features: &Tensor, log_scale: &Tensor) -> Result<(Tensor, Tensor)> {
    let n = image_features.dim(0)?;
    let images = normalize(image_features)?;
    let texts = normalize(text_features)?;
    let logits = images.matmul(&texts.t()?)?.broadcast_mul(&log_scale.exp()?)?;
    let labels = Tensor::arange(0u32, n as u32, logits.device())?;
    let per_image = candle_nn::loss::cross_entropy(&logits, &labels)?;
    let per_text = candle_nn::loss::cross_entropy(&logits.t()?, &labels)?;
    let loss = ((per_image + per_text)? / 2.0)?;
    Ok((loss.to_dtype(DType::F32)?, logits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn matches_a_hand_computed_case() {
        let dev = Device::Cpu;
        // Two orthogonal image features; texts at 0 and 90 degrees of them, scale e^0 = 1.
        let images = Tensor::new(&[[2.0f32, 0.0], [0.0, 3.0]], &dev).unwrap();
        let texts = Tensor::new(&[[1.0f32, 0.0], [1.0, 1.0]], &dev).unwrap();
        let t = Tensor::new(0.0f32, &dev).unwrap();
        let (loss, logits) = clip_loss(&images, &texts, &t).unwrap();
        let c = std::f32::consts::FRAC_1_SQRT_2;
        // logits = [[1, c], [0, c]]
        let l = logits.to_vec2::<f32>().unwrap();
        assert!((l[0][0] - 1.0).abs() < 1e-6 && (l[0][1] - c).abs() < 1e-6 && l[1][0].abs() < 1e-6);
        let ce = |row: [f32; 2], target: usize| -> f32 { (row[0].exp() + row[1].exp()).ln() - row[target] };
        let rows = (ce([1.0, c], 0) + ce([0.0, c], 1)) / 2.0;
        let cols = (ce([1.0, 0.0], 0) + ce([c, c], 1)) / 2.0;
        let want = (rows + cols) / 2.0;
        assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
    }

    #[test]
    fn gradients_reach_features_and_temperature() {
        let dev = Device::Cpu;
        let images = Var::new(&[[1.0f32, 0.2, 0.1], [0.3, 1.0, 0.0], [0.0, 0.1, 1.0]], &dev).unwrap();
        let texts = Var::new(&[[0.9f32, 0.1, 0.0], [0.2, 0.8, 0.3], [0.1, 0.0, 1.1]], &dev).unwrap();
        let t = Var::new(2.0f32, &dev).unwrap();
        let (loss, _) = clip_loss(images.as_tensor(), texts.as_tensor(), t.as_tensor()).unwrap();
        let grads = loss.backward().unwrap();
        // Finite differences on the temperature agree with autograd.
        let g = grads.get(t.as_tensor()).unwrap().to_scalar::<f32>().unwrap();
        let at = |v: f32| {
            let t = Tensor::new(v, &dev).unwrap();
            clip_loss(images.as_tensor(), texts.as_tensor(), &t).unwrap().0.to_scalar::<f32>().unwrap()
        };
        let numeric = (at(2.0 + 1e-2) - at(2.0 - 1e-2)) / 2e-2;
        assert!((g - numeric).abs() < 1e-3, "autograd {g}, numeric {numeric}");
        for v in [&images, &texts] {
            let g = grads.get(v.as_tensor()).unwrap();
            assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        }
    }
}
