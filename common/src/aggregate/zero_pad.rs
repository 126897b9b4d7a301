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

use super::padded::{Denominator, SlotSums};
use super::{validate_update, Aggregated, AggregateError, Aggregator, ClientUpdate, Method};
use crate::adapter::Adapter;

pub struct ZeroPad {
    sums: SlotSums,
}

impl ZeroPad {
    pub fn new(global: &Adapter, scale: f64) -> Result<ZeroPad, AggregateError> {
        Ok(ZeroPad { sums: SlotSums::new(global, scale)? })
    }
}

impl Aggregator for ZeroPad {
    fn method(&self) -> Method {
        Method::ZeroPad
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
        Ok(Aggregated::plain(self.sums.finish(Denominator::AllClients)?))
    }
}
