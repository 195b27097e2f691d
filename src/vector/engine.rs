//! Where an index's vectors live: the embedded graph ([`VectorIndex`], the
//! default, in the index folder) or a Milvus collection ([`MilvusVectors`]).
//! The rest of clipdex sees only [`Vectors`].

use std::collections::{BTreeSet, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::milvus::{
    self, Fields, MilvusConfig, MilvusVectors, Selection, ShardReport, ShardStatus,
};
use super::{Error, Result, VectorIndex};
use crate::common::shard::Shard;

/// The file in an index folder that names its engine; none means embedded.
const ENGINE_FILE: &str = "vectors.json";

/// Which engine holds an index's vectors, chosen when the index is made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "engine", rename_all = "lowercase")]
pub enum EngineConfig {
    /// hnsw_rs in the index folder.
    #[default]
    Embedded,
    Milvus(MilvusConfig),
}

impl EngineConfig {
    /// `embedded`, or `milvus://HOST:PORT/COLLECTION[?index=hnsw|flat]`.
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "embedded" => Ok(Self::Embedded),
            other => Ok(Self::Milvus(MilvusConfig::parse(other)?)),
        }
    }

    /// The engine the index folder `root` records (embedded where it
    /// records none, as every index made before there was a choice).
    pub fn read(root: &Path) -> Result<Self> {
        let path = root.join(ENGINE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::Engine {
                address: path.display().to_string(),
                message: format!("unreadable: {e}"),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::Embedded),
            Err(e) => Err(Error::Io {
                path: path.display().to_string(),
                source: e,
            }),
        }
    }

    /// Records the engine in the index folder `root` (durably: every later
    /// command reads it to find the vectors).
    pub fn write(&self, root: &Path) -> Result<()> {
        let path = root.join(ENGINE_FILE);
        let bytes = serde_json::to_vec_pretty(self).expect("the engine serialises");
        crate::common::fs::write_synced(&path, &bytes).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// As `--vectors` takes it (no credentials), and the shard.
    pub fn describe(&self) -> String {
        match self {
            Self::Embedded => "embedded".to_string(),
            Self::Milvus(m) => match (m.shard, m.replica) {
                (_, true) => format!("{} (replica)", m.url()),
                (Some(shard), false) => format!("{} shard {shard}", m.url()),
                (None, false) => m.url(),
            },
        }
    }

    /// Whether `other` is the same engine, collection and shard (which
    /// index folder writes it aside).
    pub fn same_engine(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Embedded, Self::Embedded) => true,
            (Self::Milvus(a), Self::Milvus(b)) => a.same_place(b),
            _ => false,
        }
    }

    /// The part of the library the index takes.
    pub fn shard(&self) -> Shard {
        match self {
            Self::Embedded => Shard::WHOLE,
            Self::Milvus(m) => m.shard(),
        }
    }

    /// The engine as a new index folder `root` records it: a shared engine
    /// learns which folder writes its shard.
    pub fn for_new_index(&self, root: &Path) -> Self {
        match self {
            Self::Milvus(m) if m.owner.is_none() => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let seed = format!("{}\n{}\n{nanos}", root.display(), std::process::id());
                let owner = blake3::hash(seed.as_bytes()).to_hex()[..16].to_string();
                Self::Milvus(MilvusConfig {
                    owner: Some(owner),
                    ..m.clone()
                })
            }
            other => other.clone(),
        }
    }
}

/// What a shared engine holds of the index `config` names, read without
/// writing anything (for `clipdex status`): the index's own photos there,
/// and every shard's. `expect`, the model's dimension and fingerprint,
/// refuses another model's collection. `None` for the embedded engine.
pub fn read_shared(
    config: &EngineConfig,
    expect: Option<(usize, &str)>,
) -> Result<Option<(usize, Vec<ShardStatus>)>> {
    match config {
        EngineConfig::Embedded => Ok(None),
        EngineConfig::Milvus(m) => {
            let engine = MilvusVectors::open_reader(m, expect, token_from_env().as_deref())?;
            Ok(Some((engine.count()?, engine.shards()?)))
        }
    }
}

static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the engine's credentials for this process (`--vectors-token`).
pub fn set_token(token: &str) {
    let _ = TOKEN.set(token.to_string());
}

/// The credentials for the engine: `--vectors-token`, else `CLIPDEX_MILVUS_TOKEN`.
pub fn token_from_env() -> Option<String> {
    TOKEN
        .get()
        .cloned()
        .or_else(|| std::env::var("CLIPDEX_MILVUS_TOKEN").ok())
        .filter(|t| !t.is_empty())
}

/// An index's vectors, wherever they live.
pub enum Vectors {
    Embedded(Box<VectorIndex>),
    Milvus(Box<MilvusVectors>),
}

impl std::fmt::Debug for Vectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Vectors").field(&self.engine()).finish()
    }
}

impl Vectors {
    /// Opens the vectors of the index whose graph folder is `dir`, in the
    /// engine `config` names, for a model of `dim` dimensions whose
    /// fingerprint is `model`.
    pub fn open(dir: &Path, dim: usize, config: &EngineConfig, model: &str) -> Result<Self> {
        match config {
            EngineConfig::Embedded => Ok(Self::Embedded(Box::new(VectorIndex::open(dir, dim)?))),
            EngineConfig::Milvus(m) if m.replica => Ok(Self::Milvus(Box::new(
                MilvusVectors::open_reader(m, Some((dim, model)), token_from_env().as_deref())?,
            ))),
            EngineConfig::Milvus(m) => Ok(Self::Milvus(Box::new(MilvusVectors::open(
                m,
                dim,
                model,
                token_from_env().as_deref(),
            )?))),
        }
    }

    /// The engine, as `--vectors` names it (and the shard, or that this is
    /// a replica).
    pub fn engine(&self) -> String {
        match self {
            Self::Embedded(_) => "embedded".to_string(),
            Self::Milvus(m) => EngineConfig::Milvus(m.config().clone()).describe(),
        }
    }

    /// Whether this is a search replica's view of a shared collection: it
    /// reads every shard's photos and writes nothing.
    pub fn is_replica(&self) -> bool {
        matches!(self, Self::Milvus(m) if m.config().replica)
    }

    /// A shared engine's records written at or after `since_ms`, with
    /// when each was (none for the embedded engine).
    pub fn changed_since(&self, since_ms: i64) -> Result<Vec<(u64, serde_json::Value, i64)>> {
        match self {
            Self::Embedded(_) => Ok(Vec::new()),
            Self::Milvus(m) => m.changed_since(since_ms),
        }
    }

    /// The records the engine keeps of `ids` (Milvus), with when each was
    /// written.
    pub fn records_of(&self, ids: &[u64]) -> Result<Vec<(u64, serde_json::Value, i64)>> {
        match self {
            Self::Embedded(_) => Ok(Vec::new()),
            Self::Milvus(m) => m.records_of(ids),
        }
    }

    /// Which of `ids` the engine holds now.
    pub fn live(&self, ids: &[u64]) -> Result<HashSet<u64>> {
        match self {
            Self::Embedded(v) => Ok(ids.iter().copied().filter(|&id| v.contains(id)).collect()),
            Self::Milvus(m) => m.live(ids),
        }
    }

    /// The embedded graph, where the vectors are in one.
    pub fn embedded(&self) -> Option<&VectorIndex> {
        match self {
            Self::Embedded(v) => Some(v),
            Self::Milvus(_) => None,
        }
    }

    /// Whether [`Self::put`] needs each photo's [`Fields`] (the engine
    /// evaluates filters itself), and so a photo whose fields changed must
    /// be put again.
    pub fn wants_fields(&self) -> bool {
        matches!(self, Self::Milvus(_))
    }

    pub fn dim(&self) -> usize {
        match self {
            Self::Embedded(v) => v.dim(),
            Self::Milvus(m) => m.dim(),
        }
    }

    /// How many vectors there are.
    pub fn count(&self) -> Result<usize> {
        match self {
            Self::Embedded(v) => Ok(v.len()),
            Self::Milvus(m) => m.count(),
        }
    }

    pub fn ids(&self) -> Result<BTreeSet<u64>> {
        match self {
            Self::Embedded(v) => Ok(v.ids()),
            Self::Milvus(m) => m.ids(),
        }
    }

    /// The vector of `id` (unit length).
    pub fn vector(&self, id: u64) -> Result<Option<Vec<f32>>> {
        match self {
            Self::Embedded(v) => Ok(v.vector(id)),
            Self::Milvus(m) => m.vector(id),
        }
    }

    /// The cosine similarity of `query` to a fixed sample of at most `n`
    /// vectors.
    pub fn sample_similarities(&self, query: &[f32], n: usize) -> Result<Vec<(u64, f32)>> {
        match self {
            Self::Embedded(v) => v.sample_similarities(query, n),
            Self::Milvus(m) => m.sample_similarities(query, n),
        }
    }

    /// The `k` nearest vectors to `query`, as (id, cosine similarity), best first.
    pub fn nearest(&self, query: &[f32], k: usize) -> Result<Vec<(u64, f32)>> {
        match self {
            Self::Embedded(v) => v.search(query, k, None),
            Self::Milvus(m) => m.search(
                query,
                k,
                milvus::expression(m.scope(), None, &HashSet::new()),
            ),
        }
    }

    /// [`Self::nearest`] for each of `queries` (Milvus: in one round trip).
    pub fn nearest_many(&self, queries: &[&[f32]], k: usize) -> Result<Vec<Vec<(u64, f32)>>> {
        match self {
            Self::Embedded(v) => queries.iter().map(|q| v.search(q, k, None)).collect(),
            Self::Milvus(m) => m.search_many(
                queries,
                k,
                milvus::expression(m.scope(), None, &HashSet::new()),
            ),
        }
    }

    /// The `k` nearest vectors to `query` among the photos `filter`
    /// selects, less `excluded`, best first. The embedded graph takes the
    /// selection as the ids `among` (the keyword index's answer to the
    /// same filter); Milvus evaluates `filter` inside its search.
    pub fn search_among(
        &self,
        query: &[f32],
        k: usize,
        among: Option<&HashSet<u64>>,
        filter: Option<&Selection>,
        excluded: &HashSet<u64>,
    ) -> Result<Vec<(u64, f32)>> {
        match self {
            Self::Embedded(v) => Ok(v.search_among(query, k, among, excluded)?.0),
            Self::Milvus(m) => m.search(query, k, milvus::expression(m.scope(), filter, excluded)),
        }
    }

    /// Adds the vectors of `items` (Milvus: adds or replaces, with the
    /// fields `fields` gives for each id).
    pub fn put(
        &self,
        items: Vec<(u64, Vec<f32>)>,
        fields: &dyn Fn(u64) -> Option<Fields>,
    ) -> Result<()> {
        match self {
            Self::Embedded(v) => v.insert_batch(&items),
            Self::Milvus(m) => m.put(
                items
                    .into_iter()
                    .map(|(id, v)| (id, v, fields(id).unwrap_or_default()))
                    .collect(),
            ),
        }
    }

    /// Every shard of a shared engine's collection, with its photos and
    /// last report; none for the embedded engine.
    pub fn shards(&self) -> Result<Vec<ShardStatus>> {
        match self {
            Self::Embedded(_) => Ok(Vec::new()),
            Self::Milvus(m) => m.shards(),
        }
    }

    /// Says how far this index's shard is in a shared engine (which keeps
    /// it for `clipdex status` on any machine); nothing for the embedded
    /// one.
    pub fn report(&self, report: &ShardReport) -> Result<()> {
        match self {
            Self::Embedded(_) => Ok(()),
            Self::Milvus(m) => m.report(report),
        }
    }

    /// The shard the index writes, and the folder it is recorded as
    /// ([`MilvusConfig::owner`]), in a shared engine.
    pub fn shard(&self) -> (Shard, Option<&str>) {
        match self {
            Self::Embedded(_) => (Shard::WHOLE, None),
            Self::Milvus(m) => (m.config().shard(), m.config().owner.as_deref()),
        }
    }

    /// Removes ids: never returned again.
    pub fn remove(&self, ids: Vec<u64>) -> Result<()> {
        match self {
            Self::Embedded(v) => {
                v.remove(ids);
                Ok(())
            }
            Self::Milvus(m) => m.remove(&ids),
        }
    }

    /// The share of removed entries the graph still carries (0 for an
    /// engine that compacts itself).
    pub fn dead_fraction(&self) -> f64 {
        match self {
            Self::Embedded(v) => v.dead_fraction(),
            Self::Milvus(_) => 0.0,
        }
    }

    /// Whether there are changes to save ([`Self::save`]); Milvus keeps
    /// each change when it acknowledges it.
    pub fn is_changed(&self) -> bool {
        match self {
            Self::Embedded(v) => v.is_changed(),
            Self::Milvus(_) => false,
        }
    }

    pub fn save(&self) -> Result<()> {
        match self {
            Self::Embedded(v) => v.save(),
            Self::Milvus(_) => Ok(()),
        }
    }

    /// Rebuilds the graph from `vectors` (the embedded graph only: Milvus
    /// compacts its own segments).
    pub fn rebuild(&self, vectors: impl IntoIterator<Item = (u64, Vec<f32>)>) -> Result<()> {
        match self {
            Self::Embedded(v) => v.rebuild(vectors),
            Self::Milvus(_) => Ok(()),
        }
    }
}
