//! The accumulator shared by the methods that average zero-padded factors slot by slot (rbla,
//! zero-pad, hetlora, fedavg). They differ only in each client's weight per module and in the
//! denominator; see each method's file for its formula.
//!
//! Per module it keeps `Σ w_k·A_k` (R_max × d_in) and `Σ w_k·B_k` (d_out × R_max) in f64, the per-slot
//! weight `Σ_{k∈S_i} w_k`, the module's total weight `Σ_k w_k`, and how many clients covered each
//! slot. Memory is fixed by the global adapter's size, whatever the number of clients.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::others::OtherMeans;
use super::{validate_update, AggregateError, Aggregated, Aggregator, ClientUpdate, Method};
use crate::adapter::{lora_a_name, lora_b_name, Adapter};

struct ModuleSums {
    a: Tensor,
    b: Tensor,
    slot_weight: Vec<f64>,
    slot_clients: Vec<u32>,
    total_weight: f64,
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
        for module in global.modules() {
            let (a, b) = global.factors(module);
            modules.insert(
                module.clone(),
                ModuleSums {
                    a: Tensor::f_zeros(a.size(), (Kind::Double, a.device()))?,
                    b: Tensor::f_zeros(b.size(), (Kind::Double, b.device()))?,
                    slot_weight: vec![0.0; global.rank()],
                    slot_clients: vec![0; global.rank()],
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

    /// Adds a validated update with one weight per module: `sum[:r] += w·x`, one fused pass per
    /// tensor (the f32 input is widened inside the kernel). Shapes were validated, so the only
    /// possible failure is libtorch itself.
    pub(super) fn add(
        &mut self,
        update: &ClientUpdate<'_>,
        module_weight: impl Fn(&str) -> f64,
    ) -> Result<(), AggregateError> {
        let r = update.declared_rank as i64;
        let b_factor = update.scale / self.target_scale;
        for (module, sums) in self.modules.iter_mut() {
            let w = module_weight(module);
            let (a, b) = update.adapter.factors(module);
            let _ = sums.a.f_narrow(0, 0, r)?.f_addcmul_(a, &Tensor::from(w))?;
            let _ = sums.b.f_narrow(1, 0, r)?.f_addcmul_(b, &Tensor::from(w * b_factor))?;
            for slot in 0..update.declared_rank {
                sums.slot_weight[slot] += w;
                sums.slot_clients[slot] += 1;
            }
            sums.total_weight += w;
        }
        self.others.add(update)?;
        self.folded += 1;
        Ok(())
    }

    /// The averaged adapter. A slot no client covered keeps its previous value; so does a whole
    /// module whose total weight is zero (nothing to average).
    pub(super) fn finish(self, denominator: Denominator) -> Result<Adapter, AggregateError> {
        let mut tensors = BTreeMap::new();
        for (module, sums) in &self.modules {
            let (prev_a, prev_b) = self.previous.factors(module);
            let per_slot: Vec<f64> = match denominator {
                Denominator::Coverage => sums.slot_weight.clone(),
                Denominator::AllClients => vec![sums.total_weight; sums.slot_weight.len()],
            };
            let usable: Vec<bool> =
                sums.slot_clients.iter().zip(&per_slot).map(|(&clients, &d)| clients > 0 && d > 0.0).collect();
            let denominators =
                Tensor::from_slice(&per_slot.iter().map(|&d| if d > 0.0 { d } else { 1.0 }).collect::<Vec<_>>());
            let keep_new = Tensor::from_slice(&usable);
            let a = sums
                .a
                .f_div(&denominators.f_unsqueeze(1)?)?
                .f_where_self(&keep_new.f_unsqueeze(1)?, &prev_a.f_to_kind(Kind::Double)?)?;
            let b = sums
                .b
                .f_div(&denominators.f_unsqueeze(0)?)?
                .f_where_self(&keep_new.f_unsqueeze(0)?, &prev_b.f_to_kind(Kind::Double)?)?;
            tensors.insert(lora_a_name(module), a.f_to_kind(Kind::Float)?);
            tensors.insert(lora_b_name(module), b.f_to_kind(Kind::Float)?);
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
        validate_update(self.sums.previous(), update)?;
        let n = update.num_samples as f64;
        self.sums.add(update, |_| n)
    }

    fn folded(&self) -> usize {
        self.sums.folded()
    }

    fn finish(self: Box<Self>) -> Result<Aggregated, AggregateError> {
        Ok(Aggregated::plain(self.sums.finish(self.denominator)?))
    }
}
