//! The tokenizer, built from a GGUF file's own metadata (no tokenizer.json).
//!
//! Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE), with the
//! pre-tokenizers `smollm` (single digits, then the GPT-2 split), `gpt2` and
//! `default`; an unknown `tokenizer.ggml.pre` falls back to the GPT-2 split with
//! a warning. Control and user-defined tokens become special tokens, so chat
//! markers such as `<|im_start|>` encode as one id.
//!
//! [`GgufTokenizer::build`] checks what it built against the metadata: the EOS
//! and BOS ids must name control tokens, every special token must encode to its
//! own id, and ordinary text must survive an encode/decode round trip.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

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

impl GgufTokenizer {
    /// Builds and checks the tokenizer described by `ct`'s metadata.
    pub fn build(ct: &Content) -> Result<Self, String> {
        let model = md(ct, "tokenizer.ggml.model")?.to_string().map_err(|e| e.to_string())?;
        if model != "gpt2" {
            return Err(format!(
                "tokenizer model {model:?} is not supported yet (supported: gpt2, the byte-level BPE of \
                 SmolLM, Llama 3, Qwen and GPT-2 style models)"
            ));
        }
        let tokens = string_array(md(ct, "tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
        let merges = string_array(md(ct, "tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| e.to_string())?
                .iter()
                .map(|x| int_of(x).unwrap_or(1) as i32)
                .collect(),
            None => vec![1; tokens.len()],
        };
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
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| format!("building BPE: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
            "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
            "gpt2" | "default" => byte_level.into(),
            other => {
                tracing::warn!(pre = other, "unknown tokenizer.ggml.pre; using the GPT-2 split");
                byte_level.into()
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(|e| format!("adding special tokens: {e}"))?;

        let id_of = |key: &str| ct.metadata.get(key).and_then(int_of).map(|x| x as u32);
        let eos = id_of("tokenizer.ggml.eos_token_id").ok_or("GGUF metadata has no tokenizer.ggml.eos_token_id")?;
        let mut eos_ids = vec![eos];
        // Chat models often end a turn with a different token than EOS.
        if let Some(eot) = id_of("tokenizer.ggml.eot_token_id") {
            eos_ids.push(eot);
        }
        let bos_id = id_of("tokenizer.ggml.bos_token_id");
        let add_bos = ct
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
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
            if *kind != TOKEN_TYPE_CONTROL && *kind != TOKEN_TYPE_USER_DEFINED {
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

    /// The ids a prompt is run with: BOS first when the model asks for it.
    pub fn prompt_ids(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}
