//! The keyword index (tantivy): one document per photo with its path
//! segments, file name, caption, camera and date, keyed by photo id. It is the
//! basis of keyword search and filters; like the vector index, it is derived
//! from the store and reconciled with it on open.

use std::collections::BTreeSet;
use std::path::Path;

use tantivy::schema::{
    FAST, Field, INDEXED, IndexRecordOption, STORED, STRING, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, Term, doc};

use std::collections::HashSet;
use std::ops::Bound;

use tantivy::collector::{DocSetCollector, TopDocs};
use tantivy::query::{BooleanQuery, Occur, Query, QueryParser, RangeQuery, TermQuery};

pub use crate::common::time::{MAX_YEAR, MIN_YEAR, parse_datetime};

/// What the keyword index holds of one photo.
#[derive(Clone, Debug)]
pub struct Doc<'a> {
    pub id: u64,
    /// Path relative to the library, `/`-separated.
    pub path: &'a str,
    /// Image format, lower case.
    pub format: &'a str,
    pub caption: Option<&'a str>,
    pub camera: Option<String>,
    /// `YYYY-MM-DDTHH:MM:SS`.
    pub taken: Option<&'a str>,
    /// Automatic tags (normalised names).
    pub tags: Vec<&'a str>,
}

/// Which photos to select; every part given must hold.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// The folder, or below it.
    pub folder: Option<String>,
    /// Taken at or after, seconds since the epoch.
    pub from: Option<i64>,
    /// Taken at or before.
    pub to: Option<i64>,
    /// Any of these formats (lower case, `jpeg` not `jpg`).
    pub formats: Vec<String>,
    /// Every word of it in the camera's make or model.
    pub camera: Option<String>,
    /// Every one of these tags (normalised names).
    pub tags: Vec<String>,
}

/// Memory for the writer's in-flight segment.
const WRITER_MEMORY: usize = 32 << 20;

/// Version of the schema and analysis below. The keyword index is derived
/// from the store: one of another version is dropped and rebuilt on open.
pub const SCHEMA_VERSION: u32 = 3;
const SCHEMA_FILE: &str = "clipdex-schema";

/// Words for the keyword index: letters and digits, split where one turns
/// into the other (`IMG_2041` -> `IMG 2041`, `fish23` -> `fish 23`).
pub fn words(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut prev: Option<char> = None;
    for c in text.chars() {
        if c.is_alphanumeric() {
            if let Some(p) = prev {
                if p.is_alphanumeric() && (p.is_numeric() != c.is_numeric()) {
                    out.push(' ');
                }
            }
            out.push(c);
            prev = Some(c);
        } else {
            if prev.is_some_and(|p| p != ' ') {
                out.push(' ');
            }
            prev = Some(' ');
        }
    }
    out.trim().to_string()
}

/// The terms the keyword index holds of a camera's make and model (its
/// `en_stem` analysis), for engines that evaluate the camera filter
/// themselves.
pub fn camera_terms(camera: &str) -> Vec<String> {
    let mut analyzer = tantivy::tokenizer::TokenizerManager::default()
        .get("en_stem")
        .expect("tantivy registers en_stem");
    let mut stream = analyzer.token_stream(camera);
    let mut terms = Vec::new();
    while let Some(token) = stream.next() {
        terms.push(token.text.clone());
    }
    terms
}

/// The terms a camera filter requires, every one, as
/// [`KeywordIndex::matching`] reads it.
pub fn camera_filter_terms(text: &str) -> Vec<String> {
    camera_terms(&words(text))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("keyword index: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    #[error("keyword index at {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("keyword index was opened read-only")]
    ReadOnly,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The schema's fields.
#[derive(Clone, Copy, Debug)]
struct Fields {
    pub id: Field,
    /// Every folder name and the file name, as words.
    pub path: Field,
    /// The file name, as words.
    pub name: Field,
    /// The folder, untokenised, for prefix filters (`""` at the root).
    pub folder: Field,
    pub caption: Field,
    pub camera: Field,
    pub taken: Field,
    pub format: Field,
    /// Each tag whole, for filters and the tag list.
    pub tag: Field,
    /// The tags as words, for keyword search.
    pub tag_words: Field,
}

fn schema() -> (Schema, Fields) {
    // English stemming, so "fishes" finds "fish" and "running" finds "run".
    let stemmed = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default()
            .set_tokenizer("en_stem")
            .set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let mut b = Schema::builder();
    let fields = Fields {
        id: b.add_u64_field("id", INDEXED | STORED | FAST),
        path: b.add_text_field("path", stemmed.clone()),
        name: b.add_text_field("name", stemmed.clone()),
        folder: b.add_text_field("folder", STRING | FAST),
        caption: b.add_text_field("caption", stemmed.clone()),
        camera: b.add_text_field("camera", stemmed.clone()),
        taken: b.add_date_field("taken", INDEXED | FAST),
        format: b.add_text_field("format", STRING | FAST),
        tag: b.add_text_field("tag", STRING),
        tag_words: b.add_text_field("tag_words", stemmed),
    };
    (b.build(), fields)
}

/// The keyword index of one photo index.
pub struct KeywordIndex {
    index: Index,
    reader: IndexReader,
    writer: Option<std::sync::Mutex<IndexWriter>>,
    fields: Fields,
}

impl KeywordIndex {
    /// Opens or creates the index in `dir`; `writable` takes tantivy's writer lock.
    pub fn open(dir: &Path, writable: bool) -> Result<Self> {
        let io = |source| Error::Io {
            path: dir.display().to_string(),
            source,
        };
        let version_file = dir.join(SCHEMA_FILE);
        let version = std::fs::read_to_string(&version_file)
            .ok()
            .and_then(|v| v.trim().parse::<u32>().ok());
        if dir.join("meta.json").exists() && version != Some(SCHEMA_VERSION) {
            tracing::info!(
                ?version,
                "keyword index has another schema; rebuilding it from the store"
            );
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        if version != Some(SCHEMA_VERSION) {
            std::fs::write(&version_file, SCHEMA_VERSION.to_string()).map_err(io)?;
        }
        let (schema, fields) = schema();
        let directory = tantivy::directory::MmapDirectory::open(dir)
            .map_err(|e| Error::Tantivy(tantivy::TantivyError::from(e)))?;
        let index = Index::open_or_create(directory, schema)?;
        let writer = if writable {
            Some(std::sync::Mutex::new(
                index.writer_with_num_threads(1, WRITER_MEMORY)?,
            ))
        } else {
            None
        };
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(Self {
            index,
            reader,
            writer,
            fields,
        })
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, IndexWriter>> {
        let writer = self.writer.as_ref().ok_or(Error::ReadOnly)?;
        Ok(writer.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Adds or replaces the document of a photo (applied at the next commit).
    pub fn upsert(&self, photo: &Doc) -> Result<()> {
        let f = &self.fields;
        let writer = self.writer()?;
        writer.delete_term(Term::from_field_u64(f.id, photo.id));
        // As people see it: a byte of a name that is not UTF-8 is U+FFFD.
        let path = crate::common::rel_path::display(photo.path);
        let (folder, name) = crate::common::rel_path::split_folder(&path);
        let mut d = doc!(
            f.id => photo.id,
            f.path => words(&path),
            f.name => words(name),
            f.folder => folder,
            f.format => photo.format.to_string(),
        );
        if let Some(caption) = photo.caption {
            d.add_text(f.caption, caption);
        }
        if let Some(camera) = &photo.camera {
            d.add_text(f.camera, camera);
        }
        if let Some(secs) = photo.taken.and_then(parse_datetime) {
            d.add_date(f.taken, tantivy::DateTime::from_timestamp_secs(secs));
        }
        for tag in &photo.tags {
            d.add_text(f.tag, tag);
            d.add_text(f.tag_words, tag);
        }
        writer.add_document(d)?;
        Ok(())
    }

    /// The ids of the photos a filter selects.
    pub fn matching(&self, filter: &Filter) -> Result<HashSet<u64>> {
        let mut ids = HashSet::new();
        self.each_match(filter, false, |id, _| {
            ids.insert(id);
        })?;
        Ok(ids)
    }

    /// The photos a filter selects, each with its date taken (seconds
    /// since the epoch), in no particular order.
    pub fn matching_dated(&self, filter: &Filter) -> Result<Vec<(u64, Option<i64>)>> {
        let mut found = Vec::new();
        self.each_match(filter, true, |id, taken| found.push((id, taken)))?;
        Ok(found)
    }

    /// Each photo the filter selects, with its date when `dated`.
    fn each_match(
        &self,
        filter: &Filter,
        dated: bool,
        mut each: impl FnMut(u64, Option<i64>),
    ) -> Result<()> {
        let Some(query) = self.filter_query(filter) else {
            return Ok(());
        };
        let searcher = self.reader.searcher();
        let mut docs: Vec<tantivy::DocAddress> = searcher
            .search(&*query, &DocSetCollector)?
            .into_iter()
            .collect();
        docs.sort_unstable();
        let mut segment = None;
        for doc in docs {
            if segment
                .as_ref()
                .is_none_or(|(ord, _, _)| *ord != doc.segment_ord)
            {
                let fast = searcher.segment_reader(doc.segment_ord).fast_fields();
                let taken = match dated {
                    true => Some(fast.date("taken")?),
                    false => None,
                };
                segment = Some((doc.segment_ord, fast.u64("id")?, taken));
            }
            let (_, ids, taken) = segment.as_ref().expect("set above");
            if let Some(id) = ids.first(doc.doc_id) {
                let date = taken
                    .as_ref()
                    .and_then(|t| t.first(doc.doc_id))
                    .map(|d| d.into_timestamp_secs());
                each(id, date);
            }
        }
        Ok(())
    }

    /// A filter as one tantivy query; `None` when it can match nothing.
    fn filter_query(&self, f: &Filter) -> Option<Box<dyn Query>> {
        let fields = &self.fields;
        let mut must: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        if let Some(folder) = f
            .folder
            .as_deref()
            .map(|s| s.trim().trim_matches('/'))
            .filter(|s| !s.is_empty())
        {
            let exact = TermQuery::new(
                Term::from_field_text(fields.folder, folder),
                IndexRecordOption::Basic,
            );
            // Below the folder: every string from "folder/" up to, not
            // including, "folder0" ('0' follows '/'), which is exactly the
            // strings starting with "folder/". A range costs the same at any
            // length (a regex grew with the name past its size limit).
            let below = RangeQuery::new(
                Bound::Included(Term::from_field_text(fields.folder, &format!("{folder}/"))),
                Bound::Excluded(Term::from_field_text(fields.folder, &format!("{folder}0"))),
            );
            must.push((
                Occur::Must,
                Box::new(BooleanQuery::new(vec![
                    (Occur::Should, Box::new(exact)),
                    (Occur::Should, Box::new(below)),
                ])),
            ));
        }
        if let (Some(a), Some(b)) = (f.from, f.to) {
            if a > b {
                return None;
            }
        }
        if f.from.is_some() || f.to.is_some() {
            let term = |secs: i64| {
                Term::from_field_date_for_search(
                    fields.taken,
                    tantivy::DateTime::from_timestamp_secs(secs),
                )
            };
            let lower = f
                .from
                .map_or(Bound::Unbounded, |s| Bound::Included(term(s)));
            let upper = f.to.map_or(Bound::Unbounded, |s| Bound::Included(term(s)));
            must.push((Occur::Must, Box::new(RangeQuery::new(lower, upper))));
        }
        if !f.formats.is_empty() {
            let any: Vec<(Occur, Box<dyn Query>)> = f
                .formats
                .iter()
                .map(|t| {
                    let q: Box<dyn Query> = Box::new(TermQuery::new(
                        Term::from_field_text(fields.format, t),
                        IndexRecordOption::Basic,
                    ));
                    (Occur::Should, q)
                })
                .collect();
            must.push((Occur::Must, Box::new(BooleanQuery::new(any))));
        }
        for tag in &f.tags {
            must.push((
                Occur::Must,
                Box::new(TermQuery::new(
                    Term::from_field_text(fields.tag, tag),
                    IndexRecordOption::Basic,
                )),
            ));
        }
        if let Some(camera) = f.camera.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            let mut parser = QueryParser::for_index(&self.index, vec![fields.camera]);
            parser.set_conjunction_by_default();
            let (q, _) = parser.parse_query_lenient(&words(camera));
            must.push((Occur::Must, q));
        }
        Some(Box::new(BooleanQuery::new(must)))
    }

    /// Photos whose name, path, caption, camera or tags hold every word of
    /// `text`, best first (file name and caption weigh more), among `allowed`.
    pub fn search_words(
        &self,
        text: &str,
        allowed: Option<&HashSet<u64>>,
        n: usize,
    ) -> Result<Vec<u64>> {
        let words = words(text);
        if words.trim().is_empty() {
            return Ok(Vec::new());
        }
        let f = &self.fields;
        let mut parser = QueryParser::for_index(
            &self.index,
            vec![f.name, f.path, f.caption, f.camera, f.tag_words],
        );
        parser.set_conjunction_by_default();
        parser.set_field_boost(f.name, 2.0);
        parser.set_field_boost(f.caption, 1.5);
        let (query, _) = parser.parse_query_lenient(&words);
        let searcher = self.reader.searcher();
        // Over-fetch when a filter will drop some; never more than there are.
        let limit = if allowed.is_some() {
            n.saturating_mul(4).saturating_add(50)
        } else {
            n
        }
        .min(searcher.num_docs() as usize)
        .max(1);
        let top = searcher.search(&query, &TopDocs::with_limit(limit).order_by_score())?;
        let mut out = Vec::new();
        for (_, addr) in top {
            let column = searcher
                .segment_reader(addr.segment_ord)
                .fast_fields()
                .u64("id")?;
            if let Some(id) = column.first(addr.doc_id) {
                if allowed.is_none_or(|a| a.contains(&id)) {
                    out.push(id);
                }
            }
        }
        out.truncate(n);
        Ok(out)
    }

    pub fn remove(&self, id: u64) -> Result<()> {
        self.writer()?
            .delete_term(Term::from_field_u64(self.fields.id, id));
        Ok(())
    }

    /// Makes pending changes durable and visible.
    pub fn commit(&self) -> Result<()> {
        if self.writer.is_some() {
            self.writer()?.commit()?;
        }
        self.reader.reload()?;
        Ok(())
    }

    /// Ids of every document, as of the last commit.
    pub fn ids(&self) -> Result<BTreeSet<u64>> {
        let searcher = self.reader.searcher();
        let mut ids = BTreeSet::new();
        for segment in searcher.segment_readers() {
            let column = segment.fast_fields().u64("id")?;
            for doc in segment.doc_ids_alive() {
                if let Some(id) = column.first(doc) {
                    ids.insert(id);
                }
            }
        }
        Ok(ids)
    }

    /// Number of documents, as of the last commit.
    pub fn count(&self) -> u64 {
        self.reader.searcher().num_docs()
    }

    /// Every tag some photo has, with the number of photos that have it,
    /// in name order.
    pub fn tag_counts(&self) -> Result<Vec<(String, u64)>> {
        let searcher = self.reader.searcher();
        let mut names = BTreeSet::new();
        for segment in searcher.segment_readers() {
            let terms = segment.inverted_index(self.fields.tag)?;
            let mut stream = terms
                .terms()
                .stream()
                .map_err(|e| Error::Tantivy(e.into()))?;
            while stream.advance() {
                if let Ok(name) = std::str::from_utf8(stream.key()) {
                    names.insert(name.to_string());
                }
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let query = TermQuery::new(
                Term::from_field_text(self.fields.tag, &name),
                IndexRecordOption::Basic,
            );
            // Counted over live documents: a deleted one's terms linger
            // in its segment until a merge.
            let n = searcher.search(&query, &tantivy::collector::Count)? as u64;
            if n > 0 {
                out.push((name, n));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_letters_from_digits() {
        assert_eq!(
            words("holidays/2019/IMG_2041.JPG"),
            "holidays 2019 IMG 2041 JPG"
        );
        assert_eq!(words("fish23.jpg"), "fish 23 jpg");
        assert_eq!(words("  --café--  "), "café");
        // The keyword query never sees tantivy's query syntax.
        assert_eq!(words("a:b AND (c OR -d)"), "a b AND c OR d");
    }

    #[test]
    fn parses_exif_dates() {
        assert_eq!(parse_datetime("1970-01-01T00:00:00"), Some(0));
        assert_eq!(parse_datetime("2019-07-14T12:30:05"), Some(1_563_107_405));
        assert_eq!(parse_datetime("2000-02-29"), Some(951_782_400));
        assert_eq!(parse_datetime("0000-00-00T00:00:00"), None);
        assert_eq!(parse_datetime("garbage"), None);
        assert_eq!(parse_datetime("2019-02-29"), None);
        assert_eq!(parse_datetime("2019-04-31"), None);
        assert_eq!(parse_datetime("+019-01-01"), None);
        assert_eq!(parse_datetime("1492-10-12"), None);
        assert_eq!(parse_datetime("2019-07-14T12:30:05junk"), None);
        assert_eq!(parse_datetime("2019-07-14 12:30:05"), Some(1_563_107_405));
        assert_eq!(parse_datetime("2019-07-1é"), None);
    }
}
