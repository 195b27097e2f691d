//! The index's source of truth, in sled: one record per photo, its
//! embedding, the path and content-hash lookups, skipped files, and the index
//! metadata (format version, model, library root).
//!
//! Everything lives in one sled tree under key prefixes, so that a batch of
//! changes is one `apply_batch` (atomic on crash) followed by a flush: the
//! commit point of indexing. The vector and keyword indexes are derived from
//! this store and reconciled with it on open.
//!
//! Keys:
//!
//! | key | value |
//! |---|---|
//! | `m:meta` | `IndexMeta` (JSON) |
//! | `m:next_id` | next photo id (u64, big-endian) |
//! | `m:last_run` | `RunSummary` of the last completed run (JSON) |
//! | `p:<id>` | `PhotoRecord` (JSON) |
//! | `v:<id>` | embedding, little-endian f32 |
//! | `f:<path>` | id of the photo at that relative path |
//! | `h:<hash><id>` | empty; content hash (32 bytes) to ids (format 2) |
//! | `s:<path>` | `SkipRecord` (JSON) |
//! | `m:tags` | `TagSetup` (JSON): the vocabulary photos are tagged with |
//! | `m:tag-vectors` | the vocabulary's text embeddings, for one model (`TagVectors`, JSON) |
//!
//! Ids are big-endian u64, so records iterate in id order.

mod migrate;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::common::{CaptionSource, ContentHash, FileSig, ModelInfo};

/// The on-disk format this build writes. See `migrations/`.
pub const FORMAT_VERSION: u32 = migrate::LATEST;
/// The number of photo records (format 3 on).
pub const COUNT_KEY: &[u8] = b"m:count";
/// Present once every photo has had its near neighbours listed (indexes
/// made before the lists existed get them all at their next run).
const NEAR_READY_KEY: &[u8] = b"m:near-ready";
const TAGS_KEY: &[u8] = b"m:tags";
const TAG_VECTORS_KEY: &[u8] = b"m:tag-vectors";

/// A photo's near neighbours: (id, cosine similarity), nearest first.
pub type NearList = Vec<(u64, f32)>;

fn near_to_bytes(list: &[(u64, f32)]) -> Vec<u8> {
    let mut b = Vec::with_capacity(list.len() * 12);
    for (id, s) in list {
        b.extend_from_slice(&id.to_le_bytes());
        b.extend_from_slice(&s.to_le_bytes());
    }
    b
}

fn near_from_bytes(b: &[u8]) -> NearList {
    b.chunks_exact(12)
        .map(|c| {
            let id = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
            let s = f32::from_le_bytes(c[8..].try_into().expect("4 bytes"));
            (id, s)
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("index database: {0}")]
    Db(#[from] sled::Error),
    #[error("index record {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
    #[error(
        "this index has format {found}, newer than this clipdex understands ({supported}); upgrade clipdex to open it"
    )]
    TooNew { found: u32, supported: u32 },
    #[error("no index metadata: not a clipdex index, or it was never initialised")]
    NotInitialised,
    #[error("migration to format {version} failed: {message}")]
    Migration { version: u32, message: String },
    #[error("index summary {path}: {source}")]
    Summary {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One photo of the library.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhotoRecord {
    /// Stable id: kept across renames, new when the content changes, never reused.
    pub id: u64,
    /// Path relative to the library root, `/`-separated.
    pub path: String,
    pub sig: FileSig,
    /// blake3 of the file's bytes.
    pub hash: ContentHash,
    /// Upright size (after EXIF orientation), full resolution.
    pub width: u32,
    pub height: u32,
    /// Image format, lower case (`jpeg`, `png`, ...).
    pub format: String,
    /// EXIF DateTimeOriginal as `YYYY-MM-DDTHH:MM:SS`.
    #[serde(default)]
    pub taken: Option<String>,
    #[serde(default)]
    pub camera_make: Option<String>,
    #[serde(default)]
    pub camera_model: Option<String>,
    /// EXIF orientation (1-8) as stored in the file.
    #[serde(default = "default_orientation")]
    pub orientation: u8,
    #[serde(default)]
    pub caption: Option<String>,
    #[serde(default)]
    pub caption_source: Option<CaptionSource>,
    /// The sidecar caption file's signature, to notice edits.
    #[serde(default)]
    pub sidecar: Option<FileSig>,
    /// When the record was last written, seconds since the Unix epoch.
    pub indexed_at: i64,
    /// Automatic tags, most probable first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<PhotoTag>,
}

/// A tag of the index's vocabulary and its zero-shot probability for a photo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhotoTag {
    pub name: String,
    /// Probability, 0 to 1 (rounded to 3 digits).
    pub p: f32,
}

/// How an index tags its photos: the vocabulary file's text, where it came
/// from and the probability a tag needs. No setup: no tags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TagSetup {
    /// `built-in` or the file's path as given.
    pub source: String,
    /// The vocabulary file, as read.
    pub text: String,
    pub threshold: f32,
}

/// A vocabulary's text embeddings for one model, kept so that a run does
/// not embed hundreds of prompts again. `key` names the model and
/// vocabulary they were made for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TagVectors {
    pub key: String,
    pub dim: usize,
    /// One unit vector per tag, in vocabulary order, `dim` values each.
    pub data: Vec<f32>,
}

fn default_orientation() -> u8 {
    1
}

impl PhotoRecord {
    /// The camera as one string ("Canon EOS 5D"), without repeating the make.
    pub fn camera(&self) -> Option<String> {
        match (&self.camera_make, &self.camera_model) {
            (Some(make), Some(model)) if model.to_lowercase().starts_with(&make.to_lowercase()) => {
                Some(model.clone())
            }
            (Some(make), Some(model)) => Some(format!("{make} {model}")),
            (Some(one), None) | (None, Some(one)) => Some(one.clone()),
            (None, None) => None,
        }
    }
}

/// A file that could not be indexed, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipRecord {
    pub reason: String,
    /// The file as it was when skipped; it is retried when this changes.
    #[serde(default)]
    pub sig: Option<FileSig>,
}

/// What shaped an index; checked whenever it is opened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexMeta {
    pub format_version: u32,
    pub model: ModelInfo,
    /// Canonical path of the library root.
    pub library: String,
    pub created_at: i64,
    pub clipdex_version: String,
}

/// What an indexing run did, counted: the progress of a run in flight
/// and the summary stored after it share these.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunCounts {
    /// Files found in the library (images and unreadable entries).
    pub files_seen: u64,
    /// New photos embedded.
    #[serde(default)]
    pub added: u64,
    /// Photos whose content changed, embedded again.
    #[serde(default)]
    pub replaced: u64,
    pub moved: u64,
    pub duplicates: u64,
    /// Photos whose metadata or caption changed, not their pixels.
    pub updated: u64,
    pub removed: u64,
    pub skipped: u64,
    pub unchanged: u64,
    /// Bytes of image files read.
    #[serde(default)]
    pub bytes_read: u64,
    /// Worker time reading, hashing, decoding and preprocessing (summed over workers).
    #[serde(default)]
    pub decode_seconds: f64,
    /// Time in the model.
    #[serde(default)]
    pub embed_seconds: f64,
    /// Time tagging what the model embedded.
    #[serde(default)]
    pub tag_seconds: f64,
    /// Wall time of the run.
    #[serde(default)]
    pub elapsed_seconds: f64,
}

/// One completed indexing run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    pub started_at: i64,
    pub finished_at: i64,
    /// Images the model embedded (`added + replaced`).
    pub embedded: u64,
    #[serde(flatten)]
    pub counts: RunCounts,
    /// Peak resident memory of the process that ran it, bytes (0 where
    /// the system does not say).
    #[serde(default)]
    pub peak_memory_bytes: u64,
}

/// One change to the store; a batch of them commits atomically.
#[derive(Debug)]
pub enum Change {
    /// Insert or update a record; `vector` is written when given. `old_path`
    /// is the path the same id had before (a move), whose lookup is dropped.
    Put {
        record: PhotoRecord,
        vector: Option<Vec<f32>>,
        old_path: Option<String>,
    },
    /// Remove a photo and everything keyed by it.
    Remove {
        record: PhotoRecord,
    },
    Skip {
        path: String,
        skip: SkipRecord,
    },
    Unskip {
        path: String,
    },
}

/// The sled store of one index.
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    /// Bumped by every change to the photos or their near lists (in this
    /// process: the one that holds the index makes them all).
    version: std::sync::atomic::AtomicU64,
    /// Where [`Summary`] is kept.
    summary_path: PathBuf,
    /// Whether this process changed what the summary records since it was
    /// last written (the file is gone while it is so).
    summary_stale: std::sync::atomic::AtomicBool,
}

/// What `clipdex status` shows of the store, kept in a file beside it
/// (`db.summary.json`), so that status need not open the store: sled reads
/// its whole page table on open, most of a second at a million photos.
///
/// The file is valid whenever it exists. The process that holds the index
/// removes it (durably) before its first change to what it records, and
/// writes it again when it closes the store; a process killed in between
/// leaves none, and the next status reads the store and writes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub meta: IndexMeta,
    pub photos: usize,
    pub last_run: Option<RunSummary>,
    pub skipped: Vec<(String, SkipRecord)>,
}

fn id_key(prefix: u8, id: u64) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[0] = prefix;
    k[1] = b':';
    k[2..].copy_from_slice(&id.to_be_bytes());
    k
}

fn str_key(prefix: u8, s: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + s.len());
    k.push(prefix);
    k.push(b':');
    k.extend_from_slice(s.as_bytes());
    k
}

fn hash_key(hash: &ContentHash, id: u64) -> [u8; 42] {
    let mut k = [0u8; 42];
    k[0] = b'h';
    k[1] = b':';
    k[2..34].copy_from_slice(hash.as_bytes());
    k[34..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The id at the end of a key; a key too short to hold one is a corrupt
/// store, not photo 0.
fn key_id(key: &[u8]) -> Result<u64> {
    id_from_key(key).ok_or_else(|| Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: "the key holds no photo id".into(),
    })
}

fn id_from_key(key: &[u8]) -> Option<u64> {
    key.get(key.len().checked_sub(8)?..)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

fn json<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

pub fn vector_to_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn vector_from_bytes(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

impl Store {
    /// Opens (creating if needed) the database folder; does not check the format.
    fn open_db(dir: &Path) -> Result<Self> {
        // sled lets go of its file lock when the last reference to a closed
        // database goes, which its epoch-based reclamation can put off past
        // the drop: a store reopened at once in the same process (a test, a
        // switch of generations) waits for that instead of failing. Another
        // process never gets here: the index's own lock comes first.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::Config::new()
                .path(dir)
                .cache_capacity(64 << 20)
                .open()
            {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                opened => break opened?,
            }
        };
        let tree = db.open_tree("index")?;
        Ok(Self {
            db,
            tree,
            version: Default::default(),
            summary_path: summary_path(dir),
            summary_stale: Default::default(),
        })
    }

    /// The summary kept beside the store in `dir`, if there is one this
    /// build reads (of the current format).
    pub fn kept_summary(dir: &Path) -> Option<Summary> {
        let bytes = std::fs::read(summary_path(dir)).ok()?;
        serde_json::from_slice::<Summary>(&bytes)
            .ok()
            .filter(|s| s.meta.format_version == FORMAT_VERSION)
    }

    /// The store's [`Summary`], read from it.
    pub fn summary(&self) -> Result<Summary> {
        Ok(Summary {
            meta: self.meta()?,
            photos: self.count(),
            last_run: self.last_run()?,
            skipped: self.skipped()?,
        })
    }

    /// Writes `summary` (this store's, just read) beside the store.
    pub fn keep_summary(&self, summary: &Summary) -> std::io::Result<()> {
        crate::common::fs::write_synced(
            &self.summary_path,
            &serde_json::to_vec(summary).expect("summary serialises"),
        )?;
        self.summary_stale
            .store(false, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Before a change to what the summary records: removes it, for good
    /// (a crash after the change must not find it).
    fn forget_summary(&self) -> Result<()> {
        if self
            .summary_stale
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return Ok(());
        }
        match std::fs::remove_file(&self.summary_path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                self.summary_stale
                    .store(false, std::sync::atomic::Ordering::Release);
                return Err(self.summary_error(e));
            }
            _ => {}
        }
        if let Some(parent) = self.summary_path.parent() {
            crate::common::fs::sync_dir(parent).map_err(|e| self.summary_error(e))?;
        }
        Ok(())
    }

    fn summary_error(&self, source: std::io::Error) -> Error {
        Error::Summary {
            path: self.summary_path.display().to_string(),
            source,
        }
    }

    /// Creates a new index store with its metadata, numbering its photos
    /// from `first_id` (a shard's ids start at its own, see
    /// [`crate::common::shard`]).
    pub fn create(dir: &Path, meta: &IndexMeta, first_id: u64) -> Result<Self> {
        let store = Self::open_db(dir)?;
        if store.tree.contains_key(b"m:meta")? {
            return Ok(store);
        }
        store.forget_summary()?;
        let mut meta = meta.clone();
        meta.format_version = FORMAT_VERSION;
        store
            .tree
            .insert(b"m:next_id", &first_id.max(1).to_be_bytes())?;
        store.tree.insert(
            b"m:meta",
            serde_json::to_vec(&meta).expect("meta serialises"),
        )?;
        store.db.flush()?;
        Ok(store)
    }

    /// Opens an existing store, migrating it to the current format.
    pub fn open(dir: &Path) -> Result<Self> {
        let store = Self::open_db(dir)?;
        let meta = store.meta()?;
        if meta.format_version > FORMAT_VERSION {
            return Err(Error::TooNew {
                found: meta.format_version,
                supported: FORMAT_VERSION,
            });
        }
        if meta.format_version < FORMAT_VERSION {
            store.forget_summary()?;
            migrate::run(&store.tree, meta.format_version)?;
            let mut meta = meta;
            meta.format_version = FORMAT_VERSION;
            store.set_meta(&meta)?;
        }
        Ok(store)
    }

    pub fn meta(&self) -> Result<IndexMeta> {
        match self.tree.get(b"m:meta")? {
            Some(v) => json(b"m:meta", &v),
            None => Err(Error::NotInitialised),
        }
    }

    pub fn set_meta(&self, meta: &IndexMeta) -> Result<()> {
        self.forget_summary()?;
        self.tree.insert(
            b"m:meta",
            serde_json::to_vec(meta).expect("meta serialises"),
        )?;
        self.db.flush()?;
        Ok(())
    }

    pub fn last_run(&self) -> Result<Option<RunSummary>> {
        self.tree
            .get(b"m:last_run")?
            .map(|v| json(b"m:last_run", &v))
            .transpose()
    }

    pub fn set_last_run(&self, run: &RunSummary) -> Result<()> {
        self.forget_summary()?;
        self.tree.insert(
            b"m:last_run",
            serde_json::to_vec(run).expect("summary serialises"),
        )?;
        self.db.flush()?;
        Ok(())
    }

    /// The index's tag vocabulary; `None` when it has never had one, or has
    /// none now (`set_tag_setup(None)`, stored as JSON null).
    pub fn tag_setup(&self) -> Result<Option<Option<TagSetup>>> {
        self.tree
            .get(TAGS_KEY)?
            .map(|v| json(TAGS_KEY, &v))
            .transpose()
    }

    /// Records the vocabulary photos are tagged with from now on.
    pub fn set_tag_setup(&self, setup: Option<&TagSetup>) -> Result<()> {
        self.tree.insert(
            TAGS_KEY,
            serde_json::to_vec(&setup).expect("tag setup serialises"),
        )?;
        self.db.flush()?;
        self.bump();
        Ok(())
    }

    /// The kept vocabulary embeddings, if they were made for `key`.
    pub fn tag_vectors(&self, key: &str) -> Result<Option<TagVectors>> {
        Ok(match self.tree.get(TAG_VECTORS_KEY)? {
            Some(v) => Some(json::<TagVectors>(TAG_VECTORS_KEY, &v)?).filter(|t| t.key == key),
            None => None,
        })
    }

    pub fn set_tag_vectors(&self, vectors: &TagVectors) -> Result<()> {
        self.tree.insert(
            TAG_VECTORS_KEY,
            serde_json::to_vec(vectors).expect("tag vectors serialise"),
        )?;
        self.db.flush()?;
        Ok(())
    }

    /// Reserves `n` consecutive ids; they are persisted with the next commit.
    pub fn reserve_ids(&self, n: u64) -> Result<u64> {
        let old = self.tree.fetch_and_update(b"m:next_id", |v| {
            let cur = v
                .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
                .unwrap_or(1);
            Some(cur.saturating_add(n).to_be_bytes().to_vec())
        })?;
        Ok(old
            .map(|b| u64::from_be_bytes(b.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(1))
    }

    pub fn get(&self, id: u64) -> Result<Option<PhotoRecord>> {
        let key = id_key(b'p', id);
        self.tree.get(key)?.map(|v| json(&key, &v)).transpose()
    }

    /// Whether photo `id` has a record (without reading it).
    pub fn contains(&self, id: u64) -> Result<bool> {
        Ok(self.tree.contains_key(id_key(b'p', id))?)
    }

    pub fn id_for_path(&self, path: &str) -> Result<Option<u64>> {
        Ok(self
            .tree
            .get(str_key(b'f', path))?
            .and_then(|v| id_from_key(&v)))
    }

    pub fn ids_with_hash(&self, hash: &ContentHash) -> Result<Vec<u64>> {
        let mut prefix = b"h:".to_vec();
        prefix.extend_from_slice(hash.as_bytes());
        self.tree
            .scan_prefix(prefix)
            .keys()
            .map(|k| key_id(&k?))
            .collect()
    }

    pub fn vector(&self, id: u64) -> Result<Option<Vec<f32>>> {
        Ok(self
            .tree
            .get(id_key(b'v', id))?
            .map(|v| vector_from_bytes(&v)))
    }

    /// Every record, in id order.
    pub fn records(&self) -> impl Iterator<Item = Result<PhotoRecord>> + '_ {
        self.tree.scan_prefix(b"p:").map(|kv| {
            let (k, v) = kv?;
            json(&k, &v)
        })
    }

    /// Every stored embedding, in id order.
    pub fn vectors(&self) -> impl Iterator<Item = Result<(u64, Vec<f32>)>> + '_ {
        self.tree.scan_prefix(b"v:").map(|kv| {
            let (k, v) = kv?;
            Ok((key_id(&k)?, vector_from_bytes(&v)))
        })
    }

    /// Ids of all photos.
    pub fn ids(&self) -> Result<BTreeSet<u64>> {
        self.tree
            .scan_prefix(b"p:")
            .keys()
            .map(|k| key_id(&k?))
            .collect()
    }

    fn bump(&self) {
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// A number that changes whenever the photos or their near lists do:
    /// what was computed from them at one version holds while it stays.
    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Photos whose near neighbours are not listed yet: those embedded since
    /// the last listing, or every photo of an index made before the lists.
    pub fn near_pending(&self) -> Result<BTreeSet<u64>> {
        if !self.tree.contains_key(NEAR_READY_KEY)? {
            return self.ids();
        }
        self.tree
            .scan_prefix(b"q:")
            .keys()
            .map(|k| key_id(&k?))
            .collect()
    }

    /// The near neighbours listed for a photo.
    pub fn near(&self, id: u64) -> Result<Option<NearList>> {
        Ok(self
            .tree
            .get(id_key(b'n', id))?
            .map(|v| near_from_bytes(&v)))
    }

    /// Every photo's near neighbours, in id order.
    pub fn near_lists(&self) -> impl Iterator<Item = Result<(u64, NearList)>> + '_ {
        self.tree.scan_prefix(b"n:").map(|kv| {
            let (k, v) = kv?;
            Ok((key_id(&k)?, near_from_bytes(&v)))
        })
    }

    /// Stores near-neighbour lists atomically, and marks their photos (and,
    /// with `complete`, the whole index) as listed. A list for a photo that
    /// is gone is not stored.
    pub fn set_near(&self, lists: &[(u64, NearList)], complete: bool) -> Result<()> {
        let mut batch = sled::Batch::default();
        for (id, list) in lists {
            if self.contains(*id)? {
                batch.insert(&id_key(b'n', *id), near_to_bytes(list));
            }
            batch.remove(&id_key(b'q', *id));
        }
        if complete {
            batch.insert(NEAR_READY_KEY, &[]);
        }
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        self.bump();
        Ok(())
    }

    /// The number of photo records, kept under [`COUNT_KEY`] by every
    /// commit (counted from the records when that key is missing).
    pub fn count(&self) -> usize {
        match self.tree.get(COUNT_KEY) {
            Ok(Some(v)) if v.len() == 8 => {
                u64::from_le_bytes(v.as_ref().try_into().expect("8 bytes")) as usize
            }
            _ => self.tree.scan_prefix(b"p:").count(),
        }
    }

    /// Files skipped, with their reasons.
    pub fn skipped(&self) -> Result<Vec<(String, SkipRecord)>> {
        self.tree
            .scan_prefix(b"s:")
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k[2..]).into_owned(), json(&k, &v)?))
            })
            .collect()
    }

    pub fn skip_record(&self, path: &str) -> Result<Option<SkipRecord>> {
        let key = str_key(b's', path);
        self.tree.get(&key)?.map(|v| json(&key, &v)).transpose()
    }

    /// Applies a batch of changes atomically and makes it durable.
    pub fn commit(&self, changes: &[Change]) -> Result<()> {
        self.forget_summary()?;
        // Paths that get a record in this batch keep their lookup whatever
        // else the batch removes or moves away from them.
        let put_paths: std::collections::HashSet<&str> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Put { record, .. } => Some(record.path.as_str()),
                _ => None,
            })
            .collect();
        let mut batch = sled::Batch::default();
        // The record count moves with the records, in the same batch.
        batch.insert(COUNT_KEY, &self.count_after(changes)?.to_le_bytes());
        for change in changes {
            match change {
                Change::Put {
                    record,
                    vector,
                    old_path,
                } => {
                    if let Some(old) = old_path {
                        if !put_paths.contains(old.as_str()) {
                            batch.remove(str_key(b'f', old));
                        }
                    }
                    batch.insert(
                        &id_key(b'p', record.id),
                        serde_json::to_vec(record).expect("record serialises"),
                    );
                    batch.insert(str_key(b'f', &record.path), &id_key(b'p', record.id));
                    batch.insert(hash_key(&record.hash, record.id).to_vec(), &[]);
                    batch.remove(str_key(b's', &record.path));
                    if let Some(v) = vector {
                        batch.insert(&id_key(b'v', record.id), vector_to_bytes(v));
                        // A new picture: its near neighbours are listed again.
                        batch.remove(&id_key(b'n', record.id));
                        batch.insert(&id_key(b'q', record.id), &[]);
                    }
                }
                Change::Remove { record } => {
                    batch.remove(&id_key(b'p', record.id));
                    batch.remove(&id_key(b'v', record.id));
                    batch.remove(&id_key(b'n', record.id));
                    batch.remove(&id_key(b'q', record.id));
                    batch.remove(hash_key(&record.hash, record.id).to_vec());
                    // The path may already belong to a newer record (a replaced file).
                    if !put_paths.contains(record.path.as_str())
                        && self.id_for_path(&record.path)? == Some(record.id)
                    {
                        batch.remove(str_key(b'f', &record.path));
                    }
                }
                Change::Skip { path, skip } => {
                    batch.insert(
                        str_key(b's', path),
                        serde_json::to_vec(skip).expect("skip serialises"),
                    );
                }
                Change::Unskip { path } => batch.remove(str_key(b's', path)),
            }
        }
        self.tree.apply_batch(batch)?;
        // sled flushes on its own only every 500 ms: a commit is durable here.
        self.db.flush()?;
        self.bump();
        Ok(())
    }

    /// The record count once `changes` are applied: one more for each put
    /// of an id without a record, one less for each removal of one with.
    fn count_after(&self, changes: &[Change]) -> Result<u64> {
        let mut count = self.count() as i64;
        let mut present: std::collections::HashMap<u64, bool> = Default::default();
        for change in changes {
            let (id, now) = match change {
                Change::Put { record, .. } => (record.id, true),
                Change::Remove { record } => (record.id, false),
                Change::Skip { .. } | Change::Unskip { .. } => continue,
            };
            let before = match present.get(&id) {
                Some(&p) => p,
                None => self.tree.contains_key(id_key(b'p', id))?,
            };
            count += i64::from(now) - i64::from(before);
            present.insert(id, now);
        }
        Ok(count.max(0) as u64)
    }

    pub fn size_on_disk(&self) -> Result<u64> {
        Ok(self.db.size_on_disk()?)
    }

    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    /// The raw tree, for migrations and their tests (which may change
    /// anything, so the summary goes).
    pub fn raw_tree(&self) -> &sled::Tree {
        let _ = self.forget_summary();
        &self.tree
    }
}

/// Where the summary of the store in `dir` is kept: beside it, in the
/// index's folder, so that it moves with the store when a generation
/// replaces the index.
fn summary_path(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "db".into());
    dir.with_file_name(format!("{name}.summary.json"))
}

impl Drop for Store {
    /// A store this process changed leaves its summary written, once what
    /// it records is on disk.
    fn drop(&mut self) {
        if self
            .summary_stale
            .load(std::sync::atomic::Ordering::Acquire)
        {
            let kept = self
                .db
                .flush()
                .map_err(Error::from)
                .and_then(|_| self.summary())
                .and_then(|summary| {
                    self.keep_summary(&summary)
                        .map_err(|e| self.summary_error(e))
                });
            if let Err(e) = kept {
                tracing::debug!(error = %e, "the store's summary was not written");
            }
        }
    }
}

/// A record with every optional field empty, for tests of the layers above;
/// its content hash is that of `content`.
#[cfg(test)]
pub(crate) fn sample_record(id: u64, path: &str, content: &str) -> PhotoRecord {
    PhotoRecord {
        id,
        path: path.into(),
        sig: FileSig::default(),
        hash: ContentHash::of(content.as_bytes()),
        width: 10,
        height: 10,
        format: "png".into(),
        taken: None,
        camera_make: None,
        camera_model: None,
        orientation: 1,
        caption: None,
        caption_source: None,
        sidecar: None,
        indexed_at: 0,
        tags: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> IndexMeta {
        IndexMeta {
            format_version: 0,
            model: ModelInfo {
                id: "m".into(),
                fingerprint: "f".into(),
                embedding_dim: 2,
                image_size: 32,
                context_length: 77,
                family: "clip".into(),
                precision: Default::default(),
            },
            library: "/lib".into(),
            created_at: 0,
            clipdex_version: "test".into(),
        }
    }

    fn record(id: u64, path: &str, hash: u8) -> PhotoRecord {
        PhotoRecord {
            sig: FileSig {
                size: 1,
                mtime_ns: 2,
            },
            ..sample_record(id, path, &hash.to_string())
        }
    }

    /// A new vector queues its photo for listing and drops its old list; a
    /// listing clears the queue; a removal drops both; an index without the
    /// ready mark has every photo pending.
    #[test]
    fn near_lists_follow_the_vectors() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path(), &meta(), 1).unwrap();
        let put = |id: u64, vector: Option<Vec<f32>>| Change::Put {
            record: record(id, &format!("{id}.png"), id as u8),
            vector,
            old_path: None,
        };
        store
            .commit(&[put(1, Some(vec![1.0, 0.0])), put(2, Some(vec![0.0, 1.0]))])
            .unwrap();
        let all: BTreeSet<u64> = [1, 2].into();
        assert_eq!(store.near_pending().unwrap(), all);
        store
            .set_near(
                &[(1, vec![(2, 0.9)]), (2, vec![(1, 0.9)]), (7, vec![])],
                true,
            )
            .unwrap();
        assert!(store.near_pending().unwrap().is_empty());
        assert_eq!(store.near(1).unwrap(), Some(vec![(2, 0.9)]));
        assert_eq!(
            store.near(7).unwrap(),
            None,
            "no list for a photo that is not there"
        );
        // A record change without a new picture keeps the list.
        store.commit(&[put(1, None)]).unwrap();
        assert_eq!(store.near(1).unwrap(), Some(vec![(2, 0.9)]));
        store.commit(&[put(2, Some(vec![0.5, 0.5]))]).unwrap();
        assert_eq!(store.near(2).unwrap(), None);
        assert_eq!(store.near_pending().unwrap(), [2].into());
        store
            .commit(&[Change::Remove {
                record: record(2, "2.png", 2),
            }])
            .unwrap();
        assert!(store.near_pending().unwrap().is_empty());
        let lists: Vec<(u64, NearList)> = store.near_lists().map(|l| l.unwrap()).collect();
        assert_eq!(lists, vec![(1, vec![(2, 0.9)])]);
    }

    /// The kept count agrees with the records through puts of new and
    /// existing ids, removals of present and absent ones, several changes
    /// to one id in a batch, and a reopen; without its key it is counted.
    #[test]
    fn the_record_count_follows_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path(), &meta(), 1).unwrap();
        let put = |id| Change::Put {
            record: record(id, &format!("{id}.png"), id as u8),
            vector: None,
            old_path: None,
        };
        let remove = |id| Change::Remove {
            record: record(id, &format!("{id}.png"), id as u8),
        };
        let scanned = |s: &Store| s.tree.scan_prefix(b"p:").count();
        assert_eq!(store.count(), 0);
        store.commit(&[put(1), put(2), put(3), put(2)]).unwrap();
        assert_eq!((store.count(), scanned(&store)), (3, 3));
        // An update, a removal of a missing id, a put then removal in one batch.
        store
            .commit(&[put(1), remove(9), put(4), remove(4), remove(2)])
            .unwrap();
        assert_eq!((store.count(), scanned(&store)), (2, 2));
        store.commit(&[remove(3), put(3), put(5)]).unwrap();
        assert_eq!((store.count(), scanned(&store)), (3, 3));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.count(), 3);
        store.tree.remove(COUNT_KEY).unwrap();
        assert_eq!(store.count(), 3);
        store.commit(&[put(6)]).unwrap();
        assert_eq!((store.count(), scanned(&store)), (4, 4));
    }

    #[test]
    fn commits_and_looks_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path(), &meta(), 1).unwrap();
        assert_eq!(store.meta().unwrap().format_version, FORMAT_VERSION);
        let first = store.reserve_ids(2).unwrap();
        assert_eq!(store.reserve_ids(1).unwrap(), first + 2);
        let a = record(first, "a.png", 1);
        let b = record(first + 1, "dir/b.png", 1);
        store
            .commit(&[
                Change::Put {
                    record: a.clone(),
                    vector: Some(vec![1.0, 0.0]),
                    old_path: None,
                },
                Change::Put {
                    record: b.clone(),
                    vector: Some(vec![0.0, 1.0]),
                    old_path: None,
                },
                Change::Skip {
                    path: "bad.jpg".into(),
                    skip: SkipRecord {
                        reason: "empty file".into(),
                        sig: None,
                    },
                },
            ])
            .unwrap();
        assert_eq!(store.get(a.id).unwrap(), Some(a.clone()));
        assert_eq!(store.id_for_path("dir/b.png").unwrap(), Some(b.id));
        assert_eq!(store.ids_with_hash(&a.hash).unwrap(), vec![a.id, b.id]);
        assert_eq!(store.vector(b.id).unwrap(), Some(vec![0.0, 1.0]));
        assert_eq!(store.skipped().unwrap().len(), 1);

        // Move b, remove a.
        let mut moved = b.clone();
        moved.path = "c.png".into();
        store
            .commit(&[
                Change::Put {
                    record: moved.clone(),
                    vector: None,
                    old_path: Some(b.path.clone()),
                },
                Change::Remove { record: a.clone() },
            ])
            .unwrap();
        assert_eq!(store.id_for_path("dir/b.png").unwrap(), None);
        assert_eq!(store.id_for_path("c.png").unwrap(), Some(b.id));
        assert_eq!(store.vector(b.id).unwrap(), Some(vec![0.0, 1.0]));
        assert_eq!(
            store.ids().unwrap().into_iter().collect::<Vec<_>>(),
            vec![b.id]
        );
        assert_eq!(store.vector(a.id).unwrap(), None);
        assert_eq!(store.ids_with_hash(&a.hash).unwrap(), vec![b.id]);
    }

    #[test]
    fn refuses_newer_formats() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path(), &meta(), 1).unwrap();
        let mut m = store.meta().unwrap();
        m.format_version = FORMAT_VERSION + 1;
        store.set_meta(&m).unwrap();
        drop(store);
        assert!(matches!(Store::open(dir.path()), Err(Error::TooNew { .. })));
    }

    #[test]
    fn camera_names_do_not_repeat_the_make() {
        let mut r = record(1, "a", 0);
        r.camera_make = Some("Canon".into());
        r.camera_model = Some("Canon EOS 5D".into());
        assert_eq!(r.camera().as_deref(), Some("Canon EOS 5D"));
        r.camera_make = Some("NIKON CORPORATION".into());
        r.camera_model = Some("D750".into());
        assert_eq!(r.camera().as_deref(), Some("NIKON CORPORATION D750"));
    }
}
