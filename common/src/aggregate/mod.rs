//! Aggregation of rank-heterogeneous LoRA updates.
//!
//! Every method is a streaming accumulator behind [`Aggregator`]: it starts from the current global
//! adapter (whose rank is the configured R_max and stays R_max), folds in one validated update at a
//! time as it arrives, and produces the next global adapter at round end. Memory is a fixed number
//! of global-sized buffers, whatever the number of clients.
//!
//! One file per method; the formulas are in each file's doc comment.

mod rbla;
mod validate;

use std::fmt;
use std::str::FromStr;

use crate::adapter::{Adapter, AdapterError};

pub use rbla::Rbla;
pub use validate::validate_update;

/// One client's contribution to a round.
pub struct ClientUpdate<'a> {
    /// Who sent it (for error messages and logs).
    pub client: &'a str,
    /// The rank the client declared for this update.
    pub declared_rank: usize,
    pub num_samples: u64,
    pub adapter: &'a Adapter,
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
    fn method(&self) -> Method;
    /// Validates `update` against the global adapter and folds it in. On error the accumulator is
    /// untouched.
    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError>;
    /// How many updates were folded in.
    fn folded(&self) -> usize;
    /// The next global adapter.
    fn finish(self: Box<Self>) -> Result<Adapter, AggregateError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Rbla,
}

impl Method {
    pub const ALL: [Method; 1] = [Method::Rbla];

    pub fn name(self) -> &'static str {
        match self {
            Method::Rbla => "rbla",
        }
    }

    /// A fresh accumulator seeded with the current global adapter.
    pub fn start(self, global: &Adapter) -> Result<Box<dyn Aggregator>, AggregateError> {
        Ok(match self {
            Method::Rbla => Box::new(Rbla::new(global)?),
        })
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
                format!("unknown aggregation method '{s}' (known: {})", names.join(", "))
            })
    }
}
