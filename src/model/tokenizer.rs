//! The text tokenizers: CLIP's byte-level BPE, and SigLIP's fixed-length ones
//! (`spiece.model` as `SiglipTokenizer` runs it, or a `tokenizer.json` such as
//! SigLIP 2's Gemma tokenizer).
//!
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

use super::checkpoint::TokenizerFiles;
use super::config::TokenizerKind;
use super::sentencepiece::SentencePiece;
use super::simple_tokenizer::SimpleTokenizer;
use super::{ClipConfig, Error, Family, Result};

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
        f.debug_struct("ClipTokenizer")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
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
            std::fs::read_to_string(p)
                .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", p.display())))
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
                    _ => Err(Error::Tokenizer(format!(
                        "merges.txt has a malformed line: {l:?}"
                    ))),
                }
            })
            .collect::<Result<_>>()?;
        let json = tokenizer_json(vocab, merges);
        let inner = Tokenizer::from_bytes(json.to_string().as_bytes()).map_err(|e| {
            Error::Tokenizer(format!(
                "cannot build tokenizer from vocab.json and merges.txt: {e}"
            ))
        })?;
        Self::new(inner, max_len)
    }

    fn new(mut inner: Tokenizer, max_len: usize) -> Result<Self> {
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| Error::Tokenizer(format!("the vocabulary has no {t} token")))
        };
        let (bos, eos) = (id(START_OF_TEXT)?, id(END_OF_TEXT)?);
        if max_len < 2 {
            return Err(Error::Tokenizer(format!(
                "a context of {max_len} tokens leaves no room for start and end"
            )));
        }
        // Start, end and truncation are added here, not by the file's settings.
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        Ok(Self {
            inner,
            bos,
            eos,
            max_len,
        })
    }

    /// BPE ids of a text, without start and end tokens or truncation.
    pub fn encode_words(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
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
        ids.iter()
            .position(|&t| t == self.eos)
            .unwrap_or(ids.len().saturating_sub(1))
    }
}

/// OpenAI's CLIP tokenizer as a `tokenizer.json`, shipped inside clipdex
/// (models trained from scratch, open_clip checkpoints without tokenizer files).
pub fn builtin_clip_tokenizer_json() -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&include_bytes!("clip_tokenizer.json.gz")[..])
        .read_to_end(&mut out)
        .expect("the built-in tokenizer is valid gzip");
    out
}

/// The `tokenizer.json` that transformers' `CLIPTokenizer` builds from a vocabulary and merges.
fn tokenizer_json(vocab: serde_json::Value, merges: Vec<serde_json::Value>) -> serde_json::Value {
    let special = |id: &serde_json::Value, content: &str| {
        serde_json::json!({
            "id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        })
    };
    let bos = vocab
        .get(START_OF_TEXT)
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let eos = vocab
        .get(END_OF_TEXT)
        .cloned()
        .unwrap_or(serde_json::Value::Null);
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

/// The settings of a `tokenizer_config.json` that change ids.
#[derive(Clone, Debug, Default)]
pub struct TokenizerSettings {
    pub tokenizer_class: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    /// Every special (added) token's text.
    pub special_tokens: Vec<String>,
    pub do_lower_case: Option<bool>,
    pub padding_side: Option<String>,
}

impl TokenizerSettings {
    /// Reads the text of a `tokenizer_config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            Error::Tokenizer(format!("tokenizer_config.json is not valid JSON: {e}"))
        })?;
        // A token is a string or an `AddedToken` object with its `content`.
        let token = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        let field = |name: &str| value.get(name).and_then(token);
        let mut special: Vec<String> = Vec::new();
        if let Some(map) = value
            .get("added_tokens_decoder")
            .and_then(|v| v.as_object())
        {
            special.extend(
                map.values()
                    .filter(|t| t.get("special").and_then(|s| s.as_bool()) != Some(false))
                    .filter_map(token),
            );
        }
        for list in ["additional_special_tokens", "extra_special_tokens"] {
            if let Some(items) = value.get(list).and_then(|v| v.as_array()) {
                special.extend(items.iter().filter_map(token));
            }
        }
        let settings = Self {
            tokenizer_class: value
                .get("tokenizer_class")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            eos_token: field("eos_token"),
            unk_token: field("unk_token"),
            pad_token: field("pad_token"),
            special_tokens: special,
            do_lower_case: value.get("do_lower_case").and_then(|v| v.as_bool()),
            padding_side: value
                .get("padding_side")
                .and_then(|v| v.as_str())
                .map(str::to_string),
        };
        if let Some(side) = settings.padding_side.as_deref() {
            if side != "left" && side != "right" {
                return Err(Error::Tokenizer(format!(
                    "tokenizer_config.json: padding_side {side:?} is neither left nor right"
                )));
            }
        }
        Ok(settings)
    }
}

/// The tokenizer of a checkpoint: CLIP's BPE, or a fixed-length one for SigLIP.
#[derive(Clone, Debug)]
pub enum TextTokenizer {
    /// Start and end tokens, at most 77 ids, unpadded; pooled at the end token.
    Clip(ClipTokenizer),
    /// Ids padded to exactly the model's context; pooled at the last position.
    Fixed(FixedTokenizer),
    /// open_clip's own: CLIP's vocabulary, its cleaning and special tokens,
    /// pooled at the largest id.
    OpenClip(SimpleTokenizer),
    /// A Hugging Face tokenizer inside an open_clip model (`HFTokenizer`):
    /// XLM-RoBERTa's; unpadded rows, the tower masks and mean-pools.
    Hf(HfTokenizer),
}

impl TextTokenizer {
    /// The tokenizer a model of `family` reads from these files.
    pub fn load(
        family: Family,
        files: &TokenizerFiles,
        settings: &TokenizerSettings,
        context: usize,
    ) -> Result<Self> {
        Ok(match (family, files) {
            (Family::Clip, TokenizerFiles::Json(path)) => {
                Self::Clip(ClipTokenizer::from_tokenizer_json(path, context)?)
            }
            (Family::Clip, TokenizerFiles::VocabMerges { vocab, merges }) => {
                Self::Clip(ClipTokenizer::from_vocab_merges(vocab, merges, context)?)
            }
            (Family::Siglip, TokenizerFiles::Json(path)) => Self::Fixed(
                FixedTokenizer::from_tokenizer_json(path, settings, context)?,
            ),
            (Family::Siglip, TokenizerFiles::SentencePiece(path)) => {
                Self::Fixed(FixedTokenizer::from_spiece(path, settings, context)?)
            }
            (family, files) => {
                let found = match files {
                    TokenizerFiles::Json(_) => "tokenizer.json",
                    TokenizerFiles::SentencePiece(_) => "spiece.model",
                    TokenizerFiles::Merges(_) => "merges.txt alone",
                    TokenizerFiles::OpenAiBuiltin => "none",
                    TokenizerFiles::VocabMerges { .. } => "vocab.json and merges.txt",
                };
                return Err(Error::Config(format!(
                    "a {} model with {found} as its tokenizer: CLIP models take tokenizer.json or vocab.json and \
                     merges.txt, SigLIP models spiece.model or tokenizer.json",
                    family.name()
                )));
            }
        })
    }

    /// The tokenizer a model with `config` reads from these files: the one
    /// its config names (open_clip's), else its family's.
    pub fn for_config(
        config: &ClipConfig,
        files: &TokenizerFiles,
        settings: &TokenizerSettings,
    ) -> Result<Self> {
        let t = &config.text_config;
        let context = t.max_position_embeddings;
        match (config.tokenizer, files) {
            (None, files) => Self::load(config.family, files, settings, context),
            (
                Some(TokenizerKind::OpenClip),
                TokenizerFiles::Merges(p) | TokenizerFiles::Json(p),
            ) => Ok(Self::OpenClip(SimpleTokenizer::from_file(p, context)?)),
            (Some(TokenizerKind::OpenClip), TokenizerFiles::OpenAiBuiltin) => {
                Ok(Self::OpenClip(SimpleTokenizer::openai(context)?))
            }
            (Some(TokenizerKind::OpenClipHf), TokenizerFiles::Json(p)) => {
                let len = t.hf_tower.as_ref().map_or(context, |hf| hf.context_length);
                Ok(Self::Hf(HfTokenizer::from_file(
                    p,
                    len,
                    t.pad_token_id.unwrap_or(1),
                )?))
            }
            (Some(kind), files) => Err(Error::Config(format!(
                "the model's tokenizer is {kind:?}, but the checkpoint's tokenizer files are {files:?}"
            ))),
        }
    }

    /// Ids of one text, ready for the text tower.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Clip(t) => t.encode(text),
            Self::Fixed(t) => t.encode(text),
            Self::OpenClip(t) => t.encode(text),
            Self::Hf(t) => t.encode(text),
        }
    }

    /// The id rows of a batch are padded with.
    pub fn pad_id(&self) -> u32 {
        match self {
            Self::Clip(t) => t.eos_id(),
            Self::Fixed(t) => t.pad,
            Self::OpenClip(_) => 0,
            Self::Hf(t) => t.pad,
        }
    }

    /// Where the text tower pools a row of ids.
    pub fn pool_position(&self, ids: &[u32]) -> usize {
        match self {
            Self::Clip(t) => t.pool_position(ids),
            Self::Fixed(_) => ids.len().saturating_sub(1),
            Self::OpenClip(t) => t.pool_position(ids),
            // The tower pools over its own mask.
            Self::Hf(_) => ids.len().saturating_sub(1),
        }
    }

    /// The largest id it produces.
    pub fn max_id(&self) -> u32 {
        match self {
            Self::Clip(t) => t.bos_id().max(t.eos_id()),
            Self::Fixed(t) => t.max_id,
            Self::OpenClip(t) => t.max_id(),
            Self::Hf(t) => t.max_id,
        }
    }

    pub fn max_len(&self) -> usize {
        match self {
            Self::Clip(t) => t.max_len(),
            Self::Fixed(t) => t.len,
            Self::OpenClip(t) => t.context(),
            Self::Hf(t) => t.len,
        }
    }

    /// The CLIP tokenizer, for what only CLIP models do (training).
    pub fn as_clip(&self) -> Option<&ClipTokenizer> {
        match self {
            Self::Clip(t) => Some(t),
            Self::Fixed(_) | Self::OpenClip(_) | Self::Hf(_) => None,
        }
    }
}

/// open_clip's `HFTokenizer`: its cleaning (ftfy, HTML entities, whitespace;
/// no lower case), then the Hugging Face tokenizer with its special tokens,
/// truncated to the context (the end token kept).
#[derive(Clone)]
pub struct HfTokenizer {
    inner: Tokenizer,
    len: usize,
    pad: u32,
    max_id: u32,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("len", &self.len)
            .field("pad", &self.pad)
            .finish()
    }
}

impl HfTokenizer {
    /// Reads a `tokenizer.json`; `pad` is the text model's `pad_token_id`.
    pub fn from_file(path: &Path, len: usize, pad: u32) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", path.display())))?;
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: len,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let max_id = inner.get_vocab_size(true).saturating_sub(1) as u32;
        Ok(Self {
            inner,
            len,
            pad,
            max_id,
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let clean = super::text_clean::open_clip_clean_whitespace(text);
        let encoding = self
            .inner
            .encode_fast(clean, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// A tokenizer whose every output has the same length, as SigLIP's text
/// tower takes it: truncated to `len` (its end token kept), then padded.
#[derive(Clone)]
pub struct FixedTokenizer {
    kind: FixedKind,
    len: usize,
    pad: u32,
    max_id: u32,
}

#[derive(Clone)]
enum FixedKind {
    /// A `tokenizer.json` (SigLIP 2's Gemma tokenizer): its own normaliser,
    /// model and post-processor, with truncation and padding set here.
    Json(Tokenizer),
    /// `spiece.model` run as transformers' `SiglipTokenizer`.
    Siglip(SiglipText),
}

impl std::fmt::Debug for FixedTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            FixedKind::Json(_) => "tokenizer.json",
            FixedKind::Siglip(_) => "spiece.model",
        };
        f.debug_struct("FixedTokenizer")
            .field("kind", &kind)
            .field("len", &self.len)
            .field("pad", &self.pad)
            .finish()
    }
}

impl FixedTokenizer {
    /// Reads a `tokenizer.json`, padding on the side `tokenizer_config.json`
    /// names (Gemma tokenizers default to the left, others to the right).
    pub fn from_tokenizer_json(
        path: &Path,
        settings: &TokenizerSettings,
        len: usize,
    ) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", path.display())))?;
        let pad_token = settings.pad_token.clone().unwrap_or_else(|| "<pad>".into());
        let pad = inner.token_to_id(&pad_token).ok_or_else(|| {
            Error::Tokenizer(format!(
                "the padding token {pad_token:?} of tokenizer_config.json is not in {}",
                path.display()
            ))
        })?;
        let left = match settings.padding_side.as_deref() {
            Some(side) => side == "left",
            None => settings
                .tokenizer_class
                .as_deref()
                .is_some_and(|c| c.starts_with("Gemma")),
        };
        inner
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: len,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(Some(tokenizers::PaddingParams {
            strategy: tokenizers::PaddingStrategy::Fixed(len),
            direction: if left {
                tokenizers::PaddingDirection::Left
            } else {
                tokenizers::PaddingDirection::Right
            },
            pad_id: pad,
            pad_token,
            ..Default::default()
        }));
        let max_id = inner.get_vocab_size(true).saturating_sub(1) as u32;
        Ok(Self {
            kind: FixedKind::Json(inner),
            len,
            pad,
            max_id,
        })
    }

    /// Reads a `spiece.model` as `SiglipTokenizer` uses it.
    pub fn from_spiece(path: &Path, settings: &TokenizerSettings, len: usize) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", path.display())))?;
        let sp = SentencePiece::from_bytes(&bytes)?;
        let eos = settings.eos_token.clone().unwrap_or_else(|| "</s>".into());
        let unk = settings.unk_token.clone().unwrap_or_else(|| "<unk>".into());
        let pad = settings.pad_token.clone().unwrap_or_else(|| "</s>".into());
        let mut specials: Vec<(String, u32)> = Vec::new();
        for token in [&eos, &unk, &pad]
            .into_iter()
            .chain(&settings.special_tokens)
        {
            if !specials.iter().any(|(t, _)| t == token) {
                specials.push((token.clone(), sp.piece_to_id(token)));
            }
        }
        let eos_id = sp.piece_to_id(&eos);
        let pad_id = sp.piece_to_id(&pad);
        let unk_pieces = sp.encode(&unk).len();
        let max_id = sp.len().saturating_sub(1) as u32;
        let text = SiglipText {
            sp,
            specials,
            eos: eos_id,
            unk,
            unk_pieces,
            lower: settings.do_lower_case.unwrap_or(true),
        };
        Ok(Self {
            kind: FixedKind::Siglip(text),
            len,
            pad: pad_id,
            max_id,
        })
    }

    /// Exactly `len` ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.kind {
            FixedKind::Json(inner) => {
                let encoding = inner
                    .encode_fast(text, true)
                    .map_err(|e| Error::Tokenizer(e.to_string()))?;
                Ok(encoding.get_ids().to_vec())
            }
            FixedKind::Siglip(siglip) => {
                let mut ids = siglip.ids(text);
                // transformers truncates to leave room for the end token, then adds
                // it unless the text's last id already is one.
                ids.truncate(self.len - 1);
                if ids.last() != Some(&siglip.eos) {
                    ids.push(siglip.eos);
                }
                ids.resize(self.len, self.pad);
                Ok(ids)
            }
        }
    }
}

/// transformers' `SiglipTokenizer` over a SentencePiece model.
#[derive(Clone, Debug)]
struct SiglipText {
    sp: SentencePiece,
    /// Special tokens matched in the raw text, and their ids.
    specials: Vec<(String, u32)>,
    eos: u32,
    unk: String,
    /// Pieces of the unknown token's text, dropped after encoding `unk + text`.
    unk_pieces: usize,
    lower: bool,
}

impl SiglipText {
    /// Ids before truncation and the end token.
    ///
    /// As the reference: "▁" is put before the text (and any "▁" in it becomes
    /// a space); the text is split around special tokens; each other part is
    /// lower-cased, stripped of ASCII punctuation, its whitespace runs made one
    /// space and trimmed, then encoded behind the unknown token's text, whose
    /// pieces are dropped (so that the part keeps its leading "▁").
    fn ids(&self, text: &str) -> Vec<u32> {
        let text = format!("{SPACE}{}", text.replace(SPACE, " "));
        let mut out: Vec<(u32, bool)> = Vec::new();
        let mut first_piece = None;
        for (part, special) in split_on(&text, &self.specials) {
            if part.is_empty() {
                continue;
            }
            if let Some(id) = special {
                out.push((id, true));
                continue;
            }
            let canonical = canonicalize(part, self.lower);
            let mut pieces = self.sp.encode(&format!("{}{canonical}", self.unk));
            if pieces.len() >= self.unk_pieces {
                pieces.drain(..self.unk_pieces);
            }
            if out.is_empty() {
                first_piece = pieces.first().map(|(p, _)| p.clone());
            }
            out.extend(
                pieces
                    .into_iter()
                    .map(|(piece, _)| (self.sp.piece_to_id(&piece), false)),
            );
        }
        // A lone "▁" before a special token is dropped.
        if out.len() > 1 && first_piece.as_deref() == Some(SPACE) && out[1].1 {
            out.remove(0);
        }
        out.into_iter().map(|(id, _)| id).collect()
    }
}

const SPACE: &str = "\u{2581}";

/// Splits `text` around the special tokens, longest match first at the
/// earliest position, as transformers' `Trie.split`.
fn split_on<'a>(text: &'a str, specials: &[(String, u32)]) -> Vec<(&'a str, Option<u32>)> {
    let mut parts = Vec::new();
    let mut rest = text;
    loop {
        let found = specials
            .iter()
            .filter(|(t, _)| !t.is_empty())
            .filter_map(|(t, id)| rest.find(t.as_str()).map(|at| (at, t.len(), *id)))
            .min_by_key(|&(at, len, _)| (at, std::cmp::Reverse(len)));
        match found {
            Some((at, len, id)) => {
                parts.push((&rest[..at], None));
                parts.push((&rest[at..at + len], Some(id)));
                rest = &rest[at + len..];
            }
            None => {
                parts.push((rest, None));
                return parts;
            }
        }
    }
}

/// Python's `str.isspace`: Unicode White_Space plus the four ASCII separators.
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// `SiglipTokenizer.canonicalize_text`.
fn canonicalize(text: &str, lower: bool) -> String {
    let text = if lower {
        text.to_lowercase()
    } else {
        text.to_string()
    };
    let mut out = String::with_capacity(text.len());
    let mut space = false;
    for c in text.chars().filter(|c| !c.is_ascii_punctuation()) {
        if py_space(c) {
            space = true;
        } else {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c);
        }
    }
    out
}
