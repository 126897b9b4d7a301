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

use super::slot_sums::{Denominator, SampleWeighted};
use super::{AggregateError, Method};
use crate::adapter::Adapter;

/// A fresh RBLA accumulator over `global`, whose factors use LoRA scale `scale`.
pub(super) fn start(global: &Adapter, scale: f64) -> Result<SampleWeighted, AggregateError> {
    SampleWeighted::new(Method::Rbla, Denominator::Coverage, false, global, scale)
}
