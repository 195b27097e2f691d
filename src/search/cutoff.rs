//! Where the relevant results of a query end.
//!
//! A cosine similarity means nothing on its own: CLIP's text-to-photo
//! similarities sit in a narrow band whose place differs by model and by
//! query, so no fixed number separates relevant from not. The automatic
//! cutoff reads the boundary off each query's own scores:
//!
//! - **The split.** The query's similarities to a fixed sample of the
//!   library ([`BACKGROUND_SAMPLE`] photos, evenly spaced) and to its
//!   [`TOP_POOL`] nearest photos form one set; the boundary is the score
//!   that splits that set into two groups with the largest variance between
//!   them (Otsu 1979). The sample stands for what the library holds in
//!   general, the nearest photos for what the query found: a concept with a
//!   hundred photos in a million still stands out against the sample, and
//!   a library that is half dogs still splits dogs from the rest.
//! - **The contrast prompts** (text queries): the boundary is at least
//!   the similarity that generic descriptions ("a photo.", "an image of a
//!   thing.") have, on average, to the library's photos: a query must match
//!   a photo better than text that names nothing does. A query naming
//!   nothing the library holds then marks fewer photos relevant than the
//!   split alone would.
//! - **SigLIP models** (a calibrated sigmoid): a photo the model gives a
//!   match probability of one half or more is relevant whatever the split.
//!
//! Photos that matched the query's words (file name, folder, caption) are
//! relevant whatever their similarity, and so is every photo a filter alone
//! lists. `cutoff=<score>` puts the boundary at a fixed similarity (a
//! probability for SigLIP); `cutoff=none` marks everything relevant.
//! BENCHMARKS.md ("Relevance cutoff") has what this keeps and drops on
//! labelled queries.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The generic descriptions a text query is compared with.
pub const CONTRAST_PROMPTS: &[&str] = &[
    "a photo.",
    "a picture.",
    "an image.",
    "a photo of something.",
    "a picture of an object.",
    "an image of a thing.",
];

/// Most photos of the library sample the split reads.
pub const BACKGROUND_SAMPLE: usize = 2048;

/// How many of the query's nearest photos the split reads with the sample.
pub const TOP_POOL: usize = 256;

/// Fewer scores than this are not split: every photo is relevant.
const MIN_TO_SPLIT: usize = 8;

/// Where relevant results end, as a request asks for it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Cutoff {
    /// Per query, from the contrast prompts or the background sample.
    #[default]
    Auto,
    /// Every result is relevant.
    None,
    /// A fixed similarity (a probability, 0 to 1, for SigLIP models).
    Score(f32),
}

impl std::str::FromStr for Cutoff {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Cutoff::Auto),
            "none" => Ok(Cutoff::None),
            other => match other.parse::<f32>() {
                Ok(x) => Cutoff::Score(x).checked(),
                Err(_) => Err(format!(
                    "cutoff {:?}: use auto, none or a score from -1 to 1",
                    s.chars().take(40).collect::<String>()
                )),
            },
        }
    }
}

impl std::fmt::Display for Cutoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cutoff::Auto => f.write_str("auto"),
            Cutoff::None => f.write_str("none"),
            Cutoff::Score(s) => write!(f, "{s}"),
        }
    }
}

/// Written as text (`"auto"`, `"none"`, `"0.25"`); read from text or a number.
impl Serialize for Cutoff {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Cutoff {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            Number(f32),
            Text(String),
        }
        match Given::deserialize(d)? {
            Given::Number(x) => Cutoff::Score(x).checked(),
            Given::Text(s) => s.parse(),
        }
        .map_err(serde::de::Error::custom)
    }
}

impl Cutoff {
    /// The cutoff, or why it cannot be one: a score is a finite number from
    /// -1 to 1. The one check of every way a cutoff arrives.
    pub fn checked(self) -> Result<Self, String> {
        match self {
            Cutoff::Score(x) if !x.is_finite() || !(-1.0..=1.0).contains(&x) => Err(format!(
                "cutoff {x}: use auto, none or a score from -1 to 1"
            )),
            other => Ok(other),
        }
    }
}

/// How the boundary of one search was drawn, as the results report it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Boundary {
    /// `auto`, `none` or the score asked for.
    #[schema(value_type = String)]
    pub cutoff: Cutoff,
    /// The similarity a photo needs to be relevant (photos that matched
    /// the query's words are relevant anyway); absent when every photo is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f32>,
    /// `auto`: where the split of the query's similarities fell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<f32>,
    /// `auto`, text queries: the contrast prompts' mean similarity to the
    /// library, the least the boundary may be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contrast: Option<f32>,
}

/// The contrast prompts' mean embedding and, for the store version it was
/// measured at, their mean similarity to the library sample.
pub(crate) struct Contrast {
    pub mean: Vec<f32>,
    pub version: u64,
    pub floor: Option<f32>,
}

/// The rule of one query: which photos are relevant.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Judge {
    /// Relevant at or above this similarity (none: every photo is).
    pub threshold: Option<f32>,
    /// Relevant at or above this similarity whatever the threshold
    /// (SigLIP's probability of one half).
    pub probable: Option<f32>,
}

impl Judge {
    pub(crate) fn relevant(&self, similarity: f32) -> bool {
        self.probable.is_some_and(|p| similarity >= p)
            || self.threshold.is_none_or(|t| similarity >= t)
    }
}

/// The score that splits `scores` into two groups with the largest
/// variance between them (Otsu's method on the sorted scores): the midpoint
/// between the last score below and the first above. None for fewer than
/// [`MIN_TO_SPLIT`] scores or when they are all equal.
pub(crate) fn split(scores: &mut [f32]) -> Option<f32> {
    let n = scores.len();
    if n < MIN_TO_SPLIT {
        return None;
    }
    scores.sort_by(f32::total_cmp);
    let total: f64 = scores.iter().map(|&s| s as f64).sum();
    let mut below = 0f64;
    let mut best: Option<(f64, f32)> = None;
    for i in 1..n {
        below += scores[i - 1] as f64;
        if scores[i] == scores[i - 1] {
            continue;
        }
        let (a, b) = (i as f64, (n - i) as f64);
        let gap = below / a - (total - below) / b;
        let between = a * b * gap * gap;
        if best.is_none_or(|(v, _)| between > v) {
            best = Some((between, (scores[i - 1] + scores[i]) / 2.0));
        }
    }
    best.map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_parse_and_refuse_nonsense() {
        assert_eq!("auto".parse::<Cutoff>(), Ok(Cutoff::Auto));
        assert_eq!(" None ".parse::<Cutoff>(), Ok(Cutoff::None));
        assert_eq!("0.25".parse::<Cutoff>(), Ok(Cutoff::Score(0.25)));
        for bad in ["1.5", "-2", "NaN", "inf", "most"] {
            assert!(bad.parse::<Cutoff>().is_err(), "{bad}");
        }
        let json: Cutoff = serde_json::from_str("0.3").unwrap();
        assert_eq!(json, Cutoff::Score(0.3));
        assert!(serde_json::from_str::<Cutoff>("3").is_err());
        assert_eq!(serde_json::to_string(&Cutoff::Auto).unwrap(), "\"auto\"");
        assert_eq!(
            serde_json::to_string(&Cutoff::Score(0.25)).unwrap(),
            "\"0.25\""
        );
    }

    #[test]
    fn the_judge_keeps_the_probable_and_what_passes() {
        let judge = Judge {
            threshold: Some(0.3),
            probable: Some(0.9),
        };
        assert!(judge.relevant(0.3) && !judge.relevant(0.29));
        let odd = Judge {
            threshold: Some(0.95),
            probable: Some(0.9),
        };
        assert!(odd.relevant(0.92));
        assert!(Judge::default().relevant(-1.0));
    }

    #[test]
    fn the_split_falls_in_the_widest_gap_between_groups() {
        let mut two = vec![0.1, 0.12, 0.11, 0.13, 0.1, 0.5, 0.52, 0.49, 0.12, 0.11];
        let t = split(&mut two).unwrap();
        assert!((0.13..0.49).contains(&t), "{t}");
        // A minority far above a crowd: it is the upper group.
        let mut tail: Vec<f32> = (0..200).map(|i| 0.1 + (i % 10) as f32 * 0.01).collect();
        tail.extend([0.6, 0.62, 0.61]);
        let t = split(&mut tail).unwrap();
        assert!((0.19..0.6).contains(&t), "{t}");
        assert_eq!(split(&mut [0.3; 20]), None);
        assert_eq!(split(&mut [0.1, 0.9]), None);
    }
}
