//! The secret behind QUIC stateless resets, kept in the run directory. A coordinator restarted on
//! the same run directory (after a crash, a redeploy, a pod reschedule with its volume) answers the
//! devices of its previous life with valid stateless resets: they learn at once that their
//! connection is gone and reconnect, instead of each waiting out its idle timeout.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;
use rand::RngCore;

pub const FILE: &str = "stateless-reset.key";
const LEN: usize = 32;

pub fn load_or_create(run_dir: &Path) -> anyhow::Result<[u8; LEN]> {
    match read_existing(run_dir)? {
        Some(secret) => Ok(secret),
        None => create(run_dir),
    }
}

/// Whether the run directory's secret, if it has one, is usable, without creating one.
pub fn check(run_dir: &Path) -> anyhow::Result<()> {
    read_existing(run_dir).map(drop)
}

fn read_existing(run_dir: &Path) -> anyhow::Result<Option<[u8; LEN]>> {
    let path = run_dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let mode = std::fs::metadata(&path)?.permissions().mode();
            anyhow::ensure!(
                mode & 0o077 == 0,
                "{}: readable by others (mode {:o}); whoever holds it can end any device's session: chmod 600 it",
                path.display(),
                mode & 0o777
            );
            let secret = bytes.as_slice().try_into().map_err(|_| {
                anyhow::anyhow!(
                    "{}: {} bytes instead of {LEN}; delete it to make a new one (the devices of a running \
                     fleet then notice a restart only at their idle timeout, once)",
                    path.display(),
                    bytes.len()
                )
            })?;
            Ok(Some(secret))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn create(run_dir: &Path) -> anyhow::Result<[u8; LEN]> {
    let path = run_dir.join(FILE);
    let mut secret = [0u8; LEN];
    rand::rng().fill_bytes(&mut secret);
    let tmp = run_dir.join(format!("{FILE}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(&secret)?;
    drop(file);
    flotilla_wire::files::commit(&tmp, &path).with_context(|| format!("cannot create {}", path.display()))?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_survives_restarts_and_is_refused_when_exposed_or_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        assert_eq!(load_or_create(dir.path()).unwrap(), first);
        let path = dir.path().join(FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("readable by others"), "{err}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"short").unwrap();
        let err = load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("5 bytes instead of 32"), "{err}");
    }
}
