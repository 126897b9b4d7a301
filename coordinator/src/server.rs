//! The thin I/O layer around the round engine: accepts mutual-TLS QUIC connections, turns what
//! devices send into engine events, and carries out the engine's actions.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_torch::tensor::{read_frame_decoded, wire_from_tensors};
use flotilla_wire::framing::{read_frame, write_frame, FrameLimits};
use flotilla_wire::protocol::{
    close, Ack, CertificateRenewed, CoordinatorMessage, DeviceMessage, Finished, ModelSpec, Refusal, Reject, RoundTask,
    TrainingSettings, Update, Welcome, PROTOCOL_VERSION,
};
use flotilla_wire::quic::{self, write_frame_shared};
use flotilla_torch::tensor::DecodedTensors;
use flotilla_wire::tensor::{DType, SharedTensors, WireTensors};
use flotilla_wire::tls::{self, KitPaths};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::aggregation::{AggregationWorker, Command, FoldRequest, RoundOutcome, WorkerSettings};
use crate::checkpoint;
use crate::config::CoordinatorConfig;
use flotilla_engine::{Action, Engine, EngineConfig, Event, Phase, Timer, TrainingPlan};
use crate::evaluation::{describe, Evaluator, RankAccuracy};
use crate::metrics::{SharedStatus, Status};
use crate::report::{previous_initial_evaluation, write_summary, RoundSummary, RunSummary, UpdateSummary};

/// Limits for the frames a device sends before it is admitted.
const HELLO_LIMITS: FrameLimits =
    FrameLimits { max_header_bytes: 16 << 10, max_tensors: 0, max_tensor_dims: 0, max_body_bytes: 0 };
/// How long a refused device gets to receive the Refusal before its connection is closed.
const REFUSAL_DELIVERY: Duration = Duration::from_secs(2);
/// QUIC close reasons travel in one packet: keep them short.
const MAX_CLOSE_REASON: usize = 200;

enum Input {
    Joined {
        device: String,
        rank: u32,
        connection: quinn::Connection,
    },
    Left {
        device: String,
        connection_id: usize,
    },
    UpdateArrived {
        device: String,
        update: Update,
        tensors: DecodedTensors,
        reply: oneshot::Sender<CoordinatorMessage>,
    },
    FoldDone {
        device: String,
        update: Update,
        wire_bytes: u64,
        result: Result<(), String>,
        reply: oneshot::Sender<CoordinatorMessage>,
    },
    TimerFired {
        round: u32,
        timer: Timer,
    },
    AggregationDone {
        round: u32,
        result: Result<RoundOutcome, String>,
    },
}

struct Shared {
    config: CoordinatorConfig,
    welcome_tensors: WireTensors,
    model: ModelSpec,
    base_version: String,
    inputs: mpsc::UnboundedSender<Input>,
    renewal: Option<crate::renewal::Renewal>,
}

pub async fn serve(config: CoordinatorConfig, fresh: bool) -> anyhow::Result<RunSummary> {
    let run_dir = config.server.run_dir.clone();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    let renewal = crate::renewal::Renewal::open(&config.renewal)?;
    if renewal.is_some() {
        info!("devices may renew their certificates online ([renewal])");
    }
    let architecture = config.model.architecture.clone();
    let max_rank = config.aggregation.max_rank;
    let base = crate::base::prepare(&config)?;
    let welcome_tensors = wire_from_tensors(base.weights.iter().map(|(n, t)| (n.as_str(), t)), DType::F32)?;
    if fresh {
        if let Some(aside) = checkpoint::set_aside(&run_dir)? {
            info!("--fresh: earlier checkpoints moved to {}", aside.display());
        }
    }
    let (initial_global, first_round, history) = match checkpoint::latest(&run_dir)? {
        Some((dir, state)) => {
            let global = checkpoint::resume(&dir, &state, &config)?;
            info!(round = state.round, checkpoint = %dir.display(), "resuming after the last finished round");
            (global, state.round + 1, Some(checkpoint::records(&run_dir, state.round)))
        }
        None => (base.initial_adapter(&config)?, 1, None),
    };
    let resumed_summary = |rounds: Vec<RoundSummary>, initial_evaluation: Vec<RankAccuracy>| RunSummary {
        method: config.aggregation.method.to_string(),
        max_rank,
        rounds_completed: first_round - 1,
        final_global: rounds.last().and_then(|r| r.global_dir.clone()),
        rounds,
        initial_evaluation,
    };
    if first_round > config.round.rounds {
        info!("all {} rounds were already completed; nothing to do", config.round.rounds);
        let initial = previous_initial_evaluation(&run_dir).unwrap_or_default();
        return Ok(resumed_summary(history.unwrap_or_default(), initial));
    }
    let evaluator = match &config.evaluation.test_data {
        Some(dir) => Some(
            Evaluator::load(
                architecture.clone(),
                base.weights.iter().map(|(n, t)| (n.clone(), t.copy())).collect(),
                config.aggregation.lora_alpha / f64::from(max_rank),
                dir,
                config.evaluation.max_samples,
                config.evaluation.skip_samples,
            )
            .context("cannot load the evaluation set")?,
        ),
        None => None,
    };
    let (worker, initial_evaluation) = AggregationWorker::spawn(
        initial_global,
        WorkerSettings {
            method: config.aggregation.method,
            lora_alpha: config.aggregation.lora_alpha,
            max_rank,
            run_dir: config.server.run_dir.clone(),
            record_updates: config.aggregation.record_updates,
            shrink_to_round_rank: config.aggregation.ablation_shrink_to_round_rank,
            evaluator,
            fingerprint: checkpoint::fingerprint(&config),
            policy: config.round_policy(),
            first_round,
        },
    )?;
    if !initial_evaluation.is_empty() {
        info!("[round 0] test accuracy of the base model with the initial adapter: {}", describe(&initial_evaluation));
    }

    let kit = KitPaths::in_dir(&config.tls.kit);
    let crl = config.tls.crl.clone();
    let reset_secret = crate::reset_secret::load_or_create(&run_dir)?;
    let endpoint = quic::server_endpoint(config.server.listen, &kit, crl.as_deref(), &config.transport, &reset_secret)
        .context("cannot start the QUIC endpoint")?;
    if let Some(crl) = crl {
        tokio::spawn(reload_crl(endpoint.clone(), kit.clone(), crl, config.clone()));
    }
    // Every port listens before the address file says the coordinator is up.
    let status = SharedStatus::default();
    if let Some(listen) = config.metrics.listen {
        let bound = crate::metrics::serve(listen, status.clone()).await?;
        info!(address = %bound, "metrics on http://{bound}/metrics, health on /healthz, state on /status");
    }
    let local = endpoint.local_addr()?;
    if let Some(path) = &config.server.address_file {
        std::fs::write(path, local.to_string()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    info!(address = %local, method = %config.aggregation.method, max_rank, "coordinator listening");

    let (inputs, receiver) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        model: ModelSpec { architecture, lora_alpha: config.aggregation.lora_alpha, max_rank },
        base_version: base.version.clone(),
        welcome_tensors,
        config: config.clone(),
        inputs,
        renewal,
    });

    let acceptor = tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
    // A resumed run continues the records of the rounds before its checkpoint.
    let summary = match history {
        Some(rounds) => {
            let initial = previous_initial_evaluation(&run_dir).unwrap_or(initial_evaluation);
            resumed_summary(rounds, initial)
        }
        None => resumed_summary(Vec::new(), initial_evaluation),
    };
    let summary = RoundDriver::new(shared.clone(), worker, summary, first_round, status).run(receiver).await;
    acceptor.abort();
    // Give devices a moment to read `Finished` and close first, then close what is left.
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    endpoint.close(close::DONE.into(), b"run finished");
    let summary = summary?;
    write_summary(&run_dir, &summary)?;
    Ok(summary)
}

/// Watches the CRL file and swaps the endpoint's TLS configuration when it changes: new handshakes
/// see revocations without a restart. A broken CRL is logged and the previous one stays in force.
async fn reload_crl(endpoint: quinn::Endpoint, kit: KitPaths, crl: PathBuf, config: CoordinatorConfig) {
    let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut last = modified(&crl);
    let mut ticker = tokio::time::interval(Duration::from_secs(config.tls.crl_reload_secs.max(1)));
    loop {
        ticker.tick().await;
        let now = modified(&crl);
        if now == last {
            continue;
        }
        last = now;
        match quic::server_config(&kit, Some(&crl), &config.transport) {
            Ok(server_config) => {
                endpoint.set_server_config(Some(server_config));
                info!(crl = %crl.display(), "revocation list reloaded");
            }
            Err(error) => warn!(crl = %crl.display(), "revocation list not reloaded, the previous one stays: {error}"),
        }
    }
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
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

async fn serve_connection(connection: quinn::Connection, shared: Arc<Shared>) {
    let remote = connection.remote_address();
    let (identity, certificate_expiry) = match tls::peer_device(&connection) {
        Ok(peer) => peer,
        Err(error) => {
            warn!(%remote, "refusing connection: {error}");
            connection.close(close::REFUSED.into(), b"no device identity in certificate");
            return;
        }
    };
    let rank = match admit(&connection, &identity, &shared).await {
        Ok(rank) => rank,
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
            connection.close(close::REFUSED.into(), &reason.as_bytes()[..reason.len().min(MAX_CLOSE_REASON)]);
            return;
        }
    };
    info!(device = %identity, %remote, rank, "device joined");
    let _ = shared.inputs.send(Input::Joined { device: identity.clone(), rank, connection: connection.clone() });

    // The handshake checked the certificate once; a session does not outlive it. What the device
    // is sending when it expires is still taken.
    let expires_in = certificate_expiry.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    let expired = tokio::time::sleep(expires_in);
    tokio::pin!(expired);
    loop {
        let accepted = tokio::select! {
            accepted = connection.accept_bi() => accepted,
            () = &mut expired => {
                info!(device = %identity, "certificate expired; closing the session");
                metrics::counter!("fl_sessions_closed_total", "reason" => "certificate_expired").increment(1);
                connection.close(close::CERTIFICATE_EXPIRED.into(), b"certificate expired");
                break;
            }
        };
        let (mut send, mut recv) = match accepted {
            Ok(streams) => streams,
            Err(error) => {
                info!(device = %identity, "device left: {error}");
                break;
            }
        };
        let response = match read_frame_decoded::<_, DeviceMessage>(&mut recv, &shared.config.limits).await {
            Ok((DeviceMessage::Update(update), tensors)) => {
                let (reply, answer) = oneshot::channel();
                let round = update.round;
                let _ = shared.inputs.send(Input::UpdateArrived { device: identity.clone(), update, tensors, reply });
                answer.await.unwrap_or_else(|_| {
                    CoordinatorMessage::Reject(Reject { round, reason: "coordinator is shutting down".into() })
                })
            }
            Ok((DeviceMessage::RenewCertificate(request), _)) => renew(&identity, request.csr_pem, &shared).await,
            Ok((other, _)) => CoordinatorMessage::Reject(Reject {
                round: 0,
                reason: format!("unexpected message {}", message_name(&other)),
            }),
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
    let _ = shared.inputs.send(Input::Left { device: identity, connection_id: connection.stable_id() });
}

/// RenewCertificate → CertificateRenewed, or Refusal when renewal is off or the request is not
/// for this session's own id.
async fn renew(identity: &str, csr_pem: String, shared: &Shared) -> CoordinatorMessage {
    let Some(renewal) = &shared.renewal else {
        metrics::counter!("fl_certificate_renewals_total", "status" => "refused").increment(1);
        return CoordinatorMessage::Refusal(Refusal {
            reason: "this coordinator does not renew certificates; renew at the CA (flotilla-certs renew, sign --renew, install)".into(),
        });
    };
    match renewal.renew(identity, csr_pem).await {
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

/// Hello → Welcome or Refusal. The session is bound to the identity in the certificate.
async fn admit(connection: &quinn::Connection, identity: &str, shared: &Shared) -> anyhow::Result<u32> {
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
            let reason = format!("expected Hello, got {}", message_name(&other));
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
    });
    write_frame(&mut send, &welcome, &shared.welcome_tensors).await?;
    send.finish()?;
    Ok(assigned_rank)
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

fn message_name(message: &DeviceMessage) -> &'static str {
    match message {
        DeviceMessage::Hello(_) => "Hello",
        DeviceMessage::Update(_) => "Update",
        DeviceMessage::RenewCertificate(_) => "RenewCertificate",
    }
}

/// Owns the engine and the live sessions; runs until the engine says the run is finished.
struct RoundDriver {
    shared: Arc<Shared>,
    worker: Arc<AggregationWorker>,
    engine: Engine,
    sessions: HashMap<String, quinn::Connection>,
    /// Every rank a device has joined with: the `fl_round_participants` gauges' labels.
    rank_labels: std::collections::BTreeSet<u32>,
    uploads: HashMap<String, (Update, DecodedTensors, oneshot::Sender<CoordinatorMessage>)>,
    accepted: BTreeMap<u32, Vec<UpdateSummary>>,
    round_started: HashMap<u32, Instant>,
    /// Bytes of round tasks sent, by round.
    task_bytes: HashMap<u32, u64>,
    summary: RunSummary,
    status: SharedStatus,
}

impl RoundDriver {
    fn new(
        shared: Arc<Shared>,
        worker: AggregationWorker,
        summary: RunSummary,
        first_round: u32,
        status: SharedStatus,
    ) -> RoundDriver {
        let config = &shared.config;
        let engine = Engine::new(EngineConfig {
            rounds: config.round.rounds,
            min_devices: config.round.min_devices,
            round_deadline: Duration::from_secs(config.round.deadline_secs.into()),
            min_updates: config.round.min_updates,
            grace: Duration::from_secs(config.round.grace_secs.into()),
            first_round,
            policy: config.round_policy(),
        });
        RoundDriver {
            shared,
            worker: Arc::new(worker),
            engine,
            sessions: HashMap::new(),
            rank_labels: std::collections::BTreeSet::new(),
            uploads: HashMap::new(),
            accepted: BTreeMap::new(),
            round_started: HashMap::new(),
            task_bytes: HashMap::new(),
            summary,
            status,
        }
    }

    async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<Input>) -> anyhow::Result<RunSummary> {
        while let Some(input) = inputs.recv().await {
            let event = match input {
                Input::Joined { device, rank, connection } => {
                    if let Some(old) = self.sessions.insert(device.clone(), connection) {
                        old.close(close::REPLACED.into(), b"replaced by a newer connection");
                    }
                    self.rank_labels.insert(rank);
                    Event::DeviceJoined { device, rank }
                }
                Input::Left { device, connection_id } => {
                    if self.sessions.get(&device).map(|c| c.stable_id()) != Some(connection_id) {
                        continue; // an older connection of a device that has reconnected
                    }
                    self.sessions.remove(&device);
                    Event::DeviceLeft { device }
                }
                Input::UpdateArrived { device, update, tensors, reply } => {
                    let (round, rank) = (update.round, update.rank);
                    metrics::counter!("fl_update_bytes_total").increment(tensors.wire_bytes);
                    self.uploads.insert(device.clone(), (update, tensors, reply));
                    Event::UpdateArrived { device, round, rank }
                }
                Input::FoldDone { device, update, wire_bytes, result, reply } => {
                    let round = update.round;
                    match result {
                        Ok(()) => {
                            info!(device = %device, round, rank = update.rank, samples = update.num_samples,
                                loss = update.metrics.loss_after, "[round {round}] update accepted");
                            let _ = reply.send(CoordinatorMessage::Ack(Ack { round }));
                            metrics::counter!("fl_updates_total", "status" => "accepted", "reason" => "ok")
                                .increment(1);
                            self.accepted.entry(round).or_default().push(UpdateSummary {
                                device: device.clone(),
                                rank: update.rank,
                                num_samples: update.num_samples,
                                metrics: update.metrics,
                                wire_bytes,
                            });
                            Event::UpdateFolded { device, round }
                        }
                        Err(reason) => {
                            warn!(device = %device, round, "[round {round}] update rejected: {reason}");
                            let _ = reply.send(CoordinatorMessage::Reject(Reject { round, reason }));
                            metrics::counter!("fl_updates_total", "status" => "rejected", "reason" => "invalid")
                                .increment(1);
                            Event::UpdateInvalid { device, round }
                        }
                    }
                }
                Input::TimerFired { round, timer } => Event::TimerFired { round, timer },
                Input::AggregationDone { round, result } => {
                    let outcome = result.map_err(|e| anyhow::anyhow!("round {round}: aggregation failed: {e}"))?;
                    self.record_round(outcome);
                    Event::AggregationDone { round }
                }
            };
            let actions = self.engine.handle(event);
            self.publish_state();
            if let Some(rounds_completed) = self.perform(actions).await? {
                self.summary.rounds_completed = rounds_completed;
                return Ok(self.summary);
            }
        }
        anyhow::bail!("round driver stopped unexpectedly")
    }

    /// Gauges and the `/status` snapshot that mirror the engine's state.
    fn publish_state(&self) {
        let phase = self.engine.phase();
        crate::metrics::set_phase(phase.name());
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
                rounds_total: self.shared.config.round.rounds,
                rounds_completed: self.summary.rounds.last().map_or(self.summary.rounds_completed, |r| r.round),
                method: self.shared.config.aggregation.method.to_string(),
                max_rank: self.shared.config.aggregation.max_rank,
                devices_connected: self.engine.connected(),
                participants_by_rank: by_rank.clone(),
            };
        }
        for &rank in &self.rank_labels {
            let count = by_rank.get(&rank).copied().unwrap_or(0);
            metrics::gauge!("fl_round_participants", "rank" => rank.to_string()).set(count as f64);
        }
    }

    fn record_round(&mut self, outcome: RoundOutcome) {
        let record = outcome.record;
        metrics::histogram!("fl_aggregation_duration_seconds", "method" => self.shared.config.aggregation.method.name())
            .record(outcome.seconds);
        metrics::histogram!("fl_round_duration_seconds").record(record.round_seconds);
        for result in &record.evaluation {
            metrics::gauge!("fl_eval_accuracy", "rank" => result.rank.to_string()).set(result.accuracy);
        }
        let ranks: Vec<String> = record.updates.iter().map(|u| u.rank.to_string()).collect();
        info!(
            "[round {}/{}] aggregated {} updates (ranks {}) with {} in {:.1} ms → {}",
            outcome.round,
            self.shared.config.round.rounds,
            outcome.updates,
            ranks.join(","),
            self.shared.config.aggregation.method,
            outcome.seconds * 1e3,
            outcome.global_dir.display()
        );
        self.summary.final_global = Some(outcome.global_dir);
        self.summary.rounds.push(record);
        self.summary.rounds_completed = self.summary.rounds.last().map_or(0, |r| r.round);
        if let Err(error) = write_summary(&self.shared.config.server.run_dir, &self.summary) {
            warn!("cannot write summary.json: {error:#}");
        }
    }

    /// Carries out actions; returns `Some(rounds_completed)` when the run is finished.
    async fn perform(&mut self, actions: Vec<Action>) -> anyhow::Result<Option<u32>> {
        let mut tasks = Vec::new();
        for action in actions {
            match action {
                Action::SendTask { device, round, rank } => tasks.push((device, round, rank)),
                Action::FoldUpdate { device, round } => self.fold(device, round),
                Action::RejectUpdate { device, round, kind, reason } => {
                    warn!(device = %device, round, "update refused: {reason}");
                    metrics::counter!("fl_updates_total", "status" => "rejected", "reason" => kind.label())
                        .increment(1);
                    if let Some((_, _, reply)) = self.uploads.remove(&device) {
                        let _ = reply.send(CoordinatorMessage::Reject(Reject { round, reason }));
                    }
                }
                Action::ScheduleTimer { round, timer, after } => {
                    let inputs = self.shared.inputs.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = inputs.send(Input::TimerFired { round, timer });
                    });
                }
                Action::Aggregate { round, .. } => {
                    let worker = self.worker.clone();
                    let inputs = self.shared.inputs.clone();
                    let updates = self.accepted.remove(&round).unwrap_or_default();
                    let record = RoundSummary {
                        round,
                        update_bytes: updates.iter().map(|u| u.wire_bytes).sum(),
                        task_bytes: self.task_bytes.remove(&round).unwrap_or(0),
                        updates,
                        aggregation_seconds: 0.0,
                        round_seconds: self.round_started.get(&round).map_or(0.0, |t| t.elapsed().as_secs_f64()),
                        global_dir: None,
                        evaluation: Vec::new(),
                    };
                    tokio::spawn(async move {
                        let result = worker.request(|reply| Command::Finish { round, record, reply }).await;
                        let _ = inputs.send(Input::AggregationDone { round, result });
                    });
                }
                Action::SkipRound { round, updates } => {
                    warn!(
                        "[round {round}/{}] only {updates} update(s), short of the quorum of {} after the extended \
                         deadline: round skipped, global adapter unchanged",
                        self.shared.config.round.rounds, self.shared.config.round.min_updates
                    );
                    self.accepted.remove(&round);
                    if updates > 0 {
                        self.worker
                            .request(|reply| Command::Discard { round, reply })
                            .await
                            .map_err(|e| anyhow::anyhow!("round {round}: cannot discard the partial aggregate: {e}"))?;
                    }
                }
                Action::Finish { rounds_completed } => {
                    self.finish_sessions(rounds_completed).await;
                    return Ok(Some(rounds_completed));
                }
            }
        }
        if !tasks.is_empty() {
            self.send_tasks(tasks).await?;
        }
        Ok(None)
    }

    fn fold(&mut self, device: String, round: u32) {
        let Some((update, tensors, reply)) = self.uploads.remove(&device) else { return };
        let worker = self.worker.clone();
        let inputs = self.shared.inputs.clone();
        tokio::spawn(async move {
            let (rank, num_samples, wire_bytes) = (update.rank, update.num_samples, tensors.wire_bytes);
            let dev = device.clone();
            let result = worker
                .request(|reply| Command::Fold(FoldRequest { device: dev, round, rank, num_samples, tensors, reply }))
                .await;
            let _ = inputs.send(Input::FoldDone { device, update, wire_bytes, result, reply });
        });
    }

    async fn send_tasks(&mut self, tasks: Vec<(String, u32, u32)>) -> anyhow::Result<()> {
        let ranks: Vec<u32> = tasks.iter().map(|t| t.2).collect();
        // One encoded slice per rank, shared by every device's stream (no copy per device).
        let slices: Arc<BTreeMap<u32, SharedTensors>> = Arc::new(
            self.worker
                .request(|reply| Command::Slices { ranks, reply })
                .await
                .map_err(|e| anyhow::anyhow!("cannot slice the global adapter: {e}"))?
                .into_iter()
                .map(|(rank, wire)| (rank, SharedTensors::from(wire)))
                .collect(),
        );
        let config = &self.shared.config;
        for (device, round, rank) in tasks {
            self.round_started.entry(round).or_insert_with(Instant::now);
            let Some(connection) = self.sessions.get(&device).cloned() else { continue };
            let task = CoordinatorMessage::RoundTask(RoundTask {
                round,
                total_rounds: config.round.rounds,
                rank,
                base_version: self.shared.base_version.clone(),
                training: training_settings(self.engine.policy().training(round)),
                deadline_secs: config.round.deadline_secs,
            });
            let slices = slices.clone();
            let task_bytes = slices[&rank].body.len() as u64;
            metrics::counter!("fl_task_bytes_total").increment(task_bytes);
            *self.task_bytes.entry(round).or_insert(0) += task_bytes;
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
        Ok(())
    }

    /// Tells every device the run is over and waits briefly for them to hang up.
    async fn finish_sessions(&mut self, rounds_completed: u32) {
        let message =
            CoordinatorMessage::Finished(Finished { rounds_completed, reason: "all rounds completed".into() });
        let mut waits = Vec::new();
        for (device, connection) in self.sessions.drain() {
            let message = message.clone();
            waits.push(tokio::spawn(async move {
                let sent = async {
                    let mut send = connection.open_uni().await?;
                    write_frame(&mut send, &message, &WireTensors::default()).await?;
                    send.finish()?;
                    anyhow::Ok(())
                }
                .await;
                if let Err(error) = sent {
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

/// The engine's training plan as the protocol carries it.
fn training_settings(plan: TrainingPlan) -> TrainingSettings {
    let TrainingPlan { local_steps, local_epochs, batch_size, learning_rate, seed } = plan;
    TrainingSettings { local_steps, local_epochs, batch_size, learning_rate, seed }
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
