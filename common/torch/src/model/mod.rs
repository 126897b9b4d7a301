//! LoRA models: a frozen base and a trainable adapter (LoRA factors plus a shared classifier head).
//!
//! Each adapted layer computes `y = W0·x + b0 + s·B·(A·x)` with one scale `s = lora_alpha / R_max`
//! for every rank, so a rank-r slice of the global adapter means the same thing on every device.
//!
//! The architecture itself is plain data in `flotilla_wire::model`; [`ArchitectureExt`] adds what
//! libtorch does with it, [`LoraModel`] trains and evaluates, and [`FullModel`] trains every weight:
//! `pretrain` runs it to make a base centrally, and the study's bound above LoRA to fine-tune one.

pub mod bert;
pub mod checkpoint;
pub mod decoder_lora;
pub mod decoder_model;
mod frozen;
mod full_model;
mod layers;
pub mod llama;
mod local_model;
mod lora_model;
mod pretrain;
pub mod quantized;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

pub use flotilla_wire::model::{
    Activation, Architecture, BertSpec, DecoderSpec, LayerKind, LayerShape, Pooling, ADAPTER_PREFIX, CONV_KERNEL,
};
pub use full_model::FullModel;
pub use local_model::LocalModel;
pub use lora_model::LoraModel;
pub use pretrain::PretrainSettings;

use crate::adapter::{lora_a_name, lora_b_name, Adapter, AdapterError};
use crate::data::{seeded_uniform, Dataset};
use layers::layer_forward;

pub type BaseWeights = BTreeMap<String, Tensor>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model: tensor '{0}' is missing")]
    Missing(String),
    #[error("model: tensor '{name}' has shape {got:?}, expected {want:?}")]
    Shape { name: String, got: Vec<i64>, want: Vec<i64> },
    #[error("model: tensor '{name}' is {kind}, expected f32")]
    Kind { name: String, kind: String },
    #[error("model: {0}")]
    Unsupported(String),
    #[error("model: a transformer needs each input's length")]
    NoLengths,
    #[error("model: libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
    #[error("model: {0}")]
    Gguf(#[from] flotilla_gguf::GgufError),
}

/// Checks that `base` holds `name` as an f32 tensor of shape `want`.
pub(crate) fn check_dense(base: &BaseWeights, name: String, want: Vec<i64>) -> Result<(), ModelError> {
    let tensor = base.get(&name).ok_or_else(|| ModelError::Missing(name.clone()))?;
    let got = tensor.size();
    if got != want {
        return Err(ModelError::Shape { name, got, want });
    }
    if tensor.kind() != Kind::Float {
        return Err(ModelError::Kind { name, kind: format!("{:?}", tensor.kind()) });
    }
    Ok(())
}

/// LoRA factors `(A, B)` by adapted module name and the one scale `s` they are applied with.
pub struct Lora<'a> {
    pub factors: &'a BTreeMap<String, (Tensor, Tensor)>,
    pub scale: f64,
}

/// What the head sees: the last hidden layer's output (small models) or the pooled encoding
/// (transformer), with LoRA when given.
pub(crate) fn forward_features(
    architecture: &Architecture,
    weights: &BaseWeights,
    lora: Option<&Lora>,
    x: &Tensor,
    lengths: Option<&Tensor>,
) -> Result<Tensor, ModelError> {
    if let Architecture::Bert(spec) = architecture {
        return bert::encode(spec, weights, lora, x, lengths.ok_or(ModelError::NoLengths)?);
    }
    if architecture.is_decoder() {
        return Err(ModelError::Unsupported("a decoder has no pooled features to classify".into()));
    }
    let get = |name: String| weights.get(&name).ok_or(ModelError::Missing(name));
    let mut h = architecture.input_view(x);
    for layer in architecture.adapted_layers() {
        let (w, b) = (get(format!("{}.weight", layer.name))?, get(format!("{}.bias", layer.name))?);
        let factors = lora.and_then(|l| l.factors.get(&layer.name).map(|(a, b)| (a, b, l.scale)));
        h = layer_forward(&h, layer.kind, w, b, factors);
    }
    Ok(h.f_flatten(1, -1)?)
}

/// What libtorch does with an [`Architecture`]: initialise, check, pretrain, merge and run it.
pub trait ArchitectureExt {
    /// The base tensor that an adapted layer's LoRA update adds to (`fc1` → `fc1.weight`;
    /// `bert.encoder.layer.0.attention.self.query` → `encoder.layer.0.attention.self.query.weight`).
    fn base_weight_name(&self, layer: &str) -> String;
    /// Reshapes flattened inputs into what the first layer takes.
    fn input_view(&self, x: &Tensor) -> Tensor;
    /// A base model initialised like PyTorch's `nn.Linear` (uniform ±1/√d_in), reproducible from `seed`.
    fn init_base(&self, seed: u64) -> BaseWeights;
    /// The initial global adapter at rank `max_rank`: A uniform ±1/√d_in (as PEFT), B zero, so the
    /// model starts as the base; the head is initialised like `nn.Linear`.
    fn init_adapter(&self, max_rank: usize, seed: u64) -> Result<Adapter, ModelError>;
    /// Checks that `base` has exactly the tensors and shapes this architecture needs.
    fn check_base(&self, base: &BaseWeights) -> Result<(), ModelError>;
    /// Trains every weight of the full model (base layers and head, no LoRA) on `data` with AdamW:
    /// the centrally pretrained base that federated LoRA fine-tuning starts from. Returns the base
    /// weights and the head (`head.weight`, `head.bias`).
    fn pretrain(
        &self,
        base: &BaseWeights,
        head: (&Tensor, &Tensor),
        data: &Dataset,
        settings: &PretrainSettings,
    ) -> Result<(BaseWeights, Tensor, Tensor), ModelError>;
    /// The full model with the adapter merged in: each adapted layer's weight becomes
    /// `W0 + ΔW + scale·B·A` (ΔW: online FLoRA's merged update, zero otherwise), and the adapter's
    /// head becomes `head.weight` / `head.bias`. The result is a plain network (see
    /// [`ArchitectureExt::forward_merged`]) that needs no LoRA support to run.
    fn merge(&self, base: &BaseWeights, adapter: &Adapter, scale: f64) -> Result<BaseWeights, ModelError>;
    /// Logits of a merged model (see [`ArchitectureExt::merge`]); `lengths` for a transformer.
    fn forward_merged(&self, weights: &BaseWeights, x: &Tensor, lengths: Option<&Tensor>)
        -> Result<Tensor, ModelError>;
}

impl ArchitectureExt for Architecture {
    fn base_weight_name(&self, layer: &str) -> String {
        match self {
            Architecture::Bert(_) => bert::base_weight_name(layer),
            _ => format!("{layer}.weight"),
        }
    }

    fn input_view(&self, x: &Tensor) -> Tensor {
        match self {
            Architecture::Mlp { .. } | Architecture::Bert(_) | Architecture::Llama(_) => x.shallow_clone(),
            Architecture::Cnn { side, channels, .. } => x.view([-1, *channels as i64, *side as i64, *side as i64]),
        }
    }

    fn init_base(&self, seed: u64) -> BaseWeights {
        match self {
            Architecture::Bert(spec) => return bert::init_base(spec, seed),
            Architecture::Llama(spec) => return llama::init_base(spec, seed),
            _ => {}
        }
        let mut weights = BTreeMap::new();
        for (i, layer) in self.adapted_layers().iter().enumerate() {
            let bound = 1.0 / (layer.d_in as f64).sqrt();
            let s = seed.wrapping_mul(1000).wrapping_add(2 * i as u64);
            let shape: Vec<usize> = layer.weight_shape().iter().map(|&d| d as usize).collect();
            weights.insert(format!("{}.weight", layer.name), seeded_uniform(&shape, bound, s));
            weights.insert(format!("{}.bias", layer.name), seeded_uniform(&[layer.d_out], bound, s + 1));
        }
        weights
    }

    fn init_adapter(&self, max_rank: usize, seed: u64) -> Result<Adapter, ModelError> {
        let mut tensors = BTreeMap::new();
        for (i, layer) in self.adapted_layers().iter().enumerate() {
            let module = format!("{ADAPTER_PREFIX}{}", layer.name);
            let bound = 1.0 / (layer.d_in as f64).sqrt();
            let s = seed.wrapping_mul(1000).wrapping_add(500 + i as u64);
            tensors.insert(lora_a_name(&module), seeded_uniform(&[max_rank, layer.d_in], bound, s));
            tensors.insert(
                lora_b_name(&module),
                Tensor::zeros([layer.d_out as i64, max_rank as i64], (Kind::Float, Device::Cpu)),
            );
        }
        if let (Some((d_in, classes)), Some((head_weight, head_bias))) = (self.head_shape(), self.head_names()) {
            let bound = 1.0 / (d_in as f64).sqrt();
            let s = seed.wrapping_mul(1000).wrapping_add(900);
            tensors.insert(head_weight, seeded_uniform(&[classes, d_in], bound, s));
            tensors.insert(head_bias, seeded_uniform(&[classes], bound, s + 1));
        }
        Ok(Adapter::new(tensors)?)
    }

    fn check_base(&self, base: &BaseWeights) -> Result<(), ModelError> {
        match self {
            Architecture::Bert(spec) => return bert::check_base(spec, base),
            Architecture::Llama(spec) => return llama::check_base(spec, base),
            _ => {}
        }
        for layer in self.adapted_layers() {
            for (suffix, want) in [("weight", layer.weight_shape()), ("bias", vec![layer.d_out as i64])] {
                let name = format!("{}.{suffix}", layer.name);
                let got = base.get(&name).ok_or_else(|| ModelError::Missing(name.clone()))?.size();
                if got != want {
                    return Err(ModelError::Shape { name, got, want });
                }
            }
        }
        Ok(())
    }
    fn pretrain(
        &self,
        base: &BaseWeights,
        head: (&Tensor, &Tensor),
        data: &Dataset,
        settings: &PretrainSettings,
    ) -> Result<(BaseWeights, Tensor, Tensor), ModelError> {
        if self.takes_tokens() {
            return Err(ModelError::Unsupported(
                "central pretraining is for the small image models; a transformer starts from its checkpoint".into(),
            ));
        }
        pretrain::pretrain(self, base, head, data, settings)
    }

    fn merge(&self, base: &BaseWeights, adapter: &Adapter, scale: f64) -> Result<BaseWeights, ModelError> {
        self.check_base(base)?;
        let mut merged: BaseWeights = base
            .iter()
            .map(|(n, t)| Ok((n.clone(), crate::tensor::try_copy(t)?)))
            .collect::<Result<_, ModelError>>()?;
        for layer in self.adapted_layers() {
            let module = format!("{ADAPTER_PREFIX}{}", layer.name);
            let delta = adapter
                .module_update(&module, scale, Kind::Float)
                .ok_or_else(|| ModelError::Missing(lora_a_name(&module)))??;
            let delta = delta.f_view(layer.weight_shape().as_slice())?;
            let name = self.base_weight_name(&layer.name);
            let weight = merged.get(&name).ok_or_else(|| ModelError::Missing(name.clone()))?.f_add(&delta)?;
            merged.insert(name, weight);
        }
        let get = |name: String| adapter.get(&name).ok_or(ModelError::Missing(name));
        if let (Some((head_weight, head_bias)), Some(module)) = (self.head_names(), self.head_module()) {
            merged.insert(format!("{module}.weight"), crate::tensor::try_copy(get(head_weight)?)?);
            merged.insert(format!("{module}.bias"), crate::tensor::try_copy(get(head_bias)?)?);
        }
        Ok(merged)
    }

    fn forward_merged(
        &self,
        weights: &BaseWeights,
        x: &Tensor,
        lengths: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let module = self
            .head_module()
            .ok_or_else(|| ModelError::Unsupported("a decoder computes next-token logits, not class logits".into()))?;
        let get = |name: String| weights.get(&name).ok_or(ModelError::Missing(name));
        let features = forward_features(self, weights, None, x, lengths)?;
        Ok(features.f_linear(get(format!("{module}.weight"))?, Some(get(format!("{module}.bias"))?))?)
    }
}

/// Names of the shared classifier head in a full (merged or pretrained) model.
pub const HEAD_WEIGHT: &str = "head.weight";
pub const HEAD_BIAS: &str = "head.bias";

/// The adapter with its head replaced (the pretrained head becomes the initial global head).
pub fn with_head(
    architecture: &Architecture,
    adapter: &Adapter,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<Adapter, ModelError> {
    let mut tensors: BTreeMap<String, Tensor> = adapter.tensors().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    let (head_weight, head_bias) = architecture
        .head_names()
        .ok_or_else(|| ModelError::Unsupported("a decoder has no classifier head to replace".into()))?;
    tensors.insert(head_weight, weight.copy());
    tensors.insert(head_bias, bias.copy());
    Ok(Adapter::new(tensors)?)
}
