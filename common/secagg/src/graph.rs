//! Who shares secrets with whom: a random graph of bounded degree (SecAgg+), so each participant
//! talks to O(degree) others instead of the whole round.
//!
//! The participants are put in a seeded random order and each is joined to the ⌈degree/2⌉ nearest
//! on either side (a circulant graph over a random permutation): every participant has the same
//! number of neighbours, degree rounded up to even, or everyone else when the round is smaller.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Each participant's neighbours, sorted.
pub fn neighbours(participants: &[u32], degree: usize, seed: u64) -> BTreeMap<u32, Vec<u32>> {
    let mut order: Vec<u32> = participants.to_vec();
    order.sort_unstable();
    order.dedup();
    let n = order.len();
    let mut graph: BTreeMap<u32, Vec<u32>> = order.iter().map(|&id| (id, Vec::new())).collect();
    if n <= 1 {
        return graph;
    }
    let half = degree.div_ceil(2);
    if 2 * half >= n - 1 {
        for &id in &order {
            graph.insert(id, order.iter().copied().filter(|&other| other != id).collect());
        }
        return graph;
    }
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    for (position, &id) in order.iter().enumerate() {
        let mut near: Vec<u32> = (1..=half)
            .flat_map(|offset| [order[(position + offset) % n], order[(position + n - offset) % n]])
            .collect();
        near.sort_unstable();
        graph.insert(id, near);
    }
    graph
}
