//! Mutual TLS for QUIC: rustls configurations built with the ring provider only, and the device
//! identity read from a peer certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::DEVICE_URI_PREFIX;
use crate::protocol::ALPN;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("peer certificate: {0}")]
    PeerCertificate(String),
}

/// A participant's credential kit on disk: CA certificate, own certificate chain and private key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KitPaths {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl KitPaths {
    /// The standard file names inside a kit directory written by `flotilla-certs`.
    pub fn in_dir(dir: &Path) -> KitPaths {
        KitPaths { ca_cert: dir.join("ca.crt"), cert: dir.join("cert.pem"), key: dir.join("key.pem") }
    }

    /// The kit's directory (where its certificate is).
    pub fn dir(&self) -> &Path {
        self.cert.parent().unwrap_or(Path::new("."))
    }
}

struct LoadedKit {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load_kit(kit: &KitPaths) -> Result<LoadedKit, TlsError> {
    let file_err = |path: &Path, message: String| TlsError::File { path: path.to_path_buf(), message };
    let read_certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>, TlsError> {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| file_err(path, format!("cannot read certificates: {e}")))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| file_err(path, format!("not a valid PEM certificate: {e}")))?;
        if certs.is_empty() {
            return Err(file_err(path, "contains no certificate".into()));
        }
        Ok(certs)
    };
    let mut roots = RootCertStore::empty();
    for ca in read_certs(&kit.ca_cert)? {
        roots.add(ca).map_err(|e| file_err(&kit.ca_cert, format!("not a usable CA certificate: {e}")))?;
    }
    let chain = read_certs(&kit.cert)?;
    check_key_mode(&kit.key)?;
    let key = PrivateKeyDer::from_pem_file(&kit.key)
        .map_err(|e| file_err(&kit.key, format!("cannot read the private key: {e}")))?;
    Ok(LoadedKit { roots, chain, key })
}

/// A private key others may read or anyone but its owner may change is refused, with the fix; one
/// its group may read (a Kubernetes secret mounted 0440) is used with a warning.
fn check_key_mode(path: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| TlsError::File { path: path.to_path_buf(), message: format!("cannot read the private key: {e}") })?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o027 != 0 {
        return Err(TlsError::File {
            path: path.to_path_buf(),
            message: format!(
                "the private key has mode {mode:04o}: others may read or change it; run `chmod 600 {}` (kits from \
                 flotilla-certs are written 0600)",
                path.display()
            ),
        });
    }
    if mode & 0o040 != 0 {
        tracing::warn!(key = %path.display(), "the private key is readable by its group (mode {mode:04o})");
    }
    Ok(())
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side: TLS 1.3, a client certificate chaining to the kit's CA is required, and is refused
/// when it is listed in the revocation list `crl` (PEM, from `flotilla-certs`).
pub fn server_config(kit: &KitPaths, crl: Option<&Path>) -> Result<rustls::ServerConfig, TlsError> {
    let loaded = load_kit(kit)?;
    let provider = provider();
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(loaded.roots), provider.clone());
    if let Some(path) = crl {
        verifier = verifier.with_crls(read_crls(path)?).only_check_end_entity_revocation();
    }
    let verifier = verifier.build().map_err(|e| TlsError::Config(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(loaded.chain, loaded.key)
        .map_err(|e| TlsError::Config(format!("{}: {e}", kit.cert.display())))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The revocation lists in a PEM file, at least one.
fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| TlsError::File { path: path.to_path_buf(), message: format!("cannot read the CRL: {e}") })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::File { path: path.to_path_buf(), message: format!("not a valid PEM CRL: {e}") })?;
    if crls.is_empty() {
        return Err(TlsError::File { path: path.to_path_buf(), message: "contains no CRL".into() });
    }
    Ok(crls)
}

/// The CRL a device kit carries beside its CA certificate (`crl.pem`, from `flotilla-certs`), if
/// any: the coordinator's certificate is checked against it.
pub fn kit_crl(kit: &KitPaths) -> Option<PathBuf> {
    Some(kit.ca_cert.with_file_name("crl.pem")).filter(|path| path.exists())
}

/// Stores `crl_pem` as the kit's `crl.pem` when it is a CRL signed by the kit's CA and newer (by
/// CRL number) than the one the kit holds; returns whether it did. A CRL that does not verify is
/// refused, so a coordinator cannot make a device forget a revocation with an older or forged one.
pub fn refresh_kit_crl(kit: &KitPaths, crl_pem: &str) -> Result<bool, TlsError> {
    use x509_parser::revocation_list::CertificateRevocationList;
    let path = kit.ca_cert.with_file_name("crl.pem");
    let invalid = |message: String| TlsError::File { path: path.clone(), message };
    let offered = CertificateRevocationListDer::from_pem_slice(crl_pem.as_bytes())
        .map_err(|e| invalid(format!("the offered CRL is not PEM: {e}")))?;
    let (_, offered_crl) =
        CertificateRevocationList::from_der(&offered).map_err(|e| invalid(format!("the offered CRL: {e}")))?;
    let ca = CertificateDer::from_pem_file(&kit.ca_cert)
        .map_err(|e| TlsError::File { path: kit.ca_cert.clone(), message: format!("cannot read the CA: {e}") })?;
    let (_, ca) = X509Certificate::from_der(&ca)
        .map_err(|e| TlsError::File { path: kit.ca_cert.clone(), message: format!("not a certificate: {e}") })?;
    offered_crl
        .verify_signature(ca.public_key())
        .map_err(|e| invalid(format!("the offered CRL is not signed by this kit's CA: {e}")))?;
    let number = |crl: &CertificateRevocationList| crl.crl_number().cloned().unwrap_or_default();
    if let Some(held) = kit_crl(kit) {
        let held_der = read_crls(&held)?.remove(0);
        if let Ok((_, held_crl)) = CertificateRevocationList::from_der(&held_der) {
            if held_crl.verify_signature(ca.public_key()).is_ok() && number(&held_crl) >= number(&offered_crl) {
                return Ok(false);
            }
        }
    }
    crate::files::write_atomically(&path, crl_pem.as_bytes()).map_err(|e| invalid(e.to_string()))?;
    Ok(true)
}

/// Client side: trusts only the kit's CA (no system roots), refuses a coordinator certificate the
/// kit's CRL lists, and presents the kit's certificate.
pub fn client_config(kit: &KitPaths) -> Result<rustls::ClientConfig, TlsError> {
    let loaded = load_kit(kit)?;
    let roots = Arc::new(loaded.roots);
    let mut verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider());
    if let Some(path) = kit_crl(kit) {
        // A CRL from another CA than the coordinator's says nothing about it: not a revocation.
        verifier =
            verifier.with_crls(read_crls(&path)?).only_check_end_entity_revocation().allow_unknown_revocation_status();
    }
    let verifier = verifier.build().map_err(|e| TlsError::Config(format!("server verifier: {e}")))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(loaded.chain, loaded.key)
        .map_err(|e| TlsError::Config(format!("{}: {e}", kit.cert.display())))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The device id in a certificate's `urn:flotilla:device:<id>` URI SAN.
pub fn device_id_from_certificate(der: &[u8]) -> Result<String, TlsError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| TlsError::PeerCertificate(format!("cannot parse: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::PeerCertificate(format!("bad subjectAltName: {e}")))?
        .ok_or_else(|| TlsError::PeerCertificate("no subjectAltName".into()))?;
    let mut ids = san.value.general_names.iter().filter_map(|name| match name {
        GeneralName::URI(uri) => uri.strip_prefix(DEVICE_URI_PREFIX),
        _ => None,
    });
    let id = ids.next().ok_or_else(|| {
        TlsError::PeerCertificate("no device identity (urn:flotilla:device:) in subjectAltName".into())
    })?;
    if ids.next().is_some() {
        return Err(TlsError::PeerCertificate("more than one device identity".into()));
    }
    Ok(id.to_string())
}

/// When a certificate stops being valid.
pub fn certificate_not_after(der: &[u8]) -> Result<std::time::SystemTime, TlsError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| TlsError::PeerCertificate(format!("cannot parse: {e}")))?;
    let seconds = cert.validity().not_after.timestamp();
    let seconds = u64::try_from(seconds).map_err(|_| TlsError::PeerCertificate("expires before 1970".into()))?;
    Ok(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
}

/// When the certificate in a kit stops being valid.
pub fn own_certificate_not_after(kit: &KitPaths) -> Result<std::time::SystemTime, TlsError> {
    let cert = CertificateDer::from_pem_file(&kit.cert)
        .map_err(|e| TlsError::File { path: kit.cert.clone(), message: format!("not a PEM certificate: {e}") })?;
    certificate_not_after(&cert).map_err(|e| TlsError::File { path: kit.cert.clone(), message: e.to_string() })
}

/// The device id in the certificate of a kit (the identity this device must claim in its Hello).
pub fn own_device_id(kit: &KitPaths) -> Result<String, TlsError> {
    let cert = CertificateDer::from_pem_file(&kit.cert)
        .map_err(|e| TlsError::File { path: kit.cert.clone(), message: format!("not a PEM certificate: {e}") })?;
    device_id_from_certificate(&cert)
        .map_err(|e| TlsError::File { path: kit.cert.clone(), message: format!("not a device certificate: {e}") })
}

/// The serial of the certificate in a kit, as [`certificate_serial`] writes it.
pub fn own_certificate_serial(kit: &KitPaths) -> Result<String, TlsError> {
    let cert = CertificateDer::from_pem_file(&kit.cert)
        .map_err(|e| TlsError::File { path: kit.cert.clone(), message: format!("not a PEM certificate: {e}") })?;
    certificate_serial(&cert).map_err(|e| TlsError::File { path: kit.cert.clone(), message: e.to_string() })
}

/// The device bound to an authenticated QUIC connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerDevice {
    pub id: String,
    /// When its certificate stops being valid.
    pub not_after: std::time::SystemTime,
    /// Its certificate's serial, in lowercase hex without leading zeros (as the CA's registry and
    /// [`revoked_serials`] write it).
    pub serial: String,
    /// Its certificate (DER), relayed to its secure aggregation peers with its signed keys.
    pub certificate: Vec<u8>,
}

/// The device bound to an authenticated QUIC connection: its id, expiry and serial.
pub fn peer_device(connection: &quinn::Connection) -> Result<PeerDevice, TlsError> {
    let identity =
        connection.peer_identity().ok_or_else(|| TlsError::PeerCertificate("peer presented no certificate".into()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::PeerCertificate("unexpected peer identity type".into()))?;
    let leaf = chain.first().ok_or_else(|| TlsError::PeerCertificate("empty certificate chain".into()))?;
    Ok(PeerDevice {
        id: device_id_from_certificate(leaf)?,
        not_after: certificate_not_after(leaf)?,
        serial: certificate_serial(leaf)?,
        certificate: leaf.to_vec(),
    })
}

/// A certificate's serial in lowercase hex without leading zeros.
pub fn certificate_serial(der: &[u8]) -> Result<String, TlsError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| TlsError::PeerCertificate(format!("cannot parse: {e}")))?;
    Ok(format!("{:x}", cert.serial))
}

/// The serials a PEM revocation list (from `flotilla-certs`) lists, in the form of
/// [`certificate_serial`]. Its signature is checked where it is used for handshakes
/// ([`server_config`]); this only reads it, to close sessions it revokes.
pub fn revoked_serials(path: &Path) -> Result<std::collections::BTreeSet<String>, TlsError> {
    let file_err = |message: String| TlsError::File { path: path.to_path_buf(), message };
    let mut serials = std::collections::BTreeSet::new();
    for crl in
        CertificateRevocationListDer::pem_file_iter(path).map_err(|e| file_err(format!("cannot read the CRL: {e}")))?
    {
        let crl = crl.map_err(|e| file_err(format!("not a valid PEM CRL: {e}")))?;
        let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(&crl)
            .map_err(|e| file_err(format!("not a valid CRL: {e}")))?;
        serials.extend(parsed.iter_revoked_certificates().map(|r| format!("{:x}", r.user_certificate)));
    }
    Ok(serials)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_others_may_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, b"not read").unwrap();
        for (mode, allowed) in
            [(0o600, true), (0o400, true), (0o640, true), (0o644, false), (0o660, false), (0o666, false)]
        {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let checked = check_key_mode(&key);
            assert_eq!(checked.is_ok(), allowed, "mode {mode:o}: {checked:?}");
            if let Err(error) = checked {
                assert!(error.to_string().contains("chmod 600"), "{error}");
            }
        }
    }

    #[test]
    fn a_kit_takes_only_a_newer_crl_signed_by_its_own_ca() {
        use rcgen::{BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, Issuer, KeyPair};
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let pem = params.self_signed(&key).unwrap().pem();
            (Issuer::new(params, key), pem)
        };
        let crl = |issuer: &Issuer<'static, KeyPair>, number: u64| {
            let now = time::OffsetDateTime::now_utc();
            CertificateRevocationListParams {
                this_update: now,
                next_update: now + time::Duration::days(30),
                crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
                issuing_distribution_point: None,
                revoked_certs: Vec::new(),
                key_identifier_method: rcgen::KeyIdMethod::Sha256,
            }
            .signed_by(issuer)
            .unwrap()
            .pem()
            .unwrap()
        };
        let (fleet, fleet_pem) = ca("fleet");
        let (rogue, _) = ca("rogue");
        let dir = tempfile::tempdir().unwrap();
        let kit = KitPaths::in_dir(dir.path());
        std::fs::write(&kit.ca_cert, &fleet_pem).unwrap();
        let (first, second) = (crl(&fleet, 1), crl(&fleet, 2));
        assert!(refresh_kit_crl(&kit, &second).unwrap(), "a kit without a CRL takes one from its CA");
        assert!(!refresh_kit_crl(&kit, &first).unwrap(), "an older CRL is not taken");
        assert!(!refresh_kit_crl(&kit, &second).unwrap(), "nor the same one again");
        let forged = refresh_kit_crl(&kit, &crl(&rogue, 9)).unwrap_err().to_string();
        assert!(forged.contains("not signed by this kit's CA"), "{forged}");
        assert_eq!(std::fs::read_to_string(kit_crl(&kit).unwrap()).unwrap(), second);
        assert!(refresh_kit_crl(&kit, &crl(&fleet, 3)).unwrap());
    }
}
