//! A decoder ready to train or evaluate on a device or on the coordinator's held-out articles: the
//! frozen base (with online FLoRA's merged update added) and the adapter's LoRA factors as
//! trainable variables, under the same contract as the classifiers' [`super::LoraModel`].

use std::collections::BTreeMap;
use std::time::Instant;

use flotilla_wire::protocol::{LocalMetrics, TrainingSettings};
use tch::{Device, Tensor};

use super::decoder_lora::{DecoderLora, TokenSums};
use super::llama::{llama_spec, Decoder};
use super::lora_model::{local_metrics_sample, TRANSFORMER_METRICS_SAMPLES};
use super::{Architecture, ArchitectureExt, BaseWeights, ModelError, ADAPTER_PREFIX};
use crate::adapter::{lora_a_name, lora_b_name, Adapter};
use crate::data::decoder_tokenizer::{dataset_sequences, DecoderExample, DecoderTokenizer};
use crate::data::headline::rouge_l_f1;
use crate::data::Dataset;

/// Sequences per forward pass when evaluating.
const EVALUATION_BATCH: usize = 8;

/// Headlines longer than this many tokens are cut (BBC's are about 10).
pub const HEADLINE_TOKENS: usize = 32;

pub struct DecoderModel {
    decoder: Decoder,
    lora: DecoderLora,
}

impl DecoderModel {
    pub fn new(
        architecture: &Architecture,
        base: &BaseWeights,
        adapter: &Adapter,
        scale: f64,
        device: Device,
    ) -> Result<DecoderModel, ModelError> {
        let Architecture::Llama(spec) = architecture else {
            return Err(ModelError::Unsupported("a DecoderModel is for a decoder architecture".into()));
        };
        architecture.check_base(base)?;
        let mut weights: BaseWeights = base.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        let mut factors = BTreeMap::new();
        for layer in architecture.adapted_layers() {
            let module = format!("{ADAPTER_PREFIX}{}", layer.name);
            let get = |name: String| adapter.get(&name).ok_or(ModelError::Missing(name));
            factors.insert(
                layer.name.clone(),
                (get(lora_a_name(&module))?.shallow_clone(), get(lora_b_name(&module))?.shallow_clone()),
            );
            // Online FLoRA's merged update joins the frozen weight: W = W0 + ΔW.
            if let Some(delta) = adapter.merged_delta(&module) {
                let name = architecture.base_weight_name(&layer.name);
                let base_weight = super::quantized::dense(&weights, &name)?;
                let merged = base_weight.f_add(&delta.f_view(layer.weight_shape().as_slice())?)?;
                weights.insert(name, merged);
            }
        }
        let decoder = Decoder::from_weights(llama_spec(spec), &weights, device)?;
        let mut lora = DecoderLora::from_factors(&factors, scale, device)?;
        // A base kept 4-bit is there to save memory: train layer by layer too.
        lora.layered = super::quantized::any_q4(&weights);
        Ok(DecoderModel { decoder, lora })
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// Local training with the same contract as a classifier's: loss before and after on a seeded
    /// sample of at most 32 sequences, and the share of its target tokens predicted exactly after.
    pub fn train(&mut self, data: &Dataset, settings: &TrainingSettings) -> Result<LocalMetrics, ModelError> {
        let started = Instant::now();
        let sequences = dataset_sequences(data).map_err(ModelError::Unsupported)?;
        let sample: Vec<DecoderExample> =
            local_metrics_sample(sequences.len(), TRANSFORMER_METRICS_SAMPLES, settings.seed)
                .into_iter()
                .map(|i| sequences[i].clone())
                .collect();
        let before = self.lora.evaluate_sums(&self.decoder, &sample, EVALUATION_BATCH)?;
        let stepping = Instant::now();
        self.steps(&sequences, settings)?;
        let steps_seconds = stepping.elapsed().as_secs_f64();
        let after = self.lora.evaluate_sums(&self.decoder, &sample, EVALUATION_BATCH)?;
        Ok(LocalMetrics {
            loss_before: before.mean_loss(),
            loss_after: after.mean_loss(),
            accuracy: after.accuracy(),
            train_seconds: started.elapsed().as_secs_f64(),
            steps_seconds,
        })
    }

    /// `settings.local_steps` AdamW steps (or `local_epochs` passes over the data), no evaluation.
    pub fn train_steps(&mut self, data: &Dataset, settings: &TrainingSettings) -> Result<(), ModelError> {
        let sequences = dataset_sequences(data).map_err(ModelError::Unsupported)?;
        self.steps(&sequences, settings)
    }

    fn steps(&mut self, sequences: &[DecoderExample], settings: &TrainingSettings) -> Result<(), ModelError> {
        let batch = (settings.batch_size as usize).clamp(1, sequences.len().max(1));
        let steps = match settings.local_epochs {
            0 => settings.local_steps as usize,
            epochs => epochs as usize * sequences.len().div_ceil(batch),
        };
        self.lora.frozen_a = settings.trainable == flotilla_wire::model::Trainable::BOnly;
        self.lora.train_steps(&self.decoder, sequences, steps, batch, settings.learning_rate, settings.seed)?;
        Ok(())
    }

    /// Loss and exact predictions summed over the target tokens of `data`.
    pub fn evaluate_sums(&self, data: &Dataset) -> Result<TokenSums, ModelError> {
        let sequences = dataset_sequences(data).map_err(ModelError::Unsupported)?;
        self.lora.evaluate_sums(&self.decoder, &sequences, EVALUATION_BATCH)
    }

    /// Greedy headlines for the first `count` examples of `data`, scored against the true ones:
    /// each headline with its ROUGE-L F1.
    pub fn write_headlines(
        &self,
        tokenizer: &DecoderTokenizer,
        data: &Dataset,
        count: usize,
    ) -> Result<Vec<(String, f64)>, ModelError> {
        let stop = tokenizer.special.eos.map(i64::from);
        let text = |ids: &[i64]| -> Result<String, ModelError> {
            let kept: Vec<u32> = ids.iter().filter(|&&id| Some(id) != stop).map(|&id| id as u32).collect();
            tokenizer.decode(&kept).map(|t| t.trim().to_string()).map_err(|e| ModelError::Unsupported(e.to_string()))
        };
        let mut written = Vec::new();
        for sequence in dataset_sequences(data).map_err(ModelError::Unsupported)?.into_iter().take(count) {
            let generated = self.generate(&sequence.ids[..sequence.target_start], HEADLINE_TOKENS, stop)?;
            let headline = text(&generated)?;
            let score = rouge_l_f1(&headline, &text(&sequence.ids[sequence.target_start..])?);
            written.push((headline, score));
        }
        Ok(written)
    }

    /// Logits `[B, L, vocab]` of right-padded ids with the adapter applied.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor, ModelError> {
        self.decoder.logits(ids, Some(&self.lora.lora()))
    }

    /// Greedy continuation of `prompt` with the adapter applied.
    pub fn generate(&self, prompt: &[i64], max_new: usize, stop: Option<i64>) -> Result<Vec<i64>, ModelError> {
        self.decoder.generate_greedy(prompt, max_new, stop, Some(&self.lora.lora()))
    }

    /// The adapter's current values under their PEFT names (on the CPU).
    pub fn adapter(&self) -> Result<Adapter, ModelError> {
        let mut tensors = BTreeMap::new();
        for (name, (a, b)) in self.lora.factors() {
            let module = format!("{ADAPTER_PREFIX}{name}");
            let copy = |t: &Tensor| crate::tensor::try_copy(&t.detach().f_to_device(Device::Cpu)?);
            tensors.insert(lora_a_name(&module), copy(a)?);
            tensors.insert(lora_b_name(&module), copy(b)?);
        }
        Ok(Adapter::new(tensors)?)
    }
}
