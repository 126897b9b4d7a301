//! LoRA models: a frozen base and a trainable adapter (LoRA factors plus a shared classifier head).
//!
//! Each adapted layer computes `y = W0·x + b0 + s·B·(A·x)` with one scale `s = lora_alpha / R_max`
//! for every rank, so a rank-r slice of the global adapter means the same thing on every device.

use std::collections::BTreeMap;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use crate::adapter::{lora_a_name, lora_b_name, Adapter, AdapterError};
use crate::data::{seeded_uniform, Dataset};
use crate::protocol::{LocalMetrics, TrainingSettings};

/// Prefix of every adapter tensor name, as HF PEFT writes it.
pub const ADAPTER_PREFIX: &str = "base_model.model.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// Fully connected layers with ReLU, LoRA on each hidden layer, then a trainable linear head.
    Mlp { input: u32, hidden: Vec<u32>, classes: u32 },
    /// A small CNN for `side`×`side` images with `channels` planes (given flattened): 3×3
    /// convolutions ('same' padding, ReLU, 2×2 max-pool) with `conv` output channels each, one
    /// hidden linear layer, then a trainable head. LoRA on every convolution and on the linear layer.
    Cnn { side: u32, channels: u32, conv: Vec<u32>, hidden: u32, classes: u32 },
}

/// Kernel size of the CNN's convolutions.
pub const CONV_KERNEL: usize = 3;

/// What kind of layer an adapted layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Linear,
    /// A k×k convolution from `c_in` to `c_out` channels. Its LoRA factors are kept as matrices:
    /// A is `[r, c_in·k·k]` (a k×k convolution to r channels, flattened) and B is `[c_out, r]` (a
    /// 1×1 convolution), so that `B·A` has the shape of the flattened kernel and every
    /// aggregation method treats them like a linear layer's.
    Conv {
        c_in: usize,
        c_out: usize,
        kernel: usize,
    },
}

/// One adapted layer: its name, kind and `d_in → d_out` (for a convolution, `c_in·k·k → c_out`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShape {
    pub name: String,
    pub d_in: usize,
    pub d_out: usize,
    pub kind: LayerKind,
}

impl LayerShape {
    /// The shape of the base layer's weight.
    pub fn weight_shape(&self) -> Vec<i64> {
        match self.kind {
            LayerKind::Linear => vec![self.d_out as i64, self.d_in as i64],
            LayerKind::Conv { c_in, c_out, kernel } => vec![c_out as i64, c_in as i64, kernel as i64, kernel as i64],
        }
    }
}

/// One layer's forward pass: base weight and bias, plus `scale·B·A` when LoRA factors are given;
/// ReLU, and for a convolution a 2×2 max-pool.
fn layer_forward(h: &Tensor, kind: LayerKind, w: &Tensor, b: &Tensor, lora: Option<(&Tensor, &Tensor, f64)>) -> Tensor {
    match kind {
        LayerKind::Linear => {
            let h = if h.dim() > 2 { h.flatten(1, -1) } else { h.shallow_clone() };
            let out = h.linear(w, Some(b));
            let out = match lora {
                Some((a, bb, scale)) => out + h.matmul(&a.tr()).matmul(&bb.tr()) * scale,
                None => out,
            };
            out.relu()
        }
        LayerKind::Conv { c_in, c_out, kernel } => {
            let pad = (kernel / 2) as i64;
            let out = h.conv2d(w, Some(b), [1, 1], [pad, pad], [1, 1], 1);
            let out = match lora {
                Some((a, bb, scale)) => {
                    let r = a.size()[0];
                    let a4 = a.view([r, c_in as i64, kernel as i64, kernel as i64]);
                    let b4 = bb.view([c_out as i64, r, 1, 1]);
                    let down = h.conv2d(&a4, None::<&Tensor>, [1, 1], [pad, pad], [1, 1], 1);
                    out + down.conv2d(&b4, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1) * scale
                }
                None => out,
            };
            out.relu().max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)
        }
    }
}

pub type BaseWeights = BTreeMap<String, Tensor>;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model: tensor '{0}' is missing")]
    Missing(String),
    #[error("model: tensor '{name}' has shape {got:?}, expected {want:?}")]
    Shape { name: String, got: Vec<i64>, want: Vec<i64> },
    #[error("model: libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
}

impl Architecture {
    pub fn adapted_layers(&self) -> Vec<LayerShape> {
        match self {
            Architecture::Mlp { input, hidden, .. } => {
                let mut d_in = *input as usize;
                hidden
                    .iter()
                    .enumerate()
                    .map(|(i, &h)| {
                        let shape = LayerShape {
                            name: format!("fc{}", i + 1),
                            d_in,
                            d_out: h as usize,
                            kind: LayerKind::Linear,
                        };
                        d_in = h as usize;
                        shape
                    })
                    .collect()
            }
            Architecture::Cnn { side, channels, conv, hidden, .. } => {
                let mut layers = Vec::new();
                let (mut c_in, mut side) = (*channels as usize, *side as usize);
                for (i, &c_out) in conv.iter().enumerate() {
                    let c_out = c_out as usize;
                    let kind = LayerKind::Conv { c_in, c_out, kernel: CONV_KERNEL };
                    let d_in = c_in * CONV_KERNEL * CONV_KERNEL;
                    layers.push(LayerShape { name: format!("conv{}", i + 1), d_in, d_out: c_out, kind });
                    c_in = c_out;
                    side /= 2;
                }
                let d_in = c_in * side * side;
                layers.push(LayerShape { name: "fc1".into(), d_in, d_out: *hidden as usize, kind: LayerKind::Linear });
                layers
            }
        }
    }

    fn head_shape(&self) -> (usize, usize) {
        match self {
            Architecture::Mlp { input, hidden, classes } => {
                (hidden.last().copied().unwrap_or(*input) as usize, *classes as usize)
            }
            Architecture::Cnn { hidden, classes, .. } => (*hidden as usize, *classes as usize),
        }
    }

    pub fn input_size(&self) -> usize {
        match self {
            Architecture::Mlp { input, .. } => *input as usize,
            Architecture::Cnn { side, channels, .. } => (*side * *side * *channels) as usize,
        }
    }

    pub fn classes(&self) -> usize {
        match self {
            Architecture::Mlp { classes, .. } | Architecture::Cnn { classes, .. } => *classes as usize,
        }
    }

    /// Checks that the architecture makes sense (sizes ≥ 1, a CNN's image survives its pools).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Architecture::Mlp { input, hidden, classes } => {
                if *input < 1 || *classes < 2 || hidden.is_empty() || hidden.contains(&0) {
                    return Err("mlp: input must be ≥ 1, classes ≥ 2, and hidden layers non-empty and ≥ 1".into());
                }
            }
            Architecture::Cnn { side, channels, conv, hidden, classes } => {
                if *channels < 1 || *hidden < 1 || *classes < 2 || conv.is_empty() || conv.contains(&0) {
                    return Err("cnn: channels, hidden ≥ 1, classes ≥ 2, and conv layers non-empty and ≥ 1".into());
                }
                if *side >> conv.len() == 0 {
                    return Err(format!("cnn: a {side}×{side} image does not survive {} 2×2 pools", conv.len()));
                }
            }
        }
        Ok(())
    }

    /// Reshapes flattened inputs into what the first layer takes.
    fn input_view(&self, x: &Tensor) -> Tensor {
        match self {
            Architecture::Mlp { .. } => x.shallow_clone(),
            Architecture::Cnn { side, channels, .. } => x.view([-1, *channels as i64, *side as i64, *side as i64]),
        }
    }

    /// A base model initialised like PyTorch's `nn.Linear` (uniform ±1/√d_in), reproducible from `seed`.
    pub fn init_base(&self, seed: u64) -> BaseWeights {
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

    /// The initial global adapter at rank `max_rank`: A uniform ±1/√d_in (as PEFT), B zero, so the
    /// model starts as the base; the head is initialised like `nn.Linear`.
    pub fn init_adapter(&self, max_rank: usize, seed: u64) -> Result<Adapter, ModelError> {
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
        let (d_in, classes) = self.head_shape();
        let bound = 1.0 / (d_in as f64).sqrt();
        let s = seed.wrapping_mul(1000).wrapping_add(900);
        tensors.insert(format!("{ADAPTER_PREFIX}head.weight"), seeded_uniform(&[classes, d_in], bound, s));
        tensors.insert(format!("{ADAPTER_PREFIX}head.bias"), seeded_uniform(&[classes], bound, s + 1));
        Ok(Adapter::new(tensors)?)
    }

    /// Checks that `base` has exactly the tensors and shapes this architecture needs.
    pub fn check_base(&self, base: &BaseWeights) -> Result<(), ModelError> {
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
}

/// Names of the shared classifier head in a full (merged or pretrained) model.
pub const HEAD_WEIGHT: &str = "head.weight";
pub const HEAD_BIAS: &str = "head.bias";

/// Settings of the coordinator's central pretraining of the base model.
#[derive(Debug, Clone, PartialEq)]
pub struct PretrainSettings {
    pub steps: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub seed: u64,
}

impl Architecture {
    /// Trains every weight of the full model (base layers and head, no LoRA) on `data` with AdamW:
    /// the centrally pretrained base that federated LoRA fine-tuning starts from. Returns the base
    /// weights and the head (`head.weight`, `head.bias`).
    pub fn pretrain(
        &self,
        base: &BaseWeights,
        head: (&Tensor, &Tensor),
        data: &Dataset,
        settings: &PretrainSettings,
    ) -> Result<(BaseWeights, Tensor, Tensor), ModelError> {
        self.check_base(base)?;
        let store = nn::VarStore::new(Device::Cpu);
        let root = store.root();
        let mut layers = Vec::new();
        for layer in self.adapted_layers() {
            let w = root.f_var_copy(&format!("{}_weight", layer.name), &base[&format!("{}.weight", layer.name)])?;
            let b = root.f_var_copy(&format!("{}_bias", layer.name), &base[&format!("{}.bias", layer.name)])?;
            layers.push((layer.name, layer.kind, w, b));
        }
        let head_w = root.f_var_copy("head_weight", head.0)?;
        let head_b = root.f_var_copy("head_bias", head.1)?;
        let forward = |x: &Tensor| {
            let mut h = self.input_view(x);
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

    /// The full model with the adapter merged in: each adapted layer's weight becomes
    /// `W0 + ΔW + scale·B·A` (ΔW: online FLoRA's merged update, zero otherwise), and the adapter's head becomes `head.weight` / `head.bias`. The result is
    /// a plain MLP (see [`Architecture::forward_merged`]) that needs no LoRA support to run.
    pub fn merge(&self, base: &BaseWeights, adapter: &Adapter, scale: f64) -> Result<BaseWeights, ModelError> {
        self.check_base(base)?;
        let get = |name: String| adapter.get(&name).ok_or(ModelError::Missing(name));
        let mut merged = BTreeMap::new();
        for layer in self.adapted_layers() {
            let module = format!("{ADAPTER_PREFIX}{}", layer.name);
            let (a, b) = (get(lora_a_name(&module))?, get(lora_b_name(&module))?);
            let mut delta = b.f_matmul(a)? * scale;
            if let Some(merged_delta) = adapter.merged_delta(&module) {
                delta = delta.f_add(merged_delta)?;
            }
            let delta = delta.f_view(layer.weight_shape().as_slice())?;
            merged.insert(format!("{}.weight", layer.name), base[&format!("{}.weight", layer.name)].f_add(&delta)?);
            merged.insert(format!("{}.bias", layer.name), base[&format!("{}.bias", layer.name)].copy());
        }
        merged.insert(HEAD_WEIGHT.to_string(), get(format!("{ADAPTER_PREFIX}head.weight"))?.copy());
        merged.insert(HEAD_BIAS.to_string(), get(format!("{ADAPTER_PREFIX}head.bias"))?.copy());
        Ok(merged)
    }

    /// Logits of a merged model (see [`Architecture::merge`]).
    pub fn forward_merged(&self, weights: &BaseWeights, x: &Tensor) -> Result<Tensor, ModelError> {
        let get = |name: String| weights.get(&name).ok_or(ModelError::Missing(name));
        let mut h = self.input_view(x);
        for layer in self.adapted_layers() {
            let (w, b) = (get(format!("{}.weight", layer.name))?, get(format!("{}.bias", layer.name))?);
            h = layer_forward(&h, layer.kind, w, b, None);
        }
        Ok(h.flatten(1, -1).f_linear(get(HEAD_WEIGHT.to_string())?, Some(get(HEAD_BIAS.to_string())?))?)
    }
}

/// The adapter with its head replaced (the pretrained head becomes the initial global head).
pub fn with_head(adapter: &Adapter, weight: &Tensor, bias: &Tensor) -> Result<Adapter, ModelError> {
    let mut tensors: BTreeMap<String, Tensor> = adapter.tensors().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    tensors.insert(format!("{ADAPTER_PREFIX}head.weight"), weight.copy());
    tensors.insert(format!("{ADAPTER_PREFIX}head.bias"), bias.copy());
    Ok(Adapter::new(tensors)?)
}

struct LoraLayer {
    name: String,
    kind: LayerKind,
    weight: Tensor,
    bias: Tensor,
    a: Tensor,
    b: Tensor,
}

/// A model ready to train or evaluate: frozen base tensors plus adapter variables in their own
/// `VarStore`, so the optimizer only ever sees the adapter.
pub struct LoraModel {
    architecture: Architecture,
    layers: Vec<LoraLayer>,
    head_weight: Tensor,
    head_bias: Tensor,
    scale: f64,
    rank: usize,
    device: Device,
    store: nn::VarStore,
}

impl LoraModel {
    pub fn new(
        architecture: &Architecture,
        base: &BaseWeights,
        adapter: &Adapter,
        scale: f64,
        device: Device,
    ) -> Result<LoraModel, ModelError> {
        architecture.check_base(base)?;
        let store = nn::VarStore::new(device);
        let root = store.root();
        let adapter_tensor =
            |name: String| -> Result<&Tensor, ModelError> { adapter.get(&name).ok_or(ModelError::Missing(name)) };
        let mut layers = Vec::new();
        for layer in architecture.adapted_layers() {
            let module = format!("{ADAPTER_PREFIX}{}", layer.name);
            let a = root.f_var_copy(&format!("{}_lora_a", layer.name), adapter_tensor(lora_a_name(&module))?)?;
            let b = root.f_var_copy(&format!("{}_lora_b", layer.name), adapter_tensor(lora_b_name(&module))?)?;
            // Online FLoRA's merged update joins the frozen weight: W = W0 + ΔW.
            let base_weight = &base[&format!("{}.weight", layer.name)];
            let weight = match adapter.merged_delta(&module) {
                Some(delta) => base_weight.f_add(&delta.f_view(layer.weight_shape().as_slice())?)?,
                None => base_weight.shallow_clone(),
            };
            layers.push(LoraLayer {
                weight: weight.to_device(device),
                bias: base[&format!("{}.bias", layer.name)].to_device(device),
                kind: layer.kind,
                name: layer.name,
                a,
                b,
            });
        }
        let head_weight = root.f_var_copy("head_weight", adapter_tensor(format!("{ADAPTER_PREFIX}head.weight"))?)?;
        let head_bias = root.f_var_copy("head_bias", adapter_tensor(format!("{ADAPTER_PREFIX}head.bias"))?)?;
        Ok(LoraModel {
            architecture: architecture.clone(),
            layers,
            head_weight,
            head_bias,
            scale,
            rank: adapter.rank(),
            device,
            store,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.architecture.input_view(x);
        for layer in &self.layers {
            h = layer_forward(&h, layer.kind, &layer.weight, &layer.bias, Some((&layer.a, &layer.b, self.scale)));
        }
        h.flatten(1, -1).linear(&self.head_weight, Some(&self.head_bias))
    }

    /// The adapter's current values under their PEFT names (on the CPU).
    pub fn adapter(&self) -> Result<Adapter, ModelError> {
        let mut tensors = BTreeMap::new();
        for layer in &self.layers {
            let module = format!("{ADAPTER_PREFIX}{}", layer.name);
            tensors.insert(lora_a_name(&module), layer.a.detach().to_device(Device::Cpu).copy());
            tensors.insert(lora_b_name(&module), layer.b.detach().to_device(Device::Cpu).copy());
        }
        tensors.insert(format!("{ADAPTER_PREFIX}head.weight"), self.head_weight.detach().to_device(Device::Cpu).copy());
        tensors.insert(format!("{ADAPTER_PREFIX}head.bias"), self.head_bias.detach().to_device(Device::Cpu).copy());
        Ok(Adapter::new(tensors)?)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Mean cross-entropy and accuracy over `data`, in batches, without gradients.
    pub fn evaluate(&self, data: &Dataset, batch_size: usize) -> (f64, f64) {
        tch::no_grad(|| {
            let n = data.len();
            if n == 0 {
                return (0.0, 0.0);
            }
            let (mut loss_sum, mut correct) = (0.0, 0.0);
            let mut start = 0;
            while start < n {
                let len = batch_size.min(n - start) as i64;
                let x = data.features.narrow(0, start as i64, len).to_device(self.device);
                let y = data.labels.narrow(0, start as i64, len).to_device(self.device);
                let logits = self.forward(&x);
                loss_sum += logits.cross_entropy_for_logits(&y).double_value(&[]) * len as f64;
                correct += logits.argmax(1, false).eq_tensor(&y).sum(Kind::Float).double_value(&[]);
                start += len as usize;
            }
            (loss_sum / n as f64, correct / n as f64)
        })
    }

    /// Local training: AdamW on the adapter only, `local_steps` minibatches drawn with `seed`.
    pub fn train(&mut self, data: &Dataset, settings: &TrainingSettings) -> Result<LocalMetrics, ModelError> {
        let started = Instant::now();
        let eval_batch = 1024;
        let (loss_before, _) = self.evaluate(data, eval_batch);
        self.train_steps(data, settings)?;
        let (loss_after, accuracy) = self.evaluate(data, eval_batch);
        Ok(LocalMetrics { loss_before, loss_after, accuracy, train_seconds: started.elapsed().as_secs_f64() })
    }

    /// `settings.local_steps` AdamW steps (or `local_epochs` passes over the data) on minibatches
    /// drawn with `settings.seed`, without evaluation (what the probe times).
    pub fn train_steps(&mut self, data: &Dataset, settings: &TrainingSettings) -> Result<(), ModelError> {
        let mut optimizer = nn::AdamW { wd: 0.0, ..Default::default() }.build(&self.store, settings.learning_rate)?;
        // Our own generator, not libtorch's process-global one: simulated devices train concurrently.
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        let n = data.len() as i64;
        let batch = (settings.batch_size as i64).min(n).max(1);
        let steps = match settings.local_epochs {
            0 => i64::from(settings.local_steps),
            epochs => i64::from(epochs) * ((n + batch - 1) / batch),
        };
        for _ in 0..steps {
            let picks: Vec<i64> = (0..batch).map(|_| rng.random_range(0..n)).collect();
            let index = Tensor::from_slice(&picks);
            let x = data.features.f_index_select(0, &index)?.f_to_device(self.device)?;
            let y = data.labels.f_index_select(0, &index)?.f_to_device(self.device)?;
            let loss = self.forward(&x).cross_entropy_for_logits(&y);
            optimizer.backward_step(&loss);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic_classification;

    fn arch() -> Architecture {
        Architecture::Mlp { input: 16, hidden: vec![32, 32], classes: 4 }
    }

    #[test]
    fn a_fresh_adapter_leaves_the_base_unchanged_and_training_improves_it() {
        let arch = arch();
        let base = arch.init_base(1);
        let global = arch.init_adapter(8, 2).unwrap();
        assert_eq!(global.rank(), 8);
        let slice = global.slice_to_rank(4).unwrap();
        let mut model = LoraModel::new(&arch, &base, &slice, 2.0, Device::Cpu).unwrap();
        let data = synthetic_classification(512, 16, 4, 3, 4);
        let settings =
            TrainingSettings { local_steps: 150, local_epochs: 0, batch_size: 32, learning_rate: 1e-2, seed: 5 };
        let metrics = model.train(&data, &settings).unwrap();
        assert!(metrics.loss_after < metrics.loss_before * 0.8, "{metrics:?}");
        let trained = model.adapter().unwrap();
        assert_eq!(trained.rank(), 4);
        // B starts at zero, so it must have moved; the base never changes.
        let (_, b) = trained.factors(&format!("{ADAPTER_PREFIX}fc1"));
        assert!(b.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn a_merged_delta_joins_the_frozen_weight_in_training_evaluation_and_merging() {
        let arch = arch();
        let base = arch.init_base(1);
        let global = arch.init_adapter(8, 2).unwrap();
        let x = synthetic_classification(64, 16, 4, 3, 4).features;
        let without = LoraModel::new(&arch, &base, &global, 2.0, Device::Cpu).unwrap().forward(&x);
        let mut tensors: BTreeMap<String, Tensor> =
            global.tensors().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        let module = format!("{ADAPTER_PREFIX}fc1");
        tensors.insert(crate::adapter::merged_delta_name(&module), crate::data::seeded_uniform(&[32, 16], 0.5, 9));
        let with_delta = Adapter::new(tensors).unwrap();
        let model = LoraModel::new(&arch, &base, &with_delta.slice_to_rank(2).unwrap(), 2.0, Device::Cpu).unwrap();
        let logits = model.forward(&x);
        assert!((&logits - &without).abs().max().double_value(&[]) > 1e-3, "ΔW changes the model");
        let merged = arch.merge(&base, &with_delta, 2.0).unwrap();
        let plain = arch.forward_merged(&merged, &x).unwrap();
        assert!((&logits - &plain).abs().max().double_value(&[]) < 1e-5, "merging keeps ΔW");
        // The trained adapter a device sends back has no ΔW.
        assert_eq!(model.adapter().unwrap().merged_delta_names().count(), 0);
    }

    #[test]
    fn pretraining_learns_and_a_merged_model_computes_what_base_plus_adapter_computes() {
        let arch = arch();
        let data = synthetic_classification(512, 16, 4, 3, 4);
        let base = arch.init_base(1);
        let initial = arch.init_adapter(8, 2).unwrap();
        let head =
            (initial.get("base_model.model.head.weight").unwrap(), initial.get("base_model.model.head.bias").unwrap());
        let settings = PretrainSettings { steps: 200, batch_size: 32, learning_rate: 1e-2, seed: 3 };
        let (pretrained, head_w, head_b) = arch.pretrain(&base, head, &data, &settings).unwrap();
        let adapter = with_head(&initial, &head_w, &head_b).unwrap();
        let before = LoraModel::new(&arch, &base, &initial, 1.0, Device::Cpu).unwrap().evaluate(&data, 256);
        let after = LoraModel::new(&arch, &pretrained, &adapter, 1.0, Device::Cpu).unwrap().evaluate(&data, 256);
        assert!(after.1 > before.1 + 0.2, "accuracy {before:?} -> {after:?}");
        let (again, _, _) = arch.pretrain(&base, head, &data, &settings).unwrap();
        assert!(again.iter().all(|(n, t)| t.equal(&pretrained[n])), "pretraining is deterministic");

        // Train an adapter, merge it, and compare the plain MLP with base + LoRA.
        let mut model = LoraModel::new(&arch, &pretrained, &adapter, 2.0, Device::Cpu).unwrap();
        model
            .train_steps(
                &data,
                &TrainingSettings { local_steps: 50, local_epochs: 0, batch_size: 32, learning_rate: 1e-2, seed: 5 },
            )
            .unwrap();
        let trained = model.adapter().unwrap();
        let merged = arch.merge(&pretrained, &trained, 2.0).unwrap();
        let lora = LoraModel::new(&arch, &pretrained, &trained, 2.0, Device::Cpu).unwrap().forward(&data.features);
        let plain = arch.forward_merged(&merged, &data.features).unwrap();
        let diff = (lora - plain).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "max difference {diff}");
    }

    #[test]
    fn training_is_deterministic_given_the_seed() {
        let arch = arch();
        let base = arch.init_base(1);
        let global = arch.init_adapter(4, 2).unwrap();
        let data = synthetic_classification(128, 16, 4, 3, 4);
        let settings =
            TrainingSettings { local_steps: 10, local_epochs: 0, batch_size: 16, learning_rate: 1e-2, seed: 9 };
        let run = || {
            let mut m = LoraModel::new(&arch, &base, &global, 1.0, Device::Cpu).unwrap();
            m.train(&data, &settings).unwrap();
            m.adapter().unwrap()
        };
        let (x, y) = (run(), run());
        for (name, t) in x.tensors() {
            assert!(t.equal(y.get(name).unwrap()), "{name}");
        }
    }

    #[test]
    fn lora_training_on_fashion_mnist_improves_held_out_accuracy() {
        use crate::data::idx::{load_split, Split, DEBIAN_FASHION_MNIST};
        let dir = std::env::var_os("FLOTILLA_FASHION_MNIST")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| DEBIAN_FASHION_MNIST.into());
        let train = load_split(&dir, Split::Train, 10).expect("Fashion-MNIST (bash deploy/test.sh installs it)");
        let test = load_split(&dir, Split::Test, 10).expect("Fashion-MNIST");
        let local = train.subset(&(0..6000).collect::<Vec<_>>());
        let held_out = test.subset(&(0..2000).collect::<Vec<_>>());
        let arch = Architecture::Mlp { input: 784, hidden: vec![128], classes: 10 };
        let base = arch.init_base(1);
        let global = arch.init_adapter(8, 2).unwrap();
        let mut model = LoraModel::new(&arch, &base, &global, 2.0, Device::Cpu).unwrap();
        let (_, before) = model.evaluate(&held_out, 1000);
        let settings =
            TrainingSettings { local_steps: 300, local_epochs: 0, batch_size: 64, learning_rate: 5e-3, seed: 3 };
        model.train(&local, &settings).unwrap();
        let (_, after) = model.evaluate(&held_out, 1000);
        assert!(before < 0.25 && after > 0.70, "held-out accuracy {before:.3} → {after:.3}");
    }

    fn cnn() -> Architecture {
        Architecture::Cnn { side: 28, channels: 1, conv: vec![8, 16], hidden: 64, classes: 10 }
    }

    #[test]
    fn a_cnn_has_lora_on_its_convolutions_and_its_merged_form_computes_the_same() {
        let arch = cnn();
        arch.validate().unwrap();
        let layers = arch.adapted_layers();
        let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["conv1", "conv2", "fc1"]);
        assert_eq!(layers[1].kind, LayerKind::Conv { c_in: 8, c_out: 16, kernel: 3 });
        assert_eq!((layers[1].d_in, layers[1].d_out), (8 * 9, 16));
        assert_eq!(layers[2].d_in, 16 * 7 * 7, "two 2×2 pools take 28 to 7");
        let base = arch.init_base(1);
        assert_eq!(base["conv1.weight"].size(), [8, 1, 3, 3]);
        let adapter = arch.init_adapter(4, 2).unwrap();
        assert_eq!(adapter.get("base_model.model.conv2.lora_A.weight").unwrap().size(), [4, 72]);
        // Train a little so that B is not zero, then compare LoRA and merged forwards.
        let data = synthetic_classification(256, 784, 10, 3, 4);
        let mut model = LoraModel::new(&arch, &base, &adapter, 2.0, Device::Cpu).unwrap();
        model
            .train_steps(
                &data,
                &TrainingSettings { local_steps: 20, local_epochs: 0, batch_size: 32, learning_rate: 1e-2, seed: 5 },
            )
            .unwrap();
        let trained = model.adapter().unwrap();
        let (_, b) = trained.factors("base_model.model.conv1");
        assert!(b.abs().sum(Kind::Float).double_value(&[]) > 0.0, "the conv LoRA trained");
        let merged = arch.merge(&base, &trained, 2.0).unwrap();
        let x = data.features.narrow(0, 0, 16);
        let lora = LoraModel::new(&arch, &base, &trained, 2.0, Device::Cpu).unwrap().forward(&x);
        let plain = arch.forward_merged(&merged, &x).unwrap();
        let diff = (lora - plain).abs().max().double_value(&[]);
        assert!(diff < 1e-4, "max difference {diff}");
        // A rank-2 slice runs too (what a phone gets).
        let slice = trained.slice_to_rank(2).unwrap();
        assert_eq!(LoraModel::new(&arch, &base, &slice, 2.0, Device::Cpu).unwrap().forward(&x).size(), [16, 10]);
        let tiny = Architecture::Cnn { side: 2, channels: 1, conv: vec![4, 4], hidden: 8, classes: 2 };
        assert!(tiny.validate().unwrap_err().contains("does not survive"));
    }

    #[test]
    fn cnn_lora_training_on_fashion_mnist_improves_held_out_accuracy() {
        use crate::data::idx::{load_split, Split, DEBIAN_FASHION_MNIST};
        let dir = std::env::var_os("FLOTILLA_FASHION_MNIST")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| DEBIAN_FASHION_MNIST.into());
        let train = load_split(&dir, Split::Train, 10).expect("Fashion-MNIST (bash deploy/test.sh installs it)");
        let test = load_split(&dir, Split::Test, 10).expect("Fashion-MNIST");
        let local = train.subset(&(0..4000).collect::<Vec<_>>());
        let held_out = test.subset(&(0..1000).collect::<Vec<_>>());
        let arch = cnn();
        let base = arch.init_base(1);
        let global = arch.init_adapter(8, 2).unwrap();
        let mut model = LoraModel::new(&arch, &base, &global, 2.0, Device::Cpu).unwrap();
        let (_, before) = model.evaluate(&held_out, 500);
        let settings =
            TrainingSettings { local_steps: 150, local_epochs: 0, batch_size: 32, learning_rate: 5e-3, seed: 3 };
        model.train(&local, &settings).unwrap();
        let (_, after) = model.evaluate(&held_out, 500);
        assert!(before < 0.25 && after > 0.5, "held-out accuracy {before:.3} → {after:.3}");
    }

    #[test]
    fn local_epochs_are_passes_over_the_local_data() {
        let arch = arch();
        let base = arch.init_base(1);
        let global = arch.init_adapter(4, 2).unwrap();
        let data = synthetic_classification(100, 16, 4, 3, 4);
        let train = |local_steps, local_epochs| {
            let mut model = LoraModel::new(&arch, &base, &global, 1.0, Device::Cpu).unwrap();
            let settings = TrainingSettings { local_steps, local_epochs, batch_size: 32, learning_rate: 1e-2, seed: 7 };
            model.train_steps(&data, &settings).unwrap();
            model.adapter().unwrap()
        };
        // 2 epochs of ⌈100 / 32⌉ = 4 steps: the same 8 steps, whatever local_steps says.
        let by_epochs = train(1, 2);
        let by_steps = train(8, 0);
        assert!(by_epochs.tensors().iter().all(|(n, t)| t.equal(by_steps.get(n).unwrap())));
        let fewer = train(7, 0);
        assert!(!by_epochs.tensors().iter().all(|(n, t)| t.equal(fewer.get(n).unwrap())));
    }

    #[test]
    fn a_base_with_wrong_shapes_is_refused() {
        let arch = arch();
        let mut base = arch.init_base(1);
        base.insert("fc1.weight".into(), Tensor::zeros([3, 3], (Kind::Float, Device::Cpu)));
        let global = arch.init_adapter(4, 2).unwrap();
        assert!(LoraModel::new(&arch, &base, &global, 1.0, Device::Cpu).is_err());
    }
}
