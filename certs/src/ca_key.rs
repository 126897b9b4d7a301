//! The CA's private key on disk: created with mode 0600, refused when others can read it, and
//! optionally encrypted with a password (PKCS#8 with scrypt and AES-256-CBC).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use pkcs8::der::Decode;
use pkcs8::{EncryptedPrivateKeyInfo, LineEnding, PrivateKeyInfo};
use rcgen::KeyPair;

use crate::error::PkiError;
use crate::files::write_file;

const ENCRYPTED_LABEL: &str = "ENCRYPTED PRIVATE KEY";

pub fn write_ca_key(path: &Path, key: &KeyPair, password: Option<&str>) -> Result<(), PkiError> {
    let pem = match password {
        None => key.serialize_pem(),
        Some(password) => {
            let der = key.serialize_der();
            let info = PrivateKeyInfo::from_der(&der)
                .map_err(|e| PkiError::Invalid(format!("cannot encode the CA key: {e}")))?;
            let encrypted = info
                .encrypt(rand_core::OsRng, password.as_bytes())
                .map_err(|e| PkiError::Invalid(format!("cannot encrypt the CA key: {e}")))?;
            encrypted
                .to_pem(ENCRYPTED_LABEL, LineEnding::LF)
                .map_err(|e| PkiError::Invalid(format!("cannot encode the CA key: {e}")))?
                .to_string()
        }
    };
    write_file(path, pem.as_bytes(), 0o600)
}

pub fn read_ca_key(path: &Path, password: Option<&str>) -> Result<KeyPair, PkiError> {
    let shown = path.display();
    let metadata = fs::metadata(path).map_err(|source| key_io_error(path, source))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::Invalid(format!(
            "{shown}: the CA key is accessible to other users (mode {mode:04o}); run `chmod 600 {shown}`"
        )));
    }
    let text = fs::read_to_string(path).map_err(|source| key_io_error(path, source))?;
    if text.contains(ENCRYPTED_LABEL) {
        let password = password.ok_or_else(|| {
            PkiError::Invalid(format!(
                "{shown}: the CA key is password-protected; give --ca-password-file FILE (or set \
                 FLOTILLA_CA_PASSWORD_FILE)"
            ))
        })?;
        let (_, der) = pkcs8::SecretDocument::from_pem(&text)
            .map_err(|e| PkiError::Invalid(format!("{shown}: not a valid encrypted key: {e}")))?;
        let encrypted = EncryptedPrivateKeyInfo::from_der(der.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("{shown}: not a valid encrypted key: {e}")))?;
        let plain = encrypted
            .decrypt(password.as_bytes())
            .map_err(|_| PkiError::Invalid(format!("{shown}: wrong CA password (the key does not decrypt)")))?;
        return KeyPair::try_from(plain.as_bytes())
            .map_err(|e| PkiError::Invalid(format!("{shown}: not a valid key: {e}")));
    }
    if password.is_some() {
        return Err(PkiError::Invalid(format!(
            "{shown}: a CA password was given but this CA key is not password-protected"
        )));
    }
    KeyPair::from_pem(&text).map_err(|e| PkiError::Invalid(format!("{shown}: not a valid key: {e}")))
}

fn key_io_error(path: &Path, source: std::io::Error) -> PkiError {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        return PkiError::Invalid(format!(
            "{}: permission denied; run flotilla-certs as the user that owns the CA",
            path.display()
        ));
    }
    PkiError::Io { path: path.to_path_buf(), source }
}

/// A password read from a file (the first line; the file must not be empty).
pub fn read_password_file(path: &Path) -> Result<String, PkiError> {
    let text = fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_path_buf(), source })?;
    let password = text.lines().next().unwrap_or("").to_string();
    if password.is_empty() {
        return Err(PkiError::Invalid(format!("{}: the password file is empty", path.display())));
    }
    Ok(password)
}
