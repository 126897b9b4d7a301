//! What a certificate says, in a form people and scripts can read.

use serde::Serialize;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::PkiError;
use crate::identity::DEVICE_URI_PREFIX;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CertificateInfo {
    /// `device`, `coordinator` or `ca`.
    pub kind: String,
    /// What `inspect --id` and `revoke --id` take: the device id (URI SAN), `coordinator` for the
    /// coordinator, or the common name of a CA.
    pub id: String,
    /// The common name (the coordinator's: the name devices reach it by).
    pub name: String,
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    /// Negative once expired.
    pub days_left: i64,
    pub expired: bool,
    pub subject_alt_names: Vec<String>,
    pub extended_key_usage: Vec<String>,
    /// Known only when the PKI directory is at hand.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked: Option<bool>,
}

fn rfc3339(time: x509_parser::time::ASN1Time) -> String {
    time.to_datetime().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

pub fn describe_pem(pem: &[u8]) -> Result<CertificateInfo, PkiError> {
    let (_, block) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| PkiError::Invalid(format!("not a PEM certificate: {e}")))?;
    describe_der(&block.contents)
}

pub fn describe_der(der: &[u8]) -> Result<CertificateInfo, PkiError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::Invalid(format!("not a valid certificate: {e}")))?;
    let mut sans = Vec::new();
    let mut device_id = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) => {
                    if let Some(id) = uri.strip_prefix(DEVICE_URI_PREFIX) {
                        device_id = Some(id.to_string());
                    }
                    sans.push(format!("URI:{uri}"));
                }
                GeneralName::DNSName(dns) => sans.push(format!("DNS:{dns}")),
                GeneralName::IPAddress(ip) => sans.push(format!("IP:{}", format_ip(ip))),
                other => sans.push(format!("{other:?}")),
            }
        }
    }
    let mut usages = Vec::new();
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        if eku.value.server_auth {
            usages.push("serverAuth".to_string());
        }
        if eku.value.client_auth {
            usages.push("clientAuth".to_string());
        }
    }
    let common_name =
        cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).unwrap_or_default().to_string();
    let kind = if cert.is_ca() {
        "ca"
    } else if device_id.is_some() {
        "device"
    } else {
        "coordinator"
    };
    let now = time::OffsetDateTime::now_utc();
    let not_after = cert.validity().not_after.to_datetime();
    Ok(CertificateInfo {
        kind: kind.to_string(),
        id: match (kind, device_id) {
            (_, Some(id)) => id,
            ("coordinator", None) => "coordinator".to_string(),
            (_, None) => common_name.clone(),
        },
        name: common_name,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string().replace(':', "").trim_start_matches('0').to_string(),
        not_before: rfc3339(cert.validity().not_before),
        not_after: rfc3339(cert.validity().not_after),
        days_left: (not_after - now).whole_days(),
        expired: not_after < now,
        subject_alt_names: sans,
        extended_key_usage: usages,
        revoked: None,
    })
}

fn format_ip(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default()).to_string(),
        _ => format!("{bytes:02x?}"),
    }
}

impl CertificateInfo {
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "kind:        {}\nid:          {}\nname:        {}\nsubject:     {}\nissuer:      {}\nserial:      {}\n\
             valid from:  {}\nvalid until: {} ({})\nSANs:        {}\nusages:      {}\n",
            self.kind,
            self.id,
            self.name,
            self.subject,
            self.issuer,
            self.serial,
            self.not_before,
            self.not_after,
            if self.expired {
                format!("EXPIRED {} days ago", -self.days_left)
            } else {
                format!("{} days left", self.days_left)
            },
            self.subject_alt_names.join(", "),
            self.extended_key_usage.join(", "),
        );
        if let Some(revoked) = self.revoked {
            out.push_str(&format!("revoked:     {}\n", if revoked { "YES" } else { "no" }));
        }
        out
    }
}
