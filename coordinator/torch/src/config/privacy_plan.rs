//! What a `[privacy]` configuration will cost the model, before any device joins.
//!
//! Every noised coordinate of the averaged update gets noise of standard deviation σ·C / n, n the
//! expected cohort (q·N: the sampling rate times the population), so the noise on the whole
//! averaged update has an L2 norm of about σ·C·√d / n over d noised coordinates, against a signal
//! of at most C (each device's change is clipped to C). The ratio σ·√d / n says whether a run can
//! learn: far above 1 the update is mostly noise; a cohort of σ·√d brings it to 1, ten times that to
//! 0.1. `check` prints the plan, `serve` logs it and `/status` serves it.

use flotilla_torch::adapter::{tensor_role, TensorRole};
use flotilla_torch::aggregate::{noised_coordinates, Trainable};
use flotilla_torch::model::ArchitectureExt;
use serde::{Deserialize, Serialize};

use crate::config::CoordinatorConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyPlan {
    /// d: the coordinates the noise is added to (every LoRA factor at R_max, and the head).
    pub noised_coordinates: u64,
    /// What devices train (`b_only`: every A frozen, so only B and the head count in d).
    pub trainable: Trainable,
    /// The head's share of d (the classifier trained beside the factors).
    pub head_coordinates: u64,
    /// N: `[privacy] population`, or `[round] min_devices` without it.
    pub population: usize,
    /// n = q·N, the devices expected in a round.
    pub expected_cohort: f64,
    /// σ·√d / n: the noise's L2 norm on the averaged update over the largest signal, C.
    pub noise_to_signal: f64,
    /// σ·√d: the cohort for a ratio of 1.
    pub cohort_for_ratio_1: f64,
    /// 10·σ·√d: the cohort for a ratio of 0.1.
    pub cohort_for_ratio_tenth: f64,
}

impl PrivacyPlan {
    /// The plan of `config`'s `[privacy]` section, or `None` without one.
    pub fn of(config: &CoordinatorConfig) -> anyhow::Result<Option<PrivacyPlan>> {
        let Some(privacy) = &config.privacy else { return Ok(None) };
        let adapter =
            config.model.architecture.init_adapter(config.aggregation.max_rank as usize, config.model.seed)?;
        let noised = noised_coordinates(&adapter, privacy.trainable) as u64;
        let head: u64 = adapter
            .tensors()
            .iter()
            .filter(|(name, _)| matches!(tensor_role(name), TensorRole::Other))
            .map(|(_, t)| t.numel() as u64)
            .sum();
        let population = privacy.population.unwrap_or(config.round.min_devices);
        let expected_cohort = config.round.fraction * population as f64;
        let scale = privacy.noise_multiplier * (noised as f64).sqrt();
        Ok(Some(PrivacyPlan {
            noised_coordinates: noised,
            trainable: privacy.trainable,
            head_coordinates: head,
            population,
            expected_cohort,
            noise_to_signal: if expected_cohort > 0.0 { scale / expected_cohort } else { f64::INFINITY },
            cohort_for_ratio_1: scale,
            cohort_for_ratio_tenth: 10.0 * scale,
        }))
    }

    pub fn describe(&self) -> String {
        format!(
            "privacy plan: d = {} noised coordinates ({:.1}% of them the head; devices train {}); expected cohort n = q·N = {:.1} of N = \
             {}; noise/signal on the averaged update σ·√d/n = {:.2}; a ratio of 1 needs n ≈ {:.0} devices per round, \
             0.1 needs n ≈ {:.0}",
            self.noised_coordinates,
            100.0 * self.head_coordinates as f64 / self.noised_coordinates.max(1) as f64,
            match self.trainable {
                Trainable::Lora => "every LoRA factor",
                Trainable::BOnly => "each B and the head, every A frozen",
            },
            self.expected_cohort,
            self.population,
            self.noise_to_signal,
            self.cohort_for_ratio_1.ceil(),
            self.cohort_for_ratio_tenth.ceil(),
        )
    }

    /// The warning a run whose noise swamps its signal gets.
    pub fn warning(&self) -> Option<String> {
        (self.noise_to_signal > 1.0).then(|| {
            format!(
                "warning: this run will learn almost nothing: the noise on each round's averaged update is about \
                 {:.1}× the largest possible signal (σ·√d/n with d = {}, n = {:.1}); raise the cohort to about {:.0} \
                 devices per round (q·N), or lower σ (and so spend more ε per round), or noise fewer coordinates",
                self.noise_to_signal,
                self.noised_coordinates,
                self.expected_cohort,
                self.cohort_for_ratio_1.ceil()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> CoordinatorConfig {
        toml::from_str(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"/tmp/x\"\n[tls]\nkit = \"k\"\n\
             [round]\nmin_devices = 12\nfraction = 0.5\n[aggregation]\nmethod = \"rbla\"\nmax_rank = 4\n\
             [model.architecture.mlp]\ninput = 10\nhidden = [8]\nclasses = 3\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn the_plan_counts_the_noised_coordinates_and_predicts_the_noise_to_signal_ratio() {
        assert_eq!(PrivacyPlan::of(&config("")).unwrap(), None);
        let private = "[privacy]\nclip_norm = 0.1\nnoise_multiplier = 1.0\nepsilon = 8.0\ndelta = 1e-4\n";
        let plan = PrivacyPlan::of(&config(private)).unwrap().unwrap();
        // LoRA on fc1 (10 → 8) at rank 4: A 4×10 + B 8×4; and the head's 3×8 weights and 3 biases.
        assert_eq!(plan.noised_coordinates, 40 + 32 + 24 + 3);
        assert_eq!(plan.head_coordinates, 27);
        assert_eq!((plan.population, plan.expected_cohort), (12, 6.0));
        let root_d = (plan.noised_coordinates as f64).sqrt();
        assert!((plan.noise_to_signal - root_d / 6.0).abs() < 1e-12);
        assert!((plan.cohort_for_ratio_tenth - 10.0 * root_d).abs() < 1e-9);
        let warning = plan.warning().unwrap();
        assert!(warning.contains("will learn almost nothing") && warning.contains("n = 6.0"), "{warning}");
        // A population large enough: no warning.
        let large = PrivacyPlan::of(&config(&format!("{private}population = 1000\n"))).unwrap().unwrap();
        assert!(large.noise_to_signal < 1.0 && large.warning().is_none(), "{large:?}");
    }
}
