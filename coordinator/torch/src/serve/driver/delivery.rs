//! How tasks reach devices: round and evaluation tasks with their rank's slice of the global
//! adapter (made once per rank by the aggregation worker and shared by every device's stream),
//! other pushes, and the run's end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_wire::framing::write_frame;
use flotilla_wire::protocol::{CoordinatorMessage, Finished};
use flotilla_wire::quic::write_frame_shared;
use flotilla_wire::tensor::{SharedTensors, WireTensors};
use tracing::warn;

use super::links::Links;
use super::DriverInput;

impl Links {
    /// Sends round `round`'s deliveries (round and evaluation tasks) from a task of its own, once
    /// the aggregation worker has made the ranks' slices.
    pub(super) fn send_deliveries(&self, deliveries: Vec<TaskDelivery>, round: u32) {
        if deliveries.is_empty() {
            return;
        }
        let ranks: Vec<u32> = deliveries.iter().map(|d| d.rank).collect();
        let worker = self.worker.clone();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let slices: BTreeMap<u32, SharedTensors> = match worker.slices(ranks).await {
                Ok(slices) => slices.into_iter().map(|(rank, wire)| (rank, SharedTensors::from(wire))).collect(),
                Err(error) => {
                    let _ = inputs.send(DriverInput::Fatal(format!("cannot slice the global adapter: {error}")));
                    return;
                }
            };
            // Counted before any task leaves, so before any update of this round can arrive.
            let bytes = |evaluation: bool| -> u64 {
                let sent = deliveries.iter().filter(|d| d.evaluation_only == evaluation);
                sent.filter_map(|d| slices.get(&d.rank)).map(|s| s.body.len() as u64).sum()
            };
            if deliveries.iter().any(|d| !d.evaluation_only) {
                let _ = inputs.send(DriverInput::TasksSent { round, bytes: bytes(false) });
            }
            if let Some(evaluation) = deliveries.iter().find(|d| d.evaluation_only) {
                let _ = inputs.send(DriverInput::EvaluationSent { model_round: evaluation.round, bytes: bytes(true) });
            }
            deliver_tasks(deliveries, Arc::new(slices));
        });
    }

    /// Tells every device the run is over and waits briefly for them to hang up.
    pub(super) async fn finish_sessions(&mut self, rounds_completed: u32) {
        let message =
            CoordinatorMessage::Finished(Finished { rounds_completed, reason: "all rounds completed".into() });
        let mut waits = Vec::new();
        for (device, connection) in self.sessions.drain() {
            let message = message.clone();
            waits.push(tokio::spawn(async move {
                if let Err(error) = push(&connection, &message).await {
                    warn!(device = %device, "cannot send Finished: {error:#}");
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
            }));
        }
        for wait in waits {
            let _ = wait.await;
        }
    }
}

/// Sends `message` to a device on a unidirectional stream of its own.
pub(crate) async fn push(connection: &quinn::Connection, message: &CoordinatorMessage) -> anyhow::Result<()> {
    let mut send = connection.open_uni().await?;
    write_frame(&mut send, message, &WireTensors::default()).await?;
    send.finish()?;
    Ok(())
}

/// One device's round task (or evaluation task), waiting for its rank's slice.
pub(super) struct TaskDelivery {
    pub(super) device: String,
    /// The round, or for an evaluation task the model's round.
    pub(super) round: u32,
    pub(super) rank: u32,
    pub(super) connection: quinn::Connection,
    pub(super) task: CoordinatorMessage,
    pub(super) evaluation_only: bool,
}

/// Sends each task with its rank's shared slice, each on its own stream and task.
fn deliver_tasks(deliveries: Vec<TaskDelivery>, slices: Arc<BTreeMap<u32, SharedTensors>>) {
    for TaskDelivery { device, round, rank, connection, task, .. } in deliveries {
        let Some(slice) = slices.get(&rank) else { continue };
        metrics::counter!("fl_task_bytes_total").increment(slice.body.len() as u64);
        let slices = slices.clone();
        tokio::spawn(async move {
            let result = async {
                let mut send = connection.open_uni().await?;
                write_frame_shared(&mut send, &task, &slices[&rank]).await?;
                send.finish()?;
                anyhow::Ok(())
            }
            .await;
            if let Err(error) = result {
                warn!(device = %device, round, "cannot send round task: {error:#}");
            }
        });
    }
}
