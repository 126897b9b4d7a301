//! The model a device trains, whatever its family: a classifier ([`LoraModel`]) or a decoder
//! ([`DecoderModel`]), under one contract (train, train without evaluation, the adapter after).

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

    pub fn adapter(&self) -> Result<Adapter, ModelError> {
        match self {
            LocalModel::Classifier(model) => model.adapter(),
            LocalModel::Decoder(model) => model.adapter(),
        }
    }
}
