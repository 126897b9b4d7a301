//! The accumulator shared by the methods that average zero-padded factors slot by slot (rbla,
//! zero-pad, hetlora, fedavg). They differ only in each client's weight per module and in the
//! denominator; see each method's file for its formula.
//!
//! The arithmetic and the per-slot bookkeeping are `flotilla_merge::slots` (shared with the offline
//! fast path); here the sums live in f32 CPU tensors, one pair per module.

use std::collections::BTreeMap;

use flotilla_merge::slots::{Factors, ModuleSlots};
use tch::{Device, Kind, Tensor};

use super::non_lora::NonLoraMeans;
use super::{validate_update, AggregateError, Aggregated, Aggregator, ClientUpdate, Method};
use crate::adapter::{lora_a_name, lora_b_name, Adapter};
use crate::tensor::f32_storage_mut;

pub(super) use flotilla_merge::slots::Denominator;

struct ModuleSums {
    a: Tensor,
    b: Tensor,
    slots: ModuleSlots,
}

/// `t` as a contiguous f32 CPU tensor: itself (shallow) when it already is one, else a copy.
fn contiguous_f32(t: &Tensor) -> Result<Tensor, AggregateError> {
    if t.kind() == Kind::Float && t.device() == Device::Cpu && t.is_contiguous() {
        Ok(t.shallow_clone())
    } else {
        Ok(t.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?)
    }
}

/// The values of a contiguous f32 CPU tensor.
///
/// # Safety
/// `t` must be a contiguous f32 CPU tensor not aliased by any live mutable view.
unsafe fn values(t: &Tensor) -> &[f32] {
    if t.numel() == 0 {
        &[]
    } else {
        // SAFETY: the caller promises what `f32_storage_mut` requires.
        unsafe { f32_storage_mut(t) }
    }
}

/// The values of a contiguous f32 CPU tensor, mutably.
///
/// # Safety
/// `t` must be a contiguous f32 CPU tensor with no other live view of its storage.
#[allow(clippy::mut_from_ref)] // a tensor handle is shared; its storage is what is borrowed
unsafe fn values_mut(t: &Tensor) -> &mut [f32] {
    if t.numel() == 0 {
        &mut []
    } else {
        // SAFETY: the caller promises what `f32_storage_mut` requires.
        unsafe { f32_storage_mut(t) }
    }
}

pub(super) struct SlotSums {
    previous: Adapter,
    target_scale: f64,
    modules: BTreeMap<String, ModuleSums>,
    others: NonLoraMeans,
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
                    a: Tensor::f_zeros(a.size(), (Kind::Float, Device::Cpu))?,
                    b: Tensor::f_zeros(b.size(), (Kind::Float, Device::Cpu))?,
                    slots: ModuleSlots::new(r_max),
                },
            );
        }
        Ok(SlotSums {
            others: NonLoraMeans::new(global)?,
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

    /// Adds a validated update, `weight(module)` being its weight for a module (see
    /// `ModuleSlots::fold`). Shapes were validated, so the only possible failure is libtorch itself.
    pub(super) fn add(
        &mut self,
        update: &ClientUpdate<'_>,
        weight: impl Fn(&str) -> f64,
    ) -> Result<(), AggregateError> {
        self.add_batch(&[update], |_, module| weight(module))
    }

    /// Adds validated updates in order, module by module: the same sums as adding them one at a
    /// time, with each module's sums read and written once for the whole batch. `weight(i, module)`
    /// is update i's weight for a module.
    pub(super) fn add_batch(
        &mut self,
        updates: &[&ClientUpdate<'_>],
        weight: impl Fn(usize, &str) -> f64,
    ) -> Result<(), AggregateError> {
        for (module, sums) in self.modules.iter_mut() {
            for (i, update) in updates.iter().enumerate() {
                let (a, b) = update.adapter.factors(module);
                let (a, b) = (contiguous_f32(a)?, contiguous_f32(b)?);
                // SAFETY: the sums are contiguous f32 CPU tensors owned by this accumulator, with no
                // other view; `a` and `b` are contiguous f32 CPU tensors only read here.
                let (acc_a, acc_b, a, b) =
                    unsafe { (values_mut(&sums.a), values_mut(&sums.b), values(&a), values(&b)) };
                let factors = Factors { a, b, rank: update.declared_rank };
                sums.slots.fold(acc_a, acc_b, factors, weight(i, module), update.scale / self.target_scale);
            }
        }
        for update in updates {
            self.others.add(update)?;
        }
        self.folded += updates.len();
        Ok(())
    }

    /// Adds, as one batch, the updates whose result is still `Ok` (the validated ones), update i
    /// with weight `weight(i, module)`; should libtorch fail, each of them gets the error instead.
    pub(super) fn add_accepted(
        &mut self,
        updates: &[ClientUpdate<'_>],
        results: &mut [Result<(), AggregateError>],
        weight: impl Fn(usize, &str) -> f64,
    ) {
        let accepted: Vec<usize> = (0..updates.len()).filter(|&i| results[i].is_ok()).collect();
        let batch: Vec<&ClientUpdate<'_>> = accepted.iter().map(|&i| &updates[i]).collect();
        if let Err(error) = self.add_batch(&batch, |k, module| weight(accepted[k], module)) {
            let message = error.to_string();
            for &i in &accepted {
                results[i] = Err(AggregateError::InvalidUpdate {
                    client: updates[i].client.to_string(),
                    message: message.clone(),
                });
            }
        }
    }

    /// The averaged adapter, divided in place. A slot no client covered keeps its previous value; so
    /// does a whole module whose total weight is zero (nothing to average).
    pub(super) fn finish(mut self, denominator: Denominator) -> Result<Adapter, AggregateError> {
        let mut tensors = BTreeMap::new();
        for (module, sums) in std::mem::take(&mut self.modules) {
            let (prev_a, prev_b) = self.previous.factors(&module);
            let (prev_a, prev_b) = (contiguous_f32(prev_a)?, contiguous_f32(prev_b)?);
            // SAFETY: as in `add`; the previous factors are only read.
            let (acc_a, acc_b, prev_a, prev_b) =
                unsafe { (values_mut(&sums.a), values_mut(&sums.b), values(&prev_a), values(&prev_b)) };
            sums.slots.finish(denominator, acc_a, acc_b, Some(prev_a), Some(prev_b));
            tensors.insert(lora_a_name(&module), sums.a);
            tensors.insert(lora_b_name(&module), sums.b);
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
    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        self.check(update)?;
        self.sums.add(update, |_| update.num_samples as f64)
    }

    fn fold_batch(&mut self, updates: &[ClientUpdate<'_>]) -> Vec<Result<(), AggregateError>> {
        let mut results: Vec<Result<(), AggregateError>> = updates.iter().map(|u| self.check(u)).collect();
        self.sums.add_accepted(updates, &mut results, |i, _| updates[i].num_samples as f64);
        results
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
                    "{} needs every client at rank {rank}, this update has rank {}; use {} for mixed ranks",
                    self.method,
                    update.declared_rank,
                    Method::names_where(|m| m.method != Method::FedAvg)
                ),
            });
        }
        validate_update(self.sums.previous(), update)
    }
}
