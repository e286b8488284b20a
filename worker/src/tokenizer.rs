//! The tokenizer, built from a GGUF file's own metadata (no tokenizer.json).
//!
//! Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE), with the
//! pre-tokenizers (`tokenizer.ggml.pre`, see [`PreSplit`]) of SmolLM, Llama 3,
//! Qwen 2 and 3, Mistral's Tekken and GPT-2 (an unknown one falls back to the
//! GPT-2 split with a warning); and `llama`, SentencePiece's BPE with byte
//! fallback (Llama 2, Mistral 7B, TinyLlama; see `sentencepiece_bpe`).
//! Control and user-defined tokens become special tokens, so chat markers
//! such as `<|im_start|>` encode as one id.
//!
//! Generation stops at the EOS token, at `eot_token_id` / `eom_token_id` when
//! the file names them, and at the end-of-turn markers llama.cpp recognises by
//! their text (`<|eot_id|>`, `<|im_end|>`, ...): older Llama 3 conversions name
//! `<|end_of_text|>` as EOS while the instruct model ends its turn with
//! `<|eot_id|>`.
//!
//! [`GgufTokenizer::build`] checks what it built against the metadata: the EOS
//! and BOS ids must name control tokens, every special token must encode to its
//! own id, and ordinary text must survive an encode/decode round trip.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Whether a token of this GGUF type is a special token (matched whole in
/// text, never merged).
fn is_special(kind: i32) -> bool {
    kind == TOKEN_TYPE_CONTROL || kind == TOKEN_TYPE_USER_DEFINED
}

/// Llama 3's split (tiktoken's cl100k pattern): contractions in any case, a
/// word with one leading non-letter, numbers in runs of up to three digits.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen 2's: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken: words split at case changes (`Camel` `Case`), single
/// digits, no contractions.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Texts of end-of-turn tokens that stop generation wherever the file does
/// not name them (llama.cpp's list).
const END_OF_TURN: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// How text is cut into words before BPE, for one `tokenizer.ggml.pre`, as
/// llama.cpp and the models' own `tokenizer.json` cut it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PreSplit {
    /// GPT-2's split (`gpt2`, `default`, and unknown names).
    Gpt2,
    /// Every digit alone, then GPT-2's split (`smollm`).
    SmolLm,
    /// `llama-bpe` and its aliases; also `dbrx`, `smaug-bpe`.
    Llama3,
    /// `qwen2` and its aliases.
    Qwen2,
    /// `tekken`.
    Tekken,
}

impl PreSplit {
    /// The split for `pre`; `None` for a name this tokenizer does not know.
    pub fn named(pre: &str) -> Option<Self> {
        Some(match pre {
            "gpt2" | "gpt-2" | "default" => Self::Gpt2,
            "smollm" => Self::SmolLm,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "dbrx" | "smaug-bpe" => {
                Self::Llama3
            }
            "qwen2" | "deepseek-r1-qwen" | "megrez" => Self::Qwen2,
            "tekken" => Self::Tekken,
            _ => return None,
        })
    }

    /// Whether a word that is itself in the vocabulary is taken whole, without
    /// merging (Hugging Face's `ignore_merges`).
    fn ignore_merges(self) -> bool {
        matches!(self, Self::Llama3 | Self::Tekken)
    }

    /// Whether a BOS token starts every prompt when the file does not say
    /// (`tokenizer.ggml.add_bos_token`).
    fn adds_bos(self) -> bool {
        matches!(self, Self::Llama3 | Self::Tekken)
    }

    fn pre_tokenizer(self) -> Result<PreTokenizerWrapper, String> {
        let regex = |pattern: &str| -> Result<PreTokenizerWrapper, String> {
            let split = Split::new(SplitPattern::Regex(pattern.to_owned()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| format!("pre-tokenizer pattern: {e}"))?;
            Ok(Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into())
        };
        let gpt2 = ByteLevel::new(false, true, true);
        match self {
            Self::Gpt2 => Ok(gpt2.into()),
            Self::SmolLm => Ok(Sequence::new(vec![Digits::new(true).into(), gpt2.into()]).into()),
            Self::Llama3 => regex(LLAMA3_SPLIT),
            Self::Qwen2 => regex(QWEN2_SPLIT),
            Self::Tekken => regex(TEKKEN_SPLIT),
        }
    }
}

/// A tokenizer plus the special ids generation needs.
#[derive(Debug)]
pub struct GgufTokenizer {
    pub inner: Tokenizer,
    pub eos_ids: Vec<u32>,
    pub bos_id: Option<u32>,
    pub add_bos: bool,
    /// Text of the BOS and EOS tokens, for chat templates.
    pub bos_text: String,
    pub eos_text: String,
}

fn md<'a>(ct: &'a Content, key: &str) -> Result<&'a Value, String> {
    ct.metadata.get(key).ok_or_else(|| format!("GGUF metadata has no {key}"))
}

fn string_array(v: &Value, key: &str) -> Result<Vec<String>, String> {
    v.to_vec()
        .map_err(|_| format!("{key} is not an array"))?
        .iter()
        .map(|x| x.to_string().cloned().map_err(|_| format!("{key} holds a non-string")))
        .collect()
}

fn int_of(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(*x as i64),
        Value::I8(x) => Some(*x as i64),
        Value::U16(x) => Some(*x as i64),
        Value::I16(x) => Some(*x as i64),
        Value::U32(x) => Some(*x as i64),
        Value::I32(x) => Some(*x as i64),
        Value::U64(x) => Some(*x as i64),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

/// A byte-level BPE (`gpt2`) from the file's vocabulary and merges, with the
/// word split its `tokenizer.ggml.pre` names; and whether that family adds
/// BOS where the file does not say.
fn byte_level_bpe(ct: &Content, tokens: &[String]) -> Result<(Tokenizer, bool), String> {
    let merges = string_array(md(ct, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_else(|| "default".to_owned());
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| format!("malformed merge {m:?}"))
        })
        .collect::<Result<_, _>>()?;
    let split = PreSplit::named(&pre).unwrap_or_else(|| {
        tracing::warn!(
            pre = pre.as_str(),
            "unknown tokenizer.ggml.pre: using the GPT-2 split; prompts may tokenize differently from what \
             the model was trained on"
        );
        PreSplit::Gpt2
    });
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(split.ignore_merges())
        .build()
        .map_err(|e| format!("building BPE: {e}"))?;
    let mut inner = Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(split.pre_tokenizer()?));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok((inner, split.adds_bos()))
}

/// SentencePiece's BPE (`llama`: Llama 2, Mistral 7B, TinyLlama) as
/// llama.cpp runs it: spaces become `▁`, one is put before the text (and
/// after each special token) unless `tokenizer.ggml.add_space_prefix` is
/// false, then neighbouring pieces are joined highest score first while the
/// joined piece is in the vocabulary, and a piece that is not falls back to
/// its bytes (`<0x..>` tokens).
///
/// The file has scores, not merges; Hugging Face's BPE runs the same
/// algorithm given every two-piece split of every piece as a merge, ranked
/// by the joined piece's score (its converter does the same).
fn sentencepiece_bpe(ct: &Content, tokens: &[String], types: &[i32]) -> Result<Tokenizer, String> {
    let scores: Vec<f32> = md(ct, "tokenizer.ggml.scores")?
        .to_vec()
        .map_err(|_| "tokenizer.ggml.scores is not an array".to_owned())?
        .iter()
        .map(|v| v.to_f32().map_err(|_| "tokenizer.ggml.scores holds a non-number".to_owned()))
        .collect::<Result<_, _>>()?;
    if scores.len() != tokens.len() {
        return Err(format!("{} scores for {} tokens", scores.len(), tokens.len()));
    }
    let kind = |i: usize| types.get(i).copied().unwrap_or(TOKEN_TYPE_NORMAL);
    let pieces: std::collections::HashMap<&str, usize> =
        tokens.iter().enumerate().filter(|(i, _)| kind(*i) == TOKEN_TYPE_NORMAL).map(|(i, t)| (t.as_str(), i)).collect();
    let mut ranked: Vec<(f32, usize, usize)> = Vec::new();
    for (&piece, &id) in &pieces {
        for (cut, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(cut);
            if pieces.contains_key(a) && pieces.contains_key(b) {
                ranked.push((scores[id], id, cut));
            }
        }
    }
    // Highest score first; the id, then the cut, only make the order total.
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    let merges =
        ranked.into_iter().map(|(_, id, cut)| (tokens[id][..cut].to_owned(), tokens[id][cut..].to_owned())).collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let unk = tokens.iter().enumerate().find(|(i, _)| kind(*i) == TOKEN_TYPE_UNKNOWN).map(|(_, t)| t.clone());
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        bpe = bpe.unk_token(unk);
    }
    let bpe = bpe.build().map_err(|e| format!("building BPE: {e}"))?;
    let mut inner = Tokenizer::new(bpe);
    let space_prefix =
        ct.metadata.get("tokenizer.ggml.add_space_prefix").and_then(|v| v.to_bool().ok()).unwrap_or(true);
    let spaces = Replace::new(" ", "▁").map_err(|e| format!("normalizer: {e}"))?;
    let mut decoders: Vec<DecoderWrapper> =
        vec![Replace::new("▁", " ").map_err(|e| format!("decoder: {e}"))?.into(), ByteFallback::new().into(), Fuse::new().into()];
    let normalizer: NormalizerWrapper = if space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
        NormalizerSequence::new(vec![Prepend::new("▁".to_owned()).into(), spaces.into()]).into()
    } else {
        spaces.into()
    };
    inner.with_normalizer(Some(normalizer)).map_err(|e| format!("normalizer: {e}"))?;
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

impl GgufTokenizer {
    /// Builds and checks the tokenizer described by `ct`'s metadata.
    pub fn build(ct: &Content) -> Result<Self, String> {
        let model = md(ct, "tokenizer.ggml.model")?.to_string().map_err(|e| e.to_string())?;
        if model != "gpt2" && model != "llama" {
            return Err(format!(
                "tokenizer model {model:?} is not supported yet (supported: gpt2, the byte-level BPE of SmolLM, \
                 Llama 3, Qwen and GPT-2 style models; llama, the SentencePiece BPE of Llama 2, Mistral 7B and \
                 TinyLlama)"
            ));
        }
        let tokens = string_array(md(ct, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| e.to_string())?
                .iter()
                .map(|x| int_of(x).unwrap_or(1) as i32)
                .collect(),
            None => vec![1; tokens.len()],
        };
        let (mut inner, adds_bos) = match model.as_str() {
            "gpt2" => byte_level_bpe(ct, &tokens)?,
            _ => (sentencepiece_bpe(ct, &tokens, &types)?, true),
        };

        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| is_special(**t))
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(|e| format!("adding special tokens: {e}"))?;

        let id_of = |key: &str| ct.metadata.get(key).and_then(int_of).map(|x| x as u32);
        let eos = id_of("tokenizer.ggml.eos_token_id").ok_or("GGUF metadata has no tokenizer.ggml.eos_token_id")?;
        let mut eos_ids = vec![eos];
        // Chat models often end a turn with a different token than EOS.
        let named = ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"].map(id_of);
        let by_text = tokens.iter().zip(&types).enumerate().filter(|(_, (text, kind))| {
            is_special(**kind) && END_OF_TURN.contains(&text.as_str())
        });
        for id in named.into_iter().flatten().chain(by_text.map(|(id, _)| id as u32)) {
            if !eos_ids.contains(&id) {
                eos_ids.push(id);
            }
        }
        let bos_id = id_of("tokenizer.ggml.bos_token_id");
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(adds_bos && bos_id.is_some());
        let text_of = |id: u32| tokens.get(id as usize).cloned().unwrap_or_default();
        let tok = GgufTokenizer {
            eos_text: text_of(eos),
            bos_text: bos_id.map(text_of).unwrap_or_default(),
            inner,
            eos_ids,
            bos_id,
            add_bos,
        };
        tok.check(&tokens, &types)?;
        Ok(tok)
    }

    /// Checks the built tokenizer against the vocabulary it came from.
    fn check(&self, tokens: &[String], types: &[i32]) -> Result<(), String> {
        for &id in self.eos_ids.iter().chain(self.bos_id.iter()) {
            let Some(kind) = types.get(id as usize) else {
                return Err(format!("special token id {id} is outside the vocabulary of {}", tokens.len()));
            };
            if !is_special(*kind) {
                return Err(format!("special token id {id} ({:?}) is not a control token", tokens[id as usize]));
            }
        }
        for (id, (text, kind)) in tokens.iter().zip(types).enumerate() {
            if *kind == TOKEN_TYPE_CONTROL && !text.is_empty() {
                let ids = self.encode(text)?;
                if ids != [id as u32] {
                    return Err(format!("special token {text:?} encodes to {ids:?}, not [{id}]"));
                }
            }
        }
        let probe = "Hello, world! 12345 ünïcödé 🐝\n\tdone";
        let ids = self.encode(probe)?;
        let back = self.decode(&ids)?;
        if back != probe {
            return Err(format!("tokenizer round trip changed {probe:?} into {back:?}"));
        }
        Ok(())
    }

    /// Token ids of `text`, special tokens recognised, no BOS added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| format!("tokenizing: {e}"))
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.inner.decode(ids, true).map_err(|e| format!("detokenizing: {e}"))
    }

    /// The ids a prompt is run with: BOS first when the model asks for it,
    /// once (chat templates such as Llama 3's write it themselves).
    pub fn prompt_ids(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        let body = self.encode(text)?;
        if self.add_bos && body.first() != self.bos_id.as_ref() {
            ids.extend(self.bos_id);
        }
        ids.extend(body);
        Ok(ids)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;
    use std::collections::HashMap;
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

    /// `text` cut by `split`, as pieces of the original text.
    fn pieces(split: PreSplit, text: &str) -> Vec<String> {
        let mut pts = PreTokenizedString::from(text);
        split.pre_tokenizer().expect("pre-tokenizer").pre_tokenize(&mut pts).expect("pre-tokenize");
        pts.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(_, (a, b), _)| text[a..b].to_owned())
            .collect()
    }

    /// The expected pieces come from Python's `regex` module running the
    /// patterns of the models' own `tokenizer.json` files.
    #[test]
    fn each_pre_split_cuts_words_the_way_its_models_were_trained() {
        let text = "I'M sure it's 12345 (hello)\n\n  world!!!\n";
        let cases: [(PreSplit, &[&str]); 4] = [
            (
                PreSplit::Llama3,
                &["I", "'M", " sure", " it", "'s", " ", "123", "45", " (", "hello", ")\n\n", " ", " world", "!!!\n"],
            ),
            (
                PreSplit::Qwen2,
                &[
                    "I", "'M", " sure", " it", "'s", " ", "1", "2", "3", "4", "5", " (", "hello", ")\n\n", " ", " world",
                    "!!!\n",
                ],
            ),
            (
                PreSplit::Tekken,
                &[
                    "I", "'M", " sure", " it", "'s", " ", "1", "2", "3", "4", "5", " (", "hello", ")\n\n", " ", " world",
                    "!!!\n",
                ],
            ),
            (
                PreSplit::Gpt2,
                &["I", "'", "M", " sure", " it", "'s", " 12345", " (", "hello", ")", "\n\n ", " world", "!!!", "\n"],
            ),
        ];
        for (split, want) in cases {
            assert_eq!(pieces(split, text), want, "{split:?}");
        }
        // Where Tekken differs from the other two: a case change inside a word.
        let text = "HTTPServer says: CamelCase/path 7";
        assert_eq!(pieces(PreSplit::Llama3, text), ["HTTPServer", " says", ":", " CamelCase", "/path", " ", "7"]);
        assert_eq!(
            pieces(PreSplit::Tekken, text),
            ["HTTPServer", " says", ":", " Camel", "Case", "/path", " ", "7"]
        );
        assert_eq!(PreSplit::named("llama-bpe"), Some(PreSplit::Llama3));
        assert_eq!(PreSplit::named("qwen2"), Some(PreSplit::Qwen2));
        assert_eq!(PreSplit::named("no-such-split"), None);
    }

    /// GPT-2's byte → character table, which byte-level vocabularies are written in.
    fn byte_chars() -> Vec<char> {
        let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let mut extra = 256;
        (0..256u32)
            .map(|b| {
                if printable(b) {
                    char::from_u32(b).expect("char")
                } else {
                    extra += 1;
                    char::from_u32(extra - 1).expect("char")
                }
            })
            .collect()
    }

    /// A Llama-3-like vocabulary: every byte, the special tokens and one
    /// whole word, with no merges at all; `extra` metadata on top.
    fn llama3_like(extra: &[(&str, Value)]) -> Content {
        let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
        let mut types = vec![1i32; tokens.len()];
        for special in ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"] {
            tokens.push(special.to_owned());
            types.push(TOKEN_TYPE_CONTROL);
        }
        tokens.push("Ġhello".to_owned());
        types.push(1);
        let strings = |v: Vec<String>| Value::Array(v.into_iter().map(Value::String).collect());
        let mut metadata: HashMap<String, Value> = [
            ("tokenizer.ggml.model", Value::String("gpt2".into())),
            ("tokenizer.ggml.pre", Value::String("llama-bpe".into())),
            ("tokenizer.ggml.tokens", strings(tokens)),
            ("tokenizer.ggml.merges", strings(Vec::new())),
            ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
            ("tokenizer.ggml.bos_token_id", Value::U32(256)),
            ("tokenizer.ggml.eos_token_id", Value::U32(257)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        metadata.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos: HashMap::new(), tensor_data_offset: 0 }
    }

    /// A SentencePiece (`llama`) vocabulary: `<unk>`, `<s>`, `</s>`, the 256
    /// byte tokens, then `pieces` with their scores.
    fn sentencepiece_like(pieces: &[(&str, f32)], extra: &[(&str, Value)]) -> Content {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
        let mut types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
        let mut scores = vec![0f32; 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (p, score) in pieces {
            tokens.push((*p).to_owned());
            types.push(TOKEN_TYPE_NORMAL);
            scores.push(*score);
        }
        let mut metadata: HashMap<String, Value> = [
            ("tokenizer.ggml.model", Value::String("llama".into())),
            ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect())),
            ("tokenizer.ggml.scores", Value::Array(scores.into_iter().map(Value::F32).collect())),
            ("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect())),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        metadata.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        Content { magic: VersionedMagic::GgufV3, metadata, tensor_infos: HashMap::new(), tensor_data_offset: 0 }
    }

    /// llama.cpp's SentencePiece tokenizer, written plainly: join the
    /// neighbouring pair whose join is a piece with the highest score
    /// (leftmost on ties) until none is; pieces not in the vocabulary become
    /// their bytes.
    fn spm_reference(text: &str, pieces: &[(&str, f32)]) -> Vec<u32> {
        let id = |p: &str| pieces.iter().position(|(q, _)| *q == p).map(|i| (i + 3 + 256) as u32);
        let score = |p: &str| pieces.iter().find(|(q, _)| *q == p).map(|(_, s)| *s);
        let text = format!(" {text}").replace(' ', "▁");
        let mut syms: Vec<String> = text.chars().map(String::from).collect();
        loop {
            let best = (0..syms.len().saturating_sub(1))
                .filter_map(|i| score(&(syms[i].clone() + &syms[i + 1])).map(|s| (i, s)))
                .fold(None, |b: Option<(usize, f32)>, (i, s)| if b.is_none_or(|(_, bs)| s > bs) { Some((i, s)) } else { b });
            let Some((i, _)) = best else { break };
            let right = syms.remove(i + 1);
            syms[i].push_str(&right);
        }
        syms.iter()
            .flat_map(|s| match id(s) {
                Some(id) => vec![id],
                None => s.bytes().map(|b| b as u32 + 3).collect(),
            })
            .collect()
    }

    /// The Hugging Face BPE built from scores tokenizes as llama.cpp's
    /// algorithm does, over random vocabularies and texts.
    #[test]
    fn sentencepiece_scores_tokenize_as_llama_cpp_does() {
        let mut seed = 12345u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        let alphabet = ['▁', 'a', 'b', 'c', 'd'];
        for round in 0..20 {
            let mut pieces: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
            while pieces.len() < 60 {
                let len = 2 + next(4) as usize;
                let p: String = (0..len).map(|_| alphabet[next(5) as usize]).collect();
                if !pieces.contains(&p) {
                    pieces.push(p);
                }
            }
            // Distinct scores (SentencePiece's BPE scores are merge ranks).
            let mut order: Vec<usize> = (0..pieces.len()).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, next(i as u64 + 1) as usize);
            }
            let scored: Vec<(&str, f32)> = pieces.iter().zip(&order).map(|(p, &o)| (p.as_str(), -(o as f32))).collect();
            let tok = GgufTokenizer::build(&sentencepiece_like(&scored, &[])).expect("tokenizer");
            for _ in 0..20 {
                let len = 1 + next(24) as usize;
                let text: String = (0..len).map(|_| ['a', 'b', 'c', 'd', ' ', 'é'][next(6) as usize]).collect();
                let want = spm_reference(&text, &scored);
                assert_eq!(tok.encode(&text).expect("encode"), want, "round {round}, text {text:?}");
                assert_eq!(tok.decode(&want).expect("decode"), text, "round {round}: decoding {text:?}");
            }
        }
    }

    #[test]
    fn a_sentencepiece_vocabulary_adds_bos_prefixes_a_space_and_falls_back_to_bytes() {
        let pieces = [("▁", -1.0), ("H", -2.0), ("i", -3.0), ("▁H", -4.0), ("▁Hi", -5.0), ("!", -6.0)];
        let tok = GgufTokenizer::build(&sentencepiece_like(&pieces, &[])).expect("tokenizer");
        let id = |p: &str| pieces.iter().position(|(q, _)| *q == p).map(|i| (i + 259) as u32).expect("piece");
        assert!(tok.add_bos, "SentencePiece vocabularies add BOS unless the file says not to");
        assert_eq!(tok.prompt_ids("Hi!").expect("ids"), [1, id("▁Hi"), id("!")]);
        // After a special token the text gets its own space prefix, as in llama.cpp.
        assert_eq!(tok.prompt_ids("<s>Hi</s>Hi").expect("ids"), [1, id("▁Hi"), 2, id("▁Hi")]);
        // A character outside the vocabulary is its UTF-8 bytes; decoding puts it back.
        let ids = tok.encode("Hi é").expect("encode");
        assert_eq!(ids, [id("▁Hi"), id("▁"), 0xC3 + 3, 0xA9 + 3]);
        assert_eq!(tok.decode(&ids).expect("decode"), "Hi é");
        // Streamed a token at a time, as generation does: the two bytes of é
        // come out together, once both are there.
        let mut stream = tok.inner.decode_stream(true);
        let parts: Vec<Option<String>> = ids.iter().map(|&i| stream.step(i).expect("step")).collect();
        assert_eq!(parts, [Some("Hi".into()), Some(" ".into()), None, Some("é".into())]);
        assert!(tok.is_eos(2));

        let bare = GgufTokenizer::build(&sentencepiece_like(
            &pieces,
            &[("tokenizer.ggml.add_space_prefix", Value::Bool(false)), ("tokenizer.ggml.add_bos_token", Value::Bool(false))],
        ))
        .expect("tokenizer");
        assert_eq!(bare.prompt_ids("Hi").expect("ids"), [id("H"), id("i")]);
    }

    #[test]
    fn a_llama3_vocabulary_stops_at_eot_takes_whole_words_and_adds_bos_once() {
        let tok = GgufTokenizer::build(&llama3_like(&[])).expect("tokenizer");
        // EOS names <|end_of_text|>; the instruct model ends its turn with <|eot_id|>.
        assert_eq!(tok.eos_ids, [257, 258]);
        assert!(tok.is_eos(258));
        // `ignore_merges`: " hello" is in the vocabulary, so it is one token
        // although no merges build it.
        assert_eq!(tok.encode(" hello").expect("encode"), [259]);
        // Llama 3 adds BOS unless the file says otherwise, and not twice when
        // the chat template already wrote it.
        assert!(tok.add_bos);
        let h = byte_chars()[b'h' as usize] as u32;
        assert_eq!(tok.prompt_ids("h").expect("ids"), [256, h]);
        assert_eq!(tok.prompt_ids("<|begin_of_text|>h").expect("ids"), [256, h]);

        let told = GgufTokenizer::build(&llama3_like(&[
            ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
            ("tokenizer.ggml.eot_token_id", Value::U32(258)),
        ]))
        .expect("tokenizer");
        assert!(!told.add_bos);
        assert_eq!(told.eos_ids, [257, 258]);
        assert_eq!(told.prompt_ids("h").expect("ids"), [h]);

        // With GPT-2's split only merges join bytes: " hello" stays six.
        let gpt2 = GgufTokenizer::build(&llama3_like(&[("tokenizer.ggml.pre", Value::String("gpt2".into()))]))
            .expect("tokenizer");
        assert_eq!(gpt2.encode(" hello").expect("encode").len(), 6);
        assert!(!gpt2.add_bos);
    }
}
