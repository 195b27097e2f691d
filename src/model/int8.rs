//! Dense layers in int8 on Intel AMX or AVX512-VNNI, for `--precision int8`.
//!
//! A weight is quantized once, at load, per output channel (symmetric: a
//! scale per column, values -127 to 127) and laid out as AMX tiles
//! ([`Int8Matrix`]). Each product quantizes its activations per row (per
//! token, at run time) to unsigned 0 to 255 over the row's own range, zero
//! included (a scale and a zero point: twice the steps of a symmetric
//! code for a row that is mostly one sign, as after a GELU), multiplies with
//! `TDPBUSD` (i32 sums, so exact), and turns each sum back with its row's
//! and column's scales, less the zero point times the column's sum of
//! weights, before the bias and the activation. Half the bytes of bf16 per
//! weight and twice its multiply-adds per instruction.
//!
//! Without AMX-INT8, CPUs with AVX512-VNNI (AMD Zen 4, Intel from Cascade
//! Lake) run the same tiles with `VPDPBUSD` ([`super::amx`]): the same i32
//! sums, so the same results. Without either [`Int8Matrix::new`] returns
//! `None`, and the caller keeps the layer in bf16 ([`super::bf16`]).

use std::sync::{Arc, OnceLock};

use candle_core::Tensor;

use super::amx::{self, Format, TileMatrix};
use super::gemm::{RowSource, epilogue};
use super::ops::Pointwise;

/// Whether this CPU runs int8 tile products, on AMX or AVX512-VNNI (checked
/// once).
pub fn available() -> bool {
    amx::available(Format::Int8)
}

/// A weight `W` (out x in) quantized per output channel, as AMX `B` tiles
/// ([`amx`]'s layout: each tile row holds, for every column, the weights at
/// four consecutive depths).
#[derive(Debug)]
pub struct Int8Matrix {
    tiles: TileMatrix<i8>,
    /// Each output channel's scale: weight `(o, kk)` is its value times
    /// `scales[o]`.
    scales: Vec<f32>,
    /// Each output channel's sum of quantized weights, for the activations'
    /// zero points.
    sums: Vec<i32>,
}

impl Int8Matrix {
    /// Quantizes and lays out an (out, in) f32 weight, or `None` without
    /// AMX-INT8 or AVX512-VNNI.
    pub fn new(weight: &Tensor) -> candle_core::Result<Option<Self>> {
        amx::with_rows(Format::Int8, weight, Self::from_rows)
    }

    fn from_rows(w: &[f32], n: usize, k: usize) -> Self {
        let (tiles, kept) = TileMatrix::new(Format::Int8, w, n, k, |row, values| {
            let scale = scale_of(row);
            let inverse = inverse(scale);
            let mut sum = 0;
            for (q, &v) in values.iter_mut().zip(row) {
                *q = quantize(v, inverse);
                sum += i32::from(*q);
            }
            (scale, sum)
        });
        let (scales, sums) = kept.into_iter().unzip();
        Self {
            tiles,
            scales,
            sums,
        }
    }
}

/// The symmetric scale of `values`: the largest magnitude over 127; 0 for
/// all zeros, NaN where any value is not finite (so that whatever it touches
/// is NaN too, as in f32).
fn scale_of(values: &[f32]) -> f32 {
    // Magnitudes compared as bits, in the order of their values, with every
    // infinity and NaN above the finite ones: one integer maximum, which
    // vectorises (loading ViT-B/32 quantizes 88 M weights).
    let largest = values
        .iter()
        .fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    match largest {
        0x7f80_0000.. => f32::NAN,
        bits => f32::from_bits(bits) / 127.0,
    }
}

/// What to multiply by to quantize with `scale`.
fn inverse(scale: f32) -> f32 {
    if scale > 0.0 { 1.0 / scale } else { 0.0 }
}

/// `v * inverse` rounded to the nearest integer (ties to even) in -127..=127.
#[inline(always)]
fn quantize(v: f32, inverse: f32) -> i8 {
    // The integer is read from the low bits of the shifted sum, as
    // `nearest` leaves it there (an `as` cast saturates, and does not
    // vectorise); a NaN gives some code, under a NaN scale.
    let shifted = (v * inverse).clamp(-127.0, 127.0) + SHIFT;
    shifted.to_bits().wrapping_sub(SHIFT.to_bits()) as i8
}

/// 1.5 * 2^23: a float of magnitude at most 2^22 added to it keeps no bits
/// below the point, and its integer sits in the low bits of the sum.
const SHIFT: f32 = 12_582_912.0;

/// `x` (at most 2^22 in magnitude) rounded to the nearest integer, ties to
/// even: adding and taking away 1.5 * 2^23 leaves no bits below the point,
/// in two instructions where `round_ties_even` may be a library call.
#[inline(always)]
fn nearest(x: f32) -> f32 {
    (x + SHIFT) - SHIFT
}

impl super::gemm::Prepacked for Int8Matrix {
    fn name(&self) -> &'static str {
        "clipdex-int8-dense"
    }

    fn is_reduced(&self) -> bool {
        true
    }

    fn dims(&self) -> (usize, usize) {
        (self.tiles.n, self.tiles.k)
    }

    fn product(&self, x: &[f32], m: usize, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
        let (a, codes) = self.tiles.activations(x, m, quantize_row);
        matmul(&a, &codes, self, bias, f)
    }

    fn product_of(&self, rows: &dyn RowSource, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
        let (a, codes) = self.tiles.activations_of(rows, quantize_row);
        matmul(&a, &codes, self, bias, f)
    }

    /// The weight as quantized, in f32.
    fn unpack(&self) -> candle_core::Result<Tensor> {
        self.tiles.unpack(|o, q| f32::from(q) * self.scales[o])
    }

    fn plain_cell(&self) -> &OnceLock<Tensor> {
        &self.tiles.plain
    }
}

/// `f(x W^T + b)` over the last dimension of `x` (any rank, f32, CPU), with
/// `x` quantized per row.
pub fn dense(
    x: &Tensor,
    w: &Arc<Int8Matrix>,
    bias: Option<&Tensor>,
    f: Pointwise,
) -> candle_core::Result<Tensor> {
    super::gemm::dense_with(x, w.clone(), bias, f)
}

/// `f(x W^T + b)` for `a`, rows of activations quantized with `codes`: a
/// fresh (m x n) buffer.
fn matmul(
    a: &[u8],
    codes: &[Code],
    w: &Int8Matrix,
    bias: Option<&[f32]>,
    f: Pointwise,
) -> Vec<f32> {
    let (m, n) = (codes.len(), w.tiles.n);
    w.tiles.product(a, m, |rows, span, out| {
        let columns = Columns {
            scales: &w.scales[span.clone()],
            sums: &w.sums[span.clone()],
            bias: bias.map(|b| &b[span.clone()]),
        };
        for i in rows {
            // SAFETY: row i across the task's columns: in bounds, this
            // task's own, its sums written by the task.
            let row =
                unsafe { std::slice::from_raw_parts_mut(out.at(i * n + span.start), span.len()) };
            rescale(row, codes[i], &columns);
            if f != Pointwise::Identity {
                epilogue(row, None, f);
            }
        }
    })
}

/// How a row of activations was quantized: value `q` stands for
/// `(q - zero) * scale`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Code {
    scale: f32,
    zero: i32,
}

impl Code {
    /// The code of a row with a value that is not finite: its outputs are
    /// NaN, as in f32.
    const UNDEFINED: Code = Code {
        scale: f32::NAN,
        zero: 0,
    };

    /// The code of a row whose values lie in `lo..=hi` (0 included): 255
    /// steps over the range.
    fn of_range(lo: f32, hi: f32) -> Self {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = (hi - lo) / 255.0;
        if !scale.is_finite() {
            return Code::UNDEFINED;
        }
        if scale == 0.0 {
            return Code::default();
        }
        let zero = nearest((-lo / scale).clamp(0.0, 255.0)) as i32;
        Code { scale, zero }
    }

    /// What to multiply by before adding the zero point.
    fn inverse(self) -> f32 {
        inverse(self.scale)
    }

    /// `v`'s code.
    #[inline(always)]
    fn quantize(self, v: f32, inverse: f32) -> u8 {
        (nearest((v * inverse).clamp(-256.0, 256.0)) as i32 + self.zero).clamp(0, 255) as u8
    }
}

/// Writes `src` quantized with its own code into `dst` (as long), and
/// returns the code.
fn quantize_row(src: &[f32], dst: &mut [u8]) -> Code {
    assert_eq!(src.len(), dst.len());
    // Int8 tile products run only where AVX-512 was found; the
    // check keeps any other caller (a test on another CPU) off AVX-512.
    #[cfg(target_arch = "x86_64")]
    if super::gemm::has_avx512bw() {
        // SAFETY: AVX-512F and BW were detected; `dst` holds src.len() values.
        return unsafe { quantize_row_avx512(src, dst.as_mut_ptr()) };
    }
    quantize_row_with(src, dst)
}

/// [`quantize_row`] one value at a time.
fn quantize_row_with(src: &[f32], dst: &mut [u8]) -> Code {
    let mut range = (0f32, 0f32);
    let mut finite = true;
    for &v in src {
        finite &= v.is_finite();
        range = (range.0.min(v), range.1.max(v));
    }
    let code = match finite {
        true => Code::of_range(range.0, range.1),
        false => Code::UNDEFINED,
    };
    let inverse = code.inverse();
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = code.quantize(v, inverse);
    }
    code
}

/// [`quantize_row`] 16 values at a time.
///
/// # Safety
/// The CPU has AVX-512F and BW; `dst` is valid for `src.len()` writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_row_avx512(src: &[f32], dst: *mut u8) -> Code {
    use std::arch::x86_64::*;
    let whole = src.len() / 16 * 16;
    let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut unordered = 0u16;
    for i in (0..whole).step_by(16) {
        // SAFETY: 16 values from i < whole are in `src`.
        let v = unsafe { _mm512_loadu_ps(src.as_ptr().add(i)) };
        unordered |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        lo = _mm512_min_ps(lo, v);
        hi = _mm512_max_ps(hi, v);
    }
    let (mut lo, mut hi) = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
    let mut finite = unordered == 0;
    for &v in &src[whole..] {
        finite &= v.is_finite();
        (lo, hi) = (lo.min(v), hi.max(v));
    }
    let code = match finite {
        true => Code::of_range(lo, hi),
        false => Code::UNDEFINED,
    };
    let inverse = code.inverse();
    let (by, zero, none) = (
        _mm512_set1_ps(inverse),
        _mm512_set1_epi32(code.zero),
        _mm512_setzero_si512(),
    );
    for i in (0..whole).step_by(16) {
        // SAFETY: 16 values from i < whole are in `src` and `dst`. The
        // conversion rounds to nearest even (the default rounding mode); the
        // codes are clamped below at 0 and saturate at 255.
        unsafe {
            let v = _mm512_loadu_ps(src.as_ptr().add(i));
            let q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, by)), zero);
            let q = _mm512_max_epi32(q, none);
            _mm_storeu_si128(dst.add(i).cast(), _mm512_cvtusepi32_epi8(q));
        }
    }
    for (i, &v) in src.iter().enumerate().skip(whole) {
        // SAFETY: i < src.len().
        unsafe { dst.add(i).write(code.quantize(v, inverse)) };
    }
    code
}

/// What turns a task's columns of sums back into values.
struct Columns<'a> {
    scales: &'a [f32],
    sums: &'a [i32],
    bias: Option<&'a [f32]>,
}

/// Turns a row of i32 sums (as f32 bits) of codes `row` into
/// `(sum - zero * sums[j]) * scale * scales[j] + bias[j]`.
fn rescale(out: &mut [f32], row: Code, columns: &Columns) {
    #[cfg(target_arch = "x86_64")]
    if super::gemm::has_avx512bw() {
        // SAFETY: AVX-512F was detected.
        return unsafe { rescale_avx512(out, row, columns) };
    }
    rescale_with(out, row, columns)
}

/// [`rescale_with`] compiled for AVX-512, where its loops vectorise.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rescale_avx512(out: &mut [f32], row: Code, columns: &Columns) {
    rescale_with(out, row, columns)
}

#[inline(always)]
fn rescale_with(out: &mut [f32], row: Code, columns: &Columns) {
    let Code { scale, zero } = row;
    let value = |v: f32, s: f32, sum: i32| (v.to_bits() as i32 - zero * sum) as f32 * (scale * s);
    match columns.bias {
        Some(b) => {
            for (((o, &s), &sum), &b) in out.iter_mut().zip(columns.scales).zip(columns.sums).zip(b)
            {
                *o = value(*o, s, sum) + b;
            }
        }
        None => {
            for ((o, &s), &sum) in out.iter_mut().zip(columns.scales).zip(columns.sums) {
                *o = value(*o, s, sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gemm::Prepacked;
    use crate::model::test_support::{check_reduced_products, random};

    /// The product as the int8 kernel computes it: both inputs quantized
    /// (weights per column, activations per row), sums in f64.
    fn reference(
        x: &[f32],
        w: &[f32],
        m: usize,
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let qrow = |v: &[f32]| {
            let s = scale_of(v);
            let inv = inverse(s);
            v.iter()
                .map(|&x| f64::from(quantize(x, inv)) * f64::from(s))
                .collect::<Vec<f64>>()
        };
        let qcode = |v: &[f32]| {
            let lo = v.iter().copied().fold(0f32, f32::min);
            let hi = v.iter().copied().fold(0f32, f32::max);
            let code = Code::of_range(lo, hi);
            v.iter()
                .map(|&x| {
                    let q = i32::from(code.quantize(x, code.inverse()));
                    f64::from(q - code.zero) * f64::from(code.scale)
                })
                .collect::<Vec<f64>>()
        };
        let xs: Vec<Vec<f64>> = (0..m).map(|i| qcode(&x[i * k..(i + 1) * k])).collect();
        let ws: Vec<Vec<f64>> = (0..n).map(|o| qrow(&w[o * k..(o + 1) * k])).collect();
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for o in 0..n {
                let s: f64 = xs[i].iter().zip(&ws[o]).map(|(a, b)| a * b).sum();
                y[i * n + o] = s as f32 + bias.map_or(0.0, |b| b[o]);
            }
        }
        y
    }

    #[test]
    fn layout_gives_back_the_quantized_weight() {
        for (n, k) in [(1, 1), (16, 64), (33, 47), (70, 130)] {
            let w = random(&[n, k], 3)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = Int8Matrix::from_rows(&w, n, k);
            let back = m
                .unpack()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for o in 0..n {
                let row = &w[o * k..(o + 1) * k];
                let s = scale_of(row);
                for kk in 0..k {
                    let want = f32::from(quantize(row[kk], inverse(s))) * s;
                    assert_eq!(back[o * k + kk], want, "{n} x {k} at ({o}, {kk})");
                    // Within half a step of the weight.
                    assert!((back[o * k + kk] - row[kk]).abs() <= s * 0.5 + 1e-7);
                }
            }
        }
    }

    #[test]
    fn weights_quantize_as_the_plain_definitions_do() {
        // Steps of a quarter, so that ties (x.5) fall both ways, past the
        // clamp on either side.
        for i in -600..=600 {
            let v = i as f32 / 4.0;
            for inverse in [1.0, 0.5, 1.0 / 3.0, 0.0] {
                let want = (v * inverse).clamp(-127.0, 127.0).round_ties_even() as i8;
                assert_eq!(quantize(v, inverse), want, "{v} x {inverse}");
            }
        }
        let plain = |row: &[f32]| match row.iter().all(|v| v.is_finite()) {
            true => row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0,
            false => f32::NAN,
        };
        let rows: [&[f32]; 7] = [
            &[],
            &[0.0, -0.0],
            &[1.5, -3.25, 2.0],
            &[-1e-40, 1e-39],
            &[f32::MAX, -1.0],
            &[1.0, f32::NEG_INFINITY],
            &[f32::NAN, 2.0],
        ];
        for row in rows {
            let (got, want) = (scale_of(row), plain(row));
            assert!(
                got == want || (got.is_nan() && want.is_nan()),
                "{row:?}: {got} for {want}"
            );
        }
    }

    #[test]
    fn rows_quantize_the_same_both_ways() {
        let x = random(&[3, 100], 7)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let positive: Vec<f32> = x.iter().map(|v| v.abs() + 0.5).collect();
        let rows = x.chunks(100).chain(positive.chunks(37)).chain([
            &[0f32; 20][..],
            &[1.0, f32::NAN, 2.0][..],
            &[f32::INFINITY; 17][..],
        ]);
        for row in rows {
            let (mut fast, mut plain) = (vec![0u8; row.len()], vec![0u8; row.len()]);
            let (a, b) = (
                quantize_row(row, &mut fast),
                quantize_row_with(row, &mut plain),
            );
            assert!(
                a == b || (a.scale.is_nan() && b.scale.is_nan()),
                "{a:?} {b:?}"
            );
            assert_eq!(fast, plain);
            if a.scale.is_finite() {
                // Every value within half a step of its code's value; zero
                // exactly at the zero point.
                for (&v, &q) in row.iter().zip(&fast) {
                    let back = (i32::from(q) - a.zero) as f32 * a.scale;
                    assert!((back - v).abs() <= a.scale * 0.5001, "{v} -> {back}");
                }
            }
        }
    }

    #[test]
    fn products_match_the_quantized_reference() {
        if !available() {
            eprintln!("no AMX-INT8 or AVX512-VNNI here: the int8 kernel is not tested");
            return;
        }
        check_reduced_products(
            |x, w, b, f| {
                let packed = Arc::new(Int8Matrix::new(w).unwrap().unwrap());
                dense(x, &packed, Some(b), f).unwrap()
            },
            |x, w, m, n, k, b| reference(x, w, m, n, k, Some(b)),
        );
    }

    #[test]
    fn a_row_with_a_nan_gives_nans() {
        if !available() {
            return;
        }
        let packed = Arc::new(Int8Matrix::new(&random(&[8, 16], 1)).unwrap().unwrap());
        let mut x = random(&[2, 16], 2)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        x[20] = f32::NAN;
        let x = Tensor::from_vec(x, (2, 16), &candle_core::Device::Cpu).unwrap();
        let y = dense(&x, &packed, None, Pointwise::Identity)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(y[0].iter().all(|v| v.is_finite()));
        assert!(y[1].iter().all(|v| v.is_nan()));
    }
}
