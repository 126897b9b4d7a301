//! A device's own privacy ledger (`--privacy-budget`): the device counts what every round it
//! trains in under `[privacy]` costs it, per federation (keyed by the CA that issued its kit),
//! on disk before it trains, and refuses a round that would take it past its own (ε, δ). Whatever
//! the coordinator's run directories, restarts or `--fresh` runs, this device's data is not spent
//! beyond its budget.
//!
//! The accounting needs nothing the device cannot see: each round it takes part in is counted as
//! a full-participation Gaussian mechanism of the task's noise multiplier σ (sensitivity 1 after
//! clipping), which is ρ = 1/(2σ²)-zCDP (Bun and Steinke 2016); ρ adds over rounds, and
//! ε = ρ + 2·√(ρ·ln(1/δ)). Rounds it was not sampled into cost it nothing here, and no
//! amplification by subsampling is claimed, so this bounds the device's loss from above.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Entries {
    /// Σ 1/(2σ²) over the rounds trained in.
    rho: f64,
    /// Rounds trained in.
    rounds: u32,
}

pub struct DevicePrivacyBudget {
    path: PathBuf,
    epsilon: f64,
    delta: f64,
    entries: Entries,
}

/// ε of ρ-zCDP at δ.
fn epsilon_of(rho: f64, delta: f64) -> f64 {
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

impl DevicePrivacyBudget {
    /// The ledger for the federation of the CA in `ca_cert`, under `dir`.
    pub fn open(dir: &Path, ca_cert: &Path, epsilon: f64, delta: f64) -> anyhow::Result<DevicePrivacyBudget> {
        anyhow::ensure!(
            epsilon.is_finite() && epsilon > 0.0,
            "--privacy-budget must be a positive number, got {epsilon}"
        );
        anyhow::ensure!(delta > 0.0 && delta < 1.0, "--privacy-delta must be in (0, 1), got {delta}");
        let federation = flotilla_wire::files::sha256_file(ca_cert)
            .with_context(|| format!("cannot read the kit's CA {}", ca_cert.display()))?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{federation}.json"));
        let entries = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: this device's privacy ledger is unreadable", path.display()))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Entries::default(),
            Err(error) => return Err(error).with_context(|| format!("cannot read {}", path.display())),
        };
        Ok(DevicePrivacyBudget { path, epsilon, delta, entries })
    }

    /// ε spent so far in this federation.
    pub fn spent(&self) -> f64 {
        epsilon_of(self.entries.rho, self.delta)
    }

    /// Admits round `round` of noise multiplier `noise_multiplier` (the task's), recording it on
    /// disk first; refuses, with the reason, a round without one or one past the budget.
    pub fn admit(&mut self, round: u32, noise_multiplier: Option<f64>) -> Result<f64, String> {
        let sigma = noise_multiplier.filter(|s| s.is_finite() && *s > 0.0).ok_or_else(|| {
            format!("round {round} runs without [privacy] noise; --privacy-budget refuses to train in it")
        })?;
        let next = Entries { rho: self.entries.rho + 1.0 / (2.0 * sigma * sigma), rounds: self.entries.rounds + 1 };
        let after = epsilon_of(next.rho, self.delta);
        if after > self.epsilon {
            return Err(format!(
                "round {round} (noise multiplier {sigma}) would take this device to ε = {after:.3} at δ = {} after {} \
                 round(s), past its --privacy-budget of {}; ε spent so far {:.3} (ledger {})",
                self.delta,
                next.rounds,
                self.epsilon,
                self.spent(),
                self.path.display()
            ));
        }
        let bytes = serde_json::to_vec_pretty(&next).map_err(|e| e.to_string())?;
        flotilla_wire::files::write_atomically(&self.path, &bytes).map_err(|e| e.to_string())?;
        self.entries = next;
        Ok(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_add_up_across_restarts_and_the_budget_refuses_the_round_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::write(&ca, b"a CA").unwrap();
        // σ = 4: ρ = 1/32 a round; at δ = 1e-5, one round is ε 1.231, two 1.759, three 2.172.
        let mut budget = DevicePrivacyBudget::open(&dir.path().join("ledger"), &ca, 2.0, 1e-5).unwrap();
        let first = budget.admit(1, Some(4.0)).unwrap();
        assert!((first - 1.2309).abs() < 1e-3, "{first}");
        let mut again = DevicePrivacyBudget::open(&dir.path().join("ledger"), &ca, 2.0, 1e-5).unwrap();
        assert!((again.spent() - first).abs() < 1e-12, "the ledger is on disk");
        assert!((again.admit(2, Some(4.0)).unwrap() - 1.7590).abs() < 1e-3);
        let refused = again.admit(3, Some(4.0)).unwrap_err();
        assert!(refused.contains("past its --privacy-budget of 2"), "{refused}");
        assert!(again.admit(3, None).unwrap_err().contains("without [privacy] noise"));
        // Another CA is another federation, with a ledger of its own.
        std::fs::write(&ca, b"another CA").unwrap();
        let other = DevicePrivacyBudget::open(&dir.path().join("ledger"), &ca, 2.0, 1e-5).unwrap();
        assert_eq!(other.spent(), 0.0);
    }
}
