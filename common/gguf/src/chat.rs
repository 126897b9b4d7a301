//! The chat template a GGUF file carries (`tokenizer.chat_template`, Jinja), rendered the way HF
//! transformers renders it (`trim_blocks`, `lstrip_blocks`, the special tokens as variables).

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

use crate::error::{GgufError, Result};
use crate::value::Metadata;

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn user(content: &str) -> ChatMessage {
        ChatMessage { role: "user".into(), content: content.into() }
    }

    pub fn assistant(content: &str) -> ChatMessage {
        ChatMessage { role: "assistant".into(), content: content.into() }
    }
}

pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

const KEY: &str = "tokenizer.chat_template";

impl ChatTemplate {
    pub fn from_metadata(metadata: &Metadata) -> Result<ChatTemplate> {
        let tokens = metadata.strings("tokenizer.ggml.tokens")?;
        let token = |key: &str| {
            metadata.get(key).and_then(|v| v.as_u64()).and_then(|id| tokens.get(id as usize)).map(|t| t.to_string())
        };
        ChatTemplate::new(
            metadata.str(KEY)?,
            &token("tokenizer.ggml.bos_token_id").unwrap_or_default(),
            &token("tokenizer.ggml.eos_token_id").unwrap_or_default(),
        )
    }

    /// A template from its Jinja source (as HF's `tokenizer_config.json` keeps it) and the special
    /// tokens it may name.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let template = ChatTemplate {
            source: source.to_string(),
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        };
        // A template that does not compile is refused when the model is opened, not at first use.
        template.render(&[ChatMessage::user("x")], true)?;
        Ok(template)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The conversation as text, ending with the assistant's turn opened when `add_generation_prompt`.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut environment = Environment::new();
        environment.set_trim_blocks(true);
        environment.set_lstrip_blocks(true);
        environment.add_function("raise_exception", |message: String| -> std::result::Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        let fail = |e: Error| GgufError::BadMetadata { key: KEY.into(), problem: format!("{e:#}") };
        environment.add_template("chat", &self.source).map_err(fail)?;
        let template = environment.get_template("chat").map_err(fail)?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(fail)
    }
}
