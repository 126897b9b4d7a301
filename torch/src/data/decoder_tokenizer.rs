//! The decoder's tokenizer, built from its GGUF file's metadata with HF `tokenizers` (byte-level
//! BPE, the same tokenizer HF transformers builds from the file), and its chat template.

use std::str::FromStr;

use flotilla_gguf::{tokenizer_json, ChatMessage, ChatTemplate, GgufError, GgufFile, SpecialTokens};
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum DecoderTokenizerError {
    #[error("tokenizer: {0}")]
    Gguf(#[from] GgufError),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
}

pub struct DecoderTokenizer {
    inner: Tokenizer,
    pub special: SpecialTokens,
    chat: Option<ChatTemplate>,
}

impl DecoderTokenizer {
    pub fn from_gguf(file: &GgufFile) -> Result<DecoderTokenizer, DecoderTokenizerError> {
        let (document, special) = tokenizer_json(file.metadata())?;
        let inner = Tokenizer::from_str(&document.to_string())
            .map_err(|e| DecoderTokenizerError::Tokenizers(format!("the file's tokenizer does not load: {e}")))?;
        let chat = match file.metadata().get("tokenizer.chat_template") {
            Some(_) => Some(ChatTemplate::from_metadata(file.metadata())?),
            None => None,
        };
        Ok(DecoderTokenizer { inner, special, chat })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) stay whole.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DecoderTokenizerError> {
        let encoding = self.inner.encode(text, true).map_err(|e| DecoderTokenizerError::Tokenizers(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DecoderTokenizerError> {
        self.inner.decode(ids, false).map_err(|e| DecoderTokenizerError::Tokenizers(e.to_string()))
    }

    /// A user turn in the file's chat template with the assistant's turn opened (the text itself
    /// when the file has no template).
    pub fn chat_prompt(&self, user: &str) -> Result<String, DecoderTokenizerError> {
        match &self.chat {
            Some(template) => Ok(template.render(&[ChatMessage::user(user)], true)?),
            None => Ok(user.to_string()),
        }
    }
}
