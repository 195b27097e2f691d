//! clipdex: layer 0 of the graph, the only place its lists are kept: per
//! point a row of neighbour numbers and, beside it, their distances.
//!
//! Upper layers keep hnsw_rs's lists of `Arc`s, reached through five
//! dependent reads (the point, its lock, the lists, the layer's list, each
//! neighbour's entry). Layer 0 holds every point and twice the connections,
//! so there a list of `Arc`s cost about 1.5 KB a point and an allocation per
//! neighbour. Here a point's layer-0 neighbours are one row of numbers, and a
//! number leads straight to its vector, so that expanding a point costs two
//! rounds of misses (its row, then the vectors). The distances, which only
//! the writers read (to keep the nearest when a row is full, and to save the
//! graph), sit in their own rows so that the search's rows stay dense.
//!
//! A writer holds the point's list lock (`Point::neighbours`) while it
//! changes the point's row. Readers need no lock: a row read during a change
//! may mix old and new neighbours, every one of them a point of the graph.
//!
//! Points are numbered in the order they are added. Storage grows in
//! chunks that never move, zeroed by the system until first written.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Points per chunk.
const CHUNK: usize = 1 << 14;
/// Chunks at most (2^28 points).
const CHUNKS: usize = 1 << 14;

pub(crate) struct Level0 {
    /// Numbers per row (layer 0 keeps at most twice the connections).
    width: usize,
    next: AtomicU32,
    chunks: Box<[OnceLock<Chunk>]>,
}

struct Chunk {
    /// Per point: the count, then `width` numbers.
    rows: Box<[AtomicU32]>,
    /// Per point: `width` distances (`f32` bits), in the row's order.
    dists: Box<[AtomicU32]>,
    /// Per point: its vector's address and length, and the point's address.
    slots: Box<[AtomicUsize]>,
}

/// `n` zeroed atomics, from zeroed memory the system hands out untouched.
fn zeroed<A>(n: usize) -> Box<[A]> {
    let layout = std::alloc::Layout::array::<A>(n).expect("chunk size");
    // SAFETY: a non-zero layout; `A` is an atomic integer, for which all
    // zero bytes are a valid value, so the zeroed allocation is `n` valid
    // `A`s, owned by the box made from it.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut A;
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, n))
    }
}

impl Level0 {
    pub(crate) fn new(max_nb_connection: usize) -> Self {
        Level0 {
            width: 2 * max_nb_connection,
            next: AtomicU32::new(0),
            chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
        }
    }

    fn chunk(&self, n: u32) -> &Chunk {
        self.chunks[n as usize / CHUNK].get_or_init(|| Chunk {
            rows: zeroed(CHUNK * (self.width + 1)),
            dists: zeroed(CHUNK * self.width),
            slots: zeroed(CHUNK * 3),
        })
    }

    /// Numbers handed out so far.
    pub(crate) fn len(&self) -> usize {
        self.next.load(Ordering::Acquire) as usize
    }

    /// Numbers a point whose vector is `vector` and which lives at `point`
    /// (with an empty row).
    pub(crate) fn add<T>(&self, vector: &[T], point: usize) -> u32 {
        let n = self.next.fetch_add(1, Ordering::AcqRel);
        assert!((n as usize) < CHUNK * CHUNKS, "too many points");
        let slots = &self.chunk(n).slots[(n as usize % CHUNK) * 3..][..3];
        slots[0].store(vector.as_ptr() as usize, Ordering::Relaxed);
        slots[1].store(vector.len(), Ordering::Relaxed);
        slots[2].store(point, Ordering::Release);
        n
    }

    /// Gives number `n` to a point as [`Self::add`] does (loading a graph
    /// saved with its numbers; the loader gives each number once).
    pub(crate) fn add_at<T>(&self, n: u32, vector: &[T], point: usize) {
        assert!((n as usize) < CHUNK * CHUNKS, "too many points");
        let slots = &self.chunk(n).slots[(n as usize % CHUNK) * 3..][..3];
        slots[0].store(vector.as_ptr() as usize, Ordering::Relaxed);
        slots[1].store(vector.len(), Ordering::Relaxed);
        slots[2].store(point, Ordering::Release);
        self.next.fetch_max(n + 1, Ordering::AcqRel);
    }

    fn row_of(&self, n: u32) -> &[AtomicU32] {
        &self.chunk(n).rows[(n as usize % CHUNK) * (self.width + 1)..][..self.width + 1]
    }

    /// Numbers per row at most.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// Sets point `n`'s row to `entries` (number, distance), the first
    /// `width` of them. The caller holds the point's list lock.
    pub(crate) fn set_entries(&self, n: u32, entries: &[(u32, f32)]) {
        let row = self.row_of(n);
        let dists = self.dists_of(n);
        let count = entries.len().min(self.width);
        for (i, &(m, d)) in entries[..count].iter().enumerate() {
            dists[i].store(d.to_bits(), Ordering::Relaxed);
            row[1 + i].store(m, Ordering::Relaxed);
        }
        row[0].store(count as u32, Ordering::Release);
    }

    /// Sets entry `i` of point `n`'s row to number `m` (loading, where a
    /// neighbour's number is known only once every layer is read).
    pub(crate) fn set_number(&self, n: u32, i: usize, m: u32) {
        self.row_of(n)[1 + i].store(m, Ordering::Release);
    }

    /// Point `n`'s row with its distances, into `out`.
    pub(crate) fn entries(&self, n: u32, out: &mut Vec<(u32, f32)>) {
        let row = self.row_of(n);
        let dists = self.dists_of(n);
        let count = (row[0].load(Ordering::Acquire) as usize).min(self.width);
        out.clear();
        out.extend((0..count).map(|i| {
            (
                row[1 + i].load(Ordering::Relaxed),
                f32::from_bits(dists[i].load(Ordering::Relaxed)),
            )
        }));
    }

    fn dists_of(&self, n: u32) -> &[AtomicU32] {
        &self.chunk(n).dists[(n as usize % CHUNK) * self.width..][..self.width]
    }

    /// Point `n`'s row, into `out`.
    pub(crate) fn row(&self, n: u32, out: &mut Vec<u32>) {
        let row = self.row_of(n);
        let count = (row[0].load(Ordering::Acquire) as usize).min(self.width);
        out.clear();
        out.extend(row[1..=count].iter().map(|m| m.load(Ordering::Relaxed)));
    }

    /// Where point `n`'s row starts, to prefetch.
    pub(crate) fn row_address(&self, n: u32) -> *const u8 {
        self.row_of(n).as_ptr() as *const u8
    }

    /// Where point `n`'s slot is, to prefetch.
    pub(crate) fn slot_address(&self, n: u32) -> *const u8 {
        self.chunk(n).slots[(n as usize % CHUNK) * 3..].as_ptr() as *const u8
    }

    /// Point `n`'s vector (address and length) and the point's address.
    pub(crate) fn slot(&self, n: u32) -> (usize, usize, usize) {
        let slots = &self.chunk(n).slots[(n as usize % CHUNK) * 3..][..3];
        let point = slots[2].load(Ordering::Acquire);
        (
            slots[0].load(Ordering::Relaxed),
            slots[1].load(Ordering::Relaxed),
            point,
        )
    }
}
