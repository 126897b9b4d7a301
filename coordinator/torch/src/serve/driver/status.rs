//! The gauges and the `/status` snapshot that mirror the engine's state, published whenever it
//! changes (and once at start, before any device joins).

use flotilla_engine::Phase;

use super::RoundDriver;
use crate::serve::metrics::Status;

impl RoundDriver {
    /// Gauges and the `/status` snapshot that mirror the engine's state.
    pub(super) fn publish_state(&self) {
        let phase = self.engine.phase();
        crate::serve::metrics::set_phase(phase.name());
        let round = match phase {
            Phase::Training { round } | Phase::Aggregating { round } => *round,
            _ => self.summary.rounds.last().map_or(0, |r| r.round),
        };
        metrics::gauge!("fl_round").set(f64::from(round));
        metrics::gauge!("fl_clients_connected").set(self.engine.connected() as f64);
        let by_rank = self.engine.participants_by_rank().clone();
        if let Ok(mut status) = self.status.write() {
            *status = Status {
                phase: phase.name().to_string(),
                round,
                rounds_total: self.links.config.round.rounds,
                rounds_completed: self.summary.rounds.last().map_or(self.summary.rounds_completed, |r| r.round),
                method: self.links.config.aggregation.method.to_string(),
                max_rank: self.links.config.aggregation.max_rank,
                devices_connected: self.engine.connected(),
                participants_by_rank: by_rank.clone(),
                privacy: self.summary.privacy.as_ref().map(|p| crate::serve::metrics::PrivacyStatus {
                    epsilon: p.epsilon_spent,
                    epsilon_budget: p.epsilon_budget,
                    delta: p.delta,
                }),
                privacy_plan: self.privacy_plan.clone(),
                federated_evaluation: self
                    .summary
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
