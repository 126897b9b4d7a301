//! Provisioning for Flotilla: a certificate authority, the coordinator's credentials and one
//! credential kit per device.
//!
//! Layout of a PKI directory:
//!
//! ```text
//! <pki>/ca/ca.crt              the CA certificate (public; copied into every kit)
//! <pki>/ca/ca.key              the CA private key (mode 0600; never leaves this directory)
//! <pki>/registry.json          every certificate issued: kind, id, serial, expiry; revocations
//! <pki>/crl.pem                the signed revocation list the coordinator loads
//! <pki>/kits/<name>/           one self-contained kit per participant:
//!     ca.crt, cert.pem, key.pem (0600)
//! ```
//!
//! A device's identity is carried in a URI SAN `urn:flotilla:device:<id>`; the coordinator binds a
//! session to it (see `flotilla_common::tls::device_identity`).

mod identity;
mod pki;

pub use identity::{device_uri, validate_device_id, DEVICE_URI_PREFIX};
pub use pki::{
    CoordinatorRequest, DeviceRequest, IssuedCertificate, Pki, PkiError, Registry, RevokedCertificate, DEFAULT_CA_DAYS,
    DEFAULT_COORDINATOR_DAYS, DEFAULT_DEVICE_DAYS,
};
