//! The gauges and the `/status` snapshot that mirror the engine's state, published whenever it
//! changes (and once at start, before any device joins).

use std::collections::BTreeSet;

use flotilla_engine::{Engine, Phase};

use crate::config::privacy_plan::PrivacyPlan;
use crate::config::CoordinatorConfig;
use crate::records::report::RunSummary;
use crate::serve::metrics::{SharedStatus, Status};

/// Where the driver's state is published: the `/status` snapshot, and what its gauges need.
pub(super) struct Publication {
    pub(super) status: SharedStatus,
    /// Every rank a device has joined with: the `fl_round_participants` gauges' labels.
    pub(super) rank_labels: BTreeSet<u32>,
    /// Under `[privacy]`: what the noise will cost the model.
    pub(super) privacy_plan: Option<PrivacyPlan>,
}

impl Publication {
    /// Gauges and the `/status` snapshot that mirror the engine's state.
    pub(super) fn publish(&self, engine: &Engine, summary: &RunSummary, config: &CoordinatorConfig) {
        let phase = engine.phase();
        crate::serve::metrics::set_phase(phase.name());
        let round = match phase {
            Phase::Training { round } | Phase::Aggregating { round } => *round,
            _ => summary.rounds.last().map_or(0, |r| r.round),
        };
        metrics::gauge!("fl_round").set(f64::from(round));
        metrics::gauge!("fl_clients_connected").set(engine.connected() as f64);
        let by_rank = engine.participants_by_rank().clone();
        if let Ok(mut status) = self.status.write() {
            *status = Status {
                phase: phase.name().to_string(),
                round,
                rounds_total: config.round.rounds,
                rounds_completed: summary.rounds.last().map_or(summary.rounds_completed, |r| r.round),
                method: config.aggregation.method.to_string(),
                max_rank: config.aggregation.max_rank,
                devices_connected: engine.connected(),
                participants_by_rank: by_rank.clone(),
                privacy: summary.privacy.as_ref().map(|p| crate::serve::metrics::PrivacyStatus {
                    epsilon: p.epsilon_spent,
                    epsilon_budget: p.epsilon_budget,
                    delta: p.delta,
                }),
                privacy_plan: self.privacy_plan.clone(),
                federated_evaluation: summary
                    .rounds
                    .iter()
                    .rev()
                    .find_map(|r| r.federated_evaluation.as_deref().cloned()),
            };
        }
        for &rank in &self.rank_labels {
            let count = by_rank.get(&rank).copied().unwrap_or(0);
            metrics::gauge!("fl_round_participants", "rank" => rank.to_string()).set(count as f64);
        }
    }
}
