//! The training objectives.
//!
//! Softmax (CLIP, Radford et al. 2021, section 2.3): in a batch of N (image,
//! text) pairs, image and text features are L2-normalised, the N x N cosine
//! similarities are scaled by `exp(t)` (t the learned log-temperature), and
//! the loss is the mean of the cross-entropies over rows (each image against
//! all texts) and over columns (each text against all images), with the true
//! pairs on the diagonal.
//!
//! Sigmoid (SigLIP, Zhai et al. 2023, algorithm 1): every one of the N x N
//! pairs is its own binary problem, `logits = exp(t) * cos + b` with a learned
//! bias `b`, labels +1 on the diagonal and -1 elsewhere, and the loss is
//! `-sum(log sigmoid(label * logit)) / N`. The paper initialises `t = log 10`
//! and `b = -10`, so that training starts near the prior of mostly negative pairs.

use candle_core::{DType, Tensor};

use super::{Result, normalize};

/// Which objective a run trains with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    Softmax,
    Sigmoid,
}

impl std::str::FromStr for Objective {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "softmax" => Ok(Objective::Softmax),
            "sigmoid" => Ok(Objective::Sigmoid),
            other => Err(format!("{other:?} is not one of softmax, sigmoid")),
        }
    }
}

/// SigLIP's initial log-temperature and bias.
pub const SIGMOID_INIT_LOG_SCALE: f64 = std::f64::consts::LN_10;
pub const SIGMOID_INIT_BIAS: f64 = -10.0;

impl Objective {
    /// The loss and the (image, text) logits; `bias` is required by the sigmoid loss.
    pub fn loss(
        self,
        image_features: &Tensor,
        text_features: &Tensor,
        log_scale: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Objective::Softmax => clip_loss(image_features, text_features, log_scale),
            Objective::Sigmoid => {
                let bias = bias.ok_or_else(|| {
                    super::Error::Input("the sigmoid loss needs a logit bias".into())
                })?;
                sigmoid_loss(image_features, text_features, log_scale, bias)
            }
        }
    }
}

/// `log sigmoid(x) = -(max(-x, 0) + log(1 + exp(-|x|)))`, stable for any x.
fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let softplus = (x.neg()?.relu()? + ((x.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    Ok(softplus.neg()?)
}

/// SigLIP's pairwise sigmoid loss and the (image, text) logits.
pub fn sigmoid_loss(
    image_features: &Tensor,
    text_features: &Tensor,
    log_scale: &Tensor,
    bias: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let n = image_features.dim(0)?;
    let images = normalize(image_features)?;
    let texts = normalize(text_features)?;
    let logits = images
        .matmul(&texts.t()?)?
        .broadcast_mul(&log_scale.exp()?)?
        .broadcast_add(bias)?;
    // +1 on the diagonal, -1 elsewhere.
    let labels = ((Tensor::eye(n, DType::F32, logits.device())? * 2.0)? - 1.0)?;
    let loss = (log_sigmoid(&(logits.clone() * labels)?)?.sum_all()?.neg()? / n as f64)?;
    Ok((loss, logits))
}

/// The symmetric contrastive loss and the (image, text) logits.
pub fn clip_loss(
    image_features: &Tensor,
    text_features: &Tensor,
    log_scale: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let n = image_features.dim(0)?;
    let images = normalize(image_features)?;
    let texts = normalize(text_features)?;
    let logits = images
        .matmul(&texts.t()?)?
        .broadcast_mul(&log_scale.exp()?)?;
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
        let ce = |row: [f32; 2], target: usize| -> f32 {
            (row[0].exp() + row[1].exp()).ln() - row[target]
        };
        let rows = (ce([1.0, c], 0) + ce([0.0, c], 1)) / 2.0;
        let cols = (ce([1.0, 0.0], 0) + ce([c, c], 1)) / 2.0;
        let want = (rows + cols) / 2.0;
        assert!((loss.to_scalar::<f32>().unwrap() - want).abs() < 1e-6);
    }

    #[test]
    fn sigmoid_loss_matches_a_hand_computed_case() {
        let dev = Device::Cpu;
        let images = Tensor::new(&[[2.0f32, 0.0], [0.0, 3.0]], &dev).unwrap();
        let texts = Tensor::new(&[[1.0f32, 0.0], [1.0, 1.0]], &dev).unwrap();
        let t = Tensor::new(&[0.5f32], &dev).unwrap();
        let b = Tensor::new(&[-1.0f32], &dev).unwrap();
        let (loss, logits) = Objective::Sigmoid
            .loss(&images, &texts, &t, Some(&b))
            .unwrap();
        let (s, c) = (0.5f32.exp(), std::f32::consts::FRAC_1_SQRT_2);
        let cos = [[1.0, c], [0.0, c]];
        let l = logits.to_vec2::<f32>().unwrap();
        let mut want = 0.0;
        for i in 0..2 {
            for j in 0..2 {
                let logit = s * cos[i][j] - 1.0;
                assert!((l[i][j] - logit).abs() < 1e-6);
                let z = if i == j { 1.0 } else { -1.0 };
                want -= (1.0 / (1.0 + (-z * logit).exp())).ln();
            }
        }
        assert!((loss.to_scalar::<f32>().unwrap() - want / 2.0).abs() < 1e-5);
        // Stable far out: no infinities from exp(large).
        let far = Tensor::new(&[-200.0f32, 0.0, 200.0], &dev).unwrap();
        let v = log_sigmoid(&far).unwrap().to_vec1::<f32>().unwrap();
        assert!(
            (v[0] + 200.0).abs() < 1e-3 && (v[1] + 2f32.ln()).abs() < 1e-6 && v[2].abs() < 1e-6,
            "{v:?}"
        );
        assert!(Objective::Sigmoid.loss(&images, &texts, &t, None).is_err());
    }

    #[test]
    fn sigmoid_gradients_reach_features_scale_and_bias() {
        let dev = Device::Cpu;
        let images = Var::new(
            &[[1.0f32, 0.2, 0.1], [0.3, 1.0, 0.0], [0.0, 0.1, 1.0]],
            &dev,
        )
        .unwrap();
        let texts = Var::new(
            &[[0.9f32, 0.1, 0.0], [0.2, 0.8, 0.3], [0.1, 0.0, 1.1]],
            &dev,
        )
        .unwrap();
        let t = Var::new(&[2.0f32], &dev).unwrap();
        let b = Var::new(&[-3.0f32], &dev).unwrap();
        let run = |t: &Tensor, b: &Tensor| {
            sigmoid_loss(images.as_tensor(), texts.as_tensor(), t, b)
                .unwrap()
                .0
        };
        let grads = run(t.as_tensor(), b.as_tensor()).backward().unwrap();
        let at = |tv: f32, bv: f32| {
            run(
                &Tensor::new(&[tv], &dev).unwrap(),
                &Tensor::new(&[bv], &dev).unwrap(),
            )
            .to_scalar::<f32>()
            .unwrap()
        };
        let g = |v: &Var| grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        let numeric_t = (at(2.0 + 1e-2, -3.0) - at(2.0 - 1e-2, -3.0)) / 2e-2;
        let numeric_b = (at(2.0, -3.0 + 1e-2) - at(2.0, -3.0 - 1e-2)) / 2e-2;
        assert!(
            (g(&t) - numeric_t).abs() < 1e-3,
            "autograd {}, numeric {numeric_t}",
            g(&t)
        );
        assert!(
            (g(&b) - numeric_b).abs() < 1e-3,
            "autograd {}, numeric {numeric_b}",
            g(&b)
        );
        for v in [&images, &texts] {
            assert!(
                grads
                    .get(v.as_tensor())
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
    }

    #[test]
    fn gradients_reach_features_and_temperature() {
        let dev = Device::Cpu;
        let images = Var::new(
            &[[1.0f32, 0.2, 0.1], [0.3, 1.0, 0.0], [0.0, 0.1, 1.0]],
            &dev,
        )
        .unwrap();
        let texts = Var::new(
            &[[0.9f32, 0.1, 0.0], [0.2, 0.8, 0.3], [0.1, 0.0, 1.1]],
            &dev,
        )
        .unwrap();
        let t = Var::new(2.0f32, &dev).unwrap();
        let (loss, _) = clip_loss(images.as_tensor(), texts.as_tensor(), t.as_tensor()).unwrap();
        let grads = loss.backward().unwrap();
        // Finite differences on the temperature agree with autograd.
        let g = grads
            .get(t.as_tensor())
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let at = |v: f32| {
            let t = Tensor::new(v, &dev).unwrap();
            clip_loss(images.as_tensor(), texts.as_tensor(), &t)
                .unwrap()
                .0
                .to_scalar::<f32>()
                .unwrap()
        };
        let numeric = (at(2.0 + 1e-2) - at(2.0 - 1e-2)) / 2e-2;
        assert!(
            (g - numeric).abs() < 1e-3,
            "autograd {g}, numeric {numeric}"
        );
        for v in [&images, &texts] {
            let g = grads.get(v.as_tensor()).unwrap();
            assert!(
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
    }
}
