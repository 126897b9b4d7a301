//! `[privacy]`: device-level differential privacy for the slot-wise methods (docs/privacy.md).
//!
//! Central mode: every device clips the change of its update to `clip_norm` (the round task tells
//! it the bound), the coordinator refuses an update beyond it, sums the changes with equal weights
//! and adds Gaussian noise of standard deviation `noise_multiplier · clip_norm` to every sum
//! (`flotilla_torch::aggregate::PrivateSums`). Rounds sample devices by Poisson sampling at
//! `[round] fraction`, so the run is the subsampled Gaussian mechanism composed over rounds, which
//! the Rényi-DP accountant (`flotilla_engine::accountant`) turns into (ε, δ). The noise multiplier
//! and the sampling rate are fixed for the run, so the budget fixes how many rounds may run; the
//! run ends before the first round that would take ε above `epsilon`.

use anyhow::{bail, ensure};
use flotilla_engine::accountant::{default_orders, epsilon_from_rdp, RdpAccountant};
use flotilla_merge::method::Method;
use flotilla_torch::aggregate::{why_not_private, PrivacyParameters};
use serde::{Deserialize, Serialize};

/// Who adds the noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrivacyMode {
    /// The coordinator adds it to the sums: the guarantee holds against everyone who sees the
    /// global models (devices, users of the exported adapter), provided the operator is trusted.
    #[default]
    Central,
    /// Each device adds its share under secure aggregation, so the sums the coordinator unmasks
    /// already carry noise of standard deviation σ·C: the guarantee holds against the operator too.
    Distributed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    #[serde(default)]
    pub mode: PrivacyMode,
    /// C: the bound on the L2 norm of each device's change (its LoRA factors and head).
    pub clip_norm: f64,
    /// σ: the noise on each sum has standard deviation σ·C.
    pub noise_multiplier: f64,
    /// The ε budget: no round starts that would take the run's ε above it.
    pub epsilon: f64,
    /// δ of the (ε, δ) guarantee: at most 1/(10·N) for the N devices of `population` (or of
    /// `[round] min_devices` when it is unset).
    pub delta: f64,
    /// How many devices' data the run covers (the fleet the sample is drawn from): δ is checked
    /// against it. Unset: `[round] min_devices`, the fewest a round starts with.
    #[serde(default)]
    pub population: Option<usize>,
    /// Distributed mode: the share of a round's devices covering a slot that may drop while the
    /// sum keeps its full noise. Each device adds noise for ⌈(1 − max_dropout)·n⌉ contributors of
    /// the n covering the slot, and a round with fewer survivors is discarded unrevealed.
    #[serde(default = "default_max_dropout")]
    pub max_dropout: f64,
    /// What devices train: `"lora"`, every factor; `"b_only"`, each B and the head with every A
    /// frozen at the global's (FFA-LoRA): the merge stays exact and about half the coordinates
    /// carry noise.
    #[serde(default)]
    pub trainable: flotilla_torch::aggregate::Trainable,
}

fn default_max_dropout() -> f64 {
    0.2
}

impl PrivacySection {
    /// Distributed mode: the fewest devices whose noise a sum covered by `covering` devices must
    /// hold.
    pub fn contributors_needed(&self, covering: usize) -> usize {
        ((1.0 - self.max_dropout) * covering as f64).ceil().max(1.0) as usize
    }

    pub fn parameters(&self) -> PrivacyParameters {
        PrivacyParameters {
            clip_norm: self.clip_norm,
            noise_multiplier: self.noise_multiplier,
            trainable: self.trainable,
        }
    }

    /// Every setting, and that the budget pays for at least one round.
    pub fn validate(&self, method: Method, min_devices: usize, sampling_rate: f64, shrink: bool) -> anyhow::Result<()> {
        let positive = |value: f64, key: &str| -> anyhow::Result<()> {
            ensure!(value.is_finite() && value > 0.0, "privacy.{key} must be a positive number, got {value}");
            Ok(())
        };
        positive(self.clip_norm, "clip_norm")?;
        positive(self.noise_multiplier, "noise_multiplier")?;
        positive(self.epsilon, "epsilon")?;
        ensure!(
            (0.0..1.0).contains(&self.max_dropout),
            "privacy.max_dropout must be in [0, 1), got {}",
            self.max_dropout
        );
        let (devices, source) = match self.population {
            Some(n) => (n.max(min_devices).max(1), "privacy.population"),
            None => (min_devices.max(1), "[round] min_devices (set privacy.population to the fleet's size)"),
        };
        let most = 1.0 / (10.0 * devices as f64);
        ensure!(
            // The tolerance lets δ = 0.1/N written in decimal pass.
            self.delta > 0.0 && self.delta <= most * (1.0 + 1e-9),
            "privacy.delta must lie in (0, 1/(10·N)] for the N = {devices} devices of {source}, that is at most \
             {most:.3e}, got {}: with δ near 1/N a mechanism may reveal one device's data outright",
            self.delta
        );
        if let Some(why) = why_not_private(method) {
            bail!(
                "[aggregation] method = \"{method}\"{} cannot run under [privacy]: {why}; set method to {}",
                method.default_note(),
                flotilla_merge::method::Method::names_where(|m| m.private.is_ok())
            );
        }
        ensure!(!shrink, "[aggregation] ablation_shrink_to_round_rank cannot run under [privacy]");
        let one = self.epsilon_after(sampling_rate, 1)?;
        ensure!(
            one <= self.epsilon,
            "the privacy budget ε = {} cannot pay for one round: one round with noise multiplier {} at sampling rate \
             {sampling_rate} costs ε = {one:.3} at δ = {}; raise privacy.noise_multiplier or privacy.epsilon, or \
             lower [round] fraction",
            self.epsilon,
            self.noise_multiplier,
            self.delta
        );
        Ok(())
    }

    /// ε after `rounds` rounds at `sampling_rate`.
    pub fn epsilon_after(&self, sampling_rate: f64, rounds: u32) -> anyhow::Result<f64> {
        // No round sampled, nothing published: the accountant's conversion from Rényi DP would
        // still give a small positive ε (its log(1/δ)/(α − 1) term).
        if rounds == 0 {
            return Ok(0.0);
        }
        let (epsilon, _) = RdpAccountant::new()
            .epsilon_after(self.noise_multiplier, sampling_rate, rounds, self.delta)
            .map_err(|e| anyhow::anyhow!("privacy accountant: {e}"))?;
        Ok(epsilon)
    }

    /// What the budget allows over at most `rounds` rounds at `sampling_rate`.
    pub fn budget(&self, sampling_rate: f64, rounds: u32) -> anyhow::Result<Budget> {
        let per_round = RdpAccountant::new()
            .rounds_rdp(self.noise_multiplier, sampling_rate, 1)
            .map_err(|e| anyhow::anyhow!("privacy accountant: {e}"))?;
        let orders = default_orders();
        let mut epsilon_after = Vec::new();
        for t in 1..=rounds {
            let total: Vec<f64> = per_round.iter().map(|r| r * f64::from(t)).collect();
            let (epsilon, _) = epsilon_from_rdp(&orders, &total, self.delta)
                .map_err(|e| anyhow::anyhow!("privacy accountant: {e}"))?;
            if epsilon > self.epsilon {
                break;
            }
            epsilon_after.push(epsilon);
        }
        Ok(Budget { epsilon_after, rounds_configured: rounds })
    }
}

/// The rounds a budget allows and the ε after each.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// ε after rounds 1, 2, … (as many as the budget allows, at most the configured rounds).
    pub epsilon_after: Vec<f64>,
    pub rounds_configured: u32,
}

impl Budget {
    pub fn rounds_allowed(&self) -> u32 {
        self.epsilon_after.len() as u32
    }

    /// ε once `rounds` rounds have run (0 before the first).
    pub fn epsilon_at(&self, rounds: u32) -> f64 {
        match rounds {
            0 => 0.0,
            r => self.epsilon_after.get(r as usize - 1).copied().unwrap_or(f64::INFINITY),
        }
    }

    /// Whether the budget, not the configured rounds, ends the run.
    pub fn cuts_the_run(&self) -> bool {
        self.rounds_allowed() < self.rounds_configured
    }
}

/// What the run summary records about privacy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacySummary {
    pub mode: PrivacyMode,
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    pub sampling_rate: f64,
    pub delta: f64,
    pub epsilon_budget: f64,
    /// ε of the rounds run so far.
    pub epsilon_spent: f64,
    pub rounds_allowed: u32,
    pub rounds_configured: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(noise_multiplier: f64, epsilon: f64, delta: f64) -> PrivacySection {
        PrivacySection {
            mode: PrivacyMode::Central,
            clip_norm: 1.0,
            noise_multiplier,
            epsilon,
            delta,
            population: None,
            max_dropout: 0.2,
            trainable: Default::default(),
        }
    }

    #[test]
    fn bad_settings_are_clear_errors() {
        let ok = section(1.0, 8.0, 1e-3);
        ok.validate(Method::Rbla, 12, 1.0, false).unwrap();
        ok.validate(Method::FoldAndFill, 12, 0.5, false).unwrap();
        let error = |s: PrivacySection, method: Method| s.validate(method, 12, 1.0, false).unwrap_err().to_string();
        assert!(error(PrivacySection { clip_norm: 0.0, ..ok.clone() }, Method::Rbla).contains("privacy.clip_norm"));
        assert!(error(PrivacySection { clip_norm: -1.0, ..ok.clone() }, Method::Rbla).contains("privacy.clip_norm"));
        assert!(error(section(0.0, 8.0, 1e-3), Method::Rbla).contains("privacy.noise_multiplier"));
        assert!(error(section(f64::NAN, 8.0, 1e-3), Method::Rbla).contains("privacy.noise_multiplier"));
        assert!(error(section(1.0, -2.0, 1e-3), Method::Rbla).contains("privacy.epsilon"));
        // δ must be at most 1/(10·12), or 1/(10·N) for a configured population of N.
        assert!(error(section(1.0, 8.0, 1.0 / 12.0), Method::Rbla).contains("privacy.delta"));
        assert!(error(section(1.0, 8.0, 1e-2), Method::Rbla).contains("at most 8.333e-3"));
        section(1.0, 8.0, 0.1 / 12.0).validate(Method::Rbla, 12, 1.0, false).unwrap();
        let fleet = PrivacySection { population: Some(1000), ..ok.clone() };
        let refused = fleet.validate(Method::Rbla, 12, 1.0, false).unwrap_err().to_string();
        assert!(refused.contains("N = 1000 devices of privacy.population"), "{refused}");
        assert!(error(section(1.0, 8.0, 0.0), Method::Rbla).contains("privacy.delta"));
        assert!(error(ok.clone(), Method::ZeroPad).contains("zero-pad"));
        let flora = error(ok.clone(), Method::Flora);
        assert!(flora.contains("cannot run under [privacy]") && !flora.contains("(the default)"), "{flora}");
        // The default method runs under privacy, so a configuration that names none can add [privacy].
        ok.validate(Method::DEFAULT, 12, 1.0, false).unwrap();
        assert!(ok.validate(Method::Rbla, 12, 1.0, true).unwrap_err().to_string().contains("ablation"));
    }

    #[test]
    fn a_budget_too_small_for_one_round_is_refused_and_a_budget_counts_its_rounds() {
        // One full-participation round at σ = 1 costs several ε at δ = 1e-3.
        let tight = section(1.0, 0.5, 1e-3);
        let error = tight.validate(Method::Rbla, 12, 1.0, false).unwrap_err().to_string();
        assert!(error.contains("cannot pay for one round"), "{error}");
        let loose = section(1.0, 8.0, 1e-3);
        let budget = loose.budget(1.0, 100).unwrap();
        let allowed = budget.rounds_allowed();
        assert!((1..100).contains(&allowed) && budget.cuts_the_run(), "{allowed}");
        assert!(budget.epsilon_at(allowed) <= 8.0);
        assert!(loose.epsilon_after(1.0, allowed + 1).unwrap() > 8.0);
        assert!(budget.epsilon_after.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(budget.epsilon_at(0), 0.0);
        // Subsampling amplifies: at q = 0.1 the same budget pays for many more rounds.
        assert!(loose.budget(0.1, 1000).unwrap().rounds_allowed() > 5 * allowed);
    }
}
