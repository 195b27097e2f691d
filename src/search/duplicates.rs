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

use std::collections::HashMap;
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

/// Groups built around a first photo: the closest pair not yet grouped
/// starts a group, and a photo joins a group only when it is at least the
/// threshold similar to that group's first photo. Linking every pair above
/// the threshold instead (connected components) chains: on the million
/// benchmark photos (dense, augmented Fashion-MNIST) it made one group of
/// 925,590 photos at 0.97.
struct Centred<'a> {
    threshold: f32,
    /// The similarity of a pair, when known from the edges.
    pairs: HashMap<(u64, u64), f32>,
    /// A pair's similarity otherwise (from the vectors).
    similarity: Box<dyn Fn(u64, u64) -> Option<f32> + 'a>,
    group_of: HashMap<u64, usize>,
    /// (first photo, members, least similarity of a member to the first).
    groups: Vec<(u64, Vec<u64>, f32)>,
}

impl<'a> Centred<'a> {
    fn new(threshold: f32, similarity: impl Fn(u64, u64) -> Option<f32> + 'a) -> Self {
        Self {
            threshold,
            pairs: HashMap::new(),
            similarity: Box::new(similarity),
            group_of: HashMap::new(),
            groups: Vec::new(),
        }
    }

    /// Groups the edges `(a, b, similarity)` at or above the threshold.
    fn build(mut self, mut edges: Vec<(u64, u64, f32)>) -> Vec<(Vec<u64>, f32)> {
        edges.retain(|&(a, b, s)| a != b && s >= self.threshold);
        for e in &mut edges {
            if e.0 > e.1 {
                std::mem::swap(&mut e.0, &mut e.1);
            }
        }
        edges.sort_by(|x, y| y.2.total_cmp(&x.2).then((x.0, x.1).cmp(&(y.0, y.1))));
        edges.dedup_by(|x, y| (x.0, x.1) == (y.0, y.1));
        self.pairs = edges.iter().map(|&(a, b, s)| ((a, b), s)).collect();
        for &(a, b, s) in &edges {
            match (
                self.group_of.get(&a).copied(),
                self.group_of.get(&b).copied(),
            ) {
                (None, None) => {
                    self.group_of.insert(a, self.groups.len());
                    self.group_of.insert(b, self.groups.len());
                    self.groups.push((a, vec![a, b], s));
                }
                (Some(g), None) => self.join(g, b),
                (None, Some(g)) => self.join(g, a),
                (Some(_), Some(_)) => {}
            }
        }
        self.groups
            .into_iter()
            .map(|(_, mut ids, least)| {
                ids.sort_unstable();
                (ids, least)
            })
            .collect()
    }

    fn join(&mut self, g: usize, id: u64) {
        let first = self.groups[g].0;
        let pair = (first.min(id), first.max(id));
        let Some(s) = self
            .pairs
            .get(&pair)
            .copied()
            .or_else(|| (self.similarity)(first, id))
        else {
            return;
        };
        if s >= self.threshold {
            self.group_of.insert(id, g);
            let group = &mut self.groups[g];
            group.1.push(id);
            group.2 = group.2.min(s);
        }
    }
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
        let mut page = Vec::with_capacity(k.min(total_groups));
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
            page.push(Group {
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
        let groups = page;
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
        let mut edges: Vec<(u64, u64, f32)> = Vec::new();
        let pending;
        if threshold >= NEAR_FLOOR {
            // An edge counts when both lists hold it: one side alone is a
            // list made before the other photo changed.
            let lists: HashMap<u64, Vec<(u64, f32)>> =
                store.near_lists().collect::<crate::store::Result<_>>()?;
            for (&a, list) in &lists {
                for &(b, s) in list {
                    let mutual = || {
                        lists
                            .get(&b)
                            .is_some_and(|l| l.iter().any(|&(x, _)| x == a))
                    };
                    if a < b && s >= threshold && mutual() {
                        edges.push((a, b, s));
                    }
                }
            }
            pending = store.near_pending()?.len();
        } else {
            // Below the lists' floor: search again, every photo.
            use rayon::prelude::*;
            let ids: Vec<u64> = index.vectors().ids().into_iter().collect();
            let found = ids
                .par_iter()
                .map(|&id| {
                    near::neighbours(index.vectors(), id, NEAR_K, threshold).map(|l| (id, l))
                })
                .collect::<crate::vector::Result<Vec<_>>>()?;
            for (a, list) in found {
                edges.extend(list.into_iter().map(|(b, s)| (a, b, s)));
            }
            pending = 0;
        }
        let vectors = index.vectors();
        let similarity =
            |a: u64, b: u64| Some(super::dot(&vectors.vector(a)?, &vectors.vector(b)?));
        let found = Centred::new(threshold, similarity).build(edges);
        // Ordered by their ids alone: only the page's records are read.
        let mut found = found;
        found.sort_by(|(a, sa), (b, sb)| {
            b.len()
                .cmp(&a.len())
                .then(sb.total_cmp(sa))
                .then(a[0].cmp(&b[0]))
        });
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
        let known = |a: u64, b: u64| match (a.min(b), a.max(b)) {
            (7, 9) => Some(0.985),
            _ => None,
        };
        let mut found = Centred::new(0.95, known).build(edges);
        found.sort_by_key(|(ids, _)| ids[0]);
        assert_eq!(found, vec![(vec![1, 2], 0.99), (vec![7, 8, 9], 0.97)]);
        // Lower, 3 is close enough to 1.
        let edges = vec![(1, 2, 0.99), (2, 3, 0.97), (1, 3, 0.90)];
        let found = Centred::new(0.9, |_, _| None).build(edges);
        assert_eq!(found, vec![(vec![1, 2, 3], 0.90)]);
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
