//! Aggregation of rank-heterogeneous LoRA updates.
//!
//! Every method is a streaming accumulator behind [`Aggregator`]: it starts from the current global
//! adapter (whose rank is the configured R_max and stays R_max), folds in one validated update at a
//! time as it arrives, and produces the next global adapter at round end. Memory is a fixed number
//! of global-sized buffers, whatever the number of clients.
//!
//! One file per method; the formulas are in each file's doc comment.

mod dense;
mod dp;
mod fedavg;
mod flexlora;
mod flora;
mod fold_and_fill;
mod hetlora;
mod non_lora;
mod rbla;
mod rbla_coverage;
pub mod secure;
mod slot_sums;
mod validate;
mod zero_pad;

#[cfg(test)]
mod tests;

use crate::adapter::{Adapter, AdapterError};

pub use dp::{noised_coordinates, private_denominator, why_not_private, PrivacyParameters, PrivateSums, Trainable};
pub use flexlora::{singular_values, top_components, FlexLora, EXACT_SVD_MAX_DIM};
pub use flora::{Flora, FloraMerged};
pub use flotilla_merge::method::Method;
pub use hetlora::HetLora;
pub use validate::validate_update;

/// One client's contribution to a round.
pub struct ClientUpdate<'a> {
    /// Who sent it (for error messages and logs).
    pub client: &'a str,
    /// The rank the client declared for this update.
    pub declared_rank: usize,
    pub num_samples: u64,
    /// The LoRA scale this client's factors use (`lora_alpha / r` in PEFT terms). When it differs
    /// from the aggregator's scale, B is rescaled before aggregating so that `s·B·A` is unchanged.
    pub scale: f64,
    pub adapter: &'a Adapter,
}

/// The next global adapter and anything worth telling the operator about how it was made.
pub struct Aggregated {
    pub adapter: Adapter,
    pub notes: Vec<String>,
}

impl Aggregated {
    pub fn plain(adapter: Adapter) -> Aggregated {
        Aggregated { adapter, notes: Vec::new() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    #[error("update from '{client}' rejected: tensor '{tensor}': {message}")]
    InvalidTensor { client: String, tensor: String, message: String },
    #[error("update from '{client}' rejected: {message}")]
    InvalidUpdate { client: String, message: String },
    #[error("aggregation failed: libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Adapter(#[from] AdapterError),
}

/// A streaming aggregation method.
pub trait Aggregator: Send {
    /// Validates `update` against the global adapter and folds it in. On error the accumulator is
    /// untouched.
    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError>;
    /// Folds updates that arrived together, each validated on its own (one result per update, in
    /// order); the accumulator ends as if they had been folded one by one in that order. The
    /// slot-wise methods fold them module by module, so a module's sums stay in cache while the
    /// updates stream past once (about half the memory traffic of one at a time).
    fn fold_batch(&mut self, updates: &[ClientUpdate<'_>]) -> Vec<Result<(), AggregateError>> {
        updates.iter().map(|update| self.fold(update)).collect()
    }
    /// How many updates were folded in.
    fn folded(&self) -> usize;
    /// The next global adapter.
    fn finish(self: Box<Self>) -> Result<Aggregated, AggregateError>;
}

/// What the torch side runs for each [`Method`] (the methods are named once, in
/// `flotilla_merge::method`).
pub trait MethodExt {
    /// A fresh accumulator seeded with the current global adapter, whose factors use LoRA scale `scale`.
    fn start(self, global: &Adapter, scale: f64) -> Result<Box<dyn Aggregator>, AggregateError>;
    /// The accumulator the coordinator runs each round: as [`MethodExt::start`], except that FLoRA
    /// merges its exact aggregate into the global adapter's `ΔW` and restarts the factors
    /// ([`FloraMerged`]), so the global adapter keeps R_max. `round_seed` seeds the fresh factors.
    fn start_online(self, global: &Adapter, scale: f64, round_seed: u64)
        -> Result<Box<dyn Aggregator>, AggregateError>;
}

impl MethodExt for Method {
    fn start(self, global: &Adapter, scale: f64) -> Result<Box<dyn Aggregator>, AggregateError> {
        Ok(match self {
            Method::Rbla => Box::new(rbla::start(global, scale)?),
            Method::ZeroPad => Box::new(zero_pad::start(global, scale)?),
            Method::HetLora => Box::new(HetLora::new(global, scale)?),
            Method::FlexLora => Box::new(FlexLora::new(global, scale)?),
            Method::Flora => Box::new(Flora::new(global, scale)?),
            Method::FedAvg => Box::new(fedavg::start(global, scale)?),
            Method::FoldAndFill => Box::new(fold_and_fill::start(global, scale)?),
            Method::RblaCoverage => Box::new(rbla_coverage::start(global, scale)?),
        })
    }

    fn start_online(
        self,
        global: &Adapter,
        scale: f64,
        round_seed: u64,
    ) -> Result<Box<dyn Aggregator>, AggregateError> {
        match self {
            Method::Flora => Ok(Box::new(FloraMerged::new(global, scale, round_seed)?)),
            other => other.start(global, scale),
        }
    }
}
