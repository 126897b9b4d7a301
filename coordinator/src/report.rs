//! What a run reports: one record per round (kept in that round's checkpoint, so a restart never
//! loses it) and the run summary, `<run_dir>/summary.json`, rewritten after every round.

use std::path::{Path, PathBuf};

use flotilla_common::adapter::write_atomically;
use flotilla_common::protocol::LocalMetrics;
use serde::{Deserialize, Serialize};

use crate::evaluation::RankAccuracy;

/// What the coordinator reports at the end of a run; `<run_dir>/summary.json` is rewritten after
/// every round, and a resumed run continues it.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunSummary {
    pub method: String,
    pub max_rank: u32,
    pub rounds_completed: u32,
    pub rounds: Vec<RoundSummary>,
    pub final_global: Option<PathBuf>,
    /// Test-set results of the initial global model (base + untrained adapter): the lower bound.
    pub initial_evaluation: Vec<RankAccuracy>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundSummary {
    pub round: u32,
    pub updates: Vec<UpdateSummary>,
    pub aggregation_seconds: f64,
    pub round_seconds: f64,
    pub global_dir: Option<PathBuf>,
    pub evaluation: Vec<RankAccuracy>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateSummary {
    pub device: String,
    pub rank: u32,
    pub num_samples: u64,
    pub metrics: LocalMetrics,
}

pub fn write_summary(run_dir: &Path, summary: &RunSummary) -> anyhow::Result<()> {
    let path = run_dir.join("summary.json");
    write_atomically(&path, &serde_json::to_vec_pretty(summary)?).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The initial evaluation recorded before a restart (best effort: it is not part of a checkpoint).
pub fn previous_initial_evaluation(run_dir: &Path) -> Option<Vec<RankAccuracy>> {
    let text = std::fs::read(run_dir.join("summary.json")).ok()?;
    serde_json::from_slice::<RunSummary>(&text).ok().map(|s| s.initial_evaluation)
}
