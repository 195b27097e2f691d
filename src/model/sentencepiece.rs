//! SentencePiece, read from a `spiece.model` file and run as the C++ library
//! runs it, without Python: the model protobuf, the normaliser (the
//! precompiled character map, a darts-clone double array, plus the whitespace
//! rules), and the Unigram model's Viterbi segmentation with its tie-breaking,
//! unknown-piece merging and byte fallback.
//!
//! Reference: `sentencepiece` (`normalizer.cc`, `unigram_model.cc`,
//! `sentencepiece_processor.cc`); checked id for id against it in `tests/`.

use std::collections::HashMap;

use super::{Error, Result};

/// The kinds of piece `sentencepiece_model.proto` defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Clone, Debug)]
struct Piece {
    text: String,
    score: f32,
    kind: Kind,
}

/// A loaded Unigram SentencePiece model.
#[derive(Clone, Debug)]
pub struct SentencePiece {
    pieces: Vec<Piece>,
    /// The pieces the segmentation may use (normal, user-defined, unused).
    lookup: HashMap<String, u32>,
    /// Every piece, for `piece_to_id`.
    ids: HashMap<String, u32>,
    longest_piece: usize,
    unk_id: u32,
    min_score: f32,
    max_score: f32,
    byte_fallback: bool,
    normalizer: Normalizer,
}

/// What the C++ library adds to an unknown character's score: `min_score - 10`.
const UNK_PENALTY: f32 = 10.0;
const SPACE: &str = "\u{2581}";

impl SentencePiece {
    /// Parses the bytes of a `spiece.model` (a serialised `ModelProto`).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let bad = |what: &str| {
            Error::Tokenizer(format!("spiece.model is not a SentencePiece model: {what}"))
        };
        let mut pieces = Vec::new();
        let mut model_type = 1u64;
        let mut byte_fallback = false;
        let mut unk_id = 0u64;
        let mut normalizer = Normalizer::default();
        for field in Fields::new(bytes) {
            let field = field.map_err(|e| bad(e))?;
            match (field.number, field.value) {
                (1, Value::Bytes(b)) => pieces.push(parse_piece(b).map_err(|e| bad(e))?),
                (2, Value::Bytes(b)) => {
                    for f in Fields::new(b) {
                        match f.map_err(|e| bad(e))? {
                            Field {
                                number: 3,
                                value: Value::Varint(v),
                            } => model_type = v,
                            Field {
                                number: 35,
                                value: Value::Varint(v),
                            } => byte_fallback = v != 0,
                            Field {
                                number: 40,
                                value: Value::Varint(v),
                            } => unk_id = v,
                            Field {
                                number: 24,
                                value: Value::Varint(v),
                            } if v != 0 => {
                                return Err(Error::Tokenizer(
                                    "spiece.model treats whitespace as a suffix, which clipdex does not support".into(),
                                ));
                            }
                            _ => {}
                        }
                    }
                }
                (3, Value::Bytes(b)) => normalizer = Normalizer::parse(b).map_err(|e| bad(&e))?,
                _ => {}
            }
        }
        if model_type != 1 {
            let name = match model_type {
                2 => "BPE",
                3 => "word",
                4 => "char",
                _ => "unknown",
            };
            return Err(Error::Tokenizer(format!(
                "spiece.model is a {name} model; clipdex reads SentencePiece Unigram models (SigLIP's)"
            )));
        }
        if pieces.is_empty() {
            return Err(bad("no pieces"));
        }
        let unk_id = unk_id as u32;
        if pieces.get(unk_id as usize).map(|p: &Piece| p.kind) != Some(Kind::Unknown) {
            return Err(bad("the unknown piece is missing"));
        }
        let mut lookup = HashMap::new();
        let mut ids = HashMap::new();
        let (mut min_score, mut max_score) = (f32::MAX, f32::MIN);
        for (i, p) in pieces.iter().enumerate() {
            ids.entry(p.text.clone()).or_insert(i as u32);
            if matches!(p.kind, Kind::Normal | Kind::UserDefined | Kind::Unused) {
                lookup.entry(p.text.clone()).or_insert(i as u32);
            }
            if p.kind == Kind::Normal {
                min_score = min_score.min(p.score);
                max_score = max_score.max(p.score);
            }
        }
        let longest_piece = lookup.keys().map(String::len).max().unwrap_or(1);
        Ok(Self {
            pieces,
            lookup,
            ids,
            longest_piece,
            unk_id,
            min_score,
            max_score,
            byte_fallback,
            normalizer,
        })
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    pub fn unk_id(&self) -> u32 {
        self.unk_id
    }

    /// The id of a piece, the unknown id when there is none (`PieceToId`).
    pub fn piece_to_id(&self, piece: &str) -> u32 {
        self.ids.get(piece).copied().unwrap_or(self.unk_id)
    }

    /// Pieces of a text (`EncodeAsPieces`): normalised, segmented, runs of
    /// unknown characters merged into one piece.
    pub fn encode(&self, text: &str) -> Vec<(String, u32)> {
        let normalized = self.normalizer.normalize(text);
        let mut out: Vec<(String, u32)> = Vec::new();
        let mut prev_unk = false;
        for (start, end, id) in self.viterbi(&normalized) {
            let piece = &normalized[start..end];
            let is_unk = id == self.unk_id;
            if is_unk && self.byte_fallback {
                for b in piece.bytes() {
                    let name = format!("<0x{b:02X}>");
                    out.push((
                        name.clone(),
                        self.ids.get(&name).copied().unwrap_or(self.unk_id),
                    ));
                }
            } else if is_unk && prev_unk {
                out.last_mut().expect("a previous piece").0.push_str(piece);
            } else {
                out.push((piece.to_string(), id));
            }
            prev_unk = is_unk;
        }
        out
    }

    /// The best segmentation of a normalised text: (start, end, id) per piece.
    ///
    /// The C++ library's optimised Viterbi: positions advance by one
    /// character; at each, every piece that starts there is tried shortest
    /// first, and a later candidate replaces the best path into a position
    /// only when strictly better. A character that no one-character piece
    /// covers is the unknown piece, scored `min_score - 10`.
    fn viterbi(&self, text: &str) -> Vec<(usize, usize, u32)> {
        #[derive(Clone, Copy)]
        struct Best {
            id: u32,
            score: f32,
            start: Option<usize>,
        }
        let n = text.len();
        let mut best = vec![
            Best {
                id: 0,
                score: 0.0,
                start: None
            };
            n + 1
        ];
        let unk_score = self.min_score - UNK_PENALTY;
        let mut start = 0;
        while start < n {
            let here = best[start].score;
            let char_len = text[start..].chars().next().map_or(1, char::len_utf8);
            let mut single = false;
            let mut end = start;
            for c in text[start..].chars() {
                end += c.len_utf8();
                if end - start > self.longest_piece {
                    break;
                }
                let Some(&id) = self.lookup.get(&text[start..end]) else {
                    continue;
                };
                let piece = &self.pieces[id as usize];
                if piece.kind == Kind::Unused {
                    continue;
                }
                let score = if piece.kind == Kind::UserDefined {
                    ((end - start) as f32 * self.max_score) as f64 - 0.1
                } else {
                    piece.score as f64
                };
                let candidate = (score + here as f64) as f32;
                let target = &mut best[end];
                if target.start.is_none() || candidate > target.score {
                    *target = Best {
                        id,
                        score: candidate,
                        start: Some(start),
                    };
                }
                single |= end - start == char_len;
            }
            if !single {
                let target = &mut best[start + char_len];
                let candidate = unk_score + here;
                if target.start.is_none() || candidate > target.score {
                    *target = Best {
                        id: self.unk_id,
                        score: candidate,
                        start: Some(start),
                    };
                }
            }
            start += char_len;
        }
        let mut path = Vec::new();
        let mut end = n;
        while end > 0 {
            let node = best[end];
            let start = node.start.expect("every position is reached");
            path.push((start, end, node.id));
            end = start;
        }
        path.reverse();
        path
    }
}

fn parse_piece(bytes: &[u8]) -> Result<Piece, &'static str> {
    let mut piece = Piece {
        text: String::new(),
        score: 0.0,
        kind: Kind::Normal,
    };
    for field in Fields::new(bytes) {
        match field? {
            Field {
                number: 1,
                value: Value::Bytes(b),
            } => {
                piece.text = String::from_utf8(b.to_vec()).map_err(|_| "a piece is not UTF-8")?;
            }
            Field {
                number: 2,
                value: Value::Fixed32(v),
            } => piece.score = f32::from_bits(v),
            Field {
                number: 3,
                value: Value::Varint(v),
            } => {
                piece.kind = match v {
                    1 => Kind::Normal,
                    2 => Kind::Unknown,
                    3 => Kind::Control,
                    4 => Kind::UserDefined,
                    5 => Kind::Unused,
                    6 => Kind::Byte,
                    _ => return Err("a piece has an unknown type"),
                }
            }
            _ => {}
        }
    }
    Ok(piece)
}

/// `NormalizerSpec`: the character map and the whitespace rules.
#[derive(Clone, Debug)]
struct Normalizer {
    map: Option<CharsMap>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

impl Default for Normalizer {
    fn default() -> Self {
        Self {
            map: None,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

impl Normalizer {
    fn parse(bytes: &[u8]) -> Result<Self, String> {
        let mut n = Self::default();
        for field in Fields::new(bytes) {
            match field? {
                Field {
                    number: 2,
                    value: Value::Bytes(b),
                } if !b.is_empty() => n.map = Some(CharsMap::parse(b)?),
                Field {
                    number: 3,
                    value: Value::Varint(v),
                } => n.add_dummy_prefix = v != 0,
                Field {
                    number: 4,
                    value: Value::Varint(v),
                } => n.remove_extra_whitespaces = v != 0,
                Field {
                    number: 5,
                    value: Value::Varint(v),
                } => n.escape_whitespaces = v != 0,
                _ => {}
            }
        }
        Ok(n)
    }

    /// The replacement for the longest rule matching the start of `input`
    /// and the bytes it consumes; one character unchanged when none does.
    fn prefix<'a>(&'a self, input: &'a [u8]) -> (&'a [u8], usize) {
        if let Some((value, len)) = self.map.as_ref().and_then(|m| m.longest_prefix(input)) {
            let blob = &self.map.as_ref().expect("matched").normalized;
            let rest = &blob[value..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            return (&rest[..end], len);
        }
        match utf8_char_len(input) {
            Some(len) => (&input[..len], len),
            // A malformed byte becomes U+FFFD and consumes one byte.
            None => ("\u{FFFD}".as_bytes(), 1),
        }
    }

    fn normalize(&self, text: &str) -> String {
        let mut input = text.as_bytes();
        if self.remove_extra_whitespaces {
            while !input.is_empty() {
                let (out, used) = self.prefix(input);
                if out != b" " {
                    break;
                }
                input = &input[used..];
            }
        }
        let mut out: Vec<u8> = Vec::with_capacity(text.len() + 3);
        if input.is_empty() {
            return String::new();
        }
        let space: &[u8] = if self.escape_whitespaces {
            SPACE.as_bytes()
        } else {
            b" "
        };
        if self.add_dummy_prefix {
            out.extend_from_slice(space);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        while !input.is_empty() {
            let (mut piece, used) = self.prefix(input);
            while prev_space && piece.first() == Some(&b' ') {
                piece = &piece[1..];
            }
            if !piece.is_empty() {
                for &b in piece {
                    if self.escape_whitespaces && b == b' ' {
                        out.extend_from_slice(SPACE.as_bytes());
                    } else {
                        out.push(b);
                    }
                }
                prev_space = piece.last() == Some(&b' ');
            }
            input = &input[used..];
            if !self.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        // The map's outputs are UTF-8, and so is every copied character.
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }
}

/// The length of the UTF-8 character at the start of `b`, if it is valid.
fn utf8_char_len(b: &[u8]) -> Option<usize> {
    let len = match b.first()? {
        0x00..=0x7F => 1,
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => return None,
    };
    std::str::from_utf8(b.get(..len)?).ok().map(|_| len)
}

/// The precompiled character map: a darts-clone double-array trie over
/// input byte strings whose values are offsets of NUL-terminated outputs.
#[derive(Clone, Debug)]
struct CharsMap {
    units: Vec<u32>,
    normalized: Vec<u8>,
}

impl CharsMap {
    fn parse(b: &[u8]) -> Result<Self, String> {
        let size = u32::from_le_bytes(
            b.get(..4)
                .ok_or("short character map")?
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        let trie = b
            .get(4..4 + size)
            .ok_or("character map trie past the end")?;
        if size % 4 != 0 || size == 0 {
            return Err("character map trie size is not whole units".into());
        }
        let units = trie
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Ok(Self {
            units,
            normalized: b[4 + size..].to_vec(),
        })
    }

    /// darts-clone's `commonPrefixSearch`, keeping the longest match: (value, length).
    fn longest_prefix(&self, key: &[u8]) -> Option<(usize, usize)> {
        let unit = |i: usize| self.units.get(i).copied();
        let offset = |u: u32| ((u >> 10) << ((u & (1 << 9)) >> 6)) as usize;
        let has_leaf = |u: u32| (u >> 8) & 1 == 1;
        let label = |u: u32| u & ((1 << 31) | 0xFF);
        let value = |u: u32| (u & ((1 << 31) - 1)) as usize;
        let mut pos = offset(unit(0)?);
        let mut found = None;
        for (i, &byte) in key.iter().enumerate() {
            pos ^= byte as usize;
            let u = unit(pos)?;
            if label(u) != byte as u32 {
                break;
            }
            pos ^= offset(u);
            if has_leaf(u) {
                let leaf = unit(pos)?;
                if value(leaf) < self.normalized.len() {
                    found = Some((value(leaf), i + 1));
                }
            }
        }
        found
    }
}

/// A protobuf field: its number and wire value.
struct Field<'a> {
    number: u64,
    value: Value<'a>,
}

enum Value<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// The fields of one protobuf message, in order.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.rest.split_first().ok_or("truncated varint")?;
            self.rest = rest;
            v |= ((b & 0x7F) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long")
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.rest.len() < n {
            return Err("field past the end");
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let mut field = || -> Result<Field<'a>, &'static str> {
            let key = self.varint()?;
            let value = match key & 7 {
                0 => Value::Varint(self.varint()?),
                1 => {
                    self.take(8)?;
                    Value::Fixed64
                }
                2 => {
                    let n = self.varint()? as usize;
                    Value::Bytes(self.take(n)?)
                }
                5 => Value::Fixed32(u32::from_le_bytes(
                    self.take(4)?.try_into().expect("4 bytes"),
                )),
                _ => return Err("unsupported wire type"),
            };
            Ok(Field {
                number: key >> 3,
                value,
            })
        };
        let out = field();
        if out.is_err() {
            self.rest = &[];
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_is_not_a_model() {
        for bytes in [
            &b""[..],
            b"\x0a\xff",
            b"not a protobuf at all",
            &[0x0a, 0x02, 0x0a, 0x00],
        ] {
            assert!(SentencePiece::from_bytes(bytes).is_err());
        }
    }

    #[test]
    fn fields_survive_garbage() {
        let fields: Vec<_> = Fields::new(&[0x08, 0x96, 0x01, 0x12, 0x05, b'a']).collect();
        assert!(matches!(
            fields[0],
            Ok(Field {
                number: 1,
                value: Value::Varint(150)
            })
        ));
        assert!(fields[1].is_err());
        assert_eq!(fields.len(), 2);
    }
}
