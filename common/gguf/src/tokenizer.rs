//! The tokenizer a GGUF file describes, written as an HF `tokenizer.json` document that the
//! `tokenizers` crate loads. It is the tokenizer HF transformers builds from the same file: the
//! byte-level BPE of `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, control tokens as special
//! added tokens, user-defined ones as plain added tokens.

use serde_json::{json, Value as Json};

use crate::error::{GgufError, Result};
use crate::value::Metadata;

/// GGUF token types (llama.cpp's `llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// The special token ids the file names.
#[derive(Debug, Clone, PartialEq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
    pub add_bos: bool,
}

/// GPT-2's printable spelling of each byte (the alphabet byte-level BPE vocabularies are written in).
fn byte_alphabet() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for byte in 0..256u32 {
        let printable = (33..=126).contains(&byte) || (161..=172).contains(&byte) || (174..=255).contains(&byte);
        table[byte as usize] = if printable {
            char::from_u32(byte).unwrap_or('\0')
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\0')
        };
    }
    table
}

fn bad(key: &str, problem: impl Into<String>) -> GgufError {
    GgufError::BadMetadata { key: key.into(), problem: problem.into() }
}

/// The `tokenizer.json` document, and the special tokens.
pub fn tokenizer_json(metadata: &Metadata) -> Result<(Json, SpecialTokens)> {
    let model = metadata.str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(bad(
            "tokenizer.ggml.model",
            format!("{model:?} is not supported (Flotilla reads byte-level BPE, \"gpt2\")"),
        ));
    }
    let tokens = metadata.strings("tokenizer.ggml.tokens")?;
    let merges = metadata.strings("tokenizer.ggml.merges")?;
    let types = match metadata.get("tokenizer.ggml.token_type") {
        Some(_) => metadata.integers("tokenizer.ggml.token_type")?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(bad("tokenizer.ggml.token_type", format!("{} types for {} tokens", types.len(), tokens.len())));
    }
    let alphabet = byte_alphabet();
    let in_alphabet = |token: &str| token.chars().all(|c| alphabet.contains(&c));
    let mut vocab = serde_json::Map::new();
    for (id, token) in tokens.iter().enumerate() {
        let spelled =
            if in_alphabet(token) { token.to_string() } else { token.bytes().map(|b| alphabet[b as usize]).collect() };
        if vocab.insert(spelled, json!(id)).is_some() {
            return Err(bad("tokenizer.ggml.tokens", format!("token {id} ({token:?}) appears twice")));
        }
    }
    let mut added = Vec::new();
    for (id, (token, kind)) in tokens.iter().zip(&types).enumerate() {
        let special = match *kind {
            CONTROL if in_alphabet(token) => true,
            USER_DEFINED => false,
            _ => continue,
        };
        added.push(json!({"id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                          "normalized": false, "special": special}));
    }
    let special_id = |key: &str| -> Result<Option<u32>> {
        match metadata.get(key) {
            None => Ok(None),
            Some(value) => match value.as_u64() {
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                _ => Err(bad(key, format!("{value:?} is not a token id below {}", tokens.len()))),
            },
        }
    };
    let special = SpecialTokens {
        bos: special_id("tokenizer.ggml.bos_token_id")?,
        eos: special_id("tokenizer.ggml.eos_token_id")?,
        pad: special_id("tokenizer.ggml.padding_token_id")?,
        add_bos: metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false),
    };
    let document = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(metadata)?,
        "post_processor": post_processor(&special, &tokens),
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    Ok((document, special))
}

/// GPT-2's split for the pre-tokenizers that use it (SmolLM2's `smollm` among them: its
/// vocabulary has single digits only, so splitting digits one by one changes nothing).
fn pre_tokenizer(metadata: &Metadata) -> Result<Json> {
    let pre = metadata.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or("default");
    match pre {
        "default" | "gpt2" | "smollm" => {
            Ok(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}))
        }
        other => Err(bad(
            "tokenizer.ggml.pre",
            format!("pre-tokenizer {other:?} is not supported (default, gpt2, smollm are)"),
        )),
    }
}

fn post_processor(special: &SpecialTokens, tokens: &[&str]) -> Json {
    let sequence = json!({"Sequence": {"id": "A", "type_id": 0}});
    match special.bos.filter(|_| special.add_bos) {
        Some(bos) => {
            let name = tokens[bos as usize];
            json!({"type": "TemplateProcessing",
                   "single": [{"SpecialToken": {"id": name, "type_id": 0}}, sequence],
                   "pair": [{"SpecialToken": {"id": name, "type_id": 0}}, sequence, {"Sequence": {"id": "B", "type_id": 1}}],
                   "special_tokens": {name: {"id": name, "ids": [bos], "tokens": [name]}}})
        }
        None => json!({"type": "TemplateProcessing", "single": [sequence],
                        "pair": [sequence, {"Sequence": {"id": "B", "type_id": 1}}], "special_tokens": {}}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_alphabet_is_gpt2s() {
        let alphabet = byte_alphabet();
        assert_eq!(alphabet[b'a' as usize], 'a');
        assert_eq!(alphabet[b' ' as usize], 'Ġ');
        assert_eq!(alphabet[b'\n' as usize], 'Ċ');
        let distinct: std::collections::HashSet<char> = alphabet.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
