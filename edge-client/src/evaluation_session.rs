//! The device's side of federated evaluation on the wire: the report of what its held-out data
//! says about a model (sums only, from [`LocalTrainer::evaluate`](crate::local_trainer::LocalTrainer)),
//! sent on a stream of its own. A refused report is logged and the session goes on: evaluation
//! never stops training.

use flotilla_wire::evaluation::EvaluationReport;
use flotilla_wire::framing::{read_frame, write_frame, FrameLimits};
use flotilla_wire::protocol::{CoordinatorMessage, DeviceMessage};
use flotilla_wire::tensor::WireTensors;
use tracing::{info, warn};

use crate::local_trainer::HeldOutResult;

/// Sends the report of model `model_round`, scored at `rank`, and logs the coordinator's answer.
pub(crate) async fn send_report(
    connection: &quinn::Connection,
    limits: &FrameLimits,
    model_round: u32,
    rank: u32,
    result: HeldOutResult,
) -> anyhow::Result<()> {
    match &result.sums {
        Some(sums) => info!(
            "[model {model_round}] held-out evaluation at rank {rank}: {:.1}% of {} examples; reporting the sums",
            sums.accuracy() * 100.0,
            sums.examples
        ),
        None => info!("[model {model_round}] declining evaluation: {}", result.declined),
    }
    let report = DeviceMessage::EvaluationReport(EvaluationReport {
        model_round,
        rank,
        held_out_examples: result.held_out_examples,
        sums: result.sums,
        declined: result.declined,
        cross: result.cross,
    });
    let (mut send, mut recv) = connection.open_bi().await?;
    write_frame(&mut send, &report, &WireTensors::default()).await?;
    send.finish()?;
    let (answer, _) = read_frame::<_, CoordinatorMessage>(&mut recv, limits).await?;
    match answer {
        CoordinatorMessage::Ack(_) => info!("[model {model_round}] evaluation report accepted"),
        CoordinatorMessage::Reject(reject) => {
            warn!("[model {model_round}] evaluation report refused: {}", reject.reason)
        }
        other => warn!("[model {model_round}] unexpected reply to an evaluation report: {}", other.name()),
    }
    Ok(())
}
