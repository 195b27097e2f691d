//! The keyword index (tantivy): one document per photo with its path
//! segments, file name, caption, camera and date, keyed by photo id. It is the
//! basis of keyword search and filters; like the vector index, it is derived
//! from the store and reconciled with it on open.

use std::collections::BTreeSet;
use std::path::Path;

use tantivy::schema::{Field, IndexRecordOption, Schema, TextFieldIndexing, TextOptions, FAST, INDEXED, STORED, STRING};
use tantivy::{doc, Index, IndexReader, IndexWriter, ReloadPolicy, Term};

use crate::store::PhotoRecord;

/// Memory for the writer's in-flight segment.
const WRITER_MEMORY: usize = 32 << 20;

/// Version of the schema and analysis below. The keyword index is derived
/// from the store: one of another version is dropped and rebuilt on open.
pub const SCHEMA_VERSION: u32 = 2;
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("keyword index: {0}")]
    Tantivy(#[from] tantivy::TantivyError),
    #[error("keyword index at {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("keyword index was opened read-only")]
    ReadOnly,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The schema's fields.
#[derive(Clone, Copy, Debug)]
pub struct Fields {
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
}

fn schema() -> (Schema, Fields) {
    // English stemming, so "fishes" finds "fish" and "running" finds "run".
    let stemmed = TextOptions::default().set_indexing_options(
        TextFieldIndexing::default().set_tokenizer("en_stem").set_index_option(IndexRecordOption::WithFreqsAndPositions),
    );
    let mut b = Schema::builder();
    let fields = Fields {
        id: b.add_u64_field("id", INDEXED | STORED | FAST),
        path: b.add_text_field("path", stemmed.clone()),
        name: b.add_text_field("name", stemmed.clone()),
        folder: b.add_text_field("folder", STRING | FAST),
        caption: b.add_text_field("caption", stemmed.clone()),
        camera: b.add_text_field("camera", stemmed),
        taken: b.add_date_field("taken", INDEXED | FAST),
        format: b.add_text_field("format", STRING | FAST),
    };
    (b.build(), fields)
}

/// Earliest and latest years a date may have: the index stores times as
/// nanoseconds in an `i64`, which reach from 1677 to 2262; photographs
/// begin in the 1820s.
pub const MIN_YEAR: i64 = 1800;
pub const MAX_YEAR: i64 = 2200;

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS` (a space for the `T` too) to
/// seconds since the epoch; `None` for anything else: other lengths or
/// separators, signs, impossible dates (February 30th), years outside
/// [`MIN_YEAR`]..=[`MAX_YEAR`]. Reads the text as bytes, never slicing it.
pub fn parse_datetime(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 && b.len() != 19 {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let digits = b.get(r)?;
        digits.iter().all(u8::is_ascii_digit).then(|| digits.iter().fold(0i64, |n, d| n * 10 + (d - b'0') as i64))
    };
    if b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = if b.len() == 19 {
        if !matches!(b[10], b'T' | b' ') || b[13] != b':' || b[16] != b':' {
            return None;
        }
        (num(11..13)?, num(14..16)?, num(17..19)?)
    } else {
        (0, 0, 0)
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if !(MIN_YEAR..=MAX_YEAR).contains(&y) || !(1..=days_in_month).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (H. Hinnant).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
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
        let io = |source| Error::Io { path: dir.display().to_string(), source };
        let version_file = dir.join(SCHEMA_FILE);
        let version = std::fs::read_to_string(&version_file).ok().and_then(|v| v.trim().parse::<u32>().ok());
        if dir.join("meta.json").exists() && version != Some(SCHEMA_VERSION) {
            tracing::info!(?version, "keyword index has another schema; rebuilding it from the store");
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
        let writer =
            if writable { Some(std::sync::Mutex::new(index.writer_with_num_threads(1, WRITER_MEMORY)?)) } else { None };
        let reader = index.reader_builder().reload_policy(ReloadPolicy::Manual).try_into()?;
        Ok(Self { index, reader, writer, fields })
    }

    pub fn fields(&self) -> Fields {
        self.fields
    }

    pub fn reader(&self) -> &IndexReader {
        &self.reader
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, IndexWriter>> {
        let writer = self.writer.as_ref().ok_or(Error::ReadOnly)?;
        Ok(writer.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Adds or replaces the document of a photo (applied at the next commit).
    pub fn upsert(&self, record: &PhotoRecord) -> Result<()> {
        let f = &self.fields;
        let writer = self.writer()?;
        writer.delete_term(Term::from_field_u64(f.id, record.id));
        let (folder, name) = match record.path.rsplit_once('/') {
            Some((folder, name)) => (folder, name),
            None => ("", record.path.as_str()),
        };
        let mut d = doc!(
            f.id => record.id,
            f.path => words(&record.path),
            f.name => words(name),
            f.folder => folder,
            f.format => record.format.clone(),
        );
        if let Some(caption) = &record.caption {
            d.add_text(f.caption, caption);
        }
        if let Some(camera) = record.camera() {
            d.add_text(f.camera, camera);
        }
        if let Some(secs) = record.taken.as_deref().and_then(parse_datetime) {
            d.add_date(f.taken, tantivy::DateTime::from_timestamp_secs(secs));
        }
        writer.add_document(d)?;
        Ok(())
    }

    /// Removes a photo's document (applied at the next commit).
    pub fn remove(&self, id: u64) -> Result<()> {
        self.writer()?.delete_term(Term::from_field_u64(self.fields.id, id));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_letters_from_digits() {
        assert_eq!(words("holidays/2019/IMG_2041.JPG"), "holidays 2019 IMG 2041 JPG");
        assert_eq!(words("fish23.jpg"), "fish 23 jpg");
        assert_eq!(words("  --café--  "), "café");
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
