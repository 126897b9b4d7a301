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
//! <pki>/issued/<serial>.pem    a copy of every certificate issued
//! <pki>/kits/<name>/           one self-contained kit per participant:
//!     ca.crt, cert.pem, key.pem (0600), coordinator.toml or edge.env, README.txt
//! ```
//!
//! Devices that make their own key: `request` (device) → `sign` (CA) → `install` (device);
//! `renew` (device) → `sign --renew` (CA) → `install` (device) before the certificate expires.
//!
//! A device's identity is carried in a URI SAN `urn:flotilla:device:<id>`; the coordinator binds a
//! session to it (see `flotilla_wire::tls::device_id_from_certificate`). The prefix and the id rules
//! are defined once, in `flotilla_wire::identity`.

mod ca_key;
pub mod csr;
mod error;
mod files;
pub mod inspect;
pub mod kit;
mod params;
mod pki;
mod subject;

pub use ca_key::read_password_file;
pub use error::PkiError;
pub(crate) use flotilla_wire::identity;
pub use flotilla_wire::identity::{device_uri, validate_device_id, DEVICE_URI_PREFIX};
pub use pki::{
    CoordinatorRequest, DeviceRequest, IssuedCertificate, Pki, Registry, RenewalPolicy, RevokedCertificate,
    DEFAULT_CA_DAYS, DEFAULT_COORDINATOR_DAYS, DEFAULT_DEVICE_DAYS, DEFAULT_DEVICE_VALIDITY, MIN_VALIDITY,
};
