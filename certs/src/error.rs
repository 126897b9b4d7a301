//! The one error type of provisioning.

use std::path::{Path, PathBuf};

/// The cause is part of each message, not a separate `source`: a chain printed with `{:#}` (as
/// the binaries do) would otherwise say it twice.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{}: registry is not valid JSON: {source}", path.display())]
    Registry { path: PathBuf, source: serde_json::Error },
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}
