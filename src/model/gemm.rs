//! Dense layers' matrix products for inference, with weights packed once at
//! load.
//!
//! A general matrix multiply (candle's, through the `gemm` crate) repacks the
//! weight matrix on every call. For the products of one image or one text
//! query (10 to 200 rows against 768 x 3072 weights) that repacking is as much
//! work as the arithmetic, and it ran at a third to a half of the speed of
//! large products (`cargo bench --bench model -- --only gemm`). Here the
//! weights are laid out at load the way the kernel reads them: panels of
//! [`NR`] output columns, each `in x NR` contiguous, zero-padded. A call then
//! packs only the small activation matrix, the kernel streams each weight
//! once per block of [`MC`] rows, and the bias and activation are applied to
//! each output tile while it is still in L1.
//!
//! The kernel is AVX-512, or AVX2 with FMA on CPUs without AVX-512 (AMD
//! before Zen 4, Intel client cores), detected at run time. Where the CPU
//! has neither, [`PackedMatrix::new`] returns `None` and the layer keeps
//! candle's product, so results are the same everywhere up to rounding.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::ops::Pointwise;

/// Output columns per panel: two AVX-512 registers.
pub const NR: usize = 32;
/// Rows per kernel call (12 x 2 accumulators, 2 weight registers and a
/// broadcast: 27 of the 32 registers).
pub const MR: usize = 12;
/// Most rows per block: the packed activations of one block (`MC x KC`, 768
/// KB) stay in L2 while every weight panel of a task passes over them, and
/// each weight is read from memory once per block (192 rows per block made
/// 16 ViT-B/32 images 5% slower).
pub const MC: usize = 192;
/// Depth per block: one panel's slice of weights (`KC x NR`, 32 KB) stays in
/// L1 while the block's row panels pass over it.
pub const KC: usize = 256;
/// Rows from which a product goes through [`matmul_unpacked`] where the CPU
/// has AVX-512 and AMX (the Intel machine where the `gemm` crate measured 5
/// to 10% faster there). Elsewhere the packed kernel stays ahead at every
/// size: with AVX2, 160 against 112 GFLOP/s at 800 rows; on AMD Zen 4,
/// whose `clipdex index` at batch 16 (800 rows a product) took 26.3 and
/// 23.9 s against 31.0 and 28.2 through the `gemm` crate, whose threads
/// split a product evenly in advance and wait for the one a decode worker
/// slowed, where the packed kernel's tasks are taken in turn.
pub const UNPACK_ROWS: usize = 512;
/// Panels per task when there are rows enough to share out: 1,024 columns.
const TASK_PANELS: usize = 32;

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the packed kernel off for layers loaded afterwards (they keep
/// candle's product), to measure one against the other in one run.
pub fn set_enabled(enabled: bool) {
    DISABLED.store(!enabled, Ordering::Relaxed);
}

/// Whether layers loaded now get packed weights: the CPU has AVX-512 or
/// AVX2 with FMA, and nothing turned it off.
pub fn available() -> bool {
    !DISABLED.load(Ordering::Relaxed) && (has_avx512f() || has_avx2())
}

/// Whether `--precision fast` layers get bf16 panels ([`PackedMatrix::bf16`]):
/// the CPU has AVX2 and FMA but no AVX-512, and nothing turned the packed
/// kernels off.
pub fn bf16_panels() -> bool {
    <u16 as Element>::available()
}

/// Whether this CPU runs AVX-512F (detected once, then cached).
pub(super) fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU runs AVX2 and FMA (detected once, then cached).
pub(super) fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight matrix `W` (out x in) stored for `x W^T`: `ceil(out / NR)` panels,
/// each `in` rows of `NR` columns, in f32 or, for `--precision fast` where
/// the CPU has no AMX, in bf16 ([`Element`]).
#[derive(Debug)]
pub struct PackedMatrix<T = f32> {
    /// Input features, the product's depth.
    k: usize,
    /// Output features.
    n: usize,
    data: Vec<T>,
    /// The weight as (in, out) for candle's product, made the first time a
    /// training graph runs through this frozen layer (`Prepacked::plain`).
    plain: std::sync::OnceLock<Tensor>,
}

impl PackedMatrix<f32> {
    /// Packs an (out, in) f32 weight, or `None` where the kernel cannot run
    /// (neither AVX-512 nor AVX2, another dtype or device).
    pub fn new(weight: &Tensor) -> candle_core::Result<Option<Self>> {
        Self::pack(weight)
    }
}

impl PackedMatrix<u16> {
    /// Rounds an (out, in) f32 weight to bf16 and packs it, or `None` where
    /// the kernel does not run (see [`bf16_panels`], another dtype or
    /// device): half the bytes of f32 to hold and to stream for a short
    /// query, the same rounding of the weights as bf16 on AMX, and products
    /// summed in f32 from f32 activations.
    pub fn bf16(weight: &Tensor) -> candle_core::Result<Option<Self>> {
        Self::pack(weight)
    }
}

impl<T: Element> PackedMatrix<T> {
    fn pack(weight: &Tensor) -> candle_core::Result<Option<Self>> {
        if !T::available() || weight.dtype() != candle_core::DType::F32 || !weight.device().is_cpu()
        {
            return Ok(None);
        }
        super::amx::f32_rows(weight, |w, n, k| {
            let panels = n.div_ceil(NR);
            let mut data = vec![T::default(); panels * k * NR];
            // A panel row at a time (NR contiguous values, one from each
            // weight row): each cache line of the weight rows serves 16
            // panel rows from level 1, where filling a column at a time
            // passed the whole panel (98 KB in f32) through level 2 once
            // per weight row.
            if k > 0 {
                data.par_chunks_mut(k * NR)
                    .enumerate()
                    .for_each(|(p, panel)| {
                        let rows = &w[p * NR * k..(p * NR + NR.min(n - p * NR)) * k];
                        for (kk, out) in panel.chunks_exact_mut(NR).enumerate() {
                            for (j, row) in rows.chunks_exact(k).enumerate() {
                                out[T::slot(j)] = T::from_f32(row[kk]);
                            }
                        }
                    });
            }
            Self {
                k,
                n,
                data,
                plain: Default::default(),
            }
        })
        .map(Some)
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// What a panel holds per weight, and the kernel that reads it.
pub trait Element: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// The custom op's name.
    const NAME: &'static str;
    /// Whether the weights are rounded (`--precision fast`).
    const REDUCED: bool;
    /// Whether this CPU runs the kernel and nothing turned it off.
    fn available() -> bool;
    /// Where column `j` (0 to NR) of a panel row is stored in the row.
    fn slot(j: usize) -> usize;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
    /// Columns of a panel one kernel call covers.
    fn width() -> usize;
    /// Whether a product of [`UNPACK_ROWS`] rows or more goes through the
    /// `gemm` crate with the weights unpacked.
    fn unpacks() -> bool;
    /// [`kernel`] for this element.
    ///
    /// # Safety
    /// As [`kernel`].
    #[allow(clippy::too_many_arguments)] // as `kernel`
    unsafe fn kernel(
        mr: usize,
        kc: usize,
        a: &[f32],
        b: &[Self],
        c: *mut f32,
        ldc: usize,
        ncols: usize,
        accumulate: bool,
    );
    /// Writes rows of a panel (`b`, NR values each) to `out` as f32 in
    /// column order, for [`f32`]'s kernel.
    fn widen(b: &[Self], out: &mut [f32]) {
        assert!(b.len() == out.len() && b.len().is_multiple_of(NR));
        for (b, out) in b.chunks_exact(NR).zip(out.chunks_exact_mut(NR)) {
            for (j, o) in out.iter_mut().enumerate() {
                *o = b[Self::slot(j)].to_f32();
            }
        }
    }
    /// The 16 columns of one panel row's run at `b`, as two registers of 8.
    ///
    /// # Safety
    /// `b` is valid for 16 values; AVX2 is present.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(b: *const Self) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256);
}

impl Element for f32 {
    const NAME: &'static str = "clipdex-packed-dense";
    const REDUCED: bool = false;

    fn available() -> bool {
        available()
    }

    #[inline(always)]
    fn slot(j: usize) -> usize {
        j
    }

    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn width() -> usize {
        kernel_width()
    }

    /// Where the CPU has AMX (and so AVX-512).
    fn unpacks() -> bool {
        super::amx::engine(super::amx::Format::Bf16) == Some(super::amx::Engine::Amx)
    }

    unsafe fn kernel(
        mr: usize,
        kc: usize,
        a: &[f32],
        b: &[Self],
        c: *mut f32,
        ldc: usize,
        ncols: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller's.
        unsafe { kernel(mr, kc, a, b, c, ldc, ncols, accumulate) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(b: *const Self) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's.
        unsafe { (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8))) }
    }
}

/// bf16, as its upper 16 bits of an f32. In each run of 16 columns of a
/// panel row, columns `i` and `i + 8` share the 32 bits at `2 i`, so that a
/// shift and a mask turn one 256-bit load into both registers.
impl Element for u16 {
    const NAME: &'static str = "clipdex-bf16-panels";
    const REDUCED: bool = true;

    /// On AVX2 without AVX-512: where AVX-512 runs the f32 kernel twice as
    /// wide, this 16-column kernel is not measured to be faster.
    fn available() -> bool {
        !DISABLED.load(Ordering::Relaxed) && has_avx2() && !has_avx512f()
    }

    #[inline(always)]
    fn slot(j: usize) -> usize {
        j / 16 * 16 + 2 * (j % 8) + j % 16 / 8
    }

    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        super::bf16::to_bf16(v)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        super::bf16::from_bf16(self)
    }

    fn width() -> usize {
        16
    }

    fn unpacks() -> bool {
        false
    }

    /// 16 columns at a time with AVX2, which every bf16 panel was packed on.
    #[cfg(target_arch = "x86_64")]
    fn widen(b: &[Self], out: &mut [f32]) {
        assert!(b.len() == out.len() && b.len().is_multiple_of(16));
        for (b, out) in b.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
            // SAFETY: 16 values each side; bf16 panels exist only where AVX2
            // was detected (`available`).
            unsafe { avx2::widen16(b.as_ptr(), out.as_mut_ptr()) };
        }
    }

    unsafe fn kernel(
        mr: usize,
        kc: usize,
        a: &[f32],
        b: &[Self],
        c: *mut f32,
        ldc: usize,
        ncols: usize,
        accumulate: bool,
    ) {
        debug_assert!(a.len() >= kc * mr && b.len() >= (kc - 1) * NR + ncols && ncols <= 16);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller's; AVX2 was checked when the weights were packed.
        unsafe {
            avx2::tiles(mr, kc, a.as_ptr(), b.as_ptr(), c, ldc, ncols, accumulate)
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("bf16 panels need AVX2")
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(b: *const Self) -> (std::arch::x86_64::__m256, std::arch::x86_64::__m256) {
        use std::arch::x86_64::*;
        // SAFETY: the caller's.
        unsafe {
            let v = _mm256_loadu_si256(b.cast());
            let low = _mm256_slli_epi32::<16>(v);
            let high = _mm256_and_si256(v, _mm256_set1_epi32(0xffff_0000_u32 as i32));
            (_mm256_castsi256_ps(low), _mm256_castsi256_ps(high))
        }
    }
}

/// Rows of a product's input made on demand, each `width` values: for a
/// layer whose input would be far larger than what it is made from (a
/// convolution's patches repeat each pixel k x k times).
pub trait RowSource: Sync {
    /// How many rows.
    fn count(&self) -> usize;
    /// Values per row.
    fn width(&self) -> usize;
    /// Writes row `r` into `dst` (`width` long), every value of it.
    fn write(&self, r: usize, dst: &mut [f32]);
    /// Every row in one (count x width) buffer, made on the pool.
    fn gather(&self) -> Vec<f32> {
        // Rows per task.
        const ROWS: usize = 16;
        let width = self.width().max(1);
        let mut x = vec![0f32; self.count() * width];
        x.par_chunks_mut(ROWS * width)
            .enumerate()
            .for_each(|(b, rows)| {
                for (r, dst) in rows.chunks_exact_mut(width).enumerate() {
                    self.write(b * ROWS + r, dst);
                }
            });
        x
    }
}

/// A weight laid out once at load for one inference kernel: this module's
/// f32 or bf16 panels, or `bf16`'s and `int8`'s AMX tiles. Dense layers hold
/// any of them as one.
pub trait Prepacked: std::fmt::Debug + Send + Sync {
    /// The custom op's name.
    fn name(&self) -> &'static str;
    /// Whether products run in reduced precision (bf16 or int8, `--precision
    /// fast`).
    fn is_reduced(&self) -> bool {
        false
    }
    /// (out, in).
    fn dims(&self) -> (usize, usize);
    /// `f(x W^T + b)` for `x` (m x in, row-major): a fresh (m x out) buffer.
    fn product(&self, x: &[f32], m: usize, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32>;
    /// [`Self::product`] of rows made on demand (a convolution's patches):
    /// each layout packs or converts a row as it is made, so the f32 rows
    /// never exist together.
    fn product_of(&self, rows: &dyn RowSource, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32>;
    /// The (out, in) weight back as a tensor, as the kernel holds it.
    fn unpack(&self) -> candle_core::Result<Tensor>;
    /// Where [`Self::plain`] keeps its tensor.
    fn plain_cell(&self) -> &std::sync::OnceLock<Tensor>;
    /// The weight as an (in, out) view for candle's product, unpacked once:
    /// for a frozen layer inside a training graph, where the product needs a
    /// backward pass for its input.
    fn plain(&self) -> candle_core::Result<Tensor> {
        if let Some(t) = self.plain_cell().get() {
            return Ok(t.clone());
        }
        let t = self.unpack()?.t()?;
        Ok(self.plain_cell().get_or_init(|| t).clone())
    }
}

impl<T: Element> Prepacked for PackedMatrix<T> {
    fn name(&self) -> &'static str {
        T::NAME
    }

    fn is_reduced(&self) -> bool {
        T::REDUCED
    }

    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn product(&self, x: &[f32], m: usize, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
        matmul(Input::Stored(x, m), self, bias, f)
    }

    /// Packs each row as it is made, a kernel panel's rows at a time, so the
    /// rows never exist together unpacked.
    fn product_of(&self, rows: &dyn RowSource, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
        matmul(Input::Made(rows), self, bias, f)
    }

    fn unpack(&self) -> candle_core::Result<Tensor> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        for (o, row) in w.chunks_exact_mut(k).enumerate() {
            let panel = &self.data[(o / NR) * k * NR..];
            let slot = T::slot(o % NR);
            for (kk, v) in row.iter_mut().enumerate() {
                *v = panel[kk * NR + slot].to_f32();
            }
        }
        Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu)
    }

    fn plain_cell(&self) -> &std::sync::OnceLock<Tensor> {
        &self.plain
    }
}

/// `f(x W^T + b)` over the last dimension of `x` (any rank, f32, CPU).
pub fn dense(
    x: &Tensor,
    w: &Arc<PackedMatrix>,
    bias: Option<&Tensor>,
    f: Pointwise,
) -> candle_core::Result<Tensor> {
    dense_with(x, w.clone(), bias, f)
}

/// [`dense`] for any prepacked weight.
pub(super) fn dense_with(
    x: &Tensor,
    w: Arc<dyn Prepacked>,
    bias: Option<&Tensor>,
    f: Pointwise,
) -> candle_core::Result<Tensor> {
    let bias = match bias {
        Some(b) => Some(b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    x.contiguous()?.apply_op1_no_bwd(&Dense { w, bias, f })
}

struct Dense {
    w: Arc<dyn Prepacked>,
    bias: Option<Vec<f32>>,
    f: Pointwise,
}

impl CustomOp1 for Dense {
    fn name(&self) -> &'static str {
        self.w.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::ops::slice(s, l, self.name())?;
        let dims = l.shape().dims();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("{}: a scalar input", self.name());
        };
        let (n, want) = self.w.dims();
        if k != want {
            candle_core::bail!("{}: input has {k} features, the weight {want}", self.name());
        }
        let m: usize = lead.iter().product();
        let y = self.w.product(x, m, self.bias.as_deref(), self.f);
        let mut out = lead.to_vec();
        out.push(n);
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// A raw output pointer tasks share; each writes its own rows and columns
/// (of f32 products here and in `bf16`, of bf16 activations, of attention
/// heads in `ops`).
pub(super) struct Out<T = f32>(pub(super) *mut T);

impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Out<T> {}
// SAFETY: tasks write disjoint parts of one buffer that outlives them.
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// The element at `offset` (a method, so closures capture the `Out`, not
    /// its bare pointer).
    ///
    /// # Safety
    /// `offset` is inside the buffer.
    pub(super) unsafe fn at(self, offset: usize) -> *mut T {
        unsafe { self.0.add(offset) }
    }
}

/// A product's input rows.
#[derive(Clone, Copy)]
enum Input<'a> {
    /// `m` rows of `k`, row-major.
    Stored(&'a [f32], usize),
    /// Rows made on demand.
    Made(&'a dyn RowSource),
}

impl Input<'_> {
    fn rows(&self) -> usize {
        match self {
            Self::Stored(_, m) => *m,
            Self::Made(rows) => rows.count(),
        }
    }
}

/// `f(x W^T + b)` for `x` (m x k): a fresh (m x n) buffer.
fn matmul<T: Element>(
    x: Input,
    w: &PackedMatrix<T>,
    bias: Option<&[f32]>,
    f: Pointwise,
) -> Vec<f32> {
    let (m, n) = (x.rows(), w.n);
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    if m == 0 || n == 0 {
        return y;
    }
    if w.k == 0 {
        y.resize(m * n, 0.0);
        for row in y.chunks_exact_mut(n) {
            epilogue(row, bias, f);
        }
        return y;
    }
    if m >= UNPACK_ROWS && T::unpacks() {
        return match x {
            Input::Stored(x, _) => matmul_unpacked(x, m, w, bias, f),
            Input::Made(rows) => matmul_unpacked(&rows.gather(), m, w, bias, f),
        };
    }
    // Tasks: blocks of rows by ranges of panels, enough of them to share out
    // and sized so that a task's weights stay in L2.
    let threads = rayon::current_num_threads().max(1);
    // Blocks of at most MC rows, as even as whole kernel tiles allow.
    let mc = m.div_ceil(m.div_ceil(MC)).next_multiple_of(MR);
    let m_blocks = m.div_ceil(mc);
    let panels = w.panels();
    let mut chunks = panels.div_ceil(TASK_PANELS);
    if m_blocks * chunks < 4 * threads {
        chunks = chunks.div_ceil(threads) * threads;
    }
    let chunks = chunks.clamp(1, panels);
    // Several tasks read each row block: pack the rows once for all of them.
    // Otherwise each task packs its own block into a buffer that stays in L2
    // (for a convolution's 50,000 rows by 64 columns, packing them all first
    // costs as much memory traffic as the product).
    let shared = (chunks > 1).then(|| pack_rows(x, w.k));
    let out = Out(y.as_mut_ptr());
    (0..m_blocks * chunks).into_par_iter().for_each(|t| {
        let (mb, chunk) = (t / chunks, t % chunks);
        let rows = mb * mc..(m.min((mb + 1) * mc));
        let first = chunk * panels / chunks;
        let last = (chunk + 1) * panels / chunks;
        let a = match (&shared, x) {
            (Some(packed), _) => Rows::Shared { packed, m },
            (None, Input::Stored(x, _)) => Rows::Own(x),
            (None, Input::Made(rows)) => Rows::Made(rows),
        };
        // SAFETY: the task writes rows `rows` x panels `first..last` only, all
        // inside the m x n buffer, and no other task writes them.
        unsafe { task(a, w, rows, first..last, bias, f, out) };
    });
    // SAFETY: the tasks wrote every element (each k block stores its tiles,
    // the first without reading them).
    unsafe { y.set_len(m * n) };
    y
}

/// `f(x W^T + b)` through the `gemm` crate (candle's product), with the
/// weights unpacked to (in, out) for the call: from [`UNPACK_ROWS`] rows its
/// kernel was 5 to 10% faster than the tile kernel on the Intel machine with
/// AMX ([`Element::unpacks`]), and unpacking (one copy of
/// each 32-column run) costs under 2% of such a product.
fn matmul_unpacked<T: Element>(
    x: &[f32],
    m: usize,
    w: &PackedMatrix<T>,
    bias: Option<&[f32]>,
    f: Pointwise,
) -> Vec<f32> {
    let (k, n) = (w.k, w.n);
    let mut b: Vec<f32> = Vec::with_capacity(k * n);
    b.spare_capacity_mut()
        .par_chunks_mut(n)
        .enumerate()
        .for_each(|(kk, row)| {
            for (p, cols) in row.chunks_mut(NR).enumerate() {
                let src = &w.data[p * k * NR + kk * NR..][..NR];
                for (j, o) in cols.iter_mut().enumerate() {
                    o.write(src[T::slot(j)].to_f32());
                }
            }
        });
    // SAFETY: every row of B was written above.
    unsafe { b.set_len(k * n) };
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    // SAFETY: y has room for m x n (written, not read); x is m x k and b is
    // k x n, row-major.
    unsafe {
        super::ops::gemm_f32_raw((m, n, k), y.as_mut_ptr(), false, x, (k, 1), &b, (n, 1));
        y.set_len(m * n);
    }
    if bias.is_some() || f != Pointwise::Identity {
        let rows_per_task = (8192 / n).max(1);
        y.par_chunks_mut(rows_per_task * n).for_each(|chunk| {
            for row in chunk.chunks_exact_mut(n) {
                epilogue(row, bias, f);
            }
        });
    }
    y
}

/// Where a task finds its packed rows.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// All `m` rows, packed by [`pack_rows`].
    Shared { packed: &'a [f32], m: usize },
    /// The unpacked input, for the task to pack its own block.
    Own(&'a [f32]),
    /// Rows made on demand, for the task to make and pack its own block.
    Made(&'a dyn RowSource),
}

thread_local! {
    /// A task's own packed block of rows ([`Rows::Own`]), reused across calls.
    /// Tasks run no parallel work inside, so no borrow of it nests.
    static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A task's k block of one panel widened to f32 ([`Element::widen`]),
    /// reused across panels and calls.
    static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// One kernel panel of rows made whole ([`pack_made`]), reused.
    static MADE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One task: `rows` of the output by the columns of `panels`, over the whole
/// depth in blocks of [`KC`].
///
/// # Safety
/// `out` points at an m x n buffer that `rows` and `panels` lie within, and no
/// other thread touches those elements meanwhile.
unsafe fn task<T: Element>(
    a: Rows,
    w: &PackedMatrix<T>,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    f: Pointwise,
    out: Out,
) {
    let (k, n) = (w.k, w.n);
    let mb = rows.len();
    let width = T::width();
    // Reduced weights are widened in the kernel for one row panel (a query:
    // each weight is used once per panel, straight from memory), and once
    // per k block of a panel for more, where the f32 kernel then runs
    // without the widening's extra instructions (12% of batch 16's time).
    let widen = T::REDUCED && mb > MR;
    BLOCK.with_borrow_mut(|own| {
        WIDE.with_borrow_mut(|wide| {
            if widen && wide.len() < KC * NR {
                wide.resize(KC * NR, 0.0);
            }
            if let Rows::Made(source) = a {
                // Every k block of the task's rows, made and packed at once:
                // block k0 at k0 * mb.
                if own.len() < mb * k {
                    own.resize(mb * k, 0.0);
                }
                let packed = Out(own.as_mut_ptr());
                // SAFETY: block k0 of the mb rows is mb * kc values at
                // k0 * mb, inside the mb x k buffer.
                unsafe { pack_made(source, rows.clone(), k, packed, |k0| k0 * mb) };
            }
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                // The block's packed rows, and the row of the output its first is.
                let (block, base) = match a {
                    Rows::Shared { packed, m } => (&packed[k0 * m..(k0 + kc) * m], 0),
                    Rows::Own(x) => {
                        if own.len() < mb * kc {
                            own.resize(mb * kc, 0.0);
                        }
                        pack_block(x, k, rows.clone(), k0, kc, &mut own[..mb * kc]);
                        (&own[..mb * kc], rows.start)
                    }
                    Rows::Made(_) => (&own[k0 * mb..(k0 + kc) * mb], rows.start),
                };
                let last_block = k0 + kc == k;
                for p in panels.clone() {
                    let col0 = p * NR;
                    let ncols = NR.min(n - col0);
                    let b = &w.data[p * k * NR + k0 * NR..p * k * NR + (k0 + kc) * NR];
                    if widen {
                        T::widen(b, &mut wide[..kc * NR]);
                    }
                    // The kernel's columns at a time, each run of them passing
                    // over all the rows while its weights stay in L1.
                    for c0 in (0..ncols).step_by(width) {
                        let cols = width.min(ncols - c0);
                        let col = col0 + c0;
                        for r0 in (0..mb).step_by(MR) {
                            let mr = MR.min(mb - r0);
                            let row = rows.start + r0;
                            let a = &block[(row - base) * kc..(row - base + mr) * kc];
                            // SAFETY: the caller's bounds; `a` holds kc x mr values
                            // and `b` kc rows of NR from column c0.
                            let c = unsafe { out.at(row * n + col) };
                            match widen {
                                true => unsafe {
                                    f32::kernel(mr, kc, a, &wide[c0..kc * NR], c, n, cols, k0 > 0)
                                },
                                false => unsafe {
                                    T::kernel(mr, kc, a, &b[c0..], c, n, cols, k0 > 0)
                                },
                            }
                            if last_block && (bias.is_some() || f != Pointwise::Identity) {
                                let bias = bias.map(|b| &b[col..col + cols]);
                                // SAFETY: the tile's mr rows of cols, in bounds.
                                unsafe { epilogue_tile(c, n, mr, cols, bias, f) };
                            }
                        }
                    }
                }
            }
        })
    });
}

/// `x` (m x k) packed for the kernel, once per product: for each block of
/// [`KC`] columns (at `k0 * m`), the block's rows as [`pack_block`] lays
/// them out. Row panels start at multiples of MR, as tasks' row blocks do.
fn pack_rows(x: Input, k: usize) -> Vec<f32> {
    let m = x.rows();
    let mut packed: Vec<f32> = Vec::with_capacity(m * k);
    let out = Out(packed.as_mut_ptr());
    // Parallel in blocks of whole row panels, so that panels start at
    // multiples of MR as the tasks' do.
    const ROWS: usize = 16 * MR;
    (0..m.div_ceil(ROWS)).into_par_iter().for_each(|mb| {
        let rows = mb * ROWS..m.min((mb + 1) * ROWS);
        let x = match x {
            Input::Stored(x, _) => x,
            Input::Made(source) => {
                let first = rows.start;
                let kc = |k0: usize| KC.min(k - k0);
                // SAFETY: block k0 of these rows is `rows.len() * kc` values
                // at `k0 * m + first * kc`, inside the m x k buffer, and only
                // this task writes them.
                unsafe { pack_made(source, rows, k, out, |k0| k0 * m + first * kc(k0)) };
                return;
            }
        };
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            // SAFETY: rows `rows` of block `k0` are `rows.len() * kc` values
            // at `k0 * m + rows.start * kc`, inside the m x k buffer, and only
            // this task writes them.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out.at(k0 * m + rows.start * kc), rows.len() * kc)
            };
            pack_block(x, k, rows.clone(), k0, kc, dst);
        }
    });
    // SAFETY: the blocks cover all m x k values.
    unsafe { packed.set_len(m * k) };
    packed
}

/// Rows `rows` of `source` packed for the kernel over the whole depth `k`:
/// block k0 of them (`rows.len() * kc` values, as [`pack_block`] lays them
/// out) at `out + at(k0)`. Each kernel panel's rows are made together in a
/// scratch that stays in cache, then packed.
///
/// # Safety
/// For every k0, `rows.len() * kc` values from `out + at(k0)` are inside one
/// buffer, and nothing else touches them meanwhile.
unsafe fn pack_made(
    source: &dyn RowSource,
    rows: std::ops::Range<usize>,
    k: usize,
    out: Out,
    at: impl Fn(usize) -> usize,
) {
    MADE.with_borrow_mut(|made| {
        if made.len() < MR * k {
            made.resize(MR * k, 0.0);
        }
        let mb = rows.len();
        for r0 in (0..mb).step_by(MR) {
            let mr = MR.min(mb - r0);
            for (i, dst) in made[..mr * k].chunks_exact_mut(k).enumerate() {
                source.write(rows.start + r0 + i, dst);
            }
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                // SAFETY: the panel's mr rows of block k0 lie at r0 * kc
                // within the block, inside it (the caller's bounds).
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.at(at(k0) + r0 * kc), mr * kc) };
                pack_block(made, k, 0..mr, k0, kc, dst);
            }
        }
    });
}

/// Packs `x[rows, k0..k0 + kc]` into `dst` as panels of [`MR`] rows (the
/// last one shorter), each kc steps of its rows' values side by side.
fn pack_block(
    x: &[f32],
    k: usize,
    rows: std::ops::Range<usize>,
    k0: usize,
    kc: usize,
    dst: &mut [f32],
) {
    let mb = rows.len();
    for r0 in (0..mb).step_by(MR) {
        let mr = MR.min(mb - r0);
        let panel = &mut dst[r0 * kc..(r0 + mr) * kc];
        #[cfg(target_arch = "x86_64")]
        if mr == MR {
            let base = &x[(rows.start + r0) * k + k0..];
            // SAFETY: MR rows of kc values from `base`, `k` apart, lie in `x`
            // (the last row ends `kc` in), and the panel holds MR * kc.
            unsafe { sse::pack_panel(base.as_ptr(), k, kc, panel.as_mut_ptr()) };
            continue;
        }
        // Written in order, read from mr rows side by side.
        let src: [&[f32]; MR] = std::array::from_fn(|i| {
            let row = rows.start + r0 + i.min(mr - 1);
            &x[row * k + k0..][..kc]
        });
        for (kk, out) in panel.chunks_exact_mut(mr).enumerate() {
            for (o, s) in out.iter_mut().zip(&src) {
                *o = s[kk];
            }
        }
    }
}

/// `row = f(row + bias)`.
#[inline]
pub(super) fn epilogue(row: &mut [f32], bias: Option<&[f32]>, f: Pointwise) {
    let cols = row.len();
    // SAFETY: one row of `cols` values, the slice's own.
    unsafe { epilogue_tile(row.as_mut_ptr(), cols, 1, cols, bias, f) }
}

/// `rows` rows of `cols` values, `ld` apart from `c`.
#[derive(Clone, Copy)]
struct Tile {
    c: *mut f32,
    ld: usize,
    rows: usize,
    cols: usize,
}

/// [`epilogue`] over `rows` rows of `cols` values, `ld` apart from `c` (a
/// kernel's tile): the CPU check once for all of them, not once a row
/// (for a convolution of depth 64 the per-row calls cost a fifth as much as
/// the tile's products).
///
/// # Safety
/// `c` is valid for those rows, and nothing else touches them meanwhile.
pub(super) unsafe fn epilogue_tile(
    c: *mut f32,
    ld: usize,
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
    f: Pointwise,
) {
    let tile = Tile { c, ld, rows, cols };
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512bw() {
            // SAFETY: AVX-512F was detected; the caller's bounds.
            return unsafe { epilogue_avx512(tile, bias, f) };
        }
        if has_avx2() {
            // SAFETY: AVX2 and FMA were detected; the caller's bounds.
            return unsafe { epilogue_avx2(tile, bias, f) };
        }
    }
    // SAFETY: the caller's bounds.
    unsafe { epilogue_rows(tile, bias, f) }
}

/// Whether this CPU runs AVX-512F and BW (detected once, then cached).
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512bw() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// [`epilogue_rows`] compiled for AVX-512, where its loops vectorise.
///
/// # Safety
/// The CPU has AVX-512F; as [`epilogue_tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn epilogue_avx512(tile: Tile, bias: Option<&[f32]>, f: Pointwise) {
    // SAFETY: the caller's.
    unsafe { epilogue_rows(tile, bias, f) }
}

/// [`epilogue_rows`] compiled for AVX2, where its loops vectorise.
///
/// # Safety
/// The CPU has AVX2 and FMA; as [`epilogue_tile`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn epilogue_avx2(tile: Tile, bias: Option<&[f32]>, f: Pointwise) {
    // SAFETY: the caller's.
    unsafe { epilogue_rows(tile, bias, f) }
}

/// [`epilogue_with`] on each row of a tile.
///
/// # Safety
/// As [`epilogue_tile`].
#[inline(always)]
unsafe fn epilogue_rows(tile: Tile, bias: Option<&[f32]>, f: Pointwise) {
    let Tile { c, ld, rows, cols } = tile;
    for i in 0..rows {
        // SAFETY: row i, `cols` values, inside the tile (the caller's bounds).
        let row = unsafe { std::slice::from_raw_parts_mut(c.add(i * ld), cols) };
        epilogue_with(row, bias, f);
    }
}

/// One loop per activation (the match outside it), each with no call inside.
#[inline(always)]
fn epilogue_with(row: &mut [f32], bias: Option<&[f32]>, f: Pointwise) {
    #[inline(always)]
    fn each(row: &mut [f32], bias: Option<&[f32]>, g: impl Fn(f32) -> f32) {
        match bias {
            Some(b) => {
                for (o, &b) in row.iter_mut().zip(b) {
                    *o = g(*o + b);
                }
            }
            None => {
                for o in row.iter_mut() {
                    *o = g(*o);
                }
            }
        }
    }
    match f {
        Pointwise::Identity => each(row, bias, |v| v),
        Pointwise::GeluTanh => each(row, bias, |v| Pointwise::GeluTanh.apply(v)),
        Pointwise::GeluErf => each(row, bias, |v| Pointwise::GeluErf.apply(v)),
        Pointwise::QuickGelu => each(row, bias, |v| Pointwise::QuickGelu.apply(v)),
        Pointwise::Relu => each(row, bias, |v| v.max(0.0)),
    }
}

/// `n` split into the fewest runs of at most `most` (positive), as even as
/// can be: (start, length) of each, the longer first (10 rows by at most 6
/// run as 5 + 5, 32 by 12 as 11 + 11 + 10), so that every register tile a
/// kernel runs has about as many sums in flight.
pub(super) fn even_parts(n: usize, most: usize) -> impl Iterator<Item = (usize, usize)> {
    let parts = n.div_ceil(most);
    (0..parts).map(move |p| {
        let start = p * (n / parts) + p.min(n % parts);
        (start, n / parts + usize::from(p < n % parts))
    })
}

/// Columns of a panel one kernel call covers: the whole panel with AVX-512,
/// half of it with AVX2, whose 16 registers hold 6 rows of 16 columns.
fn kernel_width() -> usize {
    match has_avx512f() {
        true => NR,
        false => 16,
    }
}

/// One tile: `c[0..mr, 0..ncols] (+)= a b` for a packed (kc x mr) `a` and
/// kc rows of `b`, [`NR`] apart, from a panel slice's first column to
/// cover; `c`'s rows are `ldc` apart; ncols is at most [`kernel_width`].
///
/// # Safety
/// `c` is valid for `mr` rows of `ncols` values `ldc` apart; AVX-512F or
/// AVX2 and FMA are present (checked when the weights were packed).
#[inline]
#[allow(clippy::too_many_arguments)] // the tile's shape and place, as BLIS's kernels take them
unsafe fn kernel(
    mr: usize,
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    ncols: usize,
    accumulate: bool,
) {
    debug_assert!(a.len() >= kc * mr && b.len() >= (kc - 1) * NR + ncols);
    debug_assert!(ncols <= kernel_width());
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let (a, b) = (a.as_ptr(), b.as_ptr());
        if !has_avx512f() {
            return avx2::tiles(mr, kc, a, b, c, ldc, ncols, accumulate);
        }
        match mr {
            12 => avx512::tile::<12>(kc, a, b, c, ldc, ncols, accumulate),
            11 => avx512::tile::<11>(kc, a, b, c, ldc, ncols, accumulate),
            10 => avx512::tile::<10>(kc, a, b, c, ldc, ncols, accumulate),
            9 => avx512::tile::<9>(kc, a, b, c, ldc, ncols, accumulate),
            8 => avx512::tile::<8>(kc, a, b, c, ldc, ncols, accumulate),
            7 => avx512::tile::<7>(kc, a, b, c, ldc, ncols, accumulate),
            6 => avx512::tile::<6>(kc, a, b, c, ldc, ncols, accumulate),
            5 => avx512::tile::<5>(kc, a, b, c, ldc, ncols, accumulate),
            4 => avx512::tile::<4>(kc, a, b, c, ldc, ncols, accumulate),
            3 => avx512::tile::<3>(kc, a, b, c, ldc, ncols, accumulate),
            2 => avx512::tile::<2>(kc, a, b, c, ldc, ncols, accumulate),
            1 => avx512::tile::<1>(kc, a, b, c, ldc, ncols, accumulate),
            _ => unreachable!("tiles have 1 to {MR} rows"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("packed weights need AVX-512 or AVX2")
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::NR;

    /// Steps of depth ahead that the kernel prefetches weights (6 KB), into
    /// level 2 (`PREFETCHT1`). A 10-token query streams the text tower's
    /// 144 MiB of f32 weights: fetched to level 1 16 steps ahead, the exact
    /// query's p50 was 8.25 ms, to level 2 48 ahead 7.13 (96 ahead 7.43),
    /// the variants alternated query by query in one process on Zen 4;
    /// images at batch 1 and 16 did not slow (BENCHMARKS.md).
    const PREFETCH: usize = 48;

    /// Lanes of a `NR`-column row that hold output columns `[16 h, 16 h + 16)`
    /// when the tile is `ncols` wide.
    #[inline(always)]
    fn lanes(ncols: usize, h: usize) -> __mmask16 {
        let valid = ncols.saturating_sub(16 * h).min(16);
        ((1u32 << valid) - 1) as __mmask16
    }

    /// The tile kernel for `M` rows: per step of depth, two weight registers
    /// and `M` broadcasts feed `2 M` fused multiply-adds.
    ///
    /// # Safety
    /// As [`super::kernel`]; `a` holds kc x M values and `b` kc x NR.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<const M: usize>(
        kc: usize,
        mut a: *const f32,
        mut b: *const f32,
        c: *mut f32,
        ldc: usize,
        ncols: usize,
        accumulate: bool,
    ) {
        let mut lo = [_mm512_setzero_ps(); M];
        let mut hi = [_mm512_setzero_ps(); M];
        for _ in 0..kc {
            // SAFETY: kc steps of M values of `a` and NR of `b`.
            unsafe {
                // The first row panel over a weight slice reads it from L3 or
                // memory: ask for it ahead (harmless past the end).
                _mm_prefetch::<_MM_HINT_T1>(b.wrapping_add(PREFETCH * NR) as *const i8);
                _mm_prefetch::<_MM_HINT_T1>(b.wrapping_add(PREFETCH * NR + 16) as *const i8);
                let b0 = _mm512_loadu_ps(b);
                let b1 = _mm512_loadu_ps(b.add(16));
                for i in 0..M {
                    let ai = _mm512_set1_ps(*a.add(i));
                    lo[i] = _mm512_fmadd_ps(ai, b0, lo[i]);
                    hi[i] = _mm512_fmadd_ps(ai, b1, hi[i]);
                }
                a = a.add(M);
                b = b.add(NR);
            }
        }
        let (m0, m1) = (lanes(ncols, 0), lanes(ncols, 1));
        for i in 0..M {
            // SAFETY: row i of the tile, `ncols` values, masked.
            unsafe {
                let row = c.add(i * ldc);
                let (mut v0, mut v1) = (lo[i], hi[i]);
                if accumulate {
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, row));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, row.add(16)));
                }
                _mm512_mask_storeu_ps(row, m0, v0);
                _mm512_mask_storeu_ps(row.add(16), m1, v1);
            }
        }
    }
}

/// The tile kernel for CPUs with AVX2 and FMA but no AVX-512. With 16
/// registers of 8 lanes, a tile covers half a panel's columns, in groups of
/// at most [`avx2::ROWS`] rows by 16 columns (BLIS's Haswell shape). The
/// half's weights (16 KB at [`KC`]) stay in L1 while all of a block's row
/// panels pass over them; the whole panel's 32 KB would not.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Element, NR};

    /// Most rows per sub-tile: 6 x 2 accumulators, 2 weight registers and a
    /// broadcast are 15 of the 16 registers.
    pub const ROWS: usize = 6;
    /// Steps of depth ahead that the kernel prefetches weights.
    const PREFETCH: usize = 16;

    /// The tile of [`super::kernel`], at most 16 columns wide: the rows
    /// split as evenly as possible into groups of at most [`ROWS`] (10 rows
    /// run as 5 + 5, so that every group keeps enough sums in flight to
    /// cover the multiply-add latency).
    ///
    /// # Safety
    /// As [`super::kernel`]; AVX2 and FMA are present.
    #[allow(clippy::too_many_arguments)] // as `super::kernel`
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tiles<T: Element>(
        mr: usize,
        kc: usize,
        a: *const f32,
        b: *const T,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        for (r, rows) in super::even_parts(mr, ROWS) {
            // SAFETY: rows r..r + rows of the tile; `a` steps by the panel's
            // mr values per step of depth.
            unsafe {
                let (a, c) = (a.add(r), c.add(r * ldc));
                match rows {
                    6 => tile::<6, T>(kc, a, mr, b, c, ldc, cols, accumulate),
                    5 => tile::<5, T>(kc, a, mr, b, c, ldc, cols, accumulate),
                    4 => tile::<4, T>(kc, a, mr, b, c, ldc, cols, accumulate),
                    3 => tile::<3, T>(kc, a, mr, b, c, ldc, cols, accumulate),
                    2 => tile::<2, T>(kc, a, mr, b, c, ldc, cols, accumulate),
                    1 => tile::<1, T>(kc, a, mr, b, c, ldc, cols, accumulate),
                    _ => unreachable!("sub-tiles have 1 to {ROWS} rows"),
                }
            }
        }
    }

    /// One run of 16 columns of a bf16 panel row, widened to f32 in column
    /// order.
    ///
    /// # Safety
    /// 16 values at `b` and at `out`; AVX2 is present.
    #[target_feature(enable = "avx2")]
    pub unsafe fn widen16(b: *const u16, out: *mut f32) {
        // SAFETY: the caller's.
        unsafe {
            let (lo, hi) = <u16 as Element>::load16(b);
            _mm256_storeu_ps(out, lo);
            _mm256_storeu_ps(out.add(8), hi);
        }
    }

    /// Lanes `[8 h, 8 h + 8)` of a 16-column row that hold columns when it
    /// has `cols`: all ones where valid.
    #[inline(always)]
    fn lanes(cols: usize, h: usize) -> __m256i {
        let valid = cols.saturating_sub(8 * h).min(8) as i32;
        // SAFETY: AVX is present wherever this module runs.
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(valid),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }

    /// `M` rows by 16 columns: per step of depth, two weight registers and
    /// `M` broadcasts feed `2 M` fused multiply-adds.
    ///
    /// # Safety
    /// `a` holds kc steps of `step` values (this tile's `M` first), `b` kc
    /// rows of NR (this tile's 16 first); `c` is valid for M rows of `cols`
    /// values `ldc` apart.
    #[allow(clippy::too_many_arguments)] // as `super::kernel`
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const M: usize, T: Element>(
        kc: usize,
        mut a: *const f32,
        step: usize,
        mut b: *const T,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        accumulate: bool,
    ) {
        let mut lo = [_mm256_setzero_ps(); M];
        let mut hi = [_mm256_setzero_ps(); M];
        for _ in 0..kc {
            // SAFETY: kc steps of `a` and `b` as the caller promised.
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH * NR) as *const i8);
                let (b0, b1) = T::load16(b);
                for i in 0..M {
                    let ai = _mm256_broadcast_ss(&*a.add(i));
                    lo[i] = _mm256_fmadd_ps(ai, b0, lo[i]);
                    hi[i] = _mm256_fmadd_ps(ai, b1, hi[i]);
                }
                a = a.add(step);
                b = b.add(NR);
            }
        }
        for i in 0..M {
            // SAFETY: row i of the tile, `cols` values (masked when fewer
            // than 16).
            unsafe {
                let row = c.add(i * ldc);
                let (mut v0, mut v1) = (lo[i], hi[i]);
                if cols == 16 {
                    if accumulate {
                        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
                        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row.add(8)));
                    }
                    _mm256_storeu_ps(row, v0);
                    _mm256_storeu_ps(row.add(8), v1);
                    continue;
                }
                let (m0, m1) = (lanes(cols, 0), lanes(cols, 1));
                if accumulate {
                    v0 = _mm256_add_ps(v0, _mm256_maskload_ps(row, m0));
                    v1 = _mm256_add_ps(v1, _mm256_maskload_ps(row.add(8), m1));
                }
                _mm256_maskstore_ps(row, m0, v0);
                _mm256_maskstore_ps(row.add(8), m1, v1);
            }
        }
    }
}

/// Packing full row panels four steps of depth at a time with 4 x 4
/// transposes (SSE, part of every x86-64): at a convolution's small number
/// of output channels the packing is a fifth of the product's time.
#[cfg(target_arch = "x86_64")]
mod sse {
    use std::arch::x86_64::*;

    use super::MR;

    /// Writes `dst[kk * MR + i] = src[i * lda + kk]` for MR rows and kc steps.
    ///
    /// # Safety
    /// `src` is valid for MR rows of kc values `lda` apart; `dst` for MR * kc.
    pub unsafe fn pack_panel(src: *const f32, lda: usize, kc: usize, dst: *mut f32) {
        let full = kc / 4 * 4;
        unsafe {
            for kk in (0..full).step_by(4) {
                for g in 0..MR / 4 {
                    let row = |i: usize| _mm_loadu_ps(src.add((4 * g + i) * lda + kk));
                    let (mut r0, mut r1, mut r2, mut r3) = (row(0), row(1), row(2), row(3));
                    // The 4 x 4 transpose (`_MM_TRANSPOSE4_PS`).
                    let t0 = _mm_unpacklo_ps(r0, r1);
                    let t1 = _mm_unpacklo_ps(r2, r3);
                    let t2 = _mm_unpackhi_ps(r0, r1);
                    let t3 = _mm_unpackhi_ps(r2, r3);
                    r0 = _mm_movelh_ps(t0, t1);
                    r1 = _mm_movehl_ps(t1, t0);
                    r2 = _mm_movelh_ps(t2, t3);
                    r3 = _mm_movehl_ps(t3, t2);
                    let out = dst.add(kk * MR + 4 * g);
                    _mm_storeu_ps(out, r0);
                    _mm_storeu_ps(out.add(MR), r1);
                    _mm_storeu_ps(out.add(2 * MR), r2);
                    _mm_storeu_ps(out.add(3 * MR), r3);
                }
            }
            for kk in full..kc {
                for i in 0..MR {
                    *dst.add(kk * MR + i) = *src.add(i * lda + kk);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    use crate::model::test_support::max_abs_diff as max_diff;

    #[test]
    fn even_parts_cover_every_row_once_as_evenly_as_possible() {
        assert_eq!(even_parts(10, 6).collect::<Vec<_>>(), [(0, 5), (5, 5)]);
        assert_eq!(
            even_parts(32, 12).collect::<Vec<_>>(),
            [(0, 11), (11, 11), (22, 10)]
        );
        for n in 1..100 {
            for most in 1..14 {
                let parts: Vec<_> = even_parts(n, most).collect();
                assert_eq!(parts.len(), n.div_ceil(most));
                let mut next = 0;
                for &(start, len) in &parts {
                    assert_eq!(start, next);
                    assert!(len >= 1 && len <= most && len + 1 >= parts[0].1);
                    next += len;
                }
                assert_eq!(next, n);
            }
        }
    }

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        crate::model::test_support::random(&[rows, cols], seed)
    }

    /// `x w^T + b` by candle's product.
    fn plain_product(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap()
    }

    /// `got` is `want` up to f32 sums of `k` terms in another order.
    fn assert_close(got: &Tensor, want: &Tensor, k: usize, what: &str) {
        let err = max_diff(got, want);
        assert!(err < 1e-3 * (k as f32).sqrt(), "{what}: max error {err}");
    }

    /// Every tail: rows not a multiple of MR or MC, columns not of NR, depth
    /// not of KC, a single row and a single column, with and without bias.
    #[test]
    fn packed_product_matches_a_plain_one() {
        if !available() {
            eprintln!("neither AVX-512 nor AVX2 here: the packed kernel does not run");
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (1, 768, 3072),
            (10, 768, 2304),
            (13, 300, 33),
            (50, 3072, 768),
            (200, 513, 100),
            (400, 64, 17),
            (1100, 70, 45),
        ] {
            let x = random(m, k, 1);
            let w = random(n, k, 2);
            let b = random(1, n, 3).flatten_all().unwrap();
            let packed = Arc::new(PackedMatrix::new(&w).unwrap().unwrap());
            assert_eq!(
                packed.unpack().unwrap().to_vec2::<f32>().unwrap(),
                w.to_vec2::<f32>().unwrap()
            );
            let got = dense(&x, &packed, Some(&b), Pointwise::Identity).unwrap();
            assert_close(&got, &plain_product(&x, &w, &b), k, &format!("{m}x{k}x{n}"));
            let relu = dense(
                &x.reshape((1, m, k)).unwrap(),
                &packed,
                None,
                Pointwise::Relu,
            )
            .unwrap();
            assert_eq!(relu.dims(), &[1, m, n]);
            let want = x.matmul(&w.t().unwrap()).unwrap().relu().unwrap();
            let what = format!("{m}x{k}x{n} relu");
            assert_close(&relu.squeeze(0).unwrap(), &want, k, &what);
        }
    }

    /// bf16 panels: the weight comes back rounded, and every tail's product
    /// equals the f32 product with the rounded weight up to the order of the
    /// sums.
    #[test]
    fn bf16_panels_match_a_plain_product_with_rounded_weights() {
        if !bf16_panels() {
            eprintln!("no AVX2, or AVX-512 too: bf16 panels do not run");
            return;
        }
        for (m, k, n) in [
            (1, 1, 1),
            (10, 768, 2304),
            (13, 300, 33),
            (50, 513, 100),
            (600, 64, 17),
        ] {
            let x = random(m, k, 1);
            let w = random(n, k, 2);
            let rounded = w
                .to_dtype(candle_core::DType::BF16)
                .unwrap()
                .to_dtype(candle_core::DType::F32)
                .unwrap();
            let b = random(1, n, 3).flatten_all().unwrap();
            let packed: Arc<dyn Prepacked> = Arc::new(PackedMatrix::bf16(&w).unwrap().unwrap());
            assert!(packed.is_reduced());
            assert_eq!(
                packed.unpack().unwrap().to_vec2::<f32>().unwrap(),
                rounded.to_vec2::<f32>().unwrap()
            );
            let want = plain_product(&x, &rounded, &b).gelu().unwrap();
            let got = dense_with(&x, packed, Some(&b), Pointwise::GeluTanh).unwrap();
            assert_close(&got, &want, k, &format!("{m}x{k}x{n}"));
        }
    }

    #[test]
    fn wrong_width_is_an_error() {
        if !available() {
            return;
        }
        let packed = Arc::new(PackedMatrix::new(&random(8, 16, 1)).unwrap().unwrap());
        let err = dense(&random(2, 15, 2), &packed, None, Pointwise::Identity).unwrap_err();
        assert!(err.to_string().contains("15 features"), "{err}");
    }
}
