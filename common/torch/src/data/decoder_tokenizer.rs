//! The decoder's tokenizer, built from its GGUF file's metadata with HF `tokenizers` (byte-level
//! BPE, the same tokenizer HF transformers builds from the file), and its chat template.

use std::path::Path;
use std::str::FromStr;

use flotilla_data::headline::split_headline;
use flotilla_data::text::{load_text, TextSplit};
use flotilla_wire::model::{DecoderSpec, DecoderTask};
use tch::Tensor;

use super::{DataError, Dataset};

use flotilla_data::headline::{HeadlineExample, HEADLINE_INSTRUCTION};
use flotilla_gguf::{tokenizer_json, ChatMessage, ChatTemplate, GgufError, GgufFile, SpecialTokens};
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum DecoderTokenizerError {
    #[error("tokenizer: {0}")]
    Gguf(#[from] GgufError),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("tokenizer: {0}")]
    TooLong(String),
}

/// One training or evaluation sequence: the loss is on `ids[target_start..]`, each predicted from
/// the tokens before it.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderExample {
    pub ids: Vec<i64>,
    pub target_start: usize,
}

/// Marks where the article goes in the rendered prompt (split out before tokenizing).
const BODY_MARK: &str = "\u{1}BODY\u{1}";

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

    /// The tokenizer of an HF model directory: `tokenizer.json`, and from `tokenizer_config.json`
    /// the chat template and the special tokens (what `export --merged` writes for a decoder).
    pub fn from_hf_dir(dir: &Path) -> Result<DecoderTokenizer, DecoderTokenizerError> {
        let fail = |message: String| DecoderTokenizerError::Tokenizers(format!("{}: {message}", dir.display()));
        let inner =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| fail(format!("tokenizer.json: {e}")))?;
        let text = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .map_err(|e| fail(format!("tokenizer_config.json: {e}")))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fail(format!("tokenizer_config.json: {e}")))?;
        let token = |key: &str| config[key].as_str().map(str::to_string);
        let id = |key: &str| token(key).and_then(|t| inner.token_to_id(&t));
        let special = SpecialTokens {
            bos: id("bos_token"),
            eos: id("eos_token"),
            pad: id("pad_token"),
            add_bos: config["add_bos_token"].as_bool().unwrap_or(false),
        };
        let chat = match config["chat_template"].as_str() {
            Some(source) => Some(ChatTemplate::new(
                source,
                &token("bos_token").unwrap_or_default(),
                &token("eos_token").unwrap_or_default(),
            )?),
            None => None,
        };
        Ok(DecoderTokenizer { inner, special, chat })
    }

    /// The chat template's source, if any (for `tokenizer_config.json`).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat.as_ref().map(ChatTemplate::source)
    }

    /// The text of one token id.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
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

    /// The headline example of an article: the chat prompt (instruction and body) then the headline
    /// and the end-of-turn token as the target, in at most `max_length` tokens. The body is cut
    /// (at a token) to fit; the prompt's template and the headline are never cut, and an article
    /// whose template and headline alone do not fit is refused.
    pub fn headline_example(
        &self,
        example: &HeadlineExample,
        max_length: usize,
    ) -> Result<DecoderExample, DecoderTokenizerError> {
        let rendered = self.chat_prompt(&format!("{HEADLINE_INSTRUCTION}{BODY_MARK}"))?;
        let (before, after) = rendered.split_once(BODY_MARK).unwrap_or((rendered.as_str(), ""));
        let end_of_turn = self.special.eos.map(|id| vec![id]).unwrap_or_default();
        let [before, body, after, headline] =
            [before, example.body.as_str(), after, example.headline.as_str()].map(|text| self.encode(text));
        let mut target = headline?;
        target.extend(end_of_turn);
        let (before, after) = (before?, after?);
        let fixed = before.len() + after.len() + target.len();
        if fixed >= max_length {
            return Err(DecoderTokenizerError::TooLong(format!(
                "{}: the prompt template and headline take {fixed} tokens, not less than the maximum length {max_length}",
                example.key
            )));
        }
        let mut body = body?;
        body.truncate(max_length - fixed);
        let ids: Vec<i64> = before.into_iter().chain(body).chain(after).map(i64::from).collect();
        let target_start = ids.len();
        Ok(DecoderExample { ids: ids.into_iter().chain(target.into_iter().map(i64::from)).collect(), target_start })
    }

    /// A next-word example of `text`: its first `max_length` tokens, the loss on every one after
    /// the first. A text of a single token cannot be one.
    pub fn next_word_example(
        &self,
        key: &str,
        text: &str,
        max_length: usize,
    ) -> Result<DecoderExample, DecoderTokenizerError> {
        let mut ids: Vec<i64> = self.encode(text)?.into_iter().map(i64::from).collect();
        ids.truncate(max_length);
        if ids.len() < 2 {
            return Err(DecoderTokenizerError::TooLong(format!(
                "{key}: a text of {} token(s) has no next word",
                ids.len()
            )));
        }
        Ok(DecoderExample { ids, target_start: 1 })
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

/// The examples of the `split` of the texts at `path` for `spec`'s task, tokenized: what a device
/// trains on. Headline writing takes articles whose first line is the headline (those without a
/// body are skipped, and counted in a warning); next-word adaptation takes every text.
pub fn load_headlines(
    spec: &DecoderSpec,
    path: &Path,
    split: TextSplit,
    tokenizer: &DecoderTokenizer,
) -> Result<Dataset, DataError> {
    let fail = |message: String| DataError { path: path.to_path_buf(), message };
    let corpus = load_text(path, &spec.labels, split)?;
    if spec.task == DecoderTask::NextWord {
        let mut sequences = Vec::with_capacity(corpus.examples.len());
        let mut labels = Vec::with_capacity(corpus.examples.len());
        for example in &corpus.examples {
            match tokenizer.next_word_example(&example.key, &example.text, spec.max_length as usize) {
                Ok(sequence) => {
                    sequences.push(sequence);
                    labels.push(example.label as i64);
                }
                Err(error) => tracing::debug!(%error, "skipped"),
            }
        }
        if sequences.is_empty() {
            return Err(fail("holds no text of two tokens or more".into()));
        }
        return Ok(sequences_dataset(&sequences, &labels));
    }
    let articles: Vec<_> = corpus.examples.iter().filter_map(split_headline).collect();
    let skipped = corpus.examples.len() - articles.len();
    if skipped > 0 {
        tracing::warn!(skipped, path = %path.display(), "articles without a headline line and a body are skipped");
    }
    let mut sequences = Vec::with_capacity(articles.len());
    for article in &articles {
        sequences.push(tokenizer.headline_example(article, spec.max_length as usize).map_err(|e| fail(e.to_string()))?);
    }
    if sequences.is_empty() {
        return Err(fail("holds no article with a headline and a body".into()));
    }
    let labels: Vec<i64> = articles.iter().map(|a| a.label as i64).collect();
    Ok(sequences_dataset(&sequences, &labels))
}

/// Sequences as a [`Dataset`]: ids padded with 0 to the longest, lengths, target starts, classes.
pub fn sequences_dataset(sequences: &[DecoderExample], labels: &[i64]) -> Dataset {
    let longest = sequences.iter().map(|s| s.ids.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![0i64; sequences.len() * longest];
    for (row, sequence) in sequences.iter().enumerate() {
        ids[row * longest..row * longest + sequence.ids.len()].copy_from_slice(&sequence.ids);
    }
    let lengths: Vec<i64> = sequences.iter().map(|s| s.ids.len() as i64).collect();
    let starts: Vec<i64> = sequences.iter().map(|s| s.target_start as i64).collect();
    Dataset::sequences(
        Tensor::from_slice(&ids).view([sequences.len() as i64, longest as i64]),
        Tensor::from_slice(&lengths),
        Tensor::from_slice(&starts),
        Tensor::from_slice(labels),
    )
}

/// The sequences a decoder [`Dataset`] holds (ids cut to each length).
pub fn dataset_sequences(data: &Dataset) -> Result<Vec<DecoderExample>, String> {
    let (Some(lengths), Some(starts)) = (&data.lengths, &data.target_starts) else {
        return Err("the local data are not a decoder's sequences".into());
    };
    let lengths = Vec::<i64>::try_from(lengths).map_err(|e| e.to_string())?;
    let starts = Vec::<i64>::try_from(starts).map_err(|e| e.to_string())?;
    let width = data.features.size().get(1).copied().unwrap_or(0);
    let ids = Vec::<i64>::try_from(data.features.flatten(0, -1)).map_err(|e| e.to_string())?;
    Ok(lengths
        .iter()
        .zip(&starts)
        .enumerate()
        .map(|(row, (&length, &start))| {
            let from = row * width as usize;
            DecoderExample { ids: ids[from..from + length as usize].to_vec(), target_start: start as usize }
        })
        .collect())
}
