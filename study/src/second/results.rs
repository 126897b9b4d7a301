//! A finished run's numbers, read from the coordinator's `summary.json`, and the learning rate
//! each setting keeps.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use super::{Arm, Cell, Plan};

/// An edge of what a setting tried, on which its best candidate lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    LowestLearningRate,
    HighestLearningRate,
    FewestSteps,
    MostSteps,
}

impl Edge {
    pub fn describe(self) -> &'static str {
        match self {
            Edge::LowestLearningRate => "the lowest learning rate tried",
            Edge::HighestLearningRate => "the highest learning rate tried",
            Edge::FewestSteps => "the fewest local steps tried",
            Edge::MostSteps => "the most local steps tried",
        }
    }
}

/// One finished run: accuracy per round at R_max and at each rank, bytes and wall time.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// The run's R_max (a homogeneous or centralized run's rank).
    pub max_rank: u32,
    pub base: Option<f64>,
    /// The evaluated set's majority-class rate (its largest class's share), where the run's
    /// summary has per-class counts (runs from 2026-12-07 on).
    pub majority: Option<f64>,
    /// Per round: rank → accuracy (R_max included).
    pub rounds: Vec<BTreeMap<u32, f64>>,
    pub upload_bytes_per_round: f64,
    pub download_bytes_per_round: f64,
    pub wall_seconds: f64,
}

/// The largest class's share of an evaluation's per-class counts.
fn majority_rate(per_class: &serde_json::Value) -> Option<f64> {
    let counts: Vec<f64> = per_class.as_array()?.iter().filter_map(|c| c["count"].as_f64()).collect();
    let total: f64 = counts.iter().sum();
    (total > 0.0).then(|| counts.iter().copied().fold(0.0, f64::max) / total)
}

/// Which score of an evaluation a run is read for: the accuracy; or, for a decoder, the loss per
/// target token (negated, so that higher is better and the gain formula holds) or the ROUGE-L F1 of
/// its greedy headlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Accuracy,
    NegatedLoss,
    RougeL,
}

impl Metric {
    fn of(self, evaluation: &serde_json::Value) -> Option<f64> {
        match self {
            Metric::Accuracy => evaluation["accuracy"].as_f64(),
            Metric::NegatedLoss => evaluation["loss"].as_f64().map(|loss| -loss),
            Metric::RougeL => evaluation["rouge_l"].as_f64(),
        }
    }
}

/// Rounds averaged for a run's score: the last 3, not the best (no selection on test).
pub const LAST_ROUNDS: usize = 3;

impl Run {
    pub fn from_summary(summary: &serde_json::Value, wall_seconds: f64) -> Result<Run> {
        Run::from_summary_with(summary, wall_seconds, Metric::Accuracy)
    }

    /// A run read for `metric` (its `rounds` and `base` hold that score instead of the accuracy).
    pub fn from_summary_with(summary: &serde_json::Value, wall_seconds: f64, metric: Metric) -> Result<Run> {
        let by_rank = |evaluation: &serde_json::Value| -> BTreeMap<u32, f64> {
            evaluation
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| Some((e["rank"].as_u64()? as u32, metric.of(e)?)))
                .collect()
        };
        let rounds = summary["rounds"].as_array().context("summary.json has no rounds")?;
        anyhow::ensure!(!rounds.is_empty(), "no round finished (see the cell's logs)");
        let max_rank = summary["max_rank"].as_u64().context("summary.json has no max_rank")? as u32;
        let mut run = Run {
            max_rank,
            base: by_rank(&summary["initial_evaluation"]).values().next().copied(),
            majority: majority_rate(&summary["initial_evaluation"][0]["per_class"]),
            wall_seconds,
            ..Run::default()
        };
        for round in rounds {
            let accuracies = by_rank(&round["evaluation"]);
            anyhow::ensure!(accuracies.contains_key(&max_rank), "round {} has no evaluation at R_max", round["round"]);
            run.rounds.push(accuracies);
            run.upload_bytes_per_round += round["update_bytes"].as_f64().unwrap_or(0.0);
            run.download_bytes_per_round += round["task_bytes"].as_f64().unwrap_or(0.0);
        }
        let n = run.rounds.len().max(1) as f64;
        run.upload_bytes_per_round /= n;
        run.download_bytes_per_round /= n;
        Ok(run)
    }

    /// What a slice must not end below: the base's accuracy, or the majority-class rate where it is
    /// known and higher (a model that predicts one class reaches that rate without learning).
    pub fn floor(&self) -> Option<f64> {
        match (self.base, self.majority) {
            (Some(base), Some(majority)) => Some(base.max(majority)),
            (base, majority) => base.or(majority),
        }
    }

    fn last_rounds(&self) -> &[BTreeMap<u32, f64>] {
        &self.rounds[self.rounds.len().saturating_sub(LAST_ROUNDS)..]
    }

    fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
        let values: Vec<f64> = values.collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    }

    /// The global model at R_max, over the last rounds.
    pub fn max_rank_accuracy(&self) -> Option<f64> {
        Run::mean(self.last_rounds().iter().filter_map(|r| r.get(&self.max_rank).copied()))
    }

    /// One rank's slice, over the last rounds.
    pub fn rank_accuracy(&self, rank: u32) -> Option<f64> {
        Run::mean(self.last_rounds().iter().filter_map(|r| r.get(&rank).copied()))
    }

    /// Each device's own slice, averaged over `fleet`, over the last rounds; the R_max accuracy
    /// for a run whose devices all have its R_max.
    pub fn fleet_accuracy(&self, arm: Arm, fleet: &[(&str, u32, u32)]) -> Option<f64> {
        if !arm.is_heterogeneous() {
            return self.max_rank_accuracy();
        }
        let devices: u32 = fleet.iter().map(|&(_, _, n)| n).sum();
        let mut total = 0.0;
        for &(_, rank, n) in fleet {
            total += f64::from(n) * self.rank_accuracy(rank)?;
        }
        Some(total / f64::from(devices.max(1)))
    }

    /// The lowest slice accuracy of the fleet's ranks (R_max for a single-rank run).
    pub fn worst_slice(&self, arm: Arm, fleet: &[(&str, u32, u32)]) -> Option<f64> {
        if !arm.is_heterogeneous() {
            return self.max_rank_accuracy();
        }
        fleet
            .iter()
            .map(|&(_, rank, _)| self.rank_accuracy(rank))
            .collect::<Option<Vec<f64>>>()?
            .into_iter()
            .reduce(f64::min)
    }

    /// What tuning maximizes (on the validation split).
    pub fn score(&self, arm: Arm, fleet: &[(&str, u32, u32)]) -> Option<f64> {
        if arm.is_heterogeneous() {
            Some((self.max_rank_accuracy()? + self.fleet_accuracy(arm, fleet)?) / 2.0)
        } else {
            self.max_rank_accuracy()
        }
    }

    pub fn accuracy_curve(&self) -> Vec<f64> {
        self.rounds.iter().filter_map(|r| r.get(&self.max_rank).copied()).collect()
    }
}

/// Refuses a run in which some round aggregated fewer updates than the arm's devices: a straggler
/// dropped (a machine too busy for the round's grace period) would make the run another
/// experiment than the one its key names.
pub fn check_every_device_counted(summary: &serde_json::Value, devices: usize) -> Result<()> {
    for round in summary["rounds"].as_array().into_iter().flatten() {
        let updates = round["updates"].as_array().map_or(0, Vec::len);
        anyhow::ensure!(
            updates == devices,
            "round {} aggregated {updates} update(s) of {devices}: a device was dropped; rerun the cell",
            round["round"]
        );
    }
    Ok(())
}

pub fn load_run(plan: &Plan, dir: &Path, cell: &Cell) -> Result<Option<Run>> {
    load_run_with(plan, dir, cell, Metric::Accuracy)
}

/// A cached run read for `metric`, or `None` when the cell has not run.
pub fn load_run_with(plan: &Plan, dir: &Path, cell: &Cell, metric: Metric) -> Result<Option<Run>> {
    let path = plan.result_path(dir, cell);
    let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
    let cached: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))?;
    let wall = cached["wall_seconds"].as_f64().unwrap_or(0.0);
    Ok(Some(Run::from_summary_with(&cached["summary"], wall, metric).with_context(|| path.display().to_string())?))
}

/// What a setting's tuning picks: a learning rate and local steps, and a private arm's clipping
/// bound (its learning rate and steps are its method's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub learning_rate: f64,
    pub local_steps: u32,
    pub clip_norm: Option<f64>,
}

#[cfg(test)]
impl Choice {
    pub fn of(cell: &Cell) -> Choice {
        Choice { learning_rate: cell.learning_rate, local_steps: cell.local_steps, clip_norm: cell.clip_norm }
    }
}

/// What a setting's tuning kept: the choice, the validation score of each candidate tried (the
/// grid in the plan's order, then any values past its edges), and the edges of what was tried on
/// which the choice still lies.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuned {
    pub choice: Choice,
    pub scores: Vec<(Choice, f64)>,
    pub edges: Vec<Edge>,
    /// The close calls, also run at seed 2: their scores are means of two seeds.
    pub doubled: Vec<Choice>,
}

/// Per setting key, what its finished tuning kept.
pub type Chosen = BTreeMap<String, Tuned>;

/// What each setting keeps once its tuning is over ([`Plan::tune`]), from the runs cached in
/// `results_dir`.
pub fn choose(plan: &Plan, results_dir: &Path) -> Result<Chosen> {
    Ok(tune_from_cache(plan, results_dir)?.0)
}

/// Every task's tuning from the runs cached in `results_dir`: the choices made, and every tuning
/// cell needed so far (finished or not).
pub fn tune_from_cache(plan: &Plan, results_dir: &Path) -> Result<(Chosen, Vec<Cell>)> {
    let mut chosen = Chosen::new();
    let mut cells = Vec::new();
    for task in &plan.tasks {
        let mut failure = None;
        let mut score = |cell: &Cell| match load_run(plan, results_dir, cell) {
            Ok(run) => run?.score(cell.arm, &plan.fleet),
            Err(error) => {
                failure.get_or_insert(error);
                None
            }
        };
        let (task_chosen, task_cells) = plan.tune_task(task.key, &mut score);
        if let Some(error) = failure {
            return Err(error);
        }
        chosen.extend(task_chosen);
        cells.extend(task_cells);
    }
    Ok((chosen, cells))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model collapsed onto the majority class beats a weak base, not the floor: the floor is
    /// the larger of the base and the majority-class rate of the evaluated set.
    #[test]
    fn the_floor_is_the_base_or_the_majority_class_rate_whichever_is_higher() {
        let summary = |per_class: serde_json::Value| {
            serde_json::json!({
                "initial_evaluation": [{"rank": 16, "accuracy": 0.25, "per_class": per_class}],
                "max_rank": 16,
                "rounds": [{"round": 1, "evaluation": [{"rank": 16, "accuracy": 0.40}]}],
            })
        };
        // Rotten Tomatoes-like: 40% of the evaluated set is one class.
        let counts = serde_json::json!([{"label": "fresh", "count": 40}, {"label": "rotten", "count": 35},
            {"label": "plot", "count": 25}]);
        let collapsed = Run::from_summary(&summary(counts), 1.0).unwrap();
        assert_eq!(collapsed.majority, Some(0.4));
        assert_eq!(collapsed.floor(), Some(0.4));
        let arm = Arm::Centralized(16);
        let worst_minus_floor = collapsed.worst_slice(arm, &[]).unwrap() - collapsed.floor().unwrap();
        assert!(worst_minus_floor <= 0.0, "a collapsed model is not above the floor");
        assert!(collapsed.worst_slice(arm, &[]).unwrap() - collapsed.base.unwrap() > 0.0, "though it beats the base");
        // Runs recorded before per-class counts: the base alone.
        let old = Run::from_summary(&summary(serde_json::Value::Null), 1.0).unwrap();
        assert_eq!((old.majority, old.floor()), (None, Some(0.25)));
    }

    /// A decoder's run read for its loss (negated: higher is better, so the gain formula holds) and
    /// for ROUGE-L, from the same summary as its accuracy.
    #[test]
    fn a_decoder_run_is_read_for_its_loss_and_its_rouge_l_too() {
        let summary = serde_json::json!({
            "initial_evaluation": [{"rank": 16, "accuracy": 0.3, "loss": 5.0, "rouge_l": 0.12}],
            "max_rank": 16,
            "rounds": [{"round": 1, "evaluation": [{"rank": 16, "accuracy": 0.5, "loss": 3.5, "rouge_l": 0.2}]}],
        });
        let loss = Run::from_summary_with(&summary, 1.0, Metric::NegatedLoss).unwrap();
        assert_eq!((loss.base, loss.max_rank_accuracy()), (Some(-5.0), Some(-3.5)));
        let rouge = Run::from_summary_with(&summary, 1.0, Metric::RougeL).unwrap();
        assert_eq!((rouge.base, rouge.max_rank_accuracy()), (Some(0.12), Some(0.2)));
        let accuracy = Run::from_summary(&summary, 1.0).unwrap();
        assert_eq!(accuracy.max_rank_accuracy(), Some(0.5));
        // A classifier's rounds hold no loss-per-token field under that name: no score, an error.
        let plain = serde_json::json!({"max_rank": 16, "rounds": [{"round": 1, "evaluation": [{"rank": 16, "accuracy": 0.5}]}]});
        assert!(Run::from_summary_with(&plain, 1.0, Metric::RougeL).is_err());
    }

    #[test]
    fn scores_average_the_last_rounds_and_the_fleet_sees_its_own_slices() {
        let fleet = Plan::text().fleet;
        let summary = serde_json::json!({
            "initial_evaluation": [{"rank": 16, "accuracy": 0.2}],
            "max_rank": 16,
            "rounds": (1..=4).map(|r| serde_json::json!({
                "round": r, "update_bytes": 10, "task_bytes": 30,
                "evaluation": [
                    {"rank": 2, "accuracy": 0.5}, {"rank": 4, "accuracy": 0.6},
                    {"rank": 8, "accuracy": 0.7}, {"rank": 16, "accuracy": 0.1 * f64::from(r)},
                ],
            })).collect::<Vec<_>>(),
        });
        let run = Run::from_summary(&summary, 5.0).unwrap();
        assert_eq!(run.base, Some(0.2));
        // Rounds 2-4 at R_max: 0.2, 0.3, 0.4.
        assert!((run.max_rank_accuracy().unwrap() - 0.3).abs() < 1e-12);
        let rbla = Arm::Method("rbla");
        let mean = (3.0 * 0.5 + 3.0 * 0.6 + 3.0 * 0.7 + 3.0 * 0.3) / 12.0;
        assert!((run.fleet_accuracy(rbla, &fleet).unwrap() - mean).abs() < 1e-12);
        assert!((run.score(rbla, &fleet).unwrap() - (0.3 + mean) / 2.0).abs() < 1e-12);
        assert!((run.worst_slice(rbla, &fleet).unwrap() - 0.3).abs() < 1e-12);
        assert!((run.score(Arm::Centralized(16), &fleet).unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(run.upload_bytes_per_round, 10.0);
        let no_rmax =
            serde_json::json!({"max_rank": 16, "rounds": [{"round": 1, "evaluation": [{"rank": 2, "accuracy": 0.5}]}]});
        assert!(Run::from_summary(&no_rmax, 1.0).is_err());
        let no_rounds = serde_json::json!({"max_rank": 16, "rounds": []});
        assert!(Run::from_summary(&no_rounds, 1.0).is_err());
        let updates =
            |n: usize| serde_json::json!({"rounds": [{"round": 1, "updates": vec![serde_json::json!({}); n]}]});
        assert!(check_every_device_counted(&updates(12), 12).is_ok());
        let short = check_every_device_counted(&updates(8), 12).unwrap_err().to_string();
        assert!(short.contains("round 1 aggregated 8 update(s) of 12"), "{short}");
        assert!(check_every_device_counted(&serde_json::json!({"rounds": [{"round": 1}]}), 0).is_ok());
    }
}
