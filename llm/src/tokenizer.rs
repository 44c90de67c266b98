//! The tokenizer for Qwen2-architecture GGUF models, and streaming detokenization.
//!
//! No registry ships a `tokenizer.json` next to the GGUF weights, but the GGUF file
//! carries everything a Hugging Face tokenizer needs in its metadata: the byte-level
//! BPE vocabulary (`tokenizer.ggml.tokens`), the merge ranks (`tokenizer.ggml.merges`)
//! and which tokens are control tokens (`tokenizer.ggml.token_type`).
//! [`tokenizer_json_from_gguf`] turns that into a `tokenizer.json` the `tokenizers`
//! crate loads, so the setup step can write it once and the engine loads it like any
//! other tokenizer.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde_json::{Map, Value, json};
use tokenizers::Tokenizer;

use crate::LlmError;

/// GGUF `token_type` of an ordinary vocabulary entry.
const TOKEN_TYPE_NORMAL: i64 = 1;
/// GGUF `token_type` of a control token (`<|im_start|>`, `<|endoftext|>`, ...): never
/// produced by BPE, always matched whole, and special (hidden by `skip_special_tokens`).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// GGUF `token_type` of a user-defined token (`<tool_call>`): matched whole but
/// decoded as ordinary text, so tool-call tags show up in the streamed reply.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Qwen2's pre-tokenizer split pattern (the GPT-4 style pattern with single digits),
/// as Qwen ships it in its own `tokenizer.json`.
const QWEN2_SPLIT_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Builds a Hugging Face `tokenizer.json` from the tokenizer stored in a Qwen2 GGUF
/// file's metadata, because no registry ships the JSON file for these weights.
///
/// The result is byte-level BPE with Qwen2's pre-tokenizer (a regex split, then
/// byte-level mapping), NFC normalization, control and user-defined tokens registered
/// as added tokens, and a byte-level decoder. Write it to disk once (setup step) and
/// load it with [`load_tokenizer`].
pub fn tokenizer_json_from_gguf(gguf: &Path) -> Result<String, LlmError> {
    let load_err = |reason: String| LlmError::Load {
        path: gguf.to_path_buf(),
        reason,
    };
    let file = File::open(gguf).map_err(|e| load_err(format!("cannot open: {e}")))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| load_err(format!("not a readable GGUF file: {e}")))?;
    tokenizer_json_from_metadata(&content.metadata).map_err(load_err)
}

/// The work of [`tokenizer_json_from_gguf`] on already-read metadata.
fn tokenizer_json_from_metadata(
    metadata: &std::collections::HashMap<String, gguf_file::Value>,
) -> Result<String, String> {
    let get = |key: &str| {
        metadata
            .get(key)
            .ok_or_else(|| format!("metadata has no `{key}`"))
    };

    let model = get("tokenizer.ggml.model")?
        .to_string()
        .map_err(|e| format!("tokenizer.ggml.model: {e}"))?;
    if model != "gpt2" {
        return Err(format!(
            "tokenizer type `{model}` is not supported (only byte-level BPE, `gpt2`)"
        ));
    }
    if let Some(pre) = metadata.get("tokenizer.ggml.pre") {
        let pre = pre
            .to_string()
            .map_err(|e| format!("tokenizer.ggml.pre: {e}"))?;
        if pre != "qwen2" {
            return Err(format!(
                "pre-tokenizer `{pre}` is not supported (only Qwen2's, `qwen2`)"
            ));
        }
    }

    let tokens = string_array(get("tokenizer.ggml.tokens")?, "tokenizer.ggml.tokens")?;
    let merges = string_array(get("tokenizer.ggml.merges")?, "tokenizer.ggml.merges")?;
    let types: Vec<i64> = match metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| format!("tokenizer.ggml.token_type: {e}"))?
            .iter()
            .map(|t| {
                t.to_i32()
                    .map(i64::from)
                    .or_else(|_| t.to_u32().map(i64::from))
                    .map_err(|e| format!("tokenizer.ggml.token_type: {e}"))
            })
            .collect::<Result<_, _>>()?,
        None => vec![TOKEN_TYPE_NORMAL; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(format!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        ));
    }

    let mut vocab = Map::with_capacity(tokens.len());
    let mut added_tokens = Vec::new();
    for (id, (token, kind)) in tokens.iter().zip(&types).enumerate() {
        vocab.insert((*token).to_owned(), json!(id));
        if *kind == TOKEN_TYPE_CONTROL || *kind == TOKEN_TYPE_USER_DEFINED {
            added_tokens.push(json!({
                "id": id,
                "content": token,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": *kind == TOKEN_TYPE_CONTROL,
            }));
        }
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| format!("merge `{m}` is not two tokens separated by a space"))
        })
        .collect::<Result<_, _>>()?;

    let byte_level = json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": false,
        "use_regex": false,
    });
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": { "type": "NFC" },
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": { "Regex": QWEN2_SPLIT_PATTERN },
                    "behavior": "Isolated",
                    "invert": false,
                },
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    serde_json::to_string(&tokenizer).map_err(|e| format!("cannot serialize tokenizer.json: {e}"))
}

/// Reads a GGUF array of strings.
fn string_array<'a>(value: &'a gguf_file::Value, key: &str) -> Result<Vec<&'a str>, String> {
    value
        .to_vec()
        .map_err(|e| format!("{key}: {e}"))?
        .iter()
        .map(|v| {
            v.to_string()
                .map(String::as_str)
                .map_err(|e| format!("{key}: {e}"))
        })
        .collect()
}

/// Loads a `tokenizer.json` file, with the path in the error so a missing model file
/// is easy to find.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, LlmError> {
    Tokenizer::from_file(path).map_err(|e| LlmError::Load {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Parses a `tokenizer.json` held in memory (for example straight from
/// [`tokenizer_json_from_gguf`]).
pub fn tokenizer_from_json(json: &str) -> Result<Tokenizer, LlmError> {
    Tokenizer::from_bytes(json.as_bytes())
        .map_err(|e| LlmError::Tokenizer(format!("cannot parse tokenizer.json: {e}")))
}

/// Turns generated token ids into text pieces as soon as they are complete UTF-8.
///
/// A byte-level BPE token may end in the middle of a multi-byte character (an emoji or
/// an accented letter split across tokens); decoding it alone would produce U+FFFD.
/// This keeps the ids of the current message and emits only the newly stable suffix:
/// text is held back while it ends in an incomplete character.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Index of the first id whose text has not been emitted yet. Everything before
    /// it decoded to complete characters, so decoding from here on is independent.
    pending_from: usize,
}

impl<'a> TextStream<'a> {
    /// An empty stream decoding with `tokenizer`.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            pending_from: 0,
        }
    }

    /// Adds one generated id; returns the text that became complete, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>, LlmError> {
        self.ids.push(id);
        let text = self.decode_pending()?;
        if text.is_empty() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        self.pending_from = self.ids.len();
        Ok(Some(text))
    }

    /// Returns whatever is still held back (an incomplete character at the very end
    /// decodes as U+FFFD), for the end of a generation.
    pub fn flush(&mut self) -> Result<Option<String>, LlmError> {
        let text = self.decode_pending()?;
        self.pending_from = self.ids.len();
        Ok((!text.is_empty()).then_some(text))
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn decode_pending(&self) -> Result<String, LlmError> {
        self.tokenizer
            .decode(&self.ids[self.pending_from..], false)
            .map_err(|e| LlmError::Tokenizer(format!("cannot decode generated tokens: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A tiny byte-level vocabulary, enough to exercise the JSON layout and the
    /// streaming decoder without the real model.
    fn tiny_metadata() -> HashMap<String, gguf_file::Value> {
        use gguf_file::Value as V;
        let mut tokens: Vec<String> = Vec::new();
        // The 256 byte-level symbols, in the GPT-2 order is not needed here: any
        // order works as long as every byte has a symbol.
        for b in 0u16..256 {
            tokens.push(byte_level_char(b as u8).to_string());
        }
        tokens.push("ab".into());
        tokens.push("<|im_start|>".into());
        tokens.push("<tool_call>".into());
        let mut types = vec![V::I32(1); 257];
        types.push(V::I32(3));
        types.push(V::I32(4));
        let mut md = HashMap::new();
        md.insert("tokenizer.ggml.model".into(), V::String("gpt2".into()));
        md.insert("tokenizer.ggml.pre".into(), V::String("qwen2".into()));
        md.insert(
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        );
        md.insert(
            "tokenizer.ggml.merges".into(),
            V::Array(vec![V::String("a b".into())]),
        );
        md.insert("tokenizer.ggml.token_type".into(), V::Array(types));
        md
    }

    /// GPT-2's byte-to-unicode mapping.
    fn byte_level_char(b: u8) -> char {
        let printable =
            |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        if printable(b) {
            return char::from(b);
        }
        let n = (0..b).filter(|x| !printable(*x)).count() as u32;
        char::from_u32(256 + n).unwrap_or('?')
    }

    #[test]
    fn tiny_vocabulary_builds_a_loadable_tokenizer() -> Result<(), LlmError> {
        let json = tokenizer_json_from_metadata(&tiny_metadata()).map_err(LlmError::Tokenizer)?;
        let tok = tokenizer_from_json(&json)?;
        let enc = tok
            .encode("<|im_start|>ab<tool_call>é", false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        assert_eq!(enc.get_ids()[0], 257);
        assert_eq!(enc.get_ids()[1], 256, "`a b` must merge into `ab`");
        assert_eq!(enc.get_ids()[2], 258);
        assert_eq!(enc.get_ids().len(), 5, "é is two byte tokens");
        let text = tok
            .decode(enc.get_ids(), false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        assert_eq!(text, "<|im_start|>ab<tool_call>é");
        let plain = tok
            .decode(enc.get_ids(), true)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        assert_eq!(
            plain, "ab<tool_call>é",
            "control tokens are special, tool tags are not"
        );
        Ok(())
    }

    #[test]
    fn text_stream_holds_back_split_characters() -> Result<(), LlmError> {
        let json = tokenizer_json_from_metadata(&tiny_metadata()).map_err(LlmError::Tokenizer)?;
        let tok = tokenizer_from_json(&json)?;
        let enc = tok
            .encode("aé€b", false)
            .map_err(|e| LlmError::Tokenizer(e.to_string()))?;
        let mut stream = TextStream::new(&tok);
        let mut pieces = Vec::new();
        for &id in enc.get_ids() {
            if let Some(p) = stream.push(id)? {
                pieces.push(p);
            }
        }
        if let Some(p) = stream.flush()? {
            pieces.push(p);
        }
        assert_eq!(pieces, vec!["a", "é", "€", "b"]);
        Ok(())
    }

    #[test]
    fn unsupported_tokenizer_type_is_a_clear_error() {
        let mut md = tiny_metadata();
        md.insert(
            "tokenizer.ggml.model".into(),
            gguf_file::Value::String("llama".into()),
        );
        let err = tokenizer_json_from_metadata(&md).err().unwrap_or_default();
        assert!(err.contains("not supported"), "{err}");
    }
}
