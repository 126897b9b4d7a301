//! FedAvg: the plain sample-weighted mean of A and of B,
//!
//! ```text
//! Ā = Σ_k p_k·A_k        B̄ = Σ_k p_k·B_k        p_k = n_k / Σ_j n_j
//! ```
//!
//! defined only when every client has the global adapter's rank; an update of another rank is
//! refused with an error naming the client.

use super::padded::{Denominator, SlotSums};
use super::{validate_update, Aggregated, AggregateError, Aggregator, ClientUpdate, Method};
use crate::adapter::Adapter;

pub struct FedAvg {
    sums: SlotSums,
}

impl FedAvg {
    pub fn new(global: &Adapter, scale: f64) -> Result<FedAvg, AggregateError> {
        Ok(FedAvg { sums: SlotSums::new(global, scale)? })
    }
}

impl Aggregator for FedAvg {
    fn method(&self) -> Method {
        Method::FedAvg
    }

    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        let rank = self.sums.previous().rank();
        if update.declared_rank != rank {
            return Err(AggregateError::InvalidUpdate {
                client: update.client.to_string(),
                message: format!(
                    "fedavg needs every client at rank {rank}, this update has rank {}; use rbla, zero-pad, \
                     hetlora, flexlora or flora for mixed ranks",
                    update.declared_rank
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
        Ok(Aggregated::plain(self.sums.finish(Denominator::Coverage)?))
    }
}
