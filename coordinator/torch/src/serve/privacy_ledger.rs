//! Under `[privacy]`: how many rounds have drawn devices in this run directory, written and synced
//! to disk before a round's tasks go out. A round that runs again after a restart (its first run
//! was sampled, maybe released, then lost) is counted again, and so is every run in the same
//! directory, `--fresh` ones included: ε is spent per sampled round, not per checkpoint.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

pub const FILE: &str = "privacy-ledger.json";

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Entries {
    /// Rounds that drew devices (or drew none, which costs the same), over every run here.
    sampled_rounds: u32,
    /// The round number the last of them had.
    last_round: u32,
}

pub struct PrivacyLedger {
    path: PathBuf,
    entries: Entries,
}

impl PrivacyLedger {
    /// The ledger of `run_dir` (empty when there is none yet); a file that cannot be read is an
    /// error, never a fresh budget.
    pub fn open(run_dir: &Path) -> anyhow::Result<PrivacyLedger> {
        let path = run_dir.join(FILE);
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!("{}: the privacy ledger is unreadable; the budget spent cannot be known", path.display())
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Entries::default(),
            Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(PrivacyLedger { path, entries })
    }

    /// Rounds sampled so far in this run directory.
    pub fn sampled(&self) -> u32 {
        self.entries.sampled_rounds
    }

    /// Counts `round` as sampled and syncs it to disk; returns the count.
    pub fn record(&mut self, round: u32) -> anyhow::Result<u32> {
        let next = Entries { sampled_rounds: self.entries.sampled_rounds + 1, last_round: round };
        let bytes = serde_json::to_vec_pretty(&next)?;
        flotilla_torch::adapter::write_atomically(&self.path, &bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
        self.entries = next;
        Ok(self.entries.sampled_rounds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_survives_a_restart_and_a_corrupt_ledger_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = PrivacyLedger::open(dir.path()).unwrap();
        assert_eq!(ledger.sampled(), 0);
        ledger.record(1).unwrap();
        ledger.record(2).unwrap();
        // The coordinator dies in round 2 and runs it again: it costs again.
        let mut again = PrivacyLedger::open(dir.path()).unwrap();
        assert_eq!(again.sampled(), 2);
        assert_eq!(again.record(2).unwrap(), 3);
        std::fs::write(dir.path().join(FILE), b"{").unwrap();
        let error = PrivacyLedger::open(dir.path()).err().unwrap().to_string();
        assert!(error.contains("unreadable"), "{error}");
    }
}
