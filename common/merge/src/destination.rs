//! What the offline `aggregate` command checks before it writes anything, on both paths: that the
//! output directory cannot destroy an input, that it does not silently write into a directory that
//! already holds something, and that no client is counted twice.
//!
//! Two inputs are the same client when their directories resolve to the same place (a symlink, a
//! `./` prefix) or when their weight files have the same bytes (a copied directory): either way a
//! weighted average would double that client's weight without a word.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::inputs::InputError;
use crate::peft::ADAPTER_WEIGHTS_FILE;

/// Refuses, having written nothing, an `out` that is or contains an input, a non-empty `out`
/// unless `force`, and the same client given twice.
pub fn check(out: &Path, clients: &[PathBuf], force: bool) -> Result<(), InputError> {
    let resolved: Vec<PathBuf> = clients.iter().map(|c| resolve(c)).collect::<Result<_, _>>()?;
    let out_resolved = resolve(out)?;
    for (client, path) in clients.iter().zip(&resolved) {
        if *path == out_resolved {
            return Err(InputError(format!(
                "--out {} is the input {}: writing there would overwrite that client's adapter",
                out.display(),
                client.display()
            )));
        }
        if path.starts_with(&out_resolved) {
            return Err(InputError(format!(
                "--out {} contains the input {}: name an output directory outside the inputs",
                out.display(),
                client.display()
            )));
        }
    }
    if holds_anything(out)? && !force {
        return Err(InputError(format!(
            "--out {} exists and is not empty: name a new directory, or pass --force to write into it \
             (its adapter_model.safetensors and adapter_config.json are replaced)",
            out.display()
        )));
    }
    refuse_duplicates(clients, &resolved)
}

/// The path with every existing part resolved (symlinks, `.` and `..`); a path that does not exist
/// yet is its nearest existing ancestor resolved, with the rest appended.
fn resolve(path: &Path) -> Result<PathBuf, InputError> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| InputError(format!("cannot read the working directory: {e}")))?.join(path)
    };
    let mut missing = Vec::new();
    let mut existing = absolute.as_path();
    loop {
        match existing.canonicalize() {
            Ok(found) => {
                let mut resolved = found;
                for part in missing.iter().rev() {
                    resolved.push(part);
                }
                return Ok(resolved);
            }
            Err(_) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    missing.push(name.to_os_string());
                    existing = parent;
                }
                _ => return Ok(absolute),
            },
        }
    }
}

fn holds_anything(dir: &Path) -> Result<bool, InputError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            Err(InputError(format!("--out {} is a file, not a directory", dir.display())))
        }
        Err(e) => Err(InputError(format!("--out {}: cannot read: {e}", dir.display()))),
    }
}

/// Same directory, or weight files with the same bytes: only files of equal size are hashed.
fn refuse_duplicates(clients: &[PathBuf], resolved: &[PathBuf]) -> Result<(), InputError> {
    let mut seen: BTreeMap<&PathBuf, &PathBuf> = BTreeMap::new();
    for (client, path) in clients.iter().zip(resolved) {
        if let Some(first) = seen.insert(path, client) {
            return Err(InputError(format!(
                "{} and {} are the same directory: each client may be given once (twice would double its weight)",
                first.display(),
                client.display()
            )));
        }
    }
    let mut by_size: BTreeMap<u64, Vec<&PathBuf>> = BTreeMap::new();
    for client in clients {
        // A missing or unreadable file is reported, with its reason, when the input is read.
        if let Ok(meta) = std::fs::metadata(client.join(ADAPTER_WEIGHTS_FILE)) {
            by_size.entry(meta.len()).or_default().push(client);
        }
    }
    for group in by_size.values().filter(|g| g.len() > 1) {
        let mut by_digest: BTreeMap<[u8; 32], &PathBuf> = BTreeMap::new();
        for client in group {
            let Ok(digest) = sha256(&client.join(ADAPTER_WEIGHTS_FILE)) else { continue };
            if let Some(first) = by_digest.insert(digest, client) {
                return Err(InputError(format!(
                    "{} and {} hold the same {ADAPTER_WEIGHTS_FILE} (byte for byte): each client may be given \
                     once (twice would double its weight)",
                    first.display(),
                    client.display()
                )));
            }
        }
    }
    Ok(())
}

fn sha256(path: &Path) -> io::Result<[u8; 32]> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buffer[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(root: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(ADAPTER_WEIGHTS_FILE), bytes).unwrap();
        dir
    }

    #[test]
    fn an_out_that_is_or_contains_an_input_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let a = client(root.path(), "a", b"one");
        let b = client(root.path(), "b", b"two");
        let clients = vec![a.clone(), b.clone()];
        let error = check(&a, &clients, true).unwrap_err().0;
        assert!(error.contains("is the input"), "{error}");
        let dotted = root.path().join("b/../a/.");
        assert!(check(&dotted, &clients, true).unwrap_err().0.contains("is the input"));
        assert!(check(root.path(), &clients, true).unwrap_err().0.contains("contains the input"));
        assert!(check(&root.path().join("merged"), &clients, false).is_ok());
        assert!(check(&root.path().join("new/deeper"), &clients, false).is_ok());
    }

    #[test]
    fn a_non_empty_out_needs_force_and_a_file_is_not_a_directory() {
        let root = tempfile::tempdir().unwrap();
        let clients = vec![client(root.path(), "a", b"one"), client(root.path(), "b", b"two")];
        let out = root.path().join("out");
        std::fs::create_dir(&out).unwrap();
        assert!(check(&out, &clients, false).is_ok(), "an empty directory is fine");
        std::fs::write(out.join("notes.txt"), b"mine").unwrap();
        assert!(check(&out, &clients, false).unwrap_err().0.contains("--force"));
        assert!(check(&out, &clients, true).is_ok());
        assert!(check(&out.join("notes.txt"), &clients, true).unwrap_err().0.contains("is a file"));
    }

    #[test]
    fn the_same_client_twice_is_refused_by_path_and_by_content() {
        let root = tempfile::tempdir().unwrap();
        let a = client(root.path(), "a", b"same bytes");
        let b = client(root.path(), "b", b"other byte");
        let copy = client(root.path(), "copy-of-a", b"same bytes");
        let out = root.path().join("out");
        let twice = check(&out, &[a.clone(), b.clone(), root.path().join("./a")], false).unwrap_err().0;
        assert!(twice.contains("same directory"), "{twice}");
        let copied = check(&out, &[a.clone(), b.clone(), copy], false).unwrap_err().0;
        assert!(copied.contains("byte for byte"), "{copied}");
        assert!(check(&out, &[a, b], false).is_ok(), "equal sizes, different bytes");
    }
}
