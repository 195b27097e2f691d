//! Fused training operations with their backward passes: exact GELU, softmax
//! over the last dimension, and layer normalisation.
//!
//! candle's own fused softmax and layer norm have no backward pass, and its
//! differentiable compositions take five to ten passes over memory each way;
//! these take one (two for the layer norm's backward), on rows in parallel.
//! CPU and f32 only, which is where clipdex trains.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op} needs contiguous input");
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("{op} works on f32"),
    }
}

/// erf with an absolute error under 1.5e-7 (Abramowitz and Stegun 7.1.26):
/// enough for training, and several times faster than libm's.
#[inline]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * (-a * a).exp()).copysign(x)
}

const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "clipdex-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let y: Vec<f32> = x.par_iter().with_min_len(4096).map(|&x| 0.5 * x * (1.0 + erf(x * SQRT_HALF))).collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // Detached: a gradient must not carry the forward graph along.
        Ok(Some(arg.detach().contiguous()?.apply_op2(&grad.detach().contiguous()?, GeluErfGrad)?))
    }
}

struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "clipdex-gelu-erf-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let dy = slice(s2, l2, self.name())?;
        let dx: Vec<f32> = x
            .par_iter()
            .zip(dy.par_iter())
            .with_min_len(4096)
            .map(|(&x, &g)| g * (0.5 * (1.0 + erf(x * SQRT_HALF)) + x * INV_SQRT_2PI * (-0.5 * x * x).exp()))
            .collect();
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Exact (erf) GELU with a backward pass.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErf)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "clipdex-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let n = *l.dims().last().unwrap_or(&1);
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(64).for_each(|(y, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for (o, &v) in y.iter_mut().zip(x) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|o| *o *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(res.detach().contiguous()?.apply_op2(&grad.detach().contiguous()?, SoftmaxGrad)?))
    }
}

struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "clipdex-softmax-grad"
    }

    /// dx = y * (dy - sum(dy * y)), per row.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, self.name())?;
        let dy = slice(s2, l2, self.name())?;
        let n = *l1.dims().last().unwrap_or(&1);
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(n).zip(y.par_chunks(n).zip(dy.par_chunks(n))).with_min_len(64).for_each(|(dx, (y, dy))| {
            let dot: f32 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
            for ((o, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
                *o = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Softmax over the last dimension with a backward pass.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct AddRows;

impl CustomOp2 for AddRows {
    fn name(&self) -> &'static str {
        "clipdex-add-rows"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let b = slice(s2, l2, self.name())?;
        let n = b.len();
        if n == 0 || x.len() % n != 0 {
            candle_core::bail!("{}: rows of {} do not fit {} elements", self.name(), n, x.len());
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n).zip(x.par_chunks(n)).with_min_len(16).for_each(|(y, x)| {
            for i in 0..n {
                y[i] = x[i] + b[i];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = b.elem_count();
        let sums = grad.detach().contiguous()?.apply_op1_no_bwd(&SumRows { n })?;
        Ok((Some(grad.clone()), Some(sums.reshape(b.shape())?)))
    }
}

struct SumRows {
    n: usize,
}

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "clipdex-sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let n = self.n;
        let rows = x.len() / n.max(1);
        let block = rows.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
        let partial: Vec<Vec<f32>> = (0..rows.div_ceil(block))
            .into_par_iter()
            .map(|k| {
                let mut acc = vec![0f32; n];
                for r in k * block..((k + 1) * block).min(rows) {
                    for (a, v) in acc.iter_mut().zip(&x[r * n..(r + 1) * n]) {
                        *a += v;
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; n];
        for p in partial {
            out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}

/// `x + b` with `b` repeated over every row of `x` (`x`'s element count a
/// multiple of `b`'s), with a backward pass whose gradient for `b` is one
/// pass of column sums (candle's broadcast gradient sums slowly over leading
/// dimensions).
pub fn add_rows(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&b.contiguous()?, AddRows)
}

struct LayerNorm {
    eps: f32,
}

/// Per row: mean and 1 / sqrt(variance + eps).
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "clipdex-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let b = slice(s3, l3, self.name())?;
        let h = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).with_min_len(32).for_each(|(y, x)| {
            let (mean, rstd) = moments(x, self.eps);
            for i in 0..h {
                y[i] = (x[i] - mean) * rstd * w[i] + b[i];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, grad) = (x.detach().contiguous()?, w.detach().contiguous()?, grad.detach().contiguous()?);
        let dx = x.apply_op3(&w, &grad, LayerNormGradInput { eps: self.eps })?;
        let params = x.apply_op2(&grad, LayerNormGradParams { eps: self.eps })?;
        Ok((Some(dx), Some(params.get(0)?), Some(params.get(1)?)))
    }
}

struct LayerNormGradInput {
    eps: f32,
}

impl CustomOp3 for LayerNormGradInput {
    fn name(&self) -> &'static str {
        "clipdex-layer-norm-grad-input"
    }

    /// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let w = slice(s2, l2, self.name())?;
        let dy = slice(s3, l3, self.name())?;
        let h = w.len();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(h).zip(x.par_chunks(h).zip(dy.par_chunks(h))).with_min_len(32).for_each(|(dx, (x, dy))| {
            let (mean, rstd) = moments(x, self.eps);
            let (mut sum_g, mut sum_gx) = (0f32, 0f32);
            for i in 0..h {
                let g = dy[i] * w[i];
                sum_g += g;
                sum_gx += g * (x[i] - mean) * rstd;
            }
            let (mean_g, mean_gx) = (sum_g / h as f32, sum_gx / h as f32);
            for i in 0..h {
                let xhat = (x[i] - mean) * rstd;
                dx[i] = rstd * (dy[i] * w[i] - mean_g - xhat * mean_gx);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

struct LayerNormGradParams {
    eps: f32,
}

impl CustomOp2 for LayerNormGradParams {
    fn name(&self) -> &'static str {
        "clipdex-layer-norm-grad-params"
    }

    /// (2, h): row 0 the gain's gradient sum(dy * xhat), row 1 the bias's sum(dy).
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let dy = slice(s2, l2, self.name())?;
        let h = *l1.dims().last().unwrap_or(&1);
        let rows = x.len() / h.max(1);
        // Sum over rows in blocks, each block on one thread, then the blocks.
        let block = rows.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
        let partial: Vec<Vec<f32>> = (0..rows.div_ceil(block))
            .into_par_iter()
            .map(|k| {
                let mut acc = vec![0f32; 2 * h];
                for r in k * block..((k + 1) * block).min(rows) {
                    let (x, dy) = (&x[r * h..(r + 1) * h], &dy[r * h..(r + 1) * h]);
                    let (mean, rstd) = moments(x, self.eps);
                    for i in 0..h {
                        acc[i] += dy[i] * (x[i] - mean) * rstd;
                        acc[h + i] += dy[i];
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; 2 * h];
        for p in partial {
            out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
        Ok((CpuStorage::F32(out), Shape::from((2, h))))
    }
}

/// Layer normalisation over the last dimension, with a backward pass for
/// the input, the gain and the bias.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps: eps as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn input(shape: (usize, usize), seed: u64) -> Var {
        let mut rng = crate::model::init::NormalRng::new(seed);
        let data: Vec<f32> = (0..shape.0 * shape.1).map(|_| rng.normal() as f32 * 2.0).collect();
        Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn erf_is_accurate() {
        for i in -400..=400 {
            let x = i as f32 / 100.0;
            let want = libm_erf(x);
            assert!((erf(x) - want).abs() < 5e-7, "erf({x}) = {} vs {want}", erf(x));
        }
    }

    fn libm_erf(x: f32) -> f32 {
        // candle's gelu_erf is 0.5 x (1 + erf(x / sqrt 2)); invert it at x * sqrt 2.
        let t = Tensor::new(&[x * std::f32::consts::SQRT_2], &Device::Cpu).unwrap();
        let g = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap()[0];
        if x == 0.0 { 0.0 } else { 2.0 * g / (x * std::f32::consts::SQRT_2) - 1.0 }
    }

    /// Forward values and gradients against candle's differentiable compositions.
    #[test]
    fn match_the_composed_operations() {
        let x = input((37, 64), 1);
        let w = input((1, 64), 2);
        let b = input((1, 64), 3);
        let probe = input((37, 64), 4).as_tensor().detach();

        // GELU.
        let ours = gelu_erf(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().gelu_erf().unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-5);

        // Softmax.
        let ours = softmax_last_dim(x.as_tensor()).unwrap();
        let theirs = candle_nn::ops::softmax(x.as_tensor(), D::Minus1).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-6);
        let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap()) < 1e-5);

        // Adding a row to every row.
        let ours = add_rows(x.as_tensor(), w.as_tensor()).unwrap();
        let theirs = x.as_tensor().broadcast_add(w.as_tensor()).unwrap();
        assert_eq!(max_diff(&ours, &theirs), 0.0);
        let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert!(max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()) < 1e-4);
        }

        // Layer norm.
        let (wv, bv) = (w.as_tensor().squeeze(0).unwrap(), b.as_tensor().squeeze(0).unwrap());
        let ours = layer_norm(x.as_tensor(), &wv, &bv, 1e-5).unwrap();
        let theirs = candle_nn::ops::layer_norm_slow(x.as_tensor(), &wv, &bv, 1e-5).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let g1 = (ours * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            let d = max_diff(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(d < 1e-4, "layer norm gradient differs by {d}");
        }
    }
}
