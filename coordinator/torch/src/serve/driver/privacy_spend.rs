//! The round driver's side of `[privacy]`'s accounting: each sampled round is counted in the run
//! directory's ledger before its tasks go out, and ε follows that count.

use flotilla_engine::Action;
use tracing::info;

use crate::config::CoordinatorConfig;
use crate::records::report::RunSummary;
use crate::serve::privacy_ledger::PrivacyLedger;

/// Under `[privacy]`: the run directory's ledger of sampled rounds, and the last round it counted.
pub(super) struct PrivacySpend {
    pub(super) ledger: Option<PrivacyLedger>,
    pub(super) last_sampled: u32,
}

impl PrivacySpend {
    /// Under `[privacy]`: the run's ε once `round` is over (aggregated or skipped: its devices were
    /// sampled either way), in the summary, the metrics and the log.
    pub(super) fn spend(&self, config: &CoordinatorConfig, round: u32, summary: &mut RunSummary) -> Option<f64> {
        let privacy = config.privacy.as_ref()?;
        // Every sampled round in this run directory counts, re-runs after a restart included.
        let sampled = self.ledger.as_ref().map_or(round, |l| l.sampled());
        let epsilon = privacy.epsilon_after(config.round.fraction, sampled).unwrap_or(f64::INFINITY);
        metrics::gauge!("fl_privacy_epsilon").set(epsilon);
        if let Some(summary) = summary.privacy.as_mut() {
            summary.epsilon_spent = epsilon;
        }
        info!("[round {round}] privacy spent: ε = {epsilon:.3} at δ = {} (budget {})", privacy.delta, privacy.epsilon);
        Some(epsilon)
    }

    /// Under `[privacy]`: each round these actions start is counted in the ledger, on disk, before
    /// any of its tasks goes out (they go out after every action is handled).
    pub(super) fn count_sampled_rounds(&mut self, actions: &[Action]) -> anyhow::Result<()> {
        let Some(ledger) = self.ledger.as_mut() else { return Ok(()) };
        for action in actions {
            let round = match action {
                Action::SendTask { round, .. }
                | Action::ScheduleTimer { round, .. }
                | Action::SkipRound { round, .. }
                | Action::Aggregate { round, .. } => *round,
                _ => continue,
            };
            if round > self.last_sampled {
                ledger
                    .record(round)
                    .map_err(|e| anyhow::anyhow!("round {round}: cannot record it as sampled: {e:#}"))?;
                self.last_sampled = round;
            }
        }
        Ok(())
    }
}
