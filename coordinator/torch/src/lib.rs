//! The Flotilla coordinator as a library; `flotilla-coordinator-torch` (`src/bin/`) is a thin
//! binary over [`commands::cli`]. Five wings, each standing only on those listed before it:
//!
//! - [`config`]: the TOML configuration, every section and its checks, and what a `[privacy]`
//!   section will cost (the planner).
//! - [`model`]: the frozen base model, the held-out set, test-set evaluation and its per-class
//!   scores, HF model directories.
//! - [`records`]: what a run reports (one record per round), the report files and plots, the
//!   end-of-run summaries.
//! - [`serve`]: the daemon: setup, device sessions over mutual-TLS QUIC, the round driver (which runs
//!   the round engine, `flotilla_engine`), the aggregation worker, secure aggregation, federated
//!   evaluation, checkpoints, metrics, renewal and the run directory's lock and secrets.
//! - [`commands`]: the command line and the commands beside `serve`: `check`, `export`, `aggregate`
//!   (the libtorch path), `finetune-full`, `generate`, `classify`, `status`.

pub mod commands;
pub(crate) mod config;
pub(crate) mod model;
pub(crate) mod records;
pub(crate) mod serve;
