//! What a run reports: one record per round (kept in that round's checkpoint, so a restart never
//! loses it) and the run summary, `<run_dir>/summary.json`, rewritten after every round.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use flotilla_wire::protocol::LocalMetrics;
use serde::{Deserialize, Serialize};

pub use crate::records::federated_evaluation::FederatedEvaluation;

use crate::model::evaluation::RankAccuracy;

/// What the coordinator reports at the end of a run; `<run_dir>/summary.json` is rewritten after
/// every round, and a resumed run continues it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub method: String,
    pub max_rank: u32,
    pub rounds_completed: u32,
    pub rounds: Vec<RoundRecord>,
    pub final_global: Option<PathBuf>,
    /// Test-set results of the initial global model (base + untrained adapter): the lower bound.
    pub initial_evaluation: Vec<RankAccuracy>,
    /// `[privacy]`: the settings and the (ε, δ) spent so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::config::privacy::PrivacySummary>,
    /// Rounds that ended without a new global adapter, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<SkippedRound>,
}

/// A round skipped: its global adapter is the previous round's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SkippedRound {
    pub round: u32,
    pub reason: String,
}

/// One round's result: what the driver saw (updates, bytes, duration) and what the aggregation
/// worker made of it (aggregation time, checkpoint, evaluation). Built once, by [`RoundRecord::new`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub updates: Vec<UpdateRecord>,
    /// Bytes of the accepted updates' tensors.
    #[serde(default)]
    pub update_bytes: u64,
    /// Bytes of the round tasks' adapter slices sent to devices.
    #[serde(default)]
    pub task_bytes: u64,
    pub aggregation_seconds: f64,
    pub round_seconds: f64,
    pub global_dir: Option<PathBuf>,
    pub evaluation: Vec<RankAccuracy>,
    /// Under `[privacy]`: the run's ε once this round is done (at the summary's δ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_epsilon: Option<f64>,
    /// Under `[secure_aggregation]`: how the round's SecAgg+ phases went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure: Option<SecureRoundRecord>,
    /// Under `[federated_evaluation]`: this round's global model scored on the devices' held-out
    /// data (totals only), once the devices asked have answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated_evaluation: Option<Box<FederatedEvaluation>>,
}

/// A secure round's outcome: what the coordinator learned about who took part (it learns nothing
/// about any one device's update).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecureRoundRecord {
    /// Devices sent a task.
    pub participants: usize,
    /// Devices whose masked upload is in the sums.
    pub survivors: usize,
    /// Devices that shared their keys but did not upload: their masks were rebuilt and removed.
    pub recovered: usize,
    /// The shares needed to rebuild a secret.
    pub threshold: usize,
    /// Bytes of the devices' keys, shares and unmasking shares (the protocol's uplink cost beyond
    /// the masked updates, which `update_bytes` counts).
    #[serde(default)]
    pub protocol_bytes: u64,
    /// The largest quantization error of one unmasked sum.
    pub sum_error_bound: f64,
    /// Slots 0..revealed_rank were unmasked; the slots above, held by fewer than threshold + 1
    /// survivors, were not, and keep their previous global values.
    #[serde(default)]
    pub revealed_rank: u32,
    /// Seconds from the first unmask request to the unmasked sums.
    pub unmask_seconds: f64,
    /// Why the round was discarded (the global adapter unchanged, nothing revealed), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded: Option<String>,
}

/// What the round driver knows of a finished round; the worker completes it into the record.
pub struct RoundFacts {
    pub round: u32,
    /// The connected devices by rank when the round drew its participants (the denominators of
    /// a differentially private aggregate).
    pub population_by_rank: std::collections::BTreeMap<u32, usize>,
    /// A secure round's masked uploads (a plain round's are the aggregation worker's).
    pub updates: Vec<UpdateRecord>,
    pub task_bytes: u64,
    pub round_seconds: f64,
    pub secure: Option<SecureRoundRecord>,
}

impl RoundRecord {
    /// The record of a round the worker aggregated in `aggregation_seconds` and checkpointed in
    /// `global_dir`.
    pub fn new(
        facts: RoundFacts,
        aggregation_seconds: f64,
        global_dir: PathBuf,
        evaluation: Vec<RankAccuracy>,
    ) -> Self {
        let RoundFacts { round, updates, task_bytes, round_seconds, secure, .. } = facts;
        RoundRecord {
            round,
            update_bytes: updates.iter().map(|u| u.wire_bytes).sum(),
            updates,
            task_bytes,
            aggregation_seconds,
            round_seconds,
            global_dir: Some(global_dir),
            evaluation,
            privacy_epsilon: None,
            secure,
            federated_evaluation: None,
        }
    }
}

/// An accepted update. Under `[secure_aggregation]` or `[privacy]` nothing of one device is kept
/// but its rank and its upload's size: no id, no sample count, no local metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    pub rank: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_samples: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<LocalMetrics>,
    #[serde(default)]
    pub wire_bytes: u64,
}

impl UpdateRecord {
    /// The record of a device's update: whole, or (`anonymous`) its rank and size only.
    pub fn new(
        device: &str,
        rank: u32,
        num_samples: u64,
        metrics: Option<LocalMetrics>,
        wire_bytes: u64,
        anonymous: bool,
    ) -> Self {
        match anonymous {
            true => UpdateRecord { device: None, rank, num_samples: None, metrics: None, wire_bytes },
            false => UpdateRecord {
                device: Some(device.to_string()),
                rank,
                num_samples: Some(num_samples),
                metrics,
                wire_bytes,
            },
        }
    }
}

/// One round in the reports; round 0 is the initial model (base + untrained adapter).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRow {
    pub round: u32,
    pub updates: usize,
    /// Accepted updates by rank.
    pub participants: BTreeMap<u32, usize>,
    /// Test accuracy and loss of the global model at R_max (absent without an evaluation set).
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
    /// Test accuracy of the global model sliced to each rank that took part (and R_max).
    pub accuracy_by_rank: BTreeMap<usize, f64>,
    /// Macro-F1 of the global model at R_max.
    pub macro_f1: Option<f64>,
    /// Accuracy of the global model at R_max on each class of the evaluated set, in label order.
    pub accuracy_by_class: Vec<(String, f64)>,
    /// A decoder's ROUGE-L F1 of its greedy headlines, by rank (R_max included).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rouge_l_by_rank: BTreeMap<usize, f64>,
    /// The accepted updates' sample counts, summed (absent where no device's count is kept).
    pub samples: Option<u64>,
    /// Mean over updates of the local training loss after training (absent where no device's
    /// metrics are kept).
    pub mean_local_loss: Option<f64>,
    pub update_bytes: u64,
    pub task_bytes: u64,
    pub aggregation_seconds: f64,
    pub round_seconds: f64,
    /// Under `[secure_aggregation]`: how the round's protocol went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secure: Option<SecureRoundRecord>,
    /// Why the round was skipped (no new global adapter), if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// The round's global model on the devices' held-out data (`[federated_evaluation]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub federated: Option<FederatedEvaluation>,
}

impl ReportRow {
    /// A row of `round` with nothing in it yet.
    fn empty(round: u32) -> ReportRow {
        ReportRow {
            round,
            updates: 0,
            participants: BTreeMap::new(),
            accuracy: None,
            loss: None,
            accuracy_by_rank: BTreeMap::new(),
            macro_f1: None,
            accuracy_by_class: Vec::new(),
            rouge_l_by_rank: BTreeMap::new(),
            samples: None,
            mean_local_loss: None,
            update_bytes: 0,
            task_bytes: 0,
            aggregation_seconds: 0.0,
            round_seconds: 0.0,
            secure: None,
            skipped: None,
            federated: None,
        }
    }

    fn skipped(skipped: &SkippedRound) -> ReportRow {
        ReportRow { skipped: Some(skipped.reason.clone()), ..ReportRow::empty(skipped.round) }
    }
}

/// The mean local loss after training over the updates whose metrics are kept (none under secure
/// aggregation or `[privacy]`).
pub fn mean_local_loss(updates: &[UpdateRecord]) -> Option<f64> {
    let losses: Vec<f64> = updates.iter().filter_map(|u| u.metrics.as_ref().map(|m| m.loss_after)).collect();
    (!losses.is_empty()).then(|| losses.iter().sum::<f64>() / losses.len() as f64)
}

pub fn round_rows(summary: &RunSummary) -> Vec<ReportRow> {
    let max_rank = summary.max_rank as usize;
    // The evaluation columns of a row: at R_max (overall, macro-F1, per class) and per rank.
    let evaluated = |round: u32, results: &[RankAccuracy]| {
        let at_max = results.iter().find(|r| r.rank == max_rank);
        ReportRow {
            accuracy: at_max.map(|r| r.accuracy),
            loss: at_max.map(|r| r.loss),
            accuracy_by_rank: results.iter().map(|r| (r.rank, r.accuracy)).collect(),
            macro_f1: at_max.and_then(|r| r.macro_f1),
            accuracy_by_class: at_max
                .map(|r| r.per_class.iter().map(|c| (c.label.clone(), c.accuracy)).collect())
                .unwrap_or_default(),
            rouge_l_by_rank: results.iter().filter_map(|r| Some((r.rank, r.rouge_l?))).collect(),
            ..ReportRow::empty(round)
        }
    };
    let mut rows = Vec::with_capacity(summary.rounds.len() + 1);
    if !summary.initial_evaluation.is_empty() {
        rows.push(evaluated(0, &summary.initial_evaluation));
    }
    for round in &summary.rounds {
        let row = evaluated(round.round, &round.evaluation);
        let mut participants = BTreeMap::new();
        for update in &round.updates {
            *participants.entry(update.rank).or_insert(0) += 1;
        }
        let n = round.updates.len();
        rows.push(ReportRow {
            updates: n,
            participants,
            samples: round.updates.iter().map(|u| u.num_samples).sum(),
            mean_local_loss: mean_local_loss(&round.updates),
            update_bytes: round.update_bytes,
            task_bytes: round.task_bytes,
            aggregation_seconds: round.aggregation_seconds,
            round_seconds: round.round_seconds,
            secure: round.secure.clone(),
            federated: round.federated_evaluation.as_deref().cloned(),
            ..row
        });
    }
    rows.extend(summary.skipped.iter().map(ReportRow::skipped));
    rows.sort_by_key(|row| row.round);
    rows
}

/// The rows as CSV: fixed columns, then macro-F1 and one accuracy column per class at R_max (when
/// measured), one accuracy column per rank evaluated and one participant count per rank that took
/// part in any round.
pub fn rounds_csv(rows: &[ReportRow]) -> String {
    let eval_ranks: BTreeSet<usize> = rows.iter().flat_map(|r| r.accuracy_by_rank.keys().copied()).collect();
    let part_ranks: BTreeSet<u32> = rows.iter().flat_map(|r| r.participants.keys().copied()).collect();
    let classes: Vec<String> = rows
        .iter()
        .map(|r| r.accuracy_by_class.iter().map(|(label, _)| label.clone()).collect::<Vec<_>>())
        .max_by_key(Vec::len)
        .unwrap_or_default();
    let by_class = rows.iter().any(|r| r.macro_f1.is_some());
    let mut out = String::from(
        "round,updates,accuracy,loss,samples,mean_local_loss,update_bytes,task_bytes,aggregation_seconds,round_seconds",
    );
    if by_class {
        out.push_str(",macro_f1");
        for label in &classes {
            out.push_str(&format!(",accuracy_class_{}", label.replace([',', '"', '\n'], "_")));
        }
    }
    let rouge_ranks: BTreeSet<usize> = rows.iter().flat_map(|r| r.rouge_l_by_rank.keys().copied()).collect();
    eval_ranks.iter().for_each(|rank| out.push_str(&format!(",accuracy_rank_{rank}")));
    rouge_ranks.iter().for_each(|rank| out.push_str(&format!(",rouge_l_rank_{rank}")));
    for rank in &part_ranks {
        out.push_str(&format!(",participants_rank_{rank}"));
    }
    let secure = rows.iter().any(|r| r.secure.is_some());
    if secure {
        out.push_str(",secure_survivors,secure_recovered,secure_discarded");
    }
    let skipped = rows.iter().any(|r| r.skipped.is_some());
    if skipped {
        out.push_str(",skipped");
    }
    let federated = FederatedColumns::of(rows);
    out.push_str(&federated.header());
    out.push('\n');
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    for row in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{:.6},{:.6}",
            row.round,
            row.updates,
            opt(row.accuracy),
            opt(row.loss),
            row.samples.map_or(String::new(), |s| s.to_string()),
            opt(row.mean_local_loss),
            row.update_bytes,
            row.task_bytes,
            row.aggregation_seconds,
            row.round_seconds
        ));
        if by_class {
            out.push_str(&format!(",{}", opt(row.macro_f1)));
            for label in &classes {
                let accuracy = row.accuracy_by_class.iter().find(|(l, _)| l == label).map(|(_, a)| *a);
                out.push_str(&format!(",{}", opt(accuracy)));
            }
        }
        for rank in &eval_ranks {
            out.push_str(&format!(",{}", opt(row.accuracy_by_rank.get(rank).copied())));
        }
        for rank in &rouge_ranks {
            out.push_str(&format!(",{}", opt(row.rouge_l_by_rank.get(rank).copied())));
        }
        for rank in &part_ranks {
            out.push_str(&format!(",{}", row.participants.get(rank).copied().unwrap_or(0)));
        }
        if secure {
            match &row.secure {
                Some(s) => out.push_str(&format!(",{},{},{}", s.survivors, s.recovered, s.discarded.is_some())),
                None => out.push_str(",,,"),
            }
        }
        if skipped {
            out.push_str(if row.skipped.is_some() { ",true" } else { ",false" });
        }
        out.push_str(&federated.cells(row.federated.as_ref()));
        out.push('\n');
    }
    out
}

/// The federated evaluation's columns: overall, then accuracy per rank and per device class (those
/// recorded in any round); empty when no round has one.
struct FederatedColumns {
    any: bool,
    ranks: BTreeSet<u32>,
    classes: BTreeSet<String>,
}

impl FederatedColumns {
    fn of(rows: &[ReportRow]) -> FederatedColumns {
        let records: Vec<&FederatedEvaluation> = rows.iter().filter_map(|r| r.federated.as_ref()).collect();
        FederatedColumns {
            any: !records.is_empty(),
            ranks: records.iter().flat_map(|f| f.by_rank.keys().copied()).collect(),
            classes: records.iter().flat_map(|f| f.by_class.keys().cloned()).collect(),
        }
    }

    fn header(&self) -> String {
        if !self.any {
            return String::new();
        }
        let mut out =
            String::from(",federated_accuracy,federated_loss,federated_macro_f1,federated_examples,federated_devices");
        self.ranks.iter().for_each(|rank| out.push_str(&format!(",federated_accuracy_rank_{rank}")));
        for class in &self.classes {
            out.push_str(&format!(",federated_accuracy_class_{}", class.replace([',', '"', '\n'], "_")));
        }
        out
    }

    fn cells(&self, record: Option<&FederatedEvaluation>) -> String {
        if !self.any {
            return String::new();
        }
        let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
        let overall = record.and_then(|f| f.overall.as_ref());
        let mut out = format!(
            ",{},{},{},{},{}",
            opt(overall.map(|o| o.accuracy)),
            opt(overall.map(|o| o.loss)),
            opt(overall.and_then(|o| o.macro_f1)),
            overall.map_or(String::new(), |o| o.examples.to_string()),
            overall.map_or(String::new(), |o| o.devices.to_string()),
        );
        for rank in &self.ranks {
            out.push_str(&format!(",{}", opt(record.and_then(|f| f.by_rank.get(rank)).map(|s| s.accuracy))));
        }
        for class in &self.classes {
            out.push_str(&format!(",{}", opt(record.and_then(|f| f.by_class.get(class)).map(|s| s.accuracy))));
        }
        out
    }
}

/// The summary written before a restart (best effort: the initial evaluation and the skipped
/// rounds are not part of a checkpoint).
pub fn previous_summary(run_dir: &Path) -> Option<RunSummary> {
    let text = std::fs::read(run_dir.join("summary.json")).ok()?;
    serde_json::from_slice::<RunSummary>(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::report_files::write_summary;

    fn update(device: &str, rank: u32, loss: f64) -> UpdateRecord {
        let metrics = LocalMetrics { loss_after: loss, ..LocalMetrics::default() };
        UpdateRecord::new(device, rank, 10, Some(metrics), 100, false)
    }

    fn eval(pairs: &[(usize, f64)]) -> Vec<RankAccuracy> {
        pairs
            .iter()
            .map(|&(rank, accuracy)| RankAccuracy { rank, loss: 1.0 - accuracy, accuracy, ..Default::default() })
            .collect()
    }

    #[test]
    fn reports_have_one_row_per_round_and_the_plots_are_drawn() {
        let summary = RunSummary {
            method: "rbla".into(),
            max_rank: 8,
            rounds_completed: 2,
            rounds: vec![
                RoundRecord {
                    round: 1,
                    updates: vec![update("a", 2, 1.0), update("b", 8, 0.5)],
                    update_bytes: 200,
                    task_bytes: 300,
                    aggregation_seconds: 0.01,
                    round_seconds: 1.5,
                    global_dir: None,
                    evaluation: eval(&[(2, 0.4), (8, 0.6)]),
                    privacy_epsilon: None,
                    secure: None,
                    federated_evaluation: None,
                },
                RoundRecord {
                    round: 2,
                    updates: vec![update("b", 8, 0.25)],
                    update_bytes: 100,
                    task_bytes: 300,
                    aggregation_seconds: 0.01,
                    round_seconds: 1.0,
                    global_dir: None,
                    evaluation: eval(&[(8, 0.7)]),
                    privacy_epsilon: None,
                    secure: None,
                    federated_evaluation: None,
                },
            ],
            final_global: None,
            initial_evaluation: eval(&[(8, 0.1)]),
            privacy: None,
            skipped: Vec::new(),
        };
        let rows = round_rows(&summary);
        assert_eq!(rows.iter().map(|r| r.round).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(rows[1].participants, BTreeMap::from([(2, 1), (8, 1)]));
        assert_eq!(rows[1].accuracy, Some(0.6));
        assert_eq!(rows[1].mean_local_loss, Some(0.75));
        let csv = rounds_csv(&rows);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].ends_with("accuracy_rank_2,accuracy_rank_8,participants_rank_2,participants_rank_8"));
        assert!(lines[2].starts_with("1,2,0.600000,"), "{}", lines[2]);
        assert!(lines[3].ends_with(",,0.700000,0,1"), "{}", lines[3]);
        assert!(!lines[0].contains("macro_f1"), "no per-class columns where none was measured");

        // Per-class results at R_max go into their own columns, in label order.
        let mut measured = summary.clone();
        let class = |label: &str, accuracy: f64| crate::model::class_scores::ClassScore {
            label: label.into(),
            count: 10,
            accuracy,
            f1: accuracy,
        };
        measured.rounds[1].evaluation[0].macro_f1 = Some(0.65);
        measured.rounds[1].evaluation[0].per_class = vec![class("sport", 0.9), class("tech", 0.4)];
        let csv = rounds_csv(&round_rows(&measured));
        let lines: Vec<&str> = csv.lines().collect();
        assert!(lines[0].contains(",round_seconds,macro_f1,accuracy_class_sport,accuracy_class_tech,"), "{}", lines[0]);
        assert!(lines[3].contains(",0.650000,0.900000,0.400000,"), "{}", lines[3]);
        assert!(lines[2].contains(",,,,0.400000,0.600000"), "earlier rows leave them empty: {}", lines[2]);

        let dir = tempfile::tempdir().unwrap();
        write_summary(dir.path(), &summary).unwrap();
        for file in ["summary.json", "rounds.json", "rounds.csv", "accuracy.svg", "participation.svg"] {
            assert!(dir.path().join(file).exists(), "{file}");
        }
        for png in ["accuracy.png", "participation.png"] {
            let bytes = std::fs::read(dir.path().join(png)).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{png}");
        }
        let svg = std::fs::read_to_string(dir.path().join("accuracy.svg")).unwrap();
        assert!(svg.contains("rank 8 (R_max, global)"), "the legend is in the SVG");
    }
}
