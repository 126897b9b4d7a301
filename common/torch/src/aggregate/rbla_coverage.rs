//! Coverage-scaled RBLA: RBLA's per-slot mean over the clients that have the slot, then both
//! factors of the slot multiplied by the square root of the share of the round that covered it.
//!
//! ```text
//! S_i = { k : r_k > i },   q_i = Σ_{k∈S_i} n_k / Σ_k n_k
//! Ā[i,:] = √q_i · RBLA_A[i,:]        B̄[:,i] = √q_i · RBLA_B[:,i]
//! ```
//!
//! The slot's product `B̄[:,i]·Ā[i,:]` thus carries the weight `q_i`: where the slot's supporters
//! agree (`A_k[i,:] = A[i,:]` for all k ∈ S_i), it is what dense FedAvg of the products `B_k·A_k`
//! gives that slot, with the clients that lack it counting as zero; where RBLA lets a slot only one
//! device covers pass through at full weight, this shrinks it by that device's share. A slot no
//! participant covered keeps its previous value. Non-LoRA tensors get the sample-weighted mean.

use super::slot_sums::{Denominator, SampleWeighted};
use super::{AggregateError, Method};
use crate::adapter::Adapter;

/// A fresh coverage-scaled RBLA accumulator over `global`, whose factors use LoRA scale `scale`.
pub(super) fn start(global: &Adapter, scale: f64) -> Result<SampleWeighted, AggregateError> {
    SampleWeighted::new(Method::RblaCoverage, Denominator::CoverageScaled, false, global, scale)
}
