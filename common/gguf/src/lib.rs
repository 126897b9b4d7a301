//! GGUF, the llama.cpp model file, read without libtorch: the header, the metadata, the tensor
//! infos and the tensors dequantized to f32 (F32, F16, Q4_0, Q4_1, Q8_0); a Llama decoder's shape
//! and HF tensor names from its metadata; and its tokenizer as an HF `tokenizer.json` document.
//!
//! Written here rather than taken from a crate: the GGUF crates on crates.io either read no tensor
//! data or come inside a whole inference framework, and a model file is untrusted input, so this
//! reader bounds every count and length by limits and by the file's size before allocating, and
//! fails with an error that names the problem (fuzzed: `fuzz/fuzz_targets/gguf_header.rs`).

pub mod chat;
pub mod dequant;
pub mod error;
pub mod file;
pub mod llama;
pub mod parse;
pub mod tensor;
pub mod tiny;
pub mod tokenizer;
pub mod value;
pub mod write;

pub use chat::{ChatMessage, ChatTemplate};
pub use dequant::{dequantize_into, quantize};
pub use error::{GgufError, Result};
pub use file::{DenseTensor, GgufFile};
pub use llama::{LlamaSpec, Q4Parts};
pub use parse::{parse_header, Header};
pub use tensor::{TensorInfo, TensorType};
pub use tokenizer::{tokenizer_json, SpecialTokens};
pub use value::{Metadata, Value};
pub use write::{write_gguf, TensorToWrite};
