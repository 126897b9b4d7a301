//! Flotilla's wire: everything two parties need to talk, and nothing that needs libtorch.
//!
//! - [`protocol`]: the messages devices and the coordinator exchange; [`framing`]: how a message and
//!   its tensors are laid out on a QUIC stream, every length bounded, decoded by one streaming
//!   decoder that writes tensor bytes into whatever storage a [`framing::TensorSink`] hands out.
//! - [`evaluation`]: federated evaluation's tasks and the sums devices report; [`secure_evaluation`]:
//!   those sums laid out for a secure sum under secure aggregation.
//! - [`tensor`]: tensor descriptors and raw little-endian bodies.
//! - [`model`]: the model description (architecture, adapted layer shapes) as plain data.
//! - [`tls`], [`quic`], [`identity`]: mutual-TLS configuration (ring only), QUIC endpoints and
//!   transport settings, and how a device identity is written into a certificate; [`signed_keys`]:
//!   secure aggregation key adverts signed with those certificates' keys.
//! - [`logging`], [`crash_test`], [`fingerprint`]: what both daemons share beside the protocol: log
//!   set-up, the crash-test pause hook, and a stable hash for fingerprints and seeds.

pub mod crash_test;
pub mod evaluation;
pub mod files;
pub mod fingerprint;
pub mod framing;
pub mod identity;
pub mod logging;
pub mod model;
pub mod protocol;
pub mod quic;
pub mod secure_evaluation;
pub mod secure_task;
pub mod signed_keys;
pub mod tensor;
pub mod tls;
