//! CLIP's byte-level BPE tokenizer, as transformers' `CLIPTokenizer` runs it.
//!
//! The pipeline is the one the reference builds: NFC, whitespace runs to one
//! space, lower-casing; CLIP's word regex, then byte-level mapping; BPE with a
//! `</w>` end-of-word suffix; start and end tokens around at most 77 ids, the
//! end token kept when a text is truncated. It is read from `tokenizer.json`
//! or, for checkpoints that ship only `vocab.json` and `merges.txt`, built from
//! those with the same settings.

use std::path::Path;

use tokenizers::Tokenizer;

use super::{Error, Result};

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    max_len: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("bos", &self.bos).field("eos", &self.eos).finish()
    }
}

impl ClipTokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_tokenizer_json(path: &Path, max_len: usize) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", path.display())))?;
        Self::new(inner, max_len)
    }

    /// Builds the tokenizer from `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path, max_len: usize) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", p.display())))
        };
        let vocab: serde_json::Value = serde_json::from_str(&read(vocab)?)
            .map_err(|e| Error::Tokenizer(format!("vocab.json is not valid JSON: {e}")))?;
        let merges: Vec<serde_json::Value> = read(merges)?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|l| {
                let mut parts = l.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok(serde_json::json!([a, b])),
                    _ => Err(Error::Tokenizer(format!("merges.txt has a malformed line: {l:?}"))),
                }
            })
            .collect::<Result<_>>()?;
        let json = tokenizer_json(vocab, merges);
        let inner = Tokenizer::from_bytes(json.to_string().as_bytes())
            .map_err(|e| Error::Tokenizer(format!("cannot build tokenizer from vocab.json and merges.txt: {e}")))?;
        Self::new(inner, max_len)
    }

    fn new(mut inner: Tokenizer, max_len: usize) -> Result<Self> {
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| Error::Tokenizer(format!("the vocabulary has no {t} token")))
        };
        let (bos, eos) = (id(START_OF_TEXT)?, id(END_OF_TEXT)?);
        if max_len < 2 {
            return Err(Error::Tokenizer(format!("a context of {max_len} tokens leaves no room for start and end")));
        }
        // Start, end and truncation are added here, not by the file's settings.
        inner.with_truncation(None).map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        Ok(Self { inner, bos, eos, max_len })
    }

    /// BPE ids of a text, without start and end tokens or truncation.
    pub fn encode_words(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of one text: start token, at most `max_len - 2` BPE tokens,
    /// end token (truncation keeps the end token, as the reference's does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut words = self.encode_words(text)?;
        words.truncate(self.max_len - 2);
        let mut ids = Vec::with_capacity(words.len() + 2);
        ids.push(self.bos);
        ids.extend(words);
        ids.push(self.eos);
        Ok(ids)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Where the text tower pools: the first end-of-text token, as the
    /// reference does (a literal `<|endoftext|>` inside a text ends it early).
    pub fn pool_position(&self, ids: &[u32]) -> usize {
        ids.iter().position(|&t| t == self.eos).unwrap_or(ids.len().saturating_sub(1))
    }
}

/// The `tokenizer.json` that transformers' `CLIPTokenizer` builds from a vocabulary and merges.
fn tokenizer_json(vocab: serde_json::Value, merges: Vec<serde_json::Value>) -> serde_json::Value {
    let special = |id: &serde_json::Value, content: &str| {
        serde_json::json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        })
    };
    let bos = vocab.get(START_OF_TEXT).cloned().unwrap_or(serde_json::Value::Null);
    let eos = vocab.get(END_OF_TEXT).cloned().unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(&bos, START_OF_TEXT), special(&eos, END_OF_TEXT)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Lowercase"}
        ]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex":
                "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+"},
             "behavior": "Removed", "invert": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": END_OF_TEXT, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    })
}
