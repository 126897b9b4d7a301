//! The run's records as the driver keeps them: the summary (one record per round), the report
//! writer that puts it on disk off the event loop, and the test-set results that arrive beside
//! the rounds (an evaluation can finish before or after its round's record).

use std::collections::{BTreeSet, HashMap};

use tracing::info;

use crate::config::CoordinatorConfig;
use crate::model::evaluation::RankAccuracy;
use crate::records::federated_evaluation::FederatedEvaluation;
use crate::records::report::{RoundRecord, RunSummary, SkippedRound};
use crate::records::report_files::ReportWriter;

pub(super) struct RunRecords {
    pub(super) summary: RunSummary,
    reports: ReportWriter,
    /// Rounds aggregated whose evaluation has not come back yet (empty without an evaluation set).
    pending: BTreeSet<u32>,
    /// Results that came back before their round's record (a fast evaluation can overtake it).
    early: HashMap<u32, Vec<RankAccuracy>>,
}

impl RunRecords {
    pub(super) fn new(summary: RunSummary, config: &CoordinatorConfig) -> RunRecords {
        let reports = ReportWriter::start(config.server.run_dir.clone());
        RunRecords { summary, reports, pending: BTreeSet::new(), early: HashMap::new() }
    }

    /// Whether a round's test results have not come back yet.
    pub(super) fn evaluations_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Puts a round's test results into its record (or keeps them until the record arrives). A
    /// failed evaluation (the evaluation thread logged why) leaves the record without results.
    pub(super) fn record_evaluation(&mut self, round: u32, result: Result<Vec<RankAccuracy>, String>) {
        let results = result.unwrap_or_default();
        for result in &results {
            metrics::gauge!("fl_eval_accuracy", "rank" => result.rank.to_string()).set(result.accuracy);
        }
        match self.summary.rounds.iter_mut().find(|r| r.round == round) {
            Some(record) => {
                self.pending.remove(&round);
                record.evaluation = results;
                self.reports.submit(self.summary.clone());
            }
            None => {
                self.early.insert(round, results);
            }
        }
    }

    /// A round's record, with the privacy spent once it is over.
    pub(super) fn record_round(&mut self, config: &CoordinatorConfig, mut record: RoundRecord, epsilon: Option<f64>) {
        metrics::histogram!("fl_aggregation_duration_seconds", "method" => config.aggregation.method.name())
            .record(record.aggregation_seconds);
        metrics::histogram!("fl_round_duration_seconds").record(record.round_seconds);
        record.privacy_epsilon = epsilon;
        match self.early.remove(&record.round) {
            Some(results) => record.evaluation = results,
            None if config.evaluation.test_data.is_some() => {
                self.pending.insert(record.round);
            }
            None => {}
        }
        let ranks: Vec<String> = record.updates.iter().map(|u| u.rank.to_string()).collect();
        info!(
            "[round {}/{}] aggregated {} updates (ranks {}) with {} in {:.1} ms → {}",
            record.round,
            config.round.rounds,
            record.updates.len(),
            ranks.join(","),
            config.aggregation.method,
            record.aggregation_seconds * 1e3,
            record.global_dir.as_deref().map(|d| d.display().to_string()).unwrap_or_default()
        );
        self.summary.final_global.clone_from(&record.global_dir);
        self.summary.rounds_completed = record.round;
        self.summary.rounds.push(record);
        // Written by the report thread, off this loop.
        self.reports.submit(self.summary.clone());
    }

    /// A round that ended without a new global adapter.
    pub(super) fn record_skip(&mut self, skipped: SkippedRound) {
        self.summary.skipped.push(skipped);
        self.reports.submit(self.summary.clone());
    }

    /// A model's federated evaluation joins its round's record.
    pub(super) fn record_federated(&mut self, model_round: u32, evaluation: FederatedEvaluation) {
        if let Some(round) = self.summary.rounds.iter_mut().find(|r| r.round == model_round) {
            round.federated_evaluation = Some(Box::new(evaluation));
            self.reports.submit(self.summary.clone());
        }
    }

    /// Writes the last reports; returns once they are on disk.
    pub(super) async fn finish(self) -> anyhow::Result<()> {
        let reports = self.reports;
        tokio::task::spawn_blocking(move || reports.finish()).await?;
        Ok(())
    }
}
