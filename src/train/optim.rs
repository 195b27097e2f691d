//! AdamW (Loshchilov and Hutter 2019: weight decay decoupled from the
//! gradient step), with no decay on gains, biases, embeddings and the
//! temperature, and its state saved and restored for exact resumption; and
//! the learning-rate schedule: linear warm-up, then cosine decay to zero.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Why an optimiser step or its saved state failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("optimizer: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The saved state does not fit the parameters being trained.
    #[error("optimizer state: {0}")]
    State(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Clone, Copy, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        // CLIP's values for ViTs (Radford et al. 2021, appendix F).
        Self {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-6,
            weight_decay: 0.2,
        }
    }
}

/// Whether weight decay applies to a parameter: not to gains, biases,
/// embeddings or the temperature (one-dimensional tensors, and names that
/// say so).
pub fn decays(name: &str, var: &Var) -> bool {
    var.rank() >= 2
        && !name.contains("embedding")
        && !name.contains("logit_scale")
        && !name.ends_with("bias")
}

struct Param {
    name: String,
    var: Var,
    /// First and second moments, as plain vectors: the update is one pass
    /// over memory instead of ten tensor operations.
    m: Vec<f32>,
    v: Vec<f32>,
    decay: bool,
}

pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    /// Steps taken (for bias correction).
    pub step: u64,
}

impl AdamW {
    /// Optimises `vars` (name, var), sorted by name for a stable state layout.
    pub fn new(mut vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let n = var.elem_count();
                let decay = decays(&name, &var);
                Ok(Param {
                    name,
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    var,
                    decay,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            config,
            step: 0,
        })
    }

    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.var.elem_count()).sum()
    }

    /// Names of parameters without a gradient in `grads`.
    pub fn missing_gradients(&self, grads: &GradStore) -> Vec<String> {
        self.params
            .iter()
            .filter(|p| grads.get(p.var.as_tensor()).is_none())
            .map(|p| p.name.clone())
            .collect()
    }

    /// One update at learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let correction1 = 1.0 - c.beta1.powi(t);
        let correction2 = 1.0 - c.beta2.powi(t);
        let (b1, b2, eps, lr32) = (c.beta1 as f32, c.beta2 as f32, c.eps as f32, lr as f32);
        let (c1, c2) = (correction1 as f32, correction2 as f32);
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            let g = g.contiguous()?;
            let shrink = if p.decay {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            let update = Update {
                moments: std::cell::RefCell::new((&mut p.m, &mut p.v)),
                b1,
                b2,
                eps,
                lr: lr32,
                c1,
                c2,
                shrink,
            };
            // In place: no copy of the weights, the gradient or the moments.
            p.var.as_tensor().inplace_op2(&g, &update)?;
        }
        Ok(())
    }

    /// Saves moments and step.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for p in &self.params {
            let dev = p.var.device();
            tensors.insert(
                format!("m.{}", p.name),
                Tensor::from_slice(&p.m, p.m.len(), dev)?,
            );
            tensors.insert(
                format!("v.{}", p.name),
                Tensor::from_slice(&p.v, p.v.len(), dev)?,
            );
        }
        tensors.insert(
            "step".into(),
            Tensor::new(&[self.step as f64], p_device(&self.params))?,
        );
        candle_core::safetensors::save(&tensors, path)?;
        Ok(())
    }

    /// Restores what `save` wrote; the parameters must be the same.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = p_device(&self.params).clone();
        let tensors = candle_core::safetensors::load(path, &device)?;
        for p in &mut self.params {
            let get = |k: String| {
                tensors
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| Error::State(format!("lacks {k}")))
            };
            p.m = get(format!("m.{}", p.name))?.to_vec1::<f32>()?;
            p.v = get(format!("v.{}", p.name))?.to_vec1::<f32>()?;
            if p.m.len() != p.var.elem_count() || p.v.len() != p.var.elem_count() {
                return Err(Error::State(format!("{} has the wrong size", p.name)));
            }
        }
        let step = tensors
            .get("step")
            .ok_or_else(|| Error::State("lacks the step".into()))?;
        self.step = step.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// One AdamW update of a weight tensor, in place, given its gradient.
struct Update<'a> {
    moments: std::cell::RefCell<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    b1: f32,
    b2: f32,
    eps: f32,
    lr: f32,
    c1: f32,
    c2: f32,
    shrink: f32,
}

impl candle_core::InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        let (CpuStorage::F32(theta), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("adamw-update: weights and gradients must be f32")
        };
        let (Some((t0, t1)), Some((g0, g1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("adamw-update: weights and gradients must be contiguous")
        };
        let (theta, g) = (&mut theta[t0..t1], &g[g0..g1]);
        let mut moments = self.moments.borrow_mut();
        let (m, v) = &mut *moments;
        if theta.len() != g.len() || theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("adamw-update: weights, gradient and moments differ in size")
        }
        let Self {
            b1,
            b2,
            eps,
            lr,
            c1,
            c2,
            shrink,
            ..
        } = *self;
        use rayon::prelude::*;
        theta
            .par_chunks_mut(8192)
            .zip(m.par_chunks_mut(8192))
            .zip(v.par_chunks_mut(8192))
            .zip(g.par_chunks(8192))
            .for_each(|(((theta, m), v), g)| {
                for i in 0..theta.len() {
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    let update = (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                    theta[i] = theta[i] * shrink - lr * update;
                }
            });
        Ok(())
    }
}

fn p_device(params: &[Param]) -> &candle_core::Device {
    params
        .first()
        .map(|p| p.var.device())
        .unwrap_or(&candle_core::Device::Cpu)
}

/// Linear warm-up over `warmup` steps to `peak`, then cosine decay to 0 at `total`.
pub fn learning_rate(step: u64, peak: f64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup.min(step)) as f64 / span as f64).min(1.0);
    0.5 * peak * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((learning_rate(0, 1.0, 10, 100) - 0.1).abs() < 1e-12);
        assert!((learning_rate(9, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(10, 1.0, 10, 100) - 1.0).abs() < 1e-12);
        assert!((learning_rate(55, 1.0, 10, 100) - 0.5).abs() < 1e-12);
        assert!(learning_rate(100, 1.0, 10, 100).abs() < 1e-12);
    }

    #[test]
    fn decay_rules() {
        let dev = Device::Cpu;
        let matrix = Var::zeros((2, 2), candle_core::DType::F32, &dev).unwrap();
        let vector = Var::zeros(2, candle_core::DType::F32, &dev).unwrap();
        assert!(decays(
            "text_model.encoder.layers.0.mlp.fc1.weight",
            &matrix
        ));
        assert!(!decays(
            "text_model.embeddings.token_embedding.weight",
            &matrix
        ));
        assert!(!decays(
            "text_model.encoder.layers.0.layer_norm1.weight",
            &vector
        ));
        assert!(!decays("visual_projection.bias", &vector));
    }

    #[test]
    fn matches_a_hand_computed_adamw_step() {
        let dev = Device::Cpu;
        let w = Var::new(&[[1.0f32, -2.0]], &dev).unwrap();
        let mut opt = AdamW::new(
            vec![("w.weight".into(), w.clone())],
            AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        // loss = sum(w^2) -> grad = 2w
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads, 0.01).unwrap();
        // First step: m_hat = g, v_hat = g^2, update = g/(|g|+eps) ~ sign(g).
        let got = w.as_tensor().to_vec2::<f32>().unwrap();
        let want = [
            1.0 * (1.0 - 0.01 * 0.1) - 0.01,
            -2.0 * (1.0 - 0.01 * 0.1) + 0.01,
        ];
        assert!(
            (got[0][0] - want[0]).abs() < 1e-6 && (got[0][1] - want[1]).abs() < 1e-6,
            "{got:?}"
        );
        // State round-trips.
        let dir = tempfile::tempdir().unwrap();
        opt.save(&dir.path().join("o.safetensors")).unwrap();
        let mut other =
            AdamW::new(vec![("w.weight".into(), w.clone())], AdamWConfig::default()).unwrap();
        other.load(&dir.path().join("o.safetensors")).unwrap();
        assert_eq!(other.step, 1);
    }
}
