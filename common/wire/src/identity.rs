//! How a device identity is written into a certificate: one definition for the CA that writes it
//! (`flotilla-certs`) and the coordinator that reads it (`tls::device_id_from_certificate`).

/// URI SAN prefix that marks a device identity.
pub const DEVICE_URI_PREFIX: &str = "urn:flotilla:device:";

/// Ids are short, printable and safe in file names, URIs and log lines.
pub fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("device id '{id}' must be 1 to 64 characters long"));
    }
    if !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("device id '{id}' may contain only ASCII letters, digits, '-' and '_'"));
    }
    if id == "coordinator" || id == "ca" {
        return Err(format!("device id '{id}' is reserved"));
    }
    Ok(())
}

pub fn device_uri(id: &str) -> String {
    format!("{DEVICE_URI_PREFIX}{id}")
}
