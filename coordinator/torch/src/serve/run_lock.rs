//! One coordinator per run directory: `serve` holds an exclusive lock on `<run_dir>/coordinator.lock`
//! for as long as it runs, with its process id and address written in it. A second `serve` on the
//! same directory is refused with the holder's pid and address, before it writes anything (two
//! coordinators would overwrite each other's rounds). The lock dies with its process, so a lock
//! file left by a crash is taken over at once.

use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::Context;

pub const FILE: &str = "coordinator.lock";

/// The held lock; released when dropped (or when the process ends, however it ends).
pub struct RunLock {
    file: std::fs::File,
}

impl RunLock {
    /// Takes the lock of `run_dir`, or says who holds it.
    pub fn take(run_dir: &Path) -> anyhow::Result<RunLock> {
        let path = run_dir.join(FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        if file.try_lock().is_err() {
            anyhow::bail!("{}", in_use(run_dir, &read_holder(&mut file)));
        }
        let mut lock = RunLock { file };
        lock.record(&format!("pid {}", std::process::id()))?;
        Ok(lock)
    }

    /// Who holds the lock of `run_dir` now, if anyone, found without creating or taking anything
    /// (a lock tried and at once released).
    pub fn holder(run_dir: &Path) -> anyhow::Result<Option<String>> {
        let path = run_dir.join(FILE);
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error).with_context(|| format!("cannot open {}", path.display())),
        };
        if file.try_lock_shared().is_ok() {
            return Ok(None);
        }
        Ok(Some(read_holder(&mut file)))
    }

    /// Writes who holds the lock (the pid, and the address once it listens) for a refused second.
    pub fn record(&mut self, holder: &str) -> anyhow::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(holder.as_bytes())?;
        self.file.sync_all()?;
        Ok(())
    }
}

/// What a holder wrote in the lock file, on one line.
fn read_holder(file: &mut std::fs::File) -> String {
    let mut holder = String::new();
    let _ = file.read_to_string(&mut holder);
    holder.trim().replace('\n', ", ")
}

/// Why a run directory cannot be used: another coordinator, `holder`, has it.
pub fn in_use(run_dir: &Path, holder: &str) -> String {
    format!(
        "run directory {} is in use by another coordinator ({holder}); stop it, or give this one another \
         [server] run_dir",
        run_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_details_and_a_released_lock_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = RunLock::take(dir.path()).unwrap();
        first.record(&format!("pid {}, listening on 127.0.0.1:4433", std::process::id())).unwrap();
        let refused = RunLock::take(dir.path()).err().unwrap().to_string();
        assert!(refused.contains("in use by another coordinator") && refused.contains("127.0.0.1:4433"), "{refused}");
        let seen = RunLock::holder(dir.path()).unwrap().unwrap();
        assert!(seen.contains("127.0.0.1:4433"), "{seen}");
        drop(first);
        assert_eq!(RunLock::holder(dir.path()).unwrap(), None);
        // The file is still there, as after a crash: the lock is free, and taken.
        assert!(dir.path().join(FILE).exists());
        RunLock::take(dir.path()).unwrap();
    }
}
