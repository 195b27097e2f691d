//! Filters typed in the query box: fields and English date phrases.
//!
//! ```text
//! beach July 2023                     "beach", taken in July 2023
//! after:2019-06 before:2020 dog       taken from June 2019 to the end of 2019
//! in:holidays/2019 camera:canon       a folder (and below), a camera's words
//! type:png,webp  in:"summer trip"     file types; quotes keep spaces
//! tag:dog tag:"palm tree"             automatic tags, every one of them
//! sunset summer 2019 | 2018-2020 | the 1990s | last year | since 2021
//! ```
//!
//! [`extract`] takes the filters out of the text; the words left are
//! searched by meaning. `after:X` starts at the beginning of X and
//! `before:X` ends just before it, so `after:2019-06 before:2019-09` is
//! June to August. Date phrases name their whole period ("July 2023" is
//! the 1st to the 31st). Seasons are the northern hemisphere's: winter
//! 2019 runs from December 2019 to February 2020. Relative phrases ("last
//! year") count from the server's clock, in UTC like every date of the
//! index. Text in quotes is never read as a filter.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::query::ParseError;
use crate::common::time::{format_datetime, parse_datetime};

/// A filter the query box understood, for the page to show as a chip.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Understood {
    /// `date`, `after`, `before`, `folder`, `camera` or `type`.
    pub field: String,
    /// What it means, in words: "taken in July 2023".
    pub label: String,
    /// The words of the query it came from, as typed; removing them from
    /// the query removes the filter.
    pub text: String,
}

/// The query box's filters, taken out of its text.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extracted {
    /// The text left, to search by meaning (may be empty).
    pub text: String,
    /// Taken at or after, seconds since the epoch.
    pub from: Option<i64>,
    /// Taken at or before.
    pub to: Option<i64>,
    pub folder: Option<String>,
    pub camera: Option<String>,
    pub types: Vec<String>,
    /// Tags (normalised names).
    pub tags: Vec<String>,
    pub understood: Vec<Understood>,
}

/// A span of time, both ends included, in seconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Period {
    start: i64,
    end: i64,
}

const MONTHS: [&str; 12] = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];

/// One piece of the query: a word, or quoted text kept whole.
#[derive(Clone, Debug)]
struct Token {
    text: String,
    quoted: bool,
    /// A field name ending in `:` that runs into the quoted token after it.
    joined_to_next: bool,
}

fn tokens(input: &str) -> Result<Vec<Token>, ParseError> {
    let mut out = Vec::new();
    let mut chars = input.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        if c == '"' {
            chars.next();
            let mut end = None;
            for (i, c) in chars.by_ref() {
                if c == '"' {
                    end = Some(i);
                    break;
                }
            }
            let end = end.ok_or_else(|| ParseError("unclosed quote".into()))?;
            out.push(Token {
                text: input[start..=end].to_string(),
                quoted: true,
                joined_to_next: false,
            });
            continue;
        }
        let mut end = input.len();
        let mut joined = false;
        while let Some(&(i, c)) = chars.peek() {
            if c.is_whitespace() {
                end = i;
                break;
            }
            if c == '"' {
                end = i;
                joined = input[start..i].ends_with(':');
                break;
            }
            chars.next();
        }
        out.push(Token {
            text: input[start..end].to_string(),
            quoted: false,
            joined_to_next: joined,
        });
    }
    Ok(out)
}

/// A word as date phrases read it: lower case, without trailing commas and
/// full stops.
fn plain(token: &Token) -> Option<String> {
    (!token.quoted).then(|| token.text.trim_end_matches([',', '.']).to_lowercase())
}

fn days_in_month(year: i64, month: i64) -> i64 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn day_start(year: i64, month: i64, day: i64) -> Option<i64> {
    parse_datetime(&format!("{year:04}-{month:02}-{day:02}"))
}

fn month_period(year: i64, month: i64) -> Option<Period> {
    let start = day_start(year, month, 1)?;
    Some(Period {
        start,
        end: start + days_in_month(year, month) * 86_400 - 1,
    })
}

fn years(first: i64, last: i64) -> Option<Period> {
    (first <= last).then_some(())?;
    Some(Period {
        start: day_start(first, 1, 1)?,
        end: day_start(last, 12, 31)? + 86_399,
    })
}

fn year_of(word: &str, now_year: i64) -> Option<i64> {
    let year: i64 = (word.len() == 4 && word.bytes().all(|b| b.is_ascii_digit()))
        .then(|| word.parse().ok())??;
    // Photographs begin in the 1820s; a "3000" in a query is not a date.
    (1826..=now_year + 1).contains(&year).then_some(year)
}

fn month_of(word: &str) -> Option<i64> {
    let word = word.trim_end_matches('.');
    if word.len() < 3 {
        return None;
    }
    MONTHS
        .iter()
        .position(|m| *m == word || (word.len() == 3 && m.starts_with(word)) || word == "sept")
        .map(|i| if word == "sept" { 9 } else { i as i64 + 1 })
}

fn day_of(word: &str) -> Option<i64> {
    let digits = word.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &word[digits.len()..];
    if !matches!(suffix, "" | "st" | "nd" | "rd" | "th") || digits.is_empty() || digits.len() > 2 {
        return None;
    }
    digits.parse().ok().filter(|d| (1..=31).contains(d))
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD` (the form fields take).
fn compact_period(value: &str) -> Option<Period> {
    let parts: Vec<&str> = value.split('-').collect();
    let num = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<i64>().ok())
            .flatten()
    };
    match parts.as_slice() {
        [y] => {
            let y = num(y, 4)?;
            years(y, y)
        }
        [y, m] => {
            let (y, m) = (num(y, 4)?, num(m, 2)?);
            (1..=12).contains(&m).then(|| month_period(y, m))?
        }
        [y, m, d] => {
            let start = parse_datetime(&format!("{}-{}-{}", y, m, d))?;
            (y.len() == 4).then_some(Period {
                start,
                end: start + 86_399,
            })
        }
        _ => None,
    }
}

/// The date phrase starting at `words[i]`: its period, how many words it
/// takes, and its label.
fn date_phrase(words: &[Option<String>], i: usize, now: i64) -> Option<(Period, usize, String)> {
    let w = |j: usize| words.get(j).and_then(|w| w.as_deref());
    let now_text = format_datetime(now);
    let now_year: i64 = now_text[..4].parse().ok()?;
    let now_month: i64 = now_text[5..7].parse().ok()?;
    let today = day_start(now_year, now_month, now_text[8..10].parse().ok()?)?;
    let first = w(i)?;
    // Relative phrases.
    let relative = match (first, w(i + 1)) {
        ("today", _) => Some((today, today + 86_399, 1, "today".to_string())),
        ("yesterday", _) => Some((today - 86_400, today - 1, 1, "yesterday".into())),
        ("this" | "last", Some(unit @ ("week" | "month" | "year"))) => {
            let last = first == "last";
            let (start, end) = match unit {
                "week" => {
                    // Weeks start on Monday; 1970-01-01 was a Thursday.
                    let monday = today - ((today / 86_400 + 3).rem_euclid(7)) * 86_400;
                    let start = if last { monday - 7 * 86_400 } else { monday };
                    (start, start + 7 * 86_400 - 1)
                }
                "month" => {
                    let (y, m) = match (last, now_month) {
                        (false, m) => (now_year, m),
                        (true, 1) => (now_year - 1, 12),
                        (true, m) => (now_year, m - 1),
                    };
                    let p = month_period(y, m)?;
                    (p.start, p.end)
                }
                _ => {
                    let p = years(now_year - i64::from(last), now_year - i64::from(last))?;
                    (p.start, p.end)
                }
            };
            Some((start, end, 2, format!("{first} {unit}")))
        }
        _ => None,
    };
    if let Some((start, end, n, label)) = relative {
        return Some((Period { start, end }, n, label));
    }
    // 2018-2020, 2018–2020, 2018 to 2020, between 2018 and 2020.
    for dash in ['-', '–'] {
        if let Some((a, b)) = first.split_once(dash) {
            if let (Some(a), Some(b)) = (year_of(a, now_year), year_of(b, now_year)) {
                return Some((years(a, b)?, 1, format!("{a} to {b}")));
            }
        }
    }
    let between = if first == "between" { 1 } else { 0 };
    if let (Some(a), Some("to" | "and"), Some(b)) = (
        w(i + between).and_then(|x| year_of(x, now_year)),
        w(i + between + 1),
        w(i + between + 2).and_then(|x| year_of(x, now_year)),
    ) {
        if between == 0 || w(i + 2) == Some("and") {
            return Some((years(a, b)?, 3 + between, format!("{a} to {b}")));
        }
    }
    // The 1990s, 1990s.
    let the = usize::from(first == "the");
    if let Some(decade) = w(i + the)
        .and_then(|x| x.strip_suffix('s'))
        .and_then(|x| year_of(x, now_year + 10))
        .filter(|y| y % 10 == 0)
    {
        return Some((
            years(decade, decade + 9)?,
            1 + the,
            format!("the {decade}s"),
        ));
    }
    // Seasons.
    let season = match first {
        "spring" => Some((3, "spring")),
        "summer" => Some((6, "summer")),
        "autumn" | "fall" => Some((9, "autumn")),
        "winter" => Some((12, "winter")),
        _ => None,
    };
    if let (Some((month, name)), Some(year)) = (season, w(i + 1).and_then(|x| year_of(x, now_year)))
    {
        let start = month_period(year, month)?.start;
        let (end_year, end_month) = if month == 12 {
            (year + 1, 2)
        } else {
            (year, month + 2)
        };
        let end = month_period(end_year, end_month)?.end;
        return Some((Period { start, end }, 2, format!("{name} {year}")));
    }
    // 14 July 2023, July 14 2023, July 14, 2023, July 2023.
    let day_month = || Some((day_of(first)?, w(i + 1).and_then(month_of)?));
    let month_day = || Some((w(i + 1).and_then(day_of)?, month_of(first)?));
    if let (Some((day, month)), Some(year)) = (
        day_month().or_else(month_day),
        w(i + 2).and_then(|x| year_of(x, now_year)),
    ) {
        let start = day_start(year, month, day)?;
        let label = format!("{day} {} {year}", title(MONTHS[month as usize - 1]));
        let day = Period {
            start,
            end: start + 86_399,
        };
        return Some((day, 3, label));
    }
    if let Some(month) = month_of(first) {
        if let Some(year) = w(i + 1).and_then(|x| year_of(x, now_year)) {
            let label = format!("{} {year}", title(MONTHS[month as usize - 1]));
            return Some((month_period(year, month)?, 2, label));
        }
    }
    // 2023-07-14, 2023-07, and a year alone.
    if first.contains('-') {
        let period = compact_period(first)?;
        return Some((period, 1, first.to_string()));
    }
    let year = year_of(first, now_year)?;
    Some((years(year, year)?, 1, year.to_string()))
}

fn title(word: &str) -> String {
    let mut c = word.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Takes the fields and date phrases out of `input`; `now` (seconds since
/// the epoch) anchors "last year" and the like.
pub fn extract(input: &str, now: i64) -> Result<Extracted, ParseError> {
    let tokens = tokens(input)?;
    let words: Vec<Option<String>> = tokens.iter().map(plain).collect();
    let mut out = Extracted::default();
    let mut keep = vec![true; tokens.len()];
    let mut i = 0;
    while i < tokens.len() {
        let token = &tokens[i];
        if !token.quoted {
            if let Some((name, value)) = token.text.split_once(':') {
                let field = name.to_lowercase();
                if matches!(
                    field.as_str(),
                    "after" | "before" | "in" | "camera" | "type" | "tag"
                ) {
                    let (value, used) = if value.is_empty() && token.joined_to_next {
                        let next = tokens.get(i + 1).map_or("", |t| t.text.as_str());
                        (next.trim_matches('"').to_string(), 2)
                    } else {
                        (value.to_string(), 1)
                    };
                    let text: Vec<&str> = tokens[i..i + used]
                        .iter()
                        .map(|t| t.text.as_str())
                        .collect();
                    field_value(&mut out, &field, value.trim(), text.concat())?;
                    keep[i..i + used].iter_mut().for_each(|k| *k = false);
                    i += used;
                    continue;
                }
            }
        }
        // A date phrase, with the word that leads into it ("in July 2023",
        // "from 2018 to 2020", "since 2021").
        let lead = words[i].as_deref();
        let skip = usize::from(matches!(
            lead,
            Some(
                "in" | "during" | "from" | "since" | "after" | "before" | "until" | "of" | "taken"
            )
        ));
        let Some((period, used, label)) = date_phrase(&words, i + skip, now) else {
            i += 1;
            continue;
        };
        let (from, to, label) = match lead {
            Some("since") => (Some(period.start), None, format!("since {label}")),
            Some("after") => (Some(period.end + 1), None, format!("after {label}")),
            Some("before") => (None, Some(period.start - 1), format!("before {label}")),
            Some("until") => (None, Some(period.end), format!("until {label}")),
            _ => (
                Some(period.start),
                Some(period.end),
                format!("taken in {label}"),
            ),
        };
        let end = i + skip + used;
        let text: Vec<&str> = tokens[i..end].iter().map(|t| t.text.as_str()).collect();
        narrow(&mut out, from, to);
        out.understood.push(Understood {
            field: "date".into(),
            label,
            text: text.join(" "),
        });
        keep[i..end].iter_mut().for_each(|k| *k = false);
        i = end;
    }
    out.text = rejoin(&tokens, &keep);
    Ok(out)
}

fn narrow(out: &mut Extracted, from: Option<i64>, to: Option<i64>) {
    if let Some(f) = from {
        out.from = Some(out.from.map_or(f, |o| o.max(f)));
    }
    if let Some(t) = to {
        out.to = Some(out.to.map_or(t, |o| o.min(t)));
    }
}

fn field_value(
    out: &mut Extracted,
    field: &str,
    value: &str,
    text: String,
) -> Result<(), ParseError> {
    let shown: String = value.chars().take(40).collect();
    if value.is_empty() {
        return Err(ParseError(format!(
            "{field}: needs a value, as in {field}:{}",
            match field {
                "after" | "before" => "2019-06",
                "in" => "holidays/2019",
                "camera" => "canon",
                "type" => "png",
                _ => "beach",
            }
        )));
    }
    let label = match field {
        "after" | "before" => {
            let period = compact_period(value).ok_or_else(|| {
                ParseError(format!(
                    "{field}:{shown} is not a date; use YYYY, YYYY-MM or YYYY-MM-DD"
                ))
            })?;
            if field == "after" {
                narrow(out, Some(period.start), None);
                format!("taken from {value}")
            } else {
                narrow(out, None, Some(period.start - 1));
                format!("taken before {value}")
            }
        }
        "in" => {
            let folder = value.trim_matches('/').to_string();
            if out.folder.as_ref().is_some_and(|f| *f != folder) {
                return Err(ParseError("give one in: folder".into()));
            }
            out.folder = Some(folder.clone());
            format!("in {folder}")
        }
        "camera" => {
            out.camera = Some(match out.camera.take() {
                Some(c) => format!("{c} {value}"),
                None => value.to_string(),
            });
            format!("camera {value}")
        }
        "type" => {
            out.types.extend(
                value
                    .split(',')
                    .map(|t| t.trim().to_lowercase())
                    .filter(|t| !t.is_empty()),
            );
            format!("type {value}")
        }
        _ => {
            let tag = crate::indexer::tags::normalize(value);
            if let Some(problem) = crate::indexer::tags::name_problem(&tag) {
                return Err(ParseError(format!("tag:{shown}: {problem}")));
            }
            out.tags.push(tag.clone());
            format!("tag {tag}")
        }
    };
    out.understood.push(Understood {
        field: match field {
            "in" => "folder".into(),
            other => other.into(),
        },
        label,
        text,
    });
    Ok(())
}

/// The kept tokens as text again, without operators left dangling where a
/// filter was taken out: "dog + July 2023" leaves "dog", and of two
/// operators that meet, the second (the next term's) stays.
fn rejoin(tokens: &[Token], keep: &[bool]) -> String {
    let is_op = |t: &str| t == "+" || t == "-";
    let mut out: Vec<&str> = Vec::new();
    for (token, _) in tokens.iter().zip(keep).filter(|(_, k)| **k) {
        let text = token.text.as_str();
        if !token.quoted && is_op(text) && out.last().is_some_and(|last| is_op(last)) {
            out.pop();
        }
        out.push(text);
    }
    while out.last().is_some_and(|last| is_op(last)) {
        out.pop();
    }
    if out.first() == Some(&"+") {
        out.remove(0);
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-01T12:00:00Z, a Tuesday.
    const NOW: i64 = 1_796_126_400;

    fn range(q: &str) -> (String, Option<String>, Option<String>) {
        let e = extract(q, NOW).unwrap();
        (
            e.text,
            e.from.map(format_datetime),
            e.to.map(format_datetime),
        )
    }

    fn span(from: &str, to: &str) -> (Option<String>, Option<String>) {
        (Some(from.to_string()), Some(to.to_string()))
    }

    #[test]
    fn date_phrases_become_periods_and_leave_the_words() {
        let cases = [
            (
                "beach July 2023",
                "beach",
                span("2023-07-01T00:00:00", "2023-07-31T23:59:59"),
            ),
            (
                "beach in july, 2023",
                "beach",
                span("2023-07-01T00:00:00", "2023-07-31T23:59:59"),
            ),
            (
                "sunset summer 2019",
                "sunset",
                span("2019-06-01T00:00:00", "2019-08-31T23:59:59"),
            ),
            (
                "snow winter 2019",
                "snow",
                span("2019-12-01T00:00:00", "2020-02-29T23:59:59"),
            ),
            (
                "dogs 2018-2020",
                "dogs",
                span("2018-01-01T00:00:00", "2020-12-31T23:59:59"),
            ),
            (
                "dogs from 2018 to 2020",
                "dogs",
                span("2018-01-01T00:00:00", "2020-12-31T23:59:59"),
            ),
            (
                "dogs between 2018 and 2020",
                "dogs",
                span("2018-01-01T00:00:00", "2020-12-31T23:59:59"),
            ),
            (
                "cars in the 1990s",
                "cars",
                span("1990-01-01T00:00:00", "1999-12-31T23:59:59"),
            ),
            (
                "party last year",
                "party",
                span("2025-01-01T00:00:00", "2025-12-31T23:59:59"),
            ),
            (
                "party this month",
                "party",
                span("2026-12-01T00:00:00", "2026-12-31T23:59:59"),
            ),
            (
                "party last month",
                "party",
                span("2026-11-01T00:00:00", "2026-11-30T23:59:59"),
            ),
            (
                "cake last week",
                "cake",
                span("2026-11-23T00:00:00", "2026-11-29T23:59:59"),
            ),
            (
                "cake yesterday",
                "cake",
                span("2026-11-30T00:00:00", "2026-11-30T23:59:59"),
            ),
            (
                "wedding 14 July 2023",
                "wedding",
                span("2023-07-14T00:00:00", "2023-07-14T23:59:59"),
            ),
            (
                "wedding Jul 14th, 2023",
                "wedding",
                span("2023-07-14T00:00:00", "2023-07-14T23:59:59"),
            ),
            (
                "wedding 2023-07-14",
                "wedding",
                span("2023-07-14T00:00:00", "2023-07-14T23:59:59"),
            ),
            (
                "feb 2024",
                "",
                span("2024-02-01T00:00:00", "2024-02-29T23:59:59"),
            ),
            (
                "dog 2019",
                "dog",
                span("2019-01-01T00:00:00", "2019-12-31T23:59:59"),
            ),
        ];
        for (q, text, (from, to)) in cases {
            assert_eq!(range(q), (text.to_string(), from, to), "{q}");
        }
        assert_eq!(
            range("dog since 2021"),
            ("dog".into(), Some("2021-01-01T00:00:00".into()), None)
        );
        assert_eq!(
            range("dog before 2021"),
            ("dog".into(), None, Some("2020-12-31T23:59:59".into()))
        );
        assert_eq!(
            range("dog after 2021"),
            ("dog".into(), Some("2022-01-01T00:00:00".into()), None)
        );
    }

    #[test]
    fn what_is_not_a_date_stays_text() {
        for q in [
            "1000 dogs",
            "3000 miles",
            "may flowers",
            "march of the penguins",
            "\"July 2023\" poster",
            "the 1984 book",
            "a fall in autumn",
            "room 101",
        ] {
            let e = extract(q, NOW).unwrap();
            if q == "the 1984 book" {
                // A year alone is a date: the query says which.
                assert_eq!(e.text, "the book");
                assert_eq!(e.understood[0].label, "taken in 1984");
                continue;
            }
            assert_eq!(e.text, q, "{q}");
            assert!(e.understood.is_empty() && e.from.is_none(), "{q}");
        }
    }

    #[test]
    fn fields_become_filters() {
        let e = extract(
            "dog after:2019-06 before:2020 in:holidays/2019/ camera:canon type:PNG,webp",
            NOW,
        )
        .unwrap();
        assert_eq!(e.text, "dog");
        assert_eq!(
            e.from.map(format_datetime).as_deref(),
            Some("2019-06-01T00:00:00")
        );
        assert_eq!(
            e.to.map(format_datetime).as_deref(),
            Some("2019-12-31T23:59:59")
        );
        assert_eq!(e.folder.as_deref(), Some("holidays/2019"));
        assert_eq!(e.camera.as_deref(), Some("canon"));
        assert_eq!(e.types, ["png", "webp"]);
        let fields: Vec<&str> = e.understood.iter().map(|u| u.field.as_str()).collect();
        assert_eq!(fields, ["after", "before", "folder", "camera", "type"]);
        assert_eq!(e.understood[2].text, "in:holidays/2019/");

        let e = extract("beach tag:Dog tag:\"palm   tree\"", NOW).unwrap();
        assert_eq!(e.text, "beach");
        assert_eq!(e.tags, ["dog", "palm tree"]);
        assert_eq!(e.understood[1].label, "tag palm tree");

        let e = extract("in:\"summer trip\" camera:\"eos 5d\" kids", NOW).unwrap();
        assert_eq!(e.text, "kids");
        assert_eq!(e.folder.as_deref(), Some("summer trip"));
        assert_eq!(e.camera.as_deref(), Some("eos 5d"));
        assert_eq!(e.understood[0].text, "in:\"summer trip\"");
    }

    #[test]
    fn operators_left_dangling_go() {
        assert_eq!(extract("\"dog\" + July 2023", NOW).unwrap().text, "\"dog\"");
        assert_eq!(
            extract("dog + after:2019 - cat", NOW).unwrap().text,
            "dog - cat"
        );
        assert_eq!(
            extract("dog - after:2019 + cat", NOW).unwrap().text,
            "dog + cat"
        );
        assert_eq!(extract("- cat 2019", NOW).unwrap().text, "- cat");
        assert_eq!(
            extract("image:42 + beach", NOW).unwrap().text,
            "image:42 + beach"
        );
    }

    #[test]
    fn bad_fields_say_what_is_wrong() {
        for (q, says) in [
            ("after:2019-13 dog", "after:2019-13 is not a date"),
            ("before:yesterday", "before:yesterday is not a date"),
            ("dog after:", "after: needs a value"),
            ("tag:\"a,b\"", "may not"),
            ("in:a in:b", "one in: folder"),
            ("\"open quote", "unclosed quote"),
        ] {
            let e = extract(q, NOW).unwrap_err();
            assert!(e.0.contains(says), "{q}: {}", e.0);
        }
    }
}
