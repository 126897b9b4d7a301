//! RBLA — Rank-Based LoRA Aggregation (arXiv 2408.08699).
//!
//! Per rank slot, a weighted mean over only the clients that have that slot:
//!
//! ```text
//! S_i = { k : r_k > i },   p_k = n_k / Σ_j n_j
//! Ā[i,:] = Σ_{k∈S_i} p_k·A_k[i,:] / Σ_{k∈S_i} p_k
//! B̄[:,i] = Σ_{k∈S_i} p_k·B_k[:,i] / Σ_{k∈S_i} p_k
//! ```
//!
//! A and B are averaged separately. A slot no participant covered this round (S_i empty) keeps its
//! previous global value, so the global adapter keeps all R_max slots (the authors' code shrinks it
//! to the round's largest rank; that is a defect). Non-LoRA tensors get the `p_k`-weighted mean.
//! Streaming: weights `n_k` (the normalisation by `Σ n_j` cancels), denominator = coverage.

use super::padded::{Denominator, SlotSums};
use super::{validate_update, Aggregated, AggregateError, Aggregator, ClientUpdate, Method};
use crate::adapter::Adapter;

pub struct Rbla {
    sums: SlotSums,
}

impl Rbla {
    pub fn new(global: &Adapter, scale: f64) -> Result<Rbla, AggregateError> {
        Ok(Rbla { sums: SlotSums::new(global, scale)? })
    }
}

impl Aggregator for Rbla {
    fn method(&self) -> Method {
        Method::Rbla
    }

    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        validate_update(self.sums.previous(), update)?;
        let n = update.num_samples as f64;
        self.sums.add(update, |_| n)
    }

    fn folded(&self) -> usize {
        self.sums.folded()
    }

    fn finish(self: Box<Self>) -> Result<Aggregated, AggregateError> {
        Ok(Aggregated::plain(self.sums.finish(Denominator::Coverage)?))
    }
}
