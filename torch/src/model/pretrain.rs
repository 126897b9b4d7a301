//! Central pretraining of the base model on public data (the coordinator's `[model.pretrain]`).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{nn, nn::OptimizerConfig, Device, Tensor};

use super::layers::layer_forward;
use super::{Architecture, ArchitectureExt, BaseWeights, ModelError};
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
    architecture.check_base(base)?;
    let store = nn::VarStore::new(Device::Cpu);
    let root = store.root();
    let mut layers = Vec::new();
    for layer in architecture.adapted_layers() {
        let w = root.f_var_copy(&format!("{}_weight", layer.name), &base[&format!("{}.weight", layer.name)])?;
        let b = root.f_var_copy(&format!("{}_bias", layer.name), &base[&format!("{}.bias", layer.name)])?;
        layers.push((layer.name, layer.kind, w, b));
    }
    let head_w = root.f_var_copy("head_weight", head.0)?;
    let head_b = root.f_var_copy("head_bias", head.1)?;
    let forward = |x: &Tensor| {
        let mut h = architecture.input_view(x);
        for (_, kind, w, b) in &layers {
            h = layer_forward(&h, *kind, w, b, None);
        }
        h.flatten(1, -1).linear(&head_w, Some(&head_b))
    };
    let mut optimizer = nn::AdamW { wd: 0.0, ..Default::default() }.build(&store, settings.learning_rate)?;
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    let n = data.len() as i64;
    let batch = (settings.batch_size as i64).min(n).max(1);
    for _ in 0..settings.steps {
        let picks: Vec<i64> = (0..batch).map(|_| rng.random_range(0..n)).collect();
        let index = Tensor::from_slice(&picks);
        let x = data.features.f_index_select(0, &index)?;
        let y = data.labels.f_index_select(0, &index)?;
        optimizer.backward_step(&forward(&x).cross_entropy_for_logits(&y));
    }
    let mut trained = BTreeMap::new();
    for (name, _, w, b) in &layers {
        trained.insert(format!("{name}.weight"), w.detach().copy());
        trained.insert(format!("{name}.bias"), b.detach().copy());
    }
    Ok((trained, head_w.detach().copy(), head_b.detach().copy()))
}
