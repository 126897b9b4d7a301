//! HetLoRA (Cho et al. 2024): zero-padding weighted by update magnitude.
//!
//! Per adapted layer, client k's weight is the Frobenius norm of its update, normalised over the
//! round's clients:
//!
//! ```text
//! S_k = ‖s_k·B_k·A_k‖_F = s_k·sqrt(tr((B_kᵀB_k)(A_kA_kᵀ)))        (r_k × r_k work, no dense product)
//! Ā[i,:] = Σ_{k∈S_i} S_k·A_k[i,:] / Σ_k S_k          B̄[:,i] = Σ_{k∈S_i} S_k·B_k[:,i] / Σ_k S_k
//! ```
//!
//! Non-LoRA tensors get the sample-weighted mean. A slot no participant covered, or a layer whose
//! updates are all zero, keeps its previous value. (HetLoRA's optional local rank self-pruning is a
//! client-side feature and is not part of the aggregation.)

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::slot_sums::{scaled_b, Denominator, SlotSums};
use super::{validate_update, AggregateError, Aggregated, Aggregator, ClientUpdate};
use crate::adapter::Adapter;

pub struct HetLora {
    sums: SlotSums,
    scale: f64,
}

impl HetLora {
    pub fn new(global: &Adapter, scale: f64) -> Result<HetLora, AggregateError> {
        Ok(HetLora { sums: SlotSums::new(global, scale)?, scale })
    }

    /// Each module's weight `‖s_k·B_k·A_k‖_F` for a validated update.
    fn norms(&self, update: &ClientUpdate<'_>) -> Result<BTreeMap<String, f64>, AggregateError> {
        let mut norms = BTreeMap::new();
        for module in update.adapter.modules() {
            let (a, b) = update.adapter.factors(module);
            norms.insert(module.clone(), product_norm(a, &scaled_b(b, update.scale, self.scale)?)?);
        }
        Ok(norms)
    }
}

/// `‖B·A‖_F` through the r × r Gram matrices.
pub(super) fn product_norm(a: &Tensor, b: &Tensor) -> Result<f64, AggregateError> {
    let a = a.f_to_kind(Kind::Double)?;
    let b = b.f_to_kind(Kind::Double)?;
    let gram_b = b.f_tr()?.f_matmul(&b)?;
    let gram_a = a.f_matmul(&a.f_tr()?)?;
    let squared = gram_b.f_mul(&gram_a.f_tr()?)?.f_sum(Kind::Double)?.f_double_value(&[])?;
    Ok(squared.max(0.0).sqrt())
}

impl Aggregator for HetLora {
    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        validate_update(self.sums.previous(), update)?;
        let norms = self.norms(update)?;
        self.sums.add(update, |module| norms[module])
    }

    fn fold_batch(&mut self, updates: &[ClientUpdate<'_>]) -> Vec<Result<(), AggregateError>> {
        let mut norms = Vec::with_capacity(updates.len());
        let mut results = Vec::with_capacity(updates.len());
        for update in updates {
            match validate_update(self.sums.previous(), update).and_then(|()| self.norms(update)) {
                Ok(n) => {
                    norms.push(n);
                    results.push(Ok(()));
                }
                Err(error) => {
                    norms.push(BTreeMap::new());
                    results.push(Err(error));
                }
            }
        }
        self.sums.add_accepted(updates, &mut results, |i, module| norms[i][module]);
        results
    }

    fn folded(&self) -> usize {
        self.sums.folded()
    }

    fn finish(self: Box<Self>) -> Result<Aggregated, AggregateError> {
        Ok(Aggregated::plain(self.sums.finish(Denominator::AllClients)?))
    }
}
