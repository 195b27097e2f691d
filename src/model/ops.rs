//! Fused training operations with their backward passes: exact GELU, layer
//! normalisation, adding a row to every row, a dense layer, and multi-head
//! attention (whose softmax backward is one pass per row).
//!
//! candle's own fused softmax and layer norm have no backward pass, and its
//! differentiable compositions take five to ten passes over memory each way;
//! these take one (two for the layer norm's backward), on rows in parallel.
//! CPU and f32 only, which is where clipdex trains.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, InplaceOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

pub(super) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op} needs contiguous input");
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("{op} works on f32"),
    }
}

/// The f32 elements of a contiguous storage, to write in place.
fn slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op} needs contiguous input");
    };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("{op} works on f32"),
    }
}

/// erf with an absolute error under 1.5e-7 (Abramowitz and Stegun 7.1.26):
/// enough for training, and several times faster than libm's.
#[inline]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * (-a * a).exp()).copysign(x)
}

/// e^x for inference's activations, in plain arithmetic so that a loop of
/// it vectorises (libm's `expf` is a call per element): x = n ln 2 + r with
/// ln 2 in two parts (Cody and Waite), 2^n by the exponent bits, e^r
/// (|r| <= ln 2 / 2) by its degree-7 Taylor polynomial; relative error under
/// 3e-7. Below e^-87 it returns e^-87 (not 0): beside 1 that makes no
/// difference in a float.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.3);
    // Round to nearest without a call: adding 1.5 * 2^23 drops the fraction,
    // and leaves n in the low bits of the sum (read back below: a float to
    // int cast would not vectorise, for its saturating semantics).
    const ROUND: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = r * (1.0 / 5040.0) + 1.0 / 720.0;
    let p = r * p + 1.0 / 120.0;
    let p = r * p + 1.0 / 24.0;
    let p = r * p + 1.0 / 6.0;
    let p = r * p + 0.5;
    let p = r * p + 1.0;
    let p = r * p + 1.0;
    let two_n = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127)
        << 23;
    p * f32::from_bits(two_n)
}

/// [`erf`] with [`exp_fast`], for inference.
#[inline(always)]
fn erf_fast(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    (1.0 - poly * exp_fast(-a * a)).copysign(x)
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
        let y: Vec<f32> = x
            .par_iter()
            .with_min_len(4096)
            .map(|&x| 0.5 * x * (1.0 + erf(x * SQRT_HALF)))
            .collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // Detached: a gradient must not carry the forward graph along.
        Ok(Some(
            arg.detach()
                .contiguous()?
                .apply_op2(&grad.detach().contiguous()?, GeluErfGrad)?,
        ))
    }
}

struct GeluErfGrad;

impl CustomOp2 for GeluErfGrad {
    fn name(&self) -> &'static str {
        "clipdex-gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let dy = slice(s2, l2, self.name())?;
        let dx: Vec<f32> = x
            .par_iter()
            .zip(dy.par_iter())
            .with_min_len(4096)
            .map(|(&x, &g)| {
                g * (0.5 * (1.0 + erf(x * SQRT_HALF)) + x * INV_SQRT_2PI * (-0.5 * x * x).exp())
            })
            .collect();
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Exact (erf) GELU with a backward pass.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(GeluErf)
}

/// tanh as a rational function (Eigen's `ptanh_float`: odd degree-13
/// numerator, even degree-6 denominator, on x clamped to +-7.9 where f32 tanh
/// is +-1): a few ulp from libm's, and plain arithmetic, so the loop over a
/// slice vectorises, where libm's `tanhf` is a call per element.
#[inline(always)]
fn tanh_fast(x: f32) -> f32 {
    // Plain multiply-adds: `mul_add` is a libm call without FMA enabled at
    // compile time, and a call per element stops vectorisation.
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let p = x2 * -2.760_768_5e-16 + 2.000_187_9e-13;
    let p = x2 * p - 8.604_671_5e-11;
    let p = x2 * p + 5.122_297e-8;
    let p = x2 * p + 1.485_722_4e-5;
    let p = x2 * p + 6.372_619_3e-4;
    let p = x2 * p + 4.893_524_6e-3;
    let q = x2 * 1.198_258_4e-6 + 1.185_347e-4;
    let q = x2 * q + 2.268_434_6e-3;
    let q = x2 * q + 4.893_525e-3;
    x * p / q
}

/// sqrt(2 / pi)
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// GELU's tanh approximation (`gelu_pytorch_tanh`, SigLIP's activation),
/// inference only: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "clipdex-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(8192)
            .zip(x.par_chunks(8192))
            .for_each(|(y, x)| {
                for (o, &v) in y.iter_mut().zip(x) {
                    let inner = SQRT_2_OVER_PI * v * (0.044_715 * v * v + 1.0);
                    *o = 0.5 * v * (1.0 + tanh_fast(inner));
                }
            });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
}

/// A function applied element by element after a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pointwise {
    Identity,
    /// GELU's tanh form.
    GeluTanh,
    /// Exact (erf) GELU.
    GeluErf,
    /// `x * sigmoid(1.702 x)`.
    QuickGelu,
    Relu,
}

impl Pointwise {
    #[inline(always)]
    pub(crate) fn apply(self, v: f32) -> f32 {
        match self {
            Pointwise::Identity => v,
            Pointwise::GeluTanh => {
                0.5 * v * (1.0 + tanh_fast(SQRT_2_OVER_PI * v * (0.044_715 * v * v + 1.0)))
            }
            Pointwise::GeluErf => 0.5 * v * (1.0 + erf_fast(v * SQRT_HALF)),
            Pointwise::QuickGelu => v / (1.0 + exp_fast(-1.702 * v)),
            Pointwise::Relu => v.max(0.0),
        }
    }
}

/// `y = f(y + b)` in place, `b` added to every row of `y`: a dense layer's
/// bias and activation in one pass over its output, with no new buffer.
struct BiasInPlace(Pointwise);

impl InplaceOp2 for BiasInPlace {
    fn name(&self) -> &'static str {
        "clipdex-bias-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let b = slice(s2, l2, self.name())?;
        let y = slice_mut(s1, l1, self.name())?;
        let n = b.len();
        if n == 0 || y.len() % n != 0 {
            candle_core::bail!(
                "{}: rows of {} do not fit {} elements",
                self.name(),
                n,
                y.len()
            );
        }
        let f = self.0;
        let rows_per_task = (8192 / n).max(1);
        y.par_chunks_mut(rows_per_task * n).for_each(|chunk| {
            for row in chunk.chunks_exact_mut(n) {
                for (o, &bias) in row.iter_mut().zip(b) {
                    *o = f.apply(*o + bias);
                }
            }
        });
        Ok(())
    }
}

/// Adds `b` to every row of `y` and applies `f`, in place. Inference only:
/// `y` must be a fresh contiguous tensor no other tensor shares (a matrix
/// product's output).
pub fn bias_in_place(y: &Tensor, b: &Tensor, f: Pointwise) -> candle_core::Result<()> {
    y.inplace_op2(&b.contiguous()?, &BiasInPlace(f))
}

/// `y += x` in place, element by element (same shapes): a residual
/// connection without a new buffer.
struct AddInPlace;

impl InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "clipdex-add-in-place"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let x = slice(s2, l2, self.name())?;
        let y = slice_mut(s1, l1, self.name())?;
        if y.len() != x.len() {
            candle_core::bail!("{}: {} and {} elements", self.name(), y.len(), x.len());
        }
        y.par_chunks_mut(8192)
            .zip(x.par_chunks(8192))
            .for_each(|(y, x)| {
                for (o, &v) in y.iter_mut().zip(x) {
                    *o += v;
                }
            });
        Ok(())
    }
}

/// `y += x` in place. Inference only: `y` must be a fresh contiguous tensor
/// no other tensor shares.
pub fn add_in_place(y: &Tensor, x: &Tensor) -> candle_core::Result<()> {
    if y.dims() != x.dims() {
        candle_core::bail!("add_in_place: shapes {:?} and {:?}", y.dims(), x.dims());
    }
    y.inplace_op2(&x.contiguous()?, &AddInPlace)
}

/// GELU, tanh approximation, for inference (no backward pass).
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&GeluTanh)
}

/// The softmax's backward pass, given its output and the output's gradient.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "clipdex-softmax-grad"
    }

    /// dx = y * (dy - sum(dy * y)), per row.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = slice(s1, l1, self.name())?;
        let dy = slice(s2, l2, self.name())?;
        let n = *l1.dims().last().unwrap_or(&1);
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(n)
            .zip(y.par_chunks(n).zip(dy.par_chunks(n)))
            .with_min_len(64)
            .for_each(|(dx, (y, dy))| {
                let dot: f32 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
                for ((o, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
                    *o = y * (g - dot);
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

struct AddRows;

impl CustomOp2 for AddRows {
    fn name(&self) -> &'static str {
        "clipdex-add-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let b = slice(s2, l2, self.name())?;
        let n = b.len();
        if n == 0 || x.len() % n != 0 {
            candle_core::bail!(
                "{}: rows of {} do not fit {} elements",
                self.name(),
                n,
                x.len()
            );
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .with_min_len(16)
            .for_each(|(y, x)| {
                for i in 0..n {
                    y[i] = x[i] + b[i];
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let n = b.elem_count();
        let sums = grad
            .detach()
            .contiguous()?
            .apply_op1_no_bwd(&SumRows { n })?;
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
        let block = rows
            .div_ceil(rayon::current_num_threads().max(1) * 4)
            .max(1);
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
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `x` folded by `step` in 16 running lanes (each from `init`), then the
/// lanes and the remainder's fold joined by `join`: one running value is a
/// chain of dependent operations (4 cycles an addition), which the compiler
/// may not reorder; 16 independent ones fill vector registers. Inlined, so
/// that it is compiled with its caller's target features.
#[inline(always)]
fn lane_fold(
    x: &[f32],
    init: f32,
    step: impl Fn(f32, f32) -> f32,
    join: impl Fn(f32, f32) -> f32,
) -> f32 {
    const LANES: usize = 16;
    let mut acc = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder().iter().fold(init, |a, &v| step(a, v));
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = step(*a, v);
        }
    }
    join(acc.into_iter().fold(init, &join), rest)
}

/// The sum of `f` over `x` ([`lane_fold`]).
#[inline(always)]
fn lane_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    lane_fold(x, 0.0, |a, v| a + f(v), |a, b| a + b)
}

/// The largest of `x` (minus infinity for none; NaN is passed over), by
/// [`lane_fold`]: `f32::max` in one chain is a dependent compare and blend
/// per value.
#[inline(always)]
fn lane_max(x: &[f32]) -> f32 {
    let max = |a: f32, b: f32| if b > a { b } else { a };
    lane_fold(x, f32::NEG_INFINITY, max, max)
}

/// Layer-normalises each row of `x` (`w.len()` values) into `y`.
fn norm_rows(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if super::gemm::has_avx512f() {
            // SAFETY: the CPU has AVX-512F.
            return unsafe { norm_rows_avx512(y, x, w, b, eps) };
        }
        if super::gemm::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { norm_rows_avx2(y, x, w, b, eps) };
        }
    }
    norm_rows_with(y, x, w, b, eps)
}

/// [`norm_rows_with`] compiled for AVX2: eight lanes.
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_rows_avx2(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    norm_rows_with(y, x, w, b, eps)
}

/// [`norm_rows_with`] compiled for AVX-512: sixteen lanes where the
/// baseline target has four.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn norm_rows_avx512(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    norm_rows_with(y, x, w, b, eps)
}

#[inline(always)]
fn norm_rows_with(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let h = w.len();
    for (y, x) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)) {
        let (mean, rstd) = moments(x, eps);
        for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
            *y = (x - mean) * rstd * w + b;
        }
    }
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
        if h == 0 || b.len() != h || l1.dims().last() != Some(&h) {
            candle_core::bail!(
                "layer norm: a gain of {h} and a bias of {} for rows of {} values",
                b.len(),
                l1.dims().last().copied().unwrap_or(0)
            );
        }
        let mut y = vec![0f32; x.len()];
        // Blocks of 32 rows: fewer are one pass on this thread.
        y.par_chunks_mut(32 * h)
            .zip(x.par_chunks(32 * h))
            .for_each(|(y, x)| norm_rows(y, x, w, b, self.eps));
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
        let (x, w, grad) = (
            x.detach().contiguous()?,
            w.detach().contiguous()?,
            grad.detach().contiguous()?,
        );
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
        dx.par_chunks_mut(h)
            .zip(x.par_chunks(h).zip(dy.par_chunks(h)))
            .with_min_len(32)
            .for_each(|(dx, (x, dy))| {
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
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, self.name())?;
        let dy = slice(s2, l2, self.name())?;
        let h = *l1.dims().last().unwrap_or(&1);
        let rows = x.len() / h.max(1);
        // Sum over rows in blocks, each block on one thread, then the blocks.
        let block = rows
            .div_ceil(rayon::current_num_threads().max(1) * 4)
            .max(1);
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
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

/// `dst (m x n) = [dst +] lhs (m x k) * rhs (k x n)` with gemm, the kernel
/// candle's own matmul uses; strides are (row, column) in elements.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    assert!(dst.len() >= m * n && lhs.len() > (m.max(1) - 1) * lhs_rs + (k.max(1) - 1) * lhs_cs);
    assert!(rhs.len() > (k.max(1) - 1) * rhs_rs + (n.max(1) - 1) * rhs_cs);
    // SAFETY: the asserts above keep every index gemm computes from these
    // sizes and strides inside the slices; dst does not alias lhs or rhs.
    unsafe {
        gemm_f32_raw(
            (m, n, k),
            dst.as_mut_ptr(),
            accumulate,
            lhs,
            (lhs_rs, lhs_cs),
            rhs,
            (rhs_rs, rhs_cs),
        )
    }
}

/// [`gemm_f32`] into a row-major m x n buffer that may be uninitialised
/// (written, not read, unless `accumulate`), with candle's thread count.
///
/// # Safety
/// `dst` is valid for m x n values and aliases neither input; `lhs` and
/// `rhs` hold every element their sizes and strides reach.
pub(crate) unsafe fn gemm_f32_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's bounds.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A dense layer `x W^T [+ b]` over the last dimension of `x`, W as
/// (out, in). One node in the graph instead of five (reshape, product,
/// transpose, bias, reshape), each of which costs a zero-filled gradient
/// buffer and a pass over memory in the backward pass.
struct Dense;

impl Dense {
    fn forward(
        x: &[f32],
        w: &[f32],
        out_dim: usize,
        b: Option<&[f32]>,
    ) -> candle_core::Result<Vec<f32>> {
        if out_dim == 0 || w.len() % out_dim != 0 {
            candle_core::bail!(
                "dense: weight of {} elements is not {out_dim} rows",
                w.len()
            );
        }
        let in_dim = w.len() / out_dim;
        if in_dim == 0 || x.len() % in_dim != 0 {
            candle_core::bail!(
                "dense: input of {} elements is not rows of {in_dim}",
                x.len()
            );
        }
        let rows = x.len() / in_dim;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let mut y = vec![0f32; rows * out_dim];
        if let Some(b) = b {
            y.par_chunks_mut(out_dim)
                .with_min_len(64)
                .for_each(|r| r.copy_from_slice(b));
        }
        // x (rows x in) times W^T: W^T[i][j] = W[j][i], so row stride 1, column stride in.
        gemm_f32(
            (rows, out_dim, in_dim),
            &mut y,
            b.is_some(),
            x,
            (in_dim, 1),
            w,
            (1, in_dim),
        );
        Ok(y)
    }

    fn shape(x: &Layout, w: &Layout) -> candle_core::Result<Shape> {
        let mut dims = x.dims().to_vec();
        let (out_dim, _) = w.shape().dims2()?;
        match dims.last_mut() {
            Some(d) => *d = out_dim,
            None => candle_core::bail!("dense: scalar input"),
        }
        Ok(Shape::from(dims))
    }

    /// Gradients for x, W and b from the output's gradient.
    fn backward(
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        bias: bool,
    ) -> candle_core::Result<[Option<Tensor>; 3]> {
        let (out_dim, in_dim) = w.dims2()?;
        let rows = x.elem_count() / in_dim.max(1);
        let g = grad.detach().contiguous()?.reshape((rows, out_dim))?;
        let dx = if x.track_op() {
            Some(g.matmul(&w.detach())?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(
                g.t()?
                    .matmul(&x.detach().contiguous()?.reshape((rows, in_dim))?)?,
            )
        } else {
            None
        };
        let db = if bias {
            Some(g.apply_op1_no_bwd(&SumRows { n: out_dim })?)
        } else {
            None
        };
        Ok([dx, dw, db])
    }
}

impl CustomOp2 for Dense {
    fn name(&self) -> &'static str {
        "clipdex-dense"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let shape = Self::shape(l1, l2)?;
        let y = Self::forward(
            slice(s1, l1, "dense")?,
            slice(s2, l2, "dense")?,
            l2.dims()[0],
            None,
        )?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, _] = Self::backward(x, w, grad, false)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "clipdex-dense"
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
        let shape = Self::shape(l1, l2)?;
        let b = slice(s3, l3, "dense")?;
        if b.len() != l2.dims()[0] {
            candle_core::bail!("dense: bias of {} for {} outputs", b.len(), l2.dims()[0]);
        }
        let y = Self::forward(
            slice(s1, l1, "dense")?,
            slice(s2, l2, "dense")?,
            l2.dims()[0],
            Some(b),
        )?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dx, dw, db] = Self::backward(x, w, grad, b.track_op())?;
        Ok((dx, dw, db))
    }
}

/// `x W^T + b` over the last dimension of `x`, W as (out, in), with one
/// backward node.
pub fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Dense),
        None => x.apply_op2(&w, Dense),
    }
}

/// Multi-head scaled dot-product attention on q, k and v stacked in one
/// (batch, seq, 3 * hidden) tensor, as the stacked projection produces them.
/// The backward pass is five matrix products on what the forward pass kept;
/// composed from candle's operations it would be some twenty nodes, each
/// with a zero-filled gradient buffer.
struct Attention {
    heads: usize,
    /// Additive (seq, seq) mask, not trained.
    mask: Option<Tensor>,
    /// Scaled q, k, v as (batch * heads, seq, head_dim), and the attention
    /// weights, for the backward pass.
    saved: std::sync::Mutex<Option<[Tensor; 4]>>,
}

impl Attention {
    fn dims(&self, shape: &Shape) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, n, three_hidden) = shape.dims3()?;
        let h = self.heads;
        if h == 0 || three_hidden % (3 * h) != 0 {
            candle_core::bail!(
                "attention: {three_hidden} does not split into q, k, v of {h} heads"
            );
        }
        Ok((b, n, h, three_hidden / (3 * h)))
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "clipdex-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let (b, n, h, hd) = self.dims(l.shape())?;
        let qkv = Tensor::from_slice(x, (b, n, 3 * h * hd), &candle_core::Device::Cpu)?;
        let (out, saved) = attend(&qkv, h, self.mask.as_ref())?;
        let out = out.flatten_all()?.to_vec1::<f32>()?;
        *self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention state poisoned".into()))? = Some(saved);
        Ok((CpuStorage::F32(out), Shape::from((b, n, h * hd))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (b, n, h, hd) = self.dims(arg.shape())?;
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("attention state poisoned".into()))?
            .clone();
        let Some([q, k, v, p]) = saved else {
            candle_core::bail!("attention: backward pass before the forward pass")
        };
        let d_out = grad
            .detach()
            .reshape((b, n, h, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * h, n, hd))?;
        let dv = p.t()?.matmul(&d_out)?;
        let dp = d_out.matmul(&v.t()?)?;
        let ds = p.apply_op2_no_bwd(&dp, &SoftmaxGrad)?;
        let dq = (ds.matmul(&k)? * (hd as f64).powf(-0.5))?;
        let dk = ds.t()?.matmul(&q)?;
        let d = Tensor::stack(&[dq, dk, dv], 0)?
            .reshape((3, b, h, n, hd))?
            .permute((1, 3, 0, 2, 4))?
            .contiguous()?;
        Ok(Some(d.reshape((b, n, 3 * h * hd))?))
    }
}

/// Multi-head attention on `qkv` = [q | k | v], (batch, seq, 3 * hidden),
/// with candle's operations and no backward pass of its own: the inference
/// path, and the forward pass of the fused training node. Returns the
/// (batch, seq, hidden) output, and the scaled q, k, v as (batch * heads,
/// seq, head_dim) with the attention weights, which that node's backward
/// pass reuses.
pub fn attend(
    qkv: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> candle_core::Result<(Tensor, [Tensor; 4])> {
    let (b, n, three_hidden) = qkv.dims3()?;
    let (h, hd) = (heads, three_hidden / (3 * heads));
    // (b, n, 3, h, hd) -> (3, b, h, n, hd)
    let qkv = qkv
        .reshape((b, n, 3, h, hd))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?;
    let q = (qkv.get(0)?.reshape((b * h, n, hd))? * (hd as f64).powf(-0.5))?;
    let k = qkv.get(1)?.reshape((b * h, n, hd))?;
    let v = qkv.get(2)?.reshape((b * h, n, hd))?;
    let mut scores = q.matmul(&k.t()?)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let p = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = p
        .matmul(&v)?
        .reshape((b, h, n, hd))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, n, h * hd))?;
    Ok((out, [q, k, v, p]))
}

/// Inference self-attention in one pass per (image or text, head), with no
/// copies: q, k and v are read where the fused projection wrote them, scores
/// and softmax (with [`exp_fast`]) stay in a small buffer, the output goes
/// straight to its place in (batch, seq, hidden). `mask` is additive, (seq,
/// seq) for every row, or (batch * heads, 1, seq) per row and head; any
/// other shape takes [`attend`]. The same result as [`attend`] up to float
/// rounding, a fifth of its time at ViT-B/32's 50 positions.
pub fn attend_inference(
    qkv: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    attend_inference_at(qkv, heads, mask, Queries::From(0), None)
}

/// [`attend_inference`] from positions `from..seq` of each sequence only
/// (every position still a key and a value): (batch, seq - from, hidden),
/// each row what [`attend_inference`] gives at that position. Needs a mask
/// [`attend_inference`] takes in one pass.
pub fn attend_inference_from(
    qkv: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    from: usize,
) -> candle_core::Result<Tensor> {
    let n = qkv.dim(1)?;
    if from >= n {
        candle_core::bail!("attention: queries from {from} in sequences of {n}");
    }
    attend_inference_at(qkv, heads, mask, Queries::From(from), None)
}

/// [`attend_inference`] for one query position of each sequence, `rows[i]`
/// of sequence `i` (every position still a key and a value): (batch,
/// hidden), each row what [`attend_inference`] gives at that position.
pub fn attend_inference_rows(
    qkv: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    rows: &[usize],
) -> candle_core::Result<Tensor> {
    let (b, n, _) = qkv.dims3()?;
    if rows.len() != b || rows.iter().any(|&r| r >= n) {
        candle_core::bail!("attention: query rows {rows:?} for {b} sequences of {n}");
    }
    let out = attend_inference_at(qkv, heads, mask, Queries::One(rows.to_vec()), None)?;
    out.reshape((b, out.elem_count() / b))
}

/// Attention over sequences that begin with the same `first` positions,
/// stored once: `qkv` is (first + own lengths summed, 3 * hidden), the
/// beginning's rows and then each sequence's own `own[i]` rows, as long as
/// that sequence is (no padding). Each sequence's keys and values are the
/// beginning's followed by its own, read where they lie (no copy per
/// sequence). With `rows`, position `rows[i]` of sequence `i` attends:
/// (batch, hidden); without, every position after the beginning, in the
/// order stored: (own lengths summed, hidden). Each row is what
/// [`attend_inference`] gives at that position of the whole sequence;
/// `mask` is (first + the longest own, same) or none, and a shorter
/// sequence takes its top left corner.
pub fn attend_inference_shared(
    qkv: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    first: usize,
    own: &[usize],
    rows: Option<&[usize]>,
) -> candle_core::Result<Tensor> {
    let (stored, _) = qkv.dims2()?;
    let shared = Shared::new(first, own);
    if first == 0 || own.is_empty() || own.contains(&0) || shared.rows() != stored {
        candle_core::bail!(
            "attention: {stored} rows are not a beginning of {first} and sequences of {own:?}"
        );
    }
    let n = shared.longest();
    if mask.is_some_and(|m| m.dims() != [n, n]) {
        candle_core::bail!("attention: a shared beginning takes an ({n}, {n}) mask");
    }
    let queries = match rows {
        Some(rows) => {
            if rows.len() != own.len()
                || rows
                    .iter()
                    .zip(own)
                    .any(|(&r, &m)| r < first || r >= first + m)
            {
                candle_core::bail!(
                    "attention: query rows {rows:?} for sequences of {own:?} after {first}"
                );
            }
            Queries::One(rows.to_vec())
        }
        None => Queries::From(first),
    };
    let out = attend_inference_at(qkv, heads, mask, queries, Some(shared))?;
    let hidden = out.dim(candle_core::D::Minus1)?;
    out.reshape((out.elem_count() / hidden, hidden))
}

/// Sequences whose common beginning is stored once, before each one's own
/// rows ([`attend_inference_shared`]).
#[derive(Clone, Debug)]
struct Shared {
    /// Positions of the beginning.
    first: usize,
    /// The stored row where each sequence's own rows begin, and one past the
    /// last sequence's: `first`, then `first` plus the own lengths so far.
    starts: Vec<usize>,
}

impl Shared {
    fn new(first: usize, own: &[usize]) -> Self {
        let starts = std::iter::once(first)
            .chain(own.iter().scan(first, |at, &m| {
                *at += m;
                Some(*at)
            }))
            .collect();
        Self { first, starts }
    }

    fn sequences(&self) -> usize {
        self.starts.len() - 1
    }

    /// Rows stored: the beginning and every sequence's own.
    fn rows(&self) -> usize {
        self.starts[self.sequences()]
    }

    /// Positions of sequence `i`: the beginning's and its own.
    fn len(&self, i: usize) -> usize {
        self.first + self.starts[i + 1] - self.starts[i]
    }

    /// Positions of the longest sequence.
    fn longest(&self) -> usize {
        (0..self.sequences())
            .map(|i| self.len(i))
            .max()
            .unwrap_or(self.first)
    }
}

/// Which positions of each sequence attend.
enum Queries {
    /// Positions `from..seq` of every sequence (0: all of them).
    From(usize),
    /// Position `rows[i]` of sequence `i` only.
    One(Vec<usize>),
}

/// Sequences, positions per sequence (the longest's, with `shared`) and 3 x
/// hidden of a fused projection's output: (batch, seq, 3 * hidden), or with
/// `shared` the beginning stored once before each sequence's own rows.
fn sequences(shape: &Shape, shared: Option<&Shared>) -> candle_core::Result<(usize, usize, usize)> {
    match shared {
        None => shape.dims3(),
        Some(s) => Ok((s.sequences(), s.longest(), shape.dims2()?.1)),
    }
}

/// `shared`: the sequences' common beginning, where `qkv` stores it once
/// ([`attend_inference_shared`]).
fn attend_inference_at(
    qkv: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    queries: Queries,
    shared: Option<Shared>,
) -> candle_core::Result<Tensor> {
    let (b, n, three_hidden) = sequences(qkv.shape(), shared.as_ref())?;
    let mask = match mask {
        None => None,
        Some(m) if m.dims() == [n, n] => Some((m.flatten_all()?.to_vec1::<f32>()?, false)),
        Some(m) if m.dims() == [b * heads, 1, n] => {
            Some((m.flatten_all()?.to_vec1::<f32>()?, true))
        }
        Some(_) if shared.is_some() => {
            candle_core::bail!("attention: a shared beginning takes an ({n}, {n}) mask")
        }
        Some(_) => {
            let out = attend(qkv, heads, mask)?.0;
            return match queries {
                Queries::From(0) => Ok(out),
                Queries::From(from) => out.narrow(1, from, n - from),
                Queries::One(rows) => select_rows(&out, &rows),
            };
        }
    };
    if three_hidden % (3 * heads) != 0 {
        candle_core::bail!("attention: {three_hidden} is not 3 x {heads} heads");
    }
    qkv.contiguous()?.apply_op1_no_bwd(&AttendInference {
        heads,
        mask,
        queries,
        shared,
    })
}

/// Row `rows[i]` of each sequence `i` of a (batch, seq, hidden) tensor:
/// (batch, hidden).
pub fn select_rows(x: &Tensor, rows: &[usize]) -> candle_core::Result<Tensor> {
    let (b, n, h) = x.dims3()?;
    let at: Vec<u32> = rows
        .iter()
        .enumerate()
        .map(|(i, &r)| (i * n + r) as u32)
        .collect();
    let at = Tensor::new(at.as_slice(), &candle_core::Device::Cpu)?.to_device(x.device())?;
    x.reshape((b * n, h))?.index_select(&at, 0)
}

struct AttendInference {
    heads: usize,
    /// The additive mask, and whether it is per (row, head) keys only.
    mask: Option<(Vec<f32>, bool)>,
    /// The positions that attend.
    queries: Queries,
    /// The common beginning stored once ([`attend_inference_shared`]).
    shared: Option<Shared>,
}

impl CustomOp1 for AttendInference {
    fn name(&self) -> &'static str {
        "clipdex-attend-inference"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let (b, n, three_hidden) = sequences(l.shape(), self.shared.as_ref())?;
        let hidden = three_hidden / 3;
        let hd = hidden / self.heads;
        // Each sequence's positions, the stored row of its first own one,
        // and its first output row. Sequences that share a beginning attend
        // from their own positions only (`attend_inference_shared`).
        let place = |seq: usize| -> (usize, usize, usize) {
            match (&self.shared, &self.queries) {
                (None, Queries::From(from)) => (n, seq * n, seq * (n - from)),
                (None, Queries::One(_)) => (n, seq * n, seq),
                (Some(s), Queries::From(_)) => (s.len(seq), s.starts[seq], s.starts[seq] - s.first),
                (Some(s), Queries::One(_)) => (s.len(seq), s.starts[seq], seq),
            }
        };
        let total = match (&self.shared, &self.queries) {
            (_, Queries::One(_)) => b,
            (None, Queries::From(from)) => b * (n - from),
            (Some(s), Queries::From(_)) => s.rows() - s.first,
        };
        let mut out: Vec<f32> = Vec::with_capacity(total * hidden);
        let dst = super::gemm::Out(out.as_mut_ptr());
        (0..b * self.heads).into_par_iter().for_each(|task| {
            let mask = self.mask.as_ref().map(|(m, per_head)| match per_head {
                true => (&m[task * n..(task + 1) * n], true),
                false => (&m[..], false),
            });
            let seq = task / self.heads;
            let (len, stored_at, out_at) = place(seq);
            // SAFETY: this task writes columns [head * hd, head * hd + hd) of
            // the output rows of its sequence, which no other task writes.
            unsafe {
                attend_one(HeadTask {
                    x,
                    head: task % self.heads,
                    n: len,
                    shared: self.shared.as_ref().map_or(0, |s| s.first),
                    stored_at,
                    hidden,
                    hd,
                    mask,
                    mask_stride: n,
                    attending: match &self.queries {
                        Queries::From(from) => (*from, len),
                        Queries::One(rows) => (rows[seq], rows[seq] + 1),
                    },
                    out_at,
                    out: dst,
                })
            };
        });
        // SAFETY: every (sequence, head) wrote its columns of every output row.
        unsafe { out.set_len(total * hidden) };
        let shape = match (&self.shared, &self.queries) {
            (None, Queries::From(from)) => Shape::from((b, n - from, hidden)),
            (_, Queries::One(_)) => Shape::from((b, 1, hidden)),
            (Some(_), Queries::From(_)) => Shape::from((total, hidden)),
        };
        Ok((CpuStorage::F32(out), shape))
    }
}

thread_local! {
    /// Per-thread scratch of [`attend_one`]: k transposed, then the scores.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One sequence's one head of [`AttendInference`]: where q, k, v are read
/// and the output written.
#[derive(Clone, Copy)]
struct HeadTask<'a> {
    /// The fused projection's output, (rows stored, 3 * hidden).
    x: &'a [f32],
    head: usize,
    /// This sequence's positions.
    n: usize,
    /// Positions `0..shared` are stored once for every sequence, at rows
    /// `0..shared` (0: each sequence stores all its n).
    shared: usize,
    /// The stored row of position `shared`, where this sequence's own rows
    /// begin.
    stored_at: usize,
    hidden: usize,
    hd: usize,
    /// The additive mask: (positions, positions), of which this sequence
    /// takes the top left n x n; or this head's n keys (`true`).
    mask: Option<(&'a [f32], bool)>,
    /// Values per row of an (n, n) mask: the longest sequence's positions.
    mask_stride: usize,
    /// The positions to attend from: `attending.0..attending.1`.
    attending: (usize, usize),
    /// The output row of position `attending.0`; the rest follow it.
    out_at: usize,
    /// The (rows, hidden) output.
    out: super::gemm::Out,
}

/// `out[i, head] = softmax(q_i k^T / sqrt(hd) + mask_i) v` for one task.
///
/// # Safety
/// `t.out` holds (sequences, t.attending.1 - t.attending.0, hidden) values,
/// one row per query position; no other thread writes this head's columns of this sequence.
unsafe fn attend_one(t: HeadTask) {
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.resize(t.hd * t.n + BLOCK_ROWS * (t.n + 2 * t.hd), 0.0);
        #[cfg(target_arch = "x86_64")]
        {
            if super::gemm::has_avx512f() {
                // SAFETY: the CPU has AVX-512F; the caller's guarantees.
                return unsafe { attend_one_avx512(t, scratch) };
            }
            if super::gemm::has_avx2() {
                // SAFETY: the CPU has AVX2 and FMA; the caller's guarantees.
                return unsafe { attend_one_avx2(t, scratch) };
            }
        }
        // SAFETY: the caller's guarantees; no AVX-512 asked for.
        unsafe { attend_one_with(t, scratch, false) }
    })
}

/// [`attend_one_with`] compiled for AVX-512, where its loops vectorise, and
/// with the sums held in registers.
///
/// # Safety
/// As [`attend_one`]; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_one_avx512(t: HeadTask, scratch: &mut [f32]) {
    unsafe { attend_one_with(t, scratch, true) }
}

/// [`attend_one_with`] compiled for AVX2, where its loops vectorise eight
/// lanes wide (the register path is AVX-512's).
///
/// # Safety
/// As [`attend_one`]; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_one_avx2(t: HeadTask, scratch: &mut [f32]) {
    unsafe { attend_one_with(t, scratch, false) }
}

/// # Safety
/// As [`attend_one`]; with `registers`, the CPU has AVX-512F.
#[inline(always)]
unsafe fn attend_one_with(t: HeadTask, scratch: &mut [f32], registers: bool) {
    let HeadTask {
        x,
        head,
        n,
        shared,
        stored_at,
        hidden,
        hd,
        mask,
        mask_stride,
        attending,
        out_at,
        out,
    } = t;
    let row = |i: usize, part: usize| {
        let stored = match i < shared {
            true => i,
            false => stored_at + i - shared,
        };
        let at = stored * 3 * hidden + part * hidden + head * hd;
        &x[at..at + hd]
    };
    let scale = (hd as f32).powf(-0.5);
    let (kt, rest) = scratch.split_at_mut(hd * n);
    let (scores, rest) = rest.split_at_mut(BLOCK_ROWS * n);
    let (acc, queries) = rest.split_at_mut(BLOCK_ROWS * hd);
    // k transposed, (hd, n): each score row is then hd multiply-adds of
    // whole rows.
    for j in 0..n {
        for (d, &v) in row(j, 1).iter().enumerate() {
            kt[d * n + j] = v;
        }
    }
    // Query rows in blocks of four where the sums fit registers: each row of
    // k and v loaded once serves four queries. Every sum keeps its order, so
    // a row's output is the same in a block or alone.
    let (mut i0, end) = attending;
    while i0 < end {
        let rows = match registers && hd <= 64 && end - i0 >= BLOCK_ROWS {
            true => BLOCK_ROWS,
            false => 1,
        };
        for r in 0..rows {
            for (q, &v) in queries[r * hd..(r + 1) * hd].iter_mut().zip(row(i0 + r, 0)) {
                *q = v * scale;
            }
        }
        if rows == BLOCK_ROWS {
            for c0 in (0..n).step_by(64) {
                let len = 64.min(n - c0);
                // SAFETY: AVX-512F is present (`registers`); kt holds hd
                // rows of n from which columns c0..c0 + len are read, into
                // as many scores of each of the four rows.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    register_rows::weighted_rows4(
                        block_rows(queries, hd),
                        |d| kt[d * n + c0..].as_ptr(),
                        len,
                        block_rows_mut(scores, n).map(|s| &mut s[c0..]),
                    )
                };
            }
        } else if registers {
            // 64 scores at a time, each chunk summed in registers.
            for c0 in (0..n).step_by(64) {
                let len = 64.min(n - c0);
                // SAFETY: AVX-512F is present; kt holds hd rows of n from
                // which columns c0..c0 + len are read, into as many scores.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    register_rows::weighted_rows(
                        queries[..hd].iter().copied(),
                        |d| kt[d * n + c0..].as_ptr(),
                        len,
                        &mut scores[c0..],
                    )
                };
            }
        } else {
            let scores = &mut scores[..n];
            scores.fill(0.0);
            for (d, &q) in queries[..hd].iter().enumerate() {
                for (s, &k) in scores.iter_mut().zip(&kt[d * n..(d + 1) * n]) {
                    *s += q * k;
                }
            }
        }
        let mut inverse = [0f32; BLOCK_ROWS];
        for r in 0..rows {
            let scores = &mut scores[r * n..(r + 1) * n];
            if let Some((m, per_head)) = mask {
                let m = if per_head {
                    m
                } else {
                    &m[(i0 + r) * mask_stride..][..n]
                };
                for (s, &m) in scores.iter_mut().zip(m) {
                    *s += m;
                }
            }
            let max = lane_max(scores);
            // Exponentials in a loop of their own, which vectorises; the sum
            // after.
            for s in scores.iter_mut() {
                *s = exp_fast(*s - max);
            }
            inverse[r] = 1.0 / lane_sum(scores, |v| v);
        }
        if rows == BLOCK_ROWS {
            // SAFETY: AVX-512F is present; rows of v hold hd values, each
            // acc hd.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                register_rows::weighted_rows4(
                    block_rows(scores, n),
                    |j| row(j, 2).as_ptr(),
                    hd,
                    block_rows_mut(acc, hd),
                )
            };
        } else if registers && hd <= 64 {
            // SAFETY: AVX-512F is present; rows of v hold hd values, acc hd.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                register_rows::weighted_rows(
                    scores[..n].iter().copied(),
                    |j| row(j, 2).as_ptr(),
                    hd,
                    acc,
                )
            };
        } else {
            let acc = &mut acc[..hd];
            acc.fill(0.0);
            for (j, &p) in scores[..n].iter().enumerate() {
                for (a, &v) in acc.iter_mut().zip(row(j, 2)) {
                    *a += p * v;
                }
            }
        }
        for r in 0..rows {
            let at = out_at + i0 + r - attending.0;
            // SAFETY: output row `at`, this head's hd columns: inside the
            // output and this task's own.
            let o = unsafe { std::slice::from_raw_parts_mut(out.at(at * hidden + head * hd), hd) };
            for (o, &a) in o.iter_mut().zip(&acc[r * hd..(r + 1) * hd]) {
                *o = a * inverse[r];
            }
        }
        i0 += rows;
    }
}

/// Query rows [`attend_one`] takes at once where it can.
const BLOCK_ROWS: usize = 4;

/// The first [`BLOCK_ROWS`] rows of `len` values of `buf`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn block_rows(buf: &[f32], len: usize) -> [&[f32]; BLOCK_ROWS] {
    std::array::from_fn(|r| &buf[r * len..(r + 1) * len])
}

/// [`block_rows`], writable.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn block_rows_mut(buf: &mut [f32], len: usize) -> [&mut [f32]; BLOCK_ROWS] {
    let mut rows = buf[..BLOCK_ROWS * len].chunks_exact_mut(len.max(1));
    std::array::from_fn(|_| rows.next().unwrap_or_default())
}

/// Weighted sums of rows of up to 64 values kept in four AVX-512 registers,
/// for attention's short rows (the compiler's loops store and reload them at
/// every step).
#[cfg(target_arch = "x86_64")]
mod register_rows {
    use std::arch::x86_64::*;

    /// Lanes of 16-value chunk `c` inside a row of `len`.
    #[inline(always)]
    fn lanes(len: usize, c: usize) -> __mmask16 {
        let valid = len.saturating_sub(16 * c).min(16);
        ((1u32 << valid) - 1) as __mmask16
    }

    /// `out = sum_t c_t * row(t)` over the coefficients `c`, each row `len`
    /// (at most 64) values from the pointer `row(t)` gives.
    ///
    /// # Safety
    /// AVX-512F; every `row(t)` points at `len` readable values; `out` holds
    /// `len`; `len <= 64`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_rows(
        c: impl Iterator<Item = f32>,
        row: impl Fn(usize) -> *const f32,
        len: usize,
        out: &mut [f32],
    ) {
        debug_assert!(len <= 64 && out.len() >= len);
        let mut acc = [_mm512_setzero_ps(); 4];
        let m: [__mmask16; 4] = std::array::from_fn(|c| lanes(len, c));
        for (t, ct) in c.enumerate() {
            let ct = _mm512_set1_ps(ct);
            let r = row(t);
            for c in 0..4 {
                if m[c] != 0 {
                    // SAFETY: the masked lanes lie inside row t.
                    let x = unsafe { _mm512_maskz_loadu_ps(m[c], r.add(16 * c)) };
                    acc[c] = _mm512_fmadd_ps(ct, x, acc[c]);
                }
            }
        }
        for c in 0..4 {
            if m[c] != 0 {
                // SAFETY: the masked lanes lie inside `out`.
                unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(16 * c), m[c], acc[c]) };
            }
        }
    }

    /// [`weighted_rows`] for four sets of coefficients over the same rows:
    /// `out[r] = sum_t c[r][t] * row(t)`, each row loaded once for the four;
    /// every sum in the same order as [`weighted_rows`] takes it.
    ///
    /// # Safety
    /// As [`weighted_rows`], for `c[r].len()` rows (the same for all four)
    /// and each `out[r]`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_rows4(
        c: [&[f32]; 4],
        row: impl Fn(usize) -> *const f32,
        len: usize,
        out: [&mut [f32]; 4],
    ) {
        debug_assert!(len <= 64 && out.iter().all(|o| o.len() >= len));
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let m: [__mmask16; 4] = std::array::from_fn(|c| lanes(len, c));
        for t in 0..c[0].len() {
            let r = row(t);
            for k in 0..4 {
                if m[k] != 0 {
                    // SAFETY: the masked lanes lie inside row t.
                    let x = unsafe { _mm512_maskz_loadu_ps(m[k], r.add(16 * k)) };
                    for q in 0..4 {
                        acc[q][k] = _mm512_fmadd_ps(_mm512_set1_ps(c[q][t]), x, acc[q][k]);
                    }
                }
            }
        }
        for (q, out) in out.into_iter().enumerate() {
            for k in 0..4 {
                if m[k] != 0 {
                    // SAFETY: the masked lanes lie inside `out[q]`.
                    unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr().add(16 * k), m[k], acc[q][k]) };
                }
            }
        }
    }
}

/// Self-attention with `heads` heads on `qkv` = [q | k | v] of shape
/// (batch, seq, 3 * hidden), with an optional additive (seq, seq) mask;
/// returns (batch, seq, hidden). Differentiable with respect to `qkv`.
pub fn attention(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let op = Attention {
        heads,
        mask: mask.map(|m| m.detach()),
        saved: std::sync::Mutex::new(None),
    };
    qkv.contiguous()?.apply_op1(op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    use crate::model::test_support::max_abs_diff as max_diff;

    fn input(shape: (usize, usize), seed: u64) -> Var {
        let mut rng = crate::model::init::NormalRng::new(seed);
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| rng.normal() as f32 * 2.0)
            .collect();
        Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn bias_and_activation_in_place_match_the_separate_ops() {
        let x = input((6, 10), 3);
        let b = input((1, 10), 4);
        let sum = x.as_tensor().broadcast_add(b.as_tensor()).unwrap();
        for (f, want) in [
            (Pointwise::Identity, sum.clone()),
            (Pointwise::GeluTanh, sum.gelu().unwrap()),
            (Pointwise::GeluErf, sum.gelu_erf().unwrap()),
            (
                Pointwise::QuickGelu,
                (&sum * candle_nn::ops::sigmoid(&(&sum * 1.702).unwrap()).unwrap()).unwrap(),
            ),
        ] {
            let y = x.as_tensor().copy().unwrap();
            bias_in_place(&y, &b.as_tensor().reshape(10).unwrap(), f).unwrap();
            assert!(max_diff(&y, &want) < 5e-6, "{f:?}: {}", max_diff(&y, &want));
        }
        let y = x.as_tensor().copy().unwrap();
        let other = input((6, 10), 5);
        add_in_place(&y, other.as_tensor()).unwrap();
        assert_eq!(
            max_diff(&y, &(x.as_tensor() + other.as_tensor()).unwrap()),
            0.0
        );
        assert!(add_in_place(&y, b.as_tensor()).is_err());
    }

    #[test]
    fn tanh_and_gelu_tanh_are_accurate() {
        for i in -2000..=2000 {
            let x = i as f32 / 100.0;
            let (ours, libm) = (tanh_fast(x), x.tanh());
            assert!((ours - libm).abs() <= 1e-6, "tanh({x}) = {ours} vs {libm}");
        }
        let x = Tensor::arange(-800i64, 800, &Device::Cpu)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap();
        let x = (x / 100.0).unwrap();
        let d = max_diff(&gelu_tanh(&x).unwrap(), &x.gelu().unwrap());
        assert!(d < 5e-6, "gelu tanh differs from candle's by {d}");
    }

    #[test]
    fn erf_is_accurate() {
        for i in -400..=400 {
            let x = i as f32 / 100.0;
            let want = libm_erf(x);
            assert!(
                (erf(x) - want).abs() < 5e-7,
                "erf({x}) = {} vs {want}",
                erf(x)
            );
        }
    }

    fn libm_erf(x: f32) -> f32 {
        // candle's gelu_erf is 0.5 x (1 + erf(x / sqrt 2)); invert it at x * sqrt 2.
        let t = Tensor::new(&[x * std::f32::consts::SQRT_2], &Device::Cpu).unwrap();
        let g = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap()[0];
        if x == 0.0 {
            0.0
        } else {
            2.0 * g / (x * std::f32::consts::SQRT_2) - 1.0
        }
    }

    /// The fused dense layer against candle's composition, with and without bias.
    #[test]
    fn dense_matches_the_composition() {
        let x = input((2 * 5, 6), 7);
        let x3 = x.as_tensor().reshape((2, 5, 6)).unwrap();
        let w = input((4, 6), 8);
        let b = input((1, 4), 9);
        let bv = b.as_tensor().squeeze(0).unwrap();
        let probe = input((10, 4), 10).as_tensor().reshape((2, 5, 4)).unwrap();
        for bias in [None, Some(&bv)] {
            let mut composed = x3.broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap();
            if let Some(b) = bias {
                composed = composed.broadcast_add(b).unwrap();
            }
            let fused = dense(&x3, w.as_tensor(), bias).unwrap();
            assert_eq!(fused.dims(), &[2, 5, 4]);
            assert!(max_diff(&fused, &composed) < 1e-5);
            let g1 = (fused * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (composed * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let vars: &[&Var] = if bias.is_some() {
                &[&x, &w, &b]
            } else {
                &[&x, &w]
            };
            for v in vars {
                let d = max_diff(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-4, "dense gradient differs by {d}");
            }
        }
    }

    /// The fused attention against the same attention composed of candle's
    /// operations, with and without a causal mask.
    #[test]
    fn attention_matches_the_composition() {
        let (b, n, h, hd) = (3, 7, 2, 4);
        let qkv = input((b * n, 3 * h * hd), 5);
        let qkv3 = qkv.as_tensor().reshape((b, n, 3 * h * hd)).unwrap();
        let probe = input((b * n, h * hd), 6)
            .as_tensor()
            .reshape((b, n, h * hd))
            .unwrap();
        let mask = crate::model::layers::causal_mask(n, &Device::Cpu).unwrap();
        for mask in [None, Some(&mask)] {
            let composed = {
                let t = qkv3
                    .reshape((b, n, 3, h, hd))
                    .unwrap()
                    .permute((2, 0, 3, 1, 4))
                    .unwrap()
                    .contiguous()
                    .unwrap();
                let q = (t.get(0).unwrap().reshape((b * h, n, hd)).unwrap()
                    * (hd as f64).powf(-0.5))
                .unwrap();
                let k = t.get(1).unwrap().reshape((b * h, n, hd)).unwrap();
                let v = t.get(2).unwrap().reshape((b * h, n, hd)).unwrap();
                let mut s = q.matmul(&k.t().unwrap()).unwrap();
                if let Some(m) = mask {
                    s = s.broadcast_add(m).unwrap();
                }
                let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
                p.matmul(&v)
                    .unwrap()
                    .reshape((b, h, n, hd))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .reshape((b, n, h * hd))
                    .unwrap()
            };
            let fused = attention(&qkv3, h, mask).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-6);
            let g1 = (fused * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g2 = (composed * &probe)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let d = max_diff(
                g1.get(qkv.as_tensor()).unwrap(),
                g2.get(qkv.as_tensor()).unwrap(),
            );
            assert!(d < 1e-5, "attention gradient differs by {d}");
        }
    }

    /// The sums and maxima in 16 lanes against one chain, at every length
    /// around the lanes (the remainder's path included), and the layer norm
    /// built on them at a width that is no multiple of 16.
    #[test]
    fn lane_sums_and_maxima_are_one_chains_up_to_rounding() {
        let xs: Vec<f32> = (0..40)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.37)
            .collect();
        for n in 0..xs.len() {
            let x = &xs[..n];
            let sum: f32 = x.iter().sum();
            assert!((lane_sum(x, |v| v) - sum).abs() < 1e-5, "sum of {n}");
            let squares: f32 = x.iter().map(|v| v * v).sum();
            assert!(
                (lane_sum(x, |v| v * v) - squares).abs() < 1e-4,
                "squares of {n}"
            );
            assert_eq!(
                lane_max(x),
                x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
            );
        }
        // NaN is passed over, as `f32::max` does.
        let mut with_nan = xs.clone();
        with_nan[3] = f32::NAN;
        with_nan[20] = f32::NAN;
        let others = with_nan.iter().copied().filter(|v| !v.is_nan());
        assert_eq!(
            lane_max(&with_nan),
            others.fold(f32::NEG_INFINITY, f32::max)
        );

        let x = input((45, 50), 5);
        let w = input((1, 50), 6).as_tensor().squeeze(0).unwrap();
        let b = input((1, 50), 7).as_tensor().squeeze(0).unwrap();
        let ours = layer_norm(x.as_tensor(), &w, &b, 1e-5).unwrap();
        let theirs = candle_nn::ops::layer_norm_slow(x.as_tensor(), &w, &b, 1e-5).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        // A gain or a bias of another width is an error, not a wrong result.
        let short = w.narrow(0, 0, 49).unwrap();
        assert!(layer_norm(x.as_tensor(), &short, &b, 1e-5).is_err());
        assert!(layer_norm(x.as_tensor(), &w, &short, 1e-5).is_err());
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
        let g1 = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(
            max_diff(
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap()
            ) < 1e-5
        );

        // Adding a row to every row.
        let ours = add_rows(x.as_tensor(), w.as_tensor()).unwrap();
        let theirs = x.as_tensor().broadcast_add(w.as_tensor()).unwrap();
        assert_eq!(max_diff(&ours, &theirs), 0.0);
        let g1 = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            assert!(
                max_diff(
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap()
                ) < 1e-4
            );
        }

        // Layer norm.
        let (wv, bv) = (
            w.as_tensor().squeeze(0).unwrap(),
            b.as_tensor().squeeze(0).unwrap(),
        );
        let ours = layer_norm(x.as_tensor(), &wv, &bv, 1e-5).unwrap();
        let theirs = candle_nn::ops::layer_norm_slow(x.as_tensor(), &wv, &bv, 1e-5).unwrap();
        assert!(max_diff(&ours, &theirs) < 1e-5);
        let g1 = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            let d = max_diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < 1e-4, "layer norm gradient differs by {d}");
        }
    }
}

#[cfg(test)]
mod fast_math_tests {
    use super::*;

    /// The one-pass inference attention against candle's composition, with
    /// no mask, a causal (seq, seq) mask and a per-head key mask, at sizes
    /// inside and past the register path's 64 values.
    #[test]
    fn inference_attention_matches_the_composed_one() {
        use crate::model::test_support::random;
        for (b, n, heads, hd) in [
            (2, 50, 3, 64),
            (1, 10, 4, 16),
            (2, 77, 2, 24),
            (1, 7, 1, 80),
        ] {
            let qkv = random(&[b, n, 3 * heads * hd], 11);
            let causal = crate::model::layers::causal_mask(n, &candle_core::Device::Cpu).unwrap();
            let keys: Vec<f32> = (0..b * heads * n)
                .map(|i| if i % n >= n - 3 { f32::MIN } else { 0.0 })
                .collect();
            let keys =
                Tensor::from_vec(keys, (b * heads, 1, n), &candle_core::Device::Cpu).unwrap();
            for mask in [None, Some(&causal), Some(&keys)] {
                let want = attend(&qkv, heads, mask).unwrap().0;
                let got = attend_inference(&qkv, heads, mask).unwrap();
                let d = crate::model::test_support::max_abs_diff(&got, &want);
                assert!(d < 1e-5, "{b}x{n}, {heads} heads of {hd}: {d}");
                // One query row per sequence: exactly that row of the whole
                // (each row's sums keep their order in a block or alone).
                let rows: Vec<usize> = (0..b).map(|i| (n - 1 + 3 * i) % n).collect();
                let one = attend_inference_rows(&qkv, heads, mask, &rows).unwrap();
                assert_eq!(one.dims(), [b, heads * hd]);
                let want = select_rows(&got, &rows).unwrap();
                assert_eq!(
                    one.to_vec2::<f32>().unwrap(),
                    want.to_vec2::<f32>().unwrap(),
                    "{b}x{n}, rows {rows:?}"
                );
            }
            let qkv = random(&[b, n, 3 * heads * hd], 12);
            assert!(attend_inference_rows(&qkv, heads, None, &vec![n; b]).is_err());
            assert!(attend_inference_rows(&qkv, heads, None, &[0; 3]).is_err());
        }
    }

    /// Sequences that store their common beginning once, each then as
    /// long as it is, attend exactly as each sequence stored whole.
    #[test]
    fn a_beginning_stored_once_attends_as_copied_in_front_of_each_sequence() {
        use crate::model::layers::causal_mask;
        use crate::model::test_support::random;
        let dev = candle_core::Device::Cpu;
        let cases: [(usize, &[usize], usize, usize); 4] = [
            (6, &[4, 4, 4, 4, 4], 2, 64),
            (1, &[9, 3, 9], 3, 16),
            (5, &[1], 1, 80),
            (2, &[1, 7, 4, 12, 2, 5, 3], 2, 64),
        ];
        for (first, own, heads, hd) in cases {
            let three = 3 * heads * hd;
            let total: usize = own.iter().sum();
            let longest = first + own.iter().max().unwrap();
            let stored = random(&[first + total, three], 13);
            let beginning = stored.narrow(0, 0, first).unwrap();
            let mut starts = vec![first];
            for m in own {
                starts.push(starts.last().unwrap() + m);
            }
            // Each sequence stored whole: the beginning, then its own rows.
            let whole = |i: usize| {
                let rows = stored.narrow(0, starts[i], own[i]).unwrap();
                Tensor::cat(&[&beginning, &rows], 0)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap()
            };
            let rows: Vec<usize> = own
                .iter()
                .enumerate()
                .map(|(i, m)| first + (i * 7) % m)
                .collect();
            for masked in [false, true] {
                let mask = causal_mask(longest, &dev).unwrap();
                let mask = masked.then_some(&mask);
                let (mut want, mut want_rows) = (Vec::new(), Vec::new());
                for (i, &m) in own.iter().enumerate() {
                    let own_mask = causal_mask(first + m, &dev).unwrap();
                    let own_mask = masked.then_some(&own_mask);
                    let from = attend_inference_from(&whole(i), heads, own_mask, first).unwrap();
                    want.extend(from.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    let one = attend_inference_rows(&whole(i), heads, own_mask, &rows[i..i + 1]);
                    want_rows.extend(
                        one.unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                    );
                }
                let got = attend_inference_shared(&stored, heads, mask, first, own, None).unwrap();
                assert_eq!(got.dims(), [total, heads * hd]);
                assert_eq!(
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want,
                    "{first} + {own:?}, masked: {masked}"
                );
                let got =
                    attend_inference_shared(&stored, heads, mask, first, own, Some(&rows)).unwrap();
                assert_eq!(got.dims(), [own.len(), heads * hd]);
                assert_eq!(
                    got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want_rows
                );
            }
            // Rows inside the beginning or past a sequence's end, lengths
            // that do not add up to the rows, an empty sequence, and another
            // mask are refused.
            let inside = vec![first - 1; own.len()];
            assert!(
                attend_inference_shared(&stored, heads, None, first, own, Some(&inside)).is_err()
            );
            let past: Vec<usize> = own.iter().map(|m| first + m).collect();
            assert!(
                attend_inference_shared(&stored, heads, None, first, own, Some(&past)).is_err()
            );
            let longer: Vec<usize> = own.iter().map(|m| m + 1).collect();
            assert!(attend_inference_shared(&stored, heads, None, first, &longer, None).is_err());
            let mut empty = own.to_vec();
            empty.push(0);
            assert!(attend_inference_shared(&stored, heads, None, first, &empty, None).is_err());
            let other = causal_mask(longest + 1, &dev).unwrap();
            assert!(
                attend_inference_shared(&stored, heads, Some(&other), first, own, None).is_err()
            );
        }
    }

    #[test]
    fn exp_fast_is_as_close_as_expf() {
        let mut worst = 0f64;
        for i in -8700..=8830 {
            let x = i as f32 * 0.01;
            let want = (x as f64).exp();
            let rel = ((exp_fast(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "relative error {worst}");
        assert!(exp_fast(-200.0) < 1e-37 && exp_fast(-200.0) >= 0.0);
        assert!(exp_fast(100.0).is_finite());
        for x in [-10.0f32, -1.0, -0.3, 0.0, 0.2, 1.5, 4.0] {
            let e = (erf_fast(x) as f64 - libm_erf(x as f64)).abs();
            assert!(e < 3e-7, "erf({x}): error {e}");
        }
    }

    /// erf to double precision (Abramowitz and Stegun 7.1.28's series is
    /// slow to converge; the Taylor series is exact enough for |x| <= 4, and
    /// erf is 1 to f32 beyond).
    fn libm_erf(x: f64) -> f64 {
        if x.abs() > 4.0 {
            return x.signum();
        }
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
