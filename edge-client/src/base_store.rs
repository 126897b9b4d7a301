//! Where a device keeps a transformer's checkpoint. The coordinator's Welcome names the files by
//! digest; the device uses, in order:
//!
//! 1. `--model-dir`, when given: it must hold exactly those files (a different base is refused
//!    with both digests, since training it would poison the federation);
//! 2. its cache, `<cache>/bases/<sha256 of model.safetensors, or of a decoder's .gguf file>/`,
//!    filled by an earlier fetch;
//! 3. the coordinator: each missing file is fetched over the session a piece at a time
//!    (`FetchBase` → `BaseChunk`), appended to `<file>.partial` so that a lost connection resumes
//!    where it stopped, verified against its digest, then moved into place. The 90 MB of
//!    all-MiniLM-L6-v2 cross the network once per machine, not once per session.
//!
//! Several devices in one process (the simulator) or on one machine share the cache: a lock file
//! makes one of them fetch while the others wait and then find the files.

use std::io::Write;
use std::path::{Path, PathBuf};

use flotilla_wire::files::sha256_file;
use flotilla_wire::framing::{read_frame, write_frame, FrameLimits};
use flotilla_wire::protocol::CHECKPOINT_WEIGHTS_FILE as WEIGHTS_FILE;
use flotilla_wire::protocol::{CheckpointFile, CoordinatorMessage, DeviceMessage, FetchBase, BASE_CHUNK_BYTES};
use flotilla_wire::tensor::WireTensors;
use tracing::info;

/// Why the checkpoint could not be had: `Fatal` needs the operator (a different local copy, a
/// disk error), `Transient` may pass on reconnecting (a lost connection, a bad chunk).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Fatal(String),
    #[error("{0}")]
    Transient(String),
}

/// Frames of a fetch: one chunk each, no tensors.
const CHUNK_LIMITS: FrameLimits = FrameLimits {
    max_header_bytes: (BASE_CHUNK_BYTES + (4 << 10)) as u32,
    max_tensors: 0,
    max_tensor_dims: 0,
    max_body_bytes: 0,
};

#[derive(Debug, Clone)]
pub struct BaseStore {
    /// A local copy of the checkpoint the operator pointed this device at.
    pub model_dir: Option<PathBuf>,
    /// `<cache>/bases/<digest>/` holds fetched checkpoints.
    pub cache: PathBuf,
    /// Bytes asked for per `FetchBase` (the coordinator sends at most `BASE_CHUNK_BYTES`).
    pub chunk_bytes: u32,
    /// The most bytes a checkpoint may declare before anything is fetched or written.
    pub max_bytes: u64,
    /// The most bytes all cached checkpoints may hold together (least recently used evicted).
    pub max_cache_bytes: u64,
}

impl BaseStore {
    /// The default cache (`flotilla_data::cache::root`).
    pub fn default_cache() -> PathBuf {
        flotilla_data::cache::root()
    }

    /// What the coordinator declares, checked before anything is read or written: plain file
    /// names, SHA-256 digests, and a total size within `max_bytes`.
    fn check_declared(&self, files: &[CheckpointFile]) -> Result<(), StoreError> {
        for file in files {
            if !is_plain_name(&file.name)
                || file.sha256.len() != 64
                || !file.sha256.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(StoreError::Fatal(format!(
                    "the coordinator named a checkpoint file '{}' (sha256 '{}') that cannot be stored safely",
                    file.name, file.sha256
                )));
            }
        }
        let declared = files.iter().fold(0u64, |total, f| total.saturating_add(f.size));
        if declared > self.max_bytes {
            return Err(StoreError::Fatal(format!(
                "the coordinator's checkpoint declares {declared} bytes, more than this device accepts ({} bytes, \
                 --max-base-mib); raise it if this coordinator's base is meant to be that large",
                self.max_bytes
            )));
        }
        Ok(())
    }

    /// A directory holding exactly `files`: the model directory, the cache, or fetched now.
    pub async fn obtain(
        &self,
        connection: &quinn::Connection,
        files: &[CheckpointFile],
    ) -> Result<PathBuf, StoreError> {
        self.check_declared(files)?;
        if let Some(dir) = &self.model_dir {
            let dir = dir.clone();
            let wanted = files.to_vec();
            let differences = tokio::task::spawn_blocking(move || differences(&dir, &wanted))
                .await
                .map_err(|e| StoreError::Fatal(e.to_string()))?;
            if differences.is_empty() {
                return Ok(self.model_dir.clone().unwrap_or_default());
            }
            return Err(StoreError::Fatal(format!(
                "--model-dir {} is not the coordinator's base: {}",
                self.model_dir.as_deref().unwrap_or(Path::new("")).display(),
                differences.join("; ")
            )));
        }
        // An encoder's weights are its model.safetensors; a decoder's, its one GGUF file.
        let weights = files
            .iter()
            .find(|f| f.name == WEIGHTS_FILE)
            .or_else(|| files.iter().find(|f| f.name.ends_with(".gguf")))
            .ok_or_else(|| {
                StoreError::Fatal(format!("the coordinator's checkpoint has no {WEIGHTS_FILE} and no .gguf file"))
            })?;
        let bases = self.cache.join("bases");
        let dir = bases.join(&weights.sha256);
        std::fs::create_dir_all(&dir).map_err(|e| fatal_io(&dir, e))?;
        let lock = open_lock(&dir).await?;
        crate::base_cache::touch(&dir);
        let declared = files.iter().fold(0u64, |total, f| total.saturating_add(f.size));
        let (room_in, keep, quota) = (bases.clone(), dir.clone(), self.max_cache_bytes);
        tokio::task::spawn_blocking(move || crate::base_cache::make_room(&room_in, &keep, declared, quota))
            .await
            .map_err(|e| StoreError::Fatal(e.to_string()))?
            .map_err(StoreError::Fatal)?;
        for file in files {
            let target = dir.join(&file.name);
            if verified_marker(&dir, file).is_file() && target.is_file() {
                continue;
            }
            fetch(connection, &dir, file, self.chunk_bytes).await?;
        }
        drop(lock);
        Ok(dir)
    }
}

/// A file name without directories, so that it cannot point outside the cache.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\']) && !name.starts_with('.')
}

fn verified_marker(dir: &Path, file: &CheckpointFile) -> PathBuf {
    dir.join(format!(".{}.{}.verified", file.name, file.sha256))
}

fn fatal_io(path: &Path, error: std::io::Error) -> StoreError {
    StoreError::Fatal(format!("{}: {error}", path.display()))
}

/// What differs between the files in `dir` and `wanted` (empty: the same base).
fn differences(dir: &Path, wanted: &[CheckpointFile]) -> Vec<String> {
    wanted
        .iter()
        .filter_map(|file| {
            let path = dir.join(&file.name);
            match sha256_file(&path) {
                Ok(digest) if digest == file.sha256 => None,
                Ok(digest) => Some(format!("{} has sha256 {digest}, the coordinator's has {}", file.name, file.sha256)),
                Err(e) => Some(e.to_string()),
            }
        })
        .collect()
}

/// An exclusive lock on `<dir>/.lock` (held until dropped), waited for off the async threads.
async fn open_lock(dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = dir.join(".lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| fatal_io(&path, e))?;
    tokio::task::spawn_blocking(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this closure owns; no memory is shared with libc.
        let result = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        if result == 0 {
            Ok(lock)
        } else {
            Err(fatal_io(&path, std::io::Error::last_os_error()))
        }
    })
    .await
    .map_err(|e| StoreError::Fatal(e.to_string()))?
}

/// Fetches `file` into `dir`, resuming a partial download, and verifies it.
async fn fetch(
    connection: &quinn::Connection,
    dir: &Path,
    file: &CheckpointFile,
    chunk_bytes: u32,
) -> Result<(), StoreError> {
    let partial = dir.join(format!("{}.partial", file.name));
    let mut have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    if have > file.size {
        std::fs::remove_file(&partial).map_err(|e| fatal_io(&partial, e))?;
        have = 0;
    }
    info!(file = %file.name, bytes = file.size, resume_at = have, "fetching the base checkpoint from the coordinator");
    let transient = |e: &dyn std::fmt::Display| StoreError::Transient(format!("fetching {}: {e}", file.name));
    let mut out =
        std::fs::OpenOptions::new().create(true).append(true).open(&partial).map_err(|e| fatal_io(&partial, e))?;
    while have < file.size {
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| transient(&e))?;
        let request = DeviceMessage::FetchBase(FetchBase {
            name: file.name.clone(),
            sha256: file.sha256.clone(),
            offset: have,
            length: chunk_bytes,
        });
        write_frame(&mut send, &request, &WireTensors::default()).await.map_err(|e| transient(&e))?;
        send.finish().map_err(|e| transient(&e))?;
        let (message, _) =
            read_frame::<_, CoordinatorMessage>(&mut recv, &CHUNK_LIMITS).await.map_err(|e| transient(&e))?;
        let chunk = match message {
            CoordinatorMessage::BaseChunk(chunk) => chunk,
            CoordinatorMessage::Refusal(refusal) => {
                return Err(StoreError::Transient(format!("the coordinator refused {}: {}", file.name, refusal.reason)))
            }
            other => return Err(StoreError::Transient(format!("expected BaseChunk, got {other:?}"))),
        };
        let end = have + chunk.bytes.len() as u64;
        if chunk.offset != have || chunk.size != file.size || chunk.bytes.is_empty() || end > file.size {
            return Err(StoreError::Transient(format!(
                "{}: a chunk of {} bytes at {} does not continue the {have} bytes held",
                file.name,
                chunk.bytes.len(),
                chunk.offset
            )));
        }
        out.write_all(&chunk.bytes).map_err(|e| fatal_io(&partial, e))?;
        have = end;
    }
    out.sync_all().map_err(|e| fatal_io(&partial, e))?;
    drop(out);
    let path = partial.clone();
    let digest =
        tokio::task::spawn_blocking(move || sha256_file(&path)).await.map_err(|e| StoreError::Fatal(e.to_string()))?;
    let digest = digest.map_err(|e| StoreError::Fatal(e.to_string()))?;
    if digest != file.sha256 {
        // Bad bytes are not kept: the next attempt starts over.
        let _ = std::fs::remove_file(&partial);
        return Err(StoreError::Transient(format!(
            "{}: fetched bytes have sha256 {digest}, expected {}; fetching again",
            file.name, file.sha256
        )));
    }
    let target = dir.join(&file.name);
    flotilla_wire::files::commit(&partial, &target).map_err(|e| fatal_io(&target, e))?;
    flotilla_wire::files::write_atomically(&verified_marker(dir, file), b"").map_err(|e| fatal_io(dir, e))?;
    info!(file = %file.name, "base checkpoint file fetched and verified");
    Ok(())
}

/// Where a transformer's base checkpoint comes from, for `run` and `sim`.
#[derive(clap::Args, Clone)]
pub(crate) struct BaseArgs {
    /// A local copy of the coordinator's checkpoint (config.json, model.safetensors,
    /// tokenizer.json); it must match the coordinator's digests. Unset: the cache, else fetched
    /// once from the coordinator.
    #[arg(long, env = "FLOTILLA_MODEL_DIR")]
    pub(crate) model_dir: Option<PathBuf>,
    /// Cache for fetched checkpoints (`<cache>/bases/<sha256>/`); default: $FLOTILLA_CACHE, else
    /// ~/.cache/flotilla.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// KiB asked for per checkpoint fetch request (the coordinator sends at most 768).
    #[arg(long, default_value_t = 768, value_parser = clap::value_parser!(u32).range(1..=768))]
    fetch_chunk_kib: u32,
    /// The largest checkpoint (all its files) this device stores or fetches, in MiB.
    #[arg(long, default_value_t = 4096)]
    max_base_mib: u64,
    /// The most all cached checkpoints may hold together, in MiB: before a fetch, the least
    /// recently used ones are evicted to make room.
    #[arg(long, default_value_t = 8192)]
    max_cache_mib: u64,
}

impl BaseArgs {
    pub(crate) fn store(&self) -> std::sync::Arc<BaseStore> {
        std::sync::Arc::new(BaseStore {
            model_dir: self.model_dir.clone(),
            cache: self.cache_dir.clone().unwrap_or_else(BaseStore::default_cache),
            chunk_bytes: self.fetch_chunk_kib * 1024,
            max_bytes: self.max_base_mib.saturating_mul(1 << 20),
            max_cache_bytes: self.max_cache_mib.saturating_mul(1 << 20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_larger_than_the_device_accepts_is_refused_before_any_fetch() {
        let store = BaseStore {
            model_dir: None,
            cache: PathBuf::from("/nonexistent"),
            chunk_bytes: 1024,
            max_bytes: 100,
            max_cache_bytes: 1000,
        };
        let file = |name: &str, size| CheckpointFile { name: name.into(), size, sha256: "ab".repeat(32) };
        store.check_declared(&[file("config.json", 40), file("model.safetensors", 60)]).unwrap();
        let error = store.check_declared(&[file("config.json", 40), file("model.safetensors", 61)]).unwrap_err();
        assert!(
            matches!(&error, StoreError::Fatal(m) if m.contains("101 bytes") && m.contains("--max-base-mib")),
            "{error}"
        );
        let huge = store.check_declared(&[file("a", u64::MAX), file("b", u64::MAX)]).unwrap_err();
        assert!(huge.to_string().contains(&u64::MAX.to_string()), "saturates: {huge}");
        assert!(store.check_declared(&[file("../x", 1)]).unwrap_err().to_string().contains("cannot be stored safely"));
    }

    #[test]
    fn only_plain_file_names_are_stored() {
        assert!(is_plain_name("model.safetensors"));
        for bad in ["", ".", "..", "../x", "a/b", "a\\b", ".lock"] {
            assert!(!is_plain_name(bad), "{bad}");
        }
    }

    #[test]
    fn a_local_copy_is_compared_file_by_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.json"), b"{}").unwrap();
        let digest = sha256_file(&dir.path().join("a.json")).unwrap();
        let same = CheckpointFile { name: "a.json".into(), size: 2, sha256: digest };
        assert!(differences(dir.path(), std::slice::from_ref(&same)).is_empty());
        let other = CheckpointFile { sha256: "0".repeat(64), ..same };
        let found = differences(dir.path(), &[other]);
        assert!(found[0].contains("a.json has sha256"), "{found:?}");
    }
}
