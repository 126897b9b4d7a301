//! `serve`, the daemon: everything a run needs before its first round ([`setup`]), device sessions
//! ([`session`]), the round driver ([`driver`]) and the aggregation worker it feeds
//! ([`aggregation_worker`]), secure aggregation ([`secure`]) and federated evaluation
//! ([`federated_evaluation`], [`secure_evaluation`]), crash-safe checkpoints, metrics and `/status`,
//! online certificate renewal, and the run directory's lock, reset secret and privacy ledger.

pub(crate) mod aggregation_worker;
pub(crate) mod base_fetch;
pub(crate) mod checkpoint;
pub(crate) mod crash_points;
pub(crate) mod driver;
pub(crate) mod federated_evaluation;
pub(crate) mod metrics;
pub(crate) mod privacy_ledger;
pub(crate) mod renewal;
pub(crate) mod reset_secret;
pub(crate) mod run_lock;
pub(crate) mod secure;
pub(crate) mod secure_evaluation;
pub(crate) mod session;
pub(crate) mod setup;
