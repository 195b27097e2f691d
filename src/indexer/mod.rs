//! One photo index on disk: the sled store (source of truth), the HNSW vector
//! index, the tantivy keyword index and the thumbnails, kept in agreement;
//! and the indexing run that brings it up to date with its library.
//!
//! Layout of an index folder (also in `index/README.md`):
//!
//! ```text
//! LOCK            held by the process that has the index open
//! progress.json   statistics of the run in progress (or the last one)
//! db/             sled store
//! vectors/        CURRENT + gen-N/ (hnsw_rs graph and member ids)
//! keyword/        tantivy index
//! thumbs/ab/<blake3>.jpg
//! ```
//!
//! The store commits first; the vector and keyword indexes follow it and are
//! reconciled with it whenever the index is opened, so a process killed at any
//! moment leaves an index that opens consistent, losing at most the batch it
//! was committing.

pub mod generation;
pub mod near;
pub mod replica;
mod run;
pub mod tags;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::store::RunSummary;
pub use run::{Phase, Progress, RunOptions, run};

use crate::common::ModelInfo;
use crate::keyword::{self, KeywordIndex};
use crate::store::{self, FORMAT_VERSION, IndexMeta, PhotoRecord, SkipRecord, Store};
use crate::vector::{self, EngineConfig, REBUILD_DEAD_FRACTION, VectorIndex, Vectors};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Vector(#[from] vector::Error),
    #[error(transparent)]
    Keyword(#[from] keyword::Error),
    #[error(
        "the index at {path} is in use by another clipdex process ({holder}); wait for it to finish or stop it"
    )]
    InUse { path: String, holder: Holder },
    #[error("no index at {0}: run `clipdex index <LIBRARY> --index {0}` first")]
    NotFound(String),
    #[error(
        "the index at {path} was built with model {index_model} (fingerprint {index_fingerprint}); \
         {asked_model} (fingerprint {asked_fingerprint}) embeds into another space. Use --model {index_model}, \
         or a new --index folder for the other model"
    )]
    ModelMismatch {
        path: String,
        index_model: String,
        index_fingerprint: String,
        asked_model: String,
        asked_fingerprint: String,
    },
    #[error(
        "the index at {path} holds {index_precision}-precision embeddings of {model}, which {asked_precision} \
         ones would not match; use --precision {index_precision}, or switch the index with \
         `clipdex reindex --precision {asked_precision}`"
    )]
    PrecisionMismatch {
        path: String,
        model: String,
        index_precision: crate::model::Precision,
        asked_precision: crate::model::Precision,
    },
    #[error(
        "the index at {path} belongs to the library {indexed}, not {asked}; use another --index folder"
    )]
    LibraryMismatch {
        path: String,
        indexed: String,
        asked: String,
    },
    #[error(
        "the index at {path} keeps its vectors in {recorded}, not {asked}; leave out --vectors, \
         or use a new --index folder for the other engine"
    )]
    EngineMismatch {
        path: String,
        recorded: String,
        asked: String,
    },
    /// Indexing asked of a search replica, or a replica's work of an index.
    #[error("{0}")]
    NotReplica(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("model: {0}")]
    Model(#[from] crate::model::Error),
    #[error("indexing stopped: {0}")]
    Stopped(String),
    #[error("the tag vocabulary cannot be used: {0}")]
    Tags(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// An index's contents as [`Index::overview`] reads them.
pub struct Overview {
    pub paths: IndexPaths,
    pub meta: IndexMeta,
    pub photos: usize,
    pub vectors: usize,
    pub keywords: u64,
    pub last_run: Option<RunSummary>,
    pub skipped: Vec<(String, SkipRecord)>,
    /// In a shared engine: every shard of the collection, with its photos
    /// there and its last report (this index's shard among them).
    pub shards: Vec<vector::milvus::ShardStatus>,
}

/// The files and folders of an index.
#[derive(Clone, Debug)]
pub struct IndexPaths {
    pub root: PathBuf,
}

impl IndexPaths {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    pub fn db(&self) -> PathBuf {
        self.root.join("db")
    }
    pub fn vectors(&self) -> PathBuf {
        self.root.join("vectors")
    }
    pub fn keyword(&self) -> PathBuf {
        self.root.join("keyword")
    }
    pub fn thumbs(&self) -> PathBuf {
        self.root.join("thumbs")
    }
    pub fn lock(&self) -> PathBuf {
        self.root.join("LOCK")
    }
    pub fn progress(&self) -> PathBuf {
        self.root.join("progress.json")
    }
    /// Whether an index was ever created here.
    pub fn exists(&self) -> bool {
        self.db().join("conf").is_file() || self.db().join("db").is_file()
    }
}

/// What `reconcile` repaired.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Repair {
    pub vectors_added: usize,
    pub vectors_removed: usize,
    pub vectors_rebuilt: bool,
    pub keywords_added: usize,
    pub keywords_removed: usize,
}

impl Repair {
    pub fn is_empty(&self) -> bool {
        *self == Repair::default()
    }
}

/// The id sets of the three stores, for `clipdex status --check`.
#[derive(Clone, Debug, Serialize)]
pub struct Consistency {
    pub records: usize,
    pub vectors: usize,
    pub keywords: usize,
    pub missing_vectors: Vec<u64>,
    pub extra_vectors: Vec<u64>,
    pub missing_keywords: Vec<u64>,
    pub extra_keywords: Vec<u64>,
    pub records_without_embedding: Vec<u64>,
    pub consistent: bool,
}

/// An open index. Holding it holds the index's lock.
pub struct Index {
    paths: IndexPaths,
    store: Store,
    vectors: Vectors,
    keywords: KeywordIndex,
    meta: IndexMeta,
    _lock: File,
}

fn lock(paths: &IndexPaths) -> Result<File> {
    std::fs::create_dir_all(&paths.root).map_err(io_err(&paths.root))?;
    let lock_path = paths.lock();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&lock_path)
        .map_err(io_err(&lock_path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            // Written by the holder just after it locked: a reader may find it empty.
            let holder = std::fs::read(&lock_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            return Err(Error::InUse {
                path: paths.root.display().to_string(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&lock_path)(e)),
    }
    write_holder(
        &file,
        &Holder {
            pid: std::process::id(),
            ..Holder::default()
        },
    );
    Ok(file)
}

/// Who holds an index, as its lock file says (JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub pid: u32,
    /// What it is doing (`clipdex serve`).
    #[serde(default)]
    pub what: Option<String>,
    /// Where a server that holds it answers (`http://127.0.0.1:7878`).
    #[serde(default)]
    pub url: Option<String>,
    /// The index's library, and its model's id and fingerprint: what another
    /// process needs to build the index's next generation while it is held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}", self.pid)?;
        match (&self.what, &self.url) {
            (Some(what), Some(url)) => write!(f, ", {what} at {url}"),
            (Some(what), None) => write!(f, ", {what}"),
            (None, Some(url)) => write!(f, ", at {url}"),
            (None, None) => Ok(()),
        }
    }
}

fn write_holder(mut file: &File, holder: &Holder) {
    use std::io::{Seek, SeekFrom};
    let json = serde_json::to_vec(holder).expect("holder serialises");
    let _ = file
        .set_len(0)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .and_then(|_| file.write_all(&json));
}

pub(crate) use crate::common::time::{now_millis, now_secs};

/// An [`Overview`] from an open store and the counts of the graph and keyword index.
fn overview_of(
    paths: IndexPaths,
    store: &Store,
    vectors: usize,
    keywords: u64,
) -> Result<Overview> {
    Ok(overview_from(paths, store.summary()?, vectors, keywords))
}

fn overview_from(
    paths: IndexPaths,
    summary: store::Summary,
    vectors: usize,
    keywords: u64,
) -> Overview {
    Overview {
        meta: summary.meta,
        photos: summary.photos,
        vectors,
        keywords,
        last_run: summary.last_run,
        skipped: summary.skipped,
        paths,
        shards: Vec::new(),
    }
}

impl Index {
    /// Opens the index at `root` for `library` with `model`, creating it if
    /// there is none. An existing index must have been built for the same
    /// library and model.
    pub fn create_or_open(root: &Path, library: &Path, model: &ModelInfo) -> Result<Self> {
        Self::create_or_open_in(root, library, model, None)
    }

    /// [`Self::create_or_open`] with the vectors in `engine` (`None`: the
    /// one an existing index records, embedded for a new one). An existing
    /// index in another engine is refused.
    pub fn create_or_open_in(
        root: &Path,
        library: &Path,
        model: &ModelInfo,
        engine: Option<&EngineConfig>,
    ) -> Result<Self> {
        let paths = IndexPaths::new(root);
        let library = std::fs::canonicalize(library).map_err(io_err(library))?;
        if !library.is_dir() {
            return Err(Error::Io {
                path: library.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotADirectory,
                    "the library must be a folder",
                ),
            });
        }
        let existing = match paths.exists().then(|| Self::open(root)) {
            // Created but never initialised (killed during creation): start over.
            Some(Err(Error::Store(store::Error::NotInitialised))) | None => None,
            Some(other) => Some(other?),
        };
        if let Some(index) = existing {
            if let Some(engine) = engine {
                let recorded = EngineConfig::read(&paths.root)?;
                if !recorded.same_engine(engine) {
                    return Err(Error::EngineMismatch {
                        path: root.display().to_string(),
                        recorded: recorded.describe(),
                        asked: engine.describe(),
                    });
                }
            }
            index.check_model(model)?;
            if index.meta.library != library.display().to_string() {
                return Err(Error::LibraryMismatch {
                    path: root.display().to_string(),
                    indexed: index.meta.library.clone(),
                    asked: library.display().to_string(),
                });
            }
            return Ok(index);
        }
        let lock = lock(&paths)?;
        let meta = IndexMeta {
            format_version: FORMAT_VERSION,
            model: model.clone(),
            library: library.display().to_string(),
            created_at: now_secs(),
            clipdex_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        // Before the store: an index whose store exists always names its engine.
        let engine = engine
            .cloned()
            .unwrap_or_default()
            .for_new_index(&paths.root);
        engine.write(&paths.root)?;
        let store = Store::create(&paths.db(), &meta, engine.shard().first_id())?;
        Self::assemble(paths, store, lock)
    }

    /// Opens an existing index (migrating an older format), and reconciles
    /// its vector and keyword indexes with the store.
    pub fn open(root: &Path) -> Result<Self> {
        let (paths, store, lock) = Self::open_store(root)?;
        Self::assemble(paths, store, lock)
    }

    /// What the index at `root` holds, read without loading its graph or
    /// reconciling: for `clipdex status`, which answers in a second where
    /// loading a million photos' graph takes ten. The vector count is the
    /// saved graph's; [`Self::open`] brings it to the store's.
    ///
    /// The store's part comes from the summary kept beside it where there
    /// is one (see [`store::Summary`]): opening the store takes most of a
    /// second at a million photos.
    pub fn overview(root: &Path) -> Result<Overview> {
        let (paths, _lock) = Self::lock_index(root)?;
        let summary = match Store::kept_summary(&paths.db()) {
            Some(summary) => summary,
            None => {
                let store = Store::open(&paths.db())?;
                let summary = store.summary()?;
                if let Err(e) = store.keep_summary(&summary) {
                    tracing::debug!(error = %e, "the store's summary was not written");
                }
                summary
            }
        };
        // A shared engine is read, not written (no fence, no report).
        let (vectors, shards) = match vector::engine::read_shared(
            &EngineConfig::read(&paths.root)?,
            Some((
                summary.meta.model.embedding_dim,
                &summary.meta.model.fingerprint,
            )),
        )? {
            Some((count, shards)) => (count, shards),
            None => (VectorIndex::saved_len(&paths.vectors()), Vec::new()),
        };
        let keywords = KeywordIndex::open(&paths.keyword(), false)?.count();
        let mut overview = overview_from(paths, summary, vectors, keywords);
        overview.shards = shards;
        Ok(overview)
    }

    /// The same [`Overview`] of this open index, with its graph as loaded.
    pub fn summary(&self) -> Result<Overview> {
        let mut overview = overview_of(
            self.paths.clone(),
            &self.store,
            self.vectors.count()?,
            self.keywords.count(),
        )?;
        overview.shards = self.vectors.shards()?;
        Ok(overview)
    }

    /// What the index at `root` records about itself (its model and
    /// precision among it), read without opening its vector and keyword
    /// indexes: for choosing the model before opening it. Locks as
    /// [`Self::open`] does, for the moment of the read.
    pub fn read_meta(root: &Path) -> Result<IndexMeta> {
        let (_, store, _lock) = Self::open_store(root)?;
        Ok(store.meta()?)
    }

    /// The locked store of the index at `root`, after finishing a switch to
    /// another model that is ready (or was interrupted after its exchange);
    /// held by someone, that waits.
    fn open_store(root: &Path) -> Result<(IndexPaths, Store, File)> {
        let (paths, lock) = Self::lock_index(root)?;
        let store = Store::open(&paths.db())?;
        Ok((paths, store, lock))
    }

    /// The paths of the index at `root`, and its lock, taken after
    /// finishing a switch to another model as [`Self::open_store`] does.
    fn lock_index(root: &Path) -> Result<(IndexPaths, File)> {
        let paths = IndexPaths::new(root);
        match generation::settle(root) {
            Ok(generation::Settled::Nothing) | Err(Error::InUse { .. }) => {}
            Ok(done) => {
                tracing::info!(?done, "finished switching the index to its next generation")
            }
            Err(e) => return Err(e),
        }
        if !paths.exists() {
            return Err(Error::NotFound(root.display().to_string()));
        }
        let lock = lock(&paths)?;
        Ok((paths, lock))
    }

    fn assemble(paths: IndexPaths, store: Store, lock: File) -> Result<Self> {
        let meta = store.meta()?;
        let start = std::time::Instant::now();
        let engine = EngineConfig::read(&paths.root)?;
        let vectors = Vectors::open(
            &paths.vectors(),
            meta.model.embedding_dim,
            &engine,
            &meta.model.fingerprint,
        )?;
        let loaded = start.elapsed();
        let keywords = KeywordIndex::open(&paths.keyword(), true)?;
        let index = Self {
            paths,
            store,
            vectors,
            keywords,
            meta,
            _lock: lock,
        };
        index.set_holder_fields(None, None);
        let start = std::time::Instant::now();
        let repair = index.reconcile()?;
        tracing::debug!(graph = ?loaded, reconcile = ?start.elapsed(), "index opened");
        if !repair.is_empty() {
            tracing::info!(?repair, "index repaired after an interrupted run");
        }
        Ok(index)
    }

    /// Records who holds the index (shown to a second process that is refused).
    /// Says in the lock file what holds the index and where it answers, so
    /// that other commands can go through it.
    pub fn set_holder(&self, what: &str, url: Option<&str>) {
        self.set_holder_fields(Some(what), url);
    }

    fn set_holder_fields(&self, what: Option<&str>, url: Option<&str>) {
        let holder = Holder {
            pid: std::process::id(),
            what: what.map(Into::into),
            url: url.map(Into::into),
            library: Some(self.meta.library.clone()),
            model: Some(self.meta.model.id.clone()),
            fingerprint: Some(self.meta.model.fingerprint.clone()),
        };
        write_holder(&self._lock, &holder);
    }

    /// Refuses a model other than the one the index was built with.
    pub fn check_model(&self, model: &ModelInfo) -> Result<()> {
        let built = &self.meta.model;
        // The same weights at another precision: say so, and how to switch.
        let base = |f: &str| f.split('/').next().unwrap_or_default().to_string();
        if built.precision != model.precision
            && base(&built.fingerprint) == base(&model.fingerprint)
        {
            return Err(Error::PrecisionMismatch {
                path: self.paths.root.display().to_string(),
                model: built.id.clone(),
                index_precision: built.precision,
                asked_precision: model.precision,
            });
        }
        if built.fingerprint != model.fingerprint || built.embedding_dim != model.embedding_dim {
            return Err(Error::ModelMismatch {
                path: self.paths.root.display().to_string(),
                index_model: built.id.clone(),
                index_fingerprint: built.fingerprint.clone(),
                asked_model: model.id.clone(),
                asked_fingerprint: model.fingerprint.clone(),
            });
        }
        Ok(())
    }

    pub fn meta(&self) -> &IndexMeta {
        &self.meta
    }

    pub fn paths(&self) -> &IndexPaths {
        &self.paths
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn vectors(&self) -> &Vectors {
        &self.vectors
    }

    pub fn keywords(&self) -> &KeywordIndex {
        &self.keywords
    }

    pub fn library(&self) -> PathBuf {
        PathBuf::from(&self.meta.library)
    }

    /// Where the thumbnail of a photo is.
    pub fn thumbnail_path(&self, record: &PhotoRecord) -> PathBuf {
        crate::library::thumb::thumb_path(&self.paths.thumbs(), &record.hash)
    }

    /// Brings the vector and keyword indexes to exactly the store's ids.
    pub fn reconcile(&self) -> Result<Repair> {
        let ids = self.store.ids()?;
        let mut repair = Repair::default();
        if self.vectors.is_replica() {
            // A replica's records follow the engine (`replica::sync`).
            return self.reconcile_keywords(&ids, repair);
        }
        let vec_ids = self.vectors.ids()?;
        let extra: Vec<u64> = vec_ids.difference(&ids).copied().collect();
        repair.vectors_removed = extra.len();
        self.vectors.remove(extra)?;
        if self.vectors.dead_fraction() > REBUILD_DEAD_FRACTION {
            self.rebuild_vectors()?;
            repair.vectors_rebuilt = true;
        } else {
            let missing: Vec<u64> = ids.difference(&vec_ids).copied().collect();
            let mut items = Vec::with_capacity(missing.len());
            for id in missing {
                if let Some(v) = self.store.vector(id)? {
                    items.push((id, v));
                }
            }
            repair.vectors_added = items.len();
            self.vectors.put(items, &|id| self.fields(id))?;
        }
        if self.vectors.is_changed() {
            self.vectors.save()?;
        }
        self.reconcile_keywords(&ids, repair)
    }

    /// Brings the keyword index to exactly the store's `ids`.
    fn reconcile_keywords(&self, ids: &BTreeSet<u64>, mut repair: Repair) -> Result<Repair> {
        let kw_ids = self.keywords.ids()?;
        let extra: Vec<u64> = kw_ids.difference(ids).copied().collect();
        let missing: Vec<u64> = ids.difference(&kw_ids).copied().collect();
        repair.keywords_removed = extra.len();
        repair.keywords_added = missing.len();
        for id in extra {
            self.keywords.remove(id)?;
        }
        for id in missing {
            if let Some(record) = self.store.get(id)? {
                self.keywords.upsert(&keyword_doc(&record))?;
            }
        }
        if repair.keywords_added + repair.keywords_removed > 0 {
            self.keywords.commit()?;
        }
        Ok(repair)
    }

    /// What the vector engine keeps beside the vector of `id`, from its
    /// record (for an engine that filters itself, [`Vectors::wants_fields`]).
    /// The record goes with them, for search replicas (`replica.rs`).
    pub(crate) fn fields(&self, id: u64) -> Option<vector::milvus::Fields> {
        let record = self.store.get(id).ok()??;
        Some(vector::milvus::Fields {
            record: Some(serde_json::to_value(&record).expect("a record serialises")),
            written: now_millis(),
            ..engine_fields(&keyword_doc(&record))
        })
    }

    /// Rebuilds the HNSW graph from the store's vectors (an engine of its
    /// own compacts itself).
    pub fn rebuild_vectors(&self) -> Result<()> {
        if self.vectors.embedded().is_none() {
            return Ok(());
        }
        let vectors = self.store.vectors().collect::<store::Result<Vec<_>>>()?;
        self.vectors.rebuild(vectors)?;
        Ok(())
    }

    /// Compares the id sets of the store, the vector index and the keyword index.
    pub fn check(&self) -> Result<Consistency> {
        let ids = self.store.ids()?;
        let vec_ids = self.vectors.ids()?;
        let kw_ids = self.keywords.ids()?;
        let with_vectors: BTreeSet<u64> = self
            .store
            .vectors()
            .map(|r| r.map(|(id, _)| id))
            .collect::<store::Result<_>>()?;
        let diff =
            |a: &BTreeSet<u64>, b: &BTreeSet<u64>| a.difference(b).copied().collect::<Vec<_>>();
        let c = Consistency {
            records: ids.len(),
            vectors: vec_ids.len(),
            keywords: kw_ids.len(),
            missing_vectors: diff(&ids, &vec_ids),
            extra_vectors: diff(&vec_ids, &ids),
            missing_keywords: diff(&ids, &kw_ids),
            extra_keywords: diff(&kw_ids, &ids),
            records_without_embedding: diff(&ids, &with_vectors),
            consistent: false,
        };
        let consistent = c.missing_vectors.is_empty()
            && c.extra_vectors.is_empty()
            && c.missing_keywords.is_empty()
            && c.extra_keywords.is_empty()
            && c.records_without_embedding.is_empty()
            && with_vectors.len() == ids.len();
        Ok(Consistency { consistent, ..c })
    }
}
/// What an engine that filters by itself keeps of a photo: the values the
/// keyword index holds of it ([`keyword_doc`]).
pub(crate) fn engine_fields(doc: &keyword::Doc) -> vector::milvus::Fields {
    let path = crate::common::rel_path::display(doc.path);
    let folders = crate::common::rel_path::folders(&path)
        .into_iter()
        .map(str::to_string)
        .collect();
    vector::milvus::Fields {
        taken: doc.taken.and_then(keyword::parse_datetime),
        format: doc.format.to_string(),
        folders,
        camera: doc
            .camera
            .as_deref()
            .map(keyword::camera_terms)
            .unwrap_or_default(),
        tags: doc.tags.iter().map(|t| t.to_string()).collect(),
        ..Default::default()
    }
}

/// What the keyword index holds of a photo record.
pub(crate) fn keyword_doc(record: &PhotoRecord) -> keyword::Doc<'_> {
    keyword::Doc {
        id: record.id,
        path: &record.path,
        format: &record.format,
        caption: record.caption.as_deref(),
        camera: record.camera(),
        taken: record.taken.as_deref(),
        tags: record.tags.iter().map(|t| t.name.as_str()).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_fields_name_every_folder_above_the_photo() {
        let doc = keyword::Doc {
            id: 1,
            path: "a/b/c.jpg",
            format: "jpeg",
            caption: None,
            camera: Some("NIKON D3".into()),
            taken: Some("2019-07-01T10:00:00"),
            tags: vec!["beach"],
        };
        let f = engine_fields(&doc);
        assert_eq!(f.folders, ["a", "a/b"]);
        assert_eq!(f.camera, ["nikon", "d3"]);
        assert_eq!(f.tags, ["beach"]);
        assert_eq!(f.format, "jpeg");
        assert!(f.taken.is_some());
        let top = keyword::Doc {
            path: "c.jpg",
            ..doc
        };
        assert!(engine_fields(&top).folders.is_empty());
    }
}
