//! The Flotilla coordinator as a library; `flotilla-coordinator-torch` (`src/bin/`) is a thin
//! binary over [`cli`].
//!
//! - [`server`]: accepts mutual-TLS QUIC sessions and drives the round engine (`flotilla_engine`).
//! - [`aggregation`]: the worker thread that owns the global adapter and the round's accumulator.
//! - [`checkpoint`], [`report`], [`plots`]: crash-safe checkpoints, per-round records and plots.
//! - [`base`], [`evaluation`], [`export`]: the frozen base model, test-set evaluation, PEFT export.
//! - [`offline`]: `aggregate` on the libtorch path.
//! - [`config`], [`metrics`], [`renewal`], [`reset_secret`], [`fault`]: configuration, Prometheus
//!   metrics and `/status`, online certificate renewal, the QUIC reset key, crash-test hooks.

pub mod aggregation;
pub mod base;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod evaluation;
pub mod export;
pub mod fault;
pub mod metrics;
pub mod offline;
pub mod plots;
pub mod renewal;
pub mod report;
pub mod reset_secret;
pub mod server;
