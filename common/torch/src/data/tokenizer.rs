//! Tokenization on the device with the HF `tokenizers` crate reading `tokenizer.json`.
//!
//! A `tokenizer.json` may carry its own padding and truncation (all-MiniLM-L6-v2's pads and
//! truncates every input to 128): both are replaced, so that inputs are truncated at the
//! configured maximum length and batches are padded only to their longest input.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use flotilla_wire::model::BertSpec;

use super::text::{load_text, TextSplit};
use super::{DataError, Dataset};

/// The `split` of the labelled texts at `path`, tokenized with the `tokenizer.json` at `tokenizer`
/// for `spec` (its labels, maximum length and vocabulary): what a device trains on. A file that is
/// not valid UTF-8 is decoded with replacement characters, and a warning names it.
pub fn load_tokenized(spec: &BertSpec, path: &Path, split: TextSplit, tokenizer: &Path) -> Result<Dataset, DataError> {
    let corpus = load_text(path, &spec.labels, split)?;
    for file in &corpus.lossy_files {
        tracing::warn!(file = %file.display(), "not valid UTF-8; decoded with replacement characters");
    }
    let tokenizer = TextTokenizer::from_file(tokenizer, spec.max_length as usize, spec.vocab as usize)?;
    tokenizer.dataset(&corpus.texts(), &corpus.labels())
}

pub struct TextTokenizer {
    inner: Tokenizer,
    max_length: usize,
    path: PathBuf,
}

impl TextTokenizer {
    /// Reads `path`, truncating at `max_length` tokens (special tokens included). The tokenizer's
    /// vocabulary must have exactly `embedding_rows` entries, the rows of the model's word embeddings.
    pub fn from_file(path: &Path, max_length: usize, embedding_rows: usize) -> Result<TextTokenizer, DataError> {
        let fail = |message: String| DataError { path: path.to_path_buf(), message };
        let mut inner = Tokenizer::from_file(path).map_err(|e| fail(format!("not a tokenizer.json: {e}")))?;
        let vocabulary = inner.get_vocab_size(true);
        if vocabulary != embedding_rows {
            return Err(fail(format!(
                "the tokenizer's vocabulary has {vocabulary} tokens but the model's word embeddings have {embedding_rows} rows"
            )));
        }
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| fail(format!("cannot truncate at {max_length}: {e}")))?;
        Ok(TextTokenizer { inner, max_length, path: path.to_path_buf() })
    }

    /// The ids of one text, with the special tokens ([CLS] … [SEP]).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| DataError { path: self.path.clone(), message: format!("cannot tokenize: {e}") })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids `N × L` (L: the longest input, at most the maximum length; 0 past each input's
    /// end) and each input's length, labelled with `labels`.
    pub fn dataset(&self, texts: &[&str], labels: &[i64]) -> Result<Dataset, DataError> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| DataError { path: self.path.clone(), message: format!("cannot tokenize: {e}") })?;
        let longest = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(1).clamp(1, self.max_length);
        let mut ids = vec![0i64; texts.len() * longest];
        let mut lengths = Vec::with_capacity(texts.len());
        for (row, encoding) in encodings.iter().enumerate() {
            let tokens = &encoding.get_ids()[..encoding.get_ids().len().min(longest)];
            for (column, &id) in tokens.iter().enumerate() {
                ids[row * longest + column] = i64::from(id);
            }
            lengths.push(tokens.len() as i64);
        }
        let ids = Tensor::from_slice(&ids).view([texts.len() as i64, longest as i64]);
        Ok(Dataset::tokens(ids, Tensor::from_slice(&lengths), Tensor::from_slice(labels).to_kind(Kind::Int64)))
    }
}
