//! The per-user cache the deploy scripts fill (`deploy/bootstrap-libtorch.sh`,
//! `deploy/fetch-text-assets.sh`) and devices keep fetched checkpoints in: `$FLOTILLA_CACHE`, else
//! `$XDG_CACHE_HOME/flotilla`, else `~/.cache/flotilla`, as the scripts compute it.

use std::path::PathBuf;

/// The cache's root directory.
pub fn root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLOTILLA_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".cache")
    });
    base.join("flotilla")
}

/// all-MiniLM-L6-v2's directory: `$FLOTILLA_MINILM` (as `fetch-text-assets.sh` exports it), else
/// its place in the cache.
pub fn minilm_dir() -> PathBuf {
    std::env::var_os("FLOTILLA_MINILM").map(PathBuf::from).unwrap_or_else(|| root().join("models/all-MiniLM-L6-v2"))
}

/// SmolLM2-135M-Instruct's GGUF file: `$FLOTILLA_SMOLLM2` (as `fetch-text-assets.sh` exports it),
/// else its place in the cache.
pub fn smollm2_file() -> PathBuf {
    std::env::var_os("FLOTILLA_SMOLLM2")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))
}
