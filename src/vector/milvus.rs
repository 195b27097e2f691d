//! Milvus as the vector engine of an index (`--vectors milvus://HOST:PORT/COLLECTION`).
//!
//! One entity per photo: its id, its unit vector, and the fields the search
//! filters need ([`Fields`]), so that a filter is a Milvus boolean
//! expression evaluated inside the nearest-neighbour search, not a filter
//! applied to its results. A writer's reads are consistent with the
//! session, which starts with a fence ([`MilvusVectors::open`]): a search
//! sees every write acknowledged before the index was opened and every
//! write of this process since, so it never returns a photo removed before
//! it started. A reader ([`MilvusVectors::open_reader`]) reads strongly
//! (`status`), or, as a search replica, a few seconds behind with a strong
//! check of its results ([`MilvusVectors::live`]).
//!
//! Several indexes may write one collection, each its own shard of the
//! library (`--shard I/N`, [`Shard`]): each reads and writes only the ids
//! of its shard, and keeps a report of its progress in the collection (an
//! entity of its own, [`ShardReport`]) that every process reads.
//!
//! The SDK is async (tonic); clipdex's indexer and searches are not. The
//! engine keeps a small runtime of its own and waits on it from any thread,
//! the server's blocking pool included.

use std::collections::{BTreeSet, HashSet};
use std::future::Future;
use std::ops::Range;
use std::time::{Duration, Instant};

use milvus::client::Client;
use milvus::data::FieldColumn;
use milvus::index::{IndexParams, IndexType, MetricType};
use milvus::mutate::DeleteOptions;
use milvus::options::{CreateCollectionOptions, LoadOptions};
use milvus::proto::common::ConsistencyLevel;
use milvus::query::{QueryOptions, SearchOptions};
use milvus::schema::{CollectionSchemaBuilder, FieldSchema};
use milvus::value::{Value, ValueVec};
use serde::{Deserialize, Serialize};

use super::{Error, Result, unit};
pub use crate::common::shard::Shard;
use crate::common::time::now_secs;

/// Version of the collection's schema below. A collection of another
/// version is refused, never written.
/// 2: each photo's entity carries its record and when it was written
/// (`f.record`, `f.w`), from which search replicas build their folder.
pub const SCHEMA_VERSION: u32 = 2;

/// The id of the entity [`MilvusVectors::fence`] writes; photos' ids are
/// never negative, and every read of photos asks for ids of its shard.
const SENTINEL: i64 = -1;

/// The id of the entity that carries shard `shard`'s [`ShardReport`]
/// (-2 for shard 0, -3 for shard 1, ...).
fn report_id(shard: Shard) -> i64 {
    -2 - i64::from(shard.index)
}

/// A report older than this from a shard that says it is indexing is from
/// a process that died: another index folder may take the shard over.
const LIVE_REPORT_SECS: i64 = 120;

/// Most ids one delete names.
const DELETE_CHUNK: usize = 4096;
/// Most entities one upsert carries (512 dimensions: 4 MB).
const PUT_CHUNK: usize = 2048;
/// Most results one search or query returns (Milvus's limit).
pub const MAX_RESULTS: usize = 16_384;
/// Most entities one query returns with their fields: a gRPC answer is at
/// most 4 MB, and a record with its fields is 0.4 to a few KB.
const RECORDS_PAGE: usize = 1024;
/// How long one call may take before it fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a write keeps retrying while the engine cannot be reached.
const RETRY_FOR: Duration = Duration::from_secs(120);
/// How long the sample kept for [`MilvusVectors::sample_similarities`] is
/// used (it stands for the whole collection: a minute's changes do not
/// move its distribution).
const SAMPLE_TTL: Duration = Duration::from_secs(60);
/// How long the count kept for [`MilvusVectors::count`] is used.
const COUNT_TTL: Duration = Duration::from_secs(2);

/// The nearest-neighbour index Milvus builds on the vectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnnIndex {
    /// HNSW (M 24, efConstruction 200, as the embedded graph).
    #[default]
    Hnsw,
    /// Exact: every vector compared.
    Flat,
}

/// Where an index's vectors live in Milvus, as the index folder records it.
/// No credentials: those come from `--vectors-token` or
/// `CLIPDEX_MILVUS_TOKEN` each time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MilvusConfig {
    /// `HOST:PORT` of the Milvus proxy.
    pub address: String,
    pub collection: String,
    #[serde(default)]
    pub index: AnnIndex,
    /// The part of the library this index writes (`--shard I/N`); none:
    /// all of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<Shard>,
    /// Names the index folder that writes the shard, made with the index
    /// (none in indexes made before shards existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// A search replica's folder: it reads the whole collection and writes
    /// nothing to it (its records come from the collection, `clipdex
    /// replica`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replica: bool,
    /// A replica's searches may return a photo removed in the last few
    /// seconds (`?consistency=bounded`), instead of waiting for Milvus's
    /// clock to be sure it is not (strong, the default: about 200 ms a
    /// search with Milvus's default time tick).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bounded: bool,
}

impl MilvusConfig {
    /// Parses `milvus://HOST:PORT/COLLECTION[?index=hnsw|flat]`.
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |why: &str| Error::Engine {
            address: url.to_string(),
            message: format!(
                "{why}; expected milvus://HOST:PORT/COLLECTION[?index=hnsw|flat][&consistency=strong|bounded]"
            ),
        };
        let rest = url
            .strip_prefix("milvus://")
            .ok_or_else(|| bad("not a milvus:// address"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (address, collection) = rest
            .split_once('/')
            .ok_or_else(|| bad("no collection named"))?;
        if address.contains('@') {
            return Err(bad(
                "credentials do not go in the address (use --vectors-token or CLIPDEX_MILVUS_TOKEN)",
            ));
        }
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| bad("no port given"))?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad("the address is not HOST:PORT"));
        }
        // Milvus: a letter or underscore first, then letters, digits, underscores.
        let valid = collection.len() <= 255
            && collection
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && collection
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(bad(
                "a collection name is letters, digits and underscores, not starting with a digit",
            ));
        }
        let mut index = AnnIndex::default();
        let mut bounded = false;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair {
                "index=hnsw" => index = AnnIndex::Hnsw,
                "index=flat" => index = AnnIndex::Flat,
                "consistency=strong" => bounded = false,
                "consistency=bounded" => bounded = true,
                other => return Err(bad(&format!("unknown option {other:?}"))),
            }
        }
        Ok(Self {
            address: address.to_string(),
            collection: collection.to_string(),
            index,
            shard: None,
            owner: None,
            replica: false,
            bounded,
        })
    }

    /// The shard this index writes ([`Shard::WHOLE`] when not sharded).
    pub fn shard(&self) -> Shard {
        self.shard.unwrap_or(Shard::WHOLE)
    }

    /// Whether `other` names the same collection, index and shard (the
    /// index folder that writes it aside).
    pub fn same_place(&self, other: &Self) -> bool {
        let place = |c: &Self| {
            (
                c.address.clone(),
                c.collection.clone(),
                c.index,
                c.shard(),
                c.replica,
            )
        };
        place(self) == place(other)
    }

    /// The address as given to `--vectors` (without credentials).
    pub fn url(&self) -> String {
        let index = match self.index {
            AnnIndex::Hnsw => "hnsw",
            AnnIndex::Flat => "flat",
        };
        let consistency = match self.bounded {
            true => "&consistency=bounded",
            false => "",
        };
        format!(
            "milvus://{}/{}?index={index}{consistency}",
            self.address, self.collection
        )
    }
}

/// What Milvus keeps beside a photo's vector, for the filters of a
/// [`Selection`]: the values the keyword index holds (the indexer fills it
/// from the same record).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Fields {
    /// Date taken, seconds since the epoch.
    #[serde(skip)]
    pub taken: Option<i64>,
    #[serde(skip)]
    pub format: String,
    /// The folder and each folder above it (`a`, `a/b` for `a/b/c.jpg`).
    pub folders: Vec<String>,
    /// The terms of the camera's make and model, as the keyword index
    /// analyses them.
    pub camera: Vec<String>,
    /// Automatic tags (normalised names).
    pub tags: Vec<String>,
    /// On a shard's report entity (not a photo): the report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<ShardReport>,
    /// The photo's record, as the index that writes it keeps it (opaque
    /// here), for search replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
    /// When the entity was written, milliseconds since the epoch by the
    /// writer's clock: replicas read what changed since their last look.
    #[serde(default, rename = "w")]
    pub written: i64,
}

/// What an index writing one shard of a collection last said of itself,
/// kept in the collection (an entity of its own, outside the photos' ids):
/// `clipdex status` on any machine reads every shard's from there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardReport {
    pub shard: Shard,
    /// The index folder writing it ([`MilvusConfig::owner`]).
    pub owner: Option<String>,
    /// The machine and folder, to name them.
    pub host: String,
    pub folder: String,
    /// `indexing`, `done`, `stopped` or `failed`.
    pub state: String,
    /// Files of the shard the run found, and what it had to read of them.
    pub files: u64,
    pub to_process: u64,
    /// Files read so far (indexed, unchanged after all, or skipped).
    pub processed: u64,
    /// Photos in the shard's index at the last commit.
    pub photos: u64,
    /// Seconds since the epoch.
    pub updated: i64,
}

/// A shard as the collection holds it: its last report (none from an
/// index that never wrote one) and how many photos it holds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShardStatus {
    pub shard: Shard,
    pub photos: usize,
    pub report: Option<ShardReport>,
}

/// A string literal of Milvus's expression language.
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(","))
}

/// The photos a search filter selects, in the terms of [`Fields`]; every
/// part given must hold. The search layer makes it from the keyword
/// index's filter, so that both engines select the same photos.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selection {
    /// The folder, or below it.
    pub folder: Option<String>,
    /// Taken at or after, seconds since the epoch.
    pub from: Option<i64>,
    /// Taken at or before.
    pub to: Option<i64>,
    /// Any of these formats.
    pub formats: Vec<String>,
    /// Every one of these camera terms.
    pub camera: Vec<String>,
    /// Every one of these tags.
    pub tags: Vec<String>,
}

/// The photos of the ids `scope` (a shard's, or all).
fn in_scope(scope: &Range<u64>) -> String {
    if *scope == Shard::WHOLE.ids() {
        // Every photo, and neither the fence's nor the reports' entities.
        "id >= 0".to_string()
    } else {
        format!("id >= {} and id < {}", scope.start, scope.end)
    }
}

/// The selection as a Milvus boolean expression over the photos of
/// `scope`, with `excluded` ids left out.
pub fn expression(
    scope: &Range<u64>,
    filter: Option<&Selection>,
    excluded: &HashSet<u64>,
) -> String {
    let mut parts = vec![in_scope(scope)];
    if let Some(f) = filter {
        if let Some(folder) = f
            .folder
            .as_deref()
            .map(|s| s.trim().trim_matches('/'))
            .filter(|s| !s.is_empty())
        {
            parts.push(format!(
                "json_contains(f[\"folders\"], {})",
                literal(folder)
            ));
        }
        if f.from.is_some() || f.to.is_some() {
            parts.push("dated == true".to_string());
        }
        if let Some(from) = f.from {
            parts.push(format!("taken >= {from}"));
        }
        if let Some(to) = f.to {
            parts.push(format!("taken <= {to}"));
        }
        if !f.formats.is_empty() {
            parts.push(format!(
                "format in {}",
                list(f.formats.iter().map(|t| literal(t)))
            ));
        }
        if !f.tags.is_empty() {
            parts.push(format!(
                "json_contains_all(f[\"tags\"], {})",
                list(f.tags.iter().map(|t| literal(t)))
            ));
        }
        if !f.camera.is_empty() {
            parts.push(format!(
                "json_contains_all(f[\"camera\"], {})",
                list(f.camera.iter().map(|t| literal(t)))
            ));
        }
    }
    if !excluded.is_empty() {
        let mut ids: Vec<u64> = excluded.iter().copied().collect();
        ids.sort_unstable();
        parts.push(format!(
            "id not in {}",
            list(ids.iter().map(|id| id.to_string()))
        ));
    }
    parts.join(" and ")
}

/// The vectors of an index, in a Milvus collection.
pub struct MilvusVectors {
    config: MilvusConfig,
    dim: usize,
    /// The ids of the photos this index reads and writes: its shard's.
    scope: Range<u64>,
    /// The consistency of every read: session for an index that writes
    /// (after its fence), strong for one that only reads.
    level: ConsistencyLevel,
    client: Client,
    runtime: Option<tokio::runtime::Runtime>,
    count: std::sync::Mutex<Option<(Instant, usize)>>,
    /// The sample of [`Self::sample_similarities`]: when it was fetched, its
    /// size, its vectors.
    #[allow(clippy::type_complexity)]
    sample: std::sync::Mutex<Option<(Instant, usize, std::sync::Arc<super::Sample>)>>,
}

impl std::fmt::Debug for MilvusVectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MilvusVectors")
            .field("config", &self.config)
            .field("dim", &self.dim)
            .finish()
    }
}

impl Drop for MilvusVectors {
    fn drop(&mut self) {
        // Not a blocking shutdown: the index may be dropped on a runtime's thread.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The description a collection of this schema carries: what it was made
/// for, read back to refuse another model's or schema's collection.
fn description(dim: usize, model: &str) -> String {
    format!("clipdex photos; schema {SCHEMA_VERSION}; dim {dim}; model {model}")
}

/// A shard as messages name it.
fn describe_shard(shard: Shard) -> String {
    match shard.count {
        1 => "the whole library (no --shard)".to_string(),
        _ => format!("shard {shard}"),
    }
}

/// Whether a failed call may succeed if made again: the engine was not
/// reached, or answered that it (or one of its nodes) is not ready yet, as
/// while it starts up again.
#[allow(deprecated)]
fn transient(e: &milvus::error::Error) -> bool {
    use milvus::error::Error as E;
    use milvus::proto::common::ErrorCode as C;
    match e {
        E::Communication(_) | E::Grpc(_) => true,
        E::Server(
            C::ConnectFailed
            | C::NotShardLeader
            | C::NoReplicaAvailable
            | C::RateLimit
            | C::NodeIdNotMatch
            | C::TimeTickLongDelay
            | C::NotReadyServe
            | C::NotReadyCoordActivating
            | C::DataCoordNa,
            _,
        ) => true,
        // Milvus 2.3 gives most of these as UnexpectedError, with its
        // reason in words.
        E::Server(C::UnexpectedError, reason) => {
            let reason = reason.to_ascii_lowercase();
            [
                "failed to connect",
                "connection refused",
                "not ready",
                "not healthy",
                "unavailable",
                "channel not found",
                "node not found",
                "no available",
                "deadline exceeded",
            ]
            .iter()
            .any(|hint| reason.contains(hint))
        }
        _ => false,
    }
}

/// The expression selecting the entities of `ids`.
fn id_in(ids: &[u64]) -> String {
    format!("id in {}", list(ids.iter().map(|id| id.to_string())))
}

/// The records among entities' `fields`, with when each was written.
fn records(fields: Vec<(u64, Fields)>) -> Vec<(u64, serde_json::Value, i64)> {
    fields
        .into_iter()
        .filter_map(|(id, f)| Some((id, f.record?, f.written)))
        .collect()
}

fn engine_error(config: &MilvusConfig, e: impl std::fmt::Display) -> Error {
    Error::Engine {
        address: config.url(),
        message: e.to_string(),
    }
}

impl MilvusVectors {
    /// Connects to the collection of `config` to write it, creating it
    /// (with its index, loaded) when there is none. A collection made for
    /// another model, another dimension or another schema is refused, and
    /// so is one split into another number of shards, or whose shard
    /// another index folder is writing now.
    pub fn open(
        config: &MilvusConfig,
        dim: usize,
        model: &str,
        token: Option<&str>,
    ) -> Result<Self> {
        let engine = Self::connect(config, dim, token, ConsistencyLevel::Session)?;
        engine.prepare(model)?;
        engine.check_shards()?;
        Ok(engine)
    }

    /// Connects to the existing collection of `config` to read it (counts,
    /// reports), writing nothing: reads are strongly consistent, as this
    /// process has no writes of its own to wait for. `expect` (dimension,
    /// model fingerprint) refuses another model's collection; without it
    /// only counts and reports can be read.
    pub fn open_reader(
        config: &MilvusConfig,
        expect: Option<(usize, &str)>,
        token: Option<&str>,
    ) -> Result<Self> {
        let dim = expect.map_or(0, |(dim, _)| dim);
        // A replica reads a few seconds behind (bounded: no wait for the
        // cluster's clock) and asks strongly only whether its results are
        // still there ([`Self::live`]); `status` reads strongly.
        let level = match config.replica {
            true => ConsistencyLevel::Bounded,
            false => ConsistencyLevel::Strong,
        };
        let engine = Self::connect(config, dim, token, level)?;
        let name = config.collection.clone();
        let exists = engine.call({
            let name = name.clone();
            |c| async move { c.has_collection(name).await }
        })?;
        if !exists {
            return Err(engine_error(
                config,
                format!("there is no collection {name}"),
            ));
        }
        if let Some((_, model)) = expect {
            engine.check_description(model)?;
        }
        engine
            .call(|c| async move { c.load_collection(name, Some(LoadOptions::default())).await })?;
        Ok(engine)
    }

    fn connect(
        config: &MilvusConfig,
        dim: usize,
        token: Option<&str>,
        level: ConsistencyLevel,
    ) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("milvus")
            .enable_all()
            .build()
            .map_err(|e| engine_error(config, e))?;
        let (username, password) = match token.map(|t| t.split_once(':')) {
            Some(Some((u, p))) => (Some(u.to_string()), Some(p.to_string())),
            Some(None) => {
                return Err(engine_error(config, "the token must be USER:PASSWORD"));
            }
            None => (None, None),
        };
        let endpoint = format!("http://{}", config.address);
        let connect = async move {
            tokio::time::timeout(
                CALL_TIMEOUT,
                Client::with_timeout(endpoint, CALL_TIMEOUT, username, password),
            )
            .await
        };
        let client = match runtime.block_on(connect) {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(engine_error(
                    config,
                    format!("cannot connect to Milvus at {}: {e}", config.address),
                ));
            }
            Err(_) => {
                return Err(engine_error(
                    config,
                    format!(
                        "cannot connect to Milvus at {}: no answer in {} s",
                        config.address,
                        CALL_TIMEOUT.as_secs()
                    ),
                ));
            }
        };
        Ok(Self {
            config: config.clone(),
            dim,
            scope: config.shard().ids(),
            level,
            client,
            runtime: Some(runtime),
            count: Default::default(),
            sample: Default::default(),
        })
    }

    pub fn config(&self) -> &MilvusConfig {
        &self.config
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The ids of the photos this index reads and writes: its shard's.
    pub fn scope(&self) -> &Range<u64> {
        &self.scope
    }

    /// Runs `future` on the engine's runtime and waits for it: `None` when
    /// it gave no answer in [`CALL_TIMEOUT`].
    fn attempt<T, Fut>(&self, future: Fut) -> Result<Option<milvus::error::Result<T>>>
    where
        T: Send + 'static,
        Fut: Future<Output = milvus::error::Result<T>> + Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .expect("the runtime lives as long as the engine");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let result = tokio::time::timeout(CALL_TIMEOUT, future).await;
            let _ = tx.send(result.ok());
        });
        rx.recv()
            .map_err(|_| engine_error(&self.config, "the engine's runtime stopped"))
    }

    /// Runs `call` (given the client) on the engine's runtime and waits for it.
    fn call<T, F, Fut>(&self, call: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = milvus::error::Result<T>> + Send + 'static,
    {
        match self.attempt(call(self.client.clone()))? {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(engine_error(&self.config, e)),
            None => Err(engine_error(
                &self.config,
                format!("no answer in {} s", CALL_TIMEOUT.as_secs()),
            )),
        }
    }

    /// [`Self::call`] for a read. A collection the engine no longer has
    /// loaded (Milvus restarted) is loaded again and the read retried, so
    /// a server recovers by itself when the engine is back.
    fn read<T, F, Fut>(&self, call: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut,
        Fut: Future<Output = milvus::error::Result<T>> + Send + 'static,
    {
        match self.call(&call) {
            Err(Error::Engine { message, .. }) if message.contains("not loaded") => {
                tracing::warn!(collection = %self.config.collection, "the collection is not loaded; loading it");
                let name = self.config.collection.clone();
                self.call(|c| async move {
                    c.load_collection(name, Some(LoadOptions::default())).await
                })?;
                self.call(call)
            }
            other => other,
        }
    }

    /// [`Self::call`] for a write, which is idempotent (an upsert or a
    /// delete by id): a failure to reach the engine is retried with
    /// back-off for [`RETRY_FOR`], so an indexing run outlives a restart
    /// of the engine; an error the engine gives is not retried.
    fn call_retrying<T, F, Fut>(&self, what: &str, call: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(Client) -> Fut,
        Fut: Future<Output = milvus::error::Result<T>> + Send + 'static,
    {
        let started = Instant::now();
        let mut wait = Duration::from_millis(250);
        loop {
            let failure = match self.attempt(call(self.client.clone()))? {
                Some(Ok(value)) => return Ok(value),
                // Not reached, not ready, or no answer: worth another try.
                Some(Err(e)) if transient(&e) => e.to_string(),
                Some(Err(e)) => return Err(engine_error(&self.config, e)),
                None => format!("no answer in {} s", CALL_TIMEOUT.as_secs()),
            };
            if started.elapsed() + wait > RETRY_FOR {
                return Err(engine_error(
                    &self.config,
                    format!(
                        "{what}: gave up after {:.0} s: {failure}",
                        started.elapsed().as_secs_f64()
                    ),
                ));
            }
            tracing::warn!(address = %self.config.address, error = %failure, retry_in_s = wait.as_secs_f64(), "{what} failed; retrying");
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    }

    fn schema(&self, model: &str) -> Result<milvus::schema::CollectionSchema> {
        let json = FieldSchema {
            name: "f".into(),
            description: "folders, camera terms, tags".into(),
            dtype: milvus::proto::schema::DataType::Json,
            ..FieldSchema::empty()
        };
        CollectionSchemaBuilder::new(&self.config.collection, &description(self.dim, model))
            .add_field(FieldSchema::new_primary_int64("id", "photo id", false))
            .add_field(FieldSchema::new_float_vector(
                "vector",
                "unit embedding",
                self.dim as i64,
            ))
            .add_field(FieldSchema::new_bool("dated", "has a date taken"))
            .add_field(FieldSchema::new_int64("taken", "date taken, epoch seconds"))
            .add_field(FieldSchema::new_varchar("format", "image format", 64))
            .add_field(json)
            .build()
            .map_err(|e| engine_error(&self.config, e))
    }

    /// Creates the collection if needed, checks it is this index's, and loads it.
    fn prepare(&self, model: &str) -> Result<()> {
        let name = self.config.collection.clone();
        let exists = self.call({
            let name = name.clone();
            |c| async move { c.has_collection(name).await }
        })?;
        if !exists {
            let schema = self.schema(model)?;
            let created = self.call(|c| async move {
                c.create_collection(
                    schema,
                    Some(
                        CreateCollectionOptions::new().consistency_level(ConsistencyLevel::Strong),
                    ),
                )
                .await
            });
            // Another writer (a shard starting at the same moment) may have
            // made it first.
            if let Err(e) = created {
                let name = name.clone();
                if !self.call(|c| async move { c.has_collection(name).await })? {
                    return Err(e);
                }
            }
        }
        self.check_description(model)?;
        self.ensure_index()?;
        self.call({
            let name = name.clone();
            |c| async move { c.load_collection(name, Some(LoadOptions::default())).await }
        })?;
        self.fence()
    }

    /// Whether the collection's vectors have an index (Milvus loads none
    /// without).
    fn has_index(&self) -> bool {
        let name = self.config.collection.clone();
        self.call(|c| async move { c.describe_index(name, "vector".to_string()).await })
            .is_ok_and(|indexes| !indexes.is_empty())
    }

    /// Makes the vectors' index if the collection has none yet. Writers
    /// starting at once may both try: the one refused finds the other's.
    fn ensure_index(&self) -> Result<()> {
        if self.has_index() {
            return Ok(());
        }
        let params = match self.config.index {
            AnnIndex::Hnsw => IndexParams::new(
                "vector_hnsw".into(),
                IndexType::HNSW,
                MetricType::IP,
                [("M", "24"), ("efConstruction", "200")]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            AnnIndex::Flat => IndexParams::new(
                "vector_flat".into(),
                IndexType::Flat,
                MetricType::IP,
                Default::default(),
            ),
        };
        let name = self.config.collection.clone();
        let made = self.call(|c| async move { c.create_index(name, "vector", params).await });
        match made {
            Err(_) if self.has_index() => Ok(()),
            other => other,
        }
    }

    /// Refuses a collection made for another model, dimension or schema.
    fn check_description(&self, model: &str) -> Result<()> {
        let name = self.config.collection.clone();
        let described = self.call({
            let name = name.clone();
            |c| async move { c.describe_collection(name).await }
        })?;
        let want = description(self.dim, model);
        let found = described.schema.description;
        if found.starts_with("clipdex photos; schema 1;") {
            return Err(engine_error(
                &self.config,
                format!(
                    "the collection {name} was made by an earlier clipdex (schema 1: its entities lack \
                     the records search replicas read); index into a new collection"
                ),
            ));
        }
        if found != want {
            return Err(engine_error(
                &self.config,
                format!(
                    "the collection {name} holds other vectors: it says {found:?}, this index needs {want:?}"
                ),
            ));
        }
        Ok(())
    }

    /// Refuses to write a collection the other shards' reports say is split
    /// into another number of shards, or this shard while another index
    /// folder is writing it (its report is recent and says `indexing`).
    /// A shard whose last writer is gone is taken over: the next
    /// reconcile replaces its photos with this folder's.
    fn check_shards(&self) -> Result<()> {
        let mine = self.config.shard();
        let now = now_secs();
        for report in self.reports()? {
            if report.shard.count != mine.count {
                return Err(engine_error(
                    &self.config,
                    format!(
                        "the collection {} is split into {} shards (shard {} is written from {} on {}); \
                         this index writes {}",
                        self.config.collection,
                        report.shard.count,
                        report.shard,
                        report.folder,
                        report.host,
                        describe_shard(mine),
                    ),
                ));
            }
            let other_owner = match (&report.owner, &self.config.owner) {
                (Some(theirs), Some(ours)) => theirs != ours,
                _ => false,
            };
            if report.shard != mine || !other_owner {
                continue;
            }
            let age = now - report.updated;
            if report.state == "indexing" && age < LIVE_REPORT_SECS {
                return Err(engine_error(
                    &self.config,
                    format!(
                        "{} of the collection {} is being indexed from another index folder \
                         ({} on {}, {age} s ago): one index folder writes each shard",
                        describe_shard(mine),
                        self.config.collection,
                        report.folder,
                        report.host,
                    ),
                ));
            }
            tracing::warn!(
                shard = %mine,
                folder = %report.folder,
                host = %report.host,
                "this index folder takes the shard over from another one; its photos are replaced by this folder's"
            );
        }
        Ok(())
    }

    /// Every shard's last report, by shard.
    pub fn reports(&self) -> Result<Vec<ShardReport>> {
        let name = self.config.collection.clone();
        let level = self.consistency();
        let columns = self.read(|c| {
            let name = name.clone();
            async move {
                let options = QueryOptions::new()
                    .output_fields(vec!["id".to_string(), "f".to_string()])
                    .consistency_level(level)
                    .limit(MAX_RESULTS as i64);
                c.query(name, "id < -1", &options).await
            }
        })?;
        let mut reports = Vec::new();
        for column in columns {
            if let ("f", ValueVec::Json(values)) = (column.name.as_str(), column.value) {
                for bytes in values {
                    // A report this version cannot read is left out.
                    if let Ok(Fields {
                        report: Some(report),
                        ..
                    }) = serde_json::from_slice::<Fields>(&bytes)
                    {
                        reports.push(report);
                    }
                }
            }
        }
        reports.sort_by_key(|r| r.shard.index);
        Ok(reports)
    }

    /// Writes this shard's report (replacing its last).
    pub fn report(&self, report: &ShardReport) -> Result<()> {
        let mut vector = vec![0.0; self.dim];
        vector[0] = 1.0;
        let fields = Fields {
            report: Some(report.clone()),
            ..Fields::default()
        };
        self.write(vec![(report_id(report.shard), vector, fields)])
    }

    /// Each shard the reports name (and this index's own), with its photos
    /// counted in the collection.
    pub fn shards(&self) -> Result<Vec<ShardStatus>> {
        let reports = self.reports()?;
        let mut shards: Vec<Shard> = reports.iter().map(|r| r.shard).collect();
        if !self.config.replica {
            shards.push(self.config.shard());
        }
        shards.sort_by_key(|s| (s.count, s.index));
        shards.dedup();
        shards
            .into_iter()
            .map(|shard| {
                Ok(ShardStatus {
                    shard,
                    photos: self.count_where(&in_scope(&shard.ids()))?,
                    report: reports.iter().find(|r| r.shard == shard).cloned(),
                })
            })
            .collect()
    }

    /// Gives this session a timestamp after every write acknowledged before
    /// now (other processes' included), which every later read of the
    /// session waits for: so a search in a new process never sees a photo
    /// removed before it started. Milvus gives a no-op delete no timestamp,
    /// so the fence is a write: the sentinel entity [`SENTINEL`], which
    /// every read leaves out.
    fn fence(&self) -> Result<()> {
        let mut vector = vec![0.0; self.dim];
        vector[0] = 1.0;
        self.write(vec![(SENTINEL, vector, Fields::default())])
    }

    /// The consistency of every read: for an index that writes, session,
    /// which sees every write this process made before it (the index's
    /// lock makes this process its shard's only writer) without waiting
    /// for the cluster's clock as strong consistency does (up to 200 ms a
    /// read).
    fn consistency(&self) -> i32 {
        self.level as i32
    }

    /// A replica's engine refuses to write.
    fn check_writer(&self) -> Result<()> {
        match self.config.replica {
            true => Err(engine_error(
                &self.config,
                "a search replica does not write to the collection",
            )),
            false => Ok(()),
        }
    }

    /// Writes (or replaces) the entities of `items`, photos of this
    /// index's shard.
    pub fn put(&self, items: Vec<(u64, Vec<f32>, Fields)>) -> Result<()> {
        self.check_writer()?;
        if let Some((id, _, _)) = items.iter().find(|(id, _, _)| !self.scope.contains(id)) {
            return Err(engine_error(
                &self.config,
                format!(
                    "photo id {id} is not one of {}'s ids ({} to {})",
                    describe_shard(self.config.shard()),
                    self.scope.start,
                    self.scope.end - 1
                ),
            ));
        }
        self.write(
            items
                .into_iter()
                .map(|(id, v, f)| (id as i64, v, f))
                .collect(),
        )
    }

    fn write(&self, items: Vec<(i64, Vec<f32>, Fields)>) -> Result<()> {
        if let Some((_, v, _)) = items.iter().find(|(_, v, _)| v.len() != self.dim) {
            return Err(Error::Dimension {
                got: v.len(),
                want: self.dim,
            });
        }
        let schema = self.schema("")?;
        let field = |name: &str| {
            schema
                .get_field(name)
                .cloned()
                .expect("the schema has the field")
        };
        for chunk in items.chunks(PUT_CHUNK) {
            let mut vectors = Vec::with_capacity(chunk.len() * self.dim);
            for (_, v, _) in chunk {
                // Unit length, as `unit` makes it, straight into the column.
                let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
                if !norm.is_finite() {
                    return Err(Error::Hnsw("a vector is not finite".into()));
                }
                match norm {
                    0.0 => vectors.extend_from_slice(v),
                    _ => vectors.extend(v.iter().map(|&x| (x as f64 / norm) as f32)),
                }
            }
            let columns = vec![
                FieldColumn::new(
                    &field("id"),
                    ValueVec::Long(chunk.iter().map(|(id, _, _)| *id).collect()),
                ),
                FieldColumn::new(&field("vector"), ValueVec::Float(vectors)),
                FieldColumn::new(
                    &field("dated"),
                    ValueVec::Bool(chunk.iter().map(|(_, _, f)| f.taken.is_some()).collect()),
                ),
                FieldColumn::new(
                    &field("taken"),
                    ValueVec::Long(chunk.iter().map(|(_, _, f)| f.taken.unwrap_or(0)).collect()),
                ),
                FieldColumn::new(
                    &field("format"),
                    ValueVec::String(chunk.iter().map(|(_, _, f)| f.format.clone()).collect()),
                ),
                FieldColumn::new(
                    &field("f"),
                    ValueVec::Json(
                        chunk
                            .iter()
                            .map(|(_, _, f)| serde_json::to_vec(f).expect("fields serialise"))
                            .collect(),
                    ),
                ),
            ];
            let name = &self.config.collection;
            self.call_retrying("writing vectors", |c| {
                let (name, columns) = (name.clone(), columns.clone());
                async move {
                    c.upsert(name, columns, None::<milvus::mutate::InsertOptions>)
                        .await
                }
            })?;
        }
        self.forget_count();
        Ok(())
    }

    /// Removes entities; ids not there are no error.
    pub fn remove(&self, ids: &[u64]) -> Result<()> {
        self.check_writer()?;
        for chunk in ids.chunks(DELETE_CHUNK) {
            let name = &self.config.collection;
            let ids: Vec<i64> = chunk.iter().map(|&id| id as i64).collect();
            self.call_retrying("removing vectors", |c| {
                let (name, ids) = (name.clone(), ids.clone());
                async move {
                    c.delete(name, &DeleteOptions::with_ids(ValueVec::Long(ids)))
                        .await
                }
            })?;
        }
        if !ids.is_empty() {
            self.forget_count();
        }
        Ok(())
    }

    fn forget_count(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Seals what was written and waits until Milvus says its index is
    /// built (for benchmarks). Milvus 2.3.5 says so before it has indexed
    /// the segments just sealed, which it goes on indexing in the
    /// background. Gives up after `wait`.
    pub fn settle(&self, wait: Duration) -> Result<()> {
        let name = self.config.collection.clone();
        self.call(|c| async move { c.flush(name).await })?;
        let started = Instant::now();
        loop {
            let name = self.config.collection.clone();
            let indexes =
                self.call(|c| async move { c.describe_index(name, "vector".to_string()).await })?;
            if indexes
                .iter()
                .all(|i| i.state() == milvus::proto::common::IndexState::Finished)
            {
                return Ok(());
            }
            if started.elapsed() > wait {
                return Err(engine_error(&self.config, "the index is not built yet"));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The number of entities (a count at most two seconds old).
    pub fn count(&self) -> Result<usize> {
        let mut kept = self.count.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, n)) = *kept
            && at.elapsed() < COUNT_TTL
        {
            return Ok(n);
        }
        let n = self.count_where(&in_scope(&self.scope))?;
        *kept = Some((Instant::now(), n));
        Ok(n)
    }

    fn count_where(&self, expr: &str) -> Result<usize> {
        let name = self.config.collection.clone();
        let expr = expr.to_string();
        let level = self.consistency();
        let columns = self.read(|c| {
            let (name, expr) = (name.clone(), expr.clone());
            async move {
                let options = QueryOptions::new()
                    .output_fields(vec!["count(*)".to_string()])
                    .consistency_level(level);
                c.query(name, &expr, &options).await
            }
        })?;
        let count = columns
            .into_iter()
            .find(|c| c.name == "count(*)")
            .and_then(|c| match c.value {
                ValueVec::Long(v) => v.first().copied(),
                _ => None,
            })
            .ok_or_else(|| engine_error(&self.config, "count(*) gave no count"))?;
        Ok(count.max(0) as usize)
    }

    /// The ids of `expr`, with the vectors when `vectors`, at most `limit`.
    fn query(
        &self,
        expr: String,
        vectors: bool,
        limit: Option<usize>,
    ) -> Result<Vec<(u64, Option<Vec<f32>>)>> {
        self.query_at(expr, vectors, limit, self.consistency())
    }

    /// [`Self::query`] at the consistency `level`.
    fn query_at(
        &self,
        expr: String,
        vectors: bool,
        limit: Option<usize>,
        level: i32,
    ) -> Result<Vec<(u64, Option<Vec<f32>>)>> {
        let name = self.config.collection.clone();
        let mut fields = vec!["id".to_string()];
        if vectors {
            fields.push("vector".to_string());
        }
        let columns = self.read(|c| {
            let (name, expr, fields) = (name.clone(), expr.clone(), fields.clone());
            async move {
                let mut options = QueryOptions::new()
                    .output_fields(fields)
                    .consistency_level(level);
                if let Some(limit) = limit {
                    options = options.limit(limit as i64);
                }
                c.query(name, &expr, &options).await
            }
        })?;
        let mut ids = Vec::new();
        let mut flat = Vec::new();
        for column in columns {
            match (column.name.as_str(), column.value) {
                ("id", ValueVec::Long(v)) => ids = v,
                ("vector", ValueVec::Float(v)) => flat = v,
                _ => {}
            }
        }
        if vectors && flat.len() != ids.len() * self.dim {
            return Err(engine_error(
                &self.config,
                format!("{} ids came with {} vector values", ids.len(), flat.len()),
            ));
        }
        Ok(ids
            .into_iter()
            .enumerate()
            .map(|(i, id)| {
                let v = vectors.then(|| flat[i * self.dim..(i + 1) * self.dim].to_vec());
                (id as u64, v)
            })
            .collect())
    }

    /// Every id in the collection. Milvus returns at most [`MAX_RESULTS`]
    /// a query and in no order, so the id space is split until each part
    /// fits.
    pub fn ids(&self) -> Result<BTreeSet<u64>> {
        Ok(self
            .query_all("", MAX_RESULTS, |lo, hi, cond| {
                self.query(
                    format!("id >= {lo} and id < {hi}{cond}"),
                    false,
                    Some(MAX_RESULTS),
                )
                .map(|found| found.into_iter().map(|(id, _)| (id, ())).collect())
            })?
            .into_iter()
            .map(|(id, ())| id)
            .collect())
    }

    /// Runs `each` (lowest id, id past the highest, `cond`) over the id
    /// space of the scope, splitting a range whose answer fills a query
    /// (`page` results) until every part fits.
    fn query_all<T>(
        &self,
        cond: &str,
        page: usize,
        each: impl Fn(u64, u64, &str) -> Result<Vec<(u64, T)>>,
    ) -> Result<Vec<(u64, T)>> {
        let mut all = Vec::new();
        let mut ranges = vec![(self.scope.start, self.scope.end)];
        while let Some((lo, hi)) = ranges.pop() {
            let found = each(lo, hi, cond)?;
            if found.len() < page || hi - lo <= 1 {
                all.extend(found);
            } else {
                let mid = lo + (hi - lo) / 2;
                ranges.push((lo, mid));
                ranges.push((mid, hi));
            }
        }
        Ok(all)
    }

    /// The records of the photos written at or after `since_ms` (by their
    /// writers' clocks), with when each was written: what a replica reads
    /// to bring its folder up to date (`i64::MIN`: every record).
    pub fn changed_since(&self, since_ms: i64) -> Result<Vec<(u64, serde_json::Value, i64)>> {
        // Every record: no condition (entities written before `w` was kept among them).
        let cond = match since_ms {
            i64::MIN => String::new(),
            since => format!(" and f[\"w\"] >= {since}"),
        };
        let found = self.query_all(&cond, RECORDS_PAGE, |lo, hi, cond| {
            self.query_fields(format!("id >= {lo} and id < {hi}{cond}"))
        })?;
        Ok(records(found))
    }

    /// The records of the entities of `ids` that have one, with when each
    /// was written (as [`Self::changed_since`]).
    pub fn records_of(&self, ids: &[u64]) -> Result<Vec<(u64, serde_json::Value, i64)>> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(RECORDS_PAGE) {
            found.extend(records(self.query_fields(id_in(chunk))?));
        }
        Ok(found)
    }

    /// The ids and [`Fields`] of the entities `expr` selects (at most
    /// [`RECORDS_PAGE`]).
    /// Bounded consistency (a few seconds behind, no wait for the
    /// cluster's clock): the one reader, a replica's sync, reads a minute
    /// back each time, and searches check the engine's live set anyway.
    fn query_fields(&self, expr: String) -> Result<Vec<(u64, Fields)>> {
        let name = self.config.collection.clone();
        let level = ConsistencyLevel::Bounded as i32;
        let columns = self.read(|c| {
            let (name, expr) = (name.clone(), expr.clone());
            async move {
                let options = QueryOptions::new()
                    .output_fields(vec!["id".to_string(), "f".to_string()])
                    .consistency_level(level)
                    .limit(RECORDS_PAGE as i64);
                c.query(name, &expr, &options).await
            }
        })?;
        let (mut ids, mut fields) = (Vec::new(), Vec::new());
        for column in columns {
            match (column.name.as_str(), column.value) {
                ("id", ValueVec::Long(v)) => ids = v,
                ("f", ValueVec::Json(v)) => fields = v,
                _ => {}
            }
        }
        if fields.len() != ids.len() {
            return Err(engine_error(
                &self.config,
                format!("{} ids came with {} field values", ids.len(), fields.len()),
            ));
        }
        Ok(ids
            .into_iter()
            .zip(fields)
            // Fields this version cannot read are an entity without them.
            .map(|(id, f)| (id as u64, serde_json::from_slice(&f).unwrap_or_default()))
            .collect())
    }

    /// Which of `ids` the collection holds now.
    /// Strongly consistent (unless the address says `consistency=bounded`):
    /// it sees every removal acknowledged before it.
    pub fn live(&self, ids: &[u64]) -> Result<HashSet<u64>> {
        let mut live = HashSet::new();
        for chunk in ids.chunks(DELETE_CHUNK) {
            live.extend(
                self.query_at(
                    id_in(chunk),
                    false,
                    Some(chunk.len()),
                    match self.config.bounded {
                        true => ConsistencyLevel::Bounded,
                        false => ConsistencyLevel::Strong,
                    } as i32,
                )?
                .into_iter()
                .map(|(id, _)| id),
            );
        }
        Ok(live)
    }

    /// The stored (unit) vector of `id`.
    pub fn vector(&self, id: u64) -> Result<Option<Vec<f32>>> {
        Ok(self
            .query(format!("id == {id}"), true, Some(1))?
            .into_iter()
            .next()
            .and_then(|(_, v)| v))
    }

    /// The cosine similarity of `query` to at most `n` entities (the same
    /// ones while the collection does not change).
    pub fn sample_similarities(&self, query: &[f32], n: usize) -> Result<Vec<(u64, f32)>> {
        self.check_dim(query)?;
        let query = unit(query);
        let n = n.clamp(1, MAX_RESULTS);
        let sample = {
            let mut kept = self.sample.lock().unwrap_or_else(|p| p.into_inner());
            match &*kept {
                Some((at, size, sample)) if *size == n && at.elapsed() < SAMPLE_TTL => {
                    sample.clone()
                }
                _ => {
                    // 2,048 vectors of 512 dimensions are 4 MB: fetched once
                    // for every query of the next minute, not each time.
                    let fetched: std::sync::Arc<super::Sample> = std::sync::Arc::new(
                        self.query(in_scope(&self.scope), true, Some(n))?
                            .into_iter()
                            .filter_map(|(id, v)| Some((id, v?)))
                            .collect(),
                    );
                    *kept = Some((Instant::now(), n, fetched.clone()));
                    fetched
                }
            }
        };
        Ok(sample.similarities(&query))
    }

    fn check_dim(&self, query: &[f32]) -> Result<()> {
        super::check_dim(query, self.dim)
    }

    /// The `k` nearest entities to `query` that `expr` selects, as (id,
    /// cosine similarity), best first. `k` is capped at [`MAX_RESULTS`].
    pub fn search(&self, query: &[f32], k: usize, expr: String) -> Result<Vec<(u64, f32)>> {
        Ok(self
            .search_many(&[query], k, expr)?
            .pop()
            .unwrap_or_default())
    }

    /// [`Self::search`] for each of `queries`, in one round trip.
    pub fn search_many(
        &self,
        queries: &[&[f32]],
        k: usize,
        expr: String,
    ) -> Result<Vec<Vec<(u64, f32)>>> {
        for query in queries {
            self.check_dim(query)?;
        }
        if k == 0 || queries.is_empty() {
            return Ok(vec![Vec::new(); queries.len()]);
        }
        let k = k.min(MAX_RESULTS);
        let queries: Vec<Vec<f32>> = queries.iter().map(|q| unit(q)).collect();
        let name = self.config.collection.clone();
        let index = self.config.index;
        let level = self.consistency();
        let results = self.read(|c| {
            let (name, expr) = (name.clone(), expr.clone());
            let data: Vec<Value> = queries.iter().cloned().map(Value::from).collect();
            async move {
                let mut options = SearchOptions::new()
                    .limit(k)
                    .anns_field(vec!["vector".to_string()])
                    .add_param("metric_type", "IP")
                    .consistency_level(level);
                if index == AnnIndex::Hnsw {
                    options = options.add_param("ef", super::EF_SEARCH.max(k).to_string());
                }
                options = options.filter(expr);
                let found = c.search(name, data, Some(options)).await?;
                Ok(found
                    .into_iter()
                    .map(|r| {
                        r.id.into_iter()
                            .zip(r.score)
                            .filter_map(|(id, score)| match id {
                                Value::Long(id) => Some((id as u64, score)),
                                _ => None,
                            })
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<_>>())
            }
        })?;
        if results.len() != queries.len() {
            return Err(engine_error(
                &self.config,
                format!(
                    "{} queries came back as {} results",
                    queries.len(),
                    results.len()
                ),
            ));
        }
        Ok(results)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_refuse_what_they_cannot_use() {
        let c = MilvusConfig::parse("milvus://db.local:19530/photos").unwrap();
        assert_eq!(c.address, "db.local:19530");
        assert_eq!(c.collection, "photos");
        assert_eq!(c.index, AnnIndex::Hnsw);
        assert_eq!(c.url(), "milvus://db.local:19530/photos?index=hnsw");
        let flat = MilvusConfig::parse("milvus://127.0.0.1:1/_p2?index=flat").unwrap();
        assert_eq!(flat.index, AnnIndex::Flat);
        let bounded = MilvusConfig::parse("milvus://h:1/c?consistency=bounded").unwrap();
        assert!(bounded.bounded);
        assert_eq!(
            bounded.url(),
            "milvus://h:1/c?index=hnsw&consistency=bounded"
        );
        for bad in [
            "http://h:1/c",
            "milvus://h:1",
            "milvus://h/c",
            "milvus://h:x/c",
            "milvus://u:p@h:1/c",
            "milvus://h:1/2c",
            "milvus://h:1/a-b",
            "milvus://h:1/c?index=ivf",
        ] {
            assert!(MilvusConfig::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn selections_become_expressions() {
        let filter = Selection {
            folder: Some("/trips/2019 \"x\"/".into()),
            from: Some(10),
            to: None,
            formats: vec!["jpeg".into(), "png".into()],
            camera: vec!["canon".into(), "eo".into()],
            tags: vec!["dog".into()],
        };
        let excluded: HashSet<u64> = [7, 3].into_iter().collect();
        assert_eq!(
            expression(&Shard::WHOLE.ids(), Some(&filter), &excluded),
            "id >= 0 and json_contains(f[\"folders\"], \"trips/2019 \\\"x\\\"\") and dated == true \
             and taken >= 10 and format in [\"jpeg\",\"png\"] \
             and json_contains_all(f[\"tags\"], [\"dog\"]) \
             and json_contains_all(f[\"camera\"], [\"canon\",\"eo\"]) and id not in [3,7]"
        );
        let whole = Shard::WHOLE.ids();
        assert_eq!(expression(&whole, None, &HashSet::new()), "id >= 0");
        let shard = Shard { index: 1, count: 2 }.ids();
        assert_eq!(
            expression(&shard, None, &[5].into_iter().collect()),
            "id >= 1099511627776 and id < 2199023255552 and id not in [5]"
        );
    }
}
