//! The query language of the search box and `clipdex search`:
//!
//! ```text
//! golden retriever                         one text
//! "golden retriever" + 0.5*image:42 - "people"
//! dog - cat                                a negative term
//! image:holidays/2019/IMG_2041.jpg         a photo of the index, by id or path
//! ```
//!
//! Terms are joined by `+` or `-` with spaces around them (so `t-shirt` stays
//! one word); a term may carry a weight, `0.5*term`. Quotes delimit text.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Longest query text accepted, in characters (CLIP reads 77 tokens anyway).
pub const MAX_QUERY_CHARS: usize = 2000;
/// Most terms in one query.
pub const MAX_TERMS: usize = 16;

/// What a term refers to.
#[derive(Clone, Debug, PartialEq)]
pub enum TermKind {
    Text(String),
    /// A photo of the index, by id.
    Photo(u64),
    /// A photo of the index, by path relative to the library.
    PhotoPath(String),
    /// An embedding computed elsewhere (an uploaded picture).
    Vector(Vec<f32>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Term {
    pub kind: TermKind,
    pub weight: f32,
}

/// One term of a structured (JSON) query: exactly one of `text`, `photo`, `path`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TermSpec {
    /// Text to embed.
    #[serde(default)]
    pub text: Option<String>,
    /// Id of a photo of the index.
    #[serde(default)]
    pub photo: Option<u64>,
    /// Path of a photo of the index, relative to the library.
    #[serde(default)]
    pub path: Option<String>,
    /// Weight; negative to push results away. Default 1.
    #[serde(default)]
    pub weight: Option<f32>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct ParseError(pub String);

pub(crate) fn check_weight(w: f32) -> Result<f32, ParseError> {
    if !w.is_finite() || w.abs() > 100.0 {
        return Err(ParseError(format!(
            "weight {w} is out of range (-100 to 100)"
        )));
    }
    Ok(w)
}

impl TermSpec {
    pub fn to_term(&self) -> Result<Term, ParseError> {
        let weight = check_weight(self.weight.unwrap_or(1.0))?;
        let kind = match (&self.text, self.photo, &self.path) {
            (Some(t), None, None) => {
                let t = t.trim();
                if t.is_empty() {
                    return Err(ParseError("a text term is empty".into()));
                }
                if t.chars().count() > MAX_QUERY_CHARS {
                    return Err(ParseError(format!(
                        "a text term is longer than {MAX_QUERY_CHARS} characters"
                    )));
                }
                TermKind::Text(t.to_string())
            }
            (None, Some(id), None) => TermKind::Photo(id),
            (None, None, Some(p)) => TermKind::PhotoPath(p.trim_matches('/').to_string()),
            _ => {
                return Err(ParseError(
                    "each term needs exactly one of text, photo or path".into(),
                ));
            }
        };
        Ok(Term { kind, weight })
    }
}

/// Parses the query language.
pub fn parse(input: &str) -> Result<Vec<Term>, ParseError> {
    let chars = input.chars().count();
    if chars > MAX_QUERY_CHARS {
        return Err(ParseError(format!(
            "query too long ({chars} characters, at most {MAX_QUERY_CHARS})"
        )));
    }
    let s: Vec<char> = input.chars().collect();
    let mut i = 0;
    let mut terms = Vec::new();
    let mut sign = 1.0f32;
    let skip_ws = |i: &mut usize| {
        while *i < s.len() && s[*i].is_whitespace() {
            *i += 1;
        }
    };
    skip_ws(&mut i);
    let mut leading = false;
    if i < s.len()
        && (s[i] == '+' || s[i] == '-')
        && s.get(i + 1).is_some_and(|c| c.is_whitespace() || *c == '"')
    {
        sign = if s[i] == '-' { -1.0 } else { 1.0 };
        i += 1;
        leading = true;
    }
    let mut after_operator = leading;
    loop {
        skip_ws(&mut i);
        if i >= s.len() {
            if after_operator {
                return Err(ParseError("a term is missing after the last + or -".into()));
            }
            break;
        }
        // Optional weight: a number followed by '*'.
        let mut weight = 1.0f32;
        let mut j = i;
        while j < s.len() && (s[j].is_ascii_digit() || s[j] == '.') {
            j += 1;
        }
        if j > i {
            let mut k = j;
            while k < s.len() && s[k].is_whitespace() {
                k += 1;
            }
            if k < s.len() && s[k] == '*' {
                let number: String = s[i..j].iter().collect();
                weight = number
                    .parse()
                    .map_err(|_| ParseError(format!("bad weight {number:?}")))?;
                i = k + 1;
                skip_ws(&mut i);
            }
        }
        // The atom.
        let kind = if i < s.len() && s[i] == '"' {
            let start = i + 1;
            let end = s[start..]
                .iter()
                .position(|&c| c == '"')
                .map(|p| start + p)
                .ok_or_else(|| ParseError("unclosed quote".into()))?;
            let text: String = s[start..end].iter().collect();
            i = end + 1;
            let text = text.trim().to_string();
            if text.is_empty() {
                return Err(ParseError("empty quoted text".into()));
            }
            TermKind::Text(text)
        } else {
            // Bare text runs to the next operator surrounded by spaces.
            let start = i;
            while i < s.len() {
                if s[i].is_whitespace() {
                    let mut k = i;
                    while k < s.len() && s[k].is_whitespace() {
                        k += 1;
                    }
                    if k < s.len()
                        && (s[k] == '+' || s[k] == '-')
                        && s.get(k + 1).is_none_or(|c| c.is_whitespace() || *c == '"')
                    {
                        break;
                    }
                }
                i += 1;
            }
            let text: String = s[start..i].iter().collect::<String>().trim().to_string();
            if text.is_empty() {
                return Err(ParseError("a term is missing".into()));
            }
            match text.strip_prefix("image:") {
                Some(rest) if !rest.is_empty() && !rest.contains(char::is_whitespace) => {
                    match rest.parse::<u64>() {
                        Ok(id) => TermKind::Photo(id),
                        Err(_) => TermKind::PhotoPath(rest.trim_matches('/').to_string()),
                    }
                }
                _ => TermKind::Text(text),
            }
        };
        terms.push(Term {
            kind,
            weight: check_weight(sign * weight)?,
        });
        if terms.len() > MAX_TERMS {
            return Err(ParseError(format!("too many terms (at most {MAX_TERMS})")));
        }
        skip_ws(&mut i);
        if i >= s.len() {
            break;
        }
        sign = match s[i] {
            '+' => 1.0,
            '-' => -1.0,
            c => {
                return Err(ParseError(format!(
                    "expected + or - between terms, found {c:?}"
                )));
            }
        };
        i += 1;
        after_operator = true;
    }
    if terms.is_empty() {
        return Err(ParseError("the query is empty".into()));
    }
    Ok(terms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str, w: f32) -> Term {
        Term {
            kind: TermKind::Text(t.into()),
            weight: w,
        }
    }

    #[test]
    fn parses_the_query_language() {
        assert_eq!(
            parse("golden retriever").unwrap(),
            vec![text("golden retriever", 1.0)]
        );
        assert_eq!(
            parse(r#""golden retriever" + 0.5*image:42 - "people""#).unwrap(),
            vec![
                text("golden retriever", 1.0),
                Term {
                    kind: TermKind::Photo(42),
                    weight: 0.5
                },
                text("people", -1.0)
            ]
        );
        assert_eq!(
            parse("dog - cat").unwrap(),
            vec![text("dog", 1.0), text("cat", -1.0)]
        );
        assert_eq!(
            parse("a red t-shirt").unwrap(),
            vec![text("a red t-shirt", 1.0)]
        );
        assert_eq!(
            parse("2 * beach + 3 dogs").unwrap(),
            vec![text("beach", 2.0), text("3 dogs", 1.0)]
        );
        assert_eq!(
            parse("image:holidays/IMG_2041.jpg").unwrap(),
            vec![Term {
                kind: TermKind::PhotoPath("holidays/IMG_2041.jpg".into()),
                weight: 1.0
            }]
        );
        assert_eq!(
            parse(r#"- "people" + sea"#).unwrap(),
            vec![text("people", -1.0), text("sea", 1.0)]
        );
    }

    #[test]
    fn rejects_bad_queries() {
        for bad in ["", "   ", r#""unclosed"#, "dog +", r#""""#, r#""a" "b""#] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(
            parse(&"x".repeat(MAX_QUERY_CHARS + 1))
                .unwrap_err()
                .0
                .contains("too long")
        );
        assert!(parse(&vec!["a"; MAX_TERMS + 1].join(" + ")).is_err());
        assert!(parse("500*dog").is_err());
    }

    #[test]
    fn structured_terms_need_one_kind() {
        assert!(
            TermSpec {
                text: Some("x".into()),
                photo: Some(1),
                ..Default::default()
            }
            .to_term()
            .is_err()
        );
        assert!(TermSpec::default().to_term().is_err());
        assert_eq!(
            TermSpec {
                photo: Some(3),
                weight: Some(-0.5),
                ..Default::default()
            }
            .to_term()
            .unwrap(),
            Term {
                kind: TermKind::Photo(3),
                weight: -0.5
            }
        );
    }
}
