//! FLoRA (Wang et al. 2024): exact aggregation by stacking.
//!
//! ```text
//! A_s = [A_1; A_2; …; A_K]                         (Σ r_k × d_in)
//! B_s = [p_1·(s_1/s)·B_1, …, p_K·(s_K/s)·B_K]      (d_out × Σ r_k)
//! s·B_s·A_s = Σ_k p_k·s_k·B_k·A_k = T              exactly
//! ```
//!
//! The result has the stacked rank `Σ r_k`, not R_max: it is the one method whose memory and output
//! grow with the number of clients (inherent to FLoRA). What clients receive and do with it: the
//! stacked adapter, which each client merges into its frozen base weights (`W0 ← W0 + s·B_s·A_s`)
//! before starting a fresh LoRA adapter for the next round, so the downlink grows with Σ r_k. This
//! is [`Flora`], what `flotilla-coordinator aggregate --method flora` writes.
//!
//! Online, the coordinator runs [`FloraMerged`]: the same exact `T`, already merged. It keeps one
//! dense `ΔW` per module (`<module>.merged_delta`) and every round
//!
//! ```text
//! ΔW ← ΔW + T = ΔW + Σ_k p_k·s_k·B_k·A_k          (p_k = n_k / Σ n_j)
//! A  ← fresh uniform ±1/√d_in (seeded by the round), B ← 0, head ← Σ p_k·head_k
//! ```
//!
//! Each device receives `ΔW` with its rank-r slice of the fresh adapter and trains on
//! `W0 + ΔW + s·B·A`: merging into the base and restarting LoRA, as FLoRA prescribes. A device that
//! sat out some rounds still gets every merge, because it receives the sum rather than each round's
//! stack (so partial participation needs no history). Downlink per device: one dense matrix per
//! module plus the slice; uplink: the rank-r factors, as in every method. Memory: one dense
//! accumulator per module, whatever the number of clients.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::dense::DenseRound;
use super::non_lora::NonLoraMeans;
use super::slot_sums::scaled_b;
use super::{validate_update, AggregateError, Aggregated, Aggregator, ClientUpdate};
use crate::adapter::{lora_a_name, lora_b_name, merged_delta_name, Adapter};
use crate::data::seeded_uniform;

pub struct Flora {
    previous: Adapter,
    scale: f64,
    stacks: BTreeMap<String, (Vec<Tensor>, Vec<Tensor>)>,
    others: NonLoraMeans,
    total_samples: f64,
}

impl Flora {
    pub fn new(global: &Adapter, scale: f64) -> Result<Flora, AggregateError> {
        let stacks = global.modules().iter().map(|m| (m.clone(), (Vec::new(), Vec::new()))).collect();
        Ok(Flora {
            others: NonLoraMeans::new(global)?,
            previous: global.deep_copy(),
            scale,
            stacks,
            total_samples: 0.0,
        })
    }
}

impl Aggregator for Flora {
    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        validate_update(&self.previous, update)?;
        let n = update.num_samples as f64;
        let mut parts = Vec::with_capacity(self.stacks.len());
        for module in self.stacks.keys() {
            let (a, b) = update.adapter.factors(module);
            let b = scaled_b(b, update.scale, self.scale)?.f_mul_scalar(n)?.f_to_kind(Kind::Float)?;
            parts.push((a.f_to_kind(Kind::Float)?.f_contiguous()?.copy(), b));
        }
        for ((a_parts, b_parts), (a, b)) in self.stacks.values_mut().zip(parts) {
            a_parts.push(a);
            b_parts.push(b);
        }
        self.others.add(update)?;
        self.total_samples += n;
        Ok(())
    }

    fn folded(&self) -> usize {
        self.stacks.values().next().map_or(0, |(a, _)| a.len())
    }

    fn finish(self: Box<Self>) -> Result<Aggregated, AggregateError> {
        if self.total_samples == 0.0 {
            return Ok(Aggregated::plain(self.previous));
        }
        let mut tensors = BTreeMap::new();
        for (module, (a_parts, b_parts)) in &self.stacks {
            tensors.insert(lora_a_name(module), Tensor::f_cat(a_parts, 0)?);
            tensors.insert(lora_b_name(module), Tensor::f_cat(b_parts, 1)?.f_div_scalar(self.total_samples)?);
        }
        self.others.finish(&self.previous, &mut tensors)?;
        let adapter = Adapter::new(tensors)?;
        let notes =
            vec![format!("flora: stacked rank {} (Σ r_k); merge into the base weights, do not slice", adapter.rank())];
        Ok(Aggregated { adapter, notes })
    }
}

/// Online FLoRA: the round's exact aggregate merged into `ΔW`, and a fresh adapter (see the module
/// documentation).
pub struct FloraMerged {
    round: DenseRound,
    scale: f64,
    fresh_seed: u64,
}

impl FloraMerged {
    /// `scale` is the global LoRA scale; `fresh_seed` seeds the fresh A of the next global adapter
    /// (pass something that changes every round).
    pub fn new(global: &Adapter, scale: f64, fresh_seed: u64) -> Result<FloraMerged, AggregateError> {
        Ok(FloraMerged { round: DenseRound::new(global, scale, Kind::Double)?, scale, fresh_seed })
    }
}

impl Aggregator for FloraMerged {
    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        self.round.fold(update)
    }

    fn folded(&self) -> usize {
        self.round.folded
    }

    fn finish(self: Box<Self>) -> Result<Aggregated, AggregateError> {
        let DenseRound { previous, dense, others, folded } = self.round;
        if dense.is_empty() {
            return Ok(Aggregated::plain(previous));
        }
        let r_max = previous.rank();
        let mut tensors = BTreeMap::new();
        for (index, mean) in dense.means().enumerate() {
            let (module, target) = mean?;
            let (a, b) = previous.factors(module);
            let d_in = a.size()[1] as usize;
            // T = s · (T / s), in weight units.
            let mut delta = target.f_mul_scalar(self.scale)?;
            if let Some(merged) = previous.merged_delta(module) {
                delta = delta.f_add(merged)?;
            }
            tensors.insert(merged_delta_name(module), delta.f_to_kind(Kind::Float)?);
            let seed = self.fresh_seed.wrapping_mul(1000).wrapping_add(index as u64);
            tensors.insert(lora_a_name(module), seeded_uniform(&[r_max, d_in], 1.0 / (d_in as f64).sqrt(), seed));
            tensors.insert(lora_b_name(module), Tensor::f_zeros(b.size(), (Kind::Float, b.device()))?);
        }
        others.finish(&previous, &mut tensors)?;
        let adapter = Adapter::new(tensors)?;
        Ok(Aggregated {
            adapter,
            notes: vec![format!(
                "flora: {folded} updates merged into ΔW; fresh rank-{r_max} adapter for the next round"
            )],
        })
    }
}
