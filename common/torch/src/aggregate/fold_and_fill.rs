//! Fold-and-Fill: RBLA's per-slot sums, with every client of the round in the denominator and a
//! client that lacks a slot counting with the previous global value of that slot.
//!
//! ```text
//! S_i = { k : r_k > i },   N_i = Σ_{k∈S_i} n_k,   N = Σ_k n_k,   q_i = N_i / N
//! Ā[i,:] = (Σ_{k∈S_i} n_k·A_k[i,:] + (N − N_i)·A_g[i,:]) / N  =  A_g[i,:] + q_i·(RBLA_i − A_g[i,:])
//! B̄[:,i] = (Σ_{k∈S_i} n_k·B_k[:,i] + (N − N_i)·B_g[:,i]) / N
//! ```
//!
//! It is FedAvg of full R_max adapters in which each device froze the slots above its rank: a
//! device of rank r receives the whole R_max global adapter, folds the slots above its rank into
//! its frozen weight, `W ← W0 + s·B_g[:, r:]·A_g[r:, :]` (`Adapter::slice_with_folded_tail`, as a
//! merged delta, the path online FLoRA uses), trains its prefix and the head, and uploads its
//! prefix as under RBLA. A slot only a small share of the round covers moves by that share, not
//! all the way to its few supporters' values; devices that return what they received give back the
//! global adapter; no slot is ever zeroed. Server cost is RBLA's; the downlink grows to the R_max
//! adapter for every device.

use super::slot_sums::{Denominator, SampleWeighted};
use super::{AggregateError, Method};
use crate::adapter::Adapter;

/// A fresh Fold-and-Fill accumulator over `global`, whose factors use LoRA scale `scale`.
pub(super) fn start(global: &Adapter, scale: f64) -> Result<SampleWeighted, AggregateError> {
    SampleWeighted::new(Method::FoldAndFill, Denominator::AllClientsFilled, false, global, scale)
}
