//! Flotilla's data formats, without libtorch: what a device's data is on disk and how it is split.
//!
//! - [`idx`]: MNIST-style IDX files; [`text`]: labelled texts (class folders, CSV, JSONL) and their
//!   stable train/test split; [`partition`]: splitting a data set among devices; [`cache`]: the
//!   per-user cache the deploy scripts fill; [`hash`]: the stable hash of splits and samples; [`sample`]: a stratified, seeded held-out subset.
//!
//! `flotilla-torch` turns these into tensors; the study harness reads and writes them without it.

pub mod cache;
pub mod hash;
pub mod headline;
pub mod idx;
pub mod partition;
pub mod sample;
pub mod text;

use std::path::PathBuf;

/// A data file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DataError {
    pub path: PathBuf,
    pub message: String,
}
