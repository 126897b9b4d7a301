//! Flotilla's shared core.
//!
//! - [`protocol`]: the messages devices and the coordinator exchange; [`framing`]: how a message and
//!   its tensors are laid out on a QUIC stream, with every length bounded.
//! - [`tensor`]: raw tensors as they travel; [`adapter`]: a LoRA adapter (PEFT naming), rank slicing
//!   and safetensors I/O.
//! - [`aggregate`]: the aggregation methods (one file each) behind a single streaming trait.
//! - [`model`]: the LoRA models trained on devices and evaluated by the coordinator; [`data`]: datasets.
//! - [`tls`] and [`quic`]: mutual-TLS configuration and QUIC endpoints.

pub mod adapter;
pub mod aggregate;
pub mod data;
pub mod fault;
pub mod fingerprint;
pub mod framing;
pub mod logging;
pub mod model;
pub mod protocol;
pub mod quic;
pub mod tensor;
pub mod tls;
