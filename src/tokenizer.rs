//! Tokenizers: Hugging Face `tokenizer.json`, or one rebuilt from GGUF
//! metadata (`tokenizer.ggml.*`).
//!
//! Gemma's GGUF vocabulary is SentencePiece BPE: starting from characters,
//! the adjacent pair whose concatenation is the vocabulary piece with the
//! highest score merges first (llama.cpp's SPM tokenizer, SentencePiece's own
//! BPE). In the `tokenizers` crate that is a BPE model whose merges are all
//! splits of each piece into two pieces, ranked by the piece's score. A
//! Unigram model over the same scores would be wrong (see DEVELOPERS notes).
//!
//! User text is always encoded with special-token matching off, so a user
//! who types `<end_of_turn>` gets ordinary text, not a turn boundary; the
//! prompt template inserts control tokens by id.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper};

use crate::{Error, Result};

/// SentencePiece token types as stored in `tokenizer.ggml.token_type`.
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    #[cfg_attr(not(test), allow(dead_code))]
    pub const BYTE: i32 = 6;
}

/// A text tokenizer plus the ids of the control tokens the prompt needs.
#[derive(Clone)]
pub struct Tokenizer {
    /// Shared: a 262k-piece vocabulary takes ~90 ms to deep-copy, and
    /// formats and routers clone their tokenizer freely.
    inner: Arc<tokenizers::Tokenizer>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    fn from_inner(mut inner: tokenizers::Tokenizer, bos: Option<u32>, eos: Option<u32>) -> Self {
        inner.set_encode_special_tokens(true);
        Self {
            inner: Arc::new(inner),
            bos_id: bos,
            eos_id: eos,
        }
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::NotFound {
                what: "tokenizer.json",
                path: path.to_path_buf(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        let bos = find(&["<bos>", "<|begin_of_text|>", "<s>"]);
        let eos = find(&["<eos>", "<|end_of_text|>", "</s>"]);
        Ok(Self::from_inner(inner, bos, eos))
    }

    /// Rebuilds the SentencePiece BPE tokenizer stored in GGUF metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| Error::Tokenizer(format!("GGUF lacks `{k}`")))
        };
        let model = get("tokenizer.ggml.model")?.to_string().map_err(tok_err)?;
        if model != "llama" {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model `{model}` is not supported (SentencePiece `llama` expected); \
                 use a Hugging Face directory with tokenizer.json instead"
            )));
        }
        let tokens: Vec<String> =
            md_array(md, "tokenizer.ggml.tokens", |v| v.to_string().cloned())?
                .ok_or_else(|| Error::Tokenizer("GGUF lacks `tokenizer.ggml.tokens`".into()))?;
        let scores: Vec<f32> = md_array(md, "tokenizer.ggml.scores", |v| v.to_f32())?
            .unwrap_or_else(|| vec![0.0; tokens.len()]);
        let types: Vec<i32> = md_array(md, "tokenizer.ggml.token_type", |v| v.to_i32())?
            .unwrap_or_else(|| vec![token_type::NORMAL; tokens.len()]);
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            return Err(Error::Tokenizer(format!(
                "GGUF has {} tokens but {} scores and {} types",
                tokens.len(),
                scores.len(),
                types.len()
            )));
        }
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let unk = id("tokenizer.ggml.unknown_token_id")
            .and_then(|i| tokens.get(i as usize).cloned())
            .unwrap_or_else(|| "<unk>".to_string());
        let add_space_prefix = md
            .get("tokenizer.ggml.add_space_prefix")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        Self::from_sentencepiece(&tokens, &scores, &types, &unk, add_space_prefix, bos, eos)
    }

    /// Builds the tokenizer from SentencePiece pieces, scores and types.
    pub fn from_sentencepiece(
        tokens: &[String],
        scores: &[f32],
        types: &[i32],
        unk: &str,
        add_space_prefix: bool,
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Self> {
        let vocab: ahash_map::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        // Merges: every split of a normal piece into two vocabulary pieces,
        // best-scored pieces first (ties by id, for determinism).
        let mut order: Vec<usize> = (0..tokens.len())
            .filter(|&i| types[i] == token_type::NORMAL)
            .collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let mut merges = Vec::new();
        for i in order {
            let piece = &tokens[i];
            for (cut, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(cut);
                if vocab.contains_key(l) && vocab.contains_key(r) {
                    merges.push((l.to_string(), r.to_string()));
                }
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(unk.to_string())
            .byte_fallback(true)
            .fuse_unk(true)
            .build()
            .map_err(tok_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        if add_space_prefix {
            normalizers.push(tokenizers::normalizers::Prepend::new("▁".into()).into());
        }
        normalizers.insert(0, Replace::new(" ", "▁").map_err(tok_err)?.into());
        inner
            .with_normalizer(Some(tokenizers::normalizers::Sequence::new(normalizers)))
            .map_err(tok_err)?;
        let decoders: Vec<DecoderWrapper> = vec![
            tokenizers::decoders::DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tok_err)?),
            ByteFallback::default().into(),
            Fuse::default().into(),
        ];
        inner.with_decoder(Some(Sequence::new(decoders)));
        // Control tokens only ever enter through the template (by id);
        // user-defined pieces (newline runs, tabs, some tags) are matched whole
        // in the text, as SentencePiece does.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, &t)| t == token_type::CONTROL || t == token_type::UNKNOWN)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(_, &t)| t == token_type::USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.clone(), false).normalized(false))
            .collect();
        inner.add_special_tokens(special).map_err(tok_err)?;
        inner.add_tokens(user).map_err(tok_err)?;
        Ok(Self::from_inner(inner, bos, eos))
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Encodes plain text; control-token strings in it stay plain text.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Pieces (token strings) of `text`, for inspection and tests.
    pub fn pieces(&self, text: &str) -> Result<Vec<String>> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_tokens().to_vec())
    }

    /// Decodes ids to text, control tokens included verbatim.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    /// Id of a token string (control tokens included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The GGUF metadata array `key` with every value converted by `f`, or
/// `None` when the key is absent.
fn md_array<T>(
    md: &std::collections::HashMap<String, gguf_file::Value>,
    key: &str,
    f: impl Fn(&gguf_file::Value) -> candle_core::Result<T>,
) -> Result<Option<Vec<T>>> {
    let Some(value) = md.get(key) else {
        return Ok(None);
    };
    let bad = |e: candle_core::Error| Error::Tokenizer(format!("GGUF `{key}`: {e}"));
    let items = value.to_vec().map_err(bad)?;
    items
        .iter()
        .map(&f)
        .collect::<candle_core::Result<_>>()
        .map(Some)
        .map_err(bad)
}

/// The `tokenizers` crate's vocabulary map type (an `AHashMap`).
mod ahash_map {
    pub type Vocab = tokenizers::models::bpe::Vocab;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy vocabulary where the score order decides between two segmentations.
    /// It stays beside the code (unit tests cannot reach `tests/common`, home
    /// of the fixture models' toy): its scores are chosen for these cases.
    fn toy() -> Tokenizer {
        let pieces = [
            ("<pad>", 0.0, 3),
            ("<eos>", 0.0, 3),
            ("<bos>", 0.0, 3),
            ("<unk>", 0.0, 2),
            ("<end_of_turn>", 0.0, 3),
            ("\n", 0.0, 4),
            ("a", -10.0, 1),
            ("b", -10.0, 1),
            ("c", -10.0, 1),
            ("▁", -10.0, 1),
            ("ab", -3.0, 1),
            ("bc", -1.0, 1),
            ("abc", -2.0, 1),
            ("▁a", -5.0, 1),
        ];
        let mut tokens: Vec<String> = pieces.iter().map(|p| p.0.to_string()).collect();
        let mut scores: Vec<f32> = pieces.iter().map(|p| p.1).collect();
        let mut types: Vec<i32> = pieces.iter().map(|p| p.2).collect();
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            scores.push(0.0);
            types.push(token_type::BYTE);
        }
        Tokenizer::from_sentencepiece(&tokens, &scores, &types, "<unk>", false, Some(2), Some(1))
            .unwrap()
    }

    #[test]
    fn merges_follow_the_merged_piece_score() {
        let t = toy();
        // "bc" (-1) merges before "ab" (-3); then "a"+"bc" -> "abc" (-2).
        assert_eq!(t.pieces("abc").unwrap(), vec!["abc"]);
        assert_eq!(t.pieces("ab").unwrap(), vec!["ab"]);
        assert_eq!(t.pieces("a abc").unwrap(), vec!["a", "▁", "abc"]);
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes_and_round_trip() {
        let t = toy();
        let ids = t.encode("a😀").unwrap();
        assert_eq!(ids.len(), 5, "{:?}", t.pieces("a😀").unwrap());
        assert_eq!(t.decode(&ids).unwrap(), "a😀");
    }

    #[test]
    fn control_tokens_in_user_text_stay_text() {
        let t = toy();
        let ids = t.encode("<end_of_turn>").unwrap();
        assert!(!ids.contains(&4), "{ids:?}");
        assert_eq!(t.token_id("<end_of_turn>"), Some(4));
        // User-defined pieces are matched whole.
        assert_eq!(t.encode("a\nb").unwrap()[1], 5);
    }
}
