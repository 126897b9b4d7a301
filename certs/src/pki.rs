//! The CA and the kits it issues.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::ca_key::{read_ca_key, write_ca_key};
use crate::error::{io_err, PkiError};
use crate::files::write_file;
use crate::identity::validate_device_id;
use crate::kit::{self, Placement};
pub use crate::params::RenewalPolicy;
use crate::params::{days, describe_span, device_params, parse_san, set_validity, CLOCK_SKEW};
use crate::subject::dn;

pub const DEFAULT_CA_DAYS: u32 = 365;
pub const DEFAULT_COORDINATOR_DAYS: u32 = 90;
pub const DEFAULT_DEVICE_DAYS: u32 = 30;
/// Certificates start this long in the past: phone clocks drift.

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub kind: String,
    pub id: String,
    pub serial: String,
    #[serde(default)]
    pub not_before: String,
    pub not_after: String,
    /// The kit directory (CA-made keys) or where a signed request's certificate was written.
    pub kit: PathBuf,
    /// The serial of the certificate this one renews.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renews: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokedCertificate {
    pub id: String,
    pub serial: String,
    pub revoked_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Registry {
    /// Unused since serials are random; kept so that registries read and write as before.
    pub next_serial: u64,
    pub issued: Vec<IssuedCertificate>,
    #[serde(default)]
    pub revoked: Vec<RevokedCertificate>,
    #[serde(default)]
    pub crl_number: u64,
}

impl Registry {
    /// Whether the certificate of `serial` is on the revocation list.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked.iter().any(|r| r.serial == serial)
    }
}

/// Validity of each CRL; `revoke` re-signs it.
const CRL_DAYS: i64 = 30;

pub struct CoordinatorRequest<'a> {
    pub name: &'a str,
    /// Extra subject alternative names: DNS names or IP addresses.
    pub sans: &'a [String],
    pub days: u32,
    /// Also name `localhost`, 127.0.0.1 and ::1 (a coordinator reached on this machine): opt-in, so
    /// that a stolen coordinator certificate is no good for impersonating a device's loopback.
    pub loopback: bool,
}

pub struct DeviceRequest<'a> {
    pub id: &'a str,
    /// Device certificates are short-lived; for trials they can live minutes.
    pub validity: std::time::Duration,
}

/// The default validity of a device certificate.
pub const DEFAULT_DEVICE_VALIDITY: std::time::Duration =
    std::time::Duration::from_secs(DEFAULT_DEVICE_DAYS as u64 * 86_400);
/// The shortest certificate this CA signs.
pub const MIN_VALIDITY: std::time::Duration = std::time::Duration::from_secs(10);

/// A PKI directory with an initialised CA.
pub struct Pki {
    root: PathBuf,
    password: Option<String>,
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

    /// A copy of every certificate issued, by serial (for `inspect` and audits).
    pub fn issued_path(&self, serial: &str) -> PathBuf {
        self.root.join("issued").join(format!("{serial}.pem"))
    }

    /// Creates a new CA (ECDSA P-256) in `root`; its key is encrypted when a password is given.
    /// Refuses to overwrite an existing CA.
    pub fn init(root: &Path, common_name: &str, days: u32, password: Option<&str>) -> Result<Pki, PkiError> {
        let cert_path = Self::ca_cert_path(root);
        if cert_path.exists() {
            return Err(PkiError::Invalid(format!(
                "{}: a CA already exists here; use another directory or remove it first",
                cert_path.display()
            )));
        }
        if days == 0 {
            return Err(PkiError::Invalid("the CA must be valid for at least one day (--days)".into()));
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        set_validity(&mut params, Duration::days(i64::from(days)));
        params.serial_number = Some(SerialNumber::from_slice(&[1]));
        let cert = params.self_signed(&key)?;

        let ca_dir = root.join("ca");
        fs::create_dir_all(&ca_dir).map_err(io_err(&ca_dir))?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        write_ca_key(&Self::ca_key_path(root), &key, password)?;
        let pki = Pki { root: root.to_path_buf(), password: password.map(str::to_string) };
        let mut registry = Registry { next_serial: 2, ..Registry::default() };
        pki.write_crl(&mut registry)?;
        pki.save_registry(&registry)?;
        Ok(pki)
    }

    /// Opens the CA in `root`; `password` unlocks a password-protected CA key.
    pub fn open(root: &Path, password: Option<String>) -> Result<Pki, PkiError> {
        let cert_path = Self::ca_cert_path(root);
        if !cert_path.exists() {
            return Err(PkiError::Invalid(format!(
                "{}: no CA here; run `flotilla-certs --dir {} init` first",
                root.display(),
                root.display()
            )));
        }
        Ok(Pki { root: root.to_path_buf(), password })
    }

    /// Checks that this CA can sign now: its key opens (with the password) and it has not expired.
    pub fn check_signing(&self) -> Result<(), PkiError> {
        self.issuer().map(|_| ())
    }

    pub fn registry(&self) -> Result<Registry, PkiError> {
        let path = self.registry_path();
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        serde_json::from_str(&text).map_err(|source| PkiError::Registry { path, source })
    }

    /// Writes the registry: a synced temporary file renamed over it, then the directory synced,
    /// so a crash leaves the old registry or the new one. Callers hold [`Pki::lock_registry`].
    fn save_registry(&self, registry: &Registry) -> Result<(), PkiError> {
        let path = self.registry_path();
        let text = serde_json::to_string_pretty(registry)
            .map_err(|e| PkiError::Invalid(format!("cannot encode registry: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        write_file(&tmp, text.as_bytes(), 0o644)?;
        flotilla_wire::files::commit(&tmp, &path).map_err(io_err(&path))
    }

    /// An exclusive lock on the registry, held until the guard drops: every change reads the
    /// registry after taking it, so a `revoke` at the CLI and an online renewal in the coordinator
    /// never write over each other (which could drop a revocation from the next CRL).
    fn lock_registry(&self) -> Result<fs::File, PkiError> {
        let path = self.root.join("registry.lock");
        let file =
            fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
        file.lock().map_err(io_err(&path))?;
        Ok(file)
    }

    fn ca_pem(&self) -> Result<String, PkiError> {
        let cert_path = Self::ca_cert_path(&self.root);
        fs::read_to_string(&cert_path).map_err(io_err(&cert_path))
    }

    /// The CA as an issuer; refused once the CA certificate has expired.
    fn issuer(&self) -> Result<(Issuer<'static, KeyPair>, OffsetDateTime), PkiError> {
        let key = read_ca_key(&Self::ca_key_path(&self.root), self.password.as_deref())?;
        let cert_path = Self::ca_cert_path(&self.root);
        let cert_pem = self.ca_pem()?;
        let info = crate::inspect::describe_pem(cert_pem.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("{}: {e}", cert_path.display())))?;
        let not_after = OffsetDateTime::parse(&info.not_after, &time::format_description::well_known::Rfc3339)
            .map_err(|e| PkiError::Invalid(format!("{}: bad expiry: {e}", cert_path.display())))?;
        if info.expired {
            return Err(PkiError::Invalid(format!(
                "{}: the CA certificate expired on {}; create a new CA (`init` in a new directory) and \
                 re-provision the fleet",
                cert_path.display(),
                info.not_after
            )));
        }
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| PkiError::Invalid(format!("{}: not a valid CA certificate: {e}", cert_path.display())))?;
        Ok((issuer, not_after))
    }

    /// Revokes a device: every certificate issued for `id` that is not revoked yet (an older one
    /// still in its validity would otherwise stay usable), or only the one of `serial`. They are
    /// listed in a freshly signed `crl.pem`, which a running coordinator reloads without a
    /// restart, closing the sessions they opened.
    pub fn revoke(&self, id: &str, serial: Option<&str>) -> Result<Vec<RevokedCertificate>, PkiError> {
        let _lock = self.lock_registry()?;
        let mut registry = self.registry()?;
        let issued: Vec<&IssuedCertificate> = registry
            .issued
            .iter()
            .filter(|c| {
                (c.kind == "device" || id == "coordinator") && c.id == id && serial.is_none_or(|s| c.serial == s)
            })
            .collect();
        if issued.is_empty() {
            return Err(PkiError::Invalid(match serial {
                None => format!("no device certificate with id '{id}' was issued by this CA"),
                Some(serial) => format!("no device certificate of '{id}' has serial {serial}"),
            }));
        }
        let revoked_at =
            OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let entries: Vec<RevokedCertificate> = issued
            .iter()
            .filter(|c| !registry.is_revoked(&c.serial))
            .map(|c| RevokedCertificate {
                id: id.to_string(),
                serial: c.serial.clone(),
                revoked_at: revoked_at.clone(),
            })
            .collect();
        if entries.is_empty() {
            let serials: Vec<&str> = issued.iter().map(|c| c.serial.as_str()).collect();
            return Err(PkiError::Invalid(format!("device '{id}' is already revoked (serial {})", serials.join(", "))));
        }
        registry.revoked.extend(entries.iter().cloned());
        self.write_crl(&mut registry)?;
        self.save_registry(&registry)?;
        Ok(entries)
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
        let crl = params.signed_by(&self.issuer()?.0)?;
        let path = Self::crl_path(&self.root);
        let tmp = path.with_extension("pem.tmp");
        write_file(&tmp, crl.pem()?.as_bytes(), 0o644)?;
        flotilla_wire::files::commit(&tmp, &path).map_err(io_err(&path))
    }

    /// Issues the coordinator's server certificate; its SANs are `name`, the extra ones, and with
    /// `loopback` `localhost`, 127.0.0.1 and ::1.
    pub fn issue_coordinator(
        &self,
        request: &CoordinatorRequest,
        placement: &Placement,
    ) -> Result<IssuedCertificate, PkiError> {
        let mut sans: Vec<String> = vec![request.name.to_string()];
        let loopback: &[&str] = if request.loopback { &["localhost", "127.0.0.1", "::1"] } else { &[] };
        for extra in loopback.iter().map(|s| s.to_string()).chain(request.sans.iter().cloned()) {
            if !sans.contains(&extra) {
                sans.push(extra);
            }
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(request.name);
        params.subject_alt_names = sans.iter().map(|s| parse_san(s)).collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let (record, cert_pem) =
            self.certify("coordinator", "coordinator", params, days(request.days), None, |p, issuer| {
                p.signed_by(&key, issuer)
            })?;
        let kit = self.kit_dir("coordinator");
        let snippet = (kit::COORDINATOR_SNIPPET, kit::coordinator_snippet(placement));
        let readme = kit::readme(
            "coordinator",
            request.name,
            &format!("certificate valid until {}", record.not_after),
            placement,
        );
        kit::write_kit(&kit, self.ca_pem()?.as_bytes(), &cert_pem, Some(&key.serialize_pem()), snippet, readme)?;
        self.copy_crl_into(&kit)?;
        Ok(record)
    }

    /// The CA's current CRL into a kit: the coordinator checks devices against it, a device checks
    /// the coordinator.
    fn copy_crl_into(&self, kit: &Path) -> Result<(), PkiError> {
        let crl = fs::read(Self::crl_path(&self.root)).map_err(io_err(&self.root))?;
        write_file(&kit.join(kit::CRL), &crl, 0o644)
    }

    /// Issues a device's client certificate (its id in a URI SAN) with a key made here: the whole
    /// kit is written at once. Devices that make their own key use `request` and [`Pki::sign_request`].
    pub fn issue_device(&self, request: &DeviceRequest, placement: &Placement) -> Result<IssuedCertificate, PkiError> {
        validate_device_id(request.id).map_err(PkiError::Invalid)?;
        self.check_new_id(request.id, false)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = device_params(request.id)?;
        let (record, cert_pem) =
            self.certify("device", request.id, params, request.validity, None, |p, issuer| p.signed_by(&key, issuer))?;
        let snippet = (kit::DEVICE_SNIPPET, kit::device_snippet(placement));
        let readme =
            kit::readme("device", request.id, &format!("certificate valid until {}", record.not_after), placement);
        let kit = self.kit_dir(request.id);
        kit::write_kit(&kit, self.ca_pem()?.as_bytes(), &cert_pem, Some(&key.serialize_pem()), snippet, readme)?;
        self.copy_crl_into(&kit)?;
        Ok(record)
    }

    /// Signs a device's certificate request. A second certificate for an id is refused unless
    /// `renew` is set, in which case the id's current certificate must not be revoked. Writes
    /// `cert.pem` and `ca.crt` into `out` for the device's `install`.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        validity: std::time::Duration,
        renew: bool,
        out: &Path,
    ) -> Result<IssuedCertificate, PkiError> {
        let (mut record, cert_pem) = self.sign_device_request(csr_pem, validity, renew, None)?;
        fs::create_dir_all(out).map_err(io_err(out))?;
        write_file(&out.join(kit::CERT), cert_pem.as_bytes(), 0o644)?;
        write_file(&out.join(kit::CA_CERT), self.ca_pem()?.as_bytes(), 0o644)?;
        record.kit = out.to_path_buf();
        self.update_record(&record)?;
        Ok(record)
    }

    /// Renews the certificate of device `id` from its request, for a coordinator that renews
    /// certificates online: the request must be for `id` (the identity the session proved), the
    /// session's certificate (`session_serial`) must be the id's newest, and it must end within
    /// the policy's window. So each certificate renews once, near its end, and a stolen older key
    /// cannot mint new certificates. Returns the record and the certificate (PEM).
    pub fn renew_device(
        &self,
        id: &str,
        session_serial: &str,
        csr_pem: &str,
        policy: RenewalPolicy,
    ) -> Result<(IssuedCertificate, String), PkiError> {
        let registry = self.registry()?;
        let newest = registry
            .issued
            .iter()
            .rev()
            .find(|c| c.kind == "device" && c.id == id)
            .ok_or_else(|| PkiError::Invalid(format!("device '{id}' has no certificate to renew")))?;
        if newest.serial != session_serial {
            return Err(PkiError::Invalid(format!(
                "this session's certificate (serial {session_serial}) is not the newest of device '{id}' (serial {}): \
                 only the newest certificate renews",
                newest.serial
            )));
        }
        let not_after = OffsetDateTime::parse(&newest.not_after, &time::format_description::well_known::Rfc3339)
            .map_err(|e| PkiError::Invalid(format!("registry: bad expiry '{}' for '{id}': {e}", newest.not_after)))?;
        let window = Duration::try_from(policy.window)
            .map_err(|_| PkiError::Invalid(format!("a renewal window of {:?} is out of range", policy.window)))?;
        let opens = not_after - window;
        if OffsetDateTime::now_utc() < opens {
            return Err(PkiError::Invalid(format!(
                "device '{id}''s certificate ends on {}; renewal opens {} before that, on {}",
                newest.not_after,
                describe_span(policy.window),
                opens.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
            )));
        }
        self.sign_device_request(csr_pem, policy.validity, true, Some(id))
    }

    /// Signs a request after `requested_device_id`'s checks; with `session_id`, only a request for
    /// that id.
    fn sign_device_request(
        &self,
        csr_pem: &str,
        validity: std::time::Duration,
        renew: bool,
        session_id: Option<&str>,
    ) -> Result<(IssuedCertificate, String), PkiError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("not a valid certificate signing request: {e}")))?;
        let id = crate::csr::requested_device_id(&csr)?;
        if let Some(session) = session_id.filter(|session| *session != id) {
            return Err(PkiError::Invalid(format!(
                "the request is for device '{id}', but the session is device '{session}'"
            )));
        }
        let renews = self.check_new_id(&id, renew)?;
        self.certify("device", &id, device_params(&id)?, validity, renews, |params, issuer| {
            // Only the public key is taken from the request; everything else is the CA's choice.
            csr.params = params;
            csr.signed_by(issuer)
        })
    }

    /// Refuses an id that already has a certificate, unless this is a renewal of a live one;
    /// returns the serial being renewed.
    fn check_new_id(&self, id: &str, renew: bool) -> Result<Option<String>, PkiError> {
        let registry = self.registry()?;
        let previous = registry.issued.iter().rev().find(|c| c.kind == "device" && c.id == id);
        match (previous, renew) {
            (None, false) => Ok(None),
            (None, true) => Err(PkiError::Invalid(format!("device '{id}' has no certificate to renew"))),
            (Some(_), false) => Err(PkiError::Invalid(format!(
                "device '{id}' already has a certificate; each id is issued once (use `sign --renew` to renew it)"
            ))),
            (Some(cert), true) if registry.is_revoked(&cert.serial) => Err(PkiError::Invalid(format!(
                "device '{id}' was revoked; a revoked id is not renewed, issue a new id"
            ))),
            (Some(cert), true) => Ok(Some(cert.serial.clone())),
        }
    }

    /// Assigns a serial and validity, signs, keeps a copy under `issued/` and records it.
    fn certify(
        &self,
        kind: &str,
        id: &str,
        mut params: CertificateParams,
        validity: std::time::Duration,
        renews: Option<String>,
        sign: impl FnOnce(CertificateParams, &Issuer<'static, KeyPair>) -> Result<rcgen::Certificate, rcgen::Error>,
    ) -> Result<(IssuedCertificate, String), PkiError> {
        let (issuer, ca_not_after) = self.issuer()?;
        if validity < MIN_VALIDITY {
            return Err(PkiError::Invalid(format!(
                "a certificate must be valid for at least {} s (asked for {validity:?})",
                MIN_VALIDITY.as_secs()
            )));
        }
        let span = Duration::try_from(validity)
            .map_err(|_| PkiError::Invalid(format!("a validity of {validity:?} is out of range")))?;
        let until = OffsetDateTime::now_utc().checked_add(span);
        if until.is_none_or(|until| until > ca_not_after) {
            return Err(PkiError::Invalid(format!(
                "{} would outlast the CA, which expires on {}; ask for less or create a new CA",
                describe_span(validity),
                ca_not_after.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
            )));
        }
        let _lock = self.lock_registry()?;
        let mut registry = self.registry()?;
        if let Some(renewed) = renews.as_deref().filter(|r| registry.is_revoked(r)) {
            // Revoked while this renewal was being checked: the lock makes the answer final.
            return Err(PkiError::Invalid(format!(
                "device '{id}' (serial {renewed}) was revoked; a revoked id is not renewed, issue a new id"
            )));
        }
        // Random serials (63 bits, distinct from every one issued): a serial says nothing about how
        // many certificates this CA has issued, or when.
        let serial = loop {
            use rand_core::RngCore;
            let candidate = rand_core::OsRng.next_u64() >> 1;
            if candidate > 1 && !registry.issued.iter().any(|c| c.serial == format!("{candidate:x}")) {
                break candidate;
            }
        };
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, span);
        let (not_before, not_after) = (params.not_before, params.not_after);
        let cert = sign(params, &issuer)?;
        let serial_hex = format!("{serial:x}");
        let copy = self.issued_path(&serial_hex);
        fs::create_dir_all(self.root.join("issued")).map_err(io_err(&self.root))?;
        write_file(&copy, cert.pem().as_bytes(), 0o644)?;
        let rfc = |t: OffsetDateTime| t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let record = IssuedCertificate {
            kind: kind.to_string(),
            id: id.to_string(),
            serial: serial_hex,
            not_before: rfc(not_before),
            not_after: rfc(not_after),
            kit: self.kit_dir(id),
            renews,
        };
        registry.issued.push(record.clone());
        self.save_registry(&registry)?;
        Ok((record, cert.pem()))
    }

    fn update_record(&self, record: &IssuedCertificate) -> Result<(), PkiError> {
        let _lock = self.lock_registry()?;
        let mut registry = self.registry()?;
        if let Some(entry) = registry.issued.iter_mut().find(|c| c.serial == record.serial) {
            *entry = record.clone();
        }
        self.save_registry(&registry)
    }

    /// Where devices reach the coordinator, as this CA knows it: the name of its latest
    /// unrevoked certificate and the port its kit listens on (4433 if the kit does not say).
    /// `None` before a coordinator certificate is issued.
    pub fn coordinator_endpoint(&self) -> Result<Option<(String, u16)>, PkiError> {
        let registry = self.registry()?;
        let current = |c: &&IssuedCertificate| c.kind == "coordinator" && !registry.is_revoked(&c.serial);
        let Some(record) = registry.issued.iter().rev().find(current) else {
            return Ok(None);
        };
        let info = self.describe_issued(record)?;
        let snippet =
            fs::read_to_string(self.kit_dir("coordinator").join(kit::COORDINATOR_SNIPPET)).unwrap_or_default();
        let port = kit::listen_port(&snippet).unwrap_or(kit::DEFAULT_PORT);
        Ok(Some((info.name, port)))
    }

    /// The latest certificate issued for `id` (a device id or `coordinator`), with its revocation status.
    pub fn inspect_id(&self, id: &str) -> Result<crate::inspect::CertificateInfo, PkiError> {
        let registry = self.registry()?;
        let record = registry
            .issued
            .iter()
            .rev()
            .find(|c| c.id == id)
            .ok_or_else(|| PkiError::Invalid(format!("no certificate with id '{id}' was issued by this CA")))?;
        let mut info = self.describe_issued(record)?;
        info.revoked = Some(registry.is_revoked(&record.serial));
        Ok(info)
    }

    /// What the certificate of an issued record says, read from the CA's copy of it.
    fn describe_issued(&self, record: &IssuedCertificate) -> Result<crate::inspect::CertificateInfo, PkiError> {
        let path = self.issued_path(&record.serial);
        let pem = fs::read(&path).map_err(io_err(&path))?;
        crate::inspect::describe_pem(&pem).map_err(|e| PkiError::Invalid(format!("{}: {e}", path.display())))
    }

    /// The revocation status of a certificate this CA issued, by serial (hex, no leading zeros).
    pub fn is_revoked(&self, serial: &str) -> Result<bool, PkiError> {
        Ok(self.registry()?.is_revoked(serial))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr;
    use crate::identity::device_uri;
    use rcgen::SanType;
    use std::os::unix::fs::PermissionsExt;

    fn here(dir: &Path) -> Placement {
        Placement {
            install_dir: dir.to_path_buf(),
            address: "127.0.0.1:4433".into(),
            server_name: "coordinator".into(),
        }
    }

    fn new_ca(dir: &Path) -> Pki {
        Pki::init(dir, "test CA", 10, None).unwrap()
    }

    fn device(pki: &Pki, id: &str, days: u32) -> Result<IssuedCertificate, PkiError> {
        pki.issue_device(&DeviceRequest { id, validity: super::days(days) }, &here(&pki.kit_dir(id)))
    }

    #[test]
    fn loopback_names_are_opt_in_and_the_coordinator_can_be_revoked() {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let sans = |dir: &Path, loopback: bool| {
            let pki = new_ca(dir);
            pki.issue_coordinator(
                &CoordinatorRequest { name: "coord.example.org", sans: &["10.0.0.5".into()], days: 5, loopback },
                &here(&pki.kit_dir("coordinator")),
            )
            .unwrap();
            let pem = fs::read(pki.kit_dir("coordinator").join("cert.pem")).unwrap();
            let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
            let (_, cert) = X509Certificate::from_der(&der.contents).unwrap();
            let names: Vec<String> = cert
                .subject_alternative_name()
                .unwrap()
                .unwrap()
                .value
                .general_names
                .iter()
                .map(|n| match n {
                    GeneralName::DNSName(d) => d.to_string(),
                    GeneralName::IPAddress(ip) => format!("{ip:?}"),
                    other => format!("{other:?}"),
                })
                .collect();
            (pki, names)
        };
        let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (pki, plain) = sans(first.path(), false);
        assert_eq!(plain.len(), 2, "the name and 10.0.0.5 only: {plain:?}");
        assert!(!plain.iter().any(|n| n == "localhost"), "{plain:?}");
        let (_, local) = sans(second.path(), true);
        assert_eq!(local.len(), 5, "the name, 10.0.0.5, localhost, 127.0.0.1 and ::1: {local:?}");
        assert!(local.iter().any(|n| n == "localhost"), "{local:?}");
        let revoked = pki.revoke("coordinator", None).unwrap();
        assert_eq!(revoked.len(), 1);
    }

    #[test]
    fn init_then_issue_writes_kits_with_private_keys_0600() {
        let dir = tempfile::tempdir().unwrap();
        let pki = new_ca(dir.path());
        let mode = fs::metadata(dir.path().join("ca/ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let kit_dir = pki.kit_dir("coordinator");
        pki.issue_coordinator(
            &CoordinatorRequest { name: "coord", sans: &[], days: 5, loopback: false },
            &here(&kit_dir),
        )
        .unwrap();
        for file in ["ca.crt", "cert.pem", "key.pem", "coordinator.toml", "README.txt", "crl.pem"] {
            assert!(kit_dir.join(file).exists(), "{file}");
        }
        let snippet = fs::read_to_string(kit_dir.join("coordinator.toml")).unwrap();
        assert!(snippet.contains(&format!("kit = \"{}\"", kit_dir.display())), "{snippet}");
        let dev = device(&pki, "phone-1", 5).unwrap();
        let coordinator_serial = pki.inspect_id("coordinator").unwrap().serial;
        assert!(u64::from_str_radix(&dev.serial, 16).is_ok() && dev.serial != coordinator_serial, "{}", dev.serial);
        for file in ["ca.crt", "cert.pem", "key.pem", "edge.env", "README.txt"] {
            assert!(pki.kit_dir("phone-1").join(file).exists(), "{file}");
        }
        let env = fs::read_to_string(pki.kit_dir("phone-1").join("edge.env")).unwrap();
        assert!(env.contains("FLOTILLA_COORDINATOR=127.0.0.1:4433"), "{env}");
        let mode = fs::metadata(pki.kit_dir("phone-1").join("key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(pki.registry().unwrap().issued.len(), 2);
        let info = pki.inspect_id("phone-1").unwrap();
        assert_eq!(
            (info.kind.as_str(), info.extended_key_usage.as_slice()),
            ("device", &["clientAuth".to_string()][..])
        );
        assert_eq!(info.revoked, Some(false));
        assert!(info.days_left >= 4 && !info.expired, "{info:?}");
    }

    #[test]
    fn refuses_second_ca_duplicate_ids_bad_ids_and_validity_past_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = new_ca(dir.path());
        assert!(Pki::init(dir.path(), "again", 10, None).is_err());
        device(&pki, "d1", 1).unwrap();
        let err = device(&pki, "d1", 1).unwrap_err();
        assert!(err.to_string().contains("already has a certificate"), "{err}");
        for bad in ["", "a/b", "coordinator", "a.b"] {
            assert!(device(&pki, bad, 1).is_err(), "{bad}");
        }
        let err = device(&pki, "d2", 30).unwrap_err();
        assert!(err.to_string().contains("would outlast the CA"), "{err}");
    }

    #[test]
    fn a_password_protected_ca_needs_the_right_password() {
        let dir = tempfile::tempdir().unwrap();
        Pki::init(dir.path(), "locked CA", 10, Some("correct horse")).unwrap();
        let key = fs::read_to_string(dir.path().join("ca/ca.key")).unwrap();
        assert!(key.contains("ENCRYPTED PRIVATE KEY"));
        let missing = device(&Pki::open(dir.path(), None).unwrap(), "d1", 1).unwrap_err();
        assert!(missing.to_string().contains("password-protected"), "{missing}");
        let wrong = device(&Pki::open(dir.path(), Some("battery staple".into())).unwrap(), "d1", 1).unwrap_err();
        assert!(wrong.to_string().contains("wrong CA password"), "{wrong}");
        device(&Pki::open(dir.path(), Some("correct horse".into())).unwrap(), "d1", 1).unwrap();
    }

    #[test]
    fn a_ca_key_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = new_ca(dir.path());
        let key = dir.path().join("ca/ca.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = device(&pki, "d1", 1).unwrap_err().to_string();
        assert!(err.contains("accessible to other users (mode 0644)") && err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn an_expired_ca_issues_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pki = new_ca(dir.path());
        // Replace the CA certificate by one for the same key that expired yesterday.
        let key = KeyPair::from_pem(&fs::read_to_string(dir.path().join("ca/ca.key")).unwrap()).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("old CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = OffsetDateTime::now_utc() - Duration::days(30);
        params.not_after = OffsetDateTime::now_utc() - Duration::days(1);
        let expired = params.self_signed(&key).unwrap();
        write_file(&Pki::ca_cert_path(dir.path()), expired.pem().as_bytes(), 0o644).unwrap();
        let err = device(&pki, "d1", 1).unwrap_err().to_string();
        assert!(err.contains("the CA certificate expired on"), "{err}");
    }

    #[test]
    fn request_sign_install_then_renew_keeps_the_key_on_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let pki = new_ca(&dir.path().join("pki"));
        let kit = dir.path().join("device-kit");
        let request = csr::request(&kit, "field-7", &here(&kit)).unwrap();
        let pending = fs::read_to_string(kit.join("pending-key.pem")).unwrap();
        assert_eq!(fs::metadata(kit.join("pending-key.pem")).unwrap().permissions().mode() & 0o777, 0o600);
        let out = dir.path().join("signed");
        let signed = pki.sign_request(&fs::read_to_string(&request).unwrap(), super::days(5), false, &out).unwrap();
        assert_eq!(signed.id, "field-7");
        assert!(!out.join("key.pem").exists(), "the CA never sees the device key");
        // The CA's copy of the certificate is for the device's key.
        let id = csr::install(&kit, &out.join("cert.pem"), Some(&out.join("ca.crt"))).unwrap();
        assert_eq!(id, "field-7");
        assert_eq!(fs::read_to_string(kit.join("key.pem")).unwrap(), pending);
        assert!(!kit.join("pending-key.pem").exists() && !kit.join("request.csr").exists());

        // Signing the same id again is refused; a renewal is not.
        let (renew_id, renewal) = csr::renew(&kit).unwrap();
        assert_eq!(renew_id, "field-7");
        let renewal = fs::read_to_string(renewal).unwrap();
        let err = pki.sign_request(&renewal, super::days(5), false, &out).unwrap_err().to_string();
        assert!(err.contains("already has a certificate"), "{err}");
        let renewed = pki.sign_request(&renewal, super::days(5), true, &out).unwrap();
        assert_eq!(renewed.renews.as_deref(), Some(signed.serial.as_str()));
        // The old certificate stays in force until the new one is installed.
        assert_eq!(fs::read_to_string(kit.join("key.pem")).unwrap(), pending);
        csr::install(&kit, &out.join("cert.pem"), None).unwrap();
        assert_ne!(fs::read_to_string(kit.join("key.pem")).unwrap(), pending);
        assert_eq!(pki.inspect_id("field-7").unwrap().serial, renewed.serial);

        // A revoked id is not renewed; revoking it revokes both its certificates, the renewed one
        // and the older one, still within its validity.
        let revoked = pki.revoke("field-7", None).unwrap();
        let serials: Vec<&str> = revoked.iter().map(|r| r.serial.as_str()).collect();
        assert_eq!(serials, vec![signed.serial.as_str(), renewed.serial.as_str()]);
        csr::renew(&kit).unwrap();
        let again = fs::read_to_string(kit.join("request.csr")).unwrap();
        let err = pki.sign_request(&again, super::days(5), true, &out).unwrap_err().to_string();
        assert!(err.contains("was revoked"), "{err}");
    }

    #[test]
    fn online_renewal_is_for_the_sessions_own_id_and_short_validity_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pki = new_ca(&dir.path().join("pki"));
        let short = pki
            .issue_device(
                &DeviceRequest { id: "brief", validity: std::time::Duration::from_secs(30) },
                &here(&pki.kit_dir("brief")),
            )
            .unwrap();
        let info = pki.inspect_id("brief").unwrap();
        assert!(!info.expired && info.days_left == 0, "{info:?}");
        assert_eq!(info.serial, short.serial);
        let err = pki
            .issue_device(
                &DeviceRequest { id: "blink", validity: std::time::Duration::from_secs(2) },
                &here(&pki.kit_dir("blink")),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 10 s"), "{err}");

        let kit = pki.kit_dir("brief");
        csr::renew(&kit).unwrap();
        let request = fs::read_to_string(kit.join("request.csr")).unwrap();
        let policy = RenewalPolicy { validity: super::days(5), window: super::days(1) };
        let err = pki.renew_device("someone-else", &short.serial, &request, policy).unwrap_err().to_string();
        assert!(err.contains("has no certificate to renew"), "{err}");
        let (record, pem) = pki.renew_device("brief", &short.serial, &request, policy).unwrap();
        assert_eq!(record.renews.as_deref(), Some(short.serial.as_str()));
        let renewed = kit.join("renewed.pem");
        fs::write(&renewed, pem).unwrap();
        assert_eq!(csr::install(&kit, &renewed, None).unwrap(), "brief");
        assert!(pki.inspect_id("brief").unwrap().days_left >= 4);
        // The old certificate cannot renew again (a thief holding its key mints nothing), and the
        // new one only within the window before its end.
        csr::renew(&kit).unwrap();
        let request = fs::read_to_string(kit.join("request.csr")).unwrap();
        let err = pki.renew_device("brief", &short.serial, &request, policy).unwrap_err().to_string();
        assert!(err.contains("only the newest certificate renews"), "{err}");
        let err = pki.renew_device("brief", &record.serial, &request, policy).unwrap_err().to_string();
        assert!(err.contains("renewal opens 1 day before that"), "{err}");
        let wide = RenewalPolicy { window: super::days(6), ..policy };
        assert!(pki.renew_device("brief", &record.serial, &request, wide).is_ok());
    }

    #[test]
    fn a_request_for_another_id_is_refused_online() {
        let dir = tempfile::tempdir().unwrap();
        let pki = new_ca(&dir.path().join("pki"));
        let brief = device(&pki, "brief", 1).unwrap();
        device(&pki, "other", 1).unwrap();
        let kit = pki.kit_dir("brief");
        csr::renew(&kit).unwrap();
        let request = fs::read_to_string(kit.join("request.csr")).unwrap();
        let policy = RenewalPolicy { validity: super::days(5), window: super::days(2) };
        let other_serial = pki.inspect_id("other").unwrap().serial;
        let err = pki.renew_device("other", &other_serial, &request, policy).unwrap_err().to_string();
        assert!(err.contains("the session is device 'other'"), "{err}");
        assert!(pki.renew_device("brief", &brief.serial, &request, policy).is_ok());
    }

    #[test]
    fn requests_for_reserved_names_or_extra_powers_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let pki = new_ca(&dir.path().join("pki"));
        let out = dir.path().join("out");
        let sign = |params: CertificateParams| {
            let key = KeyPair::generate().unwrap();
            let pem = params.serialize_request(&key).unwrap().pem().unwrap();
            pki.sign_request(&pem, super::days(5), false, &out).unwrap_err().to_string()
        };
        let mut reserved = CertificateParams::default();
        reserved.subject_alt_names = vec![SanType::URI(device_uri("coordinator").try_into().unwrap())];
        assert!(sign(reserved).contains("reserved"));
        let mut server = CertificateParams::new(vec!["coordinator".to_string()]).unwrap();
        server.subject_alt_names.push(SanType::URI(device_uri("sneaky").try_into().unwrap()));
        assert!(sign(server).contains("may carry only"));
        let mut usages = CertificateParams::default();
        usages.subject_alt_names = vec![SanType::URI(device_uri("sneaky").try_into().unwrap())];
        usages.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        assert!(sign(usages).contains("client authentication only"));
        assert!(sign(CertificateParams::default()).contains("no urn:flotilla:device:"));
        let garbage = pki.sign_request("not a request", super::days(5), false, &out).unwrap_err().to_string();
        assert!(garbage.contains("not a valid certificate signing request"), "{garbage}");
    }

    #[test]
    fn install_refuses_a_certificate_for_another_key_or_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = new_ca(&dir.path().join("pki"));
        let kit = dir.path().join("kit");
        csr::request(&kit, "d1", &here(&kit)).unwrap();
        // A certificate issued for someone else's key.
        let other = dir.path().join("other");
        csr::request(&other, "d2", &here(&other)).unwrap();
        let out = dir.path().join("out");
        pki.sign_request(&fs::read_to_string(other.join("request.csr")).unwrap(), super::days(5), false, &out).unwrap();
        let err = csr::install(&kit, &out.join("cert.pem"), Some(&out.join("ca.crt"))).unwrap_err().to_string();
        assert!(err.contains("for another key"), "{err}");
        // A certificate from another CA.
        let rogue = new_ca(&dir.path().join("rogue"));
        let rogue_out = dir.path().join("rogue-out");
        rogue
            .sign_request(&fs::read_to_string(kit.join("request.csr")).unwrap(), super::days(5), false, &rogue_out)
            .unwrap();
        let err = csr::install(&kit, &rogue_out.join("cert.pem"), Some(&out.join("ca.crt"))).unwrap_err().to_string();
        assert!(err.contains("not a valid device certificate from this CA"), "{err}");
    }

    #[test]
    fn revocation_lists_the_serial_in_a_signed_crl() {
        let dir = tempfile::tempdir().unwrap();
        let pki = new_ca(dir.path());
        let empty = fs::read_to_string(Pki::crl_path(dir.path())).unwrap();
        assert!(empty.contains("BEGIN X509 CRL"));
        let issued = device(&pki, "lost-phone", 5).unwrap();
        let revoked = pki.revoke("lost-phone", None).unwrap();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].serial, issued.serial);
        let pem = fs::read(Pki::crl_path(dir.path())).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        use x509_parser::prelude::FromDer;
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der.contents).unwrap();
        let serials: Vec<u64> =
            crl.iter_revoked_certificates().map(|r| r.user_certificate.to_u64_digits()[0]).collect();
        assert_eq!(serials, vec![u64::from_str_radix(&issued.serial, 16).unwrap()]);
        assert!(pki.revoke("lost-phone", None).unwrap_err().to_string().contains("already revoked"));
        assert!(pki.revoke("nobody", None).unwrap_err().to_string().contains("no device certificate"));
        assert!(pki.revoke("lost-phone", Some("9")).unwrap_err().to_string().contains("serial 9"));
        assert_eq!(pki.inspect_id("lost-phone").unwrap().revoked, Some(true));
    }

    #[test]
    fn concurrent_issues_and_revocations_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let pki = std::sync::Arc::new(new_ca(dir.path()));
        let workers: Vec<_> = (0..6)
            .map(|i| {
                let pki = pki.clone();
                std::thread::spawn(move || {
                    let id = format!("racer-{i}");
                    device(&pki, &id, 5).unwrap();
                    pki.revoke(&id, None).unwrap();
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let registry = pki.registry().unwrap();
        assert_eq!(registry.issued.iter().filter(|c| c.id.starts_with("racer-")).count(), 6);
        assert_eq!(registry.revoked.len(), 6, "every revocation is kept");
        let serials = flotilla_wire::tls::revoked_serials(&Pki::crl_path(dir.path())).unwrap();
        assert_eq!(serials.len(), 6, "and listed in the CRL: {serials:?}");
    }

    #[test]
    fn open_without_ca_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let err = Pki::open(dir.path(), None).err().unwrap();
        assert!(err.to_string().contains("init"), "{err}");
    }
}
