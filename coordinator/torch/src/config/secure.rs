//! `[secure_aggregation]`: the section's settings, their checks against the rest of the
//! configuration, and each round's SecAgg+ parameters (`crate::serve::secure` runs the rounds).

use flotilla_secagg::Parameters;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationSection {
    /// Shares needed to rebuild a device's secret, and the fewest devices a round can finish
    /// with. Unset: a majority of each device's neighbours (⌊d/2⌋ + 1, at least 2).
    #[serde(default)]
    pub threshold: Option<usize>,
    /// Neighbours each device shares its secrets with (every other device when the round is
    /// smaller).
    #[serde(default = "default_degree")]
    pub degree: usize,
    /// Every weighted value is clipped to [−range, range] before quantization.
    #[serde(default = "default_range")]
    pub range: f32,
    /// The most devices a round may have: the quantization scale keeps their sum in the ring.
    #[serde(default = "default_max_participants")]
    pub max_participants: usize,
    /// A device weighs its update by min(samples, max_samples) / max_samples (with
    /// `weighting = "samples"`).
    #[serde(default = "default_max_samples")]
    pub max_samples: u64,
    /// `equal` (the default): every device's update weighs the same, so the weight sums reveal
    /// only how many devices took part; `samples`: by capped sample count, which the coordinator
    /// can recover for each device by differencing the sums of rounds with different members.
    #[serde(default)]
    pub weighting: SecureWeighting,
    /// How long the keys, shares and unmask phases each wait for late devices.
    #[serde(default = "default_phase_secs")]
    pub phase_secs: u32,
}

/// How a device weighs its update under secure aggregation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecureWeighting {
    #[default]
    Equal,
    Samples,
}

impl SecureWeighting {
    /// The sample cap devices are sent: 1 weighs every device (at least one sample) as 1.
    pub fn cap(self, max_samples: u64) -> u64 {
        match self {
            SecureWeighting::Equal => 1,
            SecureWeighting::Samples => max_samples,
        }
    }
}

fn default_degree() -> usize {
    16
}
fn default_range() -> f32 {
    8.0
}
fn default_max_participants() -> usize {
    1000
}
fn default_max_samples() -> u64 {
    1000
}
fn default_phase_secs() -> u32 {
    60
}

impl SecureAggregationSection {
    /// The settings, and that the rest of the configuration can run under secure aggregation.
    pub fn validate(&self, config: &super::CoordinatorConfig) -> anyhow::Result<()> {
        let method = config.aggregation.method;
        if let Some(why) = flotilla_torch::aggregate::secure::why_not_secure(method) {
            anyhow::bail!(
                "[aggregation] method = \"{method}\"{} cannot run under [secure_aggregation]: {why}; set method to {}",
                method.default_note(),
                flotilla_merge::method::Method::names_where(|m| m.secure.is_ok())
            );
        }
        anyhow::ensure!(
            !config.privacy.as_ref().is_some_and(|p| p.mode == super::privacy::PrivacyMode::Central),
            "[privacy] mode = \"central\" cannot run under [secure_aggregation]: the coordinator would need each \
             clipped update in the clear; use mode = \"distributed\" (docs/privacy.md)"
        );
        anyhow::ensure!(
            !config.aggregation.record_updates,
            "[aggregation] record_updates cannot run under [secure_aggregation]: the coordinator never holds one \
             device's update"
        );
        anyhow::ensure!(
            !config.aggregation.ablation_shrink_to_round_rank,
            "[aggregation] ablation_shrink_to_round_rank cannot run under [secure_aggregation]"
        );
        anyhow::ensure!(self.phase_secs >= 1, "secure_aggregation.phase_secs must be at least 1");
        anyhow::ensure!(self.max_samples >= 1, "secure_aggregation.max_samples must be at least 1");
        let parameters = self.parameters_for(self.max_participants.max(3))?;
        parameters.validate().map_err(|e| anyhow::anyhow!("[secure_aggregation]: {e}"))?;
        self.parameters_for(config.round.min_devices).map_err(|e| {
            anyhow::anyhow!("{e}; [round] min_devices = {} lets a round start that small", config.round.min_devices)
        })?;
        Ok(())
    }

    /// Distributed privacy: `range` must hold a device's clipped change (at most C) plus six
    /// standard deviations of the largest noise share any device adds (σC/√m for the fewest
    /// contributors m a revealed sum can need), or the noise would be clipped and the sums would no
    /// longer be the Gaussian mechanism the accountant assumes.
    pub fn check_noise_range(&self, privacy: &crate::config::privacy::PrivacySection) -> anyhow::Result<()> {
        let smallest = self.round_size().min;
        let holders = self.parameters_for(smallest)?.min_holders();
        let contributors = privacy.contributors_needed(holders);
        let share = privacy.noise_multiplier * privacy.clip_norm / (contributors as f64).sqrt();
        let needed = 6.0 * share + privacy.clip_norm;
        anyhow::ensure!(
            f64::from(self.range) >= needed,
            "[secure_aggregation] range = {} would clip the distributed noise: a revealed sum may have as few as \
             {contributors} contributors (a round of {smallest}, {holders} holders, max_dropout {}), each adding noise \
             of standard deviation σC/√{contributors} = {share:.3} to a change of norm at most C = {}; set range to at \
             least 6·{share:.3} + {} = {needed:.2}",
            self.range,
            privacy.max_dropout,
            privacy.clip_norm,
            privacy.clip_norm
        );
        Ok(())
    }

    /// The sizes a secure round can have: from the smallest whose degree reaches the threshold to
    /// `max_participants`. The engine never sends a task for a round outside them.
    pub fn round_size(&self) -> flotilla_engine::RoundSize {
        let max = self.max_participants.max(1);
        let min = (1..=max).find(|&n| self.parameters_for(n).is_ok()).unwrap_or(max + 1);
        flotilla_engine::RoundSize { min, max }
    }

    /// The round's parameters for `participants` devices. Their degree is the number of
    /// neighbours each device really has: `degree` rounded up to even (the graph is circulant), or
    /// every other device in a smaller round. The threshold must be above half of it, so that a
    /// coordinator that lied could not rebuild both of a device's secrets from two halves.
    pub fn parameters_for(&self, participants: usize) -> anyhow::Result<Parameters> {
        let neighbours = (self.degree.div_ceil(2) * 2).min(participants.saturating_sub(1));
        let threshold = self.threshold.unwrap_or((neighbours / 2 + 1).max(2));
        anyhow::ensure!(
            threshold <= neighbours,
            "in a round of {participants} device(s) each has {neighbours} neighbour(s), fewer than the secure \
             aggregation threshold {threshold}: it needs rounds of at least {} devices",
            threshold + 1
        );
        anyhow::ensure!(
            2 * threshold > neighbours,
            "in a round of {participants} devices each has {neighbours} neighbours, and a threshold of {threshold} is \
             not above half of them (a coordinator that lied could rebuild both of a device's secrets); set \
             [secure_aggregation] threshold to at least {}",
            neighbours / 2 + 1
        );
        Ok(Parameters { threshold, degree: neighbours, range: self.range, max_participants: self.max_participants })
    }
}
