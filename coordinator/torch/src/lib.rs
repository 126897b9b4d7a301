//! The Flotilla coordinator as a library; `flotilla-coordinator-torch` (`src/bin/`) is a thin
//! binary over [`cli`].
//!
//! - [`setup`]: `serve`, everything a run needs before its first round, then the driver;
//!   [`preflight`]: the same checks made by `check`, read-only.
//! - [`session`]: device sessions over mutual-TLS QUIC (admission, uploads, renewals).
//! - [`driver`]: the round driver, which runs the round engine (`flotilla_engine`) and carries out
//!   its actions.
//! - [`aggregation`]: the worker thread that owns the global adapter and the round's accumulator,
//!   folds updates and answers their devices.
//! - [`checkpoint`], [`report`], [`report_files`], [`plots`]: crash-safe checkpoints, the run's
//!   records, and the report files and plots written from them.
//! - [`base`], [`evaluation`], [`class_scores`], [`export`], [`hf_model`]: the frozen base model, test-set
//!   evaluation and its per-class scores,
//!   PEFT export, HF model directories and `classify`.
//! - [`aggregate_torch`]: `aggregate` on the libtorch path.
//! - [`config`], [`metrics`], [`renewal`], [`reset_secret`], [`crash_points`]: configuration, Prometheus
//!   metrics and `/status`, online certificate renewal, the QUIC reset key, crash-test hooks.

pub mod aggregate_torch;
pub mod aggregation;
pub mod base;
mod base_fetch;
pub mod checkpoint;
pub mod class_scores;
pub mod cli;
pub mod config;
pub mod crash_points;
pub mod decoder_summary;
pub mod driver;
pub mod evaluation;
pub mod evaluation_set;
pub mod export;
pub mod federated_evaluation;
pub mod federated_summary;
pub mod full_finetune;
pub mod generate;
pub mod hf_decoder;
pub mod hf_model;
pub mod metrics;
pub mod plots;
pub mod preflight;
pub mod privacy;
pub mod privacy_ledger;
pub mod privacy_plan;
pub mod renewal;
pub mod report;
pub mod report_files;
pub mod reset_secret;
pub mod run_lock;
pub mod secure;
pub mod secure_evaluation;
pub mod secure_section;
pub mod session;
pub mod setup;
