//! The Intel AMX tile product shared by the reduced-precision layers of
//! `--precision fast`: bf16 ([`super::bf16`], `TDPBF16PS`, f32 sums) and
//! int8 ([`super::int8`], `TDPBUSD`, i32 sums).
//!
//! Both formats fill a 64-byte tile row: 32 bf16 or 64 int8 values of depth.
//! A weight is laid out once, at load, as `B` tiles: for each block of [`T`]
//! output columns, the whole depth in 1 KB tiles, one per 64 bytes of depth
//! ([`Format::offset`]). A product turns its activations into rows of the
//! same format (`a`, 64 bytes of depth per tile step) and runs 32 x 32
//! blocks of output, two by two tiles, each pair of weight tiles loaded once
//! per 32 rows.
//!
//! AMX is detected at run time (CPUID, and the kernel's permission to use
//! tile data, asked once per process). Where it is missing, CPUs with
//! AVX-512 dot-product instructions (AMD Zen 4 and later, Intel from Ice
//! Lake and Cooper Lake) run the same layout with `VDPBF16PS` (AVX512-BF16)
//! or `VPDPBUSD` (AVX512-VNNI): one 64-byte tile row of weights is one
//! register (16 columns by a pair or a quadruple of depths), each row of
//! activations gives the matching 4 bytes by broadcast, and the sums are
//! the same (i32, so exact, for int8; f32 for bf16).

use std::cell::Cell;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut, Range};
use std::sync::OnceLock;

use rayon::prelude::*;

use super::gemm::{Out, RowSource};

/// Rows and columns of one result tile (f32 or i32).
pub(super) const T: usize = 16;
/// Bytes of depth in one tile row.
pub(super) const ROW_BYTES: usize = 64;
/// Bytes of one tile (16 rows of 64).
pub(super) const TILE_BYTES: usize = T * ROW_BYTES;
/// Rows and columns of the block one kernel call computes (2 x 2 tiles).
pub(super) const BLOCK: usize = 2 * T;
/// Most rows per task: their activations (a few hundred KB) stay in L2 while
/// the task's weight tiles pass over them.
const MC: usize = 128;
/// Column blocks (of [`BLOCK`]) per task when there are rows enough to share.
const TASK_BLOCKS: usize = 16;
/// Products below this many bytes of multiply-adds (rows x padded columns x
/// padded depth in bytes) run on the calling thread: handing them to the
/// pool costs more than the second core gives back.
const PARALLEL_WORK: usize = 2 << 20;

/// What a tile element is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Format {
    /// bf16 pairs, f32 sums (`TDPBF16PS`).
    Bf16,
    /// Int8 quadruples, activations unsigned and weights signed, i32 sums
    /// (`TDPBUSD`).
    Int8,
}

impl Format {
    /// Values of depth per element group of a `B` tile row (2 or 4).
    const fn group(self) -> usize {
        match self {
            Format::Bf16 => 2,
            Format::Int8 => 4,
        }
    }

    /// Values of depth in one tile step.
    pub(super) const fn depth(self) -> usize {
        match self {
            Format::Bf16 => ROW_BYTES / 2,
            Format::Int8 => ROW_BYTES,
        }
    }

    /// Where weight `(o, kk)` is among its column block's elements, counted
    /// in elements (u16 or i8): tile `kk / depth`, row `kk % depth / group`,
    /// column `o % T`, place `kk % group` within the column's group.
    pub(super) fn offset(self, kk: usize, o: usize) -> usize {
        match self {
            Format::Bf16 => offset::<{ Format::Bf16.depth() }, { Format::Bf16.group() }>(kk, o),
            Format::Int8 => offset::<{ Format::Int8.depth() }, { Format::Int8.group() }>(kk, o),
        }
    }
}

/// [`Format::offset`] for a format's depth and group as constants (shifts,
/// where the format's own values would be divisions).
#[inline(always)]
const fn offset<const DEPTH: usize, const GROUP: usize>(kk: usize, o: usize) -> usize {
    let (step, within) = (kk / DEPTH, kk % DEPTH);
    step * T * DEPTH + (within / GROUP) * GROUP * T + GROUP * (o % T) + within % GROUP
}

/// Whether this CPU runs products in `format`, on AMX or with AVX-512 dot
/// products ([`Engine`], checked once).
pub(super) fn available(format: Format) -> bool {
    engine(format).is_some()
}

/// What runs the tile product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Engine {
    /// AMX tiles.
    Amx,
    /// AVX-512 registers, a tile row at a time (`VDPBF16PS`, `VPDPBUSD`).
    Avx512,
}

/// What runs products in `format` on this CPU, if anything (checked once).
pub(super) fn engine(format: Format) -> Option<Engine> {
    if amx(format) {
        return Some(Engine::Amx);
    }
    static DOTS: OnceLock<(bool, bool)> = OnceLock::new();
    let (bf16, int8) = *DOTS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            dots::detect()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            (false, false)
        }
    });
    let dots = match format {
        Format::Bf16 => bf16,
        Format::Int8 => int8,
    };
    dots.then_some(Engine::Avx512)
}

/// Whether this CPU and kernel run AMX products in `format` (checked once).
fn amx(format: Format) -> bool {
    static AMX: OnceLock<(bool, bool)> = OnceLock::new();
    let (bf16, int8) = *AMX.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            tiles::detect()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            (false, false)
        }
    });
    match format {
        Format::Bf16 => bf16,
        Format::Int8 => int8,
    }
}

/// Lays out the (out, in) `weight` in `format`: `lay_out` gets its values
/// row-major as f32, with its shape (n, k). `None` where this CPU has no
/// kernel for it ([`available`]) or the weight is not on the CPU.
///
/// An f32 weight stored in order, as checkpoints are read, is lent where it
/// lies: a copy would be a second fresh f32 weight per layer while loading.
pub(super) fn with_rows<T>(
    format: Format,
    weight: &candle_core::Tensor,
    lay_out: impl FnOnce(&[f32], usize, usize) -> T,
) -> candle_core::Result<Option<T>> {
    if !available(format) || !weight.device().is_cpu() {
        return Ok(None);
    }
    f32_rows(weight, lay_out).map(Some)
}

/// `lay_out` of the (out, in) `weight`'s values row-major as f32, with its
/// shape (n, k): lent where an f32 weight on the CPU lies in order, else a
/// converted copy.
pub(super) fn f32_rows<T>(
    weight: &candle_core::Tensor,
    lay_out: impl FnOnce(&[f32], usize, usize) -> T,
) -> candle_core::Result<T> {
    let (n, k) = weight.dims2()?;
    if weight.dtype() == candle_core::DType::F32 {
        let (storage, layout) = weight.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(lay_out(&cpu.as_slice::<f32>()?[start..end], n, k));
        }
    }
    let w = weight
        .to_dtype(candle_core::DType::F32)?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(lay_out(&w, n, k))
}

/// A tile element: plain bytes (u16 for bf16, i8 for int8), any bit
/// pattern a value.
pub(super) trait Element: Copy + Default + Send + Sync + std::fmt::Debug {}
impl Element for u16 {}
impl Element for i8 {}
impl Element for u8 {}

/// The bytes of tile elements, as the tile loads read them.
fn bytes<E: Element>(v: &[E]) -> &[u8] {
    // SAFETY: `Element`s are integers: initialised bytes, no padding; u8
    // has no alignment.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), std::mem::size_of_val(v)) }
}

/// An (out x in) weight laid out as `B` tiles of one format: for each block
/// of [`T`] output columns, the whole depth in tiles of 64 bytes of depth;
/// depth and columns zero-padded.
#[derive(Debug)]
pub(super) struct TileMatrix<E> {
    pub format: Format,
    /// Input features.
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// `k` rounded up to the format's depth per tile.
    kp: usize,
    /// `n` rounded up to [`BLOCK`].
    np: usize,
    tiles: Vec<E>,
    /// The weight as the tiles hold it, as (in, out), for candle's product
    /// in a training graph (`Prepacked::plain`).
    pub plain: OnceLock<candle_core::Tensor>,
}

impl<E: Element> TileMatrix<E> {
    /// Lays out the row-major (n x k) weight `w`: `channel(row, values)`
    /// converts one output channel's row into its `k` values, in order of
    /// depth, and returns what the channel keeps besides (a scale); those
    /// come back in channel order.
    pub fn new<X: Copy + Default + Send>(
        format: Format,
        w: &[f32],
        n: usize,
        k: usize,
        channel: impl Fn(&[f32], &mut [E]) -> X + Sync,
    ) -> (Self, Vec<X>) {
        let depth = format.depth();
        let kp = k.next_multiple_of(depth).max(depth);
        let np = n.next_multiple_of(BLOCK).max(BLOCK);
        let mut tiles = vec![E::default(); np * kp];
        let place = match format {
            Format::Bf16 => place::<E, { Format::Bf16.depth() }, { Format::Bf16.group() }>,
            Format::Int8 => place::<E, { Format::Int8.depth() }, { Format::Int8.group() }>,
        };
        // Column block `cb` holds the tiles of T columns.
        let blocks: Vec<[X; T]> = tiles
            .par_chunks_mut(kp * T)
            .enumerate()
            .map(|(cb, block)| {
                let mut kept = [X::default(); T];
                let mut values = vec![E::default(); k];
                for (c, kept) in kept.iter_mut().enumerate() {
                    let o = cb * T + c;
                    if o >= n {
                        break;
                    }
                    *kept = channel(&w[o * k..(o + 1) * k], &mut values);
                    place(block, c, &values);
                }
                kept
            })
            .collect();
        let kept = blocks.into_iter().flatten().take(n).collect();
        let matrix = Self {
            format,
            k,
            n,
            kp,
            np,
            tiles,
            plain: OnceLock::new(),
        };
        (matrix, kept)
    }

    /// The (n x k) weight back, `value(channel, element)` each.
    pub fn unpack(
        &self,
        value: impl Fn(usize, E) -> f32,
    ) -> candle_core::Result<candle_core::Tensor> {
        let (n, k) = (self.n, self.k);
        let mut w = vec![0f32; n * k];
        for (o, row) in w.chunks_exact_mut(k.max(1)).enumerate().take(n) {
            let block = &self.tiles[(o / T) * self.kp * T..];
            for (kk, v) in row.iter_mut().enumerate() {
                *v = value(o, block[self.format.offset(kk, o)]);
            }
        }
        candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu)
    }

    /// `x W` for `a`, `m` rows of activations in this format laid out as
    /// `convert` lays them (the padded depth long, `row_stride`
    /// apart): see [`product`].
    pub fn product<A: Element>(
        &self,
        a: &[A],
        m: usize,
        finish: impl Fn(Range<usize>, Range<usize>, Out) + Sync,
    ) -> Vec<f32> {
        let weights = Weights {
            format: self.format,
            n: self.n,
            np: self.np,
            steps: self.kp / self.format.depth(),
            tiles: bytes(&self.tiles),
        };
        let stride = self.row_stride::<A>();
        assert!(a.len() >= m * stride, "{m} rows of activations");
        product(bytes(a), stride * size_of::<A>(), m, &weights, finish)
    }

    /// Elements from one row of activations to the next: the padded depth,
    /// and one cache line more where that is a multiple of 4 KB. A register
    /// tile reads its rows side by side, and rows 4 KB apart all fall in one
    /// set of the level-1 cache (64 sets of 64-byte lines, 8 to 12 ways):
    /// ten or twelve of them missed to level 2 at every group of depth. On
    /// Zen 4 the AVX-512 bf16 kernel did 2.2 G dot products a second on 12
    /// rows 4 KB apart and 3.46 G a line further apart (one core, weights
    /// in level 2); `cargo bench --bench model -- --only bf16` at 50 to 800
    /// rows went from 268 to 313 GFLOP/s to 339 to 394 at the text tower's
    /// (2048, 512) and ViT-L's (4096, 1024).
    fn row_stride<A: Element>(&self) -> usize {
        let bytes = self.kp * size_of::<A>();
        match bytes % 4096 {
            0 => self.kp + ROW_BYTES / size_of::<A>(),
            _ => self.kp,
        }
    }

    /// `x` (m x k, row-major) converted a row at a time by `row(src, dst)`
    /// into this matrix's padded depth (the padding zero): the rows, and
    /// what `row` returned for each. Large inputs convert on the pool.
    pub fn activations<A: Element, X: Copy + Default + Send>(
        &self,
        x: &[f32],
        m: usize,
        row: impl Fn(&[f32], &mut [A]) -> X + Sync,
    ) -> (Rows<A>, Vec<X>) {
        self.convert(Source::Stored(x), m, row)
    }

    /// [`Self::activations`] of rows made on demand: each is made into a
    /// scratch row and converted from there, so the f32 rows never exist
    /// together.
    pub fn activations_of<A: Element, X: Copy + Default + Send>(
        &self,
        rows: &dyn RowSource,
        row: impl Fn(&[f32], &mut [A]) -> X + Sync,
    ) -> (Rows<A>, Vec<X>) {
        self.convert(Source::Made(rows), rows.count(), row)
    }

    fn convert<A: Element, X: Copy + Default + Send>(
        &self,
        source: Source,
        m: usize,
        row: impl Fn(&[f32], &mut [A]) -> X + Sync,
    ) -> (Rows<A>, Vec<X>) {
        let k = self.k;
        if let Source::Made(rows) = source {
            assert_eq!(
                rows.width(),
                k,
                "rows of {} values for a depth of {k}",
                rows.width()
            );
        }
        let (stride, kp) = (self.row_stride::<A>(), self.kp);
        let mut a = Rows::<A>::new(m * stride);
        let mut kept = vec![X::default(); m];
        // Small inputs on this thread: a parallel pass costs more than it
        // saves.
        const ROWS: usize = 16;
        let convert = |scratch: &mut Vec<f32>, (r, (dst, kept)): (usize, (&mut [A], &mut X))| {
            let src = match source {
                Source::Stored(x) => &x[r * k..(r + 1) * k],
                Source::Made(rows) => {
                    scratch.resize(k, 0.0);
                    rows.write(r, scratch);
                    &scratch[..]
                }
            };
            *kept = row(src, &mut dst[..k]);
            // The padded depth is read (against zero weights): zero, as a
            // reused buffer may hold anything there.
            dst[k..kp].fill(A::default());
        };
        if m * k < 64 * 1024 {
            let mut scratch = Vec::new();
            a.chunks_mut(stride)
                .zip(kept.iter_mut())
                .enumerate()
                .for_each(|pair| convert(&mut scratch, pair));
        } else {
            a.par_chunks_mut(stride * ROWS)
                .zip(kept.par_chunks_mut(ROWS))
                .enumerate()
                .for_each(|(b, (dst, kept))| {
                    let mut scratch = Vec::new();
                    dst.chunks_mut(stride)
                        .zip(kept.iter_mut())
                        .enumerate()
                        .for_each(|(r, pair)| convert(&mut scratch, (b * ROWS + r, pair)))
                });
        }
        (a, kept)
    }
}

thread_local! {
    /// This thread's buffer for its next product's activation rows
    /// ([`Rows`]).
    static SPARE: Cell<Vec<u64>> = const { Cell::new(Vec::new()) };
}

/// The largest activation buffer a thread keeps for its next product: a
/// batch of 32 ViT-B/32 images at the MLP's depth is 9.8 MB in bf16; a
/// ResNet's patches can be ten times that, and are not kept.
const SPARE_BYTES: usize = 16 << 20;

/// Rows of activations in a tile format, in memory reused product after
/// product: taken from this thread's spare buffer when it is large enough
/// and handed back on drop, so that it is neither allocated nor zeroed
/// again (a fresh zeroed buffer was 1 to 2% of a `fast` image pass on Zen
/// 4). Every element is initialised (the buffer is zeroed when made), and
/// [`TileMatrix::activations`] writes each row's padded depth.
pub(super) struct Rows<A> {
    words: Vec<u64>,
    len: usize,
    element: PhantomData<A>,
}

impl<A: Element> Rows<A> {
    fn new(len: usize) -> Self {
        const { assert!(align_of::<A>() <= align_of::<u64>()) };
        let needed = (len * size_of::<A>()).div_ceil(size_of::<u64>());
        let mut words = SPARE.try_with(Cell::take).unwrap_or_default();
        if words.len() < needed {
            words = vec![0; needed];
        }
        Self {
            words,
            len,
            element: PhantomData,
        }
    }
}

impl<A: Element> Deref for Rows<A> {
    type Target = [A];

    fn deref(&self) -> &[A] {
        // SAFETY: `words` holds at least `len` elements' bytes, initialised,
        // aligned for `A` (at most u64's alignment); `Element`s take any bit
        // pattern.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }
}

impl<A: Element> DerefMut for Rows<A> {
    fn deref_mut(&mut self) -> &mut [A] {
        // SAFETY: as `deref`, borrowed uniquely.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }
}

impl<A> Drop for Rows<A> {
    fn drop(&mut self) {
        let words = std::mem::take(&mut self.words);
        if words.len() * size_of::<u64>() > SPARE_BYTES {
            return;
        }
        // The larger of this and a spare that a product nested inside this
        // one's (a task stolen by this thread) handed back meanwhile.
        let _ = SPARE.try_with(|spare| {
            let kept = spare.take();
            spare.set(if kept.len() >= words.len() {
                kept
            } else {
                words
            });
        });
    }
}

/// Puts column `c`'s `values` (in order of depth) where [`Format::offset`]
/// says among its column block's tiles, a group of depth at a time: the
/// format's depth and group as constants, so that finding each place is
/// shifts. Loading a model lays out every weight so (88 M for ViT-B/32);
/// a call and the divisions of `offset` for each value took 42% of a
/// one-off `clipdex search` on Zen 4.
fn place<E: Copy, const DEPTH: usize, const GROUP: usize>(block: &mut [E], c: usize, values: &[E]) {
    let at = |g: usize| offset::<DEPTH, GROUP>(g * GROUP, c);
    let groups = values.chunks_exact(GROUP);
    let (whole, rest) = (groups.len(), groups.remainder());
    // Whole groups as copies of a known length (no call to memmove each).
    for (g, group) in groups.enumerate() {
        let at = at(g);
        block[at..at + GROUP].copy_from_slice(group);
    }
    if !rest.is_empty() {
        let at = at(whole);
        block[at..at + rest.len()].copy_from_slice(rest);
    }
}

/// Where a product's f32 rows come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// One (m x k) row-major buffer.
    Stored(&'a [f32]),
    /// Made one at a time.
    Made(&'a dyn RowSource),
}

/// A weight as `B` tiles: `tiles` holds, for each block of [`T`] output
/// columns of `np` (a multiple of [`BLOCK`]), `steps` tiles of depth.
pub(super) struct Weights<'a> {
    pub format: Format,
    /// Output features.
    pub n: usize,
    /// `n` rounded up to [`BLOCK`].
    pub np: usize,
    /// Tiles of depth per column block.
    pub steps: usize,
    pub tiles: &'a [u8],
}

/// `x W` with `a` holding `m` rows of activations in `w`'s format, each
/// `steps * 64` bytes long and `stride` bytes from the last: raw sums (f32
/// for bf16, i32 bits for int8) in a fresh (m x n) buffer.
/// `finish(rows, columns, out)` runs once per task, after its tiles, on the
/// rows and output columns the task wrote (to add the bias, scale, apply the
/// activation).
pub(super) fn product(
    a: &[u8],
    stride: usize,
    m: usize,
    w: &Weights,
    finish: impl Fn(Range<usize>, Range<usize>, Out) + Sync,
) -> Vec<f32> {
    let n = w.n;
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    if m == 0 || n == 0 {
        return y;
    }
    let threads = match m * w.np * w.steps * ROW_BYTES {
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
        let span = cols.start * BLOCK..n.min(cols.end * BLOCK);
        if span.is_empty() {
            return;
        }
        // SAFETY: the task writes `rows` x the columns of `cols` only, inside
        // the m x n buffer; `a` holds m rows `stride` bytes apart.
        unsafe { task(a, stride, w, rows.clone(), cols, out) };
        finish(rows, span, out);
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
/// in cache.
///
/// # Safety
/// `out` points at an m x n buffer that `rows` and `cols` lie within; no
/// other thread writes these elements; AMX was detected for `w.format`.
unsafe fn task(
    a: &[u8],
    stride: usize,
    w: &Weights,
    rows: Range<usize>,
    cols: Range<usize>,
    out: Out,
) {
    let (n, steps) = (w.n, w.steps);
    let mut tile = [0f32; BLOCK * BLOCK];
    let mut configured = (0, 0);
    let amx = amx(w.format);
    for cb in cols {
        let col0 = cb * BLOCK;
        if col0 >= n {
            break;
        }
        let ncols = BLOCK.min(n - col0);
        let b0 = &w.tiles[(2 * cb) * steps * TILE_BYTES..];
        let b1 = &w.tiles[(2 * cb + 1) * steps * TILE_BYTES..];
        for r0 in rows.clone().step_by(BLOCK) {
            let nrows = BLOCK.min(rows.end - r0);
            let shape = (nrows.min(T), nrows.saturating_sub(T));
            if amx && shape != configured {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AMX was detected and permitted before any matrix
                // was made.
                unsafe {
                    tiles::configure(shape.0, shape.1)
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
            // SAFETY: `a` holds `nrows` rows `stride` bytes apart from row r0,
            // `b0` and `b1` `steps` tiles each, `c` room for nrows rows of
            // 32, `ldc` apart; the tiles were configured for these rows, or
            // the CPU has the AVX-512 instruction (`engine`).
            unsafe {
                let (a, b0, b1) = (a[r0 * stride..].as_ptr(), b0.as_ptr(), b1.as_ptr());
                let c = c.cast::<u8>();
                match (amx, w.format, shape.1) {
                    (false, Format::Bf16, _) => {
                        dots::bf16_block(a, stride, b0, b1, steps, c, ldc, nrows)
                    }
                    (false, Format::Int8, _) => {
                        dots::int8_block(a, stride, b0, b1, steps, c, ldc, nrows)
                    }
                    (true, Format::Bf16, 0) => tiles::bf16_block1(a, stride, b0, b1, steps, c, ldc),
                    (true, Format::Bf16, _) => tiles::bf16_block2(a, stride, b0, b1, steps, c, ldc),
                    (true, Format::Int8, 0) => tiles::int8_block1(a, stride, b0, b1, steps, c, ldc),
                    (true, Format::Int8, _) => tiles::int8_block2(a, stride, b0, b1, steps, c, ldc),
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
    if amx {
        // SAFETY: releases the tile state this task configured.
        unsafe { tiles::release() };
    }
}

/// The tile product with AVX-512 dot products, for CPUs without AMX: a
/// 64-byte tile row of weights (16 columns by one group of depth) is one
/// register, and the matching 4 bytes of each row of activations one
/// broadcast.
#[cfg(target_arch = "x86_64")]
mod dots {
    use std::arch::x86_64::*;

    use super::{ROW_BYTES, T};

    /// Most rows per register tile: 12 x 2 sums, 2 weight registers and a
    /// broadcast are 27 of the 32 registers.
    const ROWS: usize = 12;
    /// Groups of depth ahead that the kernel prefetches weights (4 KB of
    /// each of the two streams), into level 2 (`PREFETCHT1`). A 10-token
    /// query streams the text tower from memory; 64 made it about 6%
    /// faster than 16 (p50 4.13 to 4.43 against 4.55 to 4.74 ms in bf16 on
    /// Zen 4, alternated in one process), and 16 images at a time the same;
    /// 128 and 256 were no better. Fetching to level 2 rather than level 1
    /// took the bf16 query from 5.64 to 4.60 ms p50 and int8's from 3.17 to
    /// 2.99 (2.75 to 2.64 in a second run), the two alternated query by
    /// query in one process; images did not slow (BENCHMARKS.md).
    const PREFETCH: usize = 64;

    /// CPUID says AVX-512F and BW with BF16 (first) and with VNNI (second).
    pub fn detect() -> (bool, bool) {
        let base = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw");
        (
            base && std::arch::is_x86_feature_detected!("avx512bf16"),
            base && std::arch::is_x86_feature_detected!("avx512vnni"),
        )
    }

    /// `NAME` computes `c[0..rows, 0..32] = a * [b0 b1]` as the AMX kernels
    /// do, from `rows` rows of `a` (`sa` bytes apart) and `steps` weight
    /// tiles at `b0` and `b1`, into 4-byte sums in rows `ldc` elements
    /// apart. The rows split as evenly as possible into register tiles of at
    /// most [`ROWS`]; a tile of one or two rows splits the depth between
    /// four or two sets of sums, so that enough are in flight to cover the
    /// instruction's latency.
    macro_rules! kernels {
        ($name:ident, $tile:ident, $features:literal, $dot:expr, $add:expr) => {
            /// # Safety
            /// The pointers are valid for those extents; `steps > 0`;
            /// `rows` is 1 to 32; the CPU has the instruction.
            #[allow(clippy::too_many_arguments)] // the AMX kernels' and the rows
            #[target_feature(enable = $features)]
            pub unsafe fn $name(
                a: *const u8,
                sa: usize,
                b0: *const u8,
                b1: *const u8,
                steps: usize,
                c: *mut u8,
                ldc: usize,
                rows: usize,
            ) {
                for (r, m) in crate::model::gemm::even_parts(rows, ROWS) {
                    // SAFETY: rows r..r + m of the caller's.
                    unsafe {
                        let (a, c) = (a.add(r * sa), c.add(4 * r * ldc));
                        let groups = steps * T;
                        match m {
                            12 => $tile::<12, 1>(a, sa, b0, b1, groups, c, ldc),
                            11 => $tile::<11, 1>(a, sa, b0, b1, groups, c, ldc),
                            10 => $tile::<10, 1>(a, sa, b0, b1, groups, c, ldc),
                            9 => $tile::<9, 1>(a, sa, b0, b1, groups, c, ldc),
                            8 => $tile::<8, 1>(a, sa, b0, b1, groups, c, ldc),
                            7 => $tile::<7, 1>(a, sa, b0, b1, groups, c, ldc),
                            6 => $tile::<6, 1>(a, sa, b0, b1, groups, c, ldc),
                            5 => $tile::<5, 1>(a, sa, b0, b1, groups, c, ldc),
                            4 => $tile::<4, 1>(a, sa, b0, b1, groups, c, ldc),
                            3 => $tile::<3, 1>(a, sa, b0, b1, groups, c, ldc),
                            2 => $tile::<2, 2>(a, sa, b0, b1, groups, c, ldc),
                            1 => $tile::<1, 4>(a, sa, b0, b1, groups, c, ldc),
                            _ => unreachable!("register tiles have 1 to {ROWS} rows"),
                        }
                    }
                }
            }

            /// `M` rows by 32 columns over `groups` groups of depth (a tile
            /// row each), in `S` sets of sums taken in turn.
            ///
            /// # Safety
            /// As the caller's, for `M` rows.
            #[target_feature(enable = $features)]
            unsafe fn $tile<const M: usize, const S: usize>(
                a: *const u8,
                sa: usize,
                b0: *const u8,
                b1: *const u8,
                groups: usize,
                c: *mut u8,
                ldc: usize,
            ) {
                let mut lo = [[_mm512_setzero_si512(); M]; S];
                let mut hi = [[_mm512_setzero_si512(); M]; S];
                // One group of depth into set `$set` (a macro, not a closure,
                // so that it is compiled with this function's features).
                macro_rules! group {
                    ($g:expr, $set:expr) => {
                        // SAFETY: group $g < groups of each row and tile.
                        unsafe {
                            let at = $g * ROW_BYTES;
                            _mm_prefetch::<_MM_HINT_T1>(
                                b0.wrapping_add(at + PREFETCH * ROW_BYTES) as *const i8
                            );
                            _mm_prefetch::<_MM_HINT_T1>(
                                b1.wrapping_add(at + PREFETCH * ROW_BYTES) as *const i8
                            );
                            let w0 = _mm512_loadu_si512(b0.add(at).cast());
                            let w1 = _mm512_loadu_si512(b1.add(at).cast());
                            for i in 0..M {
                                let x = _mm512_set1_epi32(
                                    a.add(i * sa + 4 * $g).cast::<i32>().read_unaligned(),
                                );
                                lo[$set][i] = $dot(lo[$set][i], x, w0);
                                hi[$set][i] = $dot(hi[$set][i], x, w1);
                            }
                        }
                    };
                }
                let mut g = 0;
                while g + S <= groups {
                    for set in 0..S {
                        group!(g + set, set);
                    }
                    g += S;
                }
                while g < groups {
                    group!(g, 0);
                    g += 1;
                }
                for set in 1..S {
                    for i in 0..M {
                        lo[0][i] = $add(lo[0][i], lo[set][i]);
                        hi[0][i] = $add(hi[0][i], hi[set][i]);
                    }
                }
                for i in 0..M {
                    // SAFETY: row i's 32 sums.
                    unsafe {
                        let row = c.add(4 * i * ldc);
                        _mm512_storeu_si512(row.cast(), lo[0][i]);
                        _mm512_storeu_si512(row.add(64).cast(), hi[0][i]);
                    }
                }
            }
        };
    }

    kernels!(
        bf16_block,
        bf16_tile,
        "avx512f,avx512bw,avx512bf16",
        |sum: __m512i, x: __m512i, w: __m512i| {
            // SAFETY (inside `group!`'s unsafe block): a bf16 vector is 32
            // u16 lanes, as the bits of `x` and `w`.
            let (x, w) = (
                std::mem::transmute::<__m512i, __m512bh>(x),
                std::mem::transmute::<__m512i, __m512bh>(w),
            );
            _mm512_castps_si512(_mm512_dpbf16_ps(_mm512_castsi512_ps(sum), x, w))
        },
        |p: __m512i, q: __m512i| _mm512_castps_si512(_mm512_add_ps(
            _mm512_castsi512_ps(p),
            _mm512_castsi512_ps(q)
        ))
    );
    kernels!(
        int8_block,
        int8_tile,
        "avx512f,avx512bw,avx512vnni",
        |sum: __m512i, x: __m512i, w: __m512i| _mm512_dpbusd_epi32(sum, x, w),
        |p: __m512i, q: __m512i| _mm512_add_epi32(p, q)
    );
}

#[cfg(target_arch = "x86_64")]
mod tiles {
    use std::arch::asm;

    use super::{ROW_BYTES, T, TILE_BYTES};

    /// A tile configuration (palette 1): tmm0-1 the sums of the top rows,
    /// tmm2-3 of the bottom rows, tmm4-5 their activations, tmm6-7 weights;
    /// every row 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// CPUID says AMX-TILE and AMX-BF16 (first) and AMX-INT8 (second), and
    /// Linux grants this process the tile data state
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`).
    #[cfg(target_os = "linux")]
    pub fn detect() -> (bool, bool) {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        if !std::arch::is_x86_feature_detected!("avx512f")
            || !std::arch::is_x86_feature_detected!("avx512bw")
        {
            return (false, false);
        }
        // CPUID leaf 7 exists on every CPU with AVX-512.
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let bit = |b: u32| leaf7.edx & (1 << b) != 0;
        let (tile, bf16, int8) = (bit(24), bit(22), bit(25));
        if !tile || !(bf16 || int8) {
            return (false, false);
        }
        // SAFETY: a plain system call; it fails (non-zero) where the kernel
        // does not support or allow tile data.
        let granted = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        } == 0;
        (granted && bf16, granted && int8)
    }

    /// Configures this thread's tiles for `top` (1 to 16) rows and `bottom`
    /// (0 to 16) more.
    ///
    /// # Safety
    /// [`detect`] found AMX.
    pub unsafe fn configure(top: usize, bottom: usize) {
        let (top, bottom) = (top as u8, bottom as u8);
        let width = |rows: u8| if rows == 0 { 0 } else { ROW_BYTES as u16 };
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
    /// [`detect`] found AMX.
    pub unsafe fn release() {
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// The two kernels of one instruction: `NAME2` computes
    /// `c[0..16 + bottom, 0..32] = a * [b0 b1]` from `a` rows of `sa` bytes
    /// (16, then `bottom` as configured) and `b0`, `b1` `steps` weight
    /// tiles each (16 columns apiece), into 4-byte sums in rows `ldc`
    /// elements apart; `NAME1` the same for the top rows only.
    macro_rules! kernels {
        ($name1:ident, $name2:ident, $op:literal) => {
            /// # Safety
            /// [`configure`] ran on this thread with `bottom > 0`; the
            /// pointers are valid for those extents; `steps > 0`; the CPU
            /// has the instruction.
            pub unsafe fn $name2(
                a: *const u8,
                sa: usize,
                b0: *const u8,
                b1: *const u8,
                steps: usize,
                c: *mut u8,
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
                        concat!($op, " tmm0, tmm4, tmm6"),
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        concat!($op, " tmm1, tmm4, tmm7"),
                        "tileloadd tmm5, [{a2} + {sa}*1]",
                        concat!($op, " tmm2, tmm5, tmm6"),
                        concat!($op, " tmm3, tmm5, tmm7"),
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
                        a2 = inout(reg) a.add(T * sa) => _,
                        b0 = inout(reg) b0 => _,
                        b1 = inout(reg) b1 => _,
                        n = inout(reg) steps => _,
                        sa = in(reg) sa,
                        sb = in(reg) ROW_BYTES,
                        tb = in(reg) TILE_BYTES,
                        c = in(reg) c,
                        c1 = in(reg) c.add(4 * T),
                        c2 = in(reg) c.add(4 * T * ldc),
                        c3 = in(reg) c.add(4 * (T * ldc + T)),
                        sc = in(reg) ldc * 4,
                        options(nostack),
                    );
                }
            }

            /// # Safety
            /// [`configure`] ran on this thread; the pointers are valid for
            /// those extents; `steps > 0`; the CPU has the instruction.
            pub unsafe fn $name1(
                a: *const u8,
                sa: usize,
                b0: *const u8,
                b1: *const u8,
                steps: usize,
                c: *mut u8,
                ldc: usize,
            ) {
                unsafe {
                    asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "2:",
                        "tileloadd tmm4, [{a} + {sa}*1]",
                        "tileloadd tmm6, [{b0} + {sb}*1]",
                        concat!($op, " tmm0, tmm4, tmm6"),
                        "tileloadd tmm7, [{b1} + {sb}*1]",
                        concat!($op, " tmm1, tmm4, tmm7"),
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
                        sa = in(reg) sa,
                        sb = in(reg) ROW_BYTES,
                        tb = in(reg) TILE_BYTES,
                        c = in(reg) c,
                        c1 = in(reg) c.add(4 * T),
                        sc = in(reg) ldc * 4,
                        options(nostack),
                    );
                }
            }
        };
    }

    kernels!(bf16_block1, bf16_block2, "tdpbf16ps");
    kernels!(int8_block1, int8_block2, "tdpbusd");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_laid_out_from_their_own_memory_when_stored_in_order() {
        if !available(Format::Int8) {
            return;
        }
        let values: Vec<f32> = (0..6 * 4).map(|i| i as f32 * 0.25 - 2.0).collect();
        let weight =
            candle_core::Tensor::from_vec(values.clone(), (6, 4), &candle_core::Device::Cpu)
                .unwrap();
        let lent = |w: &[f32], n: usize, k: usize| (w.as_ptr() as usize, w.to_vec(), n, k);
        let (at, seen, n, k) = with_rows(Format::Int8, &weight, lent).unwrap().unwrap();
        let (storage, _) = weight.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            panic!("a CPU tensor")
        };
        assert_eq!(at, cpu.as_slice::<f32>().unwrap().as_ptr() as usize);
        assert_eq!((seen, n, k), (values.clone(), 6, 4));
        drop(storage);
        // A view out of order, or another dtype, gives the same values
        // converted.
        let (_, seen, n, k) = with_rows(Format::Int8, &weight.t().unwrap().t().unwrap(), lent)
            .unwrap()
            .unwrap();
        assert_eq!((seen, n, k), (values.clone(), 6, 4));
        let transposed = weight.t().unwrap().contiguous().unwrap().t().unwrap();
        let (_, seen, _, _) = with_rows(Format::Int8, &transposed, lent).unwrap().unwrap();
        assert_eq!(seen, values);
        let half = weight.to_dtype(candle_core::DType::BF16).unwrap();
        let (_, seen, _, _) = with_rows(Format::Int8, &half, lent).unwrap().unwrap();
        assert_eq!(seen, values);
        // One row of a larger tensor starts where that row lies.
        let second = weight.narrow(0, 2, 3).unwrap();
        let (_, seen, n, _) = with_rows(Format::Int8, &second, lent).unwrap().unwrap();
        assert_eq!((seen.as_slice(), n), (&values[8..20], 3));
    }

    #[test]
    fn activation_rows_4_kb_apart_move_a_line_further() {
        let zeros = |n, k| vec![0f32; n * k];
        let bf16 = |k| {
            let (m, _) = TileMatrix::<u16>::new(Format::Bf16, &zeros(32, k), 32, k, |_, _| ());
            m.row_stride::<u16>() * 2
        };
        let int8 = |k| {
            let (m, _) = TileMatrix::<i8>::new(Format::Int8, &zeros(32, k), 32, k, |_, _| ());
            m.row_stride::<u8>()
        };
        assert_eq!(
            [bf16(512), bf16(768), bf16(2048), bf16(4096)],
            [1024, 1536, 4160, 8256]
        );
        assert_eq!(
            [int8(2048), int8(3072), int8(4000), int8(4096)],
            [2048, 3072, 4032, 4160]
        );
    }

    #[test]
    fn offsets_cover_each_tile_once() {
        for format in [Format::Bf16, Format::Int8] {
            let depth = format.depth();
            let mut seen = vec![false; T * depth];
            for kk in 0..depth {
                for o in 0..T {
                    let at = format.offset(kk, o);
                    assert!(!seen[at], "{format:?} ({kk}, {o})");
                    seen[at] = true;
                }
            }
            assert!(seen.iter().all(|&s| s));
            // The next tile of depth starts a tile further on.
            assert_eq!(format.offset(depth, 0), T * depth);
        }
    }
}
