//! A model ready to train or evaluate on a device or on the coordinator's test set.

use std::collections::BTreeMap;
use std::time::Instant;

use flotilla_wire::protocol::{LocalMetrics, TrainingSettings};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{nn, nn::OptimizerConfig, Device, Tensor};

use super::frozen::FrozenFactors;
use super::{Architecture, ArchitectureExt, BaseWeights, Lora, ModelError, ADAPTER_PREFIX};
use crate::adapter::{lora_a_name, lora_b_name, Adapter};
use crate::data::Dataset;
use flotilla_wire::model::Trainable;

/// Local samples a transformer's loss and accuracy before and after training are measured on: 32,
/// two forward passes of which cost about what 3 training steps of batch 8 do (64 doubled the
/// device's time in a round of 4 such steps).
pub const TRANSFORMER_METRICS_SAMPLES: usize = 32;

/// At most `cap` of `n` sample indices, drawn without replacement with `seed`.
pub(super) fn local_metrics_sample(n: usize, cap: usize, seed: u64) -> Vec<usize> {
    let mut indices: Vec<usize> = (0..n).collect();
    if n > cap {
        use rand::seq::SliceRandom;
        indices.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x006d_6574_7269_6373));
        indices.truncate(cap);
        indices.sort_unstable();
    }
    indices
}

/// A model ready to train or evaluate: frozen base tensors (on the training device, with online
/// FLoRA's merged update already added) plus adapter variables in their own `VarStore`, so the
/// optimizer only ever sees the adapter.
pub struct LoraModel {
    architecture: Architecture,
    base: BaseWeights,
    /// `(A, B)` by adapted module name (`fc1`, `bert.encoder.layer.0.attention.self.query`).
    factors: BTreeMap<String, (Tensor, Tensor)>,
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
        let mut weights: BaseWeights =
            base.iter().map(|(n, t)| Ok((n.clone(), t.f_to_device(device)?))).collect::<Result<_, ModelError>>()?;
        let mut factors = BTreeMap::new();
        for (i, layer) in architecture.adapted_layers().iter().enumerate() {
            let module = format!("{ADAPTER_PREFIX}{}", layer.name);
            let a = root.f_var_copy(&format!("lora_a_{i}"), adapter_tensor(lora_a_name(&module))?)?;
            let b = root.f_var_copy(&format!("lora_b_{i}"), adapter_tensor(lora_b_name(&module))?)?;
            // Online FLoRA's merged update joins the frozen weight: W = W0 + ΔW.
            if let Some(delta) = adapter.merged_delta(&module) {
                let name = architecture.base_weight_name(&layer.name);
                let base_weight = weights.get(&name).ok_or_else(|| ModelError::Missing(name.clone()))?;
                let merged = base_weight.f_add(&delta.f_view(layer.weight_shape().as_slice())?.f_to_device(device)?)?;
                weights.insert(name, merged);
            }
            factors.insert(layer.name.clone(), (a, b));
        }
        let (head_weight_name, head_bias_name) = architecture.head_names().ok_or_else(|| {
            ModelError::Unsupported("a decoder has no classifier head: it trains as a DecoderModel".into())
        })?;
        let head_weight = root.f_var_copy("head_weight", adapter_tensor(head_weight_name)?)?;
        let head_bias = root.f_var_copy("head_bias", adapter_tensor(head_bias_name)?)?;
        Ok(LoraModel {
            architecture: architecture.clone(),
            base: weights,
            factors,
            head_weight,
            head_bias,
            scale,
            rank: adapter.rank(),
            device,
            store,
        })
    }

    /// Logits for inputs `x` (features, or token ids with their `lengths` for a transformer).
    pub fn forward(&self, x: &Tensor, lengths: Option<&Tensor>) -> Result<Tensor, ModelError> {
        let lora = Lora { factors: &self.factors, scale: self.scale };
        let features = super::forward_features(&self.architecture, &self.base, Some(&lora), x, lengths)?;
        Ok(features.f_linear(&self.head_weight, Some(&self.head_bias))?)
    }

    /// The adapter's current values under their PEFT names (on the CPU).
    pub fn adapter(&self) -> Result<Adapter, ModelError> {
        let mut tensors = BTreeMap::new();
        for (name, (a, b)) in &self.factors {
            let module = format!("{ADAPTER_PREFIX}{name}");
            tensors.insert(lora_a_name(&module), crate::tensor::try_copy(&a.detach().f_to_device(Device::Cpu)?)?);
            tensors.insert(lora_b_name(&module), crate::tensor::try_copy(&b.detach().f_to_device(Device::Cpu)?)?);
        }
        if let Some((head_weight_name, head_bias_name)) = self.architecture.head_names() {
            let copy = |t: &Tensor| crate::tensor::try_copy(&t.detach().f_to_device(Device::Cpu)?);
            tensors.insert(head_weight_name, copy(&self.head_weight)?);
            tensors.insert(head_bias_name, copy(&self.head_bias)?);
        }
        Ok(Adapter::new(tensors)?)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Whether the model reads token ids (a transformer) rather than features.
    pub fn takes_tokens(&self) -> bool {
        self.architecture.takes_tokens()
    }

    /// Mean cross-entropy and accuracy over `data`, in batches, without gradients.
    pub fn evaluate(&self, data: &Dataset, batch_size: usize) -> Result<(f64, f64), ModelError> {
        evaluate_logits(data, batch_size, self.device, |x, lengths| self.forward(x, lengths))
    }

    /// Mean cross-entropy and the confusion matrix `[true label][predicted label]` over `data`.
    pub fn evaluate_confusion(&self, data: &Dataset, batch_size: usize) -> Result<(f64, Vec<Vec<u64>>), ModelError> {
        confusion_of_logits(data, batch_size, self.device, |x, lengths| self.forward(x, lengths))
    }

    /// Local training: AdamW on the adapter only, `local_steps` minibatches drawn with `seed`.
    pub fn train(&mut self, data: &Dataset, settings: &TrainingSettings) -> Result<LocalMetrics, ModelError> {
        let started = Instant::now();
        // A transformer's forward pass is costly: its local metrics come from a seeded sample.
        let (eval_batch, sample) = if self.architecture.takes_tokens() {
            (64, Some(local_metrics_sample(data.len(), TRANSFORMER_METRICS_SAMPLES, settings.seed)))
        } else {
            (1024, None)
        };
        let sampled = sample.map(|indices| data.subset(&indices));
        let measured = sampled.as_ref().unwrap_or(data);
        let (loss_before, _) = self.evaluate(measured, eval_batch)?;
        let stepping = Instant::now();
        self.train_steps(data, settings)?;
        let steps_seconds = stepping.elapsed().as_secs_f64();
        let (loss_after, accuracy) = self.evaluate(measured, eval_batch)?;
        let train_seconds = started.elapsed().as_secs_f64();
        Ok(LocalMetrics { loss_before, loss_after, accuracy, train_seconds, steps_seconds })
    }

    /// `settings.local_steps` AdamW steps (or `local_epochs` passes over the data) on minibatches
    /// drawn with `settings.seed`, without evaluation (what the probe times).
    pub fn train_steps(&mut self, data: &Dataset, settings: &TrainingSettings) -> Result<(), ModelError> {
        let frozen = match settings.trainable {
            Trainable::BOnly => FrozenFactors::of(self.factors.values().map(|(a, _)| a))?,
            Trainable::Lora => FrozenFactors::none(),
        };
        adamw_steps(&self.store, data, settings, self.device, &frozen, |x, lengths| self.forward(x, lengths))
    }
}

/// Mean cross-entropy and accuracy of the logits `forward` gives over `data`, in batches, without
/// gradients.
pub(super) fn evaluate_logits(
    data: &Dataset,
    batch_size: usize,
    device: Device,
    forward: impl Fn(&Tensor, Option<&Tensor>) -> Result<Tensor, ModelError>,
) -> Result<(f64, f64), ModelError> {
    let (loss, confusion) = confusion_of_logits(data, batch_size, device, forward)?;
    let correct: u64 = (0..confusion.len()).map(|c| confusion[c][c]).sum();
    Ok((loss, if data.is_empty() { 0.0 } else { correct as f64 / data.len() as f64 }))
}

/// Mean cross-entropy, and the confusion matrix `[true label][predicted label]` (classes × classes,
/// the logits' width), of the logits `forward` gives over `data`, in batches, without gradients.
pub(super) fn confusion_of_logits(
    data: &Dataset,
    batch_size: usize,
    device: Device,
    forward: impl Fn(&Tensor, Option<&Tensor>) -> Result<Tensor, ModelError>,
) -> Result<(f64, Vec<Vec<u64>>), ModelError> {
    tch::no_grad(|| {
        let n = data.len();
        let mut confusion: Vec<Vec<u64>> = Vec::new();
        if n == 0 {
            return Ok((0.0, confusion));
        }
        let mut loss_sum = 0.0;
        let mut start = 0;
        while start < n {
            let len = batch_size.max(1).min(n - start);
            let batch = data.range(start, len)?.to_device(device)?;
            let logits = forward(&batch.x, batch.lengths.as_ref())?;
            loss_sum += logits
                .f_cross_entropy_loss::<Tensor>(&batch.y, None, tch::Reduction::Mean, -100, 0.0)?
                .f_double_value(&[])?
                * len as f64;
            let classes = logits.size().get(1).copied().unwrap_or(0).max(0) as usize;
            if confusion.len() < classes {
                confusion.resize(classes, Vec::new());
            }
            for row in &mut confusion {
                let width = classes.max(row.len());
                row.resize(width, 0);
            }
            let predicted = Vec::<i64>::try_from(logits.f_argmax(1, false)?.f_to_device(Device::Cpu)?)?;
            let truth = Vec::<i64>::try_from(batch.y.f_to_device(Device::Cpu)?)?;
            for (&t, &p) in truth.iter().zip(&predicted) {
                if let (Ok(t), Ok(p)) = (usize::try_from(t), usize::try_from(p)) {
                    if t < confusion.len() && p < confusion[t].len() {
                        confusion[t][p] += 1;
                    }
                }
            }
            start += len;
        }
        Ok((loss_sum / n as f64, confusion))
    })
}

/// `settings.local_steps` AdamW steps (or `local_epochs` passes over the data) over the variables
/// of `store` but the `frozen` ones, on minibatches drawn with `settings.seed`: a fresh optimizer
/// per call.
pub(super) fn adamw_steps(
    store: &nn::VarStore,
    data: &Dataset,
    settings: &TrainingSettings,
    device: Device,
    frozen: &FrozenFactors,
    forward: impl Fn(&Tensor, Option<&Tensor>) -> Result<Tensor, ModelError>,
) -> Result<(), ModelError> {
    let mut optimizer = nn::AdamW { wd: 0.0, ..Default::default() }.build(store, settings.learning_rate)?;
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
        let batch = data.batch(&Tensor::from_slice(&picks))?.to_device(device)?;
        let loss = forward(&batch.x, batch.lengths.as_ref())?.f_cross_entropy_loss::<Tensor>(
            &batch.y,
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        )?;
        optimizer.backward_step(&loss);
        frozen.restore()?;
    }
    Ok(())
}
