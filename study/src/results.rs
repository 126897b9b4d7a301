//! One finished cell's numbers, read from the coordinator's `summary.json`, and the statistics
//! over seeds.

use std::collections::BTreeMap;

use anyhow::{Context, Result};

use crate::grid::MAX_RANK;

/// What the report needs from one run.
#[derive(Debug, Clone, Default)]
pub struct CellResult {
    /// Test accuracy of the global model at R_max after each round.
    pub accuracy_per_round: Vec<f64>,
    /// The last test accuracy measured at each rank (a rank is evaluated in the rounds it took part in).
    pub last_accuracy_per_rank: BTreeMap<u32, f64>,
    /// The base model with the initial (untrained) adapter at R_max.
    pub base_accuracy: Option<f64>,
    pub upload_bytes_per_round: f64,
    pub download_bytes_per_round: f64,
    pub wall_seconds: f64,
}

fn accuracy_at(evaluation: &serde_json::Value, rank: u32) -> Option<f64> {
    evaluation.as_array()?.iter().find(|e| e["rank"].as_u64() == Some(u64::from(rank)))?["accuracy"].as_f64()
}

impl CellResult {
    pub fn from_summary(summary: &serde_json::Value, wall_seconds: f64) -> Result<CellResult> {
        let rounds = summary["rounds"].as_array().context("summary.json has no rounds")?;
        let mut result = CellResult {
            base_accuracy: accuracy_at(&summary["initial_evaluation"], MAX_RANK),
            wall_seconds,
            ..CellResult::default()
        };
        let (mut up, mut down) = (0.0, 0.0);
        for round in rounds {
            let evaluation = &round["evaluation"];
            let accuracy = accuracy_at(evaluation, MAX_RANK)
                .with_context(|| format!("round {} has no evaluation at R_max", round["round"]))?;
            result.accuracy_per_round.push(accuracy);
            for entry in evaluation.as_array().into_iter().flatten() {
                if let (Some(rank), Some(accuracy)) = (entry["rank"].as_u64(), entry["accuracy"].as_f64()) {
                    result.last_accuracy_per_rank.insert(rank as u32, accuracy);
                }
            }
            up += round["update_bytes"].as_f64().unwrap_or(0.0);
            down += round["task_bytes"].as_f64().unwrap_or(0.0);
        }
        let n = rounds.len().max(1) as f64;
        result.upload_bytes_per_round = up / n;
        result.download_bytes_per_round = down / n;
        Ok(result)
    }

    pub fn final_accuracy(&self) -> Option<f64> {
        self.accuracy_per_round.last().copied()
    }

    /// The accuracy each device of `fleet` (rank, devices) gets from the slice of its rank, averaged
    /// over the devices; `None` when a rank was never evaluated.
    pub fn fleet_accuracy(&self, fleet: &[(u32, u32)]) -> Option<f64> {
        let devices: u32 = fleet.iter().map(|&(_, n)| n).sum();
        let mut total = 0.0;
        for &(rank, n) in fleet {
            total += f64::from(n) * self.last_accuracy_per_rank.get(&rank)?;
        }
        Some(total / f64::from(devices.max(1)))
    }

    pub fn best_accuracy(&self) -> Option<f64> {
        self.accuracy_per_round.iter().copied().reduce(f64::max)
    }
}

/// Mean and sample standard deviation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub sd: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Stat> {
        let values: Vec<f64> = values.into_iter().collect();
        if values.is_empty() {
            return None;
        }
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let sd =
            if n > 1 { (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt() } else { 0.0 };
        Some(Stat { mean, sd, n })
    }

    /// As a percentage: `84.1 ± 0.3`.
    pub fn percent(self) -> String {
        format!("{:.1} ± {:.1}", 100.0 * self.mean, 100.0 * self.sd)
    }
}

/// Per-round mean over seeds (rounds every run has).
pub fn mean_curve(results: &[&CellResult]) -> Vec<f64> {
    let rounds = results.iter().map(|r| r.accuracy_per_round.len()).min().unwrap_or(0);
    (0..rounds).map(|i| results.iter().map(|r| r.accuracy_per_round[i]).sum::<f64>() / results.len() as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_use_the_sample_standard_deviation() {
        let s = Stat::of([0.80, 0.82, 0.84]).unwrap();
        assert!((s.mean - 0.82).abs() < 1e-12);
        assert!((s.sd - 0.02).abs() < 1e-12);
        assert_eq!(s.percent(), "82.0 ± 2.0");
        assert_eq!(Stat::of([0.5]).unwrap().sd, 0.0);
        assert!(Stat::of([]).is_none());
    }

    #[test]
    fn a_summary_gives_curves_last_rank_accuracies_and_bytes() {
        let summary = serde_json::json!({
            "initial_evaluation": [{"rank": 64, "loss": 1.0, "accuracy": 0.70}],
            "rounds": [
                {"round": 1, "update_bytes": 100, "task_bytes": 300,
                 "evaluation": [{"rank": 64, "loss": 0.5, "accuracy": 0.80}, {"rank": 2, "loss": 0.6, "accuracy": 0.75}]},
                {"round": 2, "update_bytes": 200, "task_bytes": 500,
                 "evaluation": [{"rank": 64, "loss": 0.4, "accuracy": 0.78}]},
            ]
        });
        let r = CellResult::from_summary(&summary, 12.0).unwrap();
        assert_eq!(r.accuracy_per_round, vec![0.80, 0.78]);
        assert_eq!(r.final_accuracy(), Some(0.78));
        assert_eq!(r.best_accuracy(), Some(0.80));
        assert_eq!(r.base_accuracy, Some(0.70));
        assert_eq!(r.last_accuracy_per_rank[&2], 0.75);
        assert_eq!(r.last_accuracy_per_rank[&64], 0.78);
        assert_eq!((r.upload_bytes_per_round, r.download_bytes_per_round), (150.0, 400.0));
        assert!((r.fleet_accuracy(&[(2, 3), (64, 1)]).unwrap() - (3.0 * 0.75 + 0.78) / 4.0).abs() < 1e-12);
        assert_eq!(r.fleet_accuracy(&[(8, 1)]), None);
        let missing = serde_json::json!({"rounds": [{"round": 1, "evaluation": []}]});
        assert!(CellResult::from_summary(&missing, 1.0).is_err());
    }
}
