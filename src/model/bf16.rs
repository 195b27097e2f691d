//! Dense layers in bf16 on Intel AMX, for `--precision fast`.
//!
//! A weight is rounded to bf16 once, at load, and laid out as AMX tiles
//! ([`Bf16Matrix`]); each product rounds its activations to bf16 and
//! multiplies with `TDPBF16PS`, which accumulates in f32. One such
//! instruction does 16 x 16 x 32 multiply-adds, the work of 512 AVX-512
//! fused multiply-adds. Only the rounding of the two inputs to bf16 (8 bits
//! of mantissa) differs from the f32 product; sums stay f32.
//!
//! AMX is detected at run time (CPUID, and the kernel's permission to use
//! tile data, asked once per process). Without it [`Bf16Matrix::new`] returns
//! `None`, and the caller keeps an f32 layer with bf16-rounded weights, so
//! that `fast` embeddings are close to the same wherever they are made.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::Tensor;
use rayon::prelude::*;

use super::gemm::{Out, epilogue};
use super::ops::Pointwise;

/// Depth of one tile step: a 64-byte tile row of bf16 values.
const TK: usize = 32;
/// Rows and columns of one f32 result tile.
const T: usize = 16;
/// Rows and columns of the block one kernel call computes (2 x 2 tiles).
const BLOCK: usize = 2 * T;
/// Most rows per task: their bf16 activations (a few hundred KB) stay in L2
/// while the task's weight tiles pass over them.
const MC: usize = 128;
/// Column blocks (of [`BLOCK`]) per task when there are rows enough to share.
const TASK_BLOCKS: usize = 16;

/// The kinds of dense layer `--precision fast` can hold in bf16, for
/// measuring what each costs in fidelity and gains in speed
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

/// Whether a layer of `kind` goes to bf16 under `--precision fast`.
pub fn converts(kind: LayerKind) -> bool {
    match CONVERTED.load(Ordering::Relaxed) {
        u32::MAX => kind.by_default(),
        mask => mask & kind.bit() != 0,
    }
}

thread_local! {
    static CONVERT_ON_LOAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `load` with every encoder layer converted to bf16 as soon as it is
/// loaded, so that a `fast` model never holds all its weights in f32 at once.
pub(super) fn converting_on_load<T>(load: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            CONVERT_ON_LOAD.with(|c| c.set(false));
        }
    }
    CONVERT_ON_LOAD.with(|c| c.set(true));
    let _reset = Reset;
    load()
}

/// Whether layers loaded now go to bf16 at once ([`converting_on_load`]).
pub(super) fn convert_on_load() -> bool {
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

/// Whether this CPU and kernel run AMX bf16 products (checked once).
pub fn available() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            amx::detect()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

/// A weight `W` (out x in) in bf16 for `x W^T`, as AMX `B` tiles: for each
/// block of [`T`] output columns, the whole depth in steps of [`TK`], each
/// step one 1 KB tile whose row `r` holds, for every column, the pair of
/// weights at depths `2r` and `2r + 1`. Depth and columns are zero-padded.
#[derive(Debug)]
pub struct Bf16Matrix {
    /// Input features.
    k: usize,
    /// Output features.
    n: usize,
    /// `k` rounded up to [`TK`].
    kp: usize,
    /// `n` rounded up to [`BLOCK`].
    np: usize,
    tiles: Vec<u16>,
    /// The rounded weight as (in, out), for candle's product in a training
    /// graph (`Prepacked::plain`).
    plain: OnceLock<Tensor>,
}

impl Bf16Matrix {
    /// Rounds and lays out an (out, in) f32 weight, or `None` without AMX.
    pub fn new(weight: &Tensor) -> candle_core::Result<Option<Self>> {
        if !available() || !weight.device().is_cpu() {
            return Ok(None);
        }
        let (n, k) = weight.dims2()?;
        let w = weight
            .to_dtype(candle_core::DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Some(Self::from_rows(&w, n, k)))
    }

    fn from_rows(w: &[f32], n: usize, k: usize) -> Self {
        let kp = k.next_multiple_of(TK).max(TK);
        let np = n.next_multiple_of(BLOCK).max(BLOCK);
        let steps = kp / TK;
        let mut tiles = vec![0u16; np * kp];
        // Column block `cb` holds `steps` tiles of T x TK values.
        tiles
            .par_chunks_mut(steps * T * TK)
            .enumerate()
            .for_each(|(cb, block)| {
                for c in 0..T {
                    let o = cb * T + c;
                    if o >= n {
                        break;
                    }
                    let row = &w[o * k..(o + 1) * k];
                    for (kk, &v) in row.iter().enumerate() {
                        block[Self::offset(kk, c)] = to_bf16(v);
                    }
                }
            });
        Self {
            k,
            n,
            kp,
            np,
            tiles,
            plain: OnceLock::new(),
        }
    }

    /// Where weight `(o, kk)` is in its column block's tiles: tile
    /// `kk / TK`, row `kk % TK / 2` (the pair of depths), column `o % T`.
    fn offset(kk: usize, c: usize) -> usize {
        let (step, within) = (kk / TK, kk % TK);
        step * T * TK + (within / 2) * 2 * T + 2 * c + within % 2
    }
}

impl super::gemm::Prepacked for Bf16Matrix {
    fn name(&self) -> &'static str {
        "clipdex-bf16-dense"
    }

    fn is_bf16(&self) -> bool {
        true
    }

    fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn product(&self, x: &[f32], m: usize, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
        matmul(x, m, self, bias, f)
    }

    /// The weight as rounded to bf16, in f32.
    fn unpack(&self) -> candle_core::Result<Tensor> {
        let (n, k) = (self.n, self.k);
        let steps = self.kp / TK;
        let mut w = vec![0f32; n * k];
        for (o, row) in w.chunks_exact_mut(k.max(1)).enumerate().take(n) {
            let block = &self.tiles[(o / T) * steps * T * TK..];
            for (kk, v) in row.iter_mut().enumerate() {
                *v = from_bf16(block[Self::offset(kk, o % T)]);
            }
        }
        Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu)
    }

    fn plain_cell(&self) -> &OnceLock<Tensor> {
        &self.plain
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

/// `x` (m x k) rounded to bf16, `kp` values a row (the padding zero).
fn activations(x: &[f32], m: usize, k: usize, kp: usize) -> Vec<u16> {
    let mut a: Vec<u16> = Vec::with_capacity(m * kp);
    let dst = Out(a.as_mut_ptr());
    let convert = |rows: std::ops::Range<usize>| {
        for r in rows {
            // SAFETY: row r of the m x kp buffer, written by this call only.
            unsafe {
                let row = dst.at(r * kp);
                round_row(&x[r * k..(r + 1) * k], row);
                std::ptr::write_bytes(row.add(k), 0, kp - k);
            }
        }
    };
    // Small inputs on this thread: a parallel pass costs more than it saves.
    const ROWS: usize = 16;
    if m * k < 64 * 1024 {
        convert(0..m);
    } else {
        (0..m.div_ceil(ROWS))
            .into_par_iter()
            .for_each(|b| convert(b * ROWS..m.min((b + 1) * ROWS)));
    }
    // SAFETY: every row was written above.
    unsafe { a.set_len(m * kp) };
    a
}

/// Writes `src` rounded to bf16 at `dst`.
///
/// # Safety
/// `dst` is valid for `src.len()` writes.
unsafe fn round_row(src: &[f32], dst: *mut u16) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AMX products exist only where AMX (and so AVX-512) was found.
    unsafe {
        round_row_avx512(src, dst)
    }
    #[cfg(not(target_arch = "x86_64"))]
    for (i, &s) in src.iter().enumerate() {
        unsafe { dst.add(i).write(to_bf16(s)) };
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

/// Products below this many multiply-adds run on the calling thread: handing
/// them to the pool costs more than the second core gives back.
const PARALLEL_WORK: usize = 1 << 20;

/// `f(x W^T + b)` for `x` (m x k, row-major): a fresh (m x n) buffer.
fn matmul(x: &[f32], m: usize, w: &Bf16Matrix, bias: Option<&[f32]>, f: Pointwise) -> Vec<f32> {
    let n = w.n;
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    if m == 0 || n == 0 {
        return y;
    }
    let a = activations(x, m, w.k, w.kp);
    let threads = match m * w.np * w.kp {
        work if work < PARALLEL_WORK => 1,
        _ => rayon::current_num_threads().max(1),
    };
    // Row blocks of whole 32-row blocks, as even as that allows.
    let mc = m.div_ceil(m.div_ceil(MC)).next_multiple_of(BLOCK);
    let m_blocks = m.div_ceil(mc);
    let col_blocks = w.np / BLOCK;
    let mut chunks = col_blocks.div_ceil(TASK_BLOCKS);
    if m_blocks * chunks < 4 * threads {
        chunks = chunks.div_ceil(threads) * threads;
    }
    let chunks = if threads == 1 {
        1
    } else {
        chunks.clamp(1, col_blocks)
    };
    let out = Out(y.as_mut_ptr());
    let run = |t: usize| {
        let (mb, chunk) = (t / chunks, t % chunks);
        let rows = mb * mc..m.min((mb + 1) * mc);
        let cols = chunk * col_blocks / chunks..(chunk + 1) * col_blocks / chunks;
        // SAFETY: the task writes `rows` x the columns of `cols` only, inside
        // the m x n buffer; `a` holds m rows of the padded depth.
        unsafe { task(&a, w, rows, cols, bias, f, out) };
    };
    match threads {
        1 => (0..m_blocks * chunks).for_each(run),
        _ => (0..m_blocks * chunks).into_par_iter().for_each(run),
    }
    // SAFETY: the tasks wrote every element.
    unsafe { y.set_len(m * n) };
    y
}

/// One task: `rows` of the output by the column blocks `cols`. Each pair of
/// weight tiles is read from memory once and passes over all the task's rows
/// (32 at a time, the tiles configured for the rows there are) while it is
/// in cache; then the rows get their bias and activation in one pass across
/// the task's columns.
///
/// # Safety
/// `out` points at an m x n buffer that `rows` and `cols` lie within; no
/// other thread writes these elements.
unsafe fn task(
    a: &[u16],
    w: &Bf16Matrix,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    f: Pointwise,
    out: Out,
) {
    let (n, kp) = (w.n, w.kp);
    let steps = kp / TK;
    let mut tile = [0f32; BLOCK * BLOCK];
    let span = cols.start * BLOCK..n.min(cols.end * BLOCK);
    if span.is_empty() {
        return;
    }
    let mut configured = (0, 0);
    for cb in cols.clone() {
        let col0 = cb * BLOCK;
        if col0 >= n {
            break;
        }
        let ncols = BLOCK.min(n - col0);
        let b0 = &w.tiles[(2 * cb) * steps * T * TK..];
        let b1 = &w.tiles[(2 * cb + 1) * steps * T * TK..];
        for r0 in rows.clone().step_by(BLOCK) {
            let nrows = BLOCK.min(rows.end - r0);
            let shape = (nrows.min(T), nrows.saturating_sub(T));
            if shape != configured {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AMX was detected and permitted before any matrix
                // was made.
                unsafe {
                    amx::configure(shape.0, shape.1)
                };
                configured = shape;
            }
            // Whole columns go straight to the output; an edge block through
            // `tile`.
            let (c, ldc) = if ncols == BLOCK {
                // SAFETY: rows r0..r0 + nrows, columns col0..col0 + 32 are in
                // bounds.
                (unsafe { out.at(r0 * n + col0) }, n)
            } else {
                (tile.as_mut_ptr(), BLOCK)
            };
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `a` holds `nrows` rows of kp values from row r0, `b0`
            // and `b1` `steps` tiles each, `c` room for nrows rows of 32,
            // `ldc` apart; the tiles were configured for these rows.
            unsafe {
                let (a, b0, b1) = (a[r0 * kp..].as_ptr(), b0.as_ptr(), b1.as_ptr());
                match shape.1 {
                    0 => amx::block1(a, kp, b0, b1, steps, c, ldc),
                    _ => amx::block2(a, kp, b0, b1, steps, c, ldc),
                }
            };
            if ncols < BLOCK {
                for i in 0..nrows {
                    // SAFETY: row r0 + i, columns col0..col0 + ncols: in bounds.
                    let row = unsafe {
                        std::slice::from_raw_parts_mut(out.at((r0 + i) * n + col0), ncols)
                    };
                    row.copy_from_slice(&tile[i * BLOCK..i * BLOCK + ncols]);
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: releases the tile state this task configured.
    unsafe {
        amx::release()
    };
    if bias.is_some() || f != Pointwise::Identity {
        for i in rows {
            // SAFETY: row i across the task's columns: in bounds, this task's
            // own.
            let row =
                unsafe { std::slice::from_raw_parts_mut(out.at(i * n + span.start), span.len()) };
            epilogue(row, bias.map(|b| &b[span.clone()]), f);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    use super::{T, TK};

    /// A tile configuration (palette 1): tmm0-1 the f32 results of the top
    /// rows, tmm2-3 of the bottom rows, tmm4-5 their activations, tmm6-7
    /// weights; every row 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// CPUID says AMX-TILE and AMX-BF16, and Linux grants this process the
    /// tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`).
    #[cfg(target_os = "linux")]
    pub fn detect() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        if !std::arch::is_x86_feature_detected!("avx512f")
            || !std::arch::is_x86_feature_detected!("avx512bw")
        {
            return false;
        }
        // CPUID leaf 7 exists on every CPU with AVX-512.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (tile, bf16) = (leaf7.edx & (1 << 24) != 0, leaf7.edx & (1 << 22) != 0);
        if !(tile && bf16) {
            return false;
        }
        // SAFETY: a plain system call; it fails (non-zero) where the kernel
        // does not support or allow tile data.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        granted == 0
    }

    /// Configures this thread's tiles for `top` (1 to 16) rows and `bottom`
    /// (0 to 16) more.
    ///
    /// # Safety
    /// [`detect`] returned true.
    pub unsafe fn configure(top: usize, bottom: usize) {
        let (top, bottom) = (top as u8, bottom as u8);
        let width = |rows: u8| if rows == 0 { 0 } else { 64 };
        let mut config = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for (tile, rows) in [top, top, bottom, bottom, top, bottom, 16, 16]
            .into_iter()
            .enumerate()
        {
            config.rows[tile] = rows;
            config.colsb[tile] = width(rows);
        }
        // SAFETY: a valid palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
    }

    /// Releases this thread's tile state.
    ///
    /// # Safety
    /// [`detect`] returned true.
    pub unsafe fn release() {
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// `c[0..16 + bottom, 0..32] = a * [b0 b1]`: `a` rows of `kp` bf16
    /// values (16, then `bottom` as configured), `b0` and `b1` `steps`
    /// weight tiles each (16 columns apiece), `c` f32 rows `ldc` values
    /// apart.
    ///
    /// # Safety
    /// [`configure`] ran on this thread with `bottom > 0`; the pointers are
    /// valid for those extents; `steps > 0`.
    pub unsafe fn block2(
        a: *const u16,
        kp: usize,
        b0: *const u16,
        b1: *const u16,
        steps: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a2} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a}, 64",
                "add {a2}, 64",
                "add {b0}, {tb}",
                "add {b1}, {tb}",
                "dec {n}",
                "jnz 2b",
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c3} + {sc}*1], tmm3",
                a = inout(reg) a => _,
                a2 = inout(reg) a.add(T * kp) => _,
                b0 = inout(reg) b0 => _,
                b1 = inout(reg) b1 => _,
                n = inout(reg) steps => _,
                sa = in(reg) kp * 2,
                sb = in(reg) 64usize,
                tb = in(reg) T * TK * 2,
                c = in(reg) c,
                c1 = in(reg) c.add(T),
                c2 = in(reg) c.add(T * ldc),
                c3 = in(reg) c.add(T * ldc + T),
                sc = in(reg) ldc * 4,
                options(nostack),
            );
        }
    }

    /// [`block2`] for the top rows only (1 to 16, as configured).
    ///
    /// # Safety
    /// [`configure`] ran on this thread; the pointers are valid for those
    /// extents; `steps > 0`.
    pub unsafe fn block1(
        a: *const u16,
        kp: usize,
        b0: *const u16,
        b1: *const u16,
        steps: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "2:",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "add {a}, 64",
                "add {b0}, {tb}",
                "add {b1}, {tb}",
                "dec {n}",
                "jnz 2b",
                "tilestored [{c} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                a = inout(reg) a => _,
                b0 = inout(reg) b0 => _,
                b1 = inout(reg) b1 => _,
                n = inout(reg) steps => _,
                sa = in(reg) kp * 2,
                sb = in(reg) 64usize,
                tb = in(reg) T * TK * 2,
                c = in(reg) c,
                c1 = in(reg) c.add(T),
                sc = in(reg) ldc * 4,
                options(nostack),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gemm::Prepacked;
    use crate::model::test_support::{max_abs_diff, random};

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
            eprintln!("no AMX here: the bf16 kernel is not tested");
            return;
        }
        // Rows, columns and depth that fill whole blocks, leave some over,
        // or are smaller than one tile; enough rows for several tasks.
        for (m, n, k) in [
            (1, 1, 1),
            (10, 512, 512),
            (32, 32, 32),
            (50, 768, 768),
            (77, 40, 33),
            (300, 96, 200),
        ] {
            let x = random(&[m, k], 1);
            let w = random(&[n, k], 2);
            let b = random(&[n], 5);
            let packed = Arc::new(Bf16Matrix::new(&w).unwrap().unwrap());
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ws = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bs = b.to_vec1::<f32>().unwrap();
            let want = reference(&xs, &ws, m, n, k, Some(&bs));
            let want = Tensor::from_vec(want, (m, n), &candle_core::Device::Cpu).unwrap();
            let got = dense(&x, &packed, Some(&b), Pointwise::Identity).unwrap();
            let tol = 1e-5 * (k as f32).sqrt() * 4.0;
            assert!(
                max_abs_diff(&got, &want) < tol,
                "{m} x {n} x {k}: {}",
                max_abs_diff(&got, &want)
            );
            let relu = dense(&x, &packed, Some(&b), Pointwise::Relu).unwrap();
            assert!(max_abs_diff(&relu, &want.relu().unwrap()) < tol);
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
