//! The model a device trains, whatever its family: a classifier ([`LoraModel`]) or a decoder
//! ([`DecoderModel`]), under one contract (train, train without evaluation, the adapter after).

use flotilla_wire::evaluation::EvaluationSums;
use flotilla_wire::protocol::{LocalMetrics, TrainingSettings};
use tch::Device;

use super::decoder_model::DecoderModel;
use super::{Architecture, BaseWeights, LoraModel, ModelError};
use crate::adapter::Adapter;
use crate::data::Dataset;

pub enum LocalModel {
    Classifier(LoraModel),
    Decoder(DecoderModel),
}

impl LocalModel {
    pub fn new(
        architecture: &Architecture,
        base: &BaseWeights,
        adapter: &Adapter,
        scale: f64,
        device: Device,
    ) -> Result<LocalModel, ModelError> {
        Ok(if architecture.is_decoder() {
            LocalModel::Decoder(DecoderModel::new(architecture, base, adapter, scale, device)?)
        } else {
            LocalModel::Classifier(LoraModel::new(architecture, base, adapter, scale, device)?)
        })
    }

    pub fn train(&mut self, data: &Dataset, settings: &TrainingSettings) -> Result<LocalMetrics, ModelError> {
        match self {
            LocalModel::Classifier(model) => model.train(data, settings),
            LocalModel::Decoder(model) => model.train(data, settings),
        }
    }

    pub fn train_steps(&mut self, data: &Dataset, settings: &TrainingSettings) -> Result<(), ModelError> {
        match self {
            LocalModel::Classifier(model) => model.train_steps(data, settings),
            LocalModel::Decoder(model) => model.train_steps(data, settings),
        }
    }

    /// What `data` says about the model, as sums (federated evaluation): a classifier's per-label
    /// counts and summed cross-entropy over examples, a decoder's over target tokens.
    pub fn evaluation_sums(&self, data: &Dataset) -> Result<EvaluationSums, ModelError> {
        match self {
            LocalModel::Classifier(model) => {
                let batch = if model.takes_tokens() { 64 } else { 1024 };
                let (mean_loss, confusion) = model.evaluate_confusion(data, batch)?;
                Ok(EvaluationSums::from_confusion(&confusion, mean_loss * data.len() as f64))
            }
            LocalModel::Decoder(model) => {
                let sums = model.evaluate_sums(data)?;
                Ok(EvaluationSums {
                    examples: data.len() as u64,
                    scored: sums.tokens,
                    correct: sums.correct,
                    loss_sum: sums.loss,
                    labels: Vec::new(),
                    generated: 0,
                    rouge_l_sum: 0.0,
                })
            }
        }
    }

    /// A decoder's greedy headlines for the first `count` examples of `data`, each with its
    /// ROUGE-L F1 against the true one; none for a classifier.
    pub fn write_headlines(
        &self,
        tokenizer: &crate::data::decoder_tokenizer::DecoderTokenizer,
        data: &Dataset,
        count: usize,
    ) -> Result<Vec<(String, f64)>, ModelError> {
        match self {
            LocalModel::Classifier(_) => Ok(Vec::new()),
            LocalModel::Decoder(model) => model.write_headlines(tokenizer, data, count),
        }
    }

    pub fn adapter(&self) -> Result<Adapter, ModelError> {
        match self {
            LocalModel::Classifier(model) => model.adapter(),
            LocalModel::Decoder(model) => model.adapter(),
        }
    }
}
