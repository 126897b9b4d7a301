//! Flotilla's libtorch side: the one crate (with the binaries above it) that links libtorch.
//!
//! - [`tensor`]: wire tensors to and from tch tensors, and the sink through which the streaming
//!   frame decoder writes an update straight into tensor storage.
//! - [`adapter`]: a LoRA adapter (PEFT naming), rank slicing and safetensors I/O; [`peft_lora`]:
//!   the plain LoRA that stands for an adapter with merged deltas, for PEFT.
//! - [`aggregate`]: the online aggregation methods (one file each) behind a single streaming trait.
//! - [`model`]: the LoRA models trained on devices and evaluated by the coordinator; [`data`]: datasets.

pub mod adapter;
pub mod aggregate;
pub use flotilla_data::cache;
pub mod data;
/// The GGUF reader, for the decoder's callers.
pub use flotilla_gguf as gguf;
pub mod model;
pub mod peft_lora;
pub mod tensor;
