//! A search as the front ends receive it, and the one place its rules are
//! applied: the query language or structured terms, the exclude text and
//! its weight, defaults, validation. The HTTP handlers and the CLI only
//! translate their inputs into a [`Request`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::fields::{self, Extracted};
use super::query::{self, MAX_QUERY_CHARS, MAX_TERMS};
use super::{
    Cutoff, Error, Filters, Query, Result, Sort, Term, TermKind, TermSpec, filter_date, parse,
};
use crate::common::time::format_datetime;

/// Results per page when a request does not say.
pub const DEFAULT_K: usize = 24;
/// Weight of the exclude text: results move away from its meaning.
pub const EXCLUDE_WEIGHT: f32 = -0.5;

/// A structured query: the query language in `q`, or a list of weighted terms.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The query language, as in `GET /api/search?q=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q: Option<String>,
    /// Weighted terms (texts, photos by id or path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terms: Option<Vec<TermSpec>>,
    /// Text whose meaning results should avoid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Filters>,
    /// Results per page (1-10,000, default 24); `offset` pages on through any number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    /// Results to skip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
    /// Minimum score: cosine similarity (-1 to 1) for CLIP models, match
    /// probability (0 to 1) for SigLIP models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_score: Option<f32>,
    /// Fuse keyword matches (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hybrid: Option<bool>,
    /// `relevance` (default), `newest` or `oldest` first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sort: Option<Sort>,
    /// Where relevant results end: `auto` (default, per query), `none`, or
    /// a score (cosine similarity; a probability for SigLIP models). Hits
    /// below it come back marked `relevant: false`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub cutoff: Option<Cutoff>,
}

impl Request {
    /// Applies every rule and gives the query to run.
    pub fn into_query(self) -> Result<Query> {
        self.into_query_with(Vec::new())
    }

    /// The same, after terms the front end brings itself (an uploaded
    /// picture's embedding); with them, `q` and `terms` may both be absent.
    pub fn into_query_with(self, mut terms: Vec<Term>) -> Result<Query> {
        let q = self
            .q
            .as_deref()
            .map(str::trim)
            .filter(|q| !q.is_empty() || terms.is_empty());
        let mut extracted = Extracted::default();
        match (q, &self.terms) {
            (Some(q), None) => {
                let chars = q.chars().count();
                if chars > MAX_QUERY_CHARS {
                    return Err(Error::BadQuery(format!(
                        "query too long ({chars} characters, at most {MAX_QUERY_CHARS})"
                    )));
                }
                extracted = fields::extract(q, crate::common::time::now_secs())?;
                // Filters alone ("July 2023", "in:holidays") list their photos by date.
                if !extracted.text.is_empty() {
                    terms.extend(parse(&extracted.text)?);
                }
            }
            (None, Some(specs)) => {
                if specs.is_empty() || specs.len() > MAX_TERMS {
                    return Err(Error::BadQuery(format!("give 1 to {MAX_TERMS} terms")));
                }
                for spec in specs {
                    terms.push(spec.to_term()?);
                }
            }
            (None, None) if !terms.is_empty() => {}
            _ => return Err(Error::BadQuery("give exactly one of q and terms".into())),
        }
        if let Some(exclude) = self
            .exclude
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            if exclude.chars().count() > MAX_QUERY_CHARS {
                return Err(Error::BadQuery("the exclude text is too long".into()));
            }
            terms.push(Term {
                kind: TermKind::Text(exclude.to_string()),
                weight: EXCLUDE_WEIGHT,
            });
        }
        let mut query = Query::new(terms);
        query.k = self.k.unwrap_or(DEFAULT_K);
        query.offset = self.offset.unwrap_or(0);
        query.min_score = self.min_score;
        query.hybrid = self.hybrid.unwrap_or(true);
        query.sort = self.sort.unwrap_or_default();
        query.cutoff = self.cutoff.unwrap_or_default();
        query.filters = merge(self.filters.unwrap_or_default(), &extracted)?;
        query.understood = extracted.understood;
        query.validate()?;
        Ok(query)
    }
}

/// The request's filters narrowed by those of the query box: dates to the
/// overlap, camera words added; a folder or types given both ways must agree.
fn merge(mut filters: Filters, typed: &Extracted) -> Result<Filters> {
    let blank = |s: &Option<String>| s.as_deref().is_none_or(|s| s.trim().is_empty());
    if let Some(from) = typed.from {
        let given = filter_date("from", &filters.from, false)?;
        filters.from = Some(format_datetime(given.map_or(from, |g| g.max(from))));
    }
    if let Some(to) = typed.to {
        let given = filter_date("to", &filters.to, true)?;
        filters.to = Some(format_datetime(given.map_or(to, |g| g.min(to))));
    }
    if let Some(folder) = &typed.folder {
        match filters
            .folder
            .as_deref()
            .map(|f| f.trim().trim_matches('/'))
        {
            Some(given) if !given.is_empty() && given != folder => {
                return Err(Error::BadQuery(format!(
                    "the query says in:{folder} and the folder filter {given}: give one"
                )));
            }
            _ => filters.folder = Some(folder.clone()),
        }
    }
    if !typed.tags.is_empty() {
        filters
            .tags
            .get_or_insert_with(Vec::new)
            .extend(typed.tags.iter().cloned());
    }
    if let Some(camera) = &typed.camera {
        filters.camera = Some(
            match filters.camera.take().filter(|c| !c.trim().is_empty()) {
                Some(given) => format!("{given} {camera}"),
                None => camera.clone(),
            },
        );
    }
    if !typed.types.is_empty() {
        let typed_filter = Filters {
            types: Some(typed.types.clone()),
            ..Default::default()
        };
        let wanted = typed_filter.formats();
        filters.types = Some(match blank(&filters.types.as_ref().map(|t| t.join(","))) {
            true => wanted,
            false => {
                let given = filters.formats();
                let both: Vec<String> = wanted.into_iter().filter(|t| given.contains(t)).collect();
                if both.is_empty() {
                    return Err(Error::BadQuery(
                        "the query's type: and the type filter have no type in common".into(),
                    ));
                }
                both
            }
        });
    }
    Ok(filters)
}

/// Checks a weight a front end parsed itself (an upload's `weight` field).
pub fn check_weight(weight: f32) -> Result<f32> {
    Ok(query::check_weight(weight)?)
}

impl Filters {
    /// Filters from flat fields, as query strings, forms and the CLI give
    /// them (`type` comma-separated).
    pub fn from_flat(
        folder: Option<String>,
        from: Option<String>,
        to: Option<String>,
        types: Option<String>,
        camera: Option<String>,
    ) -> Self {
        Filters {
            folder,
            from,
            to,
            types: types.map(|t| vec![t]),
            camera,
            tags: None,
        }
    }

    /// With the tags of a flat field (comma-separated).
    pub fn with_tags(mut self, tags: Option<String>) -> Self {
        self.tags = tags.filter(|t| !t.trim().is_empty()).map(|t| vec![t]);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_apply_once_for_every_front_end() {
        let r = Request {
            q: Some("dog".into()),
            exclude: Some(" cats ".into()),
            ..Default::default()
        };
        let q = r.into_query().unwrap();
        assert_eq!((q.k, q.offset, q.hybrid), (DEFAULT_K, 0, true));
        assert_eq!(q.terms.len(), 2);
        assert_eq!(
            q.terms[1],
            Term {
                kind: TermKind::Text("cats".into()),
                weight: EXCLUDE_WEIGHT
            }
        );
        assert!(Request::default().into_query().is_err());
        let both = Request {
            q: Some("a".into()),
            terms: Some(vec![]),
            ..Default::default()
        };
        assert!(both.into_query().is_err());
        let upload = Term {
            kind: TermKind::Vector(vec![1.0]),
            weight: 1.0,
        };
        let q = Request {
            q: Some("  ".into()),
            ..Default::default()
        }
        .into_query_with(vec![upload.clone()])
        .unwrap();
        assert_eq!(q.terms, vec![upload]);
        let bad_date = Request {
            q: Some("a".into()),
            filters: Some(Filters {
                from: Some("2019-02-30".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(matches!(bad_date.into_query(), Err(Error::BadQuery(_))));
    }
}
