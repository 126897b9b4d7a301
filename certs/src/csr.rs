//! Certificate signing requests: the device makes its key and a request (the private key never
//! leaves it), the CA signs the request, the device installs the certificate. Renewal is the same
//! exchange with a fresh key while the old certificate keeps working.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::PkiError;
use crate::files::write_file;
use crate::identity::{device_uri, validate_device_id, DEVICE_URI_PREFIX};
use crate::kit::{self, Placement};
use crate::subject::dn;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

/// Device side: a new key (`pending-key.pem`, 0600) and `request.csr` for `id` in `kit_dir`.
pub fn request(kit_dir: &Path, id: &str, placement: &Placement) -> Result<PathBuf, PkiError> {
    validate_device_id(id).map_err(PkiError::Invalid)?;
    fs::create_dir_all(kit_dir).map_err(io(kit_dir))?;
    let path = write_request(kit_dir, id)?;
    write_file(&kit_dir.join(kit::DEVICE_SNIPPET), kit::device_snippet(placement).as_bytes(), 0o644)?;
    let readme = kit::readme(
        "device",
        id,
        "certificate pending: have the CA sign request.csr, then `flotilla-certs install`",
        placement,
    );
    write_file(&kit_dir.join(kit::README), readme.as_bytes(), 0o644)?;
    Ok(path)
}

/// Device side: a request with a fresh key for the id in the kit's current certificate, which stays
/// in use until the new one is installed. Returns the id and the request's path.
pub fn renew(kit_dir: &Path) -> Result<(String, PathBuf), PkiError> {
    let cert_path = kit_dir.join(kit::CERT);
    let pem = fs::read(&cert_path).map_err(io(&cert_path))?;
    let info =
        crate::inspect::describe_pem(&pem).map_err(|e| PkiError::Invalid(format!("{}: {e}", cert_path.display())))?;
    if info.kind != "device" {
        return Err(PkiError::Invalid(format!("{}: not a device certificate", cert_path.display())));
    }
    let path = write_request(kit_dir, &info.id)?;
    Ok((info.id, path))
}

fn write_request(kit_dir: &Path, id: &str) -> Result<PathBuf, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(id);
    params.subject_alt_names =
        vec![SanType::URI(device_uri(id).try_into().map_err(|e| PkiError::Invalid(format!("device id '{id}': {e}")))?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let csr = params.serialize_request(&key)?;
    write_file(&kit_dir.join(kit::PENDING_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    let path = kit_dir.join(kit::REQUEST);
    write_file(&path, csr.pem()?.as_bytes(), 0o644)?;
    Ok(path)
}

/// CA side: the device id a request asks for, after checking everything in it. The CA signs only
/// the public key and this id; anything else a request asks for is refused, not ignored.
pub fn requested_device_id(csr: &CertificateSigningRequestParams) -> Result<String, PkiError> {
    let params = &csr.params;
    if !matches!(params.is_ca, IsCa::NoCa | IsCa::ExplicitNoCa) {
        return Err(PkiError::Invalid("the request asks for a CA certificate".into()));
    }
    if params.extended_key_usages.iter().any(|u| *u != ExtendedKeyUsagePurpose::ClientAuth) {
        return Err(PkiError::Invalid(format!(
            "the request asks for usages {:?}; device certificates are for client authentication only",
            params.extended_key_usages
        )));
    }
    let mut ids = Vec::new();
    for san in &params.subject_alt_names {
        match san {
            SanType::URI(uri) if uri.as_str().starts_with(DEVICE_URI_PREFIX) => {
                ids.push(uri.as_str()[DEVICE_URI_PREFIX.len()..].to_string())
            }
            other => {
                return Err(PkiError::Invalid(format!(
                    "the request names {other:?}; a device request may carry only its {DEVICE_URI_PREFIX}<id> URI"
                )))
            }
        }
    }
    let id = match ids.as_slice() {
        [id] => id.clone(),
        [] => return Err(PkiError::Invalid(format!("the request carries no {DEVICE_URI_PREFIX}<id> URI"))),
        _ => return Err(PkiError::Invalid("the request carries more than one device id".into())),
    };
    validate_device_id(&id).map_err(|e| PkiError::Invalid(format!("the request is refused: {e}")))?;
    Ok(id)
}

/// Device side: checks that `cert_pem` chains to the kit's CA, is valid now, is for client
/// authentication, and matches the pending key; then makes that key and certificate the kit's.
pub fn install(kit_dir: &Path, cert_path: &Path, ca_path: Option<&Path>) -> Result<String, PkiError> {
    // Without --ca: the kit's own CA certificate, or the one `sign` wrote beside the certificate.
    let beside = cert_path.with_file_name(kit::CA_CERT);
    let ca_path = match ca_path {
        Some(path) => path.to_path_buf(),
        None if kit_dir.join(kit::CA_CERT).exists() => kit_dir.join(kit::CA_CERT),
        None if beside.exists() => beside,
        None => {
            return Err(PkiError::Invalid(format!(
                "no CA certificate: {} has no {} and there is none beside {}; pass --ca with the {} `sign` wrote",
                kit_dir.display(),
                kit::CA_CERT,
                cert_path.display(),
                kit::CA_CERT
            )))
        }
    };
    let ca_pem = fs::read(&ca_path).map_err(io(&ca_path))?;
    let cert_pem = fs::read(cert_path).map_err(io(cert_path))?;
    let cert = CertificateDer::from_pem_slice(&cert_pem)
        .map_err(|e| PkiError::Invalid(format!("{}: not a PEM certificate: {e}", cert_path.display())))?;
    let ca = CertificateDer::from_pem_slice(&ca_pem)
        .map_err(|e| PkiError::Invalid(format!("{}: not a PEM certificate: {e}", ca_path.display())))?;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| PkiError::Invalid(format!("{}: not a usable CA: {e}", ca_path.display())))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
        .build()
        .map_err(|e| PkiError::Invalid(format!("cannot build a verifier: {e}")))?;
    verifier.verify_client_cert(&cert, &[], UnixTime::now()).map_err(|e| {
        PkiError::Invalid(format!("{}: not a valid device certificate from this CA: {e}", cert_path.display()))
    })?;

    let pending = kit_dir.join(kit::PENDING_KEY);
    let key_pem = fs::read_to_string(&pending).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => PkiError::Invalid(format!(
            "{}: no pending key; run `flotilla-certs request` or `renew` for this kit first",
            pending.display()
        )),
        _ => PkiError::Io { path: pending.clone(), source: e },
    })?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| PkiError::Invalid(format!("{}: not a valid key: {e}", pending.display())))?;
    let (_, parsed) =
        X509Certificate::from_der(&cert).map_err(|e| PkiError::Invalid(format!("{}: {e}", cert_path.display())))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(PkiError::Invalid(format!(
            "{}: the certificate is for another key than {}; sign this kit's request.csr",
            cert_path.display(),
            pending.display()
        )));
    }
    let id = crate::inspect::describe_der(&cert)?.id;

    // Key first, then certificate: each rename is atomic; a daemon that loads the kit between the
    // two sees a mismatch, fails its handshake and retries.
    if ca_path != kit_dir.join(kit::CA_CERT) {
        write_file(&kit_dir.join(kit::CA_CERT), &ca_pem, 0o644)?;
    }
    let key_path = kit_dir.join(kit::KEY);
    flotilla_wire::files::commit(&pending, &key_path).map_err(io(&key_path))?;
    let tmp = kit_dir.join("cert.pem.tmp");
    write_file(&tmp, &cert_pem, 0o644)?;
    let final_path = kit_dir.join(kit::CERT);
    flotilla_wire::files::commit(&tmp, &final_path).map_err(io(&final_path))?;
    let _ = fs::remove_file(kit_dir.join(kit::REQUEST));
    Ok(id)
}
