//! The HNSW index of image embeddings (hnsw_rs), keyed by photo id, with its
//! persistence and deletions.
//!
//! hnsw_rs cannot delete: a removed or replaced id is marked dead and filtered
//! out of every search, and the graph is rebuilt from the live vectors when
//! the dead share passes `REBUILD_DEAD_FRACTION`. The graph is saved as a
//! generation folder (`gen-N/`) named by `CURRENT`, which is replaced
//! atomically (temporary file, fsync, rename), so a torn write leaves the
//! previous generation in use. The sled store holds the same vectors and is
//! the source of truth: whatever the saved graph lacks is re-inserted from it.
//!
//! Vectors are unit length and the distance is `1 - dot`
//! ([`distance::DistDot`], clamped at 0: rounding can take a vector's dot
//! product with itself just above 1).
//!
//! hnsw_rs is patched (`vendor/hnsw_rs`, through `[patch.crates-io]`): its
//! layer search allocated for every point it visited; see
//! `vendor/hnsw_rs/PATCHES.md`.

use crate::common::fs::{sync_dir, write_synced};
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Instant;

use hnsw_rs::prelude::{Hnsw, HnswIo};
use rustc_hash::{FxHashMap, FxHashSet};

pub mod distance;
pub mod engine;
pub mod milvus;
pub mod plan;

use distance::DistDot;
pub use engine::{EngineConfig, Vectors};
pub use plan::{CostEstimates, Plan};

/// Graph connectivity (M).
const MAX_CONNECTIONS: usize = 24;
const MAX_LAYERS: usize = 16;
const EF_CONSTRUCTION: usize = 200;
/// Search breadth floor; raised to k for larger k.
pub const EF_SEARCH: usize = 64;
/// Dead entries over total at which the graph is rebuilt.
pub const REBUILD_DEAD_FRACTION: f64 = 0.2;
const BASENAME: &str = "clipdex";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vector engine {address}: {message}")]
    Engine { address: String, message: String },
    #[error("vector index I/O at {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("vector index: {0}")]
    Hnsw(String),
    #[error("vector of dimension {got}, the index holds {want}")]
    Dimension { got: usize, want: usize },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A query of `dim` dimensions, or the error naming both.
fn check_dim(query: &[f32], dim: usize) -> Result<()> {
    if query.len() == dim {
        Ok(())
    } else {
        Err(Error::Dimension {
            got: query.len(),
            want: dim,
        })
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Scales a vector to unit length (in f64, so a stored vector's dot with
/// itself stays within the rounding hnsw_rs tolerates).
pub fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if norm == 0.0 {
        v.to_vec()
    } else {
        v.iter().map(|&x| (x as f64 / norm) as f32).collect()
    }
}

/// Ids in the saved graph, and checksums of its files, next to it.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Members {
    dim: usize,
    live: Vec<u64>,
    dead: Vec<u64>,
    /// (file name, size, blake3) of every graph file (the graph and, saved
    /// before `data`, the data file). hnsw_rs exits the process on a
    /// truncated file, so nothing unverified is handed to it.
    #[serde(default)]
    files: Vec<(String, u64, String)>,
    /// The data file, in hnsw_rs's format 5 (absent from graphs saved
    /// before it).
    #[serde(default)]
    data: Option<DataFile>,
}

/// The vectors a generation saved: hnsw_rs's data file in format 5 holds
/// them in the order the graph numbers its points, which a loaded graph
/// keeps and insertion extends. So the next generation's data file is this
/// one (a hard link) with the points numbered since appended: a save after
/// adding photos writes the graph and the new vectors, not every vector
/// again. The bytes after `size` belong to a later generation, or to a save
/// that did not finish, and are not read.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq)]
struct DataFile {
    /// Points numbered 0 to `points - 1`.
    points: usize,
    /// Their bytes, the header included.
    size: u64,
    /// The blake3 of each [`PIECE`] of those bytes (the last may be
    /// shorter), so that an appending save hashes only what it wrote.
    pieces: Vec<String>,
}

/// The data file's name in a generation.
fn data_file_name() -> String {
    format!("{BASENAME}.hnsw.data")
}

/// A rebuilt graph's data file, written before its first save links it
/// into a generation.
const STAGED: &str = "rebuilt.hnsw.data";

/// Bytes of the data file hashed apart (small in tests, so that their
/// files span many pieces).
const PIECE: u64 = if cfg!(test) { 4096 } else { 64 << 20 };

/// Bytes of a data file of `points` vectors of `dim`: the header (a magic
/// and the dimension), then per point a magic, its id, its length and the
/// vector.
fn data_size(points: usize, dim: usize) -> u64 {
    4 + 8 + points as u64 * (4 + 8 + 8 + 4 * dim as u64)
}

/// A writer that hashes what goes through it into [`PIECE`]s counted from
/// the start of the file, as [`hash_pieces`] reads them back, so that a
/// save need not read its gigabytes again to hash them.
struct PieceHasher<W> {
    inner: W,
    hasher: blake3::Hasher,
    /// Bytes of the current piece hashed so far.
    filled: u64,
    pieces: Vec<String>,
}

impl<W: std::io::Write> PieceHasher<W> {
    /// A writer at byte `at` of the file at `path`: the part of that piece
    /// before `at` is read from the file first.
    fn new(inner: W, path: &Path, at: u64) -> Result<Self> {
        use std::io::{Read, Seek, SeekFrom};
        let start = at / PIECE * PIECE;
        let mut hasher = blake3::Hasher::new();
        if at > start {
            let mut file = std::fs::File::open(path).map_err(io(path))?;
            file.seek(SeekFrom::Start(start)).map_err(io(path))?;
            hasher
                .update_reader(file.take(at - start))
                .map_err(io(path))?;
            if hasher.count() != at - start {
                return Err(Error::Hnsw(format!(
                    "{} is shorter than its record",
                    path.display()
                )));
            }
        }
        Ok(Self {
            inner,
            hasher,
            filled: at - start,
            pieces: Vec::new(),
        })
    }

    /// The pieces from the one `at` fell in to the end.
    fn finish(mut self) -> Vec<String> {
        if self.filled > 0 {
            self.pieces
                .push(self.hasher.finalize().to_hex().to_string());
        }
        self.pieces
    }
}

impl<W: std::io::Write> std::io::Write for PieceHasher<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let take = ((PIECE - self.filled) as usize).min(rest.len());
            self.hasher.update(&rest[..take]);
            self.filled += take as u64;
            rest = &rest[take..];
            if self.filled == PIECE {
                self.pieces
                    .push(self.hasher.finalize().to_hex().to_string());
                self.hasher.reset();
                self.filled = 0;
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that hashes the whole of what goes through it.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The blake3 of each [`PIECE`] of the first `size` bytes of the file at
/// `path`.
fn hash_pieces(path: &Path, size: u64) -> Result<Vec<String>> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file).take(size);
    let mut pieces = Vec::new();
    loop {
        let mut hasher = blake3::Hasher::new();
        hasher
            .update_reader(reader.by_ref().take(PIECE))
            .map_err(io(path))?;
        if hasher.count() == 0 {
            break;
        }
        pieces.push(hasher.finalize().to_hex().to_string());
        if hasher.count() < PIECE {
            break;
        }
    }
    if reader.limit() > 0 {
        return Err(Error::Hnsw(format!(
            "{} is shorter than its record",
            path.display()
        )));
    }
    Ok(pieces)
}

/// Size and blake3 of a file, read in pieces (a million photos' graph is
/// gigabytes; a map would count them all in the resident set).
fn checksum(path: &Path) -> Result<(u64, String)> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(std::io::BufReader::with_capacity(1 << 20, file))
        .map_err(io(path))?;
    Ok((hasher.count(), hasher.finalize().to_hex().to_string()))
}

/// The mutable part of the index, behind one lock.
struct State {
    hnsw: Hnsw<'static, f32, DistDot>,
    live: FxHashSet<u64>,
    dead: FxHashSet<u64>,
    /// Each id's point number in the graph, which leads to its vector.
    numbers: FxHashMap<u64, u32>,
    generation: u64,
    /// A data file on disk whose points are this graph's first ones, by
    /// number, and its record: generation `generation`'s, or the one a
    /// rebuild wrote ahead of its first save (none where the generation
    /// was saved before format 5).
    saved_data: Option<(PathBuf, DataFile)>,
    changed: bool,
    /// Counts the changes to the live vectors (inserts, removals, a
    /// rebuild's swap): what the kept [`Sample`] is checked against.
    version: u64,
}

/// Vectors sampled from the library, copied into one block, with their
/// ids: what [`VectorIndex::sample_similarities`] (an evenly spaced sample
/// of the graph) and the Milvus engine keep between queries. Every query
/// with an automatic cutoff compares itself with it. Read from the graph
/// on each query, the vectors lay scattered over the whole index (a cache
/// miss each, and a lookup in the live set), which took 6% of the server's
/// time under text queries at 10,000 photos, more than the graph search.
/// 4 MB for 2,048 vectors of 512.
#[derive(Default)]
pub(crate) struct Sample {
    ids: Vec<u64>,
    /// `ids.len()` rows of `dim`, in the ids' order.
    rows: Vec<f32>,
    /// The first vector's length, which every other one has.
    dim: usize,
}

impl Sample {
    fn push(&mut self, id: u64, v: &[f32]) {
        if self.ids.is_empty() {
            self.dim = v.len();
        }
        assert_eq!(v.len(), self.dim, "vectors of one length");
        self.ids.push(id);
        self.rows.extend_from_slice(v);
    }

    /// The dot product of `query` (unit length) with each vector, as (id,
    /// similarity).
    fn similarities(&self, query: &[f32]) -> Vec<(u64, f32)> {
        self.ids
            .iter()
            .zip(self.rows.chunks_exact(self.dim.max(1)))
            .map(|(&id, v)| (id, distance::dot(query, v)))
            .collect()
    }
}

impl FromIterator<(u64, Vec<f32>)> for Sample {
    fn from_iter<I: IntoIterator<Item = (u64, Vec<f32>)>>(items: I) -> Self {
        let mut sample = Sample::default();
        for (id, v) in items {
            sample.push(id, &v);
        }
        sample
    }
}

/// The vector index of one photo index. Searches share a read lock; changes
/// (a batch of inserts, removals, a swap after a rebuild) take the write lock
/// briefly, so a re-index and searches run at the same time.
pub struct VectorIndex {
    dir: PathBuf,
    dim: usize,
    state: RwLock<State>,
    costs: plan::Costs,
    /// The removal of the generations the last save replaced.
    removal: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The latest sample, the version of the live vectors it was taken at
    /// and the most vectors asked for. A query that finds it stale takes a
    /// new one while holding the lock, so that concurrent queries wait for
    /// it instead of each copying their own.
    #[allow(clippy::type_complexity)]
    sample: std::sync::Mutex<Option<(u64, usize, std::sync::Arc<Sample>)>>,
}

impl Drop for VectorIndex {
    fn drop(&mut self) {
        self.finish_removal();
    }
}

impl State {
    /// Numbers the points added to the graph since the last call.
    fn number_new_points(&mut self) {
        for n in self.numbers.len()..self.hnsw.nb_numbered() {
            if let Some((id, _)) = self.hnsw.numbered_point(n as u32) {
                self.numbers.insert(id as u64, n as u32);
            }
        }
    }

    /// The vector of `id` as the graph holds it (unit length).
    fn vector(&self, id: u64) -> Option<&[f32]> {
        let n = *self.numbers.get(&id)?;
        self.hnsw.numbered_vector(n)
    }
}

fn new_hnsw(capacity: usize) -> Hnsw<'static, f32, DistDot> {
    Hnsw::new(
        MAX_CONNECTIONS,
        capacity.max(10_000),
        MAX_LAYERS,
        EF_CONSTRUCTION,
        DistDot {},
    )
}

impl VectorIndex {
    /// Opens the saved graph in `dir`, or starts an empty one. A missing or
    /// unreadable generation gives an empty index (to be refilled from the
    /// store), never an error that loses the index.
    pub fn open(dir: &Path, dim: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut state = State {
            hnsw: new_hnsw(0),
            live: FxHashSet::default(),
            dead: FxHashSet::default(),
            numbers: FxHashMap::default(),
            generation: 0,
            saved_data: None,
            changed: false,
            version: 0,
        };
        // A rebuild's vectors, written ahead of a save that never came.
        let _ = std::fs::remove_file(dir.join(STAGED));
        if let Ok(name) = std::fs::read_to_string(dir.join("CURRENT")) {
            let name = name.trim();
            state.generation = name
                .strip_prefix("gen-")
                .and_then(|g| g.parse().ok())
                .unwrap_or(0);
            match load_generation(&dir.join(name), dim) {
                Ok((hnsw, members)) => {
                    state.hnsw = hnsw;
                    state.saved_data = members
                        .data
                        .map(|data| (dir.join(name).join(data_file_name()), data));
                    state.live = members.live.into_iter().collect();
                    state.dead = members.dead.into_iter().collect();
                    state.number_new_points();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "vector index unreadable; it will be rebuilt from the store");
                    state.changed = true;
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            dim,
            state: RwLock::new(state),
            costs: plan::Costs::default(),
            removal: Default::default(),
            sample: Default::default(),
        })
    }

    /// How many live vectors the graph saved in `dir` holds, read from its
    /// member list without loading it (0 for none or an unreadable one,
    /// which [`Self::open`] would rebuild).
    pub fn saved_len(dir: &Path) -> usize {
        let Ok(name) = std::fs::read_to_string(dir.join("CURRENT")) else {
            return 0;
        };
        let members = dir.join(name.trim()).join("members.json");
        let Ok(text) = std::fs::read(&members) else {
            return 0;
        };
        /// The member list with its live ids counted, not kept.
        #[derive(serde::Deserialize)]
        struct Count {
            live: Vec<serde::de::IgnoredAny>,
        }
        serde_json::from_slice::<Count>(&text).map_or(0, |c| c.live.len())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.read().live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().live.is_empty()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.read().live.contains(&id)
    }

    /// Live ids.
    pub fn ids(&self) -> BTreeSet<u64> {
        self.read().live.iter().copied().collect()
    }

    /// The vector of a live id, as the graph holds it (unit length).
    pub fn vector(&self, id: u64) -> Option<Vec<f32>> {
        let state = self.read();
        if !state.live.contains(&id) {
            return None;
        }
        state.vector(id).map(<[f32]>::to_vec)
    }

    /// The cosine similarity of `query` to an evenly spaced sample of at
    /// most `n` live vectors (by their place in the graph: the same sample
    /// for the same graph), as (id, similarity).
    pub fn sample_similarities(&self, query: &[f32], n: usize) -> Result<Vec<(u64, f32)>> {
        self.check_dim(query)?;
        let query = unit(query);
        Ok(self.sample(n).similarities(&query))
    }

    /// The sample of at most `n` live vectors for the live vectors as they
    /// are now: the kept one, or a new one.
    fn sample(&self, n: usize) -> std::sync::Arc<Sample> {
        let mut kept = self.sample.lock().unwrap_or_else(|p| p.into_inner());
        let state = self.read();
        match &*kept {
            Some((version, size, sample)) if *version == state.version && *size == n => {
                return sample.clone();
            }
            _ => {}
        }
        let points = state.hnsw.nb_numbered();
        let step = points.div_ceil(n.max(1)).max(1);
        let mut sample = Sample::default();
        for p in (0..points).step_by(step) {
            if let Some((id, v)) = state.hnsw.numbered_point(p as u32)
                && state.live.contains(&(id as u64))
            {
                sample.push(id as u64, v);
            }
        }
        let sample = std::sync::Arc::new(sample);
        *kept = Some((state.version, n, sample.clone()));
        sample
    }

    pub fn dead_fraction(&self) -> f64 {
        let s = self.read();
        let total = s.live.len() + s.dead.len();
        if total == 0 {
            0.0
        } else {
            s.dead.len() as f64 / total as f64
        }
    }

    /// Whether there are changes not yet saved.
    pub fn is_changed(&self) -> bool {
        self.read().changed
    }

    /// Adds vectors. Ids already in the graph (live or dead) are left alone:
    /// the store never reuses an id, so this only happens when re-filling.
    pub fn insert_batch(&self, items: &[(u64, Vec<f32>)]) -> Result<()> {
        if let Some((_, v)) = items.iter().find(|(_, v)| v.len() != self.dim) {
            return Err(Error::Dimension {
                got: v.len(),
                want: self.dim,
            });
        }
        let mut state = self.write();
        let fresh: Vec<(Vec<f32>, u64)> = items
            .iter()
            .filter(|(id, _)| !state.live.contains(id) && !state.dead.contains(id))
            .map(|(id, v)| (unit(v), *id))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let inserted = insert_into(&state.hnsw, &fresh);
        // Whatever the graph took, even from a failed batch, is numbered.
        state.number_new_points();
        state.version += 1;
        inserted?;
        state.live.extend(fresh.iter().map(|(_, id)| *id));
        state.changed = true;
        Ok(())
    }

    /// Marks ids as removed: never returned again.
    pub fn remove(&self, ids: impl IntoIterator<Item = u64>) {
        let mut state = self.write();
        for id in ids {
            if state.live.remove(&id) {
                state.dead.insert(id);
                state.changed = true;
                state.version += 1;
            }
        }
    }

    /// The `k` nearest live vectors to `query` among the ids of `among`
    /// (all when `None`) less `excluded`, as (id, cosine similarity), best
    /// first, and the way they were found: an exact scan of the candidates'
    /// vectors or a graph search with a filter, whichever the measured
    /// costs of earlier queries expect to be faster ([`plan`]). A scan is
    /// exact; a graph search finds about 98% of the true nearest at the
    /// default breadth (BENCHMARKS.md).
    pub fn search_among(
        &self,
        query: &[f32],
        k: usize,
        among: Option<&HashSet<u64>>,
        excluded: &HashSet<u64>,
    ) -> Result<(Vec<(u64, f32)>, Plan)> {
        self.check_dim(query)?;
        let state = self.read();
        if k == 0 || state.live.is_empty() {
            return Ok((Vec::new(), Plan::Scan));
        }
        let live = state.live.len();
        let candidates = among.map_or(live, |ids| ids.len().min(live));
        let share = candidates as f64 / live as f64;
        let ef = EF_SEARCH.max(k);
        let plan = self.costs.choose(candidates, ef, share);
        let start = Instant::now();
        let found = match plan {
            Plan::Scan => scan(&state, &unit(query), k, among, excluded),
            Plan::Graph => {
                let allow =
                    |id: u64| among.is_none_or(|ids| ids.contains(&id)) && !excluded.contains(&id);
                let allow: &dyn Fn(u64) -> bool = &allow;
                let filtered = among.is_some() || !excluded.is_empty();
                graph_search(&state, query, k, ef, filtered.then_some(allow))?
            }
        };
        match plan {
            Plan::Scan => self.costs.observe_scan(candidates, start.elapsed()),
            Plan::Graph => self.costs.observe_graph(ef, share, start.elapsed()),
        }
        Ok((found, plan))
    }

    /// [`Self::search_among`] by an exact scan, whatever it costs.
    pub fn scan(
        &self,
        query: &[f32],
        k: usize,
        among: Option<&HashSet<u64>>,
        excluded: &HashSet<u64>,
    ) -> Result<Vec<(u64, f32)>> {
        self.check_dim(query)?;
        let state = self.read();
        Ok(scan(&state, &unit(query), k, among, excluded))
    }

    /// What the index currently expects each way of searching to cost.
    pub fn cost_estimates(&self) -> CostEstimates {
        self.costs.estimates()
    }

    fn check_dim(&self, query: &[f32]) -> Result<()> {
        check_dim(query, self.dim)
    }

    /// The `k` nearest live vectors by a graph search, as (id, cosine
    /// similarity), best first. `allow` restricts the result to ids it
    /// accepts.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        allow: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<Vec<(u64, f32)>> {
        self.search_with(query, k, EF_SEARCH.max(k), allow)
    }

    /// [`Self::search`] with the search breadth `ef` (candidates kept while
    /// walking the graph; at least `k`): recall against time.
    pub fn search_with(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        allow: Option<&dyn Fn(u64) -> bool>,
    ) -> Result<Vec<(u64, f32)>> {
        self.check_dim(query)?;
        let state = self.read();
        if k == 0 || state.live.is_empty() {
            return Ok(Vec::new());
        }
        graph_search(&state, query, k, ef, allow)
    }

    /// Replaces the graph with one built from `vectors` (the live set). The
    /// new graph is built without holding the lock; searches continue on the
    /// old one until the swap.
    pub fn rebuild(&self, vectors: impl IntoIterator<Item = (u64, Vec<f32>)>) -> Result<()> {
        let items: Vec<(Vec<f32>, u64)> =
            vectors.into_iter().map(|(id, v)| (unit(&v), id)).collect();
        if let Some((v, _)) = items.iter().find(|(v, _)| v.len() != self.dim) {
            return Err(Error::Dimension {
                got: v.len(),
                want: self.dim,
            });
        }
        let hnsw = new_hnsw(items.len() * 2);
        insert_into(&hnsw, &items)?;
        // Its vectors go to disk now, still off the lock, so that the save
        // after the swap writes the graph alone (2 GB less at 1M).
        let staged = match self.stage_data(&hnsw) {
            Ok(staged) => Some(staged),
            Err(e) => {
                tracing::warn!(error = %e, "the rebuilt graph's vectors were not written ahead; its save writes them");
                None
            }
        };
        let mut state = self.write();
        let old = std::mem::replace(&mut state.hnsw, hnsw);
        state.live = items.iter().map(|(_, id)| *id).collect();
        state.dead.clear();
        state.version += 1;
        state.numbers.clear();
        state.number_new_points();
        // The new graph numbers its points afresh.
        state.saved_data = staged;
        state.changed = true;
        drop(state);
        // Freeing a million points' graph takes seconds: not under the lock
        // (it held a search for 6.3 s at 1M, BENCHMARKS.md).
        drop(old);
        Ok(())
    }

    /// Saves the graph as a new generation and switches `CURRENT` to it atomically.
    pub fn save(&self) -> Result<()> {
        // The last save's removal may be of the folder this one writes.
        self.finish_removal();
        let state = self.read();
        if !state.changed {
            return Ok(());
        }
        let started = Instant::now();
        let generation = state.generation + 1;
        let name = format!("gen-{generation}");
        let gen_dir = self.dir.join(&name);
        if gen_dir.exists() {
            std::fs::remove_dir_all(&gen_dir).map_err(io(&gen_dir))?;
        }
        std::fs::create_dir_all(&gen_dir).map_err(io(&gen_dir))?;
        let mut files = Vec::new();
        let mut data = None;
        if !state.live.is_empty() || !state.dead.is_empty() {
            let graph_path = gen_dir.join(format!("{BASENAME}.hnsw.graph"));
            let data_path = gen_dir.join(data_file_name());
            let (mut data_file, kept) = self.data_file_for(&state, &data_path)?;
            let graph_file = std::fs::File::create(&graph_path).map_err(io(&graph_path))?;
            let from = kept.as_ref().map_or(0, |k| k.points);
            // Whole pieces already saved are not hashed again; the files are
            // hashed as they are written, not read back.
            let first = kept.as_ref().map_or(0, |k| (k.size / PIECE) as usize);
            let at = kept.as_ref().map_or(0, |k| k.size);
            // The graph and the vectors are written (and hashed) on two
            // threads: at a million photos they are 0.4 and 2 GB.
            let hnsw = &state.hnsw;
            let mut data_out = std::io::BufWriter::with_capacity(
                1 << 22,
                PieceHasher::new(&mut data_file, &data_path, at)?,
            );
            let (points, graph_sum, new_pieces) = std::thread::scope(|s| {
                let data_path = &data_path;
                let data = s.spawn(move || -> Result<_> {
                    let points = hnsw
                        .dump_numbered_data(&mut data_out, from)
                        .map_err(|e| Error::Hnsw(format!("writing the vectors failed: {e}")))?;
                    let data = data_out
                        .into_inner()
                        .map_err(|e| io(&data_path)(e.into_error()))?;
                    Ok((points, data.finish()))
                });
                let mut graph_out = std::io::BufWriter::with_capacity(
                    1 << 22,
                    Hashing {
                        inner: &graph_file,
                        hasher: blake3::Hasher::new(),
                    },
                );
                let graph = hnsw
                    .dump_numbered_graph(&mut graph_out)
                    .map_err(|e| Error::Hnsw(format!("dump failed: {e}")));
                let data = data.join().expect("writing the vectors does not panic");
                let points = graph?;
                let (data_points, pieces) = data?;
                if data_points != points {
                    return Err(Error::Hnsw(format!(
                        "{points} points in the graph, {data_points} in the vectors"
                    )));
                }
                let graph = graph_out
                    .into_inner()
                    .map_err(|e| io(&graph_path)(e.into_error()))?;
                let graph_sum = (
                    graph.hasher.count(),
                    graph.hasher.finalize().to_hex().to_string(),
                );
                Ok((points, graph_sum, pieces))
            })?;
            let dumped = Instant::now();
            let size = data_size(points, self.dim);
            let written = data_file.metadata().map_err(io(&data_path))?.len();
            if written != size {
                return Err(Error::Hnsw(format!(
                    "{} holds {written} bytes, {size} expected",
                    data_path.display()
                )));
            }
            std::thread::scope(|s| {
                let syncs = [(&graph_file, &graph_path), (&data_file, &data_path)]
                    .map(|(file, path)| s.spawn(move || file.sync_all().map_err(io(path))));
                for sync in syncs {
                    sync.join().expect("a file sync does not panic")?;
                }
                Ok::<_, Error>(())
            })?;
            tracing::debug!(
                dump_and_hash_s = (dumped - started).as_secs_f64(),
                sync_s = dumped.elapsed().as_secs_f64(),
                appended_from = from,
                "graph written"
            );
            let mut pieces = kept.map(|k| k.pieces[..first].to_vec()).unwrap_or_default();
            pieces.extend(new_pieces);
            files.push((format!("{BASENAME}.hnsw.graph"), graph_sum.0, graph_sum.1));
            data = Some(DataFile {
                points,
                size,
                pieces,
            });
        }
        let members = Members {
            dim: self.dim,
            live: state.live.iter().copied().collect(),
            dead: state.dead.iter().copied().collect(),
            files,
            data: data.clone(),
        };
        drop(state);
        let members_file = gen_dir.join("members.json");
        write_synced(
            &members_file,
            &serde_json::to_vec(&members).expect("members serialise"),
        )
        .map_err(io(&members_file))?;
        // Each file is synced (the graph files above, the member list by
        // `write_synced`); their names are synced with the folder.
        sync_dir(&gen_dir).map_err(io(&gen_dir))?;
        let current = self.dir.join("CURRENT");
        write_synced(&current, name.as_bytes()).map_err(io(&current))?;
        {
            let mut state = self.write();
            state.generation = generation;
            state.saved_data = data.map(|data| (gen_dir.join(data_file_name()), data));
            state.changed = false;
        }
        // A rebuild's vectors, now linked into the generation.
        let _ = std::fs::remove_file(self.dir.join(STAGED));
        // Older generations are no longer referenced. Removing one takes
        // seconds at a million photos (its data file, after a rebuild), so
        // it runs on its own thread; the next save, and the drop, wait for it.
        let old: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map_err(io(&self.dir))?
            .flatten()
            .filter(|entry| {
                let file = entry.file_name();
                let file = file.to_string_lossy();
                file.starts_with("gen-") && file != name
            })
            .map(|entry| entry.path())
            .collect();
        if !old.is_empty() {
            let removal = std::thread::spawn(move || {
                for path in old {
                    let _ = std::fs::remove_dir_all(path);
                }
            });
            *self.removal.lock().unwrap_or_else(|p| p.into_inner()) = Some(removal);
        }
        Ok(())
    }

    /// Waits for the removal of older generations a save started.
    fn finish_removal(&self) {
        let removal = self
            .removal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(removal) = removal {
            let _ = removal.join();
        }
    }

    /// The new generation's data file at `path`, and what it keeps of the
    /// current generation's: that file, linked and cut back to its record,
    /// where the graph still numbers those points the same; else a new file.
    fn data_file_for(
        &self,
        state: &State,
        path: &Path,
    ) -> Result<(std::fs::File, Option<DataFile>)> {
        if let Some((current, saved)) = &state.saved_data {
            let linked = || -> std::io::Result<std::fs::File> {
                use std::io::{Seek, SeekFrom};
                if std::fs::metadata(current)?.len() < saved.size {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                std::fs::hard_link(current, path)?;
                let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
                // Bytes past the record are from a save that did not finish.
                file.set_len(saved.size)?;
                file.seek(SeekFrom::End(0))?;
                Ok(file)
            };
            if saved.points <= state.hnsw.nb_numbered() {
                match linked() {
                    Ok(file) => return Ok((file, Some(saved.clone()))),
                    Err(e) => {
                        tracing::warn!(error = %e, "the saved vectors cannot be appended to; writing them all");
                        let _ = std::fs::remove_file(path);
                    }
                }
            }
        }
        let file = std::fs::File::create(path).map_err(io(path))?;
        Ok((file, None))
    }

    /// Writes the vectors of `hnsw` (a rebuild's graph, not yet in use) to
    /// a new data file beside the generations, with its record, for the
    /// next save to link in.
    fn stage_data(&self, hnsw: &Hnsw<'static, f32, DistDot>) -> Result<(PathBuf, DataFile)> {
        let started = Instant::now();
        let path = self.dir.join(STAGED);
        // The name may still be linked into a generation: a new file, not
        // that one cut short.
        let _ = std::fs::remove_file(&path);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 22, PieceHasher::new(file, &path, 0)?);
        let points = hnsw
            .dump_numbered_data(&mut out, 0)
            .map_err(|e| Error::Hnsw(format!("writing the vectors failed: {e}")))?;
        let written = out.into_inner().map_err(|e| io(&path)(e.into_error()))?;
        // Synced here, where nothing waits, so that the save's sync of the
        // linked file has only the graph's appended points left to write.
        written.inner.sync_all().map_err(io(&path))?;
        let size = data_size(points, self.dim);
        let pieces = written.finish();
        tracing::debug!(
            points,
            seconds = started.elapsed().as_secs_f64(),
            "rebuilt graph's vectors written ahead"
        );
        Ok((
            path,
            DataFile {
                points,
                size,
                pieces,
            },
        ))
    }

    /// Size of the saved graph on disk.
    pub fn size_on_disk(&self) -> u64 {
        dir_size(&self.dir)
    }
}

/// The graph search of [`VectorIndex::search_with`], under the caller's lock.
fn graph_search(
    state: &State,
    query: &[f32],
    k: usize,
    ef: usize,
    allow: Option<&dyn Fn(u64) -> bool>,
) -> Result<Vec<(u64, f32)>> {
    let query = unit(query);
    let dead = &state.dead;
    let filter = |id: &usize| -> bool {
        let id = *id as u64;
        !dead.contains(&id) && allow.is_none_or(|f| f(id))
    };
    let ef = ef.max(k);
    let needs_filter = !dead.is_empty() || allow.is_some();
    let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if needs_filter {
            state.hnsw.search_filter(&query, k, ef, Some(&filter))
        } else {
            state.hnsw.search(&query, k, ef)
        }
    }))
    .map_err(|_| Error::Hnsw("search failed".into()))?;
    Ok(found
        .into_iter()
        .filter(|n| filter(&n.d_id))
        .map(|n| (n.d_id as u64, 1.0 - n.distance))
        .take(k)
        .collect())
}

/// The exact `k` nearest live vectors to the unit vector `query` among
/// `among` (all when `None`) less `excluded`, best first, ties by id. The
/// vectors are read where the graph holds them.
fn scan(
    state: &State,
    query: &[f32],
    k: usize,
    among: Option<&HashSet<u64>>,
    excluded: &HashSet<u64>,
) -> Vec<(u64, f32)> {
    // Every numbered point is live unless some were removed (or a failed
    // batch left points the index does not count).
    let all_live = state.live.len() == state.numbers.len();
    let wanted = |id: &u64| (all_live || state.live.contains(id)) && !excluded.contains(id);
    let score = |(id, v): (u64, &[f32])| (id, distance::dot(query, v).min(1.0));
    let mut scored: Vec<(u64, f32)> = match among {
        Some(ids) => ids
            .iter()
            .filter(|id| wanted(id))
            .filter_map(|&id| state.vector(id).map(|v| score((id, v))))
            .collect(),
        None => (0..state.hnsw.nb_numbered() as u32)
            .filter_map(|n| state.hnsw.numbered_point(n))
            .map(|(id, v)| (id as u64, v))
            .filter(|(id, _)| wanted(id))
            .map(score)
            .collect(),
    };
    let best_first = |a: &(u64, f32), b: &(u64, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if scored.len() > k {
        scored.select_nth_unstable_by(k - 1, best_first);
        scored.truncate(k);
    }
    scored.sort_unstable_by(best_first);
    scored
}

fn insert_into(hnsw: &Hnsw<'static, f32, DistDot>, items: &[(Vec<f32>, u64)]) -> Result<()> {
    let refs: Vec<(&Vec<f32>, usize)> = items.iter().map(|(v, id)| (v, *id as usize)).collect();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if refs.len() >= 32 {
            hnsw.parallel_insert(&refs);
        } else {
            for (v, id) in &refs {
                hnsw.insert((v.as_slice(), *id));
            }
        }
    }))
    .map_err(|_| Error::Hnsw("insertion failed".into()))
}

fn load_generation(dir: &Path, dim: usize) -> Result<(Hnsw<'static, f32, DistDot>, Members)> {
    let text = std::fs::read(dir.join("members.json")).map_err(io(dir))?;
    let members: Members =
        serde_json::from_slice(&text).map_err(|e| Error::Hnsw(format!("members: {e}")))?;
    if members.dim != dim {
        return Err(Error::Dimension {
            got: members.dim,
            want: dim,
        });
    }
    if members.live.is_empty() && members.dead.is_empty() {
        return Ok((new_hnsw(0), members));
    }
    let started = Instant::now();
    let listed = if members.data.is_some() { 1 } else { 2 };
    if members.files.len() != listed {
        return Err(Error::Hnsw("graph files are not listed".into()));
    }
    for (name, size, hash) in &members.files {
        if checksum(&dir.join(name))? != (*size, hash.clone()) {
            return Err(Error::Hnsw(format!("{name} does not match its checksum")));
        }
    }
    if let Some(data) = &members.data {
        let points = members.live.len() + members.dead.len();
        if data.points != points || data.size != data_size(points, dim) {
            return Err(Error::Hnsw(
                "the data file's record disagrees with the member list".into(),
            ));
        }
        let path = dir.join(data_file_name());
        if hash_pieces(&path, data.size)? != data.pieces {
            return Err(Error::Hnsw(format!(
                "{} does not match its checksum",
                path.display()
            )));
        }
    }
    let verified = Instant::now();
    // hnsw_rs ties the graph's lifetime to its loader; the loader is small and
    // kept for the life of the process.
    let loader: &'static mut HnswIo = Box::leak(Box::new(HnswIo::new(dir, BASENAME)));
    fn load(loader: &'static mut HnswIo) -> anyhow::Result<Hnsw<'static, f32, DistDot>> {
        loader.load_hnsw::<f32, DistDot>()
    }
    let mut slot = Some(loader);
    let hnsw = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        load(slot.take().expect("called once"))
    }))
    .map_err(|_| Error::Hnsw("graph files are corrupt".into()))?
    .map_err(|e| Error::Hnsw(format!("cannot load graph: {e}")))?;
    if hnsw.get_nb_point() != members.live.len() + members.dead.len() {
        return Err(Error::Hnsw("graph and member list disagree".into()));
    }
    tracing::debug!(
        verify_s = (verified - started).as_secs_f64(),
        load_s = verified.elapsed().as_secs_f64(),
        "graph loaded"
    );
    Ok((hnsw, members))
}

pub(crate) fn dir_size(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors(n: usize, dim: usize) -> Vec<(u64, Vec<f32>)> {
        let mut rng = crate::common::rng::NormalRng::new(3);
        (0..n)
            .map(|i| {
                (
                    i as u64 + 1,
                    unit(&(0..dim).map(|_| rng.normal() as f32).collect::<Vec<_>>()),
                )
            })
            .collect()
    }

    #[test]
    fn finds_stored_vectors_themselves_without_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let index = VectorIndex::open(dir.path(), 32).unwrap();
        let vs = vectors(300, 32);
        index.insert_batch(&vs).unwrap();
        // Exact duplicates too (the same photo at two paths).
        let dup: Vec<_> = vs
            .iter()
            .take(20)
            .map(|(id, v)| (id + 1000, v.clone()))
            .collect();
        index.insert_batch(&dup).unwrap();
        for (id, v) in &vs {
            let hits = index.search(v, 3, None).unwrap();
            assert!(
                hits.iter().any(|(h, _)| h == id),
                "{id} not found in {hits:?}"
            );
            assert!(hits[0].1 > 0.999);
        }
    }

    /// The kept sample is what reading the graph now would give: the same
    /// ids and similarities, and never a removed id, after inserts,
    /// removals and a rebuild.
    #[test]
    fn the_kept_sample_follows_every_change_to_the_live_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let index = VectorIndex::open(dir.path(), 16).unwrap();
        let vs = vectors(400, 16);
        let q = &vs[7].1;
        // What the graph holds now, read point by point.
        let fresh = |index: &VectorIndex, n: usize| -> Vec<(u64, f32)> {
            let state = index.read();
            let points = state.hnsw.nb_numbered();
            let step = points.div_ceil(n).max(1);
            (0..points)
                .step_by(step)
                .filter_map(|p| state.hnsw.numbered_point(p as u32))
                .filter(|(id, _)| state.live.contains(&(*id as u64)))
                .map(|(id, v)| (id as u64, distance::dot(q, v)))
                .collect()
        };
        assert!(index.sample_similarities(q, 64).unwrap().is_empty());
        index.insert_batch(&vs[..200]).unwrap();
        let first = index.sample_similarities(q, 64).unwrap();
        assert_eq!(first, fresh(&index, 64));
        assert_eq!(first.len(), 50, "every fourth of 200");
        // Kept: the same block, so the same answer.
        assert_eq!(index.sample_similarities(q, 64).unwrap(), first);
        assert_eq!(index.sample_similarities(q, 16).unwrap(), fresh(&index, 16));
        index.insert_batch(&vs[200..]).unwrap();
        assert_eq!(index.sample_similarities(q, 64).unwrap(), fresh(&index, 64));
        let sampled: Vec<u64> = index
            .sample_similarities(q, 64)
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect();
        index.remove(sampled.iter().copied().step_by(2));
        let after = index.sample_similarities(q, 64).unwrap();
        assert_eq!(after, fresh(&index, 64));
        assert!(after.iter().all(|(id, _)| index.contains(*id)));
        index.rebuild(vs[..100].iter().cloned()).unwrap();
        let rebuilt = index.sample_similarities(q, 64).unwrap();
        assert_eq!(rebuilt, fresh(&index, 64));
        assert!(rebuilt.iter().all(|(id, _)| *id <= 100));
        assert!(index.sample_similarities(&[1.0; 3], 64).is_err());
    }

    #[test]
    fn removed_ids_never_come_back_and_survive_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let vs = vectors(200, 16);
        {
            let index = VectorIndex::open(dir.path(), 16).unwrap();
            index.insert_batch(&vs).unwrap();
            index.remove((1..=50).collect::<Vec<u64>>());
            index.save().unwrap();
        }
        let index = VectorIndex::open(dir.path(), 16).unwrap();
        assert_eq!(index.len(), 150);
        for (_, v) in vs.iter().take(50) {
            let hits = index.search(v, 10, None).unwrap();
            assert_eq!(hits.len(), 10);
            assert!(hits.iter().all(|(id, _)| *id > 50));
        }
        let only_odd = |id: u64| id % 2 == 1;
        let hits = index.search(&vs[100].1, 5, Some(&only_odd)).unwrap();
        assert!(hits.iter().all(|(id, _)| id % 2 == 1 && *id > 50));
    }

    /// A selective filter still gives k allowed results, and they are the
    /// nearest allowed ones (the patched layer search goes on until it holds
    /// ef allowed points, and stops there).
    #[test]
    fn a_selective_filter_finds_the_nearest_allowed_points() {
        let dir = tempfile::tempdir().unwrap();
        let index = VectorIndex::open(dir.path(), 32).unwrap();
        let vs = vectors(3000, 32);
        index.insert_batch(&vs).unwrap();
        let allowed = |id: u64| id.is_multiple_of(100);
        let queries = vectors(20, 32);
        let mut hits = 0;
        for (_, q) in &queries {
            let found = index.search(q, 10, Some(&allowed)).unwrap();
            assert_eq!(found.len(), 10);
            assert!(found.iter().all(|(id, _)| allowed(*id)));
            let mut exact: Vec<(u64, f32)> = vs
                .iter()
                .filter(|(id, _)| allowed(*id))
                .map(|(id, v)| (*id, distance::dot(q, v)))
                .collect();
            exact.sort_by(|a, b| b.1.total_cmp(&a.1));
            let want: HashSet<u64> = exact.iter().take(10).map(|(id, _)| *id).collect();
            hits += found.iter().filter(|(id, _)| want.contains(id)).count();
            for pair in found.windows(2) {
                assert!(pair[0].1 >= pair[1].1, "best first: {found:?}");
            }
        }
        assert!(hits >= 190, "recall {hits} of 200");
    }

    /// The exact nearest of `among` (all live when `None`) less `excluded`,
    /// best first, ties by id: what a scan must return.
    fn brute_force(
        vs: &[(u64, Vec<f32>)],
        q: &[f32],
        k: usize,
        keep: impl Fn(u64) -> bool,
    ) -> Vec<u64> {
        let mut all: Vec<(u64, f32)> = vs
            .iter()
            .filter(|(id, _)| keep(*id))
            .map(|(id, v)| (*id, distance::dot(&unit(q), v)))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.into_iter().take(k).map(|(id, _)| id).collect()
    }

    /// A scan reads the vectors where the graph holds them and is exact,
    /// with a filter, exclusions and removed ids, before and after a
    /// reload and a rebuild; the planned search agrees with it wherever it
    /// chooses to scan.
    #[test]
    fn scans_are_exact_and_follow_the_graph_through_reloads_and_rebuilds() {
        let dir = tempfile::tempdir().unwrap();
        let vs = vectors(1500, 16);
        let queries = vectors(15, 16);
        let among: HashSet<u64> = (1..=1500).filter(|id| id % 7 == 0).collect();
        let excluded: HashSet<u64> = [7, 14, 700].into_iter().collect();
        let removed: Vec<u64> = (1..=1500).filter(|id| id % 5 == 0).collect();
        let check = |index: &VectorIndex, removed: &[u64]| {
            let live = |id: u64| !removed.contains(&id);
            for (_, q) in &queries {
                let ids = |found: Vec<(u64, f32)>| -> Vec<u64> {
                    found.into_iter().map(|(id, _)| id).collect()
                };
                let all = index.scan(q, 25, None, &excluded).unwrap();
                assert!(all.windows(2).all(|p| p[0].1 >= p[1].1));
                let want = brute_force(&vs, q, 25, |id| live(id) && !excluded.contains(&id));
                assert_eq!(ids(all), want);
                let some = index.scan(q, 25, Some(&among), &excluded).unwrap();
                let want = brute_force(&vs, q, 25, |id| {
                    live(id) && among.contains(&id) && !excluded.contains(&id)
                });
                assert_eq!(ids(some), want);
                // 214 candidates: cheaper to scan than to walk the graph.
                let (found, plan) = index.search_among(q, 25, Some(&among), &excluded).unwrap();
                assert_eq!(plan, Plan::Scan);
                assert_eq!(ids(found), want);
                // More than there are: all of them.
                let every = index.scan(q, 5000, Some(&among), &HashSet::new()).unwrap();
                assert_eq!(every.len(), among.iter().filter(|id| live(**id)).count());
            }
        };
        {
            let index = VectorIndex::open(dir.path(), 16).unwrap();
            index.insert_batch(&vs[..1000]).unwrap();
            index.insert_batch(&vs[1000..]).unwrap();
            check(&index, &[]);
            index.remove(removed.iter().copied());
            check(&index, &removed);
            index.save().unwrap();
        }
        let index = VectorIndex::open(dir.path(), 16).unwrap();
        check(&index, &removed);
        let live: Vec<(u64, Vec<f32>)> = vs
            .iter()
            .filter(|(id, _)| !removed.contains(id))
            .cloned()
            .collect();
        index.rebuild(live).unwrap();
        check(&index, &removed);
        // A query of the wrong size is refused by both ways.
        assert!(index.scan(&[1.0; 3], 5, None, &HashSet::new()).is_err());
        assert!(
            index
                .search_among(&[1.0; 3], 5, None, &HashSet::new())
                .is_err()
        );
    }

    /// A graph loaded from its files answers exactly as the one that was
    /// saved (the loader rebuilds the layer-0 rows the search reads).
    #[test]
    fn a_reloaded_graph_answers_as_the_saved_one() {
        let dir = tempfile::tempdir().unwrap();
        let all = vectors(2100, 24);
        let (vs, later) = all.split_at(2000);
        let queries = vectors(40, 24);
        let before: Vec<_> = {
            let index = VectorIndex::open(dir.path(), 24).unwrap();
            index.insert_batch(vs).unwrap();
            index.save().unwrap();
            queries
                .iter()
                .map(|(_, q)| index.search_with(q, 10, 32, None).unwrap())
                .collect()
        };
        let index = VectorIndex::open(dir.path(), 24).unwrap();
        for ((_, q), want) in queries.iter().zip(&before) {
            assert_eq!(&index.search_with(q, 10, 32, None).unwrap(), want);
        }
        // The graph itself is the saved one, every list of every layer
        // (layer 0 kept as rows of numbers in memory).
        let saved = neighbourhoods(&index);
        assert_eq!(saved.len(), 2000);
        assert!(saved.values().all(|layers| !layers[0].is_empty()));
        index.save().unwrap();
        drop(index);
        let index = VectorIndex::open(dir.path(), 24).unwrap();
        assert_eq!(neighbourhoods(&index), saved);
        // And it goes on growing: new vectors are found.
        index.insert_batch(later).unwrap();
        let extra = &later[50];
        assert_eq!(index.search(&extra.1, 1, None).unwrap()[0].0, extra.0);
    }

    /// The current generation's folder in `dir`.
    fn current(dir: &Path) -> PathBuf {
        dir.join(std::fs::read_to_string(dir.join("CURRENT")).unwrap().trim())
    }

    fn data_inode(dir: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(current(dir).join(format!("{BASENAME}.hnsw.data")))
            .unwrap()
            .ino()
    }

    fn saved_members(dir: &Path) -> Members {
        serde_json::from_slice(&std::fs::read(current(dir).join("members.json")).unwrap()).unwrap()
    }

    /// A save after adding vectors appends them to the saved data file (a
    /// link of it) instead of writing every vector again, and what loads is
    /// the graph as it was, through several generations, removals, bytes
    /// left by a save that did not finish, and a rebuild (which writes a
    /// new file).
    #[test]
    fn saves_append_the_new_vectors_and_reload_the_same_graph() {
        let dir = tempfile::tempdir().unwrap();
        let all = vectors(1300, 16);
        let queries = vectors(30, 16);
        let answers = |index: &VectorIndex| -> Vec<Vec<(u64, f32)>> {
            queries
                .iter()
                .map(|(_, q)| index.search_with(q, 10, 32, None).unwrap())
                .collect()
        };
        let index = VectorIndex::open(dir.path(), 16).unwrap();
        index.insert_batch(&all[..1000]).unwrap();
        index.save().unwrap();
        let first = data_inode(dir.path());
        let mut record = saved_members(dir.path()).data.unwrap();
        assert_eq!(record.points, 1000);
        drop(index);
        for (round, batch) in all[1000..].chunks(100).enumerate() {
            let index = VectorIndex::open(dir.path(), 16).unwrap();
            index.insert_batch(batch).unwrap();
            index.remove([batch[0].0, all[round].0]);
            let (graph, found) = (neighbourhoods(&index), answers(&index));
            index.save().unwrap();
            drop(index);
            // The same file, grown by the new points only.
            assert_eq!(data_inode(dir.path()), first);
            let saved = saved_members(dir.path()).data.unwrap();
            assert_eq!(saved.points, record.points + 100);
            assert_eq!(saved.size, data_size(saved.points, 16));
            record = saved;
            let index = VectorIndex::open(dir.path(), 16).unwrap();
            assert_eq!(neighbourhoods(&index), graph);
            assert_eq!(answers(&index), found);
            assert!(!index.contains(batch[0].0) && index.contains(batch[1].0));
            drop(index);
            // Bytes a killed save left after the record are not read, and
            // the next save cuts them off.
            let data = current(dir.path()).join(format!("{BASENAME}.hnsw.data"));
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&data)
                .unwrap();
            std::io::Write::write_all(&mut file, &[7u8; 3000]).unwrap();
        }
        let index = VectorIndex::open(dir.path(), 16).unwrap();
        assert_eq!(index.len(), 1300 - 6);
        // A rebuild writes its vectors ahead, off the lock; the save links
        // them in. One that is never saved leaves nothing behind.
        index
            .rebuild(all.iter().skip(600).map(|(id, v)| (*id, v.clone())))
            .unwrap();
        assert!(dir.path().join(STAGED).is_file());
        drop(index);
        let index = VectorIndex::open(dir.path(), 16).unwrap();
        assert!(!dir.path().join(STAGED).exists());
        index
            .rebuild(all.iter().skip(500).map(|(id, v)| (*id, v.clone())))
            .unwrap();
        let staged = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.path().join(STAGED)).unwrap().ino()
        };
        let (graph, found) = (neighbourhoods(&index), answers(&index));
        index.save().unwrap();
        drop(index);
        assert!(!dir.path().join(STAGED).exists());
        assert_eq!(data_inode(dir.path()), staged);
        assert_ne!(data_inode(dir.path()), first);
        assert_eq!(saved_members(dir.path()).data.unwrap().points, 800);
        let index = VectorIndex::open(dir.path(), 16).unwrap();
        assert_eq!(neighbourhoods(&index), graph);
        assert_eq!(answers(&index), found);
    }

    /// A generation saved before format 5 (the data file in the layers'
    /// order, checksummed whole) still loads, and the next save writes the
    /// vectors whole in the new format.
    #[test]
    fn a_generation_saved_in_the_former_format_loads() {
        use hnsw_rs::prelude::AnnT;
        let dir = tempfile::tempdir().unwrap();
        let all = vectors(600, 12);
        let index = VectorIndex::open(dir.path(), 12).unwrap();
        index.insert_batch(&all[..500]).unwrap();
        let graph = neighbourhoods(&index);
        {
            let state = index.read();
            let gen_dir = dir.path().join("gen-1");
            std::fs::create_dir_all(&gen_dir).unwrap();
            state.hnsw.file_dump(&gen_dir, BASENAME).unwrap();
            let files = ["hnsw.graph", "hnsw.data"]
                .map(|ext| {
                    let name = format!("{BASENAME}.{ext}");
                    let (size, hash) = checksum(&gen_dir.join(&name)).unwrap();
                    (name, size, hash)
                })
                .to_vec();
            let members = Members {
                dim: 12,
                live: state.live.iter().copied().collect(),
                dead: Vec::new(),
                files,
                data: None,
            };
            std::fs::write(
                gen_dir.join("members.json"),
                serde_json::to_vec(&members).unwrap(),
            )
            .unwrap();
            std::fs::write(dir.path().join("CURRENT"), "gen-1").unwrap();
        }
        drop(index);
        let index = VectorIndex::open(dir.path(), 12).unwrap();
        assert!(!index.is_changed());
        assert_eq!(neighbourhoods(&index), graph);
        index.insert_batch(&all[500..]).unwrap();
        let graph = neighbourhoods(&index);
        index.save().unwrap();
        drop(index);
        assert_eq!(saved_members(dir.path()).data.unwrap().points, 600);
        let index = VectorIndex::open(dir.path(), 12).unwrap();
        assert!(!index.is_changed());
        assert_eq!(neighbourhoods(&index), graph);
    }

    /// A changed byte in the saved vectors is found by their checksum.
    #[test]
    fn a_changed_vector_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let index = VectorIndex::open(dir.path(), 8).unwrap();
        index.insert_batch(&vectors(50, 8)).unwrap();
        index.save().unwrap();
        drop(index);
        let data = current(dir.path()).join(format!("{BASENAME}.hnsw.data"));
        let mut bytes = std::fs::read(&data).unwrap();
        bytes[500] ^= 1;
        std::fs::write(&data, &bytes).unwrap();
        let index = VectorIndex::open(dir.path(), 8).unwrap();
        assert!(index.is_empty() && index.is_changed());
    }

    /// Every point's neighbours on every layer: (id, distance bits).
    fn neighbourhoods(
        index: &VectorIndex,
    ) -> std::collections::BTreeMap<usize, Vec<Vec<(usize, u32)>>> {
        let state = index.read();
        let points = state.hnsw.get_point_indexation();
        points
            .into_iter()
            .map(|point| {
                let layers = points.get_neighborhood_id(&point);
                let layers = layers
                    .iter()
                    .map(|list| {
                        list.iter()
                            .map(|n| (n.d_id, n.distance.to_bits()))
                            .collect()
                    })
                    .collect();
                (point.get_origin_id(), layers)
            })
            .collect()
    }

    /// Searches on other threads go on while batches are inserted, and
    /// every search finds a vector inserted before it began.
    #[test]
    fn searches_run_while_batches_are_inserted() {
        let dir = tempfile::tempdir().unwrap();
        let index = VectorIndex::open(dir.path(), 16).unwrap();
        let vs = vectors(4000, 16);
        index.insert_batch(&vs[..500]).unwrap();
        std::thread::scope(|s| {
            for t in 0..3 {
                let (index, vs) = (&index, &vs);
                s.spawn(move || {
                    for (id, v) in vs[..500].iter().skip(t).step_by(7) {
                        let hits = index.search(v, 5, None).unwrap();
                        assert_eq!(hits[0].0, *id);
                    }
                });
            }
            for chunk in vs[500..].chunks(700) {
                index.insert_batch(chunk).unwrap();
            }
        });
        assert_eq!(index.len(), 4000);
    }

    #[test]
    fn a_torn_generation_falls_back_to_empty_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let index = VectorIndex::open(dir.path(), 8).unwrap();
            index.insert_batch(&vectors(50, 8)).unwrap();
            index.save().unwrap();
        }
        let current = dir
            .path()
            .join(std::fs::read_to_string(dir.path().join("CURRENT")).unwrap());
        let data = current.join(format!("{BASENAME}.hnsw.data"));
        let bytes = std::fs::read(&data).unwrap();
        std::fs::write(&data, &bytes[..bytes.len() / 2]).unwrap();
        let index = VectorIndex::open(dir.path(), 8).unwrap();
        assert!(index.is_empty() && index.is_changed());
    }
}
