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
//! The kernel is AVX-512 (detected at run time). Where the CPU has none,
//! [`PackedMatrix::new`] returns `None` and the layer keeps candle's
//! product, so results are the same everywhere up to rounding.

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
/// Rows from which a product goes through [`matmul_unpacked`].
pub const UNPACK_ROWS: usize = 512;
/// Panels per task when there are rows enough to share out: 1,024 columns.
const TASK_PANELS: usize = 32;

static DISABLED: AtomicBool = AtomicBool::new(false);

/// Turns the packed kernel off for layers loaded afterwards (they keep
/// candle's product), to measure one against the other in one run.
pub fn set_enabled(enabled: bool) {
    DISABLED.store(!enabled, Ordering::Relaxed);
}

/// Whether layers loaded now get packed weights: the CPU has AVX-512 and
/// nothing turned it off.
pub fn available() -> bool {
    if DISABLED.load(Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight matrix `W` (out x in) stored for `x W^T`: `ceil(out / NR)` panels,
/// each `in` rows of `NR` columns.
#[derive(Debug)]
pub struct PackedMatrix {
    /// Input features, the product's depth.
    k: usize,
    /// Output features.
    n: usize,
    data: Vec<f32>,
    /// The weight as (in, out) for candle's product, made the first time a
    /// training graph runs through this frozen layer (`Prepacked::plain`).
    plain: std::sync::OnceLock<Tensor>,
}

impl PackedMatrix {
    /// Packs an (out, in) f32 weight, or `None` where the kernel cannot run
    /// (no AVX-512, another dtype or device).
    pub fn new(weight: &Tensor) -> candle_core::Result<Option<Self>> {
        if !available() || weight.dtype() != candle_core::DType::F32 || !weight.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = weight.dims2()?;
        let w = weight.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        if k == 0 {
            return Ok(Some(Self {
                k,
                n,
                data,
                plain: Default::default(),
            }));
        }
        data.par_chunks_mut(k * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..NR.min(n - p * NR) {
                    let row = &w[(p * NR + j) * k..(p * NR + j + 1) * k];
                    for (kk, &v) in row.iter().enumerate() {
                        panel[kk * NR + j] = v;
                    }
                }
            });
        Ok(Some(Self {
            k,
            n,
            data,
            plain: Default::default(),
        }))
    }

    fn panels(&self) -> usize {
        self.n.div_ceil(NR)
    }
}

/// A weight laid out once at load for one inference kernel: this module's
/// f32 panels, or `bf16`'s AMX tiles. Dense layers hold either as one.
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

impl Prepacked for PackedMatrix {
    fn name(&self) -> &'static str {
        "clipdex-packed-dense"
    }

    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn product(&self, x: &[f32], m: usize, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
        matmul(x, m, self, bias, f)
    }

    fn unpack(&self) -> candle_core::Result<Tensor> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        for (o, row) in w.chunks_exact_mut(k).enumerate() {
            let panel = &self.data[(o / NR) * k * NR..];
            for (kk, v) in row.iter_mut().enumerate() {
                *v = panel[kk * NR + o % NR];
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

/// `f(x W^T + b)` for `x` (m x k, row-major): a fresh (m x n) buffer.
fn matmul(x: &[f32], m: usize, w: &PackedMatrix, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
    let n = w.n;
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
    if m >= UNPACK_ROWS {
        return matmul_unpacked(x, m, w, bias, f);
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
    let shared = (chunks > 1).then(|| pack_rows(x, m, w.k));
    let out = Out(y.as_mut_ptr());
    (0..m_blocks * chunks).into_par_iter().for_each(|t| {
        let (mb, chunk) = (t / chunks, t % chunks);
        let rows = mb * mc..(m.min((mb + 1) * mc));
        let first = chunk * panels / chunks;
        let last = (chunk + 1) * panels / chunks;
        let a = match &shared {
            Some(packed) => Rows::Shared { packed, m },
            None => Rows::Own(x),
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
/// kernel is 5 to 10% faster than the tile kernel, and unpacking (one copy of
/// each 32-column run) costs under 2% of such a product.
fn matmul_unpacked(
    x: &[f32],
    m: usize,
    w: &PackedMatrix,
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
                let src = &w.data[p * k * NR + kk * NR..][..cols.len()];
                for (o, &v) in cols.iter_mut().zip(src) {
                    o.write(v);
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
}

thread_local! {
    /// A task's own packed block of rows ([`Rows::Own`]), reused across calls.
    /// Tasks run no parallel work inside, so no borrow of it nests.
    static BLOCK: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One task: `rows` of the output by the columns of `panels`, over the whole
/// depth in blocks of [`KC`].
///
/// # Safety
/// `out` points at an m x n buffer that `rows` and `panels` lie within, and no
/// other thread touches those elements meanwhile.
unsafe fn task(
    a: Rows,
    w: &PackedMatrix,
    rows: std::ops::Range<usize>,
    panels: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    f: Pointwise,
    out: Out,
) {
    let (k, n) = (w.k, w.n);
    let mb = rows.len();
    BLOCK.with_borrow_mut(|own| {
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
            };
            let last_block = k0 + kc == k;
            for p in panels.clone() {
                let col0 = p * NR;
                let ncols = NR.min(n - col0);
                let b = &w.data[p * k * NR + k0 * NR..p * k * NR + (k0 + kc) * NR];
                for r0 in (0..mb).step_by(MR) {
                    let mr = MR.min(mb - r0);
                    let row = rows.start + r0;
                    let a = &block[(row - base) * kc..(row - base + mr) * kc];
                    // SAFETY: the caller's bounds; `a` and `b` hold kc x mr and
                    // kc x NR values.
                    let c = unsafe { out.at(row * n + col0) };
                    unsafe { kernel(mr, kc, a, b, c, n, ncols, k0 > 0) };
                    if last_block && (bias.is_some() || f != Pointwise::Identity) {
                        for i in 0..mr {
                            // SAFETY: row i of the tile, ncols wide, in bounds.
                            let row =
                                unsafe { std::slice::from_raw_parts_mut(c.add(i * n), ncols) };
                            epilogue(row, bias.map(|b| &b[col0..col0 + ncols]), f);
                        }
                    }
                }
            }
        }
    });
}

/// `x` (m x k) packed for the kernel, once per product: for each block of
/// [`KC`] columns (at `k0 * m`), the block's rows as [`pack_block`] lays
/// them out. Row panels start at multiples of MR, as tasks' row blocks do.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let mut packed: Vec<f32> = Vec::with_capacity(m * k);
    let out = Out(packed.as_mut_ptr());
    // Parallel in blocks of whole row panels, so that panels start at
    // multiples of MR as the tasks' do.
    const ROWS: usize = 16 * MR;
    (0..m.div_ceil(ROWS)).into_par_iter().for_each(|mb| {
        let rows = mb * ROWS..m.min((mb + 1) * ROWS);
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
    // Epilogues run on products with packed weights, which exist only where
    // AVX-512F was detected; the check keeps any other caller off it.
    #[cfg(target_arch = "x86_64")]
    if has_avx512bw() {
        // SAFETY: AVX-512F was detected.
        return unsafe { epilogue_avx512(row, bias, f) };
    }
    epilogue_with(row, bias, f)
}

/// Whether this CPU runs AVX-512F and BW (detected once, then cached).
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512bw() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// [`epilogue_with`] compiled for AVX-512, where its loops vectorise.
///
/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn epilogue_avx512(row: &mut [f32], bias: Option<&[f32]>, f: Pointwise) {
    epilogue_with(row, bias, f)
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

/// One tile: `c[0..mr, 0..ncols] (+)= a b` for a packed (kc x mr) `a` and a
/// (kc x NR) panel slice `b`; `c`'s rows are `ldc` apart.
///
/// # Safety
/// `c` is valid for `mr` rows of `ncols` values `ldc` apart; AVX-512F is
/// present (checked when the weights were packed).
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
    debug_assert!(a.len() >= kc * mr && b.len() >= kc * NR && ncols <= NR);
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let (a, b) = (a.as_ptr(), b.as_ptr());
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
    unreachable!("packed weights need AVX-512")
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::NR;

    /// Steps of depth ahead that the kernel prefetches weights.
    const PREFETCH: usize = 16;

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
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH * NR) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(b.wrapping_add(PREFETCH * NR + 16) as *const i8);
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

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        crate::model::test_support::random(&[rows, cols], seed)
    }

    /// Every tail: rows not a multiple of MR or MC, columns not of NR, depth
    /// not of KC, a single row and a single column, with and without bias.
    #[test]
    fn packed_product_matches_a_plain_one() {
        if !available() {
            eprintln!("no AVX-512 here: the packed kernel does not run");
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
            let want = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap();
            let got = dense(&x, &packed, Some(&b), Pointwise::Identity).unwrap();
            let err = max_diff(&got, &want);
            assert!(
                err < 1e-3 * (k as f32).sqrt(),
                "{m}x{k}x{n}: max error {err}"
            );
            let relu = dense(
                &x.reshape((1, m, k)).unwrap(),
                &packed,
                None,
                Pointwise::Relu,
            )
            .unwrap();
            assert_eq!(relu.dims(), &[1, m, n]);
            let want = x.matmul(&w.t().unwrap()).unwrap().relu().unwrap();
            let err = max_diff(&relu.squeeze(0).unwrap(), &want);
            assert!(
                err < 1e-3 * (k as f32).sqrt(),
                "{m}x{k}x{n} relu: max error {err}"
            );
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
