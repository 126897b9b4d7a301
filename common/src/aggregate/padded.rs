//! The accumulator shared by the methods that average zero-padded factors slot by slot (rbla,
//! zero-pad, hetlora, fedavg). They differ only in each client's weight per module and in the
//! denominator; see each method's file for its formula.
//!
//! Per module it keeps `Σ (w_k/ρ_i)·A_k` (R_max × d_in) and `Σ (w_k/ρ_i)·B_k` (d_out × R_max) in f32,
//! where `ρ_i` is the weight of the first client that covered slot i this round: the first
//! contribution to a slot is added with factor exactly 1, so a slot only one client covers passes
//! through bit-identical, and f32 keeps the accumulator traffic at twice the input bytes. Alongside:
//! the per-slot relative weight `Σ_{k∈S_i} w_k/ρ_i`, the module's total weight and how many clients
//! covered each slot. Memory is fixed by the global adapter's size, whatever the number of clients.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::kernels;
use super::others::OtherMeans;
use super::{validate_update, AggregateError, Aggregated, Aggregator, ClientUpdate, Method};
use crate::adapter::{lora_a_name, lora_b_name, Adapter};

struct ModuleSums {
    a: Tensor,
    b: Tensor,
    /// ρ_i: the weight of slot i's first contributor (0 while none).
    reference: Vec<f64>,
    /// Σ_{k∈S_i} w_k / ρ_i.
    relative_weight: Vec<f64>,
    slot_clients: Vec<u32>,
    total_weight: f64,
}

impl ModuleSums {
    /// Runs of consecutive slots in `0..rank` that share a reference weight, after giving
    /// uncovered slots the reference `w`: `(start, end, factor = w / ρ)`.
    fn segments(&mut self, rank: usize, w: f64) -> Vec<(usize, usize, f64)> {
        let mut out: Vec<(usize, usize, f64)> = Vec::new();
        for slot in 0..rank {
            if self.reference[slot] == 0.0 {
                self.reference[slot] = w;
            }
            let factor = w / self.reference[slot];
            match out.last_mut() {
                Some((_, end, f)) if *f == factor => *end = slot + 1,
                _ => out.push((slot, slot + 1, factor)),
            }
        }
        out
    }
}

/// What a covered slot's weighted sum is divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Denominator {
    /// The weight of the clients that have the slot (RBLA, FedAvg).
    Coverage,
    /// The weight of every client of the round, as if missing slots were zeros (zero-pad, HetLoRA).
    AllClients,
}

pub(super) struct SlotSums {
    previous: Adapter,
    target_scale: f64,
    modules: BTreeMap<String, ModuleSums>,
    others: OtherMeans,
    folded: usize,
}

impl SlotSums {
    pub(super) fn new(global: &Adapter, target_scale: f64) -> Result<SlotSums, AggregateError> {
        let mut modules = BTreeMap::new();
        let r_max = global.rank();
        for module in global.modules() {
            let (a, b) = global.factors(module);
            modules.insert(
                module.clone(),
                ModuleSums {
                    a: Tensor::f_zeros(a.size(), (Kind::Float, a.device()))?,
                    b: Tensor::f_zeros(b.size(), (Kind::Float, b.device()))?,
                    reference: vec![0.0; r_max],
                    relative_weight: vec![0.0; r_max],
                    slot_clients: vec![0; r_max],
                    total_weight: 0.0,
                },
            );
        }
        Ok(SlotSums {
            others: OtherMeans::new(global)?,
            previous: global.deep_copy(),
            target_scale,
            modules,
            folded: 0,
        })
    }

    pub(super) fn previous(&self) -> &Adapter {
        &self.previous
    }

    pub(super) fn folded(&self) -> usize {
        self.folded
    }

    /// Adds a validated update, `weight(module)` being its weight for a module:
    /// `acc[s..e] += (w/ρ)·x[s..e]` for each run of slots sharing a reference. Shapes were
    /// validated, so the only possible failure is libtorch itself.
    pub(super) fn add(
        &mut self,
        update: &ClientUpdate<'_>,
        weight: impl Fn(&str) -> f64,
    ) -> Result<(), AggregateError> {
        let rank = update.declared_rank;
        let b_factor = update.scale / self.target_scale;
        for (module, sums) in self.modules.iter_mut() {
            let w = weight(module);
            for slot in 0..rank {
                sums.slot_clients[slot] += 1;
            }
            sums.total_weight += w;
            if w == 0.0 {
                continue; // covers its slots, contributes nothing
            }
            let (a, b) = update.adapter.factors(module);
            for (start, end, factor) in sums.segments(rank, w) {
                kernels::add_rows(&sums.a, a, start, end, factor as f32)?;
                kernels::add_cols(&sums.b, b, start, end, (factor * b_factor) as f32)?;
                for slot in start..end {
                    sums.relative_weight[slot] += factor;
                }
            }
        }
        self.others.add(update)?;
        self.folded += 1;
        Ok(())
    }

    /// The averaged adapter, divided in place. A slot no client covered keeps its previous value; so
    /// does a whole module whose total weight is zero (nothing to average).
    pub(super) fn finish(mut self, denominator: Denominator) -> Result<Adapter, AggregateError> {
        let mut tensors = BTreeMap::new();
        for (module, sums) in std::mem::take(&mut self.modules) {
            let (prev_a, prev_b) = self.previous.factors(&module);
            let ModuleSums { mut a, mut b, reference, relative_weight, slot_clients, total_weight } = sums;
            // Per slot: the divisor in units of ρ_i, or None to keep the previous value.
            let divisors: Vec<Option<f64>> = (0..relative_weight.len())
                .map(|i| {
                    let d = match denominator {
                        Denominator::Coverage => relative_weight[i],
                        Denominator::AllClients if reference[i] > 0.0 => total_weight / reference[i],
                        Denominator::AllClients => 0.0,
                    };
                    (slot_clients[i] > 0 && d > 0.0).then_some(d)
                })
                .collect();
            let scale =
                Tensor::from_slice(&divisors.iter().map(|d| (1.0 / d.unwrap_or(1.0)) as f32).collect::<Vec<_>>());
            let _ = a.f_mul_(&scale.f_unsqueeze(1)?)?;
            let _ = b.f_mul_(&scale.f_unsqueeze(0)?)?;
            for (slot, d) in divisors.iter().enumerate() {
                if d.is_none() {
                    let slot = slot as i64;
                    a.f_narrow(0, slot, 1)?.f_copy_(&prev_a.f_narrow(0, slot, 1)?)?;
                    b.f_narrow(1, slot, 1)?.f_copy_(&prev_b.f_narrow(1, slot, 1)?)?;
                }
            }
            tensors.insert(lora_a_name(&module), a);
            tensors.insert(lora_b_name(&module), b);
        }
        self.others.finish(&self.previous, &mut tensors)?;
        Ok(Adapter::new(tensors)?)
    }
}

/// `B` rescaled from the client's LoRA scale to the global one, as f64: `s_k·B_k·A_k = s·(B_k·s_k/s)·A_k`.
pub(super) fn scaled_b(b: &Tensor, client_scale: f64, target_scale: f64) -> Result<Tensor, AggregateError> {
    let b = b.f_to_kind(Kind::Double)?;
    if client_scale == target_scale {
        Ok(b)
    } else {
        Ok(b.f_mul_scalar(client_scale / target_scale)?)
    }
}

/// A slot-wise method whose client weights are the sample counts `n_k` (RBLA, zero-padding,
/// FedAvg); the methods differ in the denominator and in whether mixed ranks are allowed.
pub(super) struct SampleWeighted {
    method: Method,
    denominator: Denominator,
    equal_ranks_only: bool,
    sums: SlotSums,
}

impl SampleWeighted {
    pub(super) fn new(
        method: Method,
        denominator: Denominator,
        equal_ranks_only: bool,
        global: &Adapter,
        scale: f64,
    ) -> Result<SampleWeighted, AggregateError> {
        Ok(SampleWeighted { method, denominator, equal_ranks_only, sums: SlotSums::new(global, scale)? })
    }
}

impl Aggregator for SampleWeighted {
    fn method(&self) -> Method {
        self.method
    }

    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        self.check(update)?;
        self.sums.add(update, |_| update.num_samples as f64)
    }

    fn folded(&self) -> usize {
        self.sums.folded()
    }

    fn finish(self: Box<Self>) -> Result<Aggregated, AggregateError> {
        Ok(Aggregated::plain(self.sums.finish(self.denominator)?))
    }
}

impl SampleWeighted {
    fn check(&self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        let rank = self.sums.previous().rank();
        if self.equal_ranks_only && update.declared_rank != rank {
            return Err(AggregateError::InvalidUpdate {
                client: update.client.to_string(),
                message: format!(
                    "{} needs every client at rank {rank}, this update has rank {}; use rbla, zero-pad, \
                     hetlora, flexlora or flora for mixed ranks",
                    self.method, update.declared_rank
                ),
            });
        }
        validate_update(self.sums.previous(), update)
    }
}
