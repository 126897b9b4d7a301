//! What goes into a certificate beside its key: device names, subject alternative names,
//! validity spans, and how online renewal is bounded.

use std::net::IpAddr;

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, SanType};
use time::{Duration, OffsetDateTime};

use crate::error::PkiError;
use crate::identity::device_uri;
use crate::subject::dn;

/// How far a certificate's or CRL's start is set back, for clocks that run behind.
pub(crate) const CLOCK_SKEW: Duration = Duration::minutes(5);

/// How a coordinator renews certificates online.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RenewalPolicy {
    /// Validity of a renewed certificate.
    pub validity: std::time::Duration,
    /// A certificate renews only once it ends within this time.
    pub window: std::time::Duration,
}

pub(crate) fn device_params(id: &str) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = dn(id);
    let uri = device_uri(id).try_into().map_err(|e| PkiError::Invalid(format!("device id '{id}': {e}")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// `days` whole days, as the validity of a certificate.
pub(crate) fn days(days: u32) -> std::time::Duration {
    std::time::Duration::from_secs(u64::from(days) * 86_400)
}

pub(crate) fn describe_span(span: std::time::Duration) -> String {
    let secs = span.as_secs();
    if secs == 86_400 {
        "1 day".into()
    } else if secs.is_multiple_of(86_400) {
        format!("{} days", secs / 86_400)
    } else {
        format!("{secs} s")
    }
}

pub(crate) fn set_validity(params: &mut CertificateParams, span: Duration) {
    // Certificates hold whole seconds; so do the records.
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap_or_else(|_| OffsetDateTime::now_utc());
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + span;
}

pub(crate) fn parse_san(value: &str) -> Result<SanType, PkiError> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let name = value
        .to_string()
        .try_into()
        .map_err(|e| PkiError::Invalid(format!("subject alternative name '{value}': {e}")))?;
    Ok(SanType::DnsName(name))
}
