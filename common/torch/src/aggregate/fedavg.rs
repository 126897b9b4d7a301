//! FedAvg: the plain sample-weighted mean of A and of B,
//!
//! ```text
//! Ā = Σ_k p_k·A_k        B̄ = Σ_k p_k·B_k        p_k = n_k / Σ_j n_j
//! ```
//!
//! defined only when every client has the global adapter's rank; an update of another rank is
//! refused with an error naming the client.

use super::slot_sums::{Denominator, SampleWeighted};
use super::{AggregateError, Method};
use crate::adapter::Adapter;

/// A fresh FedAvg accumulator over `global`, whose factors use LoRA scale `scale`.
pub(super) fn start(global: &Adapter, scale: f64) -> Result<SampleWeighted, AggregateError> {
    SampleWeighted::new(Method::FedAvg, Denominator::Coverage, true, global, scale)
}
