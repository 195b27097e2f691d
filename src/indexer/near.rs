//! Each photo's near neighbours, kept with the index so that duplicate
//! groups are read, not searched for: after every indexing run the photos
//! embedded in it (and, once, every photo of an index made before the
//! lists existed) get the list of their [`NEAR_K`] nearest photos at a
//! cosine similarity of at least [`NEAR_FLOOR`], found through the graph.
//! A list is written both ways (the neighbour's list gets the photo too),
//! so an edge two lists agree on is current; a photo replaced or removed
//! loses its own list in the commit that changes it, and an edge only one
//! side still holds no longer counts. A run therefore touches only the
//! lists of what it changed.

use std::collections::{BTreeSet, HashMap};

use rayon::prelude::*;

use super::{Index, Result};
use crate::store::NearList;
use crate::vector::Vectors;

/// Most neighbours listed per photo (before the ones added back by others).
pub const NEAR_K: usize = 16;

/// The least similarity a listed neighbour has: duplicate thresholds from
/// here up are answered from the lists; lower ones search again.
pub const NEAR_FLOOR: f32 = 0.8;

/// Photos listed per stored batch.
const CHUNK: usize = 20_000;

/// The nearest photos to `id` (itself left out) at `floor` or more, nearest
/// first; empty when the photo has no vector.
pub fn neighbours(
    vectors: &Vectors,
    id: u64,
    k: usize,
    floor: f32,
) -> crate::vector::Result<NearList> {
    let Some(v) = vectors.vector(id)? else {
        return Ok(Vec::new());
    };
    Ok(near_of(id, vectors.nearest(&v, k + 1)?, k, floor))
}

/// The `k` nearest of `found` (a search by the vector of `id`) at `floor`
/// or more, `id` left out.
fn near_of(id: u64, found: Vec<(u64, f32)>, k: usize, floor: f32) -> NearList {
    found
        .into_iter()
        .filter(|&(other, s)| other != id && s >= floor)
        .take(k)
        .collect()
}

/// Adds `(id, similarity)` to a list unless it holds `id` already.
pub fn add(list: &mut NearList, id: u64, similarity: f32) {
    if !list.iter().any(|&(other, _)| other == id) {
        list.push((id, similarity));
    }
}

/// Searches one round trip of a shared engine asks for at once.
const ENGINE_BATCH: usize = 256;

impl Index {
    /// The near neighbours of each of `ids` (their vectors read from the
    /// store): in parallel from the embedded graph, in batches of
    /// [`ENGINE_BATCH`] searches a round trip from a shared engine (one
    /// round trip a photo made listing 10,000 photos take a minute).
    fn neighbours_of(&self, ids: &[u64]) -> Result<Vec<(u64, NearList)>> {
        if self.vectors().embedded().is_some() {
            return ids
                .par_iter()
                .map(|&id| Ok((id, neighbours(self.vectors(), id, NEAR_K, NEAR_FLOOR)?)))
                .collect();
        }
        let mut found = Vec::with_capacity(ids.len());
        for batch in ids.chunks(ENGINE_BATCH) {
            let mut with = Vec::with_capacity(batch.len());
            for &id in batch {
                match self.store().vector(id)? {
                    Some(v) => with.push((id, v)),
                    None => found.push((id, Vec::new())),
                }
            }
            let queries: Vec<&[f32]> = with.iter().map(|(_, v)| v.as_slice()).collect();
            let results = self.vectors().nearest_many(&queries, NEAR_K + 1)?;
            for ((id, _), result) in with.iter().zip(results) {
                found.push((*id, near_of(*id, result, NEAR_K, NEAR_FLOOR)));
            }
        }
        Ok(found)
    }

    /// Lists the near neighbours of the photos not listed yet; returns how
    /// many were listed.
    pub fn update_near(&self) -> Result<usize> {
        let pending: BTreeSet<u64> = self.store().near_pending()?;
        if pending.is_empty() {
            return Ok(0);
        }
        let pending_list: Vec<u64> = pending.iter().copied().collect();
        // Edges to photos of a later chunk, given to them when they are listed.
        let mut incoming: HashMap<u64, NearList> = HashMap::new();
        let chunks = pending_list.chunks(CHUNK).count();
        for (n, chunk) in pending_list.chunks(CHUNK).enumerate() {
            let found = self.neighbours_of(chunk)?;
            let mut lists: HashMap<u64, NearList> = found.iter().cloned().collect();
            for (id, list) in &mut lists {
                for (other, s) in incoming.remove(id).unwrap_or_default() {
                    add(list, other, s);
                }
            }
            // Each edge both ways: into this chunk's lists, the stored ones,
            // or a later chunk's.
            let mut stored: HashMap<u64, NearList> = HashMap::new();
            for (id, list) in &found {
                for &(other, s) in list {
                    if let Some(theirs) = lists.get_mut(&other) {
                        add(theirs, *id, s);
                    } else if pending.contains(&other) {
                        add(incoming.entry(other).or_default(), *id, s);
                    } else {
                        let theirs = match stored.entry(other) {
                            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                            std::collections::hash_map::Entry::Vacant(e) => {
                                match self.store().near(other)? {
                                    Some(list) => e.insert(list),
                                    None => continue,
                                }
                            }
                        };
                        add(theirs, *id, s);
                    }
                }
            }
            let mut batch: Vec<(u64, NearList)> = lists.into_iter().collect();
            batch.extend(stored);
            self.store().set_near(&batch, n + 1 == chunks)?;
        }
        Ok(pending.len())
    }
}
