//! What a device refuses, whatever its coordinator asks: a round that would send its update in
//! the clear (`--require-secure`), and under distributed differential privacy a round whose noise
//! or clipping bound is weaker than its own floors (`--min-noise-multiplier`, `--max-clip-norm`).
//! A refused task is never trained on, and nothing of it is uploaded.

use flotilla_wire::protocol::RoundTask;

/// The device's floors (`flotilla-edge run` flags, or their `FLOTILLA_*` keys in the kit's
/// `edge.env`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrivacyFloor {
    /// Every round must run under secure aggregation.
    pub require_secure: bool,
    /// Under distributed privacy, the noise this device adds, times √(the round's participants),
    /// must be at least this multiple of the clipping bound: σ_i·√n ≥ z·C for each part of its
    /// vector. That is the noise each revealed sum carries when every participant's noise is in
    /// it. Setting it implies `require_secure` and requires noise.
    pub min_noise_multiplier: Option<f64>,
    /// The clipping bound a task may set at most (setting it requires a bound).
    pub max_clip_norm: Option<f64>,
}

impl PrivacyFloor {
    /// Why this device will not take `task`, if it will not.
    pub fn refusal(&self, task: &RoundTask) -> Option<String> {
        let round = task.round;
        let secure_required = self.require_secure || self.min_noise_multiplier.is_some();
        let Some(secure) = task.secure.as_ref() else {
            return secure_required.then(|| {
                format!(
                    "round {round} does not run under secure aggregation; this device refuses to train or upload \
                     in the clear (--require-secure{}); configure [secure_aggregation] on the coordinator",
                    if self.min_noise_multiplier.is_some() { " via --min-noise-multiplier" } else { "" }
                )
            });
        };
        if let Some(max) = self.max_clip_norm {
            match task.clip_norm {
                None => return Some(format!("round {round} sets no clipping bound; --max-clip-norm {max} needs one")),
                Some(c) if !(c.is_finite() && c > 0.0 && c <= max) => {
                    return Some(format!("round {round} clips at {c}, above this device's --max-clip-norm {max}"))
                }
                Some(_) => {}
            }
        }
        let floor = self.min_noise_multiplier?;
        let Some(clip) = task.clip_norm.filter(|c| c.is_finite() && *c > 0.0) else {
            return Some(format!("round {round} sets no clipping bound; --min-noise-multiplier {floor} needs one"));
        };
        if secure.noise_std.is_empty() {
            return Some(format!(
                "round {round} asks for no noise; --min-noise-multiplier {floor} needs distributed privacy \
                 ([privacy] mode = \"distributed\" on the coordinator)"
            ));
        }
        let participants = f64::from(secure.participants.max(1));
        let weakest = secure.noise_std.iter().map(|sd| sd * participants.sqrt() / clip).fold(f64::INFINITY, f64::min);
        (weakest.is_nan() || weakest < floor).then(|| {
            format!(
                "round {round}'s noise is {weakest:.3} times the clipping bound {clip} with all {participants} \
                 participants' noise in a sum, below this device's --min-noise-multiplier {floor}"
            )
        })
    }
}

/// What this device refuses whatever its coordinator asks (docs/privacy.md, "The device's own
/// floors"); a refused round ends the run with the reason, before any training or upload.
#[derive(clap::Args)]
pub(crate) struct PrivacyFloorArgs {
    /// Refuse a round that does not run under secure aggregation (its update would go up in the
    /// clear).
    #[arg(long, env = "FLOTILLA_REQUIRE_SECURE")]
    require_secure: bool,
    /// Under distributed differential privacy: refuse a round whose noise, with every
    /// participant's noise in a sum, is below this multiple of the clipping bound. Implies
    /// --require-secure.
    #[arg(long, env = "FLOTILLA_MIN_NOISE_MULTIPLIER", value_name = "Z")]
    min_noise_multiplier: Option<f64>,
    /// Refuse a round that sets no clipping bound, or one above this.
    #[arg(long, env = "FLOTILLA_MAX_CLIP_NORM", value_name = "C")]
    max_clip_norm: Option<f64>,
    /// This device's own ε budget per federation (the CA of its kit): every round it trains in
    /// under [privacy] is counted in its ledger before it trains, and a round past the budget is
    /// refused.
    #[arg(long, env = "FLOTILLA_PRIVACY_BUDGET", value_name = "EPSILON")]
    privacy_budget: Option<f64>,
    /// The δ of this device's budget.
    #[arg(long, env = "FLOTILLA_PRIVACY_DELTA", default_value_t = 1e-5)]
    privacy_delta: f64,
    /// Where the device's privacy ledgers are kept (one file per CA); default:
    /// <cache>/privacy-ledger.
    #[arg(long, env = "FLOTILLA_PRIVACY_LEDGER")]
    privacy_ledger: Option<std::path::PathBuf>,
}

impl PrivacyFloorArgs {
    /// The device's own privacy ledger, when it has a budget.
    pub(crate) fn budget(
        &self,
        kit: &flotilla_wire::tls::KitPaths,
    ) -> anyhow::Result<Option<std::sync::Mutex<crate::privacy_budget::DevicePrivacyBudget>>> {
        let Some(epsilon) = self.privacy_budget else { return Ok(None) };
        let dir = self.privacy_ledger.clone().unwrap_or_else(|| flotilla_data::cache::root().join("privacy-ledger"));
        let budget = crate::privacy_budget::DevicePrivacyBudget::open(&dir, &kit.ca_cert, epsilon, self.privacy_delta)?;
        tracing::info!(epsilon_spent = budget.spent(), budget = epsilon, "this device's privacy ledger");
        Ok(Some(std::sync::Mutex::new(budget)))
    }

    pub(crate) fn floor(&self) -> anyhow::Result<PrivacyFloor> {
        for (flag, value) in
            [("--min-noise-multiplier", self.min_noise_multiplier), ("--max-clip-norm", self.max_clip_norm)]
        {
            if let Some(v) = value {
                anyhow::ensure!(v.is_finite() && v > 0.0, "{flag} must be a positive number, got {v}");
            }
        }
        Ok(PrivacyFloor {
            require_secure: self.require_secure,
            min_noise_multiplier: self.min_noise_multiplier,
            max_clip_norm: self.max_clip_norm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_wire::protocol::{SecureTask, TrainingSettings};

    fn task(secure: Option<(Vec<f64>, u32)>, clip_norm: Option<f64>) -> RoundTask {
        RoundTask {
            round: 3,
            total_rounds: 5,
            rank: 4,
            base_version: "b".into(),
            training: TrainingSettings {
                local_steps: 1,
                local_epochs: 0,
                batch_size: 1,
                learning_rate: 0.1,
                seed: 1,
                trainable: Default::default(),
            },
            deadline_secs: 10,
            clip_norm,
            secure: secure.map(|(noise_std, participants)| SecureTask {
                session: 1,
                participant: 1,
                parameters: flotilla_secagg::Parameters { threshold: 2, degree: 3, range: 8.0, max_participants: 10 },
                layout: flotilla_secagg::layout::Layout { shared: 3, per_slot: 2, max_rank: 4 },
                max_samples: 100,
                noise_std,
                participants,
            }),
            noise_multiplier: None,
            evaluate: false,
        }
    }

    #[test]
    fn no_floor_takes_anything() {
        assert_eq!(PrivacyFloor::default().refusal(&task(None, None)), None);
    }

    #[test]
    fn require_secure_refuses_a_plain_round() {
        let floor = PrivacyFloor { require_secure: true, ..PrivacyFloor::default() };
        let why = floor.refusal(&task(None, None)).unwrap();
        assert!(why.contains("round 3 does not run under secure aggregation"), "{why}");
        assert_eq!(floor.refusal(&task(Some((Vec::new(), 4)), None)), None);
    }

    #[test]
    fn the_noise_floor_needs_noise_a_bound_and_enough_of_both() {
        let floor = PrivacyFloor { min_noise_multiplier: Some(1.0), ..PrivacyFloor::default() };
        assert!(floor.refusal(&task(None, Some(1.0))).unwrap().contains("secure aggregation"));
        assert!(floor.refusal(&task(Some((Vec::new(), 4)), Some(1.0))).unwrap().contains("asks for no noise"));
        assert!(floor.refusal(&task(Some((vec![0.5; 3], 4)), None)).unwrap().contains("no clipping bound"));
        // σ·C/√4 each with C = 1: σ = 1 meets a floor of 1, σ = 0.9 does not.
        assert_eq!(floor.refusal(&task(Some((vec![0.5; 3], 4)), Some(1.0))), None);
        let why = floor.refusal(&task(Some((vec![0.5, 0.45, 0.5], 4)), Some(1.0))).unwrap();
        assert!(why.contains("0.900 times the clipping bound"), "{why}");
        // A larger bound with the same noise is weaker noise.
        assert!(floor.refusal(&task(Some((vec![0.5; 3], 4)), Some(2.0))).is_some());
    }

    #[test]
    fn the_clip_ceiling_refuses_a_larger_or_missing_bound() {
        let floor = PrivacyFloor { max_clip_norm: Some(1.0), ..PrivacyFloor::default() };
        assert_eq!(floor.refusal(&task(Some((vec![1.0; 3], 4)), Some(0.5))), None);
        assert!(floor.refusal(&task(Some((vec![1.0; 3], 4)), Some(1.5))).unwrap().contains("above"));
        assert!(floor.refusal(&task(Some((vec![1.0; 3], 4)), None)).unwrap().contains("no clipping bound"));
        assert!(floor.refusal(&task(Some((vec![1.0; 3], 4)), Some(f64::NAN))).is_some());
    }
}
