//! The tag list: every automatic tag photos have, with how many have it
//! and a cover photo each (the photo closest to the tag's text), as the
//! page's tag view and `clipdex tags` show it. Tags themselves are made by
//! the indexer (`indexer::tags`); a search filters on them with `tag:` and
//! finds their words through the keyword index.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Engine, Photo, Result};
use crate::indexer::tags::{Tagger, Tagging};
use crate::keyword;
use crate::vector::distance::dot;

/// One tag of the list.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TagSummary {
    pub name: String,
    /// Photos with the tag.
    pub count: u64,
    /// The photo with the tag closest to the tag's text.
    pub cover: Option<Photo>,
}

/// The index's tags and the vocabulary they come from.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TagList {
    /// Whether the index tags its photos at all.
    pub enabled: bool,
    /// `built-in` or the vocabulary file's path, as given.
    pub vocabulary: Option<String>,
    /// Tags the vocabulary lists.
    pub vocabulary_size: usize,
    /// The probability a tag needs.
    pub threshold: Option<f32>,
    /// The most common first, then by name.
    pub tags: Vec<TagSummary>,
    pub took_ms: f64,
}

/// The list as last computed, and the store version it was computed at.
pub(super) struct TagCache {
    version: u64,
    list: Arc<TagList>,
}

impl Engine {
    /// Every tag photos have now; computed once per state of the store.
    pub fn tags(&self) -> Result<TagList> {
        let start = Instant::now();
        let index = self.index();
        let version = index.store().version();
        {
            let cache = self.tag_cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(c) = cache.as_ref().filter(|c| c.version == version) {
                return Ok(TagList {
                    took_ms: start.elapsed().as_secs_f64() * 1e3,
                    ..(*c.list).clone()
                });
            }
        }
        let tagger = index.tagger(self.clip(), &Tagging::Keep)?;
        let keywords = index.keywords();
        let mut tags = Vec::new();
        for (name, count) in keywords.tag_counts()? {
            let ids = keywords.matching(&keyword::Filter {
                tags: vec![name.clone()],
                ..Default::default()
            })?;
            let cover = self.cover(tagger.as_ref(), &name, ids.into_iter())?;
            tags.push(TagSummary { name, count, cover });
        }
        tags.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.name.cmp(&b.name)));
        let setup = tagger.as_ref().map(Tagger::setup);
        let list = TagList {
            enabled: tagger.is_some(),
            vocabulary: setup.map(|s| s.source.clone()),
            vocabulary_size: tagger.as_ref().map_or(0, |t| t.names().len()),
            threshold: setup.map(|s| s.threshold),
            tags,
            took_ms: start.elapsed().as_secs_f64() * 1e3,
        };
        *self.tag_cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(TagCache {
            version,
            list: Arc::new(list.clone()),
        });
        Ok(list)
    }

    /// The photo among `ids` closest to the tag's text (the lowest id when
    /// the vocabulary no longer has the tag).
    fn cover(
        &self,
        tagger: Option<&Tagger>,
        name: &str,
        ids: impl Iterator<Item = u64>,
    ) -> Result<Option<Photo>> {
        let vectors = self.index().vectors();
        let text = tagger.and_then(|t| t.vector(name));
        let best = ids
            .map(|id| {
                let score = match (text, vectors.vector(id).ok().flatten()) {
                    (Some(t), Some(v)) => dot(t, &v),
                    _ => f32::NEG_INFINITY,
                };
                (id, score)
            })
            .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
        Ok(match best {
            Some((id, _)) => self
                .index()
                .store()
                .get(id)?
                .map(|r| Photo::from_record(&r)),
            None => None,
        })
    }
}
