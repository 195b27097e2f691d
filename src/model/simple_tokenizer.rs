//! open_clip's default tokenizer (`open_clip.tokenizer.SimpleTokenizer`,
//! OpenAI's original CLIP tokenizer), which open_clip checkpoints are trained
//! with.
//!
//! It shares CLIP's vocabulary with transformers' `CLIPTokenizer` but not its
//! pipeline: the text is first cleaned as `clean="lower"` does (ftfy, HTML
//! unescaping twice, whitespace runs to one space, lower case; see
//! `text_clean`), its special tokens are spelled `<start_of_text>` and
//! `<end_of_text>`, rows are padded with id 0, and the text tower pools at the
//! largest id (the end token). The vocabulary is built from the merges alone,
//! as open_clip builds it: the 256 byte characters, the same with `</w>`, one
//! token per merge (at most 48,894), the two special tokens.

use std::collections::HashMap;
use std::path::Path;

use super::{Error, Result};

/// Merges open_clip reads from its BPE file (`49152 - 256 - 2`).
const MAX_MERGES: usize = 48_894;
const START: &str = "<start_of_text>";
const END: &str = "<end_of_text>";

#[derive(Clone)]
pub struct SimpleTokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_chars: [char; 256],
    pattern: regex::Regex,
    sot: u32,
    eot: u32,
    context: usize,
}

impl std::fmt::Debug for SimpleTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimpleTokenizer")
            .field("vocab", &self.encoder.len())
            .field("context", &self.context)
            .finish()
    }
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`), in open_clip's
/// order: printable Latin-1 bytes map to themselves, the rest to 256 + n.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut table: Vec<(u8, char)> = (0u32..256)
        .filter(|&b| printable(b))
        .map(|b| (b as u8, char::from_u32(b).expect("a Latin-1 code point")))
        .collect();
    let mut n = 0;
    for b in 0u32..256 {
        if !printable(b) {
            table.push((
                b as u8,
                char::from_u32(256 + n).expect("a code point below 512"),
            ));
            n += 1;
        }
    }
    table
}

impl SimpleTokenizer {
    /// Builds the tokenizer from BPE merges (`"a b"` each, in rank order).
    pub fn from_merges(merges: &[(String, String)], context: usize) -> Result<Self> {
        if context < 2 {
            return Err(Error::Tokenizer(format!(
                "a context of {context} leaves no room for start and end tokens"
            )));
        }
        let merges = &merges[..merges.len().min(MAX_MERGES)];
        let table = bytes_to_unicode();
        let mut byte_chars = ['\0'; 256];
        for &(b, c) in &table {
            byte_chars[b as usize] = c;
        }
        let mut vocab: Vec<String> = table.iter().map(|&(_, c)| c.to_string()).collect();
        vocab.extend(table.iter().map(|&(_, c)| format!("{c}</w>")));
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push(START.into());
        vocab.push(END.into());
        let encoder: HashMap<String, u32> = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        let ranks = merges
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, m)| (m, i))
            .collect();
        // open_clip's pattern, compiled with re.IGNORECASE.
        let pattern = regex::Regex::new(&format!(
            r"(?i){START}|{END}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+"
        ))
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self {
            sot: encoder[START],
            eot: encoder[END],
            encoder,
            ranks,
            byte_chars,
            pattern,
            context,
        })
    }

    /// Reads merges from `merges.txt` (Hugging Face layout: a `#version`
    /// line, then one merge per line), open_clip's `bpe_simple_vocab_16e6.txt`
    /// (a header line, then the same), or a `tokenizer.json`'s BPE model.
    pub fn from_file(path: &Path, context: usize) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", path.display())))?;
        let merges = if path.extension().is_some_and(|e| e == "json") {
            json_merges(&text)
        } else {
            text_merges(&text)
        };
        Self::from_merges(
            &merges.map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?,
            context,
        )
    }

    /// OpenAI's BPE as clipdex ships it.
    pub fn openai(context: usize) -> Result<Self> {
        let json = super::tokenizer::builtin_clip_tokenizer_json();
        let merges = json_merges(&String::from_utf8_lossy(&json)).map_err(Error::Tokenizer)?;
        Self::from_merges(&merges, context)
    }

    /// BPE ids of a cleaned text, without start and end tokens.
    fn encode_words(&self, text: &str) -> Result<Vec<u32>> {
        let clean = super::text_clean::open_clip_clean(text);
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&clean) {
            let token: String = m
                .as_str()
                .bytes()
                .map(|b| self.byte_chars[b as usize])
                .collect();
            if token == START || token == END {
                ids.push(self.encoder[&token]);
                continue;
            }
            for piece in self.bpe(&token) {
                ids.push(*self.encoder.get(&piece).ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "BPE produced {piece:?}, which is not in the vocabulary"
                    ))
                })?);
            }
        }
        Ok(ids)
    }

    /// open_clip's `bpe`: merge the lowest-ranked adjacent pair, all its
    /// occurrences left to right, until no pair has a rank.
    fn bpe(&self, token: &str) -> Vec<String> {
        let mut word: Vec<String> = token.chars().map(String::from).collect();
        match word.last_mut() {
            Some(last) => last.push_str("</w>"),
            None => return Vec::new(),
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|p| {
                    self.ranks
                        .get(&(p[0].clone(), p[1].clone()))
                        .map(|&r| (r, p[0].clone(), p[1].clone()))
                })
                .min();
            let Some((_, first, second)) = best else {
                break;
            };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut word[i]));
                    i += 1;
                }
            }
            word = merged;
        }
        word
    }

    /// Token ids of one text as open_clip's tokenizer makes them: start
    /// token, BPE ids, end token; truncated to the context with the end
    /// token kept. Unpadded (open_clip pads with 0; `Clip::text_features`
    /// pads a batch, to the whole context for a tower without a causal mask).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(self.context);
        ids.push(self.sot);
        ids.extend(self.encode_words(text)?);
        ids.push(self.eot);
        if ids.len() > self.context {
            ids.truncate(self.context);
            ids[self.context - 1] = self.eot;
        }
        Ok(ids)
    }

    /// The position open_clip pools (`argmax`): the first largest id, the end token.
    pub fn pool_position(&self, ids: &[u32]) -> usize {
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&t| t == max).unwrap_or(0)
    }

    pub fn max_id(&self) -> u32 {
        self.sot.max(self.eot)
    }

    pub fn context(&self) -> usize {
        self.context
    }
}

/// The merges of a `tokenizer.json`'s BPE model (`"a b"` or `["a", "b"]` each).
fn json_merges(text: &str) -> Result<Vec<(String, String)>, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let merges = json["model"]["merges"].as_array().ok_or("no BPE merges")?;
    merges
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => split_merge(s),
            serde_json::Value::Array(pair) if pair.len() == 2 => {
                Some((pair[0].as_str()?.to_string(), pair[1].as_str()?.to_string()))
            }
            _ => None,
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| "a malformed merge".to_string())
}

/// The merges of a merges file: a header line, then one `a b` per line
/// (open_clip skips the first line unread).
fn text_merges(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split('\n')
        .skip(1)
        .take(MAX_MERGES)
        .filter(|l| !l.is_empty())
        .map(|l| split_merge(l).ok_or_else(|| format!("bad merge {l:?}")))
        .collect()
}

fn split_merge(line: &str) -> Option<(String, String)> {
    let (a, b) = line.split_once(' ')?;
    Some((a.to_string(), b.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> SimpleTokenizer {
        let merges: Vec<(String, String)> =
            [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect();
        SimpleTokenizer::from_merges(&merges, 8).unwrap()
    }

    #[test]
    fn builds_open_clips_vocabulary_and_merges() {
        let t = tiny();
        // 512 byte tokens, 4 merges, then the two special tokens.
        assert_eq!((t.sot, t.eot), (516, 517));
        assert_eq!(t.encoder["!"], 0);
        assert_eq!(t.encoder["cat</w>"], 513);
        assert_eq!(t.encode("CAT dog").unwrap(), vec![516, 513, 515, 517]);
        assert_eq!(t.bpe("cats"), vec!["ca", "t", "s</w>"]);
    }

    #[test]
    fn truncates_keeping_the_end_token() {
        let t = tiny();
        let ids = t.encode("cat cat cat cat cat cat cat cat").unwrap();
        assert_eq!(ids.len(), 8);
        assert_eq!(ids[7], t.eot);
        assert_eq!(t.pool_position(&ids), 7);
        // Padding is never the largest id.
        assert_eq!(t.pool_position(&[516, 513, 517, 0, 0, 0]), 2);
        // Special tokens in the text are special tokens, as in open_clip.
        assert_eq!(t.encode("<END_OF_TEXT>").unwrap(), [516, 517, 517]);
    }
}
