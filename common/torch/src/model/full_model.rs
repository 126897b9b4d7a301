//! Every weight of the model (base and head) trained, no LoRA: the coordinator's central
//! pretraining of a base (`[model.pretrain]`), and the study's full fine-tuning bound above LoRA
//! (issue 15), run on pooled data by `flotilla-coordinator finetune-full`. Devices only ever train
//! adapters.

use tch::{nn, Device, Tensor};

use super::lora_model::{adamw_steps, evaluate_logits};
use super::{Architecture, ArchitectureExt, BaseWeights, ModelError};
use crate::data::Dataset;
use flotilla_wire::protocol::TrainingSettings;

/// A whole model as trainable variables: the base tensors under their own names and the head.
pub struct FullModel {
    architecture: Architecture,
    weights: BaseWeights,
    head_weight: Tensor,
    head_bias: Tensor,
    device: Device,
    store: nn::VarStore,
}

impl FullModel {
    /// Every tensor of `base` and the head `(weight, bias)` become variables (copies; the inputs
    /// are untouched).
    pub fn new(
        architecture: &Architecture,
        base: &BaseWeights,
        head: (&Tensor, &Tensor),
        device: Device,
    ) -> Result<FullModel, ModelError> {
        architecture.check_base(base)?;
        let store = nn::VarStore::new(device);
        let root = store.root();
        let mut weights = BaseWeights::new();
        for (i, (name, tensor)) in base.iter().enumerate() {
            // VarStore names may not contain dots; the map keeps the model's own names.
            weights.insert(name.clone(), root.f_var_copy(&format!("base_{i}"), tensor)?);
        }
        let head_weight = root.f_var_copy("head_weight", head.0)?;
        let head_bias = root.f_var_copy("head_bias", head.1)?;
        Ok(FullModel { architecture: architecture.clone(), weights, head_weight, head_bias, device, store })
    }

    /// Logits for inputs `x` (features, or token ids with their `lengths` for a transformer).
    pub fn forward(&self, x: &Tensor, lengths: Option<&Tensor>) -> Result<Tensor, ModelError> {
        let features = super::forward_features(&self.architecture, &self.weights, None, x, lengths)?;
        Ok(features.f_linear(&self.head_weight, Some(&self.head_bias))?)
    }

    /// `settings.local_steps` AdamW steps over every weight, on minibatches drawn with
    /// `settings.seed` (a fresh optimizer per call, as a device's local training).
    pub fn train_steps(&mut self, data: &Dataset, settings: &TrainingSettings) -> Result<(), ModelError> {
        adamw_steps(&self.store, data, settings, self.device, &super::frozen::FrozenFactors::none(), |x, lengths| {
            self.forward(x, lengths)
        })
    }

    /// Mean cross-entropy and accuracy over `data`, in batches, without gradients.
    pub fn evaluate(&self, data: &Dataset, batch_size: usize) -> Result<(f64, f64), ModelError> {
        evaluate_logits(data, batch_size, self.device, |x, lengths| self.forward(x, lengths))
    }

    /// The current base weights (detached copies on the CPU), under the model's own names.
    pub fn base_weights(&self) -> Result<BaseWeights, ModelError> {
        self.weights
            .iter()
            .map(|(n, t)| Ok((n.clone(), crate::tensor::try_copy(&t.detach().f_to_device(Device::Cpu)?)?)))
            .collect()
    }

    /// The current head `(weight, bias)` (detached copies on the CPU).
    pub fn head(&self) -> Result<(Tensor, Tensor), ModelError> {
        let copy = |t: &Tensor| crate::tensor::try_copy(&t.detach().f_to_device(Device::Cpu)?);
        Ok((copy(&self.head_weight)?, copy(&self.head_bias)?))
    }

    /// How many numbers training changes: every weight of the base and the head.
    pub fn trainable_parameters(&self) -> i64 {
        self.store.trainable_variables().iter().map(Tensor::numel).map(|n| n as i64).sum()
    }
}
