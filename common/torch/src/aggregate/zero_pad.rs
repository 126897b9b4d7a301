//! Zero-padding (HetLoRA's aggregation without its extras).
//!
//! Every update is padded with zeros to R_max and averaged with the sample weights of all clients:
//!
//! ```text
//! Ā[i,:] = Σ_{k∈S_i} p_k·A_k[i,:]        B̄[:,i] = Σ_{k∈S_i} p_k·B_k[:,i]      (denominator 1)
//! ```
//!
//! This equals RBLA's value times the coverage `q_i = Σ_{k∈S_i} p_k`, so rarely covered slots decay
//! geometrically across rounds. A slot no participant covered keeps its previous value.

use super::slot_sums::{Denominator, SampleWeighted};
use super::{AggregateError, Method};
use crate::adapter::Adapter;

/// A fresh zero-padding accumulator over `global`, whose factors use LoRA scale `scale`.
pub(super) fn start(global: &Adapter, scale: f64) -> Result<SampleWeighted, AggregateError> {
    SampleWeighted::new(Method::ZeroPad, Denominator::AllClients, false, global, scale)
}
