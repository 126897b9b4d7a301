//! Device sessions: accepts mutual-TLS QUIC connections, admits each device (Hello → Welcome or
//! Refusal, bound to the identity in its certificate), then reads its uploads and certificate
//! renewals, handing updates to the round driver and answering each stream.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_torch::tensor::read_frame_decoded;
use flotilla_wire::framing::{read_frame, write_frame, FrameLimits};
use flotilla_wire::protocol::{
    close, BaseDelivery, CertificateRenewed, CoordinatorMessage, DeviceMessage, ModelSpec, Refusal, Reject, Welcome,
    PROTOCOL_VERSION,
};
use flotilla_wire::tensor::WireTensors;
use flotilla_wire::tls;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::CoordinatorConfig;
use crate::serve::aggregation_worker::{Sent, Upload};
use crate::serve::driver::{Departure, DriverInput, SecureRequest};

/// Limits for the frames a device sends before it is admitted.
const HELLO_LIMITS: FrameLimits =
    FrameLimits { max_header_bytes: 16 << 10, max_tensors: 0, max_tensor_dims: 0, max_body_bytes: 0 };
/// How long a refused device gets to receive the Refusal before its connection is closed.
const REFUSAL_DELIVERY: Duration = Duration::from_secs(2);

/// What every session needs: the configuration, the Welcome (model and base weights), the round
/// driver's input, and the CA for online renewal.
pub(crate) struct SessionContext {
    pub config: Arc<CoordinatorConfig>,
    pub welcome_tensors: WireTensors,
    /// A transformer's checkpoint, whose files devices may fetch (`FetchBase`).
    pub served_checkpoint: Option<crate::model::base::ServedCheckpoint>,
    pub model: ModelSpec,
    pub base_version: String,
    pub inputs: mpsc::UnboundedSender<DriverInput>,
    pub renewal: Option<crate::serve::renewal::Renewal>,
    /// The serials the CRL revokes, as of its last reload.
    pub revoked: RevokedSerials,
    /// What an update may hold: the global adapter's tensors, and its layout (values by rank).
    pub update_bound: UpdateBound,
}

/// The serials the CRL revokes, as sessions watch them.
pub(crate) type RevokedSerials = tokio::sync::watch::Receiver<Arc<std::collections::BTreeSet<String>>>;

/// The largest update a device may send, from the global adapter.
pub(crate) struct UpdateBound {
    pub allowed: Arc<flotilla_torch::tensor::AllowedTensors>,
    pub layout: flotilla_secagg::layout::Layout,
}

impl SessionContext {
    /// The frame limits of a session at `rank`: the configured ones, with the body bounded by what a
    /// rank-`rank` update can be (its f32 values), so that a device cannot make the coordinator
    /// set aside more than its own slice.
    fn session_limits(&self, rank: u32) -> FrameLimits {
        let most = 4 * self.update_bound.layout.len(rank) as u64;
        FrameLimits { max_body_bytes: self.config.limits.max_body_bytes.min(most), ..self.config.limits }
    }
}

pub(crate) async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<SessionContext>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => serve_connection(connection, shared).await,
                // Bad certificates, unknown CAs and wrong ALPN end here; the server keeps serving.
                Err(error) => warn!(%remote, "handshake failed: {error}"),
            }
        });
    }
}

async fn serve_connection(connection: quinn::Connection, shared: Arc<SessionContext>) {
    let remote = connection.remote_address();
    let peer = match tls::peer_device(&connection) {
        Ok(peer) => peer,
        Err(error) => {
            warn!(%remote, "refusing connection: {error}");
            connection.close(close::REFUSED.into(), b"no device identity in certificate");
            return;
        }
    };
    let identity = peer.id.clone();
    let (rank, class) = match admit(&connection, &identity, &shared).await {
        Ok(admitted) => admitted,
        Err(error) if error.chain().any(|e| e.is::<tokio::time::error::Elapsed>()) => {
            warn!(device = %identity, %remote, "admission timed out, the device may try again: {error:#}");
            metrics::counter!("fl_admission_timeouts_total").increment(1);
            connection.close(close::TRY_AGAIN.into(), b"no hello in time; try again");
            return;
        }
        Err(error) => {
            warn!(device = %identity, %remote, "not admitted: {error:#}");
            // The close reason repeats the refusal for peers that did not wait for the answer.
            let reason = format!("not admitted: {error:#}");
            connection.close(close::REFUSED.into(), close::reason(&reason));
            return;
        }
    };
    info!(device = %identity, %remote, rank, "device joined");
    let joined = DriverInput::Joined { device: identity.clone(), rank, class, connection: connection.clone() };
    let _ = shared.inputs.send(joined);

    // The handshake checked the certificate once; a session does not outlive it, nor its
    // revocation. What the device is sending when it expires is still taken.
    let expires_in = peer.not_after.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    let expired = tokio::time::sleep(expires_in);
    tokio::pin!(expired);
    let mut revoked = shared.revoked.clone();
    revoked.mark_changed();
    let limits = shared.session_limits(rank);
    // Why the device left, when it said so: a cause for the round's record, without its id.
    let mut why = None;
    loop {
        let accepted = tokio::select! {
            accepted = connection.accept_bi() => accepted,
            () = &mut expired => {
                info!(device = %identity, "certificate expired; closing the session");
                metrics::counter!("fl_sessions_closed_total", "reason" => "certificate_expired").increment(1);
                connection.close(close::CERTIFICATE_EXPIRED.into(), b"certificate expired");
                break;
            }
            Ok(()) = revoked.changed() => {
                if !revoked.borrow_and_update().contains(&peer.serial) {
                    continue;
                }
                warn!(device = %identity, serial = %peer.serial, "certificate revoked; closing the session");
                metrics::counter!("fl_sessions_closed_total", "reason" => "certificate_revoked").increment(1);
                connection.close(close::REVOKED.into(), b"certificate revoked");
                break;
            }
        };
        let (send, recv) = match accepted {
            Ok(streams) => streams,
            Err(error) => {
                why = departure(&identity, &error);
                break;
            }
        };
        answer_stream(&peer, &limits, &shared, send, recv).await;
    }
    let _ = shared.inputs.send(DriverInput::Left { device: identity, connection_id: connection.stable_id(), why });
}

/// Logs why a device's connection ended; what it said, when it closed saying why.
fn departure(identity: &str, error: &quinn::ConnectionError) -> Option<Departure> {
    let said = match error {
        quinn::ConnectionError::ApplicationClosed(closed) => {
            Departure::of_close_code(closed.error_code.into_inner()).map(|why| (why, &closed.reason))
        }
        _ => None,
    };
    let Some((why, reason)) = said else {
        info!(device = %identity, "device left: {error}");
        return None;
    };
    warn!(device = %identity, "device {} and left: {}", why.describe(), String::from_utf8_lossy(reason));
    metrics::counter!("fl_sessions_closed_total", "reason" => why.label()).increment(1);
    Some(why)
}

/// Reads one device-opened stream's message and answers it: an upload goes to the round driver,
/// a renewal to the CA, a checkpoint fetch to its own task.
async fn answer_stream(
    peer: &tls::PeerDevice,
    limits: &FrameLimits,
    shared: &Arc<SessionContext>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let identity = peer.id.as_str();
    let allowed = Some(shared.update_bound.allowed.clone());
    let response = match read_frame_decoded::<_, DeviceMessage>(&mut recv, limits, allowed).await {
        Ok((DeviceMessage::FetchBase(request), _)) => {
            // Served on its own task: a device's uploads do not wait behind its download.
            let (identity, shared) = (identity.to_string(), shared.clone());
            tokio::spawn(async move {
                if let Err(error) =
                    crate::serve::base_fetch::serve(&mut send, &request, shared.served_checkpoint.as_ref()).await
                {
                    warn!(device = %identity, file = %request.name, "checkpoint fetch ended: {error:#}");
                }
            });
            return;
        }
        Ok((DeviceMessage::Update(update), tensors)) => {
            hand_over(identity, shared, Sent::Plain { update, tensors }).await
        }
        Ok((DeviceMessage::MaskedUpdate(masked), tensors)) if tensors.tensors.is_empty() => {
            // Nothing of the device but its rank travels in the clear: no sample count, no metrics.
            hand_over(identity, shared, Sent::Masked(masked)).await
        }
        Ok((DeviceMessage::MaskedUpdate(masked), _)) => CoordinatorMessage::Reject(Reject {
            round: masked.round,
            reason: "a masked update carries its values in the message, never tensors".into(),
        }),
        // A secure phase's request, with what it cost the device's uplink (for the record).
        Ok((DeviceMessage::SecureKeys(keys), decoded)) => {
            let request = SecureRequest::Keys(keys, peer.certificate.clone());
            secure_request(identity, shared, request, decoded.frame_bytes).await
        }
        Ok((DeviceMessage::SecureShares(shares), decoded)) => {
            secure_request(identity, shared, SecureRequest::Shares(shares), decoded.frame_bytes).await
        }
        Ok((DeviceMessage::UnmaskShares(shares), decoded)) => {
            secure_request(identity, shared, SecureRequest::Unmask(shares), decoded.frame_bytes).await
        }
        Ok((DeviceMessage::MaskedEvaluation(masked), decoded)) => {
            secure_request(identity, shared, SecureRequest::MaskedEvaluation(masked), decoded.frame_bytes).await
        }
        Ok((DeviceMessage::RenewCertificate(request), _)) => renew(peer, request.csr_pem, shared).await,
        Ok((DeviceMessage::EvaluationReport(report), decoded)) => {
            let (reply, answer) = oneshot::channel();
            let round = report.model_round;
            let _ = shared.inputs.send(DriverInput::EvaluationReport {
                device: identity.to_string(),
                report: Box::new(report),
                bytes: decoded.frame_bytes,
                reply,
            });
            answer.await.unwrap_or_else(|_| shutting_down(round))
        }
        Ok((other, _)) => {
            CoordinatorMessage::Reject(Reject { round: 0, reason: format!("unexpected message {}", other.name()) })
        }
        Err(error) => {
            warn!(device = %identity, "malformed upload: {error}");
            metrics::counter!("fl_updates_total", "status" => "rejected", "reason" => "malformed").increment(1);
            CoordinatorMessage::Reject(Reject { round: 0, reason: format!("malformed upload: {error}") })
        }
    };
    if let Err(error) = reply_and_finish(&mut send, &response).await {
        warn!(device = %identity, "cannot answer upload: {error}");
    }
}

/// Hands an upload to the round driver and waits for its answer, which comes from the
/// aggregation worker (folded or invalid) or the driver (refused by the engine, or a masked upload).
async fn hand_over(identity: &str, shared: &SessionContext, sent: Sent) -> CoordinatorMessage {
    let (reply, answer) = oneshot::channel();
    let upload = Upload { device: identity.to_string(), sent, reply };
    let round = upload.round();
    let _ = shared.inputs.send(DriverInput::UpdateArrived(upload));
    answer.await.unwrap_or_else(|_| shutting_down(round))
}

/// A secure round's request, answered by the driver when its phase closes.
async fn secure_request(
    identity: &str,
    shared: &SessionContext,
    request: SecureRequest,
    bytes: u64,
) -> CoordinatorMessage {
    let (reply, answer) = oneshot::channel();
    let _ = shared.inputs.send(DriverInput::Secure { device: identity.to_string(), request, bytes, reply });
    answer.await.unwrap_or_else(|_| shutting_down(0))
}

/// The answer to a request the coordinator stopped before answering.
fn shutting_down(round: u32) -> CoordinatorMessage {
    CoordinatorMessage::Reject(Reject { round, reason: "coordinator is shutting down".into() })
}

/// RenewCertificate → CertificateRenewed, or Refusal when renewal is off, the request is not for
/// this session's own id, or the session's certificate is not the id's newest or not yet within
/// the renewal window.
async fn renew(peer: &tls::PeerDevice, csr_pem: String, shared: &SessionContext) -> CoordinatorMessage {
    let identity = peer.id.as_str();
    let Some(renewal) = &shared.renewal else {
        metrics::counter!("fl_certificate_renewals_total", "status" => "refused").increment(1);
        return CoordinatorMessage::Refusal(Refusal {
            reason: "this coordinator does not renew certificates; renew at the CA (flotilla-certs renew, sign --renew, install)".into(),
        });
    };
    match renewal.renew(identity, &peer.serial, csr_pem).await {
        Ok((certificate_pem, not_after)) => {
            info!(device = %identity, %not_after, "certificate renewed");
            metrics::counter!("fl_certificate_renewals_total", "status" => "renewed").increment(1);
            CoordinatorMessage::CertificateRenewed(CertificateRenewed { certificate_pem })
        }
        Err(reason) => {
            warn!(device = %identity, "certificate renewal refused: {reason}");
            metrics::counter!("fl_certificate_renewals_total", "status" => "refused").increment(1);
            CoordinatorMessage::Refusal(Refusal { reason })
        }
    }
}

/// Hello → Welcome or Refusal. The session is bound to the identity in the certificate. Returns
/// the device's rank and class once admitted.
async fn admit(
    connection: &quinn::Connection,
    identity: &str,
    shared: &SessionContext,
) -> anyhow::Result<(u32, String)> {
    let hello_timeout = Duration::from_secs(shared.config.server.hello_timeout_secs);
    let (mut send, mut recv) =
        tokio::time::timeout(hello_timeout, connection.accept_bi()).await.context("no hello in time")??;
    let (message, _) = tokio::time::timeout(hello_timeout, read_frame::<_, DeviceMessage>(&mut recv, &HELLO_LIMITS))
        .await
        .context("no hello in time")??;
    let refusal = |reason: String| CoordinatorMessage::Refusal(Refusal { reason });
    let hello = match message {
        DeviceMessage::Hello(hello) => hello,
        other => {
            let reason = format!("expected Hello, got {}", other.name());
            reply_and_finish(&mut send, &refusal(reason.clone())).await?;
            let _ = tokio::time::timeout(REFUSAL_DELIVERY, send.stopped()).await;
            anyhow::bail!(reason);
        }
    };
    let problem = if hello.device_id != identity {
        Some(format!("hello claims device id '{}' but the certificate is for '{identity}'", hello.device_id))
    } else if hello.protocol_version != PROTOCOL_VERSION {
        Some(format!(
            "protocol version {} is not supported (this coordinator speaks {PROTOCOL_VERSION})",
            hello.protocol_version
        ))
    } else if hello.requested_rank == 0 {
        Some("requested rank must be at least 1".into())
    } else {
        None
    };
    if let Some(reason) = problem {
        reply_and_finish(&mut send, &refusal(reason.clone())).await?;
        // Let the Refusal reach the device before the connection is closed under it.
        let _ = tokio::time::timeout(REFUSAL_DELIVERY, send.stopped()).await;
        anyhow::bail!(reason);
    }
    let assigned_rank = assign_rank(hello.requested_rank, &hello.hardware.device_class, &shared.config);
    let welcome = CoordinatorMessage::Welcome(Welcome {
        assigned_rank,
        model: shared.model.clone(),
        base_version: shared.base_version.clone(),
        base: match &shared.served_checkpoint {
            Some(checkpoint) => BaseDelivery::Checkpoint { files: checkpoint.files.clone() },
            None => BaseDelivery::Inline,
        },
        crl_pem: shared.config.tls.crl.as_ref().and_then(|path| std::fs::read_to_string(path).ok()),
        evaluation: shared.config.federated_evaluation.as_ref().map(|f| f.plan()),
    });
    write_frame(&mut send, &welcome, &shared.welcome_tensors).await?;
    send.finish()?;
    Ok((assigned_rank, hello.hardware.device_class))
}

/// The rank a device gets: what it asked for, lowered to R_max and to its device class's cap.
fn assign_rank(requested: u32, device_class: &str, config: &CoordinatorConfig) -> u32 {
    let cap = config.rank_caps.get(device_class).copied().unwrap_or(u32::MAX);
    requested.min(config.aggregation.max_rank).min(cap).max(1)
}

async fn reply_and_finish(send: &mut quinn::SendStream, message: &CoordinatorMessage) -> anyhow::Result<()> {
    write_frame(send, message, &WireTensors::default()).await?;
    send.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_capped_by_r_max_and_device_class() {
        let mut config: CoordinatorConfig = toml::from_str(
            "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"r\"\n[tls]\nkit = \"k\"\n[rank_caps]\nphone = 2\n",
        )
        .unwrap();
        config.aggregation.max_rank = 8;
        assert_eq!(assign_rank(4, "phone", &config), 2);
        assert_eq!(assign_rank(1, "phone", &config), 1);
        assert_eq!(assign_rank(16, "laptop", &config), 8);
        assert_eq!(assign_rank(4, "laptop", &config), 4);
    }
}
