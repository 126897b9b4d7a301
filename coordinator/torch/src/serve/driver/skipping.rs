//! A round that ends without a new global adapter: why, in the log, the metrics and the reports,
//! and what it costs (under `[privacy]` a skipped round was still sampled).

use flotilla_engine::SkipWhy;
use tracing::warn;

use super::RoundDriver;
use crate::records::report::SkippedRound;

/// Why a device left, as it said in its close: recorded as a count per cause in a skipped
/// round's reason (no device ids, which records under SecAgg or `[privacy]` must not hold).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Departure {
    RefusedTask,
    DataUnusable,
}

impl Departure {
    /// The departure a device's close code states, if it states one.
    pub fn of_close_code(code: u64) -> Option<Departure> {
        use flotilla_wire::protocol::close;
        match code {
            code if code == u64::from(close::REFUSED_TASK) => Some(Departure::RefusedTask),
            code if code == u64::from(close::DATA_UNUSABLE) => Some(Departure::DataUnusable),
            _ => None,
        }
    }

    /// A bounded label for `fl_sessions_closed_total{reason}`.
    pub fn label(self) -> &'static str {
        match self {
            Departure::RefusedTask => "task_refused",
            Departure::DataUnusable => "data_unusable",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Departure::RefusedTask => "refused its round task",
            Departure::DataUnusable => "cannot use its own data",
        }
    }
}

impl RoundDriver {
    pub(super) async fn skip(&mut self, round: u32, updates: usize, why: SkipWhy) -> anyhow::Result<()> {
        let reason = match (&why, self.cannot_run.remove(&round)) {
            (SkipWhy::DrawRefused(reason), _) => format!("{reason}; no task was sent"),
            (SkipWhy::ShortOfQuorum, Some(reason)) => reason,
            (SkipWhy::ShortOfQuorum, None) => {
                let mut reason = format!(
                    "{updates} update(s) by the deadline, short of the quorum of {}",
                    self.links.config.round.min_updates
                );
                if let Some(departures) = self.departures.get(&round) {
                    let causes: Vec<String> =
                        departures.iter().map(|(why, n)| format!("{n} participant(s) {}", why.describe())).collect();
                    reason += &format!(" ({} and left)", causes.join(", "));
                }
                reason
            }
        };
        self.departures.remove(&round);
        warn!("[round {round}/{}] skipped, global adapter unchanged: {reason}", self.links.config.round.rounds);
        metrics::counter!("fl_rounds_skipped_total", "reason" => why.label()).increment(1);
        self.spend_privacy(round);
        self.summary.skipped.push(SkippedRound { round, reason });
        self.reports.submit(self.summary.clone());
        if self.secure.is_round(round) {
            self.secure.forget(round);
            metrics::counter!("fl_secagg_rounds_total", "outcome" => "discarded").increment(1);
        }
        if updates > 0 {
            // Rare, and the next round's folds must not reach the discarded accumulator: wait.
            self.links
                .worker
                .discard(round)
                .await
                .map_err(|e| anyhow::anyhow!("round {round}: cannot discard the partial aggregate: {e}"))?;
        }
        Ok(())
    }
}
