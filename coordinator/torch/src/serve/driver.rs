//! The round driver: owns the round engine and the live sessions, turns what sessions and the
//! aggregation worker report into engine events, and carries out the engine's actions.
//!
//! An update's path: the session decodes it ([`Upload`]) → the driver asks the engine whether it
//! may be folded → a [`FoldRequest`] carrying the upload (and the device's reply) goes to the
//! aggregation worker, which folds it, answers the device itself and reports [`FoldDone`] → the
//! driver tells the engine. Nothing waits in a side table.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_engine::{Action, Engine, EngineConfig, Event, Phase, SkipWhy, TrainingPlan};
use flotilla_wire::model::Trainable;
use flotilla_wire::protocol::{close, CoordinatorMessage, Reject, RoundTask, TrainingSettings};
use tokio::sync::mpsc;
use tracing::{info, warn};

mod delivery;
mod federated;
mod input;
mod links;
mod privacy_spend;
mod run_records;
mod secure_evaluation;
mod secure_phases;
mod skipping;
mod status;

pub(crate) use delivery::push;
use delivery::TaskDelivery;
pub use input::DriverInput;
pub(crate) use input::DriverStart;
use links::Links;
pub use secure_phases::SecureRequest;
use secure_phases::{SecureRounds, Secured};
pub use skipping::Departure;

use crate::records::report::{RoundFacts, RoundRecord, RunSummary, SkippedRound};
use crate::serve::aggregation_worker::{FoldDone, FoldRequest, Upload};

/// Owns the engine and the live sessions; runs until the engine says the run is finished.
pub(crate) struct RoundDriver {
    links: Links,
    base_version: String,
    engine: Engine,
    round_started: HashMap<u32, Instant>,
    /// Bytes of round tasks sent, by round.
    task_bytes: HashMap<u32, u64>,
    records: run_records::RunRecords,
    publication: status::Publication,
    /// Under `[secure_aggregation]`: the secure round in progress.
    secure: SecureRounds,
    /// Why a round that sent no task could not run (it is skipped once its participants fail).
    cannot_run: HashMap<u32, String>,
    /// Participants of a round that left saying why, counted by cause.
    departures: HashMap<u32, BTreeMap<Departure, usize>>,
    /// Under `[privacy]`: the rounds sampled in this run directory, recorded before tasks go out.
    privacy: privacy_spend::PrivacySpend,
    /// Under `[federated_evaluation]`: the connected devices and the models being evaluated.
    federated: federated::FederatedState,
    evaluate_only: Option<u32>,
}

impl RoundDriver {
    pub(crate) fn new(start: DriverStart) -> RoundDriver {
        let DriverStart {
            config,
            base_version,
            inputs,
            worker,
            summary,
            first_round,
            status,
            secure_layout,
            ledger,
            privacy_plan,
            evaluate_only,
        } = start;
        let engine = Engine::new(EngineConfig {
            rounds: config.round.rounds,
            min_devices: config.round.min_devices,
            round_deadline: Duration::from_secs(config.round.deadline_secs.into()),
            min_updates: config.round.min_updates,
            grace: Duration::from_secs(config.round.grace().into()),
            first_round,
            policy: config.round_policy(),
        });
        let records = run_records::RunRecords::new(summary, &config);
        RoundDriver {
            links: Links { config, inputs, worker: Arc::new(worker), sessions: HashMap::new() },
            base_version,
            engine,
            round_started: HashMap::new(),
            task_bytes: HashMap::new(),
            records,
            publication: status::Publication { status, rank_labels: BTreeSet::new(), privacy_plan },
            secure: SecureRounds::new(secure_layout),
            cannot_run: HashMap::new(),
            departures: HashMap::new(),
            privacy: privacy_spend::PrivacySpend { ledger, last_sampled: first_round - 1 },
            federated: Default::default(),
            evaluate_only,
        }
    }

    /// What devices train: `[privacy] trainable`, every LoRA factor without privacy.
    fn trainable(&self) -> Trainable {
        self.links.config.privacy.as_ref().map_or(Trainable::Lora, |p| p.trainable)
    }

    /// Gauges and the `/status` snapshot that mirror the engine's state.
    fn publish_state(&self) {
        self.publication.publish(&self.engine, &self.records.summary, &self.links.config);
    }

    /// Runs the rounds; returns the run's summary once the reports of every round are written.
    pub(crate) async fn run(mut self, mut inputs: mpsc::UnboundedReceiver<DriverInput>) -> anyhow::Result<RunSummary> {
        let outcome = match self.evaluate_only {
            Some(round) => self.evaluate_checkpoint(round, &mut inputs).await,
            None => self.drive(&mut inputs).await,
        };
        // The last reports are written before the run's result is returned.
        self.records.finish().await?;
        outcome
    }

    async fn drive(&mut self, inputs: &mut mpsc::UnboundedReceiver<DriverInput>) -> anyhow::Result<RunSummary> {
        // The configured run is on /metrics and /status from the start, before any device joins,
        // so that an alert on too few connected devices can fire.
        self.publish_state();
        loop {
            if let Some(summary) = self.end_round_held_for_evaluation(inputs).await? {
                return Ok(summary);
            }
            let Some(input) = inputs.recv().await else { break };
            let mut upload = None;
            let event = match input {
                DriverInput::Joined { device, rank, class, connection } => {
                    self.session_joined(&device, rank, &class, connection);
                    self.publication.rank_labels.insert(rank);
                    Event::DeviceJoined { device, rank }
                }
                DriverInput::Left { device, connection_id, why } => {
                    if !self.session_left(&device, connection_id) {
                        continue;
                    }
                    if let (Some(why), Phase::Training { round }) = (why, self.engine.phase()) {
                        *self.departures.entry(*round).or_default().entry(why).or_default() += 1;
                    }
                    Event::DeviceLeft { device }
                }
                DriverInput::UpdateArrived(arrived) => {
                    metrics::counter!("fl_update_bytes_total").increment(arrived.wire_bytes());
                    let event = Event::UpdateArrived {
                        device: arrived.device.clone(),
                        round: arrived.round(),
                        rank: arrived.rank(),
                    };
                    upload = Some(arrived);
                    event
                }
                DriverInput::FoldDone(FoldDone { device, round, accepted }) => match accepted {
                    true => Event::UpdateFolded { device, round },
                    false => Event::UpdateInvalid { device, round },
                },
                DriverInput::TasksSent { round, bytes } => {
                    *self.task_bytes.entry(round).or_insert(0) += bytes;
                    continue;
                }
                DriverInput::TimerFired { round, timer } => Event::TimerFired { round, timer },
                DriverInput::Fatal(reason) => anyhow::bail!(reason),
                DriverInput::AggregationDone { round, result } => match self.round_aggregated(round, result)? {
                    Some(event) => event,
                    None => continue,
                },
                DriverInput::Evaluated { round, result } => {
                    self.records.record_evaluation(round, result);
                    continue;
                }
                federated @ (DriverInput::EvaluationReport { .. }
                | DriverInput::EvaluationDeadline { .. }
                | DriverInput::EvaluationSent { .. }
                | DriverInput::EvaluationUnmasked { .. }) => {
                    self.federated.input(&self.links, federated);
                    self.record_closed_evaluations();
                    continue;
                }
                secure @ (DriverInput::Secure { .. }
                | DriverInput::SecureTimer { .. }
                | DriverInput::SecureUnmasked { .. }) => {
                    let events = self.secure_input(secure);
                    if let Some(summary) = self.handle_events(events, None, inputs).await? {
                        return Ok(summary);
                    }
                    continue;
                }
            };
            if let Some(summary) = self.handle_events(vec![event], upload, inputs).await? {
                return Ok(summary);
            }
        }
        anyhow::bail!("round driver stopped unexpectedly")
    }

    /// A secure session's input: an evaluation's goes to federated evaluation, a round's to the
    /// secure rounds; returns what the engine must hear of it.
    fn secure_input(&mut self, input: DriverInput) -> Vec<Event> {
        let session = match &input {
            DriverInput::Secure { request, .. } => request.session(),
            DriverInput::SecureTimer { session, .. } => *session,
            _ => 0,
        };
        match input {
            DriverInput::Secure { device, request, bytes, reply } if self.federated.is_evaluation_session(session) => {
                self.federated.secure_evaluation_request(&self.links, &device, request, bytes, reply);
            }
            DriverInput::SecureTimer { phase, .. } if self.federated.is_evaluation_session(session) => {
                self.federated.secure_evaluation_timer(&self.links, phase);
            }
            input => return self.secure.input(&self.links, input),
        }
        self.record_closed_evaluations();
        Vec::new()
    }

    /// A round's record is in: the engine hears it (None while the round's model is evaluated
    /// first, under secure aggregation).
    fn round_aggregated(&mut self, round: u32, result: Result<RoundRecord, String>) -> anyhow::Result<Option<Event>> {
        let record = result.map_err(|e| anyhow::anyhow!("round {round}: aggregation failed: {e}"))?;
        let epsilon = self.privacy.spend(&self.links.config, record.round, &mut self.records.summary);
        self.records.record_round(&self.links.config, record, epsilon);
        let held = self.federated.evaluate_between_rounds(&self.links, &self.base_version, round);
        self.record_closed_evaluations();
        Ok((!held).then_some(Event::AggregationDone { round }))
    }

    /// A round held for its model's secure evaluation ends once the evaluation has closed; returns
    /// the run's summary if that finished the run.
    async fn end_round_held_for_evaluation(
        &mut self,
        inputs: &mut mpsc::UnboundedReceiver<DriverInput>,
    ) -> anyhow::Result<Option<RunSummary>> {
        match self.federated.take_ready() {
            Some(round) => self.handle_events(vec![Event::AggregationDone { round }], None, inputs).await,
            None => Ok(None),
        }
    }

    /// Feeds the engine `events` and carries out its actions (`upload` is the update the first
    /// event is about, if any); returns the run's summary once the engine finishes the run.
    async fn handle_events(
        &mut self,
        events: Vec<Event>,
        mut upload: Option<Upload>,
        inputs: &mut mpsc::UnboundedReceiver<DriverInput>,
    ) -> anyhow::Result<Option<RunSummary>> {
        for event in events {
            let actions = self.engine.handle(event);
            self.publish_state();
            if let Some(rounds_completed) = self.perform(actions, upload.take()).await? {
                self.records.summary.rounds_completed = rounds_completed;
                self.evaluate_final_model(rounds_completed, inputs).await;
                self.links.finish_sessions(rounds_completed).await;
                self.await_evaluations(inputs).await;
                return Ok(Some(self.records.summary.clone()));
            }
        }
        Ok(None)
    }

    /// After the last round: asks for the final model's evaluation and waits until every device
    /// asked has answered or left, or the deadline (other inputs are dropped, as after the run).
    async fn evaluate_final_model(&mut self, rounds_completed: u32, inputs: &mut mpsc::UnboundedReceiver<DriverInput>) {
        self.federated.ask_for_evaluations(&self.links, &self.base_version, rounds_completed, true);
        self.record_closed_evaluations();
        while self.federated.evaluating() {
            match inputs.recv().await {
                Some(
                    federated @ (DriverInput::EvaluationReport { .. }
                    | DriverInput::EvaluationDeadline { .. }
                    | DriverInput::EvaluationSent { .. }
                    | DriverInput::EvaluationUnmasked { .. }),
                ) => {
                    self.federated.input(&self.links, federated);
                    self.record_closed_evaluations();
                }
                Some(secure @ (DriverInput::Secure { .. } | DriverInput::SecureTimer { .. })) => {
                    self.secure_input(secure);
                }
                Some(DriverInput::Left { device, connection_id, .. }) => {
                    self.session_left(&device, connection_id);
                }
                Some(DriverInput::Evaluated { round, result }) => self.records.record_evaluation(round, result),
                Some(_) => {}
                None => return,
            }
        }
    }

    /// `serve --evaluate-only`: waits until `[round] min_devices` have joined, asks them to score
    /// the resumed checkpoint's model (of `model_round`), and ends the run.
    async fn evaluate_checkpoint(
        &mut self,
        model_round: u32,
        inputs: &mut mpsc::UnboundedReceiver<DriverInput>,
    ) -> anyhow::Result<RunSummary> {
        self.publish_state();
        info!(model_round, devices = self.links.config.round.min_devices, "evaluation only: waiting for the devices");
        while self.links.sessions.len() < self.links.config.round.min_devices {
            match inputs.recv().await {
                Some(DriverInput::Joined { device, rank, class, connection }) => {
                    self.session_joined(&device, rank, &class, connection);
                }
                Some(DriverInput::Left { device, connection_id, .. }) => {
                    self.session_left(&device, connection_id);
                }
                Some(DriverInput::Fatal(reason)) => anyhow::bail!(reason),
                Some(_) => {}
                None => anyhow::bail!("round driver stopped unexpectedly"),
            }
            self.publish_state();
        }
        self.evaluate_final_model(model_round, inputs).await;
        self.links.finish_sessions(model_round).await;
        Ok(self.records.summary.clone())
    }

    /// A device's new session; an older one of the same device is closed.
    fn session_joined(&mut self, device: &str, rank: u32, class: &str, connection: quinn::Connection) {
        if let Some(old) = self.links.sessions.insert(device.to_string(), connection) {
            old.close(close::REPLACED.into(), b"replaced by a newer connection");
        }
        self.federated.joined(device, rank, class);
    }

    /// A session ended: the device is gone (evaluations stop waiting for it). False when it was an
    /// older connection of a device that has reconnected, which changes nothing.
    fn session_left(&mut self, device: &str, connection_id: usize) -> bool {
        if self.links.sessions.get(device).map(|c| c.stable_id()) != Some(connection_id) {
            return false;
        }
        self.links.sessions.remove(device);
        self.federated.device_left(&self.links, device);
        self.record_closed_evaluations();
        true
    }

    /// Once the last round is done: waits for the evaluations still running, so that the summary
    /// holds every round's results. Anything else arriving now is answered by being dropped (a
    /// session then tells its device the coordinator is shutting down).
    async fn await_evaluations(&mut self, inputs: &mut mpsc::UnboundedReceiver<DriverInput>) {
        while self.records.evaluations_pending() {
            match inputs.recv().await {
                Some(DriverInput::Evaluated { round, result }) => self.records.record_evaluation(round, result),
                Some(_) => {}
                None => return,
            }
        }
    }

    /// Federated evaluations that closed join their rounds' records, and `/status`.
    fn record_closed_evaluations(&mut self) {
        let closed = self.federated.take_closed();
        if closed.is_empty() {
            return;
        }
        for (model_round, evaluation) in closed {
            self.records.record_federated(model_round, evaluation);
        }
        self.publish_state();
    }

    /// Carries out actions; returns `Some(rounds_completed)` when the run is finished. `upload` is
    /// the update whose arrival produced these actions, if any: the engine folds or refuses it.
    async fn perform(&mut self, actions: Vec<Action>, mut upload: Option<Upload>) -> anyhow::Result<Option<u32>> {
        self.privacy.count_sampled_rounds(&actions)?;
        let mut tasks = Vec::new();
        for action in actions {
            match action {
                Action::SendTask { device, round, rank } => tasks.push((device, round, rank)),
                Action::FoldUpdate { device, round } => {
                    if let Some(upload) = upload.take_if(|u| u.device == device) {
                        self.fold(upload, round);
                    }
                }
                Action::RejectUpdate { device, round, kind, reason } => {
                    warn!(device = %device, round, "update refused: {reason}");
                    metrics::counter!("fl_updates_total", "status" => "rejected", "reason" => kind.label())
                        .increment(1);
                    if let Some(upload) = upload.take_if(|u| u.device == device) {
                        let _ = upload.reply.send(CoordinatorMessage::Reject(Reject { round, reason }));
                    }
                }
                Action::ScheduleTimer { round, timer, after } => {
                    self.links.after(after, DriverInput::TimerFired { round, timer });
                }
                Action::Aggregate { round, .. } => self.aggregate(round),
                Action::SkipRound { round, updates, why } => self.skip(round, updates, why).await?,
                // The caller evaluates the final model on the devices, then finishes their sessions.
                Action::Finish { rounds_completed } => return Ok(Some(rounds_completed)),
            }
        }
        if !tasks.is_empty() {
            self.send_tasks(tasks);
        }
        Ok(None)
    }

    /// Hands the update to the aggregation worker, which answers the device and reports back; a
    /// secure round's masked upload stays here, in its round.
    fn fold(&mut self, upload: Upload, round: u32) {
        let Some(upload) = self.secure.fold(&self.links, upload, round) else { return };
        let inputs = self.links.inputs.clone();
        let request = FoldRequest {
            upload,
            round,
            done: Box::new(move |done| {
                let _ = inputs.send(DriverInput::FoldDone(done));
            }),
        };
        if let Err(request) = self.links.worker.fold(request) {
            let Upload { device, reply, .. } = request.upload;
            let reason = "coordinator is shutting down".to_string();
            let _ = reply.send(CoordinatorMessage::Reject(Reject { round, reason }));
            let _ = self.links.inputs.send(DriverInput::FoldDone(FoldDone { device, round, accepted: false }));
        }
    }

    /// Asks the worker to finish the round; its record comes back as `AggregationDone`. A secure
    /// round first asks its survivors to unmask.
    fn aggregate(&mut self, round: u32) {
        self.departures.remove(&round);
        let facts = RoundFacts {
            round,
            population_by_rank: self.engine.population_by_rank().clone(),
            task_bytes: self.task_bytes.remove(&round).unwrap_or(0),
            updates: Vec::new(),
            round_seconds: self.round_started.get(&round).map_or(0.0, |t| t.elapsed().as_secs_f64()),
            secure: None,
        };
        let Some(facts) = self.secure.aggregate(&self.links, facts) else { return };
        let worker = self.links.worker.clone();
        let inputs = self.links.inputs.clone();
        tokio::spawn(async move {
            let result = worker.finish(facts).await;
            let _ = inputs.send(DriverInput::AggregationDone { round, result });
        });
    }

    /// Sends each device its round task from a task of its own: the slices are made by the
    /// aggregation worker (one encoded slice per rank, shared by every device's stream), and this
    /// loop does not wait for them.
    fn send_tasks(&mut self, tasks: Vec<(String, u32, u32)>) {
        let mut reachable = Vec::with_capacity(tasks.len());
        for (device, round, rank) in tasks {
            self.round_started.entry(round).or_insert_with(Instant::now);
            let Some(connection) = self.links.sessions.get(&device).cloned() else { continue };
            reachable.push((device, round, rank, connection));
        }
        let mut secure_tasks = match self.secure.start_round(&self.links, &reachable) {
            Secured::Tasks(tasks) => tasks,
            Secured::CannotRun { round, reason } => {
                self.cannot_run.insert(round, reason);
                return; // no task goes out, its participants are failed
            }
        };
        let Some(round) = reachable.first().map(|r| r.1) else { return };
        let mut evaluators = self.federated.evaluators_for_round(&self.links, round);
        let mut deliveries = Vec::with_capacity(reachable.len());
        for (device, round, rank, connection) in reachable {
            let task = CoordinatorMessage::RoundTask(RoundTask {
                round,
                total_rounds: self.links.config.round.rounds,
                rank,
                base_version: self.base_version.clone(),
                training: training_settings(self.engine.policy().training(round), self.trainable()),
                deadline_secs: self.links.config.round.deadline_secs,
                clip_norm: self.links.config.privacy.as_ref().map(|p| p.clip_norm),
                noise_multiplier: self.links.config.privacy.as_ref().map(|p| p.noise_multiplier),
                secure: secure_tasks.remove(&device),
                evaluate: evaluators.remove(&device).is_some(),
            });
            deliveries.push(TaskDelivery { device, round, rank, connection, task, evaluation_only: false });
        }
        // Evaluators that do not train this round get the same slice with an evaluation task.
        for (device, rank) in evaluators {
            deliveries.extend(federated::evaluation_delivery(
                &self.links,
                &self.base_version,
                &device,
                round - 1,
                rank,
                &[],
                None,
            ));
        }
        self.links.send_deliveries(deliveries, round);
    }
}

impl RoundDriver {
    /// A round ends without a new global adapter: why, in the log, the metrics and the reports.
    async fn skip(&mut self, round: u32, updates: usize, why: SkipWhy) -> anyhow::Result<()> {
        let min_updates = self.links.config.round.min_updates;
        let cannot_run = self.cannot_run.remove(&round);
        let reason = skipping::skip_reason(&why, updates, min_updates, cannot_run, self.departures.get(&round));
        self.departures.remove(&round);
        warn!("[round {round}/{}] skipped, global adapter unchanged: {reason}", self.links.config.round.rounds);
        metrics::counter!("fl_rounds_skipped_total", "reason" => why.label()).increment(1);
        // Under `[privacy]` a skipped round was still sampled.
        self.privacy.spend(&self.links.config, round, &mut self.records.summary);
        self.records.record_skip(SkippedRound { round, reason });
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

/// The engine's training plan as the protocol carries it
/// (`trainable`: what devices train, `[privacy] trainable`).
pub(crate) fn training_settings(plan: TrainingPlan, trainable: Trainable) -> TrainingSettings {
    let TrainingPlan { local_steps, local_epochs, batch_size, learning_rate, seed } = plan;
    TrainingSettings { local_steps, local_epochs, batch_size, learning_rate, seed, trainable }
}
