//! Seeded values, reproducible across runs and platforms (ChaCha8).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` values uniform in `[-bound, bound)` from `seed`, as f32.
pub fn seeded_uniform_values(n: usize, bound: f64, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect()
}
