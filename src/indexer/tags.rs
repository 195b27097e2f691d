//! Automatic tags: each photo gets the names of a vocabulary whose zero-shot
//! probability passes a threshold, as the CLIP paper classifies: every tag's
//! names go into every template, the prompts' embeddings are averaged into
//! one vector per tag (prompt ensembling), and a photo's probabilities are
//! the softmax of its similarities to all of them at the model's logit
//! scale. Contrast classes ("a photo", "a thing") take part in the softmax
//! and are never given, so a photo of nothing the vocabulary lists spreads
//! its weight there instead of onto the nearest tag. A tag may be a kind of
//! another (`hammer < tool`): the broader tag's probability is its own plus
//! that of every tag below it, so "tool" is given to a photo the model
//! sees as a hammer instead of losing the softmax to "hammer".
//!
//! The vocabulary is a plain file (the built-in one is `tags.txt`); the
//! index records the one it uses ([`TagSetup`]) and keeps its text
//! embeddings per model, so a run pays one small matrix product per batch.
//! A new vocabulary or threshold re-tags the stored photos from their
//! embeddings ([`Index::retag`]), without decoding or embedding a photo.

use std::time::Instant;

use super::{Index, Result, keyword_doc};
use crate::common::ContentHash;
use crate::model::Clip;
use crate::store::{Change, PhotoTag, Store, TagSetup, TagVectors};
use crate::vector::distance::dot;

/// The built-in vocabulary.
pub const BUILTIN: &str = include_str!("tags.txt");

/// What a setup from the built-in vocabulary names as its source.
pub const BUILTIN_SOURCE: &str = "built-in";

/// The probability a tag needs by default, chosen on the GCompris photos
/// (`scripts/bench/tags.py`; BENCHMARKS.md, "Automatic tags").
pub const DEFAULT_THRESHOLD: f32 = 0.3;

/// Templates for a vocabulary without `template:` lines.
const DEFAULT_TEMPLATES: [&str; 4] = [
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a good photo of a {}.",
];

/// Most tags a vocabulary may hold.
pub const MAX_TAGS: usize = 10_000;
/// Longest tag name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Most tags given to one photo.
pub const MAX_PER_PHOTO: usize = 16;
/// Largest vocabulary file, in bytes.
pub const MAX_FILE_BYTES: usize = 4 << 20;

/// Photos re-tagged per store commit.
const RETAG_CHUNK: usize = 4096;

/// Why a vocabulary cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VocabularyError {
    #[error("it lists no tags (only comments, templates or contrast classes)")]
    Empty,
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    #[error("it lists {0} tags; at most {MAX_TAGS}")]
    TooMany(usize),
    #[error("it is larger than {} MiB", MAX_FILE_BYTES >> 20)]
    TooLarge,
}

/// One class of a vocabulary: its name and every way to say it.
#[derive(Clone, Debug, PartialEq)]
pub struct TagClass {
    pub name: String,
    pub names: Vec<String>,
    /// The tags this one is a kind of (`hammer < tool`).
    pub parents: Vec<String>,
}

/// A parsed vocabulary file.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocabulary {
    pub tags: Vec<TagClass>,
    /// Classes in the softmax that are never given.
    pub contrast: Vec<TagClass>,
    pub templates: Vec<String>,
}

/// A tag name as stored and matched: lower case, single spaces.
pub fn normalize(name: &str) -> String {
    name.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Why `name` (normalised) cannot be a tag name, if it cannot.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("an empty name".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Some(format!("a name longer than {MAX_NAME_CHARS} characters"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, ':' | ',' | '"' | '<' | '|') || c.is_control())
    {
        return Some(format!("{name:?} holds {c:?}, which a tag name may not"));
    }
    None
}

impl Vocabulary {
    pub fn parse(text: &str) -> Result<Self, VocabularyError> {
        if text.len() > MAX_FILE_BYTES {
            return Err(VocabularyError::TooLarge);
        }
        let mut tags = Vec::new();
        let mut contrast = Vec::new();
        let mut templates = Vec::new();
        let mut seen = std::collections::HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let bad = |message: String| VocabularyError::Line { line, message };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if let Some(t) = trimmed.strip_prefix("template:") {
                let t = t.trim();
                if t.matches("{}").count() != 1 {
                    return Err(bad(format!(
                        "the template {t:?} must hold {{}} once, where the name goes"
                    )));
                }
                templates.push(t.to_string());
                continue;
            }
            let (is_contrast, body) = match trimmed.strip_prefix('-') {
                Some(rest) => (true, rest),
                None => (false, trimmed),
            };
            let (body, parents) = match body.split_once('<') {
                Some((body, parents)) => (body, parents.split(',').map(normalize).collect()),
                None => (body, Vec::new()),
            };
            if is_contrast && !parents.is_empty() {
                return Err(bad("a contrast class is no kind of tag (no \"<\")".into()));
            }
            for parent in &parents {
                if let Some(problem) = name_problem(parent) {
                    return Err(bad(format!("parent: {problem}")));
                }
            }
            let mut names = Vec::new();
            for part in body.split('|') {
                let name = normalize(part);
                if let Some(problem) = name_problem(&name) {
                    return Err(bad(problem));
                }
                if let Some(first) = seen.insert(name.clone(), line) {
                    return Err(bad(format!("{name:?} is already on line {first}")));
                }
                names.push(name);
            }
            let class = TagClass {
                name: names[0].clone(),
                names,
                parents,
            };
            match is_contrast {
                true => contrast.push(class),
                false => tags.push((line, class)),
            }
        }
        if tags.is_empty() {
            return Err(VocabularyError::Empty);
        }
        check_parents(&tags)?;
        let tags: Vec<TagClass> = tags.into_iter().map(|(_, class)| class).collect();
        if tags.len() > MAX_TAGS {
            return Err(VocabularyError::TooMany(tags.len()));
        }
        if templates.is_empty() {
            templates = DEFAULT_TEMPLATES.iter().map(|t| t.to_string()).collect();
        }
        Ok(Self {
            tags,
            contrast,
            templates,
        })
    }

    /// For each tag, the positions of every tag it is a kind of, however
    /// far up.
    fn ancestors(&self) -> Vec<Vec<usize>> {
        let position: std::collections::HashMap<&str, usize> = self
            .tags
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        (0..self.tags.len())
            .map(|start| {
                let mut found = Vec::new();
                let mut todo = vec![start];
                while let Some(i) = todo.pop() {
                    for parent in &self.tags[i].parents {
                        let p = position[parent.as_str()];
                        if p != start && !found.contains(&p) {
                            found.push(p);
                            todo.push(p);
                        }
                    }
                }
                found
            })
            .collect()
    }

    /// Every prompt of every class: tags first, then contrast classes.
    fn prompts(&self) -> Vec<Vec<String>> {
        self.tags
            .iter()
            .chain(&self.contrast)
            .map(|class| {
                class
                    .names
                    .iter()
                    .flat_map(|n| self.templates.iter().map(move |t| t.replacen("{}", n, 1)))
                    .collect()
            })
            .collect()
    }
}

/// Every parent names a tag's first name, and no tag is (through its
/// parents) a kind of itself.
fn check_parents(tags: &[(usize, TagClass)]) -> Result<(), VocabularyError> {
    let by_name: std::collections::HashMap<&str, usize> = tags
        .iter()
        .enumerate()
        .map(|(i, (_, t))| (t.name.as_str(), i))
        .collect();
    for (line, tag) in tags {
        for parent in &tag.parents {
            if !by_name.contains_key(parent.as_str()) {
                return Err(VocabularyError::Line {
                    line: *line,
                    message: format!("{parent:?} is not the first name of a tag of the file"),
                });
            }
        }
    }
    for (start, (line, tag)) in tags.iter().enumerate() {
        let mut seen = vec![false; tags.len()];
        let mut todo: Vec<usize> = tag.parents.iter().map(|p| by_name[p.as_str()]).collect();
        while let Some(i) = todo.pop() {
            if i == start {
                return Err(VocabularyError::Line {
                    line: *line,
                    message: format!("{:?} is, through its parents, a kind of itself", tag.name),
                });
            }
            if !std::mem::replace(&mut seen[i], true) {
                todo.extend(tags[i].1.parents.iter().map(|p| by_name[p.as_str()]));
            }
        }
    }
    Ok(())
}

/// Checks a threshold given by a person: a probability.
pub fn check_threshold(t: f32) -> std::result::Result<f32, String> {
    match t.is_finite() && t > 0.0 && t <= 1.0 {
        true => Ok(t),
        false => Err(format!(
            "the tag threshold {t} is not a probability above 0 and at most 1"
        )),
    }
}

/// The built-in vocabulary at the default threshold.
pub fn builtin_setup() -> TagSetup {
    TagSetup {
        source: BUILTIN_SOURCE.into(),
        text: BUILTIN.into(),
        threshold: DEFAULT_THRESHOLD,
    }
}

/// How a run or a re-tag changes an index's tagging.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Tagging {
    /// As the index has it (the built-in vocabulary for an index that
    /// never had one).
    #[default]
    Keep,
    /// Another vocabulary (source and text, already parsed once) and/or
    /// threshold; what is not given stays as the index has it, except that
    /// another vocabulary starts at the default threshold.
    Change {
        vocabulary: Option<(String, String)>,
        threshold: Option<f32>,
    },
    /// No tags: every photo loses its tags.
    Off,
}

impl Tagging {
    /// The setup this asks for, given what the index has (`None` when it
    /// never recorded one).
    pub fn resolve(&self, stored: Option<Option<TagSetup>>) -> Option<TagSetup> {
        let current = stored.unwrap_or_else(|| Some(builtin_setup()));
        match self {
            Tagging::Keep => current,
            Tagging::Off => None,
            Tagging::Change {
                vocabulary,
                threshold,
            } => {
                let mut setup = match vocabulary {
                    Some((source, text)) => TagSetup {
                        source: source.clone(),
                        text: text.clone(),
                        threshold: current
                            .filter(|c| c.text == *text)
                            .map_or(DEFAULT_THRESHOLD, |c| c.threshold),
                    },
                    None => current.unwrap_or_else(builtin_setup),
                };
                if let Some(t) = threshold {
                    setup.threshold = *t;
                }
                Some(setup)
            }
        }
    }
}

/// A vocabulary embedded by one model, ready to tag embeddings.
pub struct Tagger {
    setup: TagSetup,
    names: Vec<String>,
    /// Per tag, the tags it is a kind of (they get its probability too).
    ancestors: Vec<Vec<usize>>,
    /// Tag rows first, then contrast rows; `dim` values each, unit length.
    matrix: Vec<f32>,
    dim: usize,
    scale: f32,
}

impl Tagger {
    /// The tagger for `setup` with `clip`, from the vectors `store` keeps
    /// for this model and vocabulary, or made now (and kept).
    pub fn new(setup: &TagSetup, clip: &Clip, store: &Store) -> Result<Self> {
        let vocabulary =
            Vocabulary::parse(&setup.text).map_err(|e| super::Error::Tags(e.to_string()))?;
        let dim = clip.info().embedding_dim;
        let key = format!(
            "{}/{}",
            clip.info().fingerprint,
            ContentHash::of(setup.text.as_bytes())
        );
        let rows = vocabulary.tags.len() + vocabulary.contrast.len();
        let matrix = match store.tag_vectors(&key)? {
            Some(kept) if kept.dim == dim && kept.data.len() == rows * dim => kept.data,
            _ => {
                let started = Instant::now();
                let prompts = vocabulary.prompts();
                let vectors = clip.ensemble(&prompts)?;
                let data: Vec<f32> = vectors.into_iter().flatten().collect();
                tracing::info!(
                    tags = vocabulary.tags.len(),
                    prompts = prompts.iter().map(Vec::len).sum::<usize>(),
                    seconds = started.elapsed().as_secs_f64(),
                    "tag vocabulary embedded"
                );
                store.set_tag_vectors(&TagVectors {
                    key,
                    dim,
                    data: data.clone(),
                })?;
                data
            }
        };
        Ok(Self {
            setup: setup.clone(),
            ancestors: vocabulary.ancestors(),
            names: vocabulary.tags.into_iter().map(|c| c.name).collect(),
            matrix,
            dim,
            scale: clip.logit_scale()?,
        })
    }

    pub fn setup(&self) -> &TagSetup {
        &self.setup
    }

    /// The tags' names, in vocabulary order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The text vector of the tag `name`, if the vocabulary has it.
    pub fn vector(&self, name: &str) -> Option<&[f32]> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(&self.matrix[i * self.dim..(i + 1) * self.dim])
    }

    /// The tags of one embedding, most probable first.
    pub fn tag(&self, vector: &[f32]) -> Vec<PhotoTag> {
        if vector.len() != self.dim || vector.iter().any(|x| !x.is_finite()) {
            return Vec::new();
        }
        // The softmax over every class; contrast classes count in the sum.
        let mut own: Vec<f32> = self
            .matrix
            .chunks_exact(self.dim)
            .map(|row| self.scale * dot(row, vector))
            .collect();
        let max = own.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        own.iter_mut().for_each(|l| *l = (*l - max).exp());
        let total: f32 = own.iter().sum();
        own.truncate(self.names.len());
        own.iter_mut().for_each(|e| *e /= total);
        // A broader tag holds the probability of every tag below it.
        let mut held = own.clone();
        for (i, up) in self.ancestors.iter().enumerate() {
            for &a in up {
                held[a] += own[i];
            }
        }
        let mut tags: Vec<PhotoTag> = held
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i, p.min(1.0)))
            .filter(|&(_, p)| p >= self.setup.threshold)
            .map(|(i, p)| PhotoTag {
                name: self.names[i].clone(),
                p: (p * 1000.0).round() / 1000.0,
            })
            .collect();
        tags.sort_by(|a, b| b.p.total_cmp(&a.p).then_with(|| a.name.cmp(&b.name)));
        tags.truncate(MAX_PER_PHOTO);
        tags
    }

    /// The tags of a batch of embeddings: one product of the batch with
    /// the vocabulary's matrix.
    pub fn tag_all(&self, vectors: &[Vec<f32>]) -> Vec<Vec<PhotoTag>> {
        vectors.iter().map(|v| self.tag(v)).collect()
    }
}

/// What a re-tag did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Retagged {
    /// Photos looked at.
    pub photos: u64,
    /// Photos whose tags changed.
    pub changed: u64,
    /// Photos with at least one tag afterwards.
    pub tagged: u64,
    pub seconds: f64,
}

impl Index {
    /// The tagger for what `tagging` asks of this index; `None` for no tags.
    pub fn tagger(&self, clip: &Clip, tagging: &Tagging) -> Result<Option<Tagger>> {
        Ok(self.tagger_and_staleness(clip, tagging)?.0)
    }

    /// The tagger for what `tagging` asks, after re-tagging the stored
    /// photos when they were tagged with another setup (or never).
    pub fn prepare_tags(&self, clip: &Clip, tagging: &Tagging) -> Result<Option<Tagger>> {
        let (tagger, stale) = self.tagger_and_staleness(clip, tagging)?;
        if stale {
            self.retag(tagger.as_ref())?;
        }
        Ok(tagger)
    }

    /// The tagger, and whether the stored photos were tagged otherwise.
    fn tagger_and_staleness(
        &self,
        clip: &Clip,
        tagging: &Tagging,
    ) -> Result<(Option<Tagger>, bool)> {
        let stored = self.store.tag_setup()?;
        let setup = tagging.resolve(stored.clone());
        let stale = stored != Some(setup.clone());
        let tagger = match setup {
            Some(setup) => Some(Tagger::new(&setup, clip, &self.store)?),
            None => None,
        };
        Ok((tagger, stale))
    }

    /// Tags every stored photo again from its embedding with `tagger` (none:
    /// removes every tag), then records the setup. A killed re-tag leaves
    /// the old setup recorded, so the next run does it again.
    pub fn retag(&self, tagger: Option<&Tagger>) -> Result<Retagged> {
        let started = Instant::now();
        let mut done = Retagged::default();
        let mut changes = Vec::new();
        let mut since_keyword_commit = 0;
        let records = self.store.records();
        for record in records {
            let mut record = record?;
            done.photos += 1;
            let tags = match (tagger, self.store.vector(record.id)?) {
                (Some(t), Some(v)) => t.tag(&v),
                _ => Vec::new(),
            };
            if !tags.is_empty() {
                done.tagged += 1;
            }
            if tags != record.tags {
                record.tags = tags;
                done.changed += 1;
                changes.push(Change::Put {
                    record,
                    vector: None,
                    old_path: None,
                });
            }
            if changes.len() >= RETAG_CHUNK {
                since_keyword_commit += self.retag_commit(&mut changes)?;
                if since_keyword_commit >= 16 * RETAG_CHUNK {
                    self.keywords.commit()?;
                    since_keyword_commit = 0;
                }
            }
        }
        self.retag_commit(&mut changes)?;
        self.keywords.commit()?;
        self.store.set_tag_setup(tagger.map(Tagger::setup))?;
        done.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            photos = done.photos,
            changed = done.changed,
            seconds = done.seconds,
            "photos re-tagged"
        );
        Ok(done)
    }

    fn retag_commit(&self, changes: &mut Vec<Change>) -> Result<usize> {
        self.store.commit(changes)?;
        let mut refiled = Vec::new();
        for change in changes.iter() {
            if let Change::Put { record, .. } = change {
                self.keywords.upsert(&keyword_doc(record))?;
                // An engine that filters by tag itself is told the new tags.
                if self.vectors.wants_fields() {
                    if let Some(v) = self.store.vector(record.id)? {
                        refiled.push((record.id, v));
                    }
                }
            }
        }
        if !refiled.is_empty() {
            self.vectors.put(refiled, &|id| self.fields(id))?;
        }
        let n = changes.len();
        changes.clear();
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_vocabulary_parses() {
        let v = Vocabulary::parse(BUILTIN).unwrap();
        assert!(v.tags.len() >= 300, "{} tags", v.tags.len());
        assert!(v.contrast.len() >= 2);
        assert_eq!(v.templates.len(), 4);
        assert!(v.tags.iter().any(|t| t.name == "beach"));
        assert!(v.tags.iter().any(|t| t.name == "screenshot"));
    }

    #[test]
    fn a_vocabulary_has_names_aliases_templates_and_contrast() {
        let v = Vocabulary::parse(
            "# mine\n\ntemplate: a picture of {}.\nBeach |  Sandy   beach\n- photo\ndog\n",
        )
        .unwrap();
        assert_eq!(v.templates, ["a picture of {}."]);
        assert_eq!(v.tags[0].name, "beach");
        assert_eq!(v.tags[0].names, ["beach", "sandy beach"]);
        assert_eq!(v.contrast[0].name, "photo");
        assert_eq!(
            v.prompts(),
            [
                vec!["a picture of beach.", "a picture of sandy beach."],
                vec!["a picture of dog."],
                vec!["a picture of photo."],
            ]
        );
        let d = Vocabulary::parse("cat\n").unwrap();
        assert_eq!(d.templates.len(), DEFAULT_TEMPLATES.len());
    }

    #[test]
    fn bad_vocabularies_say_what_is_wrong() {
        assert_eq!(Vocabulary::parse(""), Err(VocabularyError::Empty));
        assert_eq!(
            Vocabulary::parse("# nothing\n- photo\ntemplate: a {}.\n"),
            Err(VocabularyError::Empty)
        );
        let line = |text: &str| match Vocabulary::parse(text) {
            Err(VocabularyError::Line { line, message }) => (line, message),
            other => panic!("{other:?}"),
        };
        assert_eq!(line("dog\ncat\nDog\n").0, 3);
        assert!(line("dog\ncat\nDog\n").1.contains("line 1"));
        assert!(line("a:b\n").1.contains("':'"));
        assert!(line("a, b\n").1.contains("','"));
        assert!(line("dog | \n").1.contains("empty"));
        assert!(line("template: no slot\n").1.contains("{}"));
        assert!(line(&"x".repeat(65)).1.contains("longer"));
        assert!(line("dog < pet\n").1.contains("\"pet\" is not"));
        assert!(line("a < b\nb < c\nc < a\n").1.contains("kind of itself"));
        assert!(line("dog\n- photo < dog\n").1.contains("contrast"));
        assert!(check_threshold(0.0).is_err());
        assert!(check_threshold(1.5).is_err());
        assert!(check_threshold(f32::NAN).is_err());
        assert_eq!(check_threshold(0.2), Ok(0.2));
    }

    #[test]
    fn tagging_resolves_against_the_index() {
        let mine = TagSetup {
            source: "mine.txt".into(),
            text: "dog\n".into(),
            threshold: 0.45,
        };
        assert_eq!(Tagging::Keep.resolve(None), Some(builtin_setup()));
        assert_eq!(Tagging::Keep.resolve(Some(None)), None);
        assert_eq!(
            Tagging::Keep.resolve(Some(Some(mine.clone()))),
            Some(mine.clone())
        );
        assert_eq!(Tagging::Off.resolve(Some(Some(mine.clone()))), None);
        let lower = Tagging::Change {
            vocabulary: None,
            threshold: Some(0.05),
        };
        assert_eq!(
            lower.resolve(Some(Some(mine.clone()))).unwrap(),
            TagSetup {
                threshold: 0.05,
                ..mine.clone()
            }
        );
        let other = Tagging::Change {
            vocabulary: Some(("b.txt".into(), "cat\n".into())),
            threshold: None,
        };
        let s = other.resolve(Some(Some(mine.clone()))).unwrap();
        assert_eq!(
            (s.source.as_str(), s.threshold),
            ("b.txt", DEFAULT_THRESHOLD)
        );
        // The same vocabulary again keeps its threshold.
        let again = Tagging::Change {
            vocabulary: Some(("copy.txt".into(), mine.text.clone())),
            threshold: None,
        };
        assert_eq!(again.resolve(Some(Some(mine))).unwrap().threshold, 0.45);
    }

    /// Softmax over tags and contrast classes; only tags over the threshold
    /// are given, most probable first.
    #[test]
    fn tags_pass_the_threshold_and_contrast_is_never_given() {
        let e = |i: usize| {
            let mut v = vec![0f32; 4];
            v[i] = 1.0;
            v
        };
        let tagger = Tagger {
            setup: TagSetup {
                threshold: 0.2,
                ..builtin_setup()
            },
            names: vec!["dog".into(), "cat".into(), "car".into()],
            ancestors: vec![Vec::new(); 3],
            matrix: [e(0), e(1), e(2), e(3)].concat(),
            dim: 4,
            scale: 10.0,
        };
        let mixed = [0.7f32, 0.7, 0.0, 0.1];
        let tags = tagger.tag(&mixed);
        assert_eq!(
            tags.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["cat", "dog"]
        );
        assert!((tags[0].p - 0.5).abs() < 0.01, "{tags:?}");
        // Closest to the contrast class: nothing.
        assert!(tagger.tag(&e(3)).is_empty());
        assert!(tagger.tag(&[f32::NAN, 0.0, 0.0, 0.0]).is_empty());
        assert!(tagger.tag(&[1.0, 0.0]).is_empty());
        assert_eq!(tagger.vector("cat"), Some(&e(1)[..]));
        assert_eq!(tagger.tag_all(&[e(2)])[0][0].name, "car");
    }

    /// A broader tag holds the probability of the tags below it, however
    /// far down; a tag is never counted twice.
    #[test]
    fn broader_tags_hold_what_is_below_them() {
        let v =
            Vocabulary::parse("animal\nmammal < animal\ndog < mammal, animal\ncat < mammal\ncar\n")
                .unwrap();
        let ancestors = v.ancestors();
        assert_eq!(ancestors[2].len(), 2, "{ancestors:?}");
        let e = |i: usize| {
            let mut x = vec![0f32; 5];
            x[i] = 1.0;
            x
        };
        let tagger = Tagger {
            setup: TagSetup {
                threshold: 0.3,
                ..builtin_setup()
            },
            names: v.tags.iter().map(|t| t.name.clone()).collect(),
            ancestors,
            matrix: (0..5).flat_map(e).collect(),
            dim: 5,
            scale: 10.0,
        };
        // Between dog and cat: neither alone, but a mammal and an animal.
        let tags = tagger.tag(&[0.0, 0.0, 0.7, 0.7, 0.0]);
        let names: Vec<&str> = tags.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["animal", "mammal", "cat", "dog"]);
        assert!(tags[0].p <= 1.0 && tags[0].p > 0.99, "{tags:?}");
        assert!(tagger.tag(&e(4)).iter().all(|t| t.name == "car"));
    }
}
