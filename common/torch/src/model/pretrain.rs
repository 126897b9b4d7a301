//! Central pretraining of the base model on public data (the coordinator's `[model.pretrain]`).

use flotilla_wire::protocol::TrainingSettings;
use tch::{Device, Tensor};

use super::{Architecture, BaseWeights, FullModel, ModelError};
use crate::data::Dataset;

/// Settings of the coordinator's central pretraining of the base model.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainSettings {
    pub steps: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub seed: u64,
}

/// Trains every weight of the full model (base layers and head, no LoRA) on `data` with AdamW:
/// the centrally pretrained base that federated LoRA fine-tuning starts from. Returns the base
/// weights and the head (`head.weight`, `head.bias`).
pub(super) fn pretrain(
    architecture: &Architecture,
    base: &BaseWeights,
    head: (&Tensor, &Tensor),
    data: &Dataset,
    settings: &PretrainSettings,
) -> Result<(BaseWeights, Tensor, Tensor), ModelError> {
    let mut model = FullModel::new(architecture, base, head, Device::Cpu)?;
    let training = TrainingSettings {
        local_steps: settings.steps,
        local_epochs: 0,
        batch_size: settings.batch_size,
        learning_rate: settings.learning_rate,
        seed: settings.seed,
        trainable: Default::default(),
    };
    model.train_steps(data, &training)?;
    let (head_weight, head_bias) = model.head()?;
    Ok((model.base_weights()?, head_weight, head_bias))
}
