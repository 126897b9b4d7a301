//! A model ready to train or evaluate on a device or on the coordinator's test set.

use std::collections::BTreeMap;
use std::time::Instant;

use flotilla_wire::protocol::{LocalMetrics, TrainingSettings};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};

use super::layers::layer_forward;
use super::{Architecture, ArchitectureExt, BaseWeights, LayerKind, ModelError, ADAPTER_PREFIX};
use crate::adapter::{lora_a_name, lora_b_name, Adapter};
use crate::data::Dataset;

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
