//! The device's side of federated evaluation on the wire: what its held-out data says about a
//! model (sums only, from [`LocalTrainer::evaluate`]), sent on a stream of its own. In the clear as
//! an `EvaluationReport`; under secure aggregation laid out and masked
//! (`flotilla_wire::secure_evaluation`) after the evaluation's own SecAgg+ key agreement, so that
//! the coordinator only ever learns totals. A refused report is logged and the session goes on:
//! evaluation never stops training.

use flotilla_secagg::client::ClientRound;
use flotilla_wire::evaluation::SecureEvaluation;
use flotilla_wire::evaluation::{EvaluationReport, MaskedEvaluation};
use flotilla_wire::framing::{read_frame, write_frame, FrameLimits};
use flotilla_wire::protocol::{CoordinatorMessage, DeviceMessage};
use flotilla_wire::tensor::WireTensors;
use tracing::{info, warn};

use crate::local_trainer::{HeldOutResult, LocalTrainer, Scoring};
use crate::secure_session::agree_secure_round;

/// Why an evaluation did not finish.
pub(crate) enum EvaluationError {
    /// Scoring failed on the device (its backend or its data): the session cannot go on.
    Failed(String),
    /// The connection failed.
    Connection(String),
}

/// Scores `slice` (the global model after round `model_round`) as `scoring` asks and reports the
/// sums in the clear.
pub(crate) async fn evaluate_and_report(
    connection: &quinn::Connection,
    limits: &FrameLimits,
    trainer: &impl LocalTrainer,
    model_round: u32,
    scoring: Scoring,
    slice: WireTensors,
) -> Result<(), EvaluationError> {
    let rank = scoring.rank;
    let result = score(trainer, model_round, scoring, slice).await?;
    log_result(model_round, rank, &result, "reporting the sums");
    let report = DeviceMessage::EvaluationReport(EvaluationReport {
        model_round,
        rank,
        held_out_examples: result.held_out_examples,
        sums: result.sums,
        declined: result.declined,
        cross: result.cross,
    });
    send(connection, limits, model_round, report).await
}

/// Under secure aggregation: agrees the evaluation's keys, scores `slice`, and sends the sums
/// masked in the blocks `secure` names (a device that declines sends its decline the same way).
/// Returns the secure sum's state for the unmasking request that follows; None when the device
/// sat the evaluation out (its masks, if any, are then removed as a dropout's).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn evaluate_masked(
    connection: &quinn::Connection,
    limits: &FrameLimits,
    kit: &flotilla_wire::tls::KitPaths,
    trainer: &impl LocalTrainer,
    model_round: u32,
    scoring: Scoring,
    slice: WireTensors,
    secure: &SecureEvaluation,
) -> Result<Option<ClientRound>, EvaluationError> {
    let rank = scoring.rank;
    let agreed = agree_secure_round(connection, limits, kit, &secure.task, model_round, 0).await;
    let Some(mut client) = agreed.map_err(|e| EvaluationError::Connection(format!("{e:#}")))? else {
        return Ok(None);
    };
    let result = score(trainer, model_round, scoring, slice).await?;
    log_result(model_round, rank, &result, "sending the sums masked");
    let masked = secure
        .layout()
        .encode(&secure.blocks, result.held_out_examples, result.sums.as_ref(), &result.cross)
        .map_err(|e| e.to_string())
        .and_then(|vector| client.masked_input(&vector).map_err(|e| e.to_string()));
    let masked = match masked {
        Ok(masked) => masked,
        Err(why) => {
            warn!("[model {model_round}] cannot mask the evaluation sums ({why}); sitting the evaluation out");
            return Ok(None);
        }
    };
    let message = DeviceMessage::MaskedEvaluation(MaskedEvaluation { model_round, masked });
    send(connection, limits, model_round, message).await?;
    Ok(Some(client))
}

async fn score(
    trainer: &impl LocalTrainer,
    model_round: u32,
    scoring: Scoring,
    slice: WireTensors,
) -> Result<HeldOutResult, EvaluationError> {
    trainer
        .evaluate(slice, scoring)
        .await
        .map_err(|e| EvaluationError::Failed(format!("[model {model_round}] evaluation failed: {e:#}")))
}

fn log_result(model_round: u32, rank: u32, result: &HeldOutResult, then: &str) {
    match &result.sums {
        Some(sums) => info!(
            "[model {model_round}] held-out evaluation at rank {rank}: {:.1}% of {} examples; {then}",
            sums.accuracy() * 100.0,
            sums.examples
        ),
        None => info!("[model {model_round}] declining evaluation: {}", result.declined),
    }
}

/// Sends an evaluation message on a stream of its own and logs the coordinator's answer.
async fn send(
    connection: &quinn::Connection,
    limits: &FrameLimits,
    model_round: u32,
    message: DeviceMessage,
) -> Result<(), EvaluationError> {
    let answer = async {
        let (mut send, mut recv) = connection.open_bi().await?;
        write_frame(&mut send, &message, &WireTensors::default()).await?;
        send.finish()?;
        let (answer, _) = read_frame::<_, CoordinatorMessage>(&mut recv, limits).await?;
        anyhow::Ok(answer)
    }
    .await
    .map_err(|e| EvaluationError::Connection(format!("{e:#}")))?;
    match answer {
        CoordinatorMessage::Ack(_) => info!("[model {model_round}] evaluation report accepted"),
        CoordinatorMessage::Reject(reject) => {
            warn!("[model {model_round}] evaluation report refused: {}", reject.reason)
        }
        other => warn!("[model {model_round}] unexpected reply to an evaluation report: {}", other.name()),
    }
    Ok(())
}
