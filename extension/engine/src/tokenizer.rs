//! GPT-2 / GPT-3 byte-level BPE (the 50257-token `r50k_base` vocabulary) on the Hugging Face
//! `tokenizers` crate, built from file contents: `encoder.json` / `vocab.json` and
//! `vocab.bpe` / `merges.txt`. `<|endoftext|>` in text is the single special token.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{EngineError, Result};

/// The end-of-text token of the GPT-2/3 vocabulary.
pub const END_OF_TEXT: &str = "<|endoftext|>";

pub struct Bpe {
    inner: Tokenizer,
    vocab_size: usize,
}

/// Parses merges: one "left right" pair per line. Only a first line starting with `#version`
/// is a header; GPT-2's vocab.bpe has real merges that begin with `#`.
pub fn parse_merges(merges: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (n, line) in merges.lines().enumerate() {
        if n == 0 && line.starts_with("#version") {
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (a, b) = line
            .split_once(' ')
            .filter(|(a, b)| !a.is_empty() && !b.is_empty() && !b.contains(' '))
            .ok_or_else(|| {
                EngineError::data(format!(
                    "merges line {} is not \"left right\": {line:?}",
                    n + 1
                ))
            })?;
        out.push((a.to_string(), b.to_string()));
    }
    if out.is_empty() {
        return Err(EngineError::data("merges has no merge rules"));
    }
    Ok(out)
}

impl Bpe {
    /// Builds the tokenizer from the JSON vocabulary and the merges text.
    pub fn new(vocab_json: &str, merges: &str) -> Result<Self> {
        let vocab: HashMap<String, u32> = serde_json::from_str(vocab_json).map_err(|e| {
            EngineError::data(format!("vocab is not a JSON object of token → id: {e}"))
        })?;
        if vocab.is_empty() {
            return Err(EngineError::data("vocab is empty"));
        }
        let vocab_size = vocab.values().map(|&v| v as usize + 1).max().unwrap_or(0);
        let merges = parse_merges(merges)?;
        for (a, b) in &merges {
            for part in [a, b] {
                if !vocab.contains_key(part.as_str()) {
                    return Err(EngineError::data(format!(
                        "merge part {part:?} is not in the vocabulary"
                    )));
                }
            }
        }
        let model = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .build()
            .map_err(|e| EngineError::data(format!("invalid BPE vocabulary: {e}")))?;
        let mut inner = Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if inner.token_to_id(END_OF_TEXT).is_some() {
            inner.add_special_tokens(&[AddedToken::from(END_OF_TEXT, true)]);
        }
        Ok(Self { inner, vocab_size })
    }

    /// Number of ids (largest id + 1).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn end_of_text(&self) -> Option<u32> {
        self.inner.token_to_id(END_OF_TEXT)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| EngineError::data(format!("cannot encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text; byte sequences that are not valid UTF-8 on their own (a token cut
    /// inside a character) come out as U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(EngineError::invalid(format!(
                "token id {bad} is outside the vocabulary of {} tokens",
                self.vocab_size
            )));
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| EngineError::data(format!("cannot decode: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_keep_hash_lines_after_the_header() {
        let m = parse_merges("#version: 0.2\n# #\nĠ t\n").unwrap();
        assert_eq!(
            m,
            vec![
                ("#".to_string(), "#".to_string()),
                ("Ġ".to_string(), "t".to_string())
            ]
        );
        assert_eq!(parse_merges("a b\n").unwrap().len(), 1);
        assert!(parse_merges("#version: 0.2\n").is_err());
        assert!(parse_merges("abc\n").is_err());
    }

    #[test]
    fn tiny_vocabulary_round_trips() {
        let vocab = r#"{"a": 0, "b": 1, "ab": 2, "Ġ": 3, "Ġab": 4, "<|endoftext|>": 5}"#;
        let bpe = Bpe::new(vocab, "#version: 0.2\na b\nĠ ab\n").unwrap();
        assert_eq!(bpe.encode("ab ab").unwrap(), vec![2, 4]);
        assert_eq!(bpe.encode("ab<|endoftext|>ab").unwrap(), vec![2, 5, 2]);
        assert_eq!(bpe.decode(&[2, 4, 4]).unwrap(), "ab ab ab");
        assert!(bpe.decode(&[6]).is_err());
        assert!(Bpe::new(vocab, "a c\n").is_err());
    }
}
