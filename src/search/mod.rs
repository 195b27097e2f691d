//! The one place that ranks. The CLI and the HTTP handlers build a `Query`,
//! call `Engine::search`, and only render the `SearchResults`.
//!
//! A query is a weighted sum of terms (texts, photos of the index, uploaded
//! pictures) embedded into CLIP's space, as rclip does: `v = sum(w_i e_i)`,
//! normalised, and photos rank by cosine similarity to `v`. Negative weights
//! push results away from a term.
//!
//! Hybrid ranking: the positive text terms also run as a keyword query over
//! file names, folders, captions and camera (tantivy, every word must match),
//! and the two rankings are fused by reciprocal rank fusion (Cormack et al.
//! 2009: `sum 1 / (60 + rank)`), so "IMG_2041" or a caption word finds its
//! photo even when the picture itself says little. Without keyword matches
//! the ranking is the cosine similarity itself.
//!
//! Filters (folder prefix, date taken, file type, camera) select photos
//! through the keyword index first; a selective filter then scans the
//! selected vectors exactly (faster than a filtered graph search, and always k
//! results), a broad one filters inside the HNSW search.

pub mod cutoff;
pub mod duplicates;
pub mod fields;
pub mod open;
pub mod query;
pub mod request;
pub mod tags;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use crate::model::Precision;
pub use cutoff::{Boundary, Cutoff};
pub use fields::Understood;
pub use open::{HubOptions, OpenError, OpenOptions, Step, Towers, open};
pub use query::{ParseError, Term, TermKind, TermSpec, parse};
pub use request::{DEFAULT_K, EXCLUDE_WEIGHT, Request, check_weight};

use crate::indexer::Index;
use crate::keyword::{self, parse_datetime};
use crate::library::{
    BudgetError, DecodeBudget, DecodeError, DecodeLimits, decode_bytes_scaled, probe,
};
use crate::model::{Calibration, Clip};
use crate::store::PhotoRecord;

/// Most results one page may ask for; `offset` pages on through any number.
pub const MAX_K: usize = 10_000;
/// Reciprocal rank fusion constant.
const RRF_K: f32 = 60.0;
const CACHE_SIZE: usize = 512;

/// Why a search failed: the first kinds are the client's to fix (the
/// server maps them to 4xx), the last ones are the system's (5xx).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadQuery(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    NotAnImage(String),
    /// The request needs more than the server ever allows (decode memory).
    #[error("{0}")]
    TooLarge(String),
    /// The file on disk is no longer what the index holds.
    #[error("{0}")]
    Changed(String),
    /// Not now: the server is at its limit; the same request may pass later.
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    #[error(transparent)]
    Vectors(#[from] crate::vector::Error),
    #[error(transparent)]
    Keywords(#[from] crate::keyword::Error),
    /// The index failed (boxed: its errors are large, and rare here).
    #[error(transparent)]
    Index(Box<crate::indexer::Error>),
    /// The model failed (shared: one failed batch answers several queries).
    #[error("the model failed: {0}")]
    Model(Arc<crate::model::Error>),
    #[error(transparent)]
    Pixels(#[from] crate::common::pixels::BadRgbBuffer),
    #[error("the text batcher stopped")]
    BatcherStopped,
}

impl Error {
    /// What the vector engine (a Milvus server) said when it could not
    /// answer: the search may pass when it is back (a 503, not a 500).
    pub fn engine_unavailable(&self) -> Option<String> {
        match self {
            Error::Vectors(crate::vector::Error::Engine { address, message }) => Some(format!(
                "the vector engine at {address} did not answer: {message}"
            )),
            _ => None,
        }
    }

    /// Whether the client can fix it (a 4xx), as opposed to a failure of the system.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Error::BadQuery(_)
                | Error::NotFound(_)
                | Error::NotAnImage(_)
                | Error::TooLarge(_)
                | Error::Changed(_)
                | Error::Busy(_)
        )
    }
}

impl From<crate::indexer::Error> for Error {
    fn from(e: crate::indexer::Error) -> Self {
        Error::Index(Box::new(e))
    }
}

impl From<crate::model::Error> for Error {
    fn from(e: crate::model::Error) -> Self {
        Error::Model(Arc::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<ParseError> for Error {
    fn from(e: ParseError) -> Self {
        Error::BadQuery(e.0)
    }
}

/// Which photos a search may return.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Filters {
    /// Folder (relative to the library) the photo is in, or below.
    #[serde(default)]
    pub folder: Option<String>,
    /// Taken on or after this date (`YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS`).
    #[serde(default)]
    pub from: Option<String>,
    /// Taken on or before this date (a date alone includes the whole day).
    #[serde(default)]
    pub to: Option<String>,
    /// File types, e.g. `["jpeg", "png"]`.
    #[serde(default, rename = "type")]
    pub types: Option<Vec<String>>,
    /// Words of the camera's make or model.
    #[serde(default)]
    pub camera: Option<String>,
    /// Automatic tags the photo must all have, e.g. `["beach", "dog"]`.
    #[serde(default, rename = "tag")]
    pub tags: Option<Vec<String>>,
}

/// Longest text of a filter (folder, camera, a type), in characters.
pub const MAX_FILTER_CHARS: usize = 1024;
/// Most file types one filter may list.
const MAX_TYPES: usize = 32;
/// Most tags one filter may list.
const MAX_TAG_FILTERS: usize = 32;

/// A filter date as seconds since the epoch; `end_of_day` moves a date
/// without a time to its last second.
pub(crate) fn filter_date(name: &str, s: &Option<String>, end_of_day: bool) -> Result<Option<i64>> {
    let Some(s) = s.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let secs = parse_datetime(s).ok_or_else(|| {
        let shown: String = s.chars().take(40).collect();
        Error::BadQuery(format!(
            "{name}: {shown:?} is not a date; use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SS between {} and {}",
            crate::keyword::MIN_YEAR,
            crate::keyword::MAX_YEAR
        ))
    })?;
    Ok(Some(if end_of_day && s.len() == 10 {
        secs + 86_399
    } else {
        secs
    }))
}

impl Filters {
    /// Checks every field: lengths, dates (real calendar dates in the
    /// supported range, `from` not after `to`). The one validation of
    /// filters, whichever front end built them.
    pub fn validate(&self) -> Result<()> {
        let long = |name: &str, s: &Option<String>| -> Result<()> {
            match s {
                Some(s) if s.chars().count() > MAX_FILTER_CHARS => Err(Error::BadQuery(format!(
                    "the {name} filter is longer than {MAX_FILTER_CHARS} characters"
                ))),
                _ => Ok(()),
            }
        };
        long("folder", &self.folder)?;
        long("camera", &self.camera)?;
        if let Some(types) = &self.types {
            if types.len() > MAX_TYPES || types.iter().any(|t| t.chars().count() > MAX_FILTER_CHARS)
            {
                return Err(Error::BadQuery(format!(
                    "the type filter lists too much (at most {MAX_TYPES} types)"
                )));
            }
        }
        // Entries as given, and names once commas split them.
        let tags = self.tag_names();
        if self.tags.as_ref().map_or(0, Vec::len).max(tags.len()) > MAX_TAG_FILTERS {
            return Err(Error::BadQuery(format!(
                "the tag filter lists too much (at most {MAX_TAG_FILTERS} tags)"
            )));
        }
        for tag in tags {
            if let Some(problem) = crate::indexer::tags::name_problem(&tag) {
                return Err(Error::BadQuery(format!("tag filter: {problem}")));
            }
        }
        if let (Some(from), Some(to)) = (
            filter_date("from", &self.from, false)?,
            filter_date("to", &self.to, true)?,
        ) {
            if from > to {
                return Err(Error::BadQuery("the from date is after the to date".into()));
            }
        }
        Ok(())
    }

    /// The file types asked for, lower case, with their aliases resolved
    /// (`jpg` is `jpeg`, `tif` is `tiff`).
    fn formats(&self) -> Vec<String> {
        self.types
            .iter()
            .flatten()
            .flat_map(|t| t.split(','))
            .map(|t| t.trim().to_lowercase())
            .filter(|t| !t.is_empty())
            .map(|t| match t.as_str() {
                "jpg" | "jpe" | "jfif" => "jpeg".to_string(),
                "tif" => "tiff".to_string(),
                _ => t,
            })
            .collect()
    }

    /// The tags asked for, normalised (`Beach, dog` is `beach` and `dog`).
    fn tag_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tags
            .iter()
            .flatten()
            .flat_map(|t| t.split(','))
            .map(crate::indexer::tags::normalize)
            .filter(|t| !t.is_empty())
            .collect();
        names.dedup();
        names
    }

    pub fn is_empty(&self) -> bool {
        let blank = |s: &Option<String>| s.as_deref().is_none_or(|s| s.trim().is_empty());
        blank(&self.folder)
            && blank(&self.from)
            && blank(&self.to)
            && blank(&self.camera)
            && self.tag_names().is_empty()
            && self
                .types
                .as_ref()
                .is_none_or(|t| t.iter().all(|t| t.trim().is_empty()))
    }
}

/// The order of results.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Sort {
    /// Best match first.
    #[default]
    Relevance,
    /// The most relevant results, newest first (undated ones last).
    Newest,
    /// The most relevant results, oldest first (undated ones last).
    Oldest,
}

impl std::str::FromStr for Sort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "relevance" => Ok(Sort::Relevance),
            "newest" => Ok(Sort::Newest),
            "oldest" => Ok(Sort::Oldest),
            other => Err(format!("sort {other:?}: use relevance, newest or oldest")),
        }
    }
}

/// How many of the most relevant results a date order takes (all those
/// above `min_score` when one is given, up to [`MAX_K`]).
pub const DATE_ORDER_POOL: usize = 1000;

/// A search.
#[derive(Clone, Debug)]
pub struct Query {
    pub terms: Vec<Term>,
    pub filters: Filters,
    pub k: usize,
    pub offset: usize,
    /// Drop hits below this score (keyword matches are kept): cosine
    /// similarity for CLIP models, match probability (0 to 1) for SigLIP.
    pub min_score: Option<f32>,
    /// Fuse keyword matches of the text terms (default true).
    pub hybrid: bool,
    /// Ids never to return (the photo a find-similar started from).
    pub exclude: Vec<u64>,
    pub sort: Sort,
    /// The filters the query box's text held (`after:2019`, "July 2023"),
    /// already in `filters`; shown back to the user.
    pub understood: Vec<Understood>,
    /// Where relevant results end (each hit says which side it is on).
    pub cutoff: Cutoff,
}

impl Query {
    pub fn new(terms: Vec<Term>) -> Self {
        Self {
            terms,
            filters: Filters::default(),
            k: DEFAULT_K,
            offset: 0,
            min_score: None,
            hybrid: true,
            exclude: Vec::new(),
            sort: Sort::Relevance,
            understood: Vec::new(),
            cutoff: Cutoff::Auto,
        }
    }

    /// Checks every parameter; `Engine::search` calls it, so each front end
    /// (HTTP routes, CLI) gets the same answer for the same mistake.
    pub fn validate(&self) -> Result<()> {
        // Filters alone are a query: the photos they select, by date.
        if self.terms.is_empty() && self.filters.is_empty() {
            return Err(Error::BadQuery("the query is empty".into()));
        }
        if self.terms.len() > query::MAX_TERMS + 1 {
            return Err(Error::BadQuery(format!(
                "too many terms (at most {})",
                query::MAX_TERMS
            )));
        }
        for term in &self.terms {
            query::check_weight(term.weight)?;
            if let TermKind::Vector(v) = &term.kind {
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(Error::BadQuery(
                        "an embedding holds a value that is not a number".into(),
                    ));
                }
            }
        }
        if self.k == 0 || self.k > MAX_K {
            return Err(Error::BadQuery(format!("k must be between 1 and {MAX_K}")));
        }
        self.cutoff.checked().map_err(Error::BadQuery)?;
        if self
            .min_score
            .is_some_and(|s| !s.is_finite() || !(-1.0..=1.0).contains(&s))
        {
            return Err(Error::BadQuery(
                "min_score must be a number from -1 to 1".into(),
            ));
        }
        self.filters.validate()
    }
}

/// One result.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Hit {
    pub id: u64,
    /// Path relative to the library.
    pub path: String,
    /// The ranking score: cosine similarity, or the fused score when keyword matches took part.
    pub score: f32,
    /// Cosine similarity between the photo and the query.
    pub similarity: f32,
    /// SigLIP models: `sigmoid(exp(t) * similarity + b)`, the model's
    /// probability that the photo matches the query (calibrated for text
    /// queries). Absent for CLIP models.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probability: Option<f32>,
    /// Rank among keyword matches (1 = best), when the photo matched the words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keyword_rank: Option<usize>,
    /// Whether the photo is above the query's relevance boundary (see
    /// `boundary` of the results); photos below it are less relevant.
    pub relevant: bool,
    pub width: u32,
    pub height: u32,
    /// Date taken, `YYYY-MM-DDTHH:MM:SS`.
    pub taken: Option<String>,
    pub format: String,
    pub camera: Option<String>,
    pub caption: Option<String>,
    /// URL of the thumbnail.
    pub thumbnail: String,
    /// Automatic tags, most probable first.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

/// A page of results.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SearchResults {
    pub hits: Vec<Hit>,
    pub offset: usize,
    pub k: usize,
    /// Whether more results follow this page.
    pub more: bool,
    /// Milliseconds spent, embedding included.
    pub took_ms: f64,
    pub sort: Sort,
    /// The filters read from the query's text (`after:2019`, "July 2023").
    pub understood: Vec<Understood>,
    /// How the relevance boundary was drawn.
    pub boundary: Boundary,
}

/// The metadata of one photo, as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Photo {
    pub id: u64,
    pub path: String,
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub size: u64,
    /// Modification time, seconds since the Unix epoch.
    pub modified: i64,
    pub taken: Option<String>,
    pub camera_make: Option<String>,
    pub camera_model: Option<String>,
    pub orientation: u8,
    pub caption: Option<String>,
    /// Where the caption came from: `sidecar`, `xmp` or `exif`.
    pub caption_source: Option<String>,
    pub hash: String,
    pub thumbnail: String,
    pub original: String,
    /// Automatic tags, most probable first.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

/// An automatic tag of a photo.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Tag {
    pub name: String,
    /// Zero-shot probability among the vocabulary, 0 to 1.
    pub probability: f32,
}

impl Tag {
    fn of(r: &PhotoRecord) -> Vec<Tag> {
        r.tags
            .iter()
            .map(|t| Tag {
                name: t.name.clone(),
                probability: t.p,
            })
            .collect()
    }
}

impl Photo {
    pub fn from_record(r: &PhotoRecord) -> Self {
        Self {
            id: r.id,
            path: crate::common::rel_path::display(&r.path).into_owned(),
            width: r.width,
            height: r.height,
            format: r.format.clone(),
            size: r.sig.size,
            modified: r.sig.mtime_ns / 1_000_000_000,
            taken: r.taken.clone(),
            camera_make: r.camera_make.clone(),
            camera_model: r.camera_model.clone(),
            orientation: r.orientation,
            caption: r.caption.clone(),
            caption_source: r.caption_source.map(|s| {
                match s {
                    crate::store::CaptionSource::Sidecar => "sidecar",
                    crate::store::CaptionSource::Xmp => "xmp",
                    crate::store::CaptionSource::Exif => "exif",
                }
                .to_string()
            }),
            hash: r.hash.to_string(),
            thumbnail: format!("/api/photos/{}/thumbnail", r.id),
            original: format!("/api/photos/{}/original", r.id),
            tags: Tag::of(r),
        }
    }
}

/// A small least-recently-used cache of text embeddings.
#[derive(Default)]
struct Cache {
    map: HashMap<String, Arc<Vec<f32>>>,
    order: VecDeque<String>,
}

impl Cache {
    fn get(&mut self, key: &str) -> Option<Arc<Vec<f32>>> {
        let v = self.map.get(key)?.clone();
        if let Some(pos) = self.order.iter().position(|k| k == key) {
            let k = self.order.remove(pos).expect("position is valid");
            self.order.push_back(k);
        }
        Some(v)
    }

    fn put(&mut self, key: String, v: Arc<Vec<f32>>) {
        if self.map.insert(key.clone(), v).is_none() {
            self.order.push_back(key);
            if self.order.len() > CACHE_SIZE {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

/// Texts waiting for the model, answered together: one forward pass for
/// many concurrent queries reads the text tower's weights once instead of
/// once per query (the cost of a short query on a CPU).
struct TextBatcher {
    queue: Mutex<std::sync::mpsc::Sender<(String, std::sync::mpsc::Sender<Result<Vec<f32>>>)>>,
}

/// Most texts embedded in one forward pass.
const TEXT_BATCH: usize = 32;

impl TextBatcher {
    fn start(clip: Arc<Clip>) -> Self {
        let (tx, rx) =
            std::sync::mpsc::channel::<(String, std::sync::mpsc::Sender<Result<Vec<f32>>>)>();
        std::thread::Builder::new()
            .name("clipdex-text-batcher".into())
            .spawn(move || {
                // Ends when the engine (the last sender) is dropped.
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < TEXT_BATCH {
                        match rx.try_recv() {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    let texts: Vec<&str> = batch.iter().map(|(t, _)| t.as_str()).collect();
                    let started = Instant::now();
                    let embedded = clip.embed_texts(&texts);
                    tracing::debug!(
                        texts = texts.len(),
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "text batch embedded"
                    );
                    match embedded {
                        Ok(vectors) => {
                            for ((_, reply), v) in batch.into_iter().zip(vectors) {
                                let _ = reply.send(Ok(v));
                            }
                        }
                        Err(e) => {
                            let e = Arc::new(e);
                            for (_, reply) in batch {
                                let _ = reply.send(Err(Error::Model(e.clone())));
                            }
                        }
                    }
                }
            })
            .expect("spawn the text batcher");
        Self {
            queue: Mutex::new(tx),
        }
    }

    fn embed(&self, text: &str) -> Result<Vec<f32>> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((text.to_string(), reply))
            .map_err(|_| Error::BatcherStopped)?;
        answer.recv().map_err(|_| Error::BatcherStopped)?
    }
}

/// Searches one index with its model.
pub struct Engine {
    index: Arc<Index>,
    clip: Arc<Clip>,
    /// SigLIP's cosine-to-probability map; none for CLIP.
    calibration: Option<Calibration>,
    cache: Mutex<Cache>,
    texts: TextBatcher,
    limits: DecodeLimits,
    /// Decode memory shared by concurrent uploads.
    budget: DecodeBudget,
    /// The contrast prompts' mean embedding, made at the first text query
    /// with an automatic cutoff, and their level on the library.
    contrast: Mutex<Option<cutoff::Contrast>>,
    /// The duplicate groups last computed.
    duplicate_cache: Mutex<Option<duplicates::GroupCache>>,
    /// The tag list last computed.
    tag_cache: Mutex<Option<tags::TagCache>>,
}

/// Decode memory uploads may hold at once, by default.
pub const DEFAULT_DECODE_BUDGET: u64 = 1 << 30;

/// Decodes at least this large give their memory back to the system when done.
const RELEASE_AFTER: u64 = 64 << 20;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Engine {
    pub fn new(index: Arc<Index>, clip: Arc<Clip>) -> crate::indexer::Result<Self> {
        index.check_model(clip.info())?;
        let texts = TextBatcher::start(clip.clone());
        let calibration = clip.calibration()?;
        Ok(Self {
            index,
            clip,
            calibration,
            cache: Mutex::new(Cache::default()),
            texts,
            limits: DecodeLimits::default(),
            budget: DecodeBudget::new(DEFAULT_DECODE_BUDGET),
            contrast: Mutex::new(None),
            duplicate_cache: Mutex::new(None),
            tag_cache: Mutex::new(None),
        })
    }

    /// Sets what one uploaded picture may be and the decode memory all
    /// uploads in flight may hold together.
    pub fn with_upload_limits(mut self, limits: DecodeLimits, budget_bytes: u64) -> Self {
        self.limits = limits;
        self.budget = DecodeBudget::new(budget_bytes);
        self
    }

    /// Decode memory uploads hold now, bytes.
    pub fn decode_memory_in_use(&self) -> u64 {
        self.budget.in_use()
    }

    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    pub fn clip(&self) -> &Arc<Clip> {
        &self.clip
    }

    /// The model the engine embeds queries with.
    pub fn model_info(&self) -> &crate::common::ModelInfo {
        self.clip.info()
    }

    /// The record of a photo.
    pub fn record(&self, id: u64) -> Result<PhotoRecord> {
        self.index
            .store()
            .get(id)?
            .ok_or_else(|| Error::NotFound(format!("no photo {id}")))
    }

    /// The JPEG thumbnail of photo `id`. One that is missing (a search
    /// replica makes none while indexing; a deleted thumbnail) is made from
    /// the original, when it is still the file indexed, and kept.
    pub fn thumbnail(&self, id: u64) -> Result<Vec<u8>> {
        use crate::library::thumb::{THUMB_SIZE, encode_thumbnail, write_thumbnail};
        let record = self.record(id)?;
        if let Ok(bytes) = std::fs::read(self.index.thumbnail_path(&record)) {
            return Ok(bytes);
        }
        let (original, _) = self.original(id)?;
        let none = || Error::NotFound(format!("no thumbnail for photo {id}"));
        let image = decode_bytes_scaled(&original, &self.limits, Some(2 * THUMB_SIZE))
            .map_err(|_| none())?;
        let jpeg = encode_thumbnail(image.view()).map_err(|_| none())?;
        if let Err(e) = write_thumbnail(&self.index.paths().thumbs(), &record.hash, &jpeg) {
            tracing::warn!(id, error = %e, "the thumbnail made again was not kept");
        }
        Ok(jpeg)
    }

    pub fn photo(&self, id: u64) -> Result<Photo> {
        Ok(Photo::from_record(&self.record(id)?))
    }

    /// The original file of a photo, as it was indexed, with its MIME type.
    ///
    /// What is at the stored path now is checked first: its real path (links
    /// resolved), a regular file, and the size and time the index recorded;
    /// a file that differs, or one outside the library (a link swapped in
    /// after indexing), is served only if its content hashes to the indexed
    /// content. The bytes come from the handle that was checked.
    pub fn original(&self, id: u64) -> Result<(Vec<u8>, &'static str)> {
        use std::io::Read;
        let record = self.record(id)?;
        let gone = || Error::NotFound(format!("the file of photo {id} is gone; re-index"));
        let library = self.index.library();
        let root = std::fs::canonicalize(&library).map_err(|_| gone())?;
        let real =
            std::fs::canonicalize(library.join(crate::common::rel_path::to_path(&record.path)))
                .map_err(|_| gone())?;
        let (file, meta) = crate::library::open_regular(&real).map_err(|_| gone())?;
        let as_indexed = crate::library::scan::file_sig(&meta) == record.sig;
        // Another size is other content: refused unread.
        if meta.len() != record.sig.size {
            return Err(Error::Changed(format!(
                "the file of photo {id} changed since it was indexed; re-index"
            )));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(meta.len())
            .read_to_end(&mut bytes)
            .map_err(|_| gone())?;
        if !(as_indexed && real.starts_with(&root))
            && crate::store::ContentHash::of(&bytes) != record.hash
        {
            tracing::warn!(id, "refusing to serve a file that is not the one indexed");
            return Err(Error::Changed(format!(
                "the file of photo {id} changed since it was indexed; re-index"
            )));
        }
        Ok((bytes, crate::library::mime_type(&record.format)))
    }

    /// The embedding of a text, cached.
    pub fn embed_text(&self, text: &str) -> Result<Arc<Vec<f32>>> {
        let key = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        if let Some(v) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(v);
        }
        let v = Arc::new(self.texts.embed(text)?);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(key, v.clone());
        Ok(v)
    }

    /// The embedding of an uploaded picture.
    ///
    /// The header is read first: the limits are checked and the decode's
    /// memory is taken from the shared budget before any pixel is decoded,
    /// so concurrent large uploads wait their turn (`Busy`) instead of
    /// exhausting memory.
    pub fn embed_image(&self, bytes: &[u8]) -> Result<Vec<f32>> {
        let min_side = 2 * self.clip.preprocessor().image_size() as u32;
        let unusable = |e: DecodeError| match e {
            DecodeError::Empty | DecodeError::UnknownFormat => {
                Error::NotAnImage(format!("not an image: {e}"))
            }
            DecodeError::Unsupported(_) => Error::NotAnImage(e.to_string()),
            other => Error::BadQuery(format!("cannot use this image: {other}")),
        };
        let header = probe(bytes, &self.limits, Some(min_side)).map_err(unusable)?;
        let permit = self.budget.try_acquire(header.cost_bytes).map_err(|e| match e {
            BudgetError::Exceeds { needed, total } => Error::TooLarge(format!(
                "decoding this {}x{} image takes {} MB, more than the {} MB this server allows; send a smaller picture",
                header.width,
                header.height,
                needed.div_ceil(1 << 20),
                total >> 20
            )),
            BudgetError::Busy => Error::Busy("the server is decoding other large pictures; try again in a moment".into()),
        })?;
        // A large decode's memory goes back to the system as it is freed.
        let release =
            (header.cost_bytes >= RELEASE_AFTER).then(crate::library::memory::ReleaseWindow::open);
        let result = decode_bytes_scaled(bytes, &self.limits, Some(min_side))
            .map_err(unusable)
            .and_then(|image| Ok(self.clip.embed_images(&[image.view()])?.remove(0)));
        drop(release);
        drop(permit);
        result
    }

    fn term_vector(&self, term: &Term) -> Result<Arc<Vec<f32>>> {
        match &term.kind {
            TermKind::Text(t) => self.embed_text(t),
            TermKind::Vector(v) => Ok(Arc::new(v.clone())),
            TermKind::Photo(id) => self.photo_vector(*id).map(Arc::new),
            TermKind::PhotoPath(path) => {
                let id = self
                    .index
                    .store()
                    .id_for_path(path)?
                    .ok_or_else(|| Error::NotFound(format!("no photo at {path}")))?;
                self.photo_vector(id).map(Arc::new)
            }
        }
    }

    fn photo_vector(&self, id: u64) -> Result<Vec<f32>> {
        self.stored_vector(id)?
            .ok_or_else(|| Error::NotFound(format!("no photo {id}")))
    }

    /// The vector of photo `id`: the store's, or (a replica keeps none)
    /// the engine's.
    fn stored_vector(&self, id: u64) -> Result<Option<Vec<f32>>> {
        match self.index.store().vector(id)? {
            Some(v) => Ok(Some(v)),
            None if self.index.vectors().is_replica() => Ok(self.index.vectors().vector(id)?),
            None => Ok(None),
        }
    }

    /// The ids the filters allow, or `None` when there are no filters.
    fn allowed(&self, filters: &Filters) -> Result<Option<HashSet<u64>>> {
        if filters.is_empty() {
            return Ok(None);
        }
        let filter = self.keyword_filter(filters)?;
        Ok(Some(self.index.keywords().matching(&filter)?))
    }

    fn keyword_filter(&self, filters: &Filters) -> Result<keyword::Filter> {
        Ok(keyword::Filter {
            folder: filters.folder.clone(),
            from: filter_date("from", &filters.from, false)?,
            to: filter_date("to", &filters.to, true)?,
            formats: filters.formats(),
            camera: filters.camera.clone(),
            tags: filters.tag_names(),
        })
    }

    /// Ranked keyword matches of `text` among `allowed`, best first.
    fn keyword_hits(
        &self,
        text: &str,
        allowed: Option<&HashSet<u64>>,
        n: usize,
    ) -> Result<Vec<u64>> {
        Ok(self.index.keywords().search_words(text, allowed, n)?)
    }

    /// Runs a query.
    pub fn search(&self, q: &Query) -> Result<SearchResults> {
        let start = Instant::now();
        q.validate()?;
        // Both rankings are cut at a depth that does not depend on the page
        // (it grows in steps of 256, one more than the page tells whether a
        // next one exists): fusion then ranks the same way for every page,
        // and pages neither overlap nor skip. A page past the last photo is
        // empty.
        let depth = q
            .offset
            .saturating_add(q.k)
            .saturating_add(1)
            .div_ceil(256)
            .saturating_mul(256);
        let ranking = self.rank(q, depth)?;
        let (judge, boundary) = self.judge(q, &ranking)?;
        let mut hits = Vec::with_capacity(q.k);
        let mut more = false;
        self.each_hit(&ranking, &judge, q.offset, |hit| {
            if hits.len() == q.k {
                more = true;
                return false;
            }
            hits.push(hit);
            true
        })?;
        Ok(SearchResults {
            hits,
            offset: q.offset,
            k: q.k,
            more,
            took_ms: start.elapsed().as_secs_f64() * 1e3,
            // Filters alone list their photos newest first.
            sort: match (q.terms.is_empty(), q.sort) {
                (true, Sort::Relevance) => Sort::Newest,
                (_, sort) => sort,
            },
            understood: q.understood.clone(),
            boundary,
        })
    }

    /// Runs a query for every result, not a page: hands each hit to `each`,
    /// best first, until it returns false. Ranks once, so a million photos
    /// stream without the cost of paging (`clipdex search --all`). `q.k`
    /// and `q.offset` are ignored. Returns how many hits were handed over.
    pub fn search_all(&self, q: &Query, mut each: impl FnMut(Hit) -> bool) -> Result<usize> {
        let mut q = q.clone();
        q.k = 1;
        q.offset = 0;
        q.validate()?;
        let ranking = self.rank(&q, usize::MAX)?;
        let (judge, _) = self.judge(&q, &ranking)?;
        let mut handed = 0;
        self.each_hit(&ranking, &judge, 0, |hit| {
            handed += 1;
            each(hit)
        })?;
        Ok(handed)
    }

    /// The query's results down to `depth` (at most every photo), fused
    /// from the two rankings. A replica's come from its copy of the
    /// records too (keywords, browsing), which may be seconds behind the
    /// engine: only the photos the engine holds now are kept.
    fn rank(&self, q: &Query, depth: usize) -> Result<Ranking> {
        let mut ranking = self.rank_all(q, depth)?;
        if self.index.vectors().is_replica() && !ranking.fused.is_empty() {
            let ids: Vec<u64> = ranking.fused.iter().map(|&(id, _)| id).collect();
            let live = self.index.vectors().live(&ids)?;
            ranking.fused.retain(|(id, _)| live.contains(id));
        }
        Ok(ranking)
    }

    fn rank_all(&self, q: &Query, depth: usize) -> Result<Ranking> {
        if q.terms.is_empty() {
            return self.browse(q);
        }
        if q.sort != Sort::Relevance {
            // A date order takes the most relevant results, whatever the page.
            let pool = match q.min_score {
                Some(_) => MAX_K,
                None => DATE_ORDER_POOL,
            };
            let mut ranking = self.rank_by_relevance(q, pool)?;
            ranking.fused.truncate(pool);
            let dates = ranking
                .fused
                .iter()
                .map(|&(id, _)| {
                    let record = self.index.store().get(id)?;
                    Ok(record.and_then(|r| r.taken.as_deref().and_then(parse_datetime)))
                })
                .collect::<Result<Vec<Option<i64>>>>()?;
            let mut order: Vec<((u64, f32), Option<i64>)> =
                ranking.fused.into_iter().zip(dates).collect();
            sort_by_date(&mut order, q.sort, |&(_, taken)| taken);
            ranking.fused = order.into_iter().map(|(hit, _)| hit).collect();
            return Ok(ranking);
        }
        self.rank_by_relevance(q, depth)
    }

    /// The photos the filters select, by date (filters without terms).
    fn browse(&self, q: &Query) -> Result<Ranking> {
        let filter = self.keyword_filter(&q.filters)?;
        let excluded: HashSet<u64> = q.exclude.iter().copied().collect();
        let mut dated: Vec<(u64, Option<i64>)> = self.index.keywords().matching_dated(&filter)?;
        dated.retain(|(id, _)| !excluded.contains(id));
        // Newest first unless asked otherwise; ties (a burst) by id.
        let sort = match q.sort {
            Sort::Relevance => Sort::Newest,
            other => other,
        };
        dated.sort_by_key(|&(id, _)| id);
        sort_by_date(&mut dated, sort, |&(_, taken)| taken);
        Ok(Ranking {
            query: Vec::new(),
            fused: dated.into_iter().map(|(id, _)| (id, 0.0)).collect(),
            by_meaning: Vec::new(),
            by_words: Vec::new(),
        })
    }

    fn rank_by_relevance(&self, q: &Query, depth: usize) -> Result<Ranking> {
        let query = self.combine(&q.terms)?;
        let allowed = self.allowed(&q.filters)?;
        let excluded: HashSet<u64> = q.exclude.iter().copied().collect();
        let depth = depth.min(self.index.vectors().count()?.saturating_add(1));
        let filter = match q.filters.is_empty() {
            true => None,
            false => Some(selection(&self.keyword_filter(&q.filters)?)),
        };
        let by_meaning = self.rank_by_meaning(
            &query,
            allowed.as_ref(),
            filter.as_ref(),
            &excluded,
            depth.saturating_add(excluded.len()),
        )?;
        let by_words = self.rank_by_words(q, allowed.as_ref(), &excluded, depth)?;
        // A SigLIP model's cutoff is a probability: the cosine it corresponds to.
        let min_cosine = match (q.min_score, self.calibration) {
            (Some(p), Some(c)) => Some(c.cosine_at(p)),
            (min, None) => min,
            (None, _) => None,
        };
        let fused = fuse(&by_meaning, &by_words, min_cosine);
        Ok(Ranking {
            query,
            fused,
            by_meaning,
            by_words,
        })
    }

    /// The terms as one unit vector: the weighted sum of their embeddings.
    fn combine(&self, terms: &[Term]) -> Result<Vec<f32>> {
        let dim = self.clip.info().embedding_dim;
        let mut combined = vec![0f32; dim];
        for term in terms {
            let v = self.term_vector(term)?;
            if v.len() != dim {
                return Err(Error::BadQuery(format!(
                    "a term has {} dimensions, the index {dim}",
                    v.len()
                )));
            }
            for (c, x) in combined.iter_mut().zip(v.iter()) {
                *c += term.weight * x;
            }
        }
        let norm = combined.iter().map(|x| x * x).sum::<f32>().sqrt();
        if !terms.iter().any(|t| t.weight > 0.0) || norm < 1e-6 {
            return Err(Error::BadQuery(
                "a query needs at least one term with a positive weight".into(),
            ));
        }
        combined.iter_mut().for_each(|x| *x /= norm);
        Ok(combined)
    }

    /// The `n` photos closest to `query` among the allowed, by cosine
    /// similarity: the vector index scans the allowed vectors or walks the
    /// graph with the filter, whichever it expects to be faster.
    fn rank_by_meaning(
        &self,
        query: &[f32],
        allowed: Option<&HashSet<u64>>,
        filter: Option<&crate::vector::milvus::Selection>,
        excluded: &HashSet<u64>,
        n: usize,
    ) -> Result<Vec<(u64, f32)>> {
        Ok(self
            .index
            .vectors()
            .search_among(query, n, allowed, filter, excluded)?)
    }

    /// Keyword matches of the positive text terms, best first (none when
    /// the query is not hybrid or has no text).
    fn rank_by_words(
        &self,
        q: &Query,
        allowed: Option<&HashSet<u64>>,
        excluded: &HashSet<u64>,
        n: usize,
    ) -> Result<Vec<u64>> {
        let text: Vec<&str> = q
            .terms
            .iter()
            .filter(|t| t.weight > 0.0)
            .filter_map(|t| match &t.kind {
                TermKind::Text(s) => Some(s.as_str()),
                _ => None,
            })
            .collect();
        if !q.hybrid || text.is_empty() {
            return Ok(Vec::new());
        }
        let mut hits = self.keyword_hits(&text.join(" "), allowed, n)?;
        hits.retain(|id| !excluded.contains(id));
        Ok(hits)
    }

    /// The ranked photos as hits, in order, to `each` until it returns
    /// false, after the first `skip` (counted, not read: a deep page of a
    /// folder's 50,000 photos read every record before it). A photo removed
    /// since the rankings were made is skipped, so results during a
    /// re-index stay consistent.
    fn each_hit(
        &self,
        ranking: &Ranking,
        judge: &cutoff::Judge,
        skip: usize,
        mut each: impl FnMut(Hit) -> bool,
    ) -> Result<()> {
        let mut skipped = 0;
        let mut rest = ranking.fused.as_slice();
        while skipped < skip {
            let Some((&(id, _), after)) = rest.split_first() else {
                return Ok(());
            };
            if self.index.store().contains(id)? {
                skipped += 1;
            }
            rest = after;
        }
        let similarity: HashMap<u64, f32> = ranking.by_meaning.iter().copied().collect();
        let keyword_rank: HashMap<u64, usize> = ranking
            .by_words
            .iter()
            .enumerate()
            .map(|(r, &id)| (id, r + 1))
            .collect();
        for &(id, score) in rest {
            let Some(record) = self.index.store().get(id)? else {
                continue;
            };
            let similarity = match similarity.get(&id) {
                Some(s) => *s,
                // Browsing by filters alone: no query to compare with.
                None if ranking.query.is_empty() => 0.0,
                None => match self.stored_vector(id)? {
                    Some(v) => dot(&ranking.query, &v),
                    None => continue,
                },
            };
            let keyword_rank = keyword_rank.get(&id).copied();
            let relevant =
                keyword_rank.is_some() || ranking.query.is_empty() || judge.relevant(similarity);
            let hit = Hit {
                id,
                path: crate::common::rel_path::display(&record.path).into_owned(),
                score,
                similarity,
                probability: self.calibration.map(|c| c.probability(similarity)),
                keyword_rank,
                relevant,
                width: record.width,
                height: record.height,
                taken: record.taken.clone(),
                format: record.format.clone(),
                camera: record.camera(),
                caption: record.caption.clone(),
                thumbnail: format!("/api/photos/{id}/thumbnail"),
                tags: Tag::of(&record),
            };
            if !each(hit) {
                break;
            }
        }
        Ok(())
    }

    /// The relevance boundary of a ranked query (see [`cutoff`]).
    fn judge(&self, q: &Query, ranking: &Ranking) -> Result<(cutoff::Judge, Boundary)> {
        let mut boundary = Boundary {
            cutoff: q.cutoff,
            threshold: None,
            split: None,
            contrast: None,
        };
        let mut judge = cutoff::Judge::default();
        // Filters alone: every photo they list is what was asked for.
        if ranking.query.is_empty() {
            return Ok((judge, boundary));
        }
        match q.cutoff {
            Cutoff::None => {}
            Cutoff::Score(score) => {
                judge.threshold = Some(match self.calibration {
                    Some(_) if !(0.0..=1.0).contains(&score) => {
                        return Err(Error::BadQuery(
                            "a SigLIP model's cutoff is a probability from 0 to 1".into(),
                        ));
                    }
                    Some(c) => c.cosine_at(score),
                    None => score,
                });
            }
            Cutoff::Auto => {
                let vectors = self.index.vectors();
                let sample =
                    vectors.sample_similarities(&ranking.query, cutoff::BACKGROUND_SAMPLE)?;
                let top = ranking.by_meaning.iter().take(cutoff::TOP_POOL);
                let mut seen = rustc_hash::FxHashSet::default();
                seen.reserve(sample.len() + cutoff::TOP_POOL);
                let mut scores = Vec::with_capacity(sample.len() + cutoff::TOP_POOL);
                for (id, score) in sample.into_iter().chain(top.copied()) {
                    if seen.insert(id) {
                        scores.push(score);
                    }
                }
                boundary.split = cutoff::split(&mut scores);
                let text_only = q.terms.iter().all(|t| matches!(t.kind, TermKind::Text(_)));
                if text_only {
                    boundary.contrast = self.contrast_floor()?;
                }
                judge.threshold = match (boundary.split, boundary.contrast) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                judge.probable = self.calibration.map(|c| c.cosine_at(0.5));
            }
        }
        boundary.threshold = judge.threshold;
        Ok((judge, boundary))
    }

    /// The contrast prompts' mean similarity to the library sample: the
    /// least a text query's boundary may be. The prompts are embedded once;
    /// the level is measured again only when the photos change.
    fn contrast_floor(&self) -> Result<Option<f32>> {
        let mut slot = self.contrast.lock().unwrap_or_else(|p| p.into_inner());
        let version = self.index.store().version();
        if let Some(c) = slot.as_ref().filter(|c| c.version == version) {
            return Ok(c.floor);
        }
        let mean = match slot.take() {
            Some(c) => c.mean,
            None => {
                let prompts = self.clip.embed_texts(cutoff::CONTRAST_PROMPTS)?;
                let mut mean = vec![0f32; self.clip.info().embedding_dim];
                for v in prompts.iter().map(|v| crate::vector::unit(v)) {
                    for (m, x) in mean.iter_mut().zip(v) {
                        *m += x / prompts.len() as f32;
                    }
                }
                mean
            }
        };
        // The prompts' mean similarity to a photo is the mean prompt's.
        let norm = dot(&mean, &mean).sqrt();
        let sample = self
            .index
            .vectors()
            .sample_similarities(&mean, cutoff::BACKGROUND_SAMPLE)?;
        let floor = (!sample.is_empty() && norm > 0.0)
            .then(|| norm * sample.iter().map(|&(_, s)| s).sum::<f32>() / sample.len() as f32);
        *slot = Some(cutoff::Contrast {
            mean,
            version,
            floor,
        });
        Ok(floor)
    }

    /// Photos like a stored one (itself excluded).
    pub fn similar(&self, id: u64, request: Request) -> Result<SearchResults> {
        self.record(id)?;
        let mut q = request.into_query_with(vec![Term {
            kind: TermKind::Photo(id),
            weight: 1.0,
        }])?;
        q.exclude = vec![id];
        self.search(&q)
    }
}

/// A query's results: its vector, the fused ranking and the two it came from.
struct Ranking {
    query: Vec<f32>,
    fused: Vec<(u64, f32)>,
    by_meaning: Vec<(u64, f32)>,
    by_words: Vec<u64>,
}

/// Orders `items` by date, newest or oldest first, undated ones last; a
/// stable sort, so equal dates keep the order they had.
fn sort_by_date<T>(items: &mut [T], sort: Sort, date: impl Fn(&T) -> Option<i64>) {
    items.sort_by(|a, b| match (date(a), date(b)) {
        (Some(x), Some(y)) if sort == Sort::Oldest => x.cmp(&y),
        (Some(x), Some(y)) => y.cmp(&x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
}

/// Reciprocal rank fusion of the meaning and keyword rankings (Cormack et
/// al. 2009: `sum 1 / (60 + rank)`); without keyword matches, the meaning
/// ranking and its cosine similarities as they are. `min_score` drops
/// photos below that similarity, unless their words matched.
fn fuse(by_meaning: &[(u64, f32)], by_words: &[u64], min_score: Option<f32>) -> Vec<(u64, f32)> {
    let mut ranked: Vec<(u64, f32)> = if by_words.is_empty() {
        by_meaning.to_vec()
    } else {
        let mut fused: HashMap<u64, f32> = HashMap::new();
        let ids = by_meaning.iter().map(|(id, _)| *id);
        for ranking in [ids.collect::<Vec<_>>(), by_words.to_vec()] {
            for (rank, id) in ranking.into_iter().enumerate() {
                *fused.entry(id).or_default() += 1.0 / (RRF_K + rank as f32 + 1.0);
            }
        }
        let mut v: Vec<(u64, f32)> = fused.into_iter().collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    };
    if let Some(min) = min_score {
        let similarity: HashMap<u64, f32> = by_meaning.iter().copied().collect();
        ranked.retain(|(id, _)| {
            by_words.contains(id) || similarity.get(id).is_some_and(|s| *s >= min)
        });
    }
    ranked
}

/// The keyword index's filter in the terms of a vector engine that filters
/// by itself (Milvus): the same photos selected.
fn selection(f: &keyword::Filter) -> crate::vector::milvus::Selection {
    crate::vector::milvus::Selection {
        folder: f.folder.clone(),
        from: f.from,
        to: f.to,
        formats: f.formats.clone(),
        camera: f
            .camera
            .as_deref()
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(keyword::camera_filter_terms)
            .unwrap_or_default(),
        tags: f.tags.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_rewards_agreement_and_keeps_word_matches() {
        let meaning = vec![(1, 0.9), (2, 0.8), (3, 0.1)];
        // Without words: the meaning ranking itself.
        assert_eq!(fuse(&meaning, &[], None), meaning);
        // 3 matched the words: it rises above 2, which did not.
        let fused: Vec<u64> = fuse(&meaning, &[3, 1], None)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(fused, vec![1, 3, 2]);
        // A cutoff drops low similarity, but not a word match.
        let kept: Vec<u64> = fuse(&meaning, &[3], Some(0.5))
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(kept, vec![3, 1, 2]);
        let cut: Vec<u64> = fuse(&meaning, &[], Some(0.85))
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(cut, vec![1]);
    }

    #[test]
    fn cache_keeps_the_recent() {
        let mut c = Cache::default();
        for i in 0..CACHE_SIZE + 10 {
            c.put(format!("{i}"), Arc::new(vec![i as f32]));
        }
        assert!(c.get("0").is_none());
        assert!(c.get(&format!("{}", CACHE_SIZE + 9)).is_some());
        assert_eq!(c.map.len(), CACHE_SIZE);
    }

    #[test]
    fn queries_are_validated_in_one_place() {
        let text = |w: f32| Term {
            kind: TermKind::Text("dog".into()),
            weight: w,
        };
        let ok = Query::new(vec![text(1.0)]);
        assert!(ok.validate().is_ok());
        for bad in [f32::NAN, f32::INFINITY, -f32::INFINITY, 1e9] {
            assert!(
                Query::new(vec![text(bad)]).validate().is_err(),
                "weight {bad}"
            );
        }
        let vector = Term {
            kind: TermKind::Vector(vec![0.5, f32::NAN]),
            weight: 1.0,
        };
        assert!(Query::new(vec![vector]).validate().is_err());
        // Any offset is a page (past the end, an empty one); k is bounded.
        let mut q = ok.clone();
        q.offset = usize::MAX;
        assert!(q.validate().is_ok());
        q.k = MAX_K + 1;
        assert!(matches!(q.validate(), Err(Error::BadQuery(m)) if m.contains("k must be")));
        let mut q = ok.clone();
        q.min_score = Some(f32::NAN);
        assert!(q.validate().is_err());
        let mut q = ok.clone();
        q.filters.folder = Some("a/".repeat(MAX_FILTER_CHARS));
        assert!(q.validate().is_err());
    }

    #[test]
    fn filter_dates_are_real_and_ordered() {
        let f = |from: &str, to: &str| Filters {
            from: Some(from.into()),
            to: Some(to.into()),
            ..Default::default()
        };
        assert!(f("2019-01-01", "2019-12-31").validate().is_ok());
        assert!(f("2019-01-01", "2019-01-01").validate().is_ok());
        for (from, to) in [
            ("2019-02-30", ""),
            ("2019-13-01", ""),
            ("99999-01-01", ""),
            ("-001-01-01", ""),
            ("0001-01-01", ""),
            ("2019-01-01", "1999-01-01"),
            ("2019-1-1", ""),
            ("2019-01-01Tgarbage", ""),
        ] {
            assert!(f(from, to).validate().is_err(), "{from} {to}");
        }
    }

    #[test]
    fn empty_filters_are_empty() {
        assert!(Filters::default().is_empty());
        assert!(
            Filters {
                folder: Some("  ".into()),
                types: Some(vec![]),
                ..Default::default()
            }
            .is_empty()
        );
        assert!(
            !Filters {
                camera: Some("canon".into()),
                ..Default::default()
            }
            .is_empty()
        );
    }
}
