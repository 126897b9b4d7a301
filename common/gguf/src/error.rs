//! What can be wrong with a GGUF file, each with enough context to fix it.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("not a GGUF file: it starts with {found:?}, not \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    UnsupportedVersion(u32),
    #[error("the file ends early: {what} needs {needed} bytes at offset {offset}, and the file has {len}")]
    Truncated { what: String, offset: u64, needed: u64, len: u64 },
    #[error("{what} is {value}, more than the limit of {limit}")]
    OverLimit { what: String, value: u64, limit: u64 },
    #[error("metadata key {key:?}: {problem}")]
    BadMetadata { key: String, problem: String },
    #[error("metadata value type {0} is unknown")]
    UnknownValueType(u32),
    #[error("tensor {name:?}: {problem}")]
    BadTensor { name: String, problem: String },
    #[error("tensor {name:?} has quantization type {kind}, which Flotilla does not read (it reads F32, F16, Q4_0, Q4_1, Q8_0)")]
    UnsupportedTensorType { name: String, kind: u32 },
    #[error("the file has no tensor named {0:?}")]
    MissingTensor(String),
    #[error("the file has no metadata key {0:?}")]
    MissingMetadata(String),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(String),
}

pub type Result<T> = std::result::Result<T, GgufError>;
