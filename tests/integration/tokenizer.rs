//! Token ids against transformers' `CLIPTokenizer` on 1,200 varied strings,
//! through both tokenizer layouts (tokenizer.json, vocab.json + merges.txt).

use std::io::Read;

use clipdex::model::ClipTokenizer;
use clipdex::model::checkpoint::{HubOptions, Layout, ModelSource, TokenizerFiles, resolve};

use crate::common::{fixture_model, fixture_models_of, fixtures};

struct Case {
    text: String,
    ids: Vec<u32>,
    full: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(fixtures().join("tokenizer-cases.json.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    value["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            ids: ids(&c["ids"]),
            full: ids(&c["full"]),
        })
        .collect()
}

/// transformers' CLIP tokenizers of the fixtures in Hugging Face layout
/// (open_clip's own tokenizer is checked in `open_clip.rs`).
fn tokenizers() -> Vec<(String, ClipTokenizer)> {
    fixture_models_of("clip")
        .into_iter()
        .filter_map(|name| {
            let files = resolve(
                &ModelSource::Dir(fixture_model(&name)),
                &HubOptions::default(),
            )
            .unwrap();
            if files.layout == Layout::OpenClip {
                return None;
            }
            let tok = match &files.tokenizer {
                TokenizerFiles::Json(p) => ClipTokenizer::from_tokenizer_json(p, 77).unwrap(),
                TokenizerFiles::VocabMerges { vocab, merges } => {
                    ClipTokenizer::from_vocab_merges(vocab, merges, 77).unwrap()
                }
                other => panic!("{name}: a CLIP fixture with {other:?}"),
            };
            Some((name, tok))
        })
        .collect()
}

#[test]
fn ids_match_reference_on_varied_strings() {
    let cases = cases();
    assert!(cases.len() >= 1000, "only {} cases", cases.len());
    let toks = tokenizers();
    for (name, tok) in &toks {
        let mut wrong = Vec::new();
        for case in &cases {
            if tok.encode(&case.text).unwrap() != case.ids {
                wrong.push(case.text.clone());
            }
            let mut full = vec![tok.bos_id()];
            full.extend(tok.encode_words(&case.text).unwrap());
            full.push(tok.eos_id());
            if full != case.full {
                wrong.push(format!("(untruncated) {}", case.text));
            }
        }
        assert!(
            wrong.is_empty(),
            "{name}: {} of {} cases differ, first: {:?}",
            wrong.len(),
            cases.len(),
            &wrong[..wrong.len().min(5)]
        );
    }
    // The varied set exercises truncation, special tokens and non-Latin text.
    assert!(
        cases
            .iter()
            .any(|c| c.full.len() > 77 && c.ids.len() == 77 && c.ids[76] == 49407)
    );
    assert!(cases.iter().any(|c| c.text.contains("<|endoftext|>")));
    assert!(cases.iter().any(|c| {
        c.text
            .chars()
            .any(|ch| ('\u{4e00}'..='\u{9fff}').contains(&ch))
    }));
}

#[test]
fn pooling_uses_the_first_end_token() {
    let (_, tok) = tokenizers().remove(0);
    let ids = tok.encode("red <|endoftext|> blue").unwrap();
    assert_eq!(ids.iter().filter(|&&t| t == tok.eos_id()).count(), 2);
    assert_eq!(tok.pool_position(&ids), 2);
    assert_eq!(tok.pool_position(&tok.encode("a photo").unwrap()), 3);
}
