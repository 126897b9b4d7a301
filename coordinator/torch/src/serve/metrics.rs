//! Prometheus metrics and a health endpoint, on their own plain-HTTP port (`[metrics] listen`).
//!
//! Names follow Prometheus conventions: snake_case, base units, `_total` only on counters, and no
//! per-device labels (devices appear in logs). Labels are bounded: `status`, `reason`, `rank`,
//! `method`, `phase`.
//!
//! - `fl_round`: the round in progress (or last finished)
//! - `fl_phase{phase}`: 1 for the current phase, 0 for the others
//! - `fl_clients_connected`: devices with a live session
//! - `fl_round_participants{rank}`: devices taking part in the current round, by rank
//! - `fl_updates_total{status="accepted"|"rejected", reason}`: updates, by outcome
//! - `fl_update_bytes_total` / `fl_task_bytes_total`: tensor bytes received in updates / sent in tasks
//! - `fl_aggregation_duration_seconds{method}`, `fl_round_duration_seconds`: histograms
//! - `fl_eval_accuracy{rank}`: test accuracy of the global model at each rank, last round
//! - `fl_federated_eval_accuracy`, `fl_federated_eval_accuracy_by_rank{rank}`: under
//!   `[federated_evaluation]`, the last evaluated model's accuracy on the devices' held-out data
//! - `fl_evaluation_reports_total{status="accepted"|"refused"}`: devices' evaluation reports

use std::net::SocketAddr;

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const PHASES: [&str; 4] = ["waiting_for_devices", "training", "aggregating", "finished"];

/// What `/status` reports (and `flotilla-coordinator status` prints).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Status {
    pub phase: String,
    pub round: u32,
    pub rounds_total: u32,
    pub rounds_completed: u32,
    pub method: String,
    pub max_rank: u32,
    pub devices_connected: usize,
    /// Devices in the current round, by rank.
    pub participants_by_rank: std::collections::BTreeMap<u32, usize>,
    /// Under `[privacy]`: the ε spent so far, its budget and δ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyStatus>,
    /// Under `[privacy]`: what the noise will cost the model (`crate::config::privacy_plan`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_plan: Option<crate::config::privacy_plan::PrivacyPlan>,
    /// Under `[federated_evaluation]`: the last model scored on the devices' held-out data (totals
    /// only), beside the central evaluation's gauges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated_evaluation: Option<crate::records::federated_evaluation::FederatedEvaluation>,
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PrivacyStatus {
    pub epsilon: f64,
    pub epsilon_budget: f64,
    pub delta: f64,
}

pub type SharedStatus = std::sync::Arc<std::sync::RwLock<Status>>;

/// Installs the global recorder and serves `/metrics`, `/healthz` and `/status` on `listen`;
/// returns the bound address.
pub async fn serve(listen: SocketAddr, status: SharedStatus) -> anyhow::Result<SocketAddr> {
    let handle: PrometheusHandle =
        PrometheusBuilder::new().install_recorder().context("cannot install the metrics recorder")?;
    describe();
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(|| std::future::ready("ok\n")))
        .route(
            "/status",
            get(move || {
                let snapshot = status.read().map(|s| s.clone()).unwrap_or_default();
                std::future::ready(axum::Json(snapshot))
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot bind the metrics port {listen}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!("metrics server stopped: {error}");
        }
    });
    Ok(bound)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("fl_round", "The round in progress, or the last one finished");
    describe_gauge!("fl_phase", "1 for the current phase of the round engine");
    describe_gauge!("fl_clients_connected", "Devices with a live session");
    describe_gauge!("fl_round_participants", "Devices taking part in the current round, by rank");
    describe_counter!("fl_updates_total", "Updates received, by outcome");
    describe_counter!("fl_update_bytes_total", Unit::Bytes, "Tensor bytes received in updates");
    describe_counter!("fl_task_bytes_total", Unit::Bytes, "Tensor bytes sent in round tasks");
    describe_histogram!("fl_aggregation_duration_seconds", Unit::Seconds, "Time to finish a round's aggregation");
    describe_histogram!("fl_round_duration_seconds", Unit::Seconds, "Time from a round's tasks to its global adapter");
    describe_gauge!("fl_eval_accuracy", "Test accuracy of the global model at each rank, last round");
    describe_gauge!("fl_federated_eval_accuracy", "Accuracy of the last evaluated model on the devices' held-out data");
    describe_gauge!(
        "fl_federated_eval_accuracy_by_rank",
        "Accuracy of each rank's model on the held-out data of the devices holding it"
    );
    describe_counter!("fl_evaluation_reports_total", "Devices' federated evaluation reports, by outcome");
    describe_counter!("fl_sessions_closed_total", "Sessions the coordinator closed, by reason");
    describe_counter!("fl_certificate_renewals_total", "Online certificate renewals, by outcome");
    describe_gauge!("fl_privacy_epsilon", "Under [privacy]: the run's ε so far, at the configured δ");
}

pub fn set_phase(current: &str) {
    for phase in PHASES {
        metrics::gauge!("fl_phase", "phase" => phase).set(if phase == current { 1.0 } else { 0.0 });
    }
}
