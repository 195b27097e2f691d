//! One indexing run: bring an index up to date with its library.
//!
//! 1. Scan the library (names, sizes, times; no contents).
//! 2. Compare with the store: unchanged files are done; new and changed ones
//!    (size or time differ, or their caption sidecar did) become jobs; paths
//!    gone from the library are candidates for removal.
//! 3. Worker threads read, hash (blake3), and, for content the index does not
//!    have, decode (JPEG at reduced size in the DCT), write the thumbnail and
//!    preprocess. Content the index has is not decoded: a file whose hash
//!    matches a removed path is a move (same id, no embedding), one matching a
//!    live photo is a duplicate (new id, embedding copied), one matching its
//!    own record only had its time touched.
//! 4. The calling thread embeds decoded images in batches while the workers
//!    keep decoding (bounded queues: memory stays flat), and commits each
//!    batch: store first (atomic, flushed), then keyword and vector indexes.
//! 5. Paths that were not moved are removed; the graph is rebuilt if too many
//!    of its entries are dead, and saved.
//!
//! Statistics go to a callback (the CLI draws a bar, the server streams
//! events) and to `progress.json` in the index.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use serde::Serialize;

use super::tags::{Tagger, Tagging};
use super::{Error, Index, Result, io_err, now_secs};
use crate::library::meta::{PhotoMeta, caption, read_meta};
use crate::library::scan::{ScannedFile, scan};
use crate::library::thumb::{THUMB_SIZE, encode_thumbnail, thumb_path, write_thumbnail};
use crate::library::{DecodeError, DecodeLimits, decode_bytes_scaled, read_and_hash, read_file};
use crate::model::{Clip, Preprocessor, RgbView};
use crate::store::{
    CaptionSource, Change, ContentHash, FileSig, PhotoRecord, RunCounts, RunSummary, SkipRecord,
};

/// Time between commits, at most, while changes come in.
const COMMIT_EVERY: Duration = Duration::from_secs(2);
/// Time between a shard's reports to a shared engine, at least.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// How a run works.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Images per forward pass of the model.
    pub batch_size: usize,
    /// Threads reading and decoding files.
    pub workers: usize,
    /// Decode JPEGs at full size (slower; bit-exact with the reference pipeline).
    pub exact_decode: bool,
    /// Save the vector graph at least this often during a long run.
    pub save_every: Duration,
    /// Changes held before a commit, at most (a commit also comes every
    /// `COMMIT_EVERY`). One per embedding batch made a tantivy segment,
    /// its merges and two fsyncs every 16 photos: 3.4x slower at 200,000.
    pub commit_changes: usize,
    pub limits: DecodeLimits,
    /// The tag vocabulary and threshold: as the index has them, or new ones.
    pub tags: Tagging,
    /// Called with an empty path as the run starts, and with each file's path
    /// before it is read, inside the per-file step: tests make it panic, to
    /// prove a panic in a file costs that file, not the run, and that a run
    /// that dies is reported as failed.
    #[doc(hidden)]
    pub fail_point: Option<fn(&str)>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            batch_size: 16,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            exact_decode: false,
            save_every: Duration::from_secs(120),
            commit_changes: 256,
            limits: DecodeLimits::default(),
            tags: Tagging::Keep,
            fail_point: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Embedding a new tag vocabulary (once per model) and re-tagging
    /// stored photos when the vocabulary or threshold changed.
    Tagging,
    Scanning,
    Indexing,
    Finishing,
    Done,
}

/// Plain statistics of a run in progress; front ends render them.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    pub phase: Phase,
    /// Files that need reading (new or changed).
    pub to_process: u64,
    pub processed: u64,
    #[serde(flatten)]
    pub counts: RunCounts,
    pub started_at: i64,
    pub pid: u32,
}

impl Progress {
    fn new() -> Self {
        Self {
            phase: Phase::Scanning,
            to_process: 0,
            processed: 0,
            counts: RunCounts::default(),
            started_at: now_secs(),
            pid: std::process::id(),
        }
    }

    /// Images embedded by the model this run.
    pub fn embedded(&self) -> u64 {
        self.counts.added + self.counts.replaced
    }

    /// Files processed per second of the run so far.
    pub fn files_per_second(&self) -> f64 {
        if self.counts.elapsed_seconds > 0.0 {
            self.processed as f64 / self.counts.elapsed_seconds
        } else {
            0.0
        }
    }

    fn summary(&self) -> RunSummary {
        RunSummary {
            started_at: self.started_at,
            finished_at: now_secs(),
            embedded: self.embedded(),
            counts: self.counts.clone(),
            peak_memory_bytes: peak_memory_bytes().unwrap_or(0),
        }
    }
}

/// This process's peak resident memory so far (`VmHWM`), bytes.
fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

#[derive(Clone)]
struct Job {
    file: ScannedFile,
    /// The record this path had, if any.
    old: Option<PhotoRecord>,
}

enum Outcome {
    /// Content the index already has: not decoded.
    Known(ContentHash),
    Decoded(Decoded),
    Failed(String),
}

/// A picture ready for the model.
struct Decoded {
    hash: ContentHash,
    /// Full size, upright.
    width: u32,
    height: u32,
    format: String,
    /// Preprocessed, channels first.
    pixels: Vec<f32>,
}

/// What reading a file found besides its picture; its [`Outcome`] travels
/// next to it.
struct Done {
    job: Job,
    meta: PhotoMeta,
    caption: (Option<String>, Option<CaptionSource>),
    bytes: u64,
    seconds: f64,
}

impl Done {
    fn unread(job: Job, seconds: f64) -> Self {
        Self {
            job,
            meta: PhotoMeta::default(),
            caption: (None, None),
            bytes: 0,
            seconds,
        }
    }
}

/// What a worker needs.
struct WorkerContext<'a> {
    known: &'a HashSet<ContentHash>,
    /// Content hashes a worker has taken on this run: a second file with the
    /// same content waits for the first one's embedding instead of decoding.
    claimed: std::sync::Mutex<HashSet<ContentHash>>,
    preprocessor: &'a Preprocessor,
    thumbs: PathBuf,
    limits: DecodeLimits,
    min_side: Option<u32>,
    fail_point: Option<fn(&str)>,
}

/// Reads, hashes and decodes one file. A panic in any of it (a parser bug
/// met on a hostile file) is caught: the file is skipped with the reason and
/// the run goes on.
fn process(job: Job, ctx: &WorkerContext, force_decode: bool) -> (Done, Outcome) {
    let start = Instant::now();
    let keep = job.clone();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_and_decode(job, ctx, force_decode)
    })) {
        Ok(processed) => processed,
        Err(payload) => {
            let message = crate::common::panic_message(&*payload);
            tracing::error!(path = %keep.file.rel, %message, "internal error on a file; skipping it");
            (
                Done::unread(keep, start.elapsed().as_secs_f64()),
                Outcome::Failed(format!("internal error while reading this file: {message}")),
            )
        }
    }
}

fn read_and_decode(job: Job, ctx: &WorkerContext, force_decode: bool) -> (Done, Outcome) {
    let start = Instant::now();
    if let Some(fail) = ctx.fail_point {
        fail(&job.file.rel);
    }
    let unreadable = |e: DecodeError| match e {
        DecodeError::Io(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Outcome::Failed("cannot read file: permission denied".into())
        }
        e => Outcome::Failed(e.to_string()),
    };
    let read = match read_and_hash(&job.file.abs, ctx.limits.max_file_bytes) {
        Ok(read) => read,
        Err(e) => return (Done::unread(job, 0.0), unreadable(e)),
    };
    let meta = read_meta(&read.bytes);
    let caption = caption(job.file.sidecar.as_ref().map(|(p, _)| p.as_path()), &meta);
    let mut done = Done {
        job,
        meta,
        caption,
        bytes: read.size,
        seconds: 0.0,
    };
    let hash = read.hash;
    let known = ctx.known.contains(&hash)
        || !ctx
            .claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash);
    let outcome = if known && !force_decode && read.size > 0 {
        Outcome::Known(hash)
    } else if read.whole {
        decode(&done.job.file.rel, read.bytes, hash, ctx)
    } else {
        // New content: a large file streamed for its hash is read whole now.
        match read_file(&done.job.file.abs, ctx.limits.max_file_bytes) {
            Ok(bytes) if ContentHash::of(&bytes) == hash => {
                decode(&done.job.file.rel, bytes, hash, ctx)
            }
            Ok(_) => {
                Outcome::Failed("the file changed while it was read; it is retried next run".into())
            }
            Err(e) => unreadable(e),
        }
    };
    done.seconds = start.elapsed().as_secs_f64();
    (done, outcome)
}

/// Decodes new content for the model, writing its thumbnail on the way.
fn decode(rel: &str, bytes: Vec<u8>, hash: ContentHash, ctx: &WorkerContext) -> Outcome {
    let image = match decode_bytes_scaled(&bytes, &ctx.limits, ctx.min_side) {
        Ok(image) => image,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let (width, height) = image.upright_size();
    let full = image.view();
    // Resize once; the thumbnail comes from the resized image, not
    // from a second pass over the original.
    let resized = ctx.preprocessor.resize(full);
    let small = match &resized {
        Some((data, w, h)) => RgbView {
            width: *w,
            height: *h,
            data,
        },
        None => full,
    };
    let thumb_source = if small.width.max(small.height) >= THUMB_SIZE as usize {
        small
    } else {
        full
    };
    match encode_thumbnail(thumb_source) {
        Ok(jpeg) => {
            if let Err(e) = write_thumbnail(&ctx.thumbs, &hash, &jpeg) {
                tracing::warn!(path = %rel, error = %e, "cannot write thumbnail");
            }
        }
        Err(e) => tracing::warn!(path = %rel, error = %e, "cannot encode thumbnail"),
    }
    let crop = ctx.preprocessor.crop(small);
    let mut pixels = vec![0f32; crop.len()];
    ctx.preprocessor.normalize_into(&crop, &mut pixels);
    let format = image
        .format
        .extensions_str()
        .first()
        .copied()
        .unwrap_or("image");
    let format = if format == "jpg" { "jpeg" } else { format };
    Outcome::Decoded(Decoded {
        hash,
        width,
        height,
        format: format.to_string(),
        pixels,
    })
}

fn sidecar_sig(file: &ScannedFile) -> Option<FileSig> {
    file.sidecar.as_ref().map(|(_, sig)| *sig)
}

/// The record of a processed file of content `hash`, with the picture's size
/// and format.
fn describe(
    done: &Done,
    hash: ContentHash,
    id: u64,
    width: u32,
    height: u32,
    format: String,
) -> PhotoRecord {
    PhotoRecord {
        id,
        path: done.job.file.rel.clone(),
        sig: done.job.file.sig,
        hash,
        width,
        height,
        format,
        taken: done.meta.taken.clone(),
        camera_make: done.meta.camera_make.clone(),
        camera_model: done.meta.camera_model.clone(),
        orientation: done.meta.orientation,
        caption: done.caption.0.clone(),
        caption_source: done.caption.1,
        sidecar: sidecar_sig(&done.job.file),
        indexed_at: now_secs(),
        tags: Vec::new(),
    }
}

/// Refreshes a record's file-dependent fields from a processed file of the
/// same content (its id, hash, size and format stay).
fn fill(record: &mut PhotoRecord, done: &Done) {
    *record = describe(
        done,
        record.hash,
        record.id,
        record.width,
        record.height,
        std::mem::take(&mut record.format),
    );
}

/// The state of a run between batches.
struct Runner<'a> {
    index: &'a Index,
    clip: &'a Clip,
    opts: &'a RunOptions,
    progress: Progress,
    callback: &'a mut dyn FnMut(&Progress),
    started: Instant,
    /// Changes not yet committed.
    changes: Vec<Change>,
    /// Decoded images waiting for the model.
    to_embed: Vec<(Done, Decoded)>,
    /// Records of paths no longer in the library, by content hash: moves consume them.
    gone: HashMap<ContentHash, Vec<PhotoRecord>>,
    /// Ids removed (or about to be) during this run.
    removed_ids: HashSet<u64>,
    /// Content hashes whose records were removed, for thumbnail clean-up.
    removed_hashes: HashSet<ContentHash>,
    last_commit: Instant,
    last_save: Instant,
    /// Hashes the index had when the run started.
    known_at_start: &'a HashSet<ContentHash>,
    /// Files whose content another file of this run is bringing in.
    deferred: Vec<(Done, ContentHash)>,
    /// Set once no more embeddings are coming: deferred files decode themselves.
    finishing: bool,
    /// Tags what is embedded; none when the index has no tags.
    tagger: Option<&'a Tagger>,
    /// When the shard's progress last went to a shared engine.
    last_report: Option<Instant>,
}

/// Tells a shared engine how far this index's shard is (`state`:
/// `indexing`, `done`, `stopped`, `failed`), for `clipdex status` on any
/// machine. A report that cannot be written is logged, not fatal: the
/// photos' own writes retry and fail the run when the engine is gone.
fn report_shard(index: &Index, progress: &Progress, state: &str) {
    let (shard, owner) = index.vectors.shard();
    if !index.vectors.wants_fields() || index.vectors.is_replica() {
        return;
    }
    let report = crate::vector::milvus::ShardReport {
        shard,
        owner: owner.map(str::to_string),
        host: host_name(),
        folder: std::fs::canonicalize(&index.paths.root)
            .unwrap_or_else(|_| index.paths.root.clone())
            .display()
            .to_string(),
        state: state.to_string(),
        files: progress.counts.files_seen,
        to_process: progress.to_process,
        processed: progress.processed,
        photos: index.store.count() as u64,
        updated: now_secs(),
    };
    if let Err(e) = index.vectors.report(&report) {
        tracing::warn!(error = %e, "the shard's progress was not reported to the engine");
    }
}

/// This machine's name, for the reports other machines read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_string())
}

impl Runner<'_> {
    /// Retries files waiting for their content's first copy to be committed.
    fn retry_deferred(&mut self, ctx: &WorkerContext) -> Result<()> {
        for (done, hash) in std::mem::take(&mut self.deferred) {
            self.handle(done, Outcome::Known(hash), ctx)?;
        }
        Ok(())
    }

    fn tick(&mut self) {
        self.progress.counts.elapsed_seconds = self.started.elapsed().as_secs_f64();
        (self.callback)(&self.progress);
    }

    fn remove(&mut self, record: PhotoRecord) {
        self.removed_ids.insert(record.id);
        self.changes.push(Change::Remove { record });
    }

    /// Counts a file whose fate is settled.
    fn count(&mut self, done: &Done) {
        self.progress.processed += 1;
        self.progress.counts.bytes_read += done.bytes;
        self.progress.counts.decode_seconds += done.seconds;
    }

    /// Takes the result of one file.
    fn handle(&mut self, done: Done, outcome: Outcome, ctx: &WorkerContext) -> Result<()> {
        match outcome {
            Outcome::Failed(reason) => {
                self.count(&done);
                self.progress.counts.skipped += 1;
                tracing::warn!(path = %done.job.file.rel, reason = %reason, "skipping file");
                let skip = SkipRecord {
                    reason,
                    sig: Some(done.job.file.sig),
                };
                self.changes.push(Change::Skip {
                    path: done.job.file.rel.clone(),
                    skip,
                });
                if let Some(old) = done.job.old {
                    self.progress.counts.removed += 1;
                    self.remove(old);
                }
            }
            Outcome::Decoded(decoded) => {
                self.count(&done);
                self.to_embed.push((done, decoded));
            }
            Outcome::Known(hash) => self.resolve_known(done, hash, ctx)?,
        }
        Ok(())
    }

    /// A file whose content the index had when the run started.
    fn resolve_known(&mut self, done: Done, hash: ContentHash, ctx: &WorkerContext) -> Result<()> {
        // Its own content: only the time, metadata or caption changed.
        if let Some(old) = done.job.old.as_ref().filter(|old| old.hash == hash) {
            let mut record = old.clone();
            fill(&mut record, &done);
            self.count(&done);
            self.progress.counts.updated += 1;
            self.changes.push(Change::Put {
                record,
                vector: None,
                old_path: None,
            });
            return Ok(());
        }
        // Content of a path that disappeared: a move or rename.
        if let Some(mut record) = self.gone.get_mut(&hash).and_then(Vec::pop) {
            let old_path = record.path.clone();
            fill(&mut record, &done);
            self.count(&done);
            self.progress.counts.moved += 1;
            self.changes.push(Change::Put {
                record,
                vector: None,
                old_path: Some(old_path),
            });
            if let Some(old) = done.job.old {
                self.progress.counts.replaced += 1;
                self.remove(old);
            }
            return Ok(());
        }
        // Content of a photo still in the library: a duplicate.
        let ids = self.index.store.ids_with_hash(&hash)?;
        let source = ids.into_iter().find(|id| !self.removed_ids.contains(id));
        if let Some(source) = source {
            if let (Some(src), Some(vector)) = (
                self.index.store.get(source)?,
                self.index.store.vector(source)?,
            ) {
                let id = self.index.store.reserve_ids(1)?;
                let mut record = src.clone();
                record.id = id;
                fill(&mut record, &done);
                self.count(&done);
                self.progress.counts.duplicates += 1;
                self.changes.push(Change::Put {
                    record,
                    vector: Some(vector),
                    old_path: None,
                });
                if let Some(old) = done.job.old {
                    self.remove(old);
                }
                return Ok(());
            }
        }
        // Content another file of this run carries, not committed yet: wait for it.
        if !self.known_at_start.contains(&hash) && !self.finishing {
            self.deferred.push((done, hash));
            return Ok(());
        }
        // The content's records went away (or never came): decode it after all.
        let (redone, outcome) = process(done.job, ctx, true);
        self.handle(redone, outcome, ctx)
    }

    /// Embeds the waiting images and queues their records.
    fn embed(&mut self) -> Result<()> {
        if self.to_embed.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.to_embed);
        let n = batch.len();
        let s = self.clip.preprocessor().image_size();
        let mut data = Vec::with_capacity(n * 3 * s * s);
        for (_, decoded) in &batch {
            data.extend_from_slice(&decoded.pixels);
        }
        let start = Instant::now();
        let vectors = self.clip.embed_pixels(data, n)?;
        self.progress.counts.embed_seconds += start.elapsed().as_secs_f64();
        let start = Instant::now();
        let mut tags = match self.tagger {
            Some(tagger) => tagger.tag_all(&vectors),
            None => vec![Vec::new(); n],
        };
        self.progress.counts.tag_seconds += start.elapsed().as_secs_f64();
        let first = self.index.store.reserve_ids(n as u64)?;
        for (i, ((done, decoded), vector)) in batch.into_iter().zip(vectors).enumerate() {
            let mut record = describe(
                &done,
                decoded.hash,
                first + i as u64,
                decoded.width,
                decoded.height,
                decoded.format,
            );
            record.tags = std::mem::take(&mut tags[i]);
            self.changes.push(Change::Put {
                record,
                vector: Some(vector),
                old_path: None,
            });
            match done.job.old {
                Some(old) => {
                    self.progress.counts.replaced += 1;
                    self.remove(old);
                }
                None => self.progress.counts.added += 1,
            }
        }
        Ok(())
    }

    /// Commits queued changes: store, then keyword and vector indexes.
    fn commit(&mut self) -> Result<()> {
        if self.changes.is_empty() {
            return Ok(());
        }
        let changes = std::mem::take(&mut self.changes);
        self.index.store.commit(&changes)?;
        let mut new_vectors = Vec::new();
        let mut dead = Vec::new();
        for change in changes {
            match change {
                Change::Put { record, vector, .. } => {
                    self.index.keywords.upsert(&super::keyword_doc(&record))?;
                    if let Some(v) = vector {
                        new_vectors.push((record.id, v));
                    } else if self.index.vectors.wants_fields() {
                        // Moved or re-captioned: an engine that filters by
                        // folder itself gets the new fields, same vector.
                        if let Some(v) = self.index.store.vector(record.id)? {
                            new_vectors.push((record.id, v));
                        }
                    }
                }
                Change::Remove { record } => {
                    self.index.keywords.remove(record.id)?;
                    dead.push(record.id);
                    self.removed_hashes.insert(record.hash);
                }
                Change::Skip { .. } | Change::Unskip { .. } => {}
            }
        }
        self.index.keywords.commit()?;
        self.index.vectors.remove(dead)?;
        let index = &self.index;
        index.vectors.put(new_vectors, &|id| index.fields(id))?;
        if self.last_save.elapsed() >= self.opts.save_every {
            self.index.vectors.save()?;
            self.last_save = Instant::now();
        }
        self.last_commit = Instant::now();
        self.write_progress();
        if self
            .last_report
            .is_none_or(|at| at.elapsed() >= REPORT_EVERY)
        {
            report_shard(self.index, &self.progress, "indexing");
            self.last_report = Some(Instant::now());
        }
        Ok(())
    }

    fn write_progress(&mut self) {
        self.progress.counts.elapsed_seconds = self.started.elapsed().as_secs_f64();
        let path = self.index.paths.progress();
        let bytes = serde_json::to_vec_pretty(&self.progress).expect("progress serialises");
        if let Err(e) = crate::common::fs::write_synced(&path, &bytes) {
            tracing::warn!(error = %e, "cannot write progress.json");
        }
    }
}

/// What a run must do, from the store's records and skip list and a scan
/// of the library: nothing of it touches the disk.
#[derive(Default)]
struct Plan {
    /// New and changed files, to read.
    jobs: Vec<Job>,
    /// Skips to record (entries that cannot be indexed) and skips to drop
    /// (entries gone from the library).
    changes: Vec<Change>,
    /// Records whose path is gone, by content hash: moves consume them, the
    /// rest are removed at the end.
    gone: HashMap<ContentHash, Vec<PhotoRecord>>,
    unchanged: u64,
    /// Files skipped before and unchanged since, plus the scan's problems.
    skipped: u64,
    /// The scan's problems, (path, reason), for the log.
    problems: Vec<(String, String)>,
}

fn plan(
    records: Vec<PhotoRecord>,
    skipped: HashMap<String, SkipRecord>,
    scanned: crate::library::scan::Scan,
) -> Plan {
    let mut plan = Plan::default();
    let mut by_path: HashMap<String, PhotoRecord> =
        records.into_iter().map(|r| (r.path.clone(), r)).collect();
    let mut seen: HashSet<String> = HashSet::new();
    for file in scanned.files {
        seen.insert(file.rel.clone());
        match by_path.remove(&file.rel) {
            Some(old) if old.sig == file.sig && old.sidecar == sidecar_sig(&file) => {
                plan.unchanged += 1
            }
            Some(old) => plan.jobs.push(Job {
                file,
                old: Some(old),
            }),
            None => match skipped.get(&file.rel) {
                Some(skip) if skip.sig == Some(file.sig) => plan.skipped += 1,
                _ => plan.jobs.push(Job { file, old: None }),
            },
        }
    }
    for problem in scanned.problems {
        seen.insert(problem.rel.clone());
        plan.skipped += 1;
        plan.problems
            .push((problem.rel.clone(), problem.reason.clone()));
        plan.changes.push(Change::Skip {
            path: problem.rel,
            skip: SkipRecord {
                reason: problem.reason,
                sig: None,
            },
        });
    }
    let mut gone_skips: Vec<String> = skipped
        .into_keys()
        .filter(|path| !seen.contains(path))
        .collect();
    gone_skips.sort();
    plan.changes
        .extend(gone_skips.into_iter().map(|path| Change::Unskip { path }));
    // What is left in by_path is no longer in the library (or unreadable now).
    for (_, record) in by_path {
        plan.gone.entry(record.hash).or_default().push(record);
    }
    plan
}

/// Brings `index` up to date with its library, embedding with `clip`.
///
/// `callback` receives statistics after every file. Setting `stop` ends the
/// run after the current batch, with everything done so far committed.
pub fn run(
    index: &Index,
    clip: &Clip,
    opts: &RunOptions,
    callback: &mut dyn FnMut(&Progress),
    stop: &AtomicBool,
) -> Result<RunSummary> {
    let mut last = Progress::new();
    let result = run_reporting(
        index,
        clip,
        opts,
        &mut |p: &Progress| {
            last = p.clone();
            callback(p)
        },
        stop,
    );
    match &result {
        Ok(_) => report_shard(index, &last, "done"),
        Err(Error::Stopped(_)) => report_shard(index, &last, "stopped"),
        Err(_) => report_shard(index, &last, "failed"),
    }
    result
}

fn run_reporting(
    index: &Index,
    clip: &Clip,
    opts: &RunOptions,
    callback: &mut dyn FnMut(&Progress),
    stop: &AtomicBool,
) -> Result<RunSummary> {
    if index.vectors.is_replica() {
        return Err(Error::NotReplica(format!(
            "{} is a search replica of {}: it is not indexed, it follows the collection \
             (`clipdex serve` keeps it up to date, `clipdex replica` brings it up to date once)",
            index.paths.root.display(),
            index.vectors.engine()
        )));
    }
    if let Some(fail) = opts.fail_point {
        fail("");
    }
    index.check_model(clip.info())?;
    let library = index.library();
    if !library.is_dir() {
        return Err(Error::Io {
            path: library.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "the library folder is gone"),
        });
    }
    let started = Instant::now();
    let mut progress = Progress::new();
    callback(&progress);

    // 0. Tags: a new vocabulary or threshold re-tags what is stored.
    progress.phase = Phase::Tagging;
    callback(&progress);
    let tagger = index.prepare_tags(clip, &opts.tags)?;
    progress.phase = Phase::Scanning;
    callback(&progress);

    // 1. Scan.
    let own = std::fs::canonicalize(&index.paths.root).map_err(io_err(&index.paths.root))?;
    let mut scanned = scan(&library, &[own]);
    // A shard takes only its files (whose paths hash to it).
    let shard = index.vectors.shard().0;
    if shard.count > 1 {
        scanned.files.retain(|f| shard.owns(&f.rel));
        scanned.problems.retain(|p| shard.owns(&p.rel));
    }
    progress.counts.files_seen = (scanned.files.len() + scanned.problems.len()) as u64;

    // 2. Compare with the store.
    let records = index
        .store
        .records()
        .collect::<crate::store::Result<Vec<_>>>()?;
    let known: HashSet<ContentHash> = records.iter().map(|r| r.hash).collect();
    let plan = plan(
        records,
        index.store.skipped()?.into_iter().collect(),
        scanned,
    );
    progress.counts.unchanged = plan.unchanged;
    progress.counts.skipped = plan.skipped;
    progress.to_process = plan.jobs.len() as u64;
    for (path, reason) in &plan.problems {
        tracing::warn!(path = %path, reason = %reason, "skipping");
    }
    let Plan {
        jobs,
        changes,
        gone,
        ..
    } = plan;
    progress.phase = Phase::Indexing;
    report_shard(index, &progress, "indexing");

    let min_side = (!opts.exact_decode).then(|| 2 * clip.preprocessor().image_size() as u32);
    let ctx = WorkerContext {
        known: &known,
        claimed: std::sync::Mutex::new(HashSet::new()),
        preprocessor: clip.preprocessor(),
        thumbs: index.paths.thumbs(),
        limits: opts.limits,
        min_side,
        fail_point: opts.fail_point,
    };
    let mut runner = Runner {
        index,
        clip,
        opts,
        progress,
        callback,
        started,
        changes,
        to_embed: Vec::new(),
        gone,
        removed_ids: HashSet::new(),
        removed_hashes: HashSet::new(),
        last_commit: Instant::now(),
        last_save: Instant::now(),
        known_at_start: &known,
        deferred: Vec::new(),
        finishing: false,
        tagger: tagger.as_ref(),
        last_report: None,
    };
    runner.tick();

    // 3-4. Workers decode; this thread embeds and commits.
    runner.pipeline(jobs, &ctx, stop)?;
    if stop.load(Ordering::Relaxed) {
        runner.index.vectors.save()?;
        runner.write_progress();
        return Err(Error::Stopped(
            "asked to stop; the work done so far is saved".into(),
        ));
    }
    // 5. Removals, clean-up, the graph.
    runner.finish()
}

impl Runner<'_> {
    /// Steps 3 and 4: worker threads read and decode the jobs; this thread
    /// embeds in batches and commits, until every job is settled (or `stop`).
    fn pipeline(&mut self, jobs: Vec<Job>, ctx: &WorkerContext, stop: &AtomicBool) -> Result<()> {
        let workers = self.opts.workers.max(1);
        let batch = self.opts.batch_size.max(1);
        std::thread::scope(|scope| -> Result<()> {
            let (job_tx, job_rx) = bounded::<Job>(workers * 4);
            let (done_tx, done_rx) = bounded::<(Done, Outcome)>(batch * 2);
            for _ in 0..workers {
                let (job_rx, done_tx) = (job_rx.clone(), done_tx.clone());
                scope.spawn(move || {
                    for job in job_rx {
                        if stop.load(Ordering::Relaxed)
                            || done_tx.send(process(job, ctx, false)).is_err()
                        {
                            break;
                        }
                    }
                });
            }
            drop((job_rx, done_tx));
            scope.spawn(move || {
                for job in jobs {
                    if stop.load(Ordering::Relaxed) || job_tx.send(job).is_err() {
                        break;
                    }
                }
            });
            // Owning the receiver here means an early return drops it, which
            // ends the workers instead of leaving them blocked on a full queue.
            for (done, outcome) in done_rx {
                self.handle(done, outcome, ctx)?;
                if self.to_embed.len() >= batch {
                    self.embed()?;
                }
                // A commit makes its changes durable in the store, the
                // keyword index and the graph together. Files waiting for a
                // content a batch brought in are retried once it is in.
                if self.changes.len() >= self.opts.commit_changes
                    || self.last_commit.elapsed() > COMMIT_EVERY
                {
                    self.commit()?;
                    self.retry_deferred(ctx)?;
                }
                self.tick();
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            Ok(())
        })?;
        self.embed()?;
        self.commit()?;
        self.retry_deferred(ctx)?;
        // What still waits decodes itself (its first copy failed, say).
        self.finishing = true;
        self.retry_deferred(ctx)?;
        self.embed()?;
        self.commit()
    }

    /// Step 5: records of paths gone (and not moved) are removed with their
    /// unused thumbnails, the graph is rebuilt if too much of it is dead,
    /// saved, and the summary stored.
    fn finish(mut self) -> Result<RunSummary> {
        self.progress.phase = Phase::Finishing;
        self.tick();
        let gone: Vec<PhotoRecord> = std::mem::take(&mut self.gone)
            .into_values()
            .flatten()
            .collect();
        for chunk in gone.chunks(512) {
            for record in chunk {
                self.progress.counts.removed += 1;
                self.remove(record.clone());
            }
            self.commit()?;
        }
        for hash in std::mem::take(&mut self.removed_hashes) {
            if self.index.store.ids_with_hash(&hash)?.is_empty() {
                let _ = std::fs::remove_file(thumb_path(&self.index.paths.thumbs(), &hash));
            }
        }
        if self.index.vectors.dead_fraction() > crate::vector::REBUILD_DEAD_FRACTION {
            self.index.rebuild_vectors()?;
        }
        self.index.vectors.save()?;
        // The near neighbours of what this run embedded (duplicate groups).
        let listed = self.index.update_near()?;
        tracing::debug!(listed, "near neighbours listed");
        self.progress.counts.elapsed_seconds = self.started.elapsed().as_secs_f64();
        let summary = self.progress.summary();
        self.index.store.set_last_run(&summary)?;
        self.progress.phase = Phase::Done;
        self.write_progress();
        self.tick();
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::library::scan::{Scan, ScanProblem};

    fn sig(size: u64) -> FileSig {
        FileSig {
            size,
            mtime_ns: 1_000,
        }
    }

    fn file(rel: &str, size: u64) -> ScannedFile {
        ScannedFile {
            rel: rel.into(),
            abs: PathBuf::from("/lib").join(rel),
            sig: sig(size),
            sidecar: None,
        }
    }

    fn record(id: u64, path: &str, size: u64, hash: &str) -> PhotoRecord {
        PhotoRecord {
            sig: sig(size),
            ..crate::store::sample_record(id, path, hash)
        }
    }

    #[test]
    fn plan_sorts_every_path_into_one_fate() {
        let records = vec![
            record(1, "same.png", 10, "aa"),
            record(2, "changed.png", 10, "bb"),
            record(3, "gone.png", 10, "cc"),
            record(4, "also-gone.png", 10, "cc"),
        ];
        let skip = |size| SkipRecord {
            reason: "corrupt".into(),
            sig: Some(sig(size)),
        };
        let skipped: HashMap<String, SkipRecord> = [
            ("bad-still.jpg".to_string(), skip(5)),
            ("bad-fixed.jpg".to_string(), skip(5)),
            ("bad-deleted.jpg".to_string(), skip(5)),
        ]
        .into_iter()
        .collect();
        let scan = Scan {
            files: vec![
                file("same.png", 10),
                file("changed.png", 11),
                file("new.png", 7),
                file("bad-still.jpg", 5),
                file("bad-fixed.jpg", 6),
            ],
            problems: vec![ScanProblem {
                rel: "loop".into(),
                reason: "symbolic link loop".into(),
            }],
        };
        let plan = plan(records, skipped, scan);
        assert_eq!(plan.unchanged, 1);
        // bad-still.jpg (unchanged since skipped) and the scan's problem.
        assert_eq!(plan.skipped, 2);
        let jobs: Vec<(&str, Option<u64>)> = plan
            .jobs
            .iter()
            .map(|j| (j.file.rel.as_str(), j.old.as_ref().map(|r| r.id)))
            .collect();
        assert_eq!(
            jobs,
            vec![
                ("changed.png", Some(2)),
                ("new.png", None),
                ("bad-fixed.jpg", None)
            ]
        );
        let mut gone: Vec<u64> = plan.gone[&ContentHash::of(b"cc")]
            .iter()
            .map(|r| r.id)
            .collect();
        gone.sort();
        assert_eq!(gone, vec![3, 4]);
        assert_eq!(plan.gone.len(), 1);
        let changes: Vec<String> = plan
            .changes
            .iter()
            .map(|c| match c {
                Change::Skip { path, skip } => format!("skip {path}: {}", skip.reason),
                Change::Unskip { path } => format!("unskip {path}"),
                _ => "other".into(),
            })
            .collect();
        assert_eq!(
            changes,
            vec!["skip loop: symbolic link loop", "unskip bad-deleted.jpg"]
        );
        assert_eq!(
            plan.problems,
            vec![("loop".to_string(), "symbolic link loop".to_string())]
        );
    }

    #[test]
    fn a_changed_sidecar_makes_a_job() {
        let mut with_caption = file("a.png", 10);
        with_caption.sidecar = Some((PathBuf::from("/lib/a.txt"), sig(3)));
        let plan = plan(
            vec![record(1, "a.png", 10, "aa")],
            HashMap::new(),
            Scan {
                files: vec![with_caption],
                problems: vec![],
            },
        );
        assert_eq!((plan.unchanged, plan.jobs.len()), (0, 1));
    }
}
