//! Files replaced so that a crash leaves the old version or the new one, never a torn file: the
//! new bytes go to a temporary file beside the target, which is synced, renamed over the target,
//! and the directory synced so that the rename itself survives a power loss. The one way the
//! product writes a state, report, adapter or study file (the PKI, which also sets file modes,
//! commits through [`commit`] too). A crate of its own, with no dependencies, so that every crate
//! can use it without pulling in anything else.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes`, atomically and durably.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temporary_beside(path);
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    drop(file);
    commit(&tmp, path)
}

/// Moves `tmp`, written by someone else (an encoder that takes a path), over `path`, atomically
/// and durably: `tmp` is synced first, the directory after.
pub fn commit(tmp: &Path, path: &Path) -> io::Result<()> {
    fs::File::open(tmp)?.sync_all()?;
    fs::rename(tmp, path)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// `<path>.tmp`, keeping the extension readable (`summary.json` → `summary.json.tmp`).
pub fn temporary_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_no_temporary_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.json");
        write_atomically(&path, b"old").unwrap();
        write_atomically(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary left");
        assert_eq!(temporary_beside(&path), dir.path().join("summary.json.tmp"));
        assert!(write_atomically(&dir.path().join("missing/x"), b"").is_err());
    }
}
