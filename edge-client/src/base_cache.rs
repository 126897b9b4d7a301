//! The total quota of the base cache (`<cache>/bases/<digest>/`): a coordinator that names a new
//! checkpoint digest at every Welcome must not fill the disk. Before a fetch, the least recently
//! used checkpoints are evicted until the new one fits, and a download left half done
//! (`*.partial`) in any other checkpoint is removed. A checkpoint another process is using (its
//! `.lock` held) is never touched.

use std::path::{Path, PathBuf};

use tracing::info;

/// Marks a checkpoint as used now (its modification time orders eviction).
const LAST_USED: &str = ".last-used";

/// One cached checkpoint: its directory, its size, and when it was last used.
struct Entry {
    dir: PathBuf,
    bytes: u64,
    used: std::time::SystemTime,
}

fn size_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
        })
        .unwrap_or(0)
}

fn last_used(dir: &Path) -> std::time::SystemTime {
    std::fs::metadata(dir.join(LAST_USED))
        .or_else(|_| std::fs::metadata(dir))
        .and_then(|m| m.modified())
        .unwrap_or(std::time::UNIX_EPOCH)
}

/// Records that the checkpoint in `dir` is in use now.
pub fn touch(dir: &Path) {
    let path = dir.join(LAST_USED);
    if let Ok(file) = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Whether no other process holds `dir`'s lock (taken and released at once).
fn idle(dir: &Path) -> bool {
    let Ok(lock) = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(".lock")) else {
        return false;
    };
    match lock.try_lock() {
        Ok(()) => {
            let _ = lock.unlock();
            true
        }
        Err(_) => false,
    }
}

/// Makes room in `bases` for `incoming` more bytes in `keep` within `quota` bytes in all: removes
/// stale partial downloads elsewhere, then whole checkpoints, least recently used first. Returns
/// the bytes freed; an error when even an empty cache would not fit `incoming`.
pub fn make_room(bases: &Path, keep: &Path, incoming: u64, quota: u64) -> Result<u64, String> {
    if incoming > quota {
        return Err(format!(
            "the checkpoint is {incoming} bytes, more than the cache's quota of {quota} bytes (--max-cache-mib)"
        ));
    }
    let mut entries: Vec<Entry> = std::fs::read_dir(bases)
        .map(|list| {
            list.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && p != keep)
                .map(|dir| Entry { bytes: size_of(&dir), used: last_used(&dir), dir })
                .collect()
        })
        .unwrap_or_default();
    let mut freed = 0u64;
    for entry in &mut entries {
        let partials =
            std::fs::read_dir(&entry.dir).map(|l| l.flatten().map(|e| e.path()).collect()).unwrap_or(Vec::new());
        for partial in partials.iter().filter(|p| p.extension().is_some_and(|x| x == "partial")) {
            if idle(&entry.dir) {
                let bytes = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
                if std::fs::remove_file(partial).is_ok() {
                    info!(file = %partial.display(), bytes, "base cache: removed a stale partial download");
                    entry.bytes = entry.bytes.saturating_sub(bytes);
                    freed += bytes;
                }
            }
        }
    }
    let kept = size_of(keep);
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum::<u64>() + kept;
    entries.sort_by_key(|e| e.used);
    for entry in entries {
        if total.saturating_add(incoming.saturating_sub(kept)) <= quota {
            break;
        }
        if !idle(&entry.dir) {
            continue;
        }
        if std::fs::remove_dir_all(&entry.dir).is_ok() {
            info!(dir = %entry.dir.display(), bytes = entry.bytes, "base cache: evicted the least recently used checkpoint");
            total = total.saturating_sub(entry.bytes);
            freed += entry.bytes;
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(bases: &Path, name: &str, bytes: usize, age_secs: u64) -> PathBuf {
        let dir = bases.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), vec![0u8; bytes]).unwrap();
        touch(&dir);
        let when = std::time::SystemTime::now() - std::time::Duration::from_secs(age_secs);
        std::fs::File::options().write(true).open(dir.join(LAST_USED)).unwrap().set_modified(when).unwrap();
        dir
    }

    #[test]
    fn the_least_recently_used_checkpoints_go_first_and_partials_elsewhere_are_removed() {
        let cache = tempfile::tempdir().unwrap();
        let bases = cache.path();
        let old = checkpoint(bases, "old", 400, 300);
        let recent = checkpoint(bases, "recent", 400, 10);
        let busy = checkpoint(bases, "busy", 100, 500);
        std::fs::write(busy.join("model.safetensors.partial"), vec![0u8; 50]).unwrap();
        std::fs::write(recent.join("config.json.partial"), vec![0u8; 20]).unwrap();
        let lock = std::fs::File::options().create(true).truncate(false).write(true).open(busy.join(".lock")).unwrap();
        lock.lock().unwrap();
        let new = bases.join("new");
        std::fs::create_dir_all(&new).unwrap();
        // 400 + 420 + 150 held; 500 more within 1,200: the oldest idle one (old) goes, the partial in
        // recent goes, busy is in use and stays whole.
        let freed = make_room(bases, &new, 500, 1200).unwrap();
        assert_eq!(freed, 420);
        assert!(!old.exists() && recent.join("model.safetensors").exists());
        assert!(!recent.join("config.json.partial").exists());
        assert!(busy.join("model.safetensors.partial").exists(), "a checkpoint in use is not touched");
        drop(lock);
        let error = make_room(bases, &new, 2000, 1200).unwrap_err();
        assert!(error.contains("--max-cache-mib"), "{error}");
    }
}
