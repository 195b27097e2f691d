//! 3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering,
//! F(2x2, 3x3) (Lavin and Gray 2016, "Fast Algorithms for Convolutional
//! Neural Networks"), for the ResNet tower's f32 inference.
//!
//! Each 2x2 block of the output is `A^T [(G g G^T) . (B^T d B)] A` for the
//! 4x4 block of input `d` around it: the sixteen element-wise products, summed
//! over input channels, are sixteen matrix products of (blocks x in) by
//! (in x out). That is 16 multiply-adds per block and channel pair where the
//! direct convolution does 36, 2.25x fewer, for a few additions per value to
//! transform. The transforms' coefficients are 0, +-1 and 1/2, so the
//! result differs from the direct product by rounding alone (`resnet`'s tests
//! bound it against the product over patches and candle's `conv2d`).

use std::sync::Arc;

use rayon::prelude::*;

use super::gemm::{Out, PackedMatrix, Prepacked, epilogue_tile};
use super::ops::Pointwise;

/// A 3x3 convolution's weights as the sixteen products take them.
#[derive(Debug)]
pub(super) struct Winograd {
    /// `G g G^T` at each of the 4x4 positions (row-major), (out, in) each.
    filters: Vec<PackedMatrix<f32>>,
    cin: usize,
    cout: usize,
}

/// About how many bytes of transformed input (and of products) one pass
/// over the map makes.
const PASS_BYTES: usize = 4 << 20;

/// Channels the transforms take at a time: one AVX-512 register.
const LANES: usize = 16;

/// `dst[..lanes] = src[..lanes]`, a whole register's copy when `lanes` is
/// [`LANES`] (a call to `memcpy` otherwise, for each 64 bytes).
#[inline(always)]
fn copy(dst: &mut [f32], src: &[f32], lanes: usize) {
    if lanes == LANES {
        dst[..LANES].copy_from_slice(&src[..LANES]);
    } else {
        dst[..lanes].copy_from_slice(&src[..lanes]);
    }
}

/// `G`, for one axis of a 3-tap filter: rows are the 4 transformed taps.
const G: [[f64; 3]; 4] = [
    [1.0, 0.0, 0.0],
    [0.5, 0.5, 0.5],
    [0.5, -0.5, 0.5],
    [0.0, 0.0, 1.0],
];

impl Winograd {
    /// From a convolution's (out, ky * kx * in) weight in the patch layout of
    /// `resnet::Im2Col`; `None` where the CPU has no packed kernel.
    pub(super) fn new(
        weight: &[f32],
        cout: usize,
        cin: usize,
    ) -> candle_core::Result<Option<Self>> {
        if weight.len() != cout * 9 * cin {
            candle_core::bail!(
                "winograd: {} weights for a 3x3 convolution from {cin} to {cout} channels",
                weight.len()
            );
        }
        // u[xi][o][i] = sum over ky, kx of G[r][ky] G[s][kx] g[o][ky][kx][i],
        // one output channel per task.
        let mut per_out: Vec<[Vec<f32>; 16]> = (0..cout)
            .into_par_iter()
            .map(|o| {
                let g = &weight[o * 9 * cin..(o + 1) * 9 * cin];
                let mut rows: [Vec<f32>; 16] = std::array::from_fn(|_| vec![0f32; cin]);
                for i in 0..cin {
                    // G g, then (G g) G^T, in f64.
                    let mut t = [[0f64; 3]; 4];
                    for (r, t) in t.iter_mut().enumerate() {
                        for (kx, t) in t.iter_mut().enumerate() {
                            *t = (0..3)
                                .map(|ky| G[r][ky] * f64::from(g[(ky * 3 + kx) * cin + i]))
                                .sum();
                        }
                    }
                    for (xi, row) in rows.iter_mut().enumerate() {
                        let (r, s) = (xi / 4, xi % 4);
                        row[i] = (0..3).map(|kx| t[r][kx] * G[s][kx]).sum::<f64>() as f32;
                    }
                }
                rows
            })
            .collect();
        let mut filters = Vec::with_capacity(16);
        for xi in 0..16 {
            let mut u = Vec::with_capacity(cout * cin);
            for rows in per_out.iter_mut() {
                u.append(&mut rows[xi]);
            }
            let u = candle_core::Tensor::from_vec(u, (cout, cin), &candle_core::Device::Cpu)?;
            match PackedMatrix::new(&u)? {
                Some(p) => filters.push(p),
                None => return Ok(None),
            }
        }
        Ok(Some(Self { filters, cin, cout }))
    }

    /// `f(conv(x) + bias)` for a channels-last map `x` of `n` images, `h` x
    /// `w`: an (n * h * w, out) buffer.
    pub(super) fn forward(
        &self,
        x: &[f32],
        (n, h, w): (usize, usize, usize),
        bias: Option<&[f32]>,
        f: Pointwise,
    ) -> candle_core::Result<Vec<f32>> {
        let (cin, cout) = (self.cin, self.cout);
        if x.len() != n * h * w * cin {
            candle_core::bail!(
                "winograd: a map of {} values is not {n} x {h} x {w} x {cin}",
                x.len()
            );
        }
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let lines = n * th;
        // Lines of blocks per pass: a pass's sixteen inputs and products
        // (about PASS_BYTES each) come back from the allocator pass after
        // pass, where the whole map's (50 MB each for RN50's first stage at
        // batch 16) were fresh pages to zero.
        let step = (PASS_BYTES / (16 * tw * cin.max(cout) * 4)).max(1);
        let mut y = vec![0f32; n * h * w * cout];
        // Each line's output rows: two of an image, or its last where h is odd.
        let mut outs = Vec::with_capacity(lines);
        let mut rest = &mut y[..];
        for line in 0..lines {
            let rows = (h - 2 * (line % th)).min(2);
            let (this, after) = std::mem::take(&mut rest).split_at_mut(rows * w * cout);
            outs.push(this);
            rest = after;
        }
        let mut outs = outs.into_iter();
        for first in (0..lines).step_by(step) {
            let pass = first..lines.min(first + step);
            let blocks = pass.len() * tw;
            // The sixteen transformed inputs, (blocks x in) each, one after
            // another.
            let mut v: Vec<f32> = Vec::with_capacity(16 * blocks * cin);
            let out = Out(v.as_mut_ptr());
            pass.clone().into_par_iter().for_each(|line| {
                let (img, ty) = (line / th, line % th);
                for tx in 0..tw {
                    let block = (line - first) * tw + tx;
                    // SAFETY: block `block`'s row of each of the sixteen
                    // matrices, `cin` values inside the 16 x blocks x cin
                    // buffer; no other task writes them.
                    unsafe {
                        transform_input(x, (img, ty, tx), (h, w, cin), |xi| {
                            out.at((xi * blocks + block) * cin)
                        })
                    };
                }
            });
            // SAFETY: every block wrote all sixteen of its rows.
            unsafe { v.set_len(16 * blocks * cin) };
            // The sixteen products side by side on the pool (each shares
            // out its own tasks too), not one after another with a wait
            // between.
            let m: Vec<Vec<f32>> = self
                .filters
                .par_iter()
                .zip(v.par_chunks_exact(blocks * cin))
                .map(|(u, v)| u.product(v, blocks, None, Pointwise::Identity))
                .collect();
            let lines: Vec<&mut [f32]> = outs.by_ref().take(pass.len()).collect();
            lines.into_par_iter().enumerate().for_each(|(i, rows)| {
                let valid = rows.len() / (w * cout);
                for tx in 0..tw {
                    let block = i * tw + tx;
                    let src: [&[f32]; 16] =
                        std::array::from_fn(|xi| &m[xi][block * cout..][..cout]);
                    transform_output(&src, rows, (valid, w, tx), cout);
                }
                let pixels = rows.len() / cout;
                // SAFETY: `pixels` rows of `cout` values, the line's own.
                unsafe { epilogue_tile(rows.as_mut_ptr(), cout, pixels, cout, bias, f) };
            });
        }
        Ok(y)
    }
}

/// Writes `B^T d B` for the 4x4 input block of output block (img, ty, tx):
/// position xi's `cin` values at `at(xi)`.
///
/// # Safety
/// Each `at(xi)` is valid for `cin` writes that nothing else touches.
unsafe fn transform_input(
    x: &[f32],
    (img, ty, tx): (usize, usize, usize),
    (h, w, cin): (usize, usize, usize),
    at: impl Fn(usize) -> *mut f32,
) {
    // Input rows and columns 2ty - 1 .. 2ty + 3 (and the same across), None
    // in the zero padding.
    let pixel = |r: usize, s: usize| {
        let (y, xx) = ((2 * ty + r).checked_sub(1)?, (2 * tx + s).checked_sub(1)?);
        (y < h && xx < w).then(|| &x[((img * h + y) * w + xx) * cin..][..cin])
    };
    let d: [[Option<&[f32]>; 4]; 4] = std::array::from_fn(|r| std::array::from_fn(|s| pixel(r, s)));
    // SAFETY: the caller's.
    let dst: [&mut [f32]; 16] =
        std::array::from_fn(|xi| unsafe { std::slice::from_raw_parts_mut(at(xi), cin) });
    #[cfg(target_arch = "x86_64")]
    if super::gemm::has_avx512bw() {
        // SAFETY: AVX-512F was detected.
        return unsafe { input_avx512(&d, dst, cin) };
    }
    input_with(&d, dst, cin)
}

/// [`input_with`] in AVX-512 registers, 16 channels each (masked for the
/// last few): the sixteen inputs, their transform down the columns and then
/// along the rows, never on the stack.
///
/// # Safety
/// The CPU has AVX-512F; each `d` slice and `dst` row holds `cin` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_avx512(d: &[[Option<&[f32]>; 4]; 4], dst: [&mut [f32]; 16], cin: usize) {
    use std::arch::x86_64::*;
    let mut c0 = 0;
    while c0 < cin {
        let lanes = LANES.min(cin - c0);
        let mask = ((1u32 << lanes) - 1) as __mmask16;
        // SAFETY: lanes c0..c0 + lanes of slices of `cin` values, masked.
        let x: [__m512; 16] = std::array::from_fn(|xi| match d[xi / 4][xi % 4] {
            Some(p) => unsafe { _mm512_maskz_loadu_ps(mask, p.as_ptr().add(c0)) },
            None => _mm512_setzero_ps(),
        });
        // B^T d: down each column.
        let u: [__m512; 16] = std::array::from_fn(|xi| {
            let (r, s) = (xi / 4, xi % 4);
            let (d0, d1, d2, d3) = (x[s], x[4 + s], x[8 + s], x[12 + s]);
            match r {
                0 => _mm512_sub_ps(d0, d2),
                1 => _mm512_add_ps(d1, d2),
                2 => _mm512_sub_ps(d2, d1),
                _ => _mm512_sub_ps(d1, d3),
            }
        });
        // (B^T d) B: along each row.
        for r in 0..4 {
            let (e0, e1, e2, e3) = (u[4 * r], u[4 * r + 1], u[4 * r + 2], u[4 * r + 3]);
            let v = [
                _mm512_sub_ps(e0, e2),
                _mm512_add_ps(e1, e2),
                _mm512_sub_ps(e2, e1),
                _mm512_sub_ps(e1, e3),
            ];
            for (s, v) in v.into_iter().enumerate() {
                debug_assert!(dst[4 * r + s].len() >= c0 + lanes);
                // SAFETY: as the loads.
                unsafe { _mm512_mask_storeu_ps(dst[4 * r + s].as_mut_ptr().add(c0), mask, v) };
            }
        }
        c0 += lanes;
    }
}

/// The input transform, one channel at a time over 16 channels' lanes.
#[inline(always)]
fn input_with(d: &[[Option<&[f32]>; 4]; 4], dst: [&mut [f32]; 16], cin: usize) {
    let mut c0 = 0;
    while c0 < cin {
        let lanes = LANES.min(cin - c0);
        // d[r][s] for these channels, zero in the padding.
        let mut t = [[[0f32; LANES]; 4]; 4];
        for r in 0..4 {
            for s in 0..4 {
                if let Some(p) = d[r][s] {
                    copy(&mut t[r][s], &p[c0..], lanes);
                }
            }
        }
        // B^T d: down each column.
        let mut u = [[[0f32; LANES]; 4]; 4];
        for s in 0..4 {
            for l in 0..LANES {
                let (d0, d1, d2, d3) = (t[0][s][l], t[1][s][l], t[2][s][l], t[3][s][l]);
                u[0][s][l] = d0 - d2;
                u[1][s][l] = d1 + d2;
                u[2][s][l] = d2 - d1;
                u[3][s][l] = d1 - d3;
            }
        }
        // (B^T d) B: along each row.
        for r in 0..4 {
            let mut v = [[0f32; LANES]; 4];
            for l in 0..LANES {
                let (e0, e1, e2, e3) = (u[r][0][l], u[r][1][l], u[r][2][l], u[r][3][l]);
                v[0][l] = e0 - e2;
                v[1][l] = e1 + e2;
                v[2][l] = e2 - e1;
                v[3][l] = e1 - e3;
            }
            for (s, v) in v.iter().enumerate() {
                copy(&mut dst[r * 4 + s][c0..], v, lanes);
            }
        }
        c0 += lanes;
    }
}

/// Writes `A^T m A` of one block (`src`: its row of each of the sixteen
/// products) into its up to 2 x 2 pixels of `rows` (the block row's `valid`
/// output rows of `w` pixels), at column block `tx`.
fn transform_output(
    src: &[&[f32]; 16],
    rows: &mut [f32],
    (valid, w, tx): (usize, usize, usize),
    cout: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if super::gemm::has_avx512bw() {
        // SAFETY: AVX-512F was detected.
        return unsafe { output_avx512(src, rows, (valid, w, tx), cout) };
    }
    output_with(src, rows, (valid, w, tx), cout)
}

/// [`output_with`] in AVX-512 registers, 16 channels each (masked for the
/// last few).
///
/// # Safety
/// The CPU has AVX-512F; each `src` row holds `cout` values, and `rows`
/// the block row's `valid` rows of `w` pixels of `cout`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn output_avx512(
    src: &[&[f32]; 16],
    rows: &mut [f32],
    (valid, w, tx): (usize, usize, usize),
    cout: usize,
) {
    use std::arch::x86_64::*;
    let cols = (w - 2 * tx).min(2);
    debug_assert!(rows.len() >= valid * w * cout);
    let mut c0 = 0;
    while c0 < cout {
        let lanes = LANES.min(cout - c0);
        let mask = ((1u32 << lanes) - 1) as __mmask16;
        // SAFETY: lanes c0..c0 + lanes of rows of `cout` values, masked.
        let p: [__m512; 16] = std::array::from_fn(|xi| unsafe {
            _mm512_maskz_loadu_ps(mask, src[xi].as_ptr().add(c0))
        });
        // A^T m: rows 0 + 1 + 2 and 1 - 2 - 3, down each column.
        let a: [[__m512; 4]; 2] = [
            std::array::from_fn(|s| _mm512_add_ps(_mm512_add_ps(p[s], p[4 + s]), p[8 + s])),
            std::array::from_fn(|s| _mm512_sub_ps(_mm512_sub_ps(p[4 + s], p[8 + s]), p[12 + s])),
        ];
        // (A^T m) A: along each row.
        for (r, a) in a.iter().enumerate().take(valid) {
            let y = [
                _mm512_add_ps(_mm512_add_ps(a[0], a[1]), a[2]),
                _mm512_sub_ps(_mm512_sub_ps(a[1], a[2]), a[3]),
            ];
            for (s, y) in y.into_iter().enumerate().take(cols) {
                let at = (r * w + 2 * tx + s) * cout + c0;
                // SAFETY: pixel (r, 2 tx + s) of the rows, lanes masked.
                unsafe { _mm512_mask_storeu_ps(rows.as_mut_ptr().add(at), mask, y) };
            }
        }
        c0 += lanes;
    }
}

/// The output transform, over 16 channels' lanes at a time.
#[inline(always)]
fn output_with(
    src: &[&[f32]; 16],
    rows: &mut [f32],
    (valid, w, tx): (usize, usize, usize),
    cout: usize,
) {
    let cols = (w - 2 * tx).min(2);
    let mut c0 = 0;
    while c0 < cout {
        let lanes = LANES.min(cout - c0);
        let mut p = [[0f32; LANES]; 16];
        for (p, src) in p.iter_mut().zip(src) {
            copy(p, &src[c0..], lanes);
        }
        // A^T m: rows 0 + 1 + 2 and 1 - 2 - 3, down each column.
        let mut a = [[[0f32; LANES]; 4]; 2];
        for s in 0..4 {
            for l in 0..LANES {
                a[0][s][l] = p[s][l] + p[4 + s][l] + p[8 + s][l];
                a[1][s][l] = p[4 + s][l] - p[8 + s][l] - p[12 + s][l];
            }
        }
        // (A^T m) A: along each row.
        for (r, a) in a.iter().enumerate().take(valid) {
            let mut y = [[0f32; LANES]; 2];
            for l in 0..LANES {
                y[0][l] = a[0][l] + a[1][l] + a[2][l];
                y[1][l] = a[1][l] - a[2][l] - a[3][l];
            }
            for (s, y) in y.iter().enumerate().take(cols) {
                copy(&mut rows[(r * w + 2 * tx + s) * cout + c0..], y, lanes);
            }
        }
        c0 += lanes;
    }
}

/// `f(conv(x) + bias)` over a channels-last map (n * h * w, in) of `n`
/// images, `h` x `w`, as a tensor op.
pub(super) fn conv(
    x: &candle_core::Tensor,
    weights: Arc<Winograd>,
    dims: (usize, usize, usize),
    bias: Option<Vec<f32>>,
    f: Pointwise,
) -> candle_core::Result<candle_core::Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Conv {
        weights,
        dims,
        bias,
        f,
    })
}

struct Conv {
    weights: Arc<Winograd>,
    dims: (usize, usize, usize),
    bias: Option<Vec<f32>>,
    f: Pointwise,
}

impl candle_core::CustomOp1 for Conv {
    fn name(&self) -> &'static str {
        "clipdex-winograd"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = super::ops::slice(storage, layout, self.name())?;
        let y = self
            .weights
            .forward(x, self.dims, self.bias.as_deref(), self.f)?;
        let (n, h, w) = self.dims;
        let shape = candle_core::Shape::from((n * h * w, self.weights.cout));
        Ok((candle_core::CpuStorage::F32(y), shape))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values that are not round in binary, for `n` of them.
    fn values(n: usize, seed: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
    }

    #[test]
    fn the_portable_transforms_give_the_vector_ones_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if crate::model::gemm::has_avx512bw() {
            // 40 channels: two whole registers and a masked 8.
            let c = 40;
            let pixels: Vec<Vec<f32>> = (0..16).map(|i| values(c, i as f32)).collect();
            // A corner block: its first row and column are padding.
            let d: [[Option<&[f32]>; 4]; 4] = std::array::from_fn(|r| {
                std::array::from_fn(|s| (r > 0 && s > 0).then(|| &pixels[r * 4 + s][..]))
            });
            let (mut a, mut b) = (vec![vec![0f32; c]; 16], vec![vec![0f32; c]; 16]);
            fn rows(v: &mut [Vec<f32>]) -> [&mut [f32]; 16] {
                let mut it = v.iter_mut();
                std::array::from_fn(|_| it.next().map(|r| &mut r[..]).unwrap_or_default())
            }
            input_with(&d, rows(&mut a), c);
            // SAFETY: AVX-512F was detected; every slice holds `c` values.
            unsafe { input_avx512(&d, rows(&mut b), c) };
            assert_eq!(a, b);
            assert!(a.iter().flatten().any(|v| *v != 0.0));

            // One block's products into a 3-pixel-wide row pair: the block
            // at tx = 1 has one column.
            let src: [&[f32]; 16] = std::array::from_fn(|xi| &pixels[xi][..]);
            for valid in [1, 2] {
                let (mut a, mut b) = (vec![0f32; valid * 3 * c], vec![0f32; valid * 3 * c]);
                for tx in 0..2 {
                    output_with(&src, &mut a, (valid, 3, tx), c);
                    // SAFETY: as above; the rows hold valid x 3 pixels of c.
                    unsafe { output_avx512(&src, &mut b, (valid, 3, tx), c) };
                }
                assert_eq!(a, b);
                assert!(a.iter().all(|v| *v != 0.0));
            }
        }
    }
}
