//! The per-round policy: who takes part in a round, the seeds the round uses, and the training
//! settings its devices receive. The engine samples with it; the coordinator takes the training
//! settings and the aggregation seed from it, so a round's randomness has one owner.

use rand::seq::IndexedRandom;
use rand::SeedableRng;
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
    /// Fewest devices sampled into a round.
    pub min_participants: usize,
    /// The local training settings (its seed is replaced by the round's).
    pub training: TrainingPlan,
}

impl RoundPolicy {
    /// The devices (with their ranks) sampled into `round` from `connected`: `fraction` of them,
    /// at least `min_participants`, at least one, reproducibly from the seed and the round, in
    /// device order.
    pub fn sample(&self, round: u32, connected: &[(&DeviceId, &u32)]) -> Vec<(DeviceId, u32)> {
        if connected.is_empty() {
            return Vec::new();
        }
        let wanted = ((self.fraction * connected.len() as f64).ceil() as usize)
            .max(self.min_participants)
            .clamp(1, connected.len());
        let mut rng = ChaCha8Rng::seed_from_u64(self.sampling_seed(round));
        let mut chosen: Vec<(&DeviceId, &u32)> = connected.choose_multiple(&mut rng, wanted).copied().collect();
        chosen.sort();
        chosen.into_iter().map(|(d, &r)| (d.clone(), r)).collect()
    }

    /// Seeds the round's sampling, and is also the devices' training seed for the round: one value
    /// for both keeps every earlier run reproducible with the same seed.
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
            training: TrainingPlan { local_steps: 10, local_epochs: 0, batch_size: 32, learning_rate: 0.01, seed: 0 },
        }
    }

    #[test]
    fn sampling_takes_the_fraction_at_least_the_minimum_and_is_reproducible() {
        let ids: Vec<DeviceId> = (0..8).map(|i| format!("d{i}")).collect();
        let ranks = [2u32; 8];
        let connected: Vec<(&DeviceId, &u32)> = ids.iter().zip(ranks.iter()).collect();
        assert_eq!(policy(0.25, 1).sample(1, &connected).len(), 2);
        assert_eq!(policy(0.25, 5).sample(1, &connected).len(), 5);
        assert_eq!(policy(1.0, 1).sample(1, &connected).len(), 8);
        assert_eq!(policy(0.25, 1).sample(3, &connected), policy(0.25, 1).sample(3, &connected));
        assert!(policy(0.5, 1).sample(1, &[]).is_empty());
        let rounds: Vec<_> = (1..6).map(|r| policy(0.25, 1).sample(r, &connected)).collect();
        assert!(rounds.windows(2).any(|w| w[0] != w[1]), "different rounds sample differently");
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
