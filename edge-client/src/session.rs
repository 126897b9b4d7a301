//! A device's session with the coordinator: connect, Hello, then serve round tasks until the run is
//! finished. Transient losses reconnect with exponential backoff and jitter; certificate failures
//! and refusals are fatal (retrying cannot fix them).
//!
//! Certificates: the kit is read at every connection, so a renewed certificate is used from the
//! next one on. When the certificate is within `renew_within` of its end, the device asks the
//! coordinator to renew it (a new key made here, a signing request, the answer installed into the
//! kit); a coordinator that does not renew says so, and the device carries on until expiry. When
//! the certificate expires the coordinator closes the session; the device reconnects if it holds a
//! renewed certificate and stops with a clear message if not.

use std::time::Duration;

use flotilla_wire::evaluation::EvaluationTask;
use flotilla_wire::framing::{read_frame, write_frame};
use flotilla_wire::protocol::ALPN;
use flotilla_wire::protocol::{
    close, BaseDelivery, CoordinatorMessage, DeviceMessage, Hello, MaskedUpdate, RoundTask, Update, PROTOCOL_VERSION,
};
use flotilla_wire::quic::{self, is_certificate_failure, tls_alert, ALERT_NO_APPLICATION_PROTOCOL};
use flotilla_wire::tensor::WireTensors;
use tracing::{info, warn};

use crate::backoff::backoff;
use crate::base_store::StoreError;
use crate::evaluation_session::{evaluate_and_report, evaluate_masked, EvaluationError};
use crate::local_trainer::{BaseFailure, BaseSource, LocalTrainer, Scoring, TrainedUpdate, UpdateShaping};
use crate::renewal::{renew_certificate, RenewalError};
use crate::secure_session::{agree_secure_round, reveal_unmasking_shares};
use crate::session_context::{certificate_check, classify, stop_reached, stopping};
pub use crate::session_context::{SessionError, SessionSettings, Stop};
use flotilla_secagg::client::ClientRound;

pub struct SessionReport {
    pub rounds_trained: u32,
    /// The run's rounds, as the coordinator's `Finished` message said; `None` when the run ended
    /// while this device was busy and the message never reached it.
    pub rounds_completed: Option<u32>,
}

pub async fn run(
    endpoint: &quinn::Endpoint,
    trainer: &impl LocalTrainer,
    settings: &SessionSettings,
) -> Result<SessionReport, SessionError> {
    let mut failures = 0u32;
    let mut rounds_trained = 0u32;
    loop {
        match connect_and_serve(endpoint, trainer, settings, &mut rounds_trained).await {
            Ok(rounds_completed) => {
                return Ok(SessionReport { rounds_trained, rounds_completed: Some(rounds_completed) });
            }
            Err(SessionError::RunOver(message)) => {
                info!("{message}");
                settings.progress.finish(&message);
                return Ok(SessionReport { rounds_trained, rounds_completed: None });
            }
            Err(SessionError::Fatal(message)) => return Err(SessionError::Fatal(message)),
            Err(SessionError::Stopped(message)) => return Err(SessionError::Stopped(message)),
            Err(SessionError::Transient(message)) => {
                failures += 1;
                if failures >= settings.max_attempts {
                    return Err(SessionError::Transient(format!(
                        "giving up after {failures} attempts; last error: {message}"
                    )));
                }
                let delay = backoff(failures, settings.initial_backoff, settings.max_backoff);
                warn!(attempt = failures, "connection to the coordinator lost: {message}; retrying in {delay:?}");
                settings.progress.reconnecting(delay);
                let mut stop = settings.stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop_reached(&mut stop, Stop::AfterUpload) => {
                        return Err(SessionError::Stopped("stopped while reconnecting".into()));
                    }
                }
            }
        }
    }
}

async fn connect_and_serve(
    endpoint: &quinn::Endpoint,
    trainer: &impl LocalTrainer,
    settings: &SessionSettings,
    rounds_trained: &mut u32,
) -> Result<u32, SessionError> {
    let connection = connect(endpoint, settings).await?;
    admit(&connection, trainer, settings).await?;
    let mut stop = settings.stop.clone();
    let mut renewal_asked = false;
    // Secure sums (a round's update, an evaluation's sums) whose masked vector is in, until the
    // coordinator asks for their unmasking shares: (session, round, state).
    let mut masked: Vec<(u64, u32, ClientRound)> = Vec::new();
    loop {
        if !renewal_asked {
            if let Some(expires) = renewal_due(settings)? {
                renewal_asked = true;
                renew_certificate(&connection, &settings.kit, &settings.limits, expires).await.map_err(
                    |e| match e {
                        RenewalError::Kit(message) => SessionError::Fatal(message),
                        RenewalError::Connection(message) => {
                            classify(&connection, settings, "renewing the certificate", message)
                        }
                    },
                )?;
            }
        }
        let accepted = tokio::select! {
            accepted = connection.accept_uni() => accepted,
            _ = stop_reached(&mut stop, Stop::AfterUpload) => {
                return Err(stopping(&connection, "stopped while waiting for a round".into()));
            }
        };
        let mut recv = accepted.map_err(|e| classify(&connection, settings, "waiting for a task", e))?;
        let (message, tensors) = read_frame::<_, CoordinatorMessage>(&mut recv, &settings.limits)
            .await
            .map_err(|e| classify(&connection, settings, "reading a task", e))?;
        match message {
            CoordinatorMessage::RoundTask(task) => {
                let (round, session) = (task.round, task.secure.as_ref().map_or(0, |s| s.session));
                let trained = train_and_upload(&connection, trainer, settings, &mut stop, task, tensors).await?;
                keep_masked(&mut masked, trained.map(|client| (session, round, client)));
                *rounds_trained += 1;
                if *stop.borrow() >= Stop::AfterUpload {
                    return Err(stopping(&connection, format!("stopped after round {round}'s upload")));
                }
            }
            CoordinatorMessage::EvaluationTask(task) => {
                let evaluated = evaluation_task(&connection, trainer, settings, &mut stop, task, tensors).await?;
                keep_masked(&mut masked, evaluated);
            }
            CoordinatorMessage::SecureUnmask(request) => match take_masked(&mut masked, request.session) {
                Some((round, client)) => {
                    // Crash-test hook: a device that drops after its masked upload.
                    flotilla_wire::crash_test::pause_if_requested("before-unmask", round).await;
                    reveal_unmasking_shares(&connection, &settings.limits, client, &request)
                        .await
                        .map_err(|e| classify(&connection, settings, "secure aggregation", format!("{e:#}")))?
                }
                None => warn!("the coordinator asked for unmasking shares, but no secure round is waiting for them"),
            },
            CoordinatorMessage::Finished(finished) => {
                info!(rounds = finished.rounds_completed, "run finished: {}", finished.reason);
                settings.progress.finish(&format!("run finished after {} round(s)", finished.rounds_completed));
                connection.close(close::DONE.into(), b"done");
                return Ok(finished.rounds_completed);
            }
            other => {
                warn!("ignoring unexpected message from the coordinator: {other:?}");
            }
        }
    }
}

/// A round task with `evaluate` set: the slice is scored as received, as it will be trained (the
/// slots above the rank folded: Fold-and-Fill sends the whole adapter, the other methods exactly
/// the rank's), for model `round - 1`, before training.
async fn evaluate_before_training(
    connection: &quinn::Connection,
    trainer: &impl LocalTrainer,
    settings: &SessionSettings,
    stop: &mut tokio::sync::watch::Receiver<Stop>,
    task: &RoundTask,
    tensors: &WireTensors,
) -> Result<(), SessionError> {
    if !task.evaluate {
        return Ok(());
    }
    let scoring = Scoring { rank: task.rank, cross_ranks: Vec::new(), fold_tail: true };
    let model_round = task.round - 1;
    let evaluated = evaluate_and_report(connection, &settings.limits, trainer, model_round, scoring, tensors.clone());
    unless_stopped(connection, settings, stop, model_round, evaluated).await
}

/// An evaluation task: scored and reported, in the clear or (under secure aggregation) masked;
/// returns the evaluation's secure sum state (its session and state) for the unmasking request.
async fn evaluation_task(
    connection: &quinn::Connection,
    trainer: &impl LocalTrainer,
    settings: &SessionSettings,
    stop: &mut tokio::sync::watch::Receiver<Stop>,
    task: EvaluationTask,
    tensors: WireTensors,
) -> Result<Option<(u64, u32, ClientRound)>, SessionError> {
    let scoring = Scoring { rank: task.rank, cross_ranks: task.cross_ranks, fold_tail: task.fold_tail };
    let (model_round, limits, kit) = (task.model_round, &settings.limits, &settings.kit);
    let evaluated = async {
        match &task.secure {
            Some(secure) => {
                let masked = evaluate_masked(connection, limits, kit, trainer, model_round, scoring, tensors, secure);
                Ok(masked.await?.map(|client| (secure.task.session, model_round, client)))
            }
            None => {
                evaluate_and_report(connection, limits, trainer, model_round, scoring, tensors).await.map(|()| None)
            }
        }
    };
    unless_stopped(connection, settings, stop, model_round, evaluated).await
}

/// Runs model `model_round`'s evaluation unless a stop request comes first (the evaluation is then
/// abandoned); its failure as the session sees it.
async fn unless_stopped<T>(
    connection: &quinn::Connection,
    settings: &SessionSettings,
    stop: &mut tokio::sync::watch::Receiver<Stop>,
    model_round: u32,
    evaluated: impl std::future::Future<Output = Result<T, EvaluationError>>,
) -> Result<T, SessionError> {
    let evaluated = tokio::select! {
        evaluated = evaluated => evaluated,
        _ = stop_reached(stop, Stop::AfterUpload) => {
            return Err(stopping(connection, format!("stopped: model {model_round}'s evaluation abandoned")));
        }
    };
    evaluated.map_err(|error| match error {
        EvaluationError::Failed(message) => SessionError::Fatal(message),
        EvaluationError::Connection(message) => classify(connection, settings, "reporting an evaluation", message),
    })
}

/// The most secure sums a device waits to unmask at once (a round's and an evaluation's, and one
/// the coordinator discarded).
const MASKED_KEPT: usize = 4;

fn keep_masked(masked: &mut Vec<(u64, u32, ClientRound)>, new: Option<(u64, u32, ClientRound)>) {
    if let Some(new) = new {
        if masked.len() >= MASKED_KEPT {
            masked.remove(0);
        }
        masked.push(new);
    }
}

/// The secure sum of `session`, taken for its unmasking: (round, state).
fn take_masked(masked: &mut Vec<(u64, u32, ClientRound)>, session: u64) -> Option<(u32, ClientRound)> {
    let at = masked.iter().position(|(s, _, _)| *s == session)?;
    let (_, round, client) = masked.remove(at);
    Some((round, client))
}

/// How long a handshake may take before the attempt counts as failed (and is retried with backoff).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A mutual-TLS QUIC connection to the coordinator; handshake failures that retrying cannot fix
/// (wrong protocol version, a certificate refused) are fatal.
async fn connect(endpoint: &quinn::Endpoint, settings: &SessionSettings) -> Result<quinn::Connection, SessionError> {
    certificate_check(settings)?;
    let client_config = quic::client_config(&settings.kit, &settings.transport)
        .map_err(|e| SessionError::Fatal(format!("cannot use the kit: {e:#}")))?;
    let connecting = endpoint
        .connect_with(client_config, settings.coordinator, &settings.server_name)
        .map_err(|e| SessionError::Fatal(format!("cannot connect to {}: {e}", settings.coordinator)))?;
    // A coordinator that does not answer (a mistyped address, a host down) would otherwise cost the
    // whole idle timeout per attempt.
    let Ok(connected) = tokio::time::timeout(CONNECT_TIMEOUT, connecting).await else {
        return Err(SessionError::Transient(format!(
            "cannot reach {}: no answer to the handshake within {} s (is the address right and the coordinator up?)",
            settings.coordinator,
            CONNECT_TIMEOUT.as_secs()
        )));
    };
    match connected {
        Ok(connection) => Ok(connection),
        Err(error) if tls_alert(&error) == Some(ALERT_NO_APPLICATION_PROTOCOL) => Err(SessionError::Fatal(format!(
            "the coordinator at {} does not speak {} ({error}): this device and the coordinator run \
             incompatible protocol versions; install matching releases",
            settings.coordinator,
            String::from_utf8_lossy(ALPN)
        ))),
        Err(error) if error.to_string().contains("Revoked") => Err(SessionError::Fatal(format!(
            "the coordinator at {} presented a revoked certificate ({error}): the kit's crl.pem lists it; do not \
             connect until the operator issues the coordinator a new certificate",
            settings.coordinator
        ))),
        Err(error) if is_certificate_failure(&error) => Err(SessionError::Fatal(format!(
            "TLS handshake with {} failed ({error}); check the kit's CA certificate and the server name '{}'",
            settings.coordinator, settings.server_name
        ))),
        Err(error) => Err(SessionError::Transient(format!("cannot reach {}: {error}", settings.coordinator))),
    }
}

/// Hello → Welcome, then the coordinator's model and base weights go to the training thread.
async fn admit(
    connection: &quinn::Connection,
    trainer: &impl LocalTrainer,
    settings: &SessionSettings,
) -> Result<(), SessionError> {
    let (welcome, base) = hello(connection, settings).await.map_err(|e| match e {
        SessionError::Transient(msg) => classify(connection, settings, "hello", msg),
        fatal => fatal,
    })?;
    info!(rank = welcome.assigned_rank, max_rank = welcome.model.max_rank, "admitted by the coordinator");
    if let Some(crl) = &welcome.crl_pem {
        match flotilla_wire::tls::refresh_kit_crl(&settings.kit, crl) {
            Ok(true) => info!("the kit's revocation list was refreshed from the coordinator's (signed by the CA)"),
            Ok(false) => {}
            Err(error) => warn!("the coordinator's revocation list was not stored: {error}"),
        }
    }
    settings.progress.admitted(welcome.assigned_rank);
    let scale = welcome.model.scale();
    let base = match &welcome.base {
        BaseDelivery::Inline => BaseSource::Tensors(base),
        BaseDelivery::Checkpoint { files } => {
            let dir = settings.base_store.obtain(connection, files).await.map_err(|e| match e {
                StoreError::Transient(msg) => classify(connection, settings, "checkpoint fetch", msg),
                StoreError::Fatal(msg) => SessionError::Fatal(msg),
            })?;
            info!(base = %welcome.base_version, dir = %dir.display(), "using the base checkpoint");
            BaseSource::Checkpoint(dir)
        }
    };
    match trainer.set_base(welcome.model.architecture.clone(), scale, base, welcome.evaluation.clone()).await {
        Ok(()) => Ok(()),
        Err(failure @ BaseFailure::Data(_)) => {
            // The coordinator is told why, so that it records the cause instead of a silent leave.
            let why = failure.to_string();
            connection.close(close::DATA_UNUSABLE.into(), close::reason(&why));
            Err(SessionError::Fatal(format!("this device {why}; fix its --data and start it again")))
        }
        Err(failure) => Err(SessionError::Fatal(failure.to_string())),
    }
}

/// One round: trains the task's slice on the training thread and uploads the update; a stop
/// request abandons the round (nothing half-sent is kept by the coordinator). Under secure
/// aggregation the keys and shares are exchanged first, the update goes up masked, and the round's
/// state is returned for the unmasking request that follows.
async fn train_and_upload(
    connection: &quinn::Connection,
    trainer: &impl LocalTrainer,
    settings: &SessionSettings,
    stop: &mut tokio::sync::watch::Receiver<Stop>,
    task: RoundTask,
    tensors: WireTensors,
) -> Result<Option<ClientRound>, SessionError> {
    let round = task.round;
    let admitted = match (settings.floor.refusal(&task), &settings.budget) {
        (Some(why), _) => Err(why),
        (None, Some(budget)) => budget
            .lock()
            .map_err(|_| "the privacy ledger is unusable".to_string())
            .and_then(|mut budget| budget.admit(round, task.noise_multiplier))
            .map(|epsilon| info!("[round {round}] privacy: this device's ε after this round {epsilon:.3}")),
        (None, None) => Ok(()),
    };
    if let Err(why) = admitted {
        // Nothing is trained or sent; closing tells the coordinator at once.
        connection.close(close::REFUSED_TASK.into(), close::reason(&why));
        return Err(SessionError::Fatal(format!("refused: {why}")));
    }
    evaluate_before_training(connection, trainer, settings, stop, &task, &tensors).await?;
    let mut secure_round = None;
    if let Some(secure) = &task.secure {
        secure_round = tokio::select! {
            agreed = agree_secure_round(connection, &settings.limits, &settings.kit, secure, round, task.rank) => {
                agreed.map_err(|e| classify(connection, settings, "secure aggregation", format!("{e:#}")))?
            }
            _ = stop_reached(stop, Stop::AfterUpload) => {
                return Err(stopping(connection, format!("stopped: round {round}'s key agreement abandoned")));
            }
        };
        if secure_round.is_none() {
            return Ok(None);
        }
    }
    info!("[round {round}/{}] training at rank {}", task.total_rounds, task.rank);
    settings.progress.training(round, task.total_rounds, task.rank);
    let shaping = UpdateShaping { clip_norm: task.clip_norm, secure: task.secure.clone() };
    let trained = tokio::select! {
        trained = trainer.train(tensors, task.rank, task.training.clone(), shaping) => trained,
        _ = stop_reached(stop, Stop::AfterUpload) => {
            return Err(stopping(connection, format!("stopped: round {round}'s training abandoned, nothing sent")));
        }
    }
    .map_err(|e| SessionError::Fatal(format!("[round {round}] training failed: {e:#}")))?;
    if let (Some(norm), Some(bound)) = (trained.change_norm, task.clip_norm) {
        info!(
            "[round {round}] privacy: update change {norm:.4}{}",
            if norm > bound { format!(", clipped to {bound}") } else { format!(" within the bound {bound}") }
        );
    }
    let metrics = trained.metrics.clone();
    let private = task.clip_norm.is_some();
    let (message, tensors) = upload_message(round, trained, secure_round.as_mut(), private)?;
    info!(
        "[round {round}/{}] trained: loss {:.4} → {:.4}, accuracy {:.1}% in {:.2}s; uploading",
        task.total_rounds,
        metrics.loss_before,
        metrics.loss_after,
        metrics.accuracy * 100.0,
        metrics.train_seconds
    );
    settings.progress.uploading(round, metrics.loss_before, metrics.loss_after);
    tokio::select! {
        uploaded = upload(connection, settings, round, message, &tensors) => {
            settings.progress.uploaded(round, uploaded?);
        }
        _ = stop_reached(stop, Stop::Now) => {
            // Closing resets the stream: the coordinator discards the partial frame.
            return Err(stopping(connection, format!("stopped: round {round}'s upload abandoned")));
        }
    }
    Ok(secure_round)
}

/// What goes up: the update with its tensors, or in a secure round its masked vector.
fn upload_message(
    round: u32,
    trained: TrainedUpdate,
    secure_round: Option<&mut ClientRound>,
    private: bool,
) -> Result<(DeviceMessage, WireTensors), SessionError> {
    Ok(match (secure_round, trained.packed) {
        (Some(client), Some(packed)) => {
            let clipped = client.clipped(&packed);
            if clipped > 0 {
                warn!("[round {round}] secure aggregation: {clipped} of {} values clipped to the range", packed.len());
            }
            let masked = client
                .masked_input(&packed)
                .map_err(|e| SessionError::Fatal(format!("[round {round}] cannot mask the update: {e}")))?;
            let update = MaskedUpdate { round, rank: trained.rank, masked };
            (DeviceMessage::MaskedUpdate(update), WireTensors::default())
        }
        // Under [privacy] every device weighs the same, and its sample count and local metrics are
        // not the coordinator's to see: it is sent a count of 1 and no metrics.
        _ if private => {
            let update = Update { round, rank: trained.rank, num_samples: 1, metrics: None };
            (DeviceMessage::Update(update), trained.tensors)
        }
        _ => {
            let update =
                Update { round, rank: trained.rank, num_samples: trained.num_samples, metrics: Some(trained.metrics) };
            (DeviceMessage::Update(update), trained.tensors)
        }
    })
}

async fn hello(
    connection: &quinn::Connection,
    settings: &SessionSettings,
) -> Result<(flotilla_wire::protocol::Welcome, WireTensors), SessionError> {
    let transient = |e: &dyn std::fmt::Display| SessionError::Transient(e.to_string());
    let (mut send, mut recv) = connection.open_bi().await.map_err(|e| transient(&e))?;
    let hello = DeviceMessage::Hello(Hello {
        device_id: settings.device_id.clone(),
        protocol_version: PROTOCOL_VERSION,
        hardware: settings.hardware.clone(),
        requested_rank: settings.requested_rank,
    });
    write_frame(&mut send, &hello, &WireTensors::default()).await.map_err(|e| transient(&e))?;
    send.finish().map_err(|e| transient(&e))?;
    let (reply, tensors) =
        read_frame::<_, CoordinatorMessage>(&mut recv, &settings.limits).await.map_err(|e| transient(&e))?;
    match reply {
        CoordinatorMessage::Welcome(welcome) => Ok((welcome, tensors)),
        CoordinatorMessage::Refusal(refusal) => {
            Err(SessionError::Fatal(format!("the coordinator refused this device: {}", refusal.reason)))
        }
        other => Err(SessionError::Transient(format!("expected Welcome, got {other:?}"))),
    }
}

async fn upload(
    connection: &quinn::Connection,
    settings: &SessionSettings,
    round: u32,
    message: DeviceMessage,
    tensors: &WireTensors,
) -> Result<&'static str, SessionError> {
    let limits = &settings.limits;
    let result = async {
        let (mut send, mut recv) = connection.open_bi().await?;
        if flotilla_wire::crash_test::pause_requested("mid-upload", round) {
            // Crash-test hook (`flotilla_wire::crash_test`): send half the frame, then stop dead until killed.
            let frame = flotilla_wire::framing::encode_frame(&message, tensors)?;
            send.write_all(&frame[..frame.len() / 2]).await?;
            warn!(
                "fault injection: paused at mid-upload@{round} ({}); waiting to be killed",
                flotilla_wire::crash_test::ENV
            );
            std::future::pending::<()>().await;
        }
        write_frame(&mut send, &message, tensors).await?;
        send.finish()?;
        let (reply, _) = read_frame::<_, CoordinatorMessage>(&mut recv, limits).await?;
        anyhow::Ok(reply)
    }
    .await
    .map_err(|e| classify(connection, settings, "uploading", format!("{e:#}")))?;
    Ok(match result {
        CoordinatorMessage::Ack(_) => {
            info!("[round {round}] update accepted");
            "accepted"
        }
        CoordinatorMessage::Reject(reject) => {
            warn!("[round {round}] update rejected: {}", reject.reason);
            "rejected"
        }
        other => {
            warn!("[round {round}] unexpected reply to an upload: {other:?}");
            "answered oddly"
        }
    })
}

/// When the kit's certificate ends, if that is within `renew_within`.
fn renewal_due(settings: &SessionSettings) -> Result<Option<std::time::SystemTime>, SessionError> {
    let Some(window) = settings.renew_within else { return Ok(None) };
    let not_after = certificate_check(settings)?;
    let left = not_after.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    Ok((left < window).then_some(not_after))
}
