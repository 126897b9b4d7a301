//! The CA and the kits it issues.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::identity::{device_uri, validate_device_id};

pub const DEFAULT_CA_DAYS: u32 = 365;
pub const DEFAULT_COORDINATOR_DAYS: u32 = 90;
pub const DEFAULT_DEVICE_DAYS: u32 = 30;
/// Certificates start this long in the past: phone clocks drift.
const CLOCK_SKEW: Duration = Duration::minutes(5);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: registry is not valid JSON: {source}")]
    Registry {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub kind: String,
    pub id: String,
    pub serial: String,
    pub not_after: String,
    pub kit: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokedCertificate {
    pub id: String,
    pub serial: String,
    pub revoked_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Registry {
    pub next_serial: u64,
    pub issued: Vec<IssuedCertificate>,
    #[serde(default)]
    pub revoked: Vec<RevokedCertificate>,
    #[serde(default)]
    pub crl_number: u64,
}

/// Validity of each CRL; `revoke` re-signs it.
const CRL_DAYS: i64 = 30;

pub struct CoordinatorRequest<'a> {
    pub name: &'a str,
    /// Extra subject alternative names: DNS names or IP addresses.
    pub sans: &'a [String],
    pub days: u32,
}

pub struct DeviceRequest<'a> {
    pub id: &'a str,
    pub days: u32,
}

/// A PKI directory with an initialised CA.
pub struct Pki {
    root: PathBuf,
}

impl Pki {
    pub fn ca_cert_path(root: &Path) -> PathBuf {
        root.join("ca").join("ca.crt")
    }

    fn ca_key_path(root: &Path) -> PathBuf {
        root.join("ca").join("ca.key")
    }

    /// The certificate revocation list the coordinator loads (`[tls] crl`).
    pub fn crl_path(root: &Path) -> PathBuf {
        root.join("crl.pem")
    }

    fn registry_path(&self) -> PathBuf {
        self.root.join("registry.json")
    }

    pub fn kit_dir(&self, name: &str) -> PathBuf {
        self.root.join("kits").join(name)
    }

    /// Creates a new CA (ECDSA P-256) in `root`. Refuses to overwrite an existing one.
    pub fn init(root: &Path, common_name: &str, days: u32) -> Result<Pki, PkiError> {
        let cert_path = Self::ca_cert_path(root);
        if cert_path.exists() {
            return Err(PkiError::Invalid(format!(
                "{}: a CA already exists here; use another directory or remove it first",
                cert_path.display()
            )));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, days);
        params.serial_number = Some(SerialNumber::from_slice(&[1]));
        let cert = params.self_signed(&key)?;

        let ca_dir = root.join("ca");
        fs::create_dir_all(&ca_dir).map_err(io_err(&ca_dir))?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        write_file(&Self::ca_key_path(root), key.serialize_pem().as_bytes(), 0o600)?;
        let pki = Pki { root: root.to_path_buf() };
        let mut registry = Registry { next_serial: 2, ..Registry::default() };
        pki.write_crl(&mut registry)?;
        pki.save_registry(&registry)?;
        Ok(pki)
    }

    pub fn open(root: &Path) -> Result<Pki, PkiError> {
        let cert_path = Self::ca_cert_path(root);
        if !cert_path.exists() {
            return Err(PkiError::Invalid(format!(
                "{}: no CA here; run `flotilla-certs --dir {} init` first",
                root.display(),
                root.display()
            )));
        }
        Ok(Pki { root: root.to_path_buf() })
    }

    pub fn registry(&self) -> Result<Registry, PkiError> {
        let path = self.registry_path();
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text).map_err(|source| PkiError::Registry { path, source })
    }

    fn save_registry(&self, registry: &Registry) -> Result<(), PkiError> {
        let path = self.registry_path();
        let text = serde_json::to_string_pretty(registry)
            .map_err(|e| PkiError::Invalid(format!("cannot encode registry: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        write_file(&tmp, text.as_bytes(), 0o644)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, PkiError> {
        let key_path = Self::ca_key_path(&self.root);
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| PkiError::Invalid(format!("{}: not a valid key: {e}", key_path.display())))?;
        let cert_path = Self::ca_cert_path(&self.root);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| PkiError::Invalid(format!("{}: not a valid CA certificate: {e}", cert_path.display())))
    }

    /// Revokes a device's certificate: it is listed in a freshly signed `crl.pem`, which a running
    /// coordinator reloads without a restart.
    pub fn revoke(&self, id: &str) -> Result<RevokedCertificate, PkiError> {
        let mut registry = self.registry()?;
        let issued = registry
            .issued
            .iter()
            .rev()
            .find(|c| c.kind == "device" && c.id == id)
            .ok_or_else(|| PkiError::Invalid(format!("no device certificate with id '{id}' was issued by this CA")))?
            .clone();
        if registry.revoked.iter().any(|r| r.serial == issued.serial) {
            return Err(PkiError::Invalid(format!("device '{id}' (serial {}) is already revoked", issued.serial)));
        }
        let entry = RevokedCertificate {
            id: id.to_string(),
            serial: issued.serial,
            revoked_at: OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
        };
        registry.revoked.push(entry.clone());
        self.write_crl(&mut registry)?;
        self.save_registry(&registry)?;
        Ok(entry)
    }

    /// Signs the CRL of every revoked serial and writes it atomically (a reader never sees half).
    fn write_crl(&self, registry: &mut Registry) -> Result<(), PkiError> {
        registry.crl_number += 1;
        let now = OffsetDateTime::now_utc();
        let revoked_certs = registry
            .revoked
            .iter()
            .map(|r| {
                let serial = u64::from_str_radix(&r.serial, 16)
                    .map_err(|_| PkiError::Invalid(format!("registry: bad serial '{}' for '{}'", r.serial, r.id)))?;
                Ok(rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial.to_be_bytes()),
                    revocation_time: now,
                    reason_code: Some(rcgen::RevocationReason::Unspecified),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - CLOCK_SKEW,
            next_update: now + Duration::days(CRL_DAYS),
            crl_number: SerialNumber::from_slice(&registry.crl_number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer()?)?;
        let path = Self::crl_path(&self.root);
        let tmp = path.with_extension("pem.tmp");
        write_file(&tmp, crl.pem()?.as_bytes(), 0o644)?;
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Issues the coordinator's server certificate; SANs always include `name`, `localhost` and
    /// 127.0.0.1 so a local run works out of the box.
    pub fn issue_coordinator(&self, request: &CoordinatorRequest) -> Result<IssuedCertificate, PkiError> {
        let mut sans: Vec<String> = vec![request.name.to_string()];
        for extra in ["localhost", "127.0.0.1"].iter().map(|s| s.to_string()).chain(request.sans.iter().cloned()) {
            if !sans.contains(&extra) {
                sans.push(extra);
            }
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(request.name);
        params.subject_alt_names = sans.iter().map(|s| parse_san(s)).collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue("coordinator", "coordinator", params, request.days)
    }

    /// Issues a device's client certificate, its id in a URI SAN.
    pub fn issue_device(&self, request: &DeviceRequest) -> Result<IssuedCertificate, PkiError> {
        validate_device_id(request.id).map_err(PkiError::Invalid)?;
        let registry = self.registry()?;
        if registry.issued.iter().any(|c| c.kind == "device" && c.id == request.id) {
            return Err(PkiError::Invalid(format!(
                "device '{}' already has a certificate; each id is issued once",
                request.id
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(request.id);
        let uri = device_uri(request.id)
            .try_into()
            .map_err(|e| PkiError::Invalid(format!("device id '{}': {e}", request.id)))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue("device", request.id, params, request.days)
    }

    fn issue(
        &self,
        kind: &str,
        id: &str,
        mut params: CertificateParams,
        days: u32,
    ) -> Result<IssuedCertificate, PkiError> {
        let issuer = self.issuer()?;
        let mut registry = self.registry()?;
        let serial = registry.next_serial;
        registry.next_serial += 1;
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, days);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &issuer)?;

        let kit = self.kit_dir(id);
        fs::create_dir_all(&kit).map_err(io_err(&kit))?;
        let ca_pem = fs::read(Self::ca_cert_path(&self.root)).map_err(io_err(&self.root))?;
        write_file(&kit.join("ca.crt"), &ca_pem, 0o644)?;
        write_file(&kit.join("cert.pem"), cert.pem().as_bytes(), 0o644)?;
        write_file(&kit.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;

        let record = IssuedCertificate {
            kind: kind.to_string(),
            id: id.to_string(),
            serial: format!("{serial:x}"),
            not_after: params.not_after.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
            kit,
        };
        registry.issued.push(record.clone());
        self.save_registry(&registry)?;
        Ok(record)
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Flotilla");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::days(i64::from(days));
}

fn parse_san(value: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let name = value
        .to_string()
        .try_into()
        .map_err(|e| PkiError::Invalid(format!("subject alternative name '{value}': {e}")))?;
    Ok(SanType::DnsName(name))
}

/// Writes a file with the given mode, creating it with that mode from the start so a private key is
/// never readable by others, even briefly.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io_err(path))?;
    file.write_all(contents).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_then_issue_writes_kits_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), "test CA", 10).unwrap();
        let mode = fs::metadata(dir.path().join("ca/ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        pki.issue_coordinator(&CoordinatorRequest { name: "coord", sans: &[], days: 5 }).unwrap();
        let dev = pki.issue_device(&DeviceRequest { id: "phone-1", days: 5 }).unwrap();
        assert_eq!(dev.serial, "3");
        for file in ["ca.crt", "cert.pem", "key.pem"] {
            assert!(pki.kit_dir("phone-1").join(file).exists(), "{file}");
        }
        let mode = fs::metadata(pki.kit_dir("phone-1").join("key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let registry = pki.registry().unwrap();
        assert_eq!(registry.issued.len(), 2);
    }

    #[test]
    fn refuses_second_ca_duplicate_ids_and_bad_ids() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), "test CA", 10).unwrap();
        assert!(Pki::init(dir.path(), "again", 10).is_err());
        pki.issue_device(&DeviceRequest { id: "d1", days: 1 }).unwrap();
        let err = pki.issue_device(&DeviceRequest { id: "d1", days: 1 }).unwrap_err();
        assert!(err.to_string().contains("already has a certificate"), "{err}");
        for bad in ["", "a/b", "coordinator", "a.b"] {
            assert!(pki.issue_device(&DeviceRequest { id: bad, days: 1 }).is_err(), "{bad}");
        }
    }

    #[test]
    fn revocation_lists_the_serial_in_a_signed_crl() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::init(dir.path(), "test CA", 10).unwrap();
        let empty = fs::read_to_string(Pki::crl_path(dir.path())).unwrap();
        assert!(empty.contains("BEGIN X509 CRL"));
        pki.issue_device(&DeviceRequest { id: "lost-phone", days: 5 }).unwrap();
        let revoked = pki.revoke("lost-phone").unwrap();
        assert_eq!(revoked.serial, "2");
        let pem = fs::read(Pki::crl_path(dir.path())).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der.contents).unwrap();
        let serials: Vec<u64> =
            crl.iter_revoked_certificates().map(|r| r.user_certificate.to_u64_digits()[0]).collect();
        assert_eq!(serials, vec![2]);
        assert!(pki.revoke("lost-phone").unwrap_err().to_string().contains("already revoked"));
        assert!(pki.revoke("nobody").unwrap_err().to_string().contains("no device certificate"));
    }

    #[test]
    fn open_without_ca_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = Pki::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("init"), "{err}");
    }
}
