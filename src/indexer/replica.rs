//! Search replicas: index folders that serve a shared collection (every
//! shard's photos) without indexing anything. A replica keeps no vectors
//! and writes nothing to the engine; its store and keyword index are a
//! copy of the records the writers keep in the collection beside each
//! vector (`Fields::record`), brought up to date by [`sync`], so keyword
//! fusion, filters and browsing work on a replica as on the index that
//! wrote them. Any replica can be thrown away and made again from the
//! collection (`clipdex replica`).
//!
//! A sync reads the entities written since the last one looked (less
//! [`OVERLAP_MS`], for writers' clocks and the engine's lag), and compares
//! the id sets when the counts disagree afterwards (a removal leaves no
//! entity to read). Between syncs the engine itself keeps searches exact:
//! a replica searches a few seconds behind (bounded consistency) and then
//! drops the results the engine no longer holds, asked strongly (`search`,
//! `Vectors::live`), so a removed photo is never returned.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Error, Index, Result, keyword_doc};
use crate::common::ModelInfo;
use crate::store::{Change, PhotoRecord};
use crate::vector::EngineConfig;

/// How far before the newest write the last sync saw the next one reads
/// again: writers' clocks may differ by this much, and an entity written
/// just before a sync may become visible just after it.
pub const OVERLAP_MS: i64 = 60_000;

/// The file of a replica's folder that says how far it has read.
const MARK_FILE: &str = "replica.json";

#[derive(Default, Serialize, Deserialize)]
struct Mark {
    /// The newest write (writer's clock, ms) a sync has read.
    newest_ms: i64,
}

/// What a sync changed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Synced {
    /// Records read from the engine.
    pub read: usize,
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    /// Photos in the replica after the sync.
    pub photos: usize,
    /// Whether the id sets were compared.
    pub compared_ids: bool,
    pub took_ms: f64,
}

/// Opens the replica at `root` of the collection `engine` names, making it
/// (empty; [`sync`] fills it) when there is none. `library` is where this
/// machine sees the library the writers indexed (originals and thumbnails
/// are read from there).
pub fn create_or_open(
    root: &Path,
    library: &Path,
    model: &ModelInfo,
    engine: &EngineConfig,
) -> Result<Index> {
    Index::create_or_open_in(root, library, model, Some(&replica_of(engine)?))
}

/// The engine a replica of the collection `engine` names records: the
/// whole collection, read only.
pub fn replica_of(engine: &EngineConfig) -> Result<EngineConfig> {
    let EngineConfig::Milvus(config) = engine else {
        return Err(Error::NotReplica(format!(
            "a replica serves a shared collection: give --of milvus://HOST:PORT/COLLECTION, not {}",
            engine.describe()
        )));
    };
    Ok(EngineConfig::Milvus(crate::vector::milvus::MilvusConfig {
        replica: true,
        shard: None,
        ..config.clone()
    }))
}

fn read_mark(index: &Index) -> Mark {
    std::fs::read(index.paths.root.join(MARK_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Brings the replica's records and keyword index up to the collection's
/// (`full`: reads every record, not only those written since the last
/// sync).
pub fn sync(index: &Index, full: bool) -> Result<Synced> {
    if !index.vectors.is_replica() {
        return Err(Error::NotReplica(format!(
            "{} is not a replica",
            index.paths.root.display()
        )));
    }
    let start = Instant::now();
    let mark = read_mark(index);
    let since = match full || mark.newest_ms == 0 {
        true => i64::MIN,
        false => mark.newest_ms - OVERLAP_MS,
    };
    let changed = index.vectors.changed_since(since)?;
    let mut synced = Synced {
        read: changed.len(),
        ..Synced::default()
    };
    let mut newest = mark.newest_ms;
    let changes = changes_of(index, changed, &mut synced, &mut newest)?;
    apply(index, &changes)?;
    // A removal leaves nothing to read: the counts tell, and the id sets
    // say which. They also bring back what an earlier sync removed while
    // the engine answered with less than it holds (as it may for a while
    // after a restart).
    let engine_count = index.vectors.count()?;
    if full || engine_count != index.store.count() {
        synced.compared_ids = true;
        let live = index.vectors.ids()?;
        let held = index.store.ids()?;
        let mut gone = Vec::new();
        for id in held.difference(&live) {
            if let Some(record) = index.store.get(*id)? {
                gone.push(Change::Remove { record });
            }
        }
        synced.removed = gone.len();
        apply(index, &gone)?;
        let missing: Vec<u64> = live.difference(&held).copied().collect();
        if !missing.is_empty() {
            let found = index.vectors.records_of(&missing)?;
            synced.read += found.len();
            let back = changes_of(index, found, &mut synced, &mut newest)?;
            apply(index, &back)?;
        }
    }
    if newest > mark.newest_ms {
        let bytes = serde_json::to_vec(&Mark { newest_ms: newest }).expect("the mark serialises");
        let path = index.paths.root.join(MARK_FILE);
        crate::common::fs::write_synced(&path, &bytes).map_err(super::io_err(&path))?;
    }
    synced.photos = index.store.count();
    synced.took_ms = start.elapsed().as_secs_f64() * 1e3;
    if synced.added + synced.updated + synced.removed > 0 {
        tracing::info!(?synced, "replica brought up to date with the collection");
    }
    Ok(synced)
}

/// The changes that bring the replica's folder to the records `read` from
/// the engine (records it already has as they are are left out), counted
/// in `synced`; `newest` keeps the latest time a record was written.
fn changes_of(
    index: &Index,
    read: Vec<(u64, serde_json::Value, i64)>,
    synced: &mut Synced,
    newest: &mut i64,
) -> Result<Vec<Change>> {
    let mut changes = Vec::new();
    for (id, value, written) in read {
        *newest = (*newest).max(written);
        let record: PhotoRecord = match serde_json::from_value(value) {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(id, error = %e, "a record in the engine is unreadable; left out");
                continue;
            }
        };
        if record.id != id {
            tracing::warn!(
                id,
                record = record.id,
                "a record in the engine names another id; left out"
            );
            continue;
        }
        let old = index.store.get(id)?;
        match &old {
            Some(old) if old == &record => continue,
            Some(_) => synced.updated += 1,
            None => synced.added += 1,
        }
        changes.push(Change::Put {
            old_path: old.map(|o| o.path).filter(|p| p != &record.path),
            record,
            vector: None,
        });
    }
    Ok(changes)
}

/// Commits `changes` to the keyword index, then to the store: once the
/// store (whose count `status` reports) has a photo, browsing finds it too.
/// A hit the store does not have yet is left out of results, and a sync
/// stopped between the two reads the same records again.
fn apply(index: &Index, changes: &[Change]) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    for change in changes {
        match change {
            Change::Put { record, .. } => index.keywords.upsert(&keyword_doc(record))?,
            Change::Remove { record } => index.keywords.remove(record.id)?,
            Change::Skip { .. } | Change::Unskip { .. } => {}
        }
    }
    index.keywords.commit()?;
    index.store.commit(changes)?;
    Ok(())
}

/// How often `serve` syncs a replica.
pub const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Syncs the replica now and every [`SYNC_EVERY`] on a thread of its own,
/// for as long as the process runs (`serve`). A sync that fails (the engine is
/// down) is logged and tried again at the next turn.
pub fn keep_synced(index: std::sync::Arc<Index>) {
    std::thread::Builder::new()
        .name("clipdex-replica-sync".into())
        .spawn(move || {
            loop {
                if let Err(e) = sync(&index, false) {
                    tracing::warn!(error = %e, "the replica could not be brought up to date; trying again");
                }
                std::thread::sleep(SYNC_EVERY);
            }
        })
        .expect("spawn the replica's sync");
}
