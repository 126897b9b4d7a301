//! The rank policy: the largest power-of-two LoRA rank in [r_min, R_max] that fits the device's
//! budgets for training memory, upload per round and training-step time.
//!
//! - Training memory: every adapter parameter costs 16 bytes while training (the f32 value, its
//!   gradient and AdamW's two moments).
//! - Upload: 4 bytes per adapter parameter per round (f32 on the wire).
//! - Step time: measured by the probe at the smallest and largest candidate ranks, interpolated
//!   linearly in between.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Budgets {
    pub memory_bytes: u64,
    pub upload_bytes: u64,
    pub step_ms: f64,
}

/// Adapter parameters as a function of the rank: `per_rank · r + fixed`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct AdapterSize {
    pub per_rank: u64,
    pub fixed: u64,
}

impl AdapterSize {
    pub fn params(&self, rank: u32) -> u64 {
        self.per_rank * u64::from(rank) + self.fixed
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankRow {
    pub rank: u32,
    pub training_memory_bytes: u64,
    pub upload_bytes: u64,
    pub step_ms: f64,
    /// The first budget this rank exceeds, if any.
    pub exceeds: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankChoice {
    pub rank: u32,
    pub reason: String,
    pub candidates: Vec<RankRow>,
}

pub const TRAINING_BYTES_PER_PARAM: u64 = 16;
pub const UPLOAD_BYTES_PER_PARAM: u64 = 4;

/// Powers of two in [r_min, r_max], plus r_max itself if it is not one.
pub fn candidates(r_min: u32, r_max: u32) -> Vec<u32> {
    let mut ranks: Vec<u32> = (0..32).map(|p| 1u32 << p).filter(|&r| r >= r_min.max(1) && r <= r_max).collect();
    if r_max >= r_min.max(1) && !r_max.is_power_of_two() {
        ranks.push(r_max);
    }
    ranks
}

pub fn choose(size: AdapterSize, step_ms: impl Fn(u32) -> f64, budgets: Budgets, r_min: u32, r_max: u32) -> RankChoice {
    let rows: Vec<RankRow> = candidates(r_min, r_max)
        .into_iter()
        .map(|rank| {
            let params = size.params(rank);
            let (memory, upload, step) =
                (params * TRAINING_BYTES_PER_PARAM, params * UPLOAD_BYTES_PER_PARAM, step_ms(rank));
            let exceeds = if memory > budgets.memory_bytes {
                Some("memory")
            } else if upload > budgets.upload_bytes {
                Some("upload")
            } else if step > budgets.step_ms {
                Some("step time")
            } else {
                None
            };
            RankRow { rank, training_memory_bytes: memory, upload_bytes: upload, step_ms: step, exceeds }
        })
        .collect();
    let fitting = rows.iter().rev().find(|r| r.exceeds.is_none());
    let (rank, reason) = match (fitting, rows.first()) {
        (Some(best), _) if best.rank == rows.last().map_or(best.rank, |r| r.rank) => {
            (best.rank, format!("R_max {}: every budget allows it", best.rank))
        }
        (Some(best), _) => {
            let next = rows.iter().find(|r| r.rank > best.rank).and_then(|r| r.exceeds).unwrap_or("a budget");
            (
                best.rank,
                format!(
                    "rank {} would exceed the {next} budget",
                    rows.iter().find(|r| r.rank > best.rank).map_or(0, |r| r.rank)
                ),
            )
        }
        (None, Some(smallest)) => (
            smallest.rank,
            format!(
                "even rank {} exceeds the {} budget; using the minimum rank",
                smallest.rank,
                smallest.exceeds.unwrap_or("")
            ),
        ),
        (None, None) => (r_min.max(1), "no candidate rank (r_min > R_max); using r_min".into()),
    };
    RankChoice { rank, reason, candidates: rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: AdapterSize = AdapterSize { per_rank: 1000, fixed: 500 };
    const ROOMY: Budgets = Budgets { memory_bytes: u64::MAX, upload_bytes: u64::MAX, step_ms: f64::MAX };

    #[test]
    fn candidates_are_powers_of_two_in_range() {
        assert_eq!(candidates(1, 64), vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(candidates(3, 24), vec![4, 8, 16, 24]);
        assert_eq!(candidates(0, 1), vec![1]);
        assert!(candidates(16, 8).is_empty());
    }

    #[test]
    fn roomy_budgets_give_r_max() {
        let choice = choose(SIZE, |_| 1.0, ROOMY, 1, 64);
        assert_eq!(choice.rank, 64);
        assert!(choice.reason.contains("every budget"), "{}", choice.reason);
    }

    #[test]
    fn each_budget_can_bind_and_is_named() {
        // rank 8: 8,500 params → 136,000 bytes of training memory, 34,000 bytes of upload.
        let memory = Budgets { memory_bytes: 136_000, ..ROOMY };
        let choice = choose(SIZE, |_| 1.0, memory, 1, 64);
        assert_eq!(choice.rank, 8);
        assert!(choice.reason.contains("rank 16") && choice.reason.contains("memory"), "{}", choice.reason);
        let upload = Budgets { upload_bytes: 34_000, ..ROOMY };
        assert_eq!(choose(SIZE, |_| 1.0, upload, 1, 64).rank, 8);
        let step = Budgets { step_ms: 10.0, ..ROOMY };
        let choice = choose(SIZE, f64::from, step, 1, 64);
        assert_eq!(choice.rank, 8);
        assert!(choice.reason.contains("step time"), "{}", choice.reason);
    }

    #[test]
    fn nothing_fits_falls_back_to_the_minimum_and_says_so() {
        let tiny = Budgets { memory_bytes: 1, ..ROOMY };
        let choice = choose(SIZE, |_| 1.0, tiny, 2, 64);
        assert_eq!(choice.rank, 2);
        assert!(choice.reason.contains("exceeds the memory budget"), "{}", choice.reason);
        assert_eq!(choose(SIZE, |_| 1.0, ROOMY, 16, 8).rank, 16);
    }
}
