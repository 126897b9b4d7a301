//! `[federated_evaluation]`: which models the devices score on their own held-out data, how many
//! devices are asked, and how small a group may be published (docs/evaluation.md).

use serde::{Deserialize, Serialize};

/// `[federated_evaluation]`: off when absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FederatedEvaluationSection {
    /// Evaluate the global model after every this many rounds (and always after the last).
    pub every_rounds: u32,
    /// Share of the connected devices asked each time, whether or not they train that round.
    pub fraction: f64,
    /// Totals (overall, of a rank, of a device class) are recorded only when at least this many
    /// devices reported to them: fewer would reveal one device's result.
    pub min_group_devices: usize,
    /// Seconds devices have to report (default: `[round] deadline_secs`).
    pub deadline_secs: Option<u32>,
    /// The cross-rank view: after the last round each device also scores the models the fleet's
    /// other ranks hold, on its own held-out data (a table of each rank's model against each device
    /// class's data). It costs each device one evaluation per rank, and the largest rank's slice.
    pub cross_rank: bool,
    /// A headline-writing decoder: headlines each device writes (its first held-out articles) for
    /// the ROUGE-L F1 it reports; 0 reports loss and next-token accuracy only.
    pub headlines: u32,
}

impl Default for FederatedEvaluationSection {
    fn default() -> Self {
        FederatedEvaluationSection {
            every_rounds: 1,
            fraction: 1.0,
            min_group_devices: 2,
            deadline_secs: None,
            cross_rank: true,
            headlines: 4,
        }
    }
}

impl FederatedEvaluationSection {
    /// Checks the section against the run's privacy settings: under `[privacy]` a device's sums
    /// would need noise of their own, so the run is refused; under `[secure_aggregation]` they
    /// travel masked.
    pub fn validate(&self, privacy: bool) -> anyhow::Result<()> {
        anyhow::ensure!(self.every_rounds >= 1, "federated_evaluation.every_rounds must be at least 1");
        anyhow::ensure!(
            self.fraction > 0.0 && self.fraction <= 1.0,
            "federated_evaluation.fraction must be in (0, 1], got {}",
            self.fraction
        );
        anyhow::ensure!(self.min_group_devices >= 1, "federated_evaluation.min_group_devices must be at least 1");
        anyhow::ensure!(self.deadline_secs != Some(0), "federated_evaluation.deadline_secs must be at least 1");
        anyhow::ensure!(
            !privacy,
            "[federated_evaluation] is refused under [privacy]: the devices' evaluation sums would need noise and an \
             entry in the privacy accountant of their own, which this coordinator does not add yet; remove one of the \
             two sections"
        );
        Ok(())
    }

    /// Seconds devices have to report: `deadline_secs`, or the round's deadline.
    pub fn deadline(&self, round_deadline_secs: u32) -> u32 {
        self.deadline_secs.unwrap_or(round_deadline_secs)
    }

    /// What `check` says about the section (`secure`: under `[secure_aggregation]`).
    pub fn describe(&self, rounds: u32, deadline_secs: u32, secure: bool) -> String {
        let models = if self.every_rounds == 1 {
            "every round's model".to_string()
        } else {
            format!("the model after every {} rounds and after round {rounds}", self.every_rounds)
        };
        let plan = format!(
            "federated evaluation: {models}, scored by {:.0}% of the connected devices on held-out data of their own \
             (15% of theirs unless they say otherwise), reported as sums within {} s; totals published from {} or \
             more devices; cross-rank view of the final model {}; {} greedy headline(s) per device for a \
             headline-writing decoder",
            self.fraction * 100.0,
            self.deadline(deadline_secs),
            self.min_group_devices,
            if self.cross_rank { "on" } else { "off" },
            self.headlines
        );
        if !secure {
            return plan;
        }
        format!(
            "{plan}\nfederated evaluation under secure aggregation: the sums travel masked in a secure sum of the \
             evaluation's own, between rounds; only totals of groups with at least {} devices and threshold + 1 of \
             the devices asked are revealed (docs/evaluation.md)",
            self.min_group_devices
        )
    }

    /// What devices are told in their `Welcome`.
    pub fn plan(&self) -> flotilla_wire::evaluation::EvaluationPlan {
        flotilla_wire::evaluation::EvaluationPlan { headlines: self.headlines }
    }

    /// Whether the model after `round` is evaluated (`last`: the run's last round).
    pub fn due(&self, round: u32, last: u32) -> bool {
        round >= 1 && (round.is_multiple_of(self.every_rounds) || round == last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_due_every_k_rounds_and_after_the_last() {
        let section = FederatedEvaluationSection { every_rounds: 3, ..Default::default() };
        let due: Vec<u32> = (0..=7).filter(|&r| section.due(r, 7)).collect();
        assert_eq!(due, vec![3, 6, 7]);
    }

    #[test]
    fn privacy_refuses_the_section_with_the_reason() {
        let section = FederatedEvaluationSection::default();
        section.validate(false).unwrap();
        assert!(section.validate(true).unwrap_err().to_string().contains("[privacy]"));
        let bad = FederatedEvaluationSection { fraction: 0.0, ..Default::default() };
        assert!(bad.validate(false).is_err());
    }
}
