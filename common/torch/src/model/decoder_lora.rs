//! LoRA fine-tuning of the decoder: examples whose loss falls on their target tokens only (a
//! headline after its prompt, or every token for next-word adaptation), right-padded batches, and
//! AdamW on the LoRA factors alone.

use crate::model::frozen::FrozenFactors;
use std::collections::BTreeMap;

use flotilla_gguf::LlamaSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{nn, nn::OptimizerConfig, Device, Tensor};

use super::llama::Decoder;
use super::{Lora, ModelError};
use crate::data::decoder_tokenizer::DecoderExample;
use crate::data::seeded_uniform;

/// The projections LoRA may target, by PEFT's `target_modules` names.
pub const DECODER_TARGETS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Every adapted module (`model.layers.0.self_attn.q_proj`) with its `(d_in, d_out)`, for `targets`.
pub fn adapted_modules(spec: &LlamaSpec, targets: &[String]) -> Result<Vec<(String, usize, usize)>, ModelError> {
    if let Some(unknown) = targets.iter().find(|t| !DECODER_TARGETS.contains(&t.as_str())) {
        return Err(ModelError::Unsupported(format!(
            "LoRA target {unknown:?} is not a decoder projection ({})",
            DECODER_TARGETS.join(", ")
        )));
    }
    let mut modules = Vec::new();
    for (name, _, shape) in spec.tensors() {
        let Some(module) = name.strip_suffix(".weight") else { continue };
        if shape.len() == 2 && targets.iter().any(|t| module.ends_with(&format!(".{t}"))) {
            modules.push((module.to_string(), shape[1] as usize, shape[0] as usize));
        }
    }
    Ok(modules)
}

/// Right-padded ids `[B, L]` and, per sequence, the (row, position) pairs whose next token is a
/// target, with that token: what the loss is computed on.
struct Batch {
    ids: Tensor,
    rows: Tensor,
    positions: Tensor,
    targets: Tensor,
}

fn batch(examples: &[&DecoderExample], pad: i64, device: Device) -> Result<Batch, ModelError> {
    let length = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(examples.len() * length);
    let (mut rows, mut positions, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for (row, example) in examples.iter().enumerate() {
        ids.extend(&example.ids);
        ids.extend(std::iter::repeat_n(pad, length - example.ids.len()));
        for t in example.target_start.max(1)..example.ids.len() {
            rows.push(row as i64);
            positions.push(t as i64 - 1);
            targets.push(example.ids[t]);
        }
    }
    let to = |values: &[i64]| -> Result<Tensor, ModelError> { Ok(Tensor::f_from_slice(values)?.f_to_device(device)?) };
    Ok(Batch {
        ids: to(&ids)?.f_view([examples.len() as i64, length as i64])?,
        rows: to(&rows)?,
        positions: to(&positions)?,
        targets: to(&targets)?,
    })
}

/// Trainable LoRA factors for the decoder, in their own `VarStore`.
pub struct DecoderLora {
    store: nn::VarStore,
    factors: BTreeMap<String, (Tensor, Tensor)>,
    pub scale: f64,
    /// Train layer by layer, recomputing each in the backward pass ([`DecoderLora::layered_step`]).
    pub layered: bool,
    /// Train each B only, every A staying as it is (`Trainable::BOnly`).
    pub frozen_a: bool,
}

impl DecoderLora {
    /// Fresh factors at `rank` as PEFT initialises them (A uniform ±1/√d_in, B zero), from `seed`.
    pub fn new(
        spec: &LlamaSpec,
        targets: &[String],
        rank: usize,
        scale: f64,
        seed: u64,
        device: Device,
    ) -> Result<DecoderLora, ModelError> {
        let mut tensors = BTreeMap::new();
        for (i, (module, d_in, d_out)) in adapted_modules(spec, targets)?.into_iter().enumerate() {
            let bound = 1.0 / (d_in as f64).sqrt();
            let a = seeded_uniform(&[rank, d_in], bound, seed.wrapping_mul(1000).wrapping_add(i as u64));
            let b = Tensor::f_zeros([d_out as i64, rank as i64], (tch::Kind::Float, Device::Cpu))?;
            tensors.insert(module, (a, b));
        }
        DecoderLora::from_factors(&tensors, scale, device)
    }

    /// Trainable copies of `factors` (`(A, B)` by module, `model.layers.0.self_attn.q_proj`).
    pub fn from_factors(
        factors: &BTreeMap<String, (Tensor, Tensor)>,
        scale: f64,
        device: Device,
    ) -> Result<DecoderLora, ModelError> {
        let store = nn::VarStore::new(device);
        let root = store.root();
        let mut trainable = BTreeMap::new();
        for (i, (module, (a, b))) in factors.iter().enumerate() {
            let a = root.f_var_copy(&format!("lora_a_{i}"), a)?;
            let b = root.f_var_copy(&format!("lora_b_{i}"), b)?;
            trainable.insert(module.clone(), (a, b));
        }
        Ok(DecoderLora { store, factors: trainable, scale, layered: false, frozen_a: false })
    }

    pub fn factors(&self) -> &BTreeMap<String, (Tensor, Tensor)> {
        &self.factors
    }

    pub fn lora(&self) -> Lora<'_> {
        Lora { factors: &self.factors, scale: self.scale }
    }

    /// Summed cross-entropy over the batch's target tokens, their count, and how many of them the
    /// model predicts exactly (greedy).
    fn loss_sum(&self, decoder: &Decoder, batch: &Batch) -> Result<(Tensor, i64, i64), ModelError> {
        let hidden = decoder.hidden(&batch.ids, Some(&self.lora()))?;
        let logits = target_logits(decoder, &hidden, batch)?;
        let loss = logits.f_cross_entropy_loss::<Tensor>(&batch.targets, None, tch::Reduction::Sum, -100, 0.0)?;
        let correct =
            logits.f_argmax(-1, false)?.f_eq_tensor(&batch.targets)?.f_sum(tch::Kind::Int64)?.f_int64_value(&[])?;
        Ok((loss, batch.targets.size()[0], correct))
    }

    /// Mean loss per target token over `examples`, without gradients.
    pub fn evaluate(
        &self,
        decoder: &Decoder,
        examples: &[DecoderExample],
        batch_size: usize,
    ) -> Result<f64, ModelError> {
        Ok(self.evaluate_sums(decoder, examples, batch_size)?.mean_loss())
    }

    /// One step's mean loss and the gradient of every factor, computed layer by layer: the forward
    /// pass keeps only each layer's input; the backward pass recomputes one layer at a time (its
    /// 4-bit weights dequantized again) and hands the gradient down as a vector-Jacobian product.
    /// Peak memory is one layer's weights and activations rather than all of them, for a second
    /// forward pass of compute.
    fn layered_step(&self, decoder: &Decoder, batch: &Batch) -> Result<(f64, Vec<(Tensor, Tensor)>), ModelError> {
        let lora = self.lora();
        let (_, length) = batch.ids.size2()?;
        let (cos, sin) = decoder.rotary(0, length)?;
        let layers = decoder.spec.layers;
        let mut inputs = Vec::with_capacity(layers);
        let top = tch::no_grad(|| -> Result<Tensor, ModelError> {
            let mut h = decoder.embed(&batch.ids)?;
            for layer in 0..layers {
                inputs.push(h.shallow_clone());
                h = decoder.block(layer, &h, Some(&lora), (&cos, &sin), None)?;
            }
            Ok(h)
        })?;
        let top = top.f_detach()?.f_set_requires_grad(true)?;
        let logits = target_logits(decoder, &decoder.final_norm(&top)?, batch)?;
        let loss = logits.f_cross_entropy_loss::<Tensor>(&batch.targets, None, tch::Reduction::Mean, -100, 0.0)?;
        let mean = loss.f_double_value(&[])?;
        let mut gradient = Tensor::f_run_backward(&[&loss], &[&top], false, false)?.remove(0);
        let mut gradients = Vec::new();
        for layer in (0..layers).rev() {
            let x = inputs[layer].f_detach()?.f_set_requires_grad(true)?;
            let y = decoder.block(layer, &x, Some(&lora), (&cos, &sin), None)?;
            let surrogate = y.f_mul(&gradient)?.f_sum(tch::Kind::Float)?;
            let prefix = format!("model.layers.{layer}.");
            let mine: Vec<&(Tensor, Tensor)> =
                self.factors.iter().filter(|(module, _)| module.starts_with(&prefix)).map(|(_, f)| f).collect();
            let mut wrt: Vec<&Tensor> = vec![&x];
            for (a, b) in &mine {
                wrt.push(a);
                wrt.push(b);
            }
            let mut out = Tensor::f_run_backward(&[&surrogate], &wrt, false, false)?.into_iter();
            gradient = out.next().ok_or_else(|| ModelError::Unsupported("no gradient for a layer's input".into()))?;
            for (a, b) in mine {
                let (ga, gb) = (out.next(), out.next());
                if let (Some(ga), Some(gb)) = (ga, gb) {
                    gradients.push((a.shallow_clone(), ga));
                    gradients.push((b.shallow_clone(), gb));
                }
            }
        }
        Ok((mean, gradients))
    }

    /// Loss and exact predictions summed over `examples`' target tokens, without gradients.
    pub fn evaluate_sums(
        &self,
        decoder: &Decoder,
        examples: &[DecoderExample],
        batch_size: usize,
    ) -> Result<TokenSums, ModelError> {
        tch::no_grad(|| {
            let mut sums = TokenSums::default();
            for chunk in examples.chunks(batch_size.max(1)) {
                let refs: Vec<&DecoderExample> = chunk.iter().collect();
                let (loss, n, correct) = self.loss_sum(decoder, &batch(&refs, PAD, decoder.device())?)?;
                sums.loss += loss.f_double_value(&[])?;
                sums.tokens += n as u64;
                sums.correct += correct as u64;
            }
            Ok(sums)
        })
    }

    /// `steps` AdamW steps on minibatches of `batch_size` drawn with `seed`; the mean loss per
    /// target token of each step.
    pub fn train_steps(
        &mut self,
        decoder: &Decoder,
        examples: &[DecoderExample],
        steps: usize,
        batch_size: usize,
        learning_rate: f64,
        seed: u64,
    ) -> Result<Vec<f64>, ModelError> {
        if examples.is_empty() {
            return Err(ModelError::Unsupported("no examples to train on".into()));
        }
        let mut optimizer = nn::AdamW { wd: 0.0, ..Default::default() }.build(&self.store, learning_rate)?;
        let frozen = match self.frozen_a {
            true => FrozenFactors::of(self.factors.values().map(|(a, _)| a))?,
            false => FrozenFactors::none(),
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut losses = Vec::with_capacity(steps);
        for _ in 0..steps {
            let picks: Vec<&DecoderExample> =
                (0..batch_size.max(1)).map(|_| &examples[rng.random_range(0..examples.len())]).collect();
            let batch = batch(&picks, PAD, decoder.device())?;
            if self.layered {
                let (mean, gradients) = self.layered_step(decoder, &batch)?;
                // The surrogate Σ ⟨factor, gradient⟩ has exactly these gradients: AdamW steps with them.
                let mut surrogate = Tensor::f_zeros([], (tch::Kind::Float, decoder.device()))?;
                for (factor, gradient) in &gradients {
                    surrogate = surrogate.f_add(&factor.f_mul(gradient)?.f_sum(tch::Kind::Float)?)?;
                }
                optimizer.backward_step(&surrogate);
                frozen.restore()?;
                losses.push(mean);
                continue;
            }
            let (loss, count, _) = self.loss_sum(decoder, &batch)?;
            let mean = loss.f_div_scalar(count.max(1) as f64)?;
            optimizer.backward_step(&mean);
            frozen.restore()?;
            losses.push(mean.f_double_value(&[])?);
        }
        Ok(losses)
    }
}

/// The logits at the positions whose next token is a target (`[targets, vocab]`), from the final
/// normalized hidden states `[B, L, hidden]`: the full vocabulary is projected there only.
fn target_logits(decoder: &Decoder, hidden: &Tensor, batch: &Batch) -> Result<Tensor, ModelError> {
    let (_, length, width) = hidden.size3()?;
    let flat = batch.rows.f_mul_scalar(length)?.f_add(&batch.positions)?;
    decoder.project(&hidden.f_reshape([-1, width])?.f_index_select(0, &flat)?)
}

/// Loss and greedy hits summed over target tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TokenSums {
    pub loss: f64,
    pub tokens: u64,
    pub correct: u64,
}

impl TokenSums {
    pub fn mean_loss(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.loss / self.tokens as f64
        }
    }

    pub fn accuracy(&self) -> f64 {
        if self.tokens == 0 {
            0.0
        } else {
            self.correct as f64 / self.tokens as f64
        }
    }
}

/// Padding never enters the loss, and the causal mask keeps real positions from seeing it: any id works.
const PAD: i64 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_pads_right_and_predicts_only_targets() {
        let a = DecoderExample { ids: vec![5, 6, 7, 8], target_start: 2 };
        let b = DecoderExample { ids: vec![9, 10], target_start: 1 };
        let batch = batch(&[&a, &b], 0, Device::Cpu).unwrap();
        assert_eq!(batch.ids.size(), [2, 4]);
        assert_eq!(Vec::<i64>::try_from(batch.ids.flatten(0, -1)).unwrap(), [5, 6, 7, 8, 9, 10, 0, 0]);
        // Row 0 predicts 7 (from position 1) and 8 (from 2); row 1 predicts 10 from position 0.
        assert_eq!(Vec::<i64>::try_from(&batch.rows).unwrap(), [0, 0, 1]);
        assert_eq!(Vec::<i64>::try_from(&batch.positions).unwrap(), [1, 2, 0]);
        assert_eq!(Vec::<i64>::try_from(&batch.targets).unwrap(), [7, 8, 10]);
    }
}
