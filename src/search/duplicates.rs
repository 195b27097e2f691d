//! Groups of photos that are the same picture (resized, re-encoded, cropped
//! a little, edited) or a burst of near-identical shots. Two photos are
//! linked when their embeddings' cosine similarity is at least the
//! threshold; a group starts from the most similar pair not yet grouped, and
//! a photo joins it only when it is that similar to the group's first photo
//! (so groups do not chain through a library of similar pictures).
//! Identical files have identical embeddings, so they always group.
//!
//! The links come from the lists the indexer keeps (`indexer::near`): a
//! threshold at or above their floor is answered by reading them; a lower
//! one searches the graph again for every photo (slower: seconds per
//! 10,000 photos). Nothing is ever deleted or moved.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Engine, Error, Photo, Result};
use crate::indexer::near::{self, NEAR_FLOOR, NEAR_K};
use crate::store::PhotoRecord;

/// The threshold when none is given: cosine similarity of two photos'
/// embeddings, chosen on the shared photos (BENCHMARKS.md, "Duplicate
/// groups").
pub const DEFAULT_THRESHOLD: f32 = 0.9;

/// Most groups one page may ask for.
pub const MAX_GROUPS: usize = 1000;

/// One photo of a group.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct GroupPhoto {
    #[serde(flatten)]
    pub photo: Photo,
    /// The likely original: the most pixels, then the largest file, then
    /// the oldest.
    pub likely_original: bool,
}

/// Photos that are the same picture or near-identical shots.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Group {
    /// The likely original first, then by path.
    pub photos: Vec<GroupPhoto>,
    /// The least similarity of a photo of the group to the group's first
    /// (the pair that started it was the closest).
    pub similarity: f32,
}

/// A page of duplicate groups.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Duplicates {
    pub threshold: f32,
    /// The largest groups first, then the closest.
    pub groups: Vec<Group>,
    /// Groups in all, and the photos in them.
    pub total_groups: usize,
    pub total_photos: usize,
    pub offset: usize,
    pub more: bool,
    /// Photos indexed since the neighbour lists were last updated: not in
    /// any group yet (the end of an indexing run lists them).
    pub pending: usize,
    pub took_ms: f64,
}

/// The groups last computed, for the pages after the first.
pub(crate) struct GroupCache {
    threshold: u32,
    version: u64,
    groups: Arc<Vec<(Vec<u64>, f32)>>,
    pending: usize,
}

/// Near-neighbour lists by position: `ids` ascending, `lists[i]` the
/// neighbours of `ids[i]`. Positions (`u32`) stand for photos in the
/// grouping, so a million photos need no hash map.
struct Lists {
    ids: Vec<u64>,
    lists: Vec<crate::store::NearList>,
    /// Each id's position, by id, when the ids are dense enough (a store's
    /// ids are handed out in order): one read instead of a binary search's
    /// twenty cache misses, which took most of the time at a million.
    by_id: Vec<u32>,
}

impl Lists {
    fn new(ids: Vec<u64>, lists: Vec<crate::store::NearList>) -> Self {
        let max = ids.last().copied().unwrap_or(0);
        let by_id = if max < 4 * ids.len() as u64 + 1024 {
            let mut by_id = vec![u32::MAX; max as usize + 1];
            for (p, &id) in ids.iter().enumerate() {
                by_id[id as usize] = p as u32;
            }
            by_id
        } else {
            Vec::new()
        };
        Self { ids, lists, by_id }
    }

    fn position(&self, id: u64) -> Option<u32> {
        if !self.by_id.is_empty() {
            return self
                .by_id
                .get(id as usize)
                .copied()
                .filter(|&p| p != u32::MAX);
        }
        self.ids.binary_search(&id).ok().map(|p| p as u32)
    }

    /// The similarity of two photos when one's list holds the other.
    fn listed(&self, a: u32, b: u32) -> Option<f32> {
        let (ia, ib) = (self.ids[a as usize], self.ids[b as usize]);
        let find = |list: &crate::store::NearList, id: u64| {
            list.iter().find(|&&(x, _)| x == id).map(|&(_, s)| s)
        };
        find(&self.lists[a as usize], ib).or_else(|| find(&self.lists[b as usize], ia))
    }

    /// The edges at `threshold` or above that both lists hold (one side
    /// alone is a list made before the other photo changed), as positions.
    fn mutual_edges(&self, threshold: f32) -> Vec<(u32, u32, f32)> {
        let mut edges = Vec::new();
        for (pa, list) in self.lists.iter().enumerate() {
            let a = self.ids[pa];
            for &(b, s) in list {
                if a >= b || s < threshold {
                    continue;
                }
                let Some(pb) = self.position(b) else {
                    continue;
                };
                if self.lists[pb as usize].iter().any(|&(x, _)| x == a) {
                    edges.push((pa as u32, pb, s));
                }
            }
        }
        edges
    }
}

/// Groups built around a first photo: the closest pair not yet grouped
/// starts a group, and a photo joins a group only when it is at least the
/// threshold similar to that group's first photo. Linking every pair above
/// the threshold instead (connected components) chains: on the million
/// benchmark photos (dense, augmented Fashion-MNIST) it made one group of
/// 925,590 photos at 0.97. Photos are positions `0..n`; `similarity` gives
/// a pair's similarity when it is not an edge.
fn centred(
    n: usize,
    threshold: f32,
    mut edges: Vec<(u32, u32, f32)>,
    similarity: impl Fn(u32, u32) -> Option<f32>,
) -> Vec<(Vec<u32>, f32)> {
    const NONE: u32 = u32::MAX;
    edges.retain(|&(a, b, s)| a != b && s >= threshold);
    for e in &mut edges {
        if e.0 > e.1 {
            std::mem::swap(&mut e.0, &mut e.1);
        }
    }
    // Closest first (similarities are in [-1, 1]: their bits order them
    // once negated ones are left out by the threshold, which is >= 0).
    edges.sort_unstable_by_key(|&(a, b, s)| (std::cmp::Reverse((s + 0.0).to_bits()), a, b));
    edges.dedup_by(|x, y| (x.0, x.1) == (y.0, y.1));
    let mut group_of = vec![NONE; n];
    // (first photo, members, least similarity of a member to the first).
    let mut groups: Vec<(u32, Vec<u32>, f32)> = Vec::new();
    for &(a, b, s) in &edges {
        let (ga, gb) = (group_of[a as usize], group_of[b as usize]);
        let (g, id) = match (ga, gb) {
            (NONE, NONE) => {
                group_of[a as usize] = groups.len() as u32;
                group_of[b as usize] = groups.len() as u32;
                groups.push((a, vec![a, b], s));
                continue;
            }
            (g, NONE) => (g, b),
            (NONE, g) => (g, a),
            _ => continue,
        };
        let first = groups[g as usize].0;
        // This edge when it is the one to the first photo, else the pair's.
        let to_first = if first == a || first == b {
            Some(s)
        } else {
            similarity(first, id)
        };
        if let Some(t) = to_first.filter(|&t| t >= threshold) {
            group_of[id as usize] = g;
            let group = &mut groups[g as usize];
            group.1.push(id);
            group.2 = group.2.min(t);
        }
    }
    groups
        .into_iter()
        .map(|(_, mut ids, least)| {
            ids.sort_unstable();
            (ids, least)
        })
        .collect()
}

/// Which of two records is more likely the original: more pixels, then a
/// larger file, then taken (or modified) earlier, then the lower id.
fn more_original(a: &PhotoRecord, b: &PhotoRecord) -> std::cmp::Ordering {
    let pixels = |r: &PhotoRecord| r.width as u64 * r.height as u64;
    // Nanoseconds: the date taken, else the file's modification time.
    let when = |r: &PhotoRecord| {
        r.taken
            .as_deref()
            .and_then(crate::keyword::parse_datetime)
            .map_or(r.sig.mtime_ns as i128, |s| s as i128 * 1_000_000_000)
    };
    pixels(b)
        .cmp(&pixels(a))
        .then(b.sig.size.cmp(&a.sig.size))
        .then(when(a).cmp(&when(b)))
        .then(a.id.cmp(&b.id))
}

/// Checks a threshold a front end was given.
pub fn check_threshold(threshold: f32) -> Result<f32> {
    if threshold.is_finite() && (0.0..=1.0).contains(&threshold) {
        Ok(threshold)
    } else {
        Err(Error::BadQuery(format!(
            "the duplicate threshold must be a number from 0 to 1 (cosine similarity; default {DEFAULT_THRESHOLD})"
        )))
    }
}

impl Engine {
    /// The duplicate groups at `threshold` (default [`DEFAULT_THRESHOLD`]),
    /// `k` groups from `offset`.
    pub fn duplicates(
        &self,
        threshold: Option<f32>,
        offset: usize,
        k: usize,
    ) -> Result<Duplicates> {
        let start = Instant::now();
        let threshold = check_threshold(threshold.unwrap_or(DEFAULT_THRESHOLD))?;
        if k == 0 || k > MAX_GROUPS {
            return Err(Error::BadQuery(format!(
                "k must be between 1 and {MAX_GROUPS}"
            )));
        }
        let (found, pending) = self.groups_at(threshold)?;
        let store = self.index().store();
        let total_groups = found.len();
        let total_photos = found.iter().map(|(g, _)| g.len()).sum();
        let more = offset.saturating_add(k) < total_groups;
        let mut groups = Vec::with_capacity(k.min(total_groups));
        for (ids, similarity) in found.iter().skip(offset).take(k) {
            let similarity = *similarity;
            let mut records = Vec::with_capacity(ids.len());
            for &id in ids {
                // A photo removed since the lists were read is left out.
                if let Some(r) = store.get(id)? {
                    records.push(r);
                }
            }
            let Some(original) = records
                .iter()
                .min_by(|a, b| more_original(a, b))
                .map(|r| r.id)
            else {
                continue;
            };
            records.sort_by(|a, b| {
                (b.id == original)
                    .cmp(&(a.id == original))
                    .then(a.path.cmp(&b.path))
            });
            groups.push(Group {
                photos: records
                    .iter()
                    .map(|r| GroupPhoto {
                        photo: Photo::from_record(r),
                        likely_original: r.id == original,
                    })
                    .collect(),
                similarity,
            });
        }
        Ok(Duplicates {
            threshold,
            groups,
            total_groups,
            total_photos,
            offset,
            more,
            pending,
            took_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Every group at `threshold`, ordered (the largest, then the closest,
    /// then by first id), and the photos not listed yet; computed once per
    /// threshold and state of the store, so paging through them is cheap.
    fn groups_at(&self, threshold: f32) -> Result<(Arc<Vec<(Vec<u64>, f32)>>, usize)> {
        let start = Instant::now();
        let index = self.index();
        let store = index.store();
        let version = store.version();
        {
            let cache = self
                .duplicate_cache
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.as_ref() {
                if c.threshold == threshold.to_bits() && c.version == version {
                    return Ok((c.groups.clone(), c.pending));
                }
            }
        }
        let (lists, pending) = if threshold >= NEAR_FLOOR {
            let mut ids = Vec::new();
            let mut lists = Vec::new();
            for entry in store.near_lists() {
                let (id, list) = entry?;
                ids.push(id);
                lists.push(list);
            }
            (Lists::new(ids, lists), store.near_pending()?.len())
        } else {
            // Below the lists' floor: search again, every photo, and write
            // each edge both ways as the indexer does.
            use rayon::prelude::*;
            let ids: Vec<u64> = index.vectors().ids()?.into_iter().collect();
            let lists = ids
                .par_iter()
                .map(|&id| near::neighbours(index.vectors(), id, NEAR_K, threshold))
                .collect::<crate::vector::Result<Vec<_>>>()?;
            let mut found = Lists::new(ids, lists);
            let back: Vec<(u32, u64, f32)> = found
                .lists
                .iter()
                .enumerate()
                .flat_map(|(pa, list)| list.iter().map(move |&(b, s)| (pa, b, s)))
                .filter_map(|(pa, b, s)| Some((found.position(b)?, found.ids[pa], s)))
                .collect();
            for (pb, a, s) in back {
                near::add(&mut found.lists[pb as usize], a, s);
            }
            (found, 0)
        };
        let read = start.elapsed();
        let vectors = index.vectors();
        let similarity = |a: u32, b: u32| {
            lists.listed(a, b).or_else(|| {
                let (a, b) = (lists.ids[a as usize], lists.ids[b as usize]);
                let (a, b) = (vectors.vector(a).ok()??, vectors.vector(b).ok()??);
                Some(super::dot(&a, &b))
            })
        };
        let edges = lists.mutual_edges(threshold);
        let linked = start.elapsed();
        let mut found: Vec<(Vec<u64>, f32)> =
            centred(lists.ids.len(), threshold, edges, similarity)
                .into_iter()
                .map(|(members, least)| {
                    (
                        members.into_iter().map(|p| lists.ids[p as usize]).collect(),
                        least,
                    )
                })
                .collect();
        // Ordered by their ids alone: only the page's records are read.
        found.sort_by(|(a, sa), (b, sb)| {
            b.len()
                .cmp(&a.len())
                .then(sb.total_cmp(sa))
                .then(a[0].cmp(&b[0]))
        });
        tracing::debug!(
            ?read,
            ?linked,
            grouped = ?start.elapsed(),
            groups = found.len(),
            "duplicate groups"
        );
        let groups = Arc::new(found);
        *self
            .duplicate_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(GroupCache {
            threshold: threshold.to_bits(),
            version,
            groups: groups.clone(),
            pending,
        });
        Ok((groups, pending))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_grow_around_their_first_photo_and_do_not_chain() {
        // 1-2 closest: they start a group; 3 is close to 2 but not to 1.
        let edges = vec![
            (1, 2, 0.99),
            (2, 3, 0.97),
            (1, 3, 0.90),
            (7, 8, 0.97),
            (8, 9, 0.96),
        ];
        let known = |a: u32, b: u32| match (a.min(b), a.max(b)) {
            (1, 3) => Some(0.90),
            (7, 9) => Some(0.985),
            _ => None,
        };
        let mut found = centred(10, 0.95, edges.clone(), known);
        found.sort_by_key(|(ids, _)| ids[0]);
        assert_eq!(found, vec![(vec![1, 2], 0.99), (vec![7, 8, 9], 0.97)]);
        // Lower, 3 is close enough to 1.
        let found = centred(4, 0.9, edges[..3].to_vec(), known);
        assert_eq!(found, vec![(vec![1, 2, 3], 0.90)]);
    }

    #[test]
    fn lists_count_an_edge_when_both_sides_hold_it() {
        let lists = Lists::new(
            vec![10, 20, 30],
            vec![vec![(20, 0.99), (30, 0.95)], vec![(10, 0.99)], vec![]],
        );
        // 10-30 is in 10's list only: stale.
        assert_eq!(lists.mutual_edges(0.9), vec![(0, 1, 0.99)]);
        assert_eq!(lists.listed(2, 0), Some(0.95));
        assert_eq!(lists.position(25), None);
        // Sparse ids: by binary search, the same answers.
        let sparse = Lists::new(
            vec![10, 1 << 40],
            vec![vec![(1 << 40, 0.97)], vec![(10, 0.97)]],
        );
        assert_eq!(sparse.mutual_edges(0.9), vec![(0, 1, 0.97)]);
        assert_eq!(sparse.position(1 << 40), Some(1));
    }

    #[test]
    fn thresholds_are_between_zero_and_one() {
        for ok in [0.0, 0.5, 1.0] {
            assert!(check_threshold(ok).is_ok());
        }
        for bad in [-0.1, 1.01, f32::NAN, f32::INFINITY] {
            assert!(check_threshold(bad).is_err(), "{bad}");
        }
    }
}
