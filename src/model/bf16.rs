//! Dense layers in bf16 on Intel AMX or AVX512-BF16, for `--precision fast`.
//!
//! A weight is rounded to bf16 once, at load, and laid out as AMX tiles
//! ([`Bf16Matrix`]); each product rounds its activations to bf16 and
//! multiplies with `TDPBF16PS`, which accumulates in f32. One such
//! instruction does 16 x 16 x 32 multiply-adds, the work of 512 AVX-512
//! fused multiply-adds. Only the rounding of the two inputs to bf16 (8 bits
//! of mantissa) differs from the f32 product; sums stay f32.
//!
//! AMX is detected at run time (CPUID, and the kernel's permission to use
//! tile data, asked once per process). Without it, CPUs with AVX512-BF16
//! (AMD Zen 4, Intel Cooper Lake) run the same tiles with `VDPBF16PS`, 32
//! multiply-adds of bf16 pairs per instruction into f32 sums ([`super::amx`]).
//! Without either [`Bf16Matrix::new`] returns `None`, and the caller keeps
//! an f32 layer with bf16-rounded weights, so that `fast` embeddings are
//! close to the same wherever they are made.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::Tensor;

use super::amx::{self, Format, TileMatrix};
use super::gemm::{RowSource, epilogue};
use super::ops::Pointwise;
use crate::common::Precision;

/// The kinds of dense layer `--precision fast` can hold in bf16 (and `int8`
/// in int8), for measuring what each costs in fidelity and gains in speed
/// (`cargo bench --bench model -- --precision fast --layers KINDS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    /// The ViT's patch embedding (a convolution as a product over patches).
    PatchEmbedding,
    /// Attention's query, key and value projections.
    Qkv,
    /// Attention's output projection.
    AttentionOut,
    /// The MLP's expansion.
    MlpUp,
    /// The MLP's contraction.
    MlpDown,
    /// The ResNet's stage convolutions.
    Conv,
    /// The final projections into the joint space.
    Projection,
}

impl LayerKind {
    pub const ALL: [LayerKind; 7] = [
        LayerKind::PatchEmbedding,
        LayerKind::Qkv,
        LayerKind::AttentionOut,
        LayerKind::MlpUp,
        LayerKind::MlpDown,
        LayerKind::Conv,
        LayerKind::Projection,
    ];

    /// Whether `fast` converts this kind unless told otherwise: every kind
    /// but the final projections, which are one row per embedding (no time
    /// to win) and feed the scores directly.
    pub fn by_default(self) -> bool {
        self != LayerKind::Projection
    }

    pub fn name(self) -> &'static str {
        match self {
            LayerKind::PatchEmbedding => "patch",
            LayerKind::Qkv => "qkv",
            LayerKind::AttentionOut => "attn-out",
            LayerKind::MlpUp => "mlp-up",
            LayerKind::MlpDown => "mlp-down",
            LayerKind::Conv => "conv",
            LayerKind::Projection => "projection",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    fn bit(self) -> u32 {
        1 << self as u32
    }
}

static CONVERTED: AtomicU32 = AtomicU32::new(u32::MAX);

/// Sets the kinds that layers switched to bf16 afterwards convert (the
/// others stay f32); those [`LayerKind::by_default`] until changed.
pub fn set_converted(kinds: &[LayerKind]) {
    let mask = kinds.iter().fold(0, |m, k| m | k.bit());
    CONVERTED.store(mask, Ordering::Relaxed);
}

static INT8_KINDS: AtomicU32 = AtomicU32::new(u32::MAX);

/// Sets the converted kinds that go to int8 ([`super::int8`]) rather than
/// bf16 under `--precision int8` where the CPU has AMX-INT8 or AVX512-VNNI;
/// every converted kind until changed.
pub fn set_int8(kinds: &[LayerKind]) {
    let mask = kinds.iter().fold(0, |m, k| m | k.bit());
    INT8_KINDS.store(mask, Ordering::Relaxed);
}

/// Whether a converted layer of `kind` goes to int8 rather than bf16.
pub fn int8_for(kind: LayerKind) -> bool {
    match INT8_KINDS.load(Ordering::Relaxed) {
        u32::MAX => true,
        mask => mask & kind.bit() != 0,
    }
}

/// Whether a layer of `kind` goes to bf16 under `--precision fast`.
pub fn converts(kind: LayerKind) -> bool {
    match CONVERTED.load(Ordering::Relaxed) {
        u32::MAX => kind.by_default(),
        mask => mask & kind.bit() != 0,
    }
}

thread_local! {
    static CONVERT_ON_LOAD: std::cell::Cell<Option<Precision>> = const { std::cell::Cell::new(None) };
}

/// Runs `load` with every encoder layer converted to `precision` as soon as
/// it is loaded, so that a reduced model never holds all its weights in f32
/// at once.
pub(super) fn converting_on_load<T>(precision: Precision, load: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CONVERT_ON_LOAD.with(|c| c.set(None));
        }
    }
    CONVERT_ON_LOAD.with(|c| c.set(Some(precision)));
    let _reset = Reset;
    load()
}

/// The precision layers loaded now are converted to at once, if any
/// ([`converting_on_load`]).
pub(super) fn convert_on_load() -> Option<Precision> {
    CONVERT_ON_LOAD.with(|c| c.get())
}

/// `x` rounded to the nearest bf16, ties to even (a NaN stays a NaN).
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return 0x7fc0;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 a bf16 value stands for.
#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// `x` rounded to bf16 and back.
pub fn round(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// Whether this CPU runs bf16 tile products, on AMX or AVX512-BF16 (checked
/// once).
pub fn available() -> bool {
    amx::available(Format::Bf16)
}

/// A weight `W` (out x in) in bf16 for `x W^T`, as AMX `B` tiles
/// ([`amx`]'s layout: each tile row holds, for every column, the pair of
/// weights at depths `2r` and `2r + 1`).
#[derive(Debug)]
pub struct Bf16Matrix(TileMatrix<u16>);

impl Bf16Matrix {
    /// Rounds and lays out an (out, in) f32 weight, or `None` without AMX or
    /// AVX512-BF16.
    pub fn new(weight: &Tensor) -> candle_core::Result<Option<Self>> {
        amx::with_rows(Format::Bf16, weight, Self::from_rows)
    }

    fn from_rows(w: &[f32], n: usize, k: usize) -> Self {
        let (tiles, _) = TileMatrix::new(Format::Bf16, w, n, k, round_row);
        Self(tiles)
    }
}

impl super::gemm::Prepacked for Bf16Matrix {
    fn name(&self) -> &'static str {
        "clipdex-bf16-dense"
    }

    fn is_reduced(&self) -> bool {
        true
    }

    fn dims(&self) -> (usize, usize) {
        (self.0.n, self.0.k)
    }

    fn product(&self, x: &[f32], m: usize, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
        let (a, _) = self.0.activations(x, m, round_row);
        matmul(&a, m, self, bias, f)
    }

    fn product_of(&self, rows: &dyn RowSource, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
        let (a, _) = self.0.activations_of(rows, round_row);
        matmul(&a, rows.count(), self, bias, f)
    }

    /// The weight as rounded to bf16, in f32.
    fn unpack(&self) -> candle_core::Result<Tensor> {
        self.0.unpack(|_, h| from_bf16(h))
    }

    fn plain_cell(&self) -> &OnceLock<Tensor> {
        &self.0.plain
    }
}

/// `f(x W^T + b)` over the last dimension of `x` (any rank, f32, CPU), with
/// `x` rounded to bf16.
pub fn dense(
    x: &Tensor,
    w: &Arc<Bf16Matrix>,
    bias: Option<&Tensor>,
    f: Pointwise,
) -> candle_core::Result<Tensor> {
    super::gemm::dense_with(x, w.clone(), bias, f)
}

/// Writes `src` rounded to bf16 into `dst` (as long).
fn round_row(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len());
    // Tile products run only where AVX-512 was found; the check
    // keeps any other caller (a test on another CPU) off AVX-512.
    #[cfg(target_arch = "x86_64")]
    if super::gemm::has_avx512bw() {
        // SAFETY: AVX-512F and BW were detected; `dst` holds src.len() values.
        return unsafe { round_row_avx512(src, dst.as_mut_ptr()) };
    }
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16(s);
    }
}

/// [`to_bf16`] 16 values at a time.
///
/// # Safety
/// The CPU has AVX-512F and BW; `dst` is valid for `src.len()` writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn round_row_avx512(src: &[f32], dst: *mut u16) {
    use std::arch::x86_64::*;
    let whole = src.len() / 16 * 16;
    let round = _mm512_set1_epi32(0x7fff);
    let one = _mm512_set1_epi32(1);
    let magnitude = _mm512_set1_epi32(0x7fff_ffff);
    let infinity = _mm512_set1_epi32(0x7f80_0000);
    let nan = _mm512_set1_epi32(0x7fc0);
    for i in (0..whole).step_by(16) {
        // SAFETY: 16 values from i < whole are in `src` and `dst`.
        unsafe {
            let b = _mm512_loadu_si512(src.as_ptr().add(i).cast());
            let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), one);
            let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, _mm512_add_epi32(round, odd)));
            let is_nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(b, magnitude), infinity);
            let r = _mm512_mask_mov_epi32(r, is_nan, nan);
            _mm256_storeu_si256(dst.add(i).cast(), _mm512_cvtepi32_epi16(r));
        }
    }
    for (i, &s) in src.iter().enumerate().skip(whole) {
        // SAFETY: i < src.len().
        unsafe { dst.add(i).write(to_bf16(s)) };
    }
}

/// `f(x W^T + b)` for `a`, `m` rows of activations rounded to bf16 in
/// the tiles' depth: a fresh (m x n) buffer.
fn matmul(a: &[u16], m: usize, w: &Bf16Matrix, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
    let w = &w.0;
    let n = w.n;
    w.product(a, m, |rows, span, out| {
        if bias.is_none() && f == Pointwise::Identity {
            return;
        }
        for i in rows {
            // SAFETY: row i across the task's columns: in bounds, this
            // task's own.
            let row =
                unsafe { std::slice::from_raw_parts_mut(out.at(i * n + span.start), span.len()) };
            epilogue(row, bias.map(|b| &b[span.clone()]), f);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gemm::Prepacked;
    use crate::model::test_support::{check_reduced_products, random};

    /// The product as AMX computes it: inputs rounded to bf16, sums in f64.
    fn reference(
        x: &[f32],
        w: &[f32],
        m: usize,
        n: usize,
        k: usize,
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for o in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += f64::from(round(x[i * k + kk])) * f64::from(round(w[o * k + kk]));
                }
                y[i * n + o] = s as f32 + bias.map_or(0.0, |b| b[o]);
            }
        }
        y
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: to even.
        assert_eq!(from_bf16(to_bf16(1.0 + 1.0 / 256.0)), 1.0);
        assert_eq!(from_bf16(to_bf16(1.0 + 3.0 / 256.0)), 1.0 + 4.0 / 256.0);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(-0.0)).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn rows_round_as_each_value_does() {
        let mut values: Vec<f32> = random(&[300], 5)
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v * 100.0)
            .collect();
        let specials = [
            0.0,
            -0.0,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            f32::INFINITY,
        ];
        values.extend(specials);
        values.extend([f32::NEG_INFINITY, f32::MAX, f32::MIN_POSITIVE, f32::NAN]);
        values.extend([1e-39, -1e-40]);
        // Every length to four blocks of 16 and past, from a few offsets:
        // whole blocks, and the values after the last.
        for start in [0, 1, 7, 250] {
            for len in 0..70.min(values.len() - start) {
                let src = &values[start..start + len];
                // Room past the row, which must stay as it was.
                let mut dst = vec![0x5555u16; len + 40];
                round_row(src, &mut dst[..len]);
                assert!(dst[len..].iter().all(|&h| h == 0x5555), "wrote past {len}");
                for (&v, &h) in src.iter().zip(&dst) {
                    assert_eq!(h, to_bf16(v), "{v:e} at length {len}");
                }
            }
        }
    }

    #[test]
    fn layout_gives_back_the_rounded_weight() {
        for (n, k) in [(1, 1), (16, 32), (33, 47), (70, 100)] {
            let w = random(&[n, k], 3)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let m = Bf16Matrix::from_rows(&w, n, k);
            let back = m
                .unpack()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let rounded: Vec<f32> = w.iter().map(|&v| round(v)).collect();
            assert_eq!(back, rounded, "{n} x {k}");
        }
    }

    #[test]
    fn layer_kinds_round_trip_by_name() {
        for kind in LayerKind::ALL {
            assert_eq!(LayerKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(LayerKind::from_name("layernorm"), None);
        let defaults: Vec<_> = LayerKind::ALL
            .into_iter()
            .filter(|k| k.by_default())
            .collect();
        assert_eq!(defaults.len(), LayerKind::ALL.len() - 1);
        assert!(!LayerKind::Projection.by_default());
    }

    #[test]
    fn products_match_the_rounded_reference() {
        if !available() {
            eprintln!("no AMX or AVX512-BF16 here: the bf16 kernel is not tested");
            return;
        }
        check_reduced_products(
            |x, w, b, f| {
                let packed = Arc::new(Bf16Matrix::new(w).unwrap().unwrap());
                dense(x, &packed, Some(b), f).unwrap()
            },
            |x, w, m, n, k, b| reference(x, w, m, n, k, Some(b)),
        );
    }

    #[test]
    fn a_reused_buffer_leaves_nothing_in_the_padded_depth() {
        if !available() {
            return;
        }
        // Rows of NaN across 64 depths, then a product of 40 depths on the
        // same thread, in the same reused buffer: its depths 40 to 63 are
        // read against zero weights, and a NaN left there would spread.
        let nan = Tensor::full(f32::NAN, (4, 64), &candle_core::Device::Cpu).unwrap();
        let wide = Arc::new(Bf16Matrix::new(&random(&[8, 64], 1)).unwrap().unwrap());
        dense(&nan, &wide, None, Pointwise::Identity).unwrap();
        let x = random(&[4, 40], 2);
        let w = random(&[8, 40], 3);
        let packed = Arc::new(Bf16Matrix::new(&w).unwrap().unwrap());
        let y = dense(&x, &packed, None, Pointwise::Identity)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (got, want) in y.iter().zip(reference(&x, &w, 4, 8, 40, None)) {
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{got} for {want}"
            );
        }
    }

    #[test]
    fn a_wrong_input_width_is_an_error() {
        if !available() {
            return;
        }
        let packed = Arc::new(Bf16Matrix::new(&random(&[8, 16], 1)).unwrap().unwrap());
        assert!(dense(&random(&[2, 15], 2), &packed, None, Pointwise::Identity).is_err());
    }
}
