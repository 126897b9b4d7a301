//! The per-round policy: who takes part in a round, the seeds the round uses, and the training
//! settings its devices receive. The engine samples with it; the coordinator takes the training
//! settings and the aggregation seed from it, so a round's randomness has one owner.

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::DeviceId;

/// What a device is asked to do in a round (sent to it as the round task's training settings).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingPlan {
    /// Minibatch steps of local training ...
    pub local_steps: u32,
    /// ... unless this is above 0: then this many passes over the local data.
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    /// Seeds the device's minibatch draws; [`RoundPolicy::training`] sets it per round.
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RoundPolicy {
    /// The run's seed: every per-round seed derives from it and the round number.
    pub seed: u64,
    /// Fraction of the connected devices sampled into each round (0 < f ≤ 1).
    pub fraction: f64,
    /// Fewest devices sampled into a round (fixed-size sampling only).
    pub min_participants: usize,
    /// How devices are drawn into a round.
    pub sampling: Sampling,
    /// The sizes a round can run with (under secure aggregation: the smallest round it can secure
    /// and the most its quantization is scaled for). Fixed-size sampling draws within them; a
    /// Poisson draw outside them is refused, and the round is skipped without a task sent.
    pub round_size: RoundSize,
    /// The local training settings (its seed is replaced by the round's).
    pub training: TrainingPlan,
}

/// How a round's participants are drawn from the connected devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sampling {
    /// ⌈fraction · connected⌉ of them (at least `min_participants`, at least one), uniformly
    /// without replacement.
    #[default]
    FixedSize,
    /// Each one independently with probability `fraction` (so a round may draw none): the
    /// subsampling that the differential-privacy accountant's amplification assumes.
    Poisson,
}

/// The fewest and the most devices a round may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundSize {
    pub min: usize,
    pub max: usize,
}

impl Default for RoundSize {
    fn default() -> Self {
        RoundSize { min: 1, max: usize::MAX }
    }
}

/// A draw the round cannot run with: no task is sent, and the round is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrawRefused {
    pub drawn: usize,
    pub reason: String,
}

impl RoundPolicy {
    /// The devices (with their ranks) sampled into `round` from `connected`, in device order (see
    /// [`Sampling`]): fixed-size draws are reproducible from the seed and the round; Poisson draws
    /// come from the operating system's entropy, so that nobody can recompute them. A Poisson
    /// draw outside [`RoundSize`] is refused (fixed-size draws are sized within it).
    pub fn sample(&self, round: u32, connected: &[(&DeviceId, &u32)]) -> Result<Vec<(DeviceId, u32)>, DrawRefused> {
        if connected.is_empty() {
            return Ok(Vec::new());
        }
        if self.sampling == Sampling::Poisson {
            let mut rng = rand::rng();
            let mut chosen: Vec<(&DeviceId, &u32)> = connected.to_vec();
            chosen.sort();
            chosen.retain(|_| rng.random::<f64>() < self.fraction);
            let drawn = chosen.len();
            let RoundSize { min, max } = self.round_size;
            if drawn > 0 && drawn < min {
                return Err(DrawRefused {
                    drawn,
                    reason: format!("the Poisson draw took {drawn} device(s); a round needs at least {min}"),
                });
            }
            if drawn > max {
                return Err(DrawRefused {
                    drawn,
                    reason: format!("the Poisson draw took {drawn} devices; a round may have at most {max}"),
                });
            }
            return Ok(chosen.into_iter().map(|(d, &r)| (d.clone(), r)).collect());
        }
        let wanted = ((self.fraction * connected.len() as f64).ceil() as usize)
            .max(self.min_participants)
            .max(self.round_size.min)
            .min(self.round_size.max)
            .clamp(1, connected.len());
        let mut rng = ChaCha8Rng::seed_from_u64(self.sampling_seed(round));
        let mut chosen: Vec<(&DeviceId, &u32)> = connected.choose_multiple(&mut rng, wanted).copied().collect();
        chosen.sort();
        Ok(chosen.into_iter().map(|(d, &r)| (d.clone(), r)).collect())
    }

    /// Seeds the round's fixed-size sampling, and is also the devices' training seed for the
    /// round: one value for both keeps every earlier run reproducible with the same seed. Poisson
    /// sampling (under `[privacy]`) does not use it, so a task's seed says nothing about who else
    /// was drawn.
    fn sampling_seed(&self, round: u32) -> u64 {
        self.seed ^ (u64::from(round) << 32)
    }

    /// The training settings of `round`'s tasks.
    pub fn training(&self, round: u32) -> TrainingPlan {
        TrainingPlan { seed: self.sampling_seed(round), ..self.training.clone() }
    }

    /// Seeds what an aggregation method draws afresh in `round` (online FLoRA's new factors).
    pub fn aggregation_seed(&self, round: u32) -> u64 {
        self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(fraction: f64, min_participants: usize) -> RoundPolicy {
        RoundPolicy {
            seed: 7,
            fraction,
            min_participants,
            sampling: Sampling::FixedSize,
            round_size: RoundSize::default(),
            training: TrainingPlan { local_steps: 10, local_epochs: 0, batch_size: 32, learning_rate: 0.01, seed: 0 },
        }
    }

    #[test]
    fn sampling_takes_the_fraction_at_least_the_minimum_and_is_reproducible() {
        let ids: Vec<DeviceId> = (0..8).map(|i| format!("d{i}")).collect();
        let ranks = [2u32; 8];
        let connected: Vec<(&DeviceId, &u32)> = ids.iter().zip(ranks.iter()).collect();
        let size = |p: RoundPolicy| p.sample(1, &connected).unwrap().len();
        assert_eq!(size(policy(0.25, 1)), 2);
        assert_eq!(size(policy(0.25, 5)), 5);
        assert_eq!(size(policy(1.0, 1)), 8);
        assert_eq!(policy(0.25, 1).sample(3, &connected), policy(0.25, 1).sample(3, &connected));
        assert!(policy(0.5, 1).sample(1, &[]).unwrap().is_empty());
        // Secure aggregation's round sizes bound the draw both ways.
        assert_eq!(size(RoundPolicy { round_size: RoundSize { min: 3, max: 6 }, ..policy(0.25, 1) }), 3);
        assert_eq!(size(RoundPolicy { round_size: RoundSize { min: 3, max: 6 }, ..policy(1.0, 1) }), 6);
        let rounds: Vec<_> = (1..6).map(|r| policy(0.25, 1).sample(r, &connected)).collect();
        assert!(rounds.windows(2).any(|w| w[0] != w[1]), "different rounds sample differently");
    }

    #[test]
    fn poisson_sampling_draws_each_device_with_the_fraction_independently() {
        let ids: Vec<DeviceId> = (0..1000).map(|i| format!("d{i:04}")).collect();
        let ranks = [4u32; 1000];
        let connected: Vec<(&DeviceId, &u32)> = ids.iter().zip(ranks.iter()).collect();
        let poisson = RoundPolicy { sampling: Sampling::Poisson, ..policy(0.3, 50) };
        let counts: Vec<usize> = (1..=20).map(|r| poisson.sample(r, &connected).unwrap().len()).collect();
        // Binomial(1000, 0.3): sd 14.5; 5 sd either side, and the sizes vary (not a fixed size).
        assert!(counts.iter().all(|&c| (228..=372).contains(&c)), "{counts:?}");
        assert!(counts.windows(2).any(|w| w[0] != w[1]), "{counts:?}");
        let mean = counts.iter().sum::<usize>() as f64 / 20.0;
        assert!((mean - 300.0).abs() < 15.0, "{mean}");
        // The draw comes from the OS's entropy, not the seed: the same round draws afresh, so a
        // device that knows the seed (its training seed derives from it) cannot recompute it.
        let draws: std::collections::BTreeSet<_> = (0..5).map(|_| poisson.sample(3, &connected).unwrap()).collect();
        assert_eq!(draws.len(), 5, "five draws of the same round differ");
        // min_participants does not apply: two devices at 1% usually draw none.
        let few: Vec<(&DeviceId, &u32)> = connected[..2].to_vec();
        let rare = RoundPolicy { sampling: Sampling::Poisson, ..policy(0.01, 5) };
        assert!((1..=20).any(|r| rare.sample(r, &few).unwrap().is_empty()));
    }

    #[test]
    fn a_poisson_draw_outside_the_round_sizes_is_refused_not_resized() {
        let ids: Vec<DeviceId> = (0..40).map(|i| format!("d{i:02}")).collect();
        let ranks = [4u32; 40];
        let connected: Vec<(&DeviceId, &u32)> = ids.iter().zip(ranks.iter()).collect();
        let bounded = |fraction, min, max| RoundPolicy {
            sampling: Sampling::Poisson,
            round_size: RoundSize { min, max },
            ..policy(fraction, 1)
        };
        let refused = bounded(1.0, 3, 10).sample(1, &connected).unwrap_err();
        assert_eq!(refused.drawn, 40);
        assert!(refused.reason.contains("at most 10"), "{}", refused.reason);
        let refused = bounded(1.0, 41, usize::MAX).sample(1, &connected).unwrap_err();
        assert!(refused.reason.contains("at least 41"), "{}", refused.reason);
        // Every accepted draw is within the bounds (or empty).
        for _ in 0..50 {
            if let Ok(drawn) = bounded(0.1, 3, 6).sample(1, &connected) {
                assert!(drawn.is_empty() || (3..=6).contains(&drawn.len()), "{}", drawn.len());
            }
        }
    }

    #[test]
    fn each_round_has_its_own_seeds() {
        let p = policy(1.0, 1);
        assert_ne!(p.training(1).seed, p.training(2).seed);
        assert_ne!(p.aggregation_seed(1), p.aggregation_seed(2));
        assert_eq!(p.training(4), TrainingPlan { seed: 7 ^ (4 << 32), ..p.training.clone() });
        assert_eq!(p.aggregation_seed(3), 7u64.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 3);
    }
}
