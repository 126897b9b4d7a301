//! The round driver's side of `[federated_evaluation]` (see `crate::serve::federated_evaluation`): with
//! round N's tasks it asks a sample of the connected devices to score model N - 1 (a participant
//! in its round task, any other device with an evaluation task of its own), and after the last
//! round it asks for the final model before the run is finished. Reports are checked and summed
//! by the model's [`Tally`]; its record joins the round's record when every device asked has
//! answered or left, or at the deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use flotilla_wire::evaluation::{EvaluationReport, EvaluationTask};
use flotilla_wire::protocol::{Ack, CoordinatorMessage, Reject};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::delivery::TaskDelivery;
use super::{DriverInput, RoundDriver};
use crate::config::federated_evaluation::FederatedEvaluationSection;
use crate::serve::federated_evaluation::{sample_evaluators, Evaluator, Tally};
use crate::serve::secure_evaluation::SecureEvaluationSession;
use flotilla_wire::evaluation::SecureEvaluation;

/// What the driver keeps for federated evaluation.
#[derive(Default)]
pub(crate) struct FederatedState {
    /// Each connected device's rank and class.
    members: HashMap<String, Evaluator>,
    /// Each device's declared held-out size (a report may not change it).
    held_out: HashMap<String, u64>,
    /// Models being evaluated, by the round that made them.
    open: BTreeMap<u32, Tally>,
    /// Under `[secure_aggregation]`: the evaluation whose sums are being added up securely.
    pub(super) secure: Option<SecureEvaluationSession>,
    /// Under `[secure_aggregation]` a model is evaluated between rounds: the round whose end the
    /// engine hears once its evaluation closes, and (`ready`) when it has.
    pub(super) resume: Option<u32>,
    ready: Option<u32>,
}

impl FederatedState {
    pub(crate) fn joined(&mut self, device: &str, rank: u32, class: &str) {
        self.members.insert(device.to_string(), Evaluator { rank, class: class.to_string(), cross: Vec::new() });
    }

    /// A device left: it no longer counts as connected, and models it was asked about stop
    /// waiting for it.
    pub(crate) fn left(&mut self, device: &str) {
        self.members.remove(device);
        self.held_out.remove(device);
        let secure = self.secure_model();
        // A secure evaluation's phases account for devices that leave.
        for tally in self.open.values_mut().filter(|t| Some(t.model_round) != secure) {
            tally.left(device);
        }
    }

    /// The model whose evaluation is a secure sum in progress: its own phases decide when it
    /// closes, and its sums never come in the clear.
    fn secure_model(&self) -> Option<u32> {
        self.secure.as_ref().map(|s| s.model_round)
    }

    pub(super) fn open_tally(&mut self, model_round: u32) -> Option<&mut Tally> {
        self.open.get_mut(&model_round)
    }

    pub(super) fn is_evaluation_session(&self, session: u64) -> bool {
        self.secure.as_ref().is_some_and(|s| s.session() == session)
    }

    /// The round whose end the engine may now hear, its model's evaluation being closed.
    pub(super) fn take_ready(&mut self) -> Option<u32> {
        self.ready.take()
    }
}

impl RoundDriver {
    fn federated_section(&self) -> Option<FederatedEvaluationSection> {
        self.links.config.federated_evaluation.clone()
    }

    /// Seconds devices have to report an evaluation.
    pub(super) fn evaluation_deadline_secs(&self) -> u32 {
        let round_deadline = self.links.config.round.deadline_secs;
        self.links.config.federated_evaluation.as_ref().map_or(round_deadline, |s| s.deadline(round_deadline))
    }

    /// Labels a device's evaluation sums count per label: the model's classes, 0 for a decoder.
    pub(super) fn evaluation_labels(&self) -> usize {
        let architecture = &self.links.config.model.architecture;
        if architecture.is_decoder() {
            0
        } else {
            architecture.classes()
        }
    }

    /// With round `round`'s tasks: when model `round - 1` is due, picks its evaluators among the
    /// connected devices, opens its tally and returns them (with their ranks); participants of the
    /// round among them get `evaluate` set in their round task, the others an evaluation task.
    pub(super) fn evaluators_for_round(&mut self, round: u32) -> BTreeMap<String, u32> {
        if self.links.config.secure_aggregation.is_some() {
            return BTreeMap::new(); // evaluated between rounds (`evaluate_between_rounds`)
        }
        let model_round = round.saturating_sub(1);
        self.open_evaluation(model_round, false).into_iter().map(|(d, e)| (d, e.rank)).collect()
    }

    /// Opens model `model_round`'s evaluation (`last`: after the run's last round, when the
    /// cross-rank view asks each device for the other ranks' models too) if it is due.
    fn open_evaluation(&mut self, model_round: u32, last: bool) -> BTreeMap<String, Evaluator> {
        let Some(section) = self.federated_section() else { return BTreeMap::new() };
        let last_round = if last { model_round } else { self.links.config.round.rounds };
        if !section.due(model_round, last_round) || self.federated.open.contains_key(&model_round) {
            return BTreeMap::new();
        }
        let mut connected: Vec<String> =
            self.federated.members.keys().filter(|d| self.links.sessions.contains_key(*d)).cloned().collect();
        connected.sort();
        let chosen = sample_evaluators(&connected, section.fraction, self.links.config.model.seed, model_round);
        if chosen.is_empty() {
            warn!(model_round, "federated evaluation: no device is connected to evaluate the model");
            return BTreeMap::new();
        }
        let mut asked: BTreeMap<String, Evaluator> =
            chosen.iter().filter_map(|d| Some((d.clone(), self.federated.members.get(d)?.clone()))).collect();
        let fleet_ranks: BTreeSet<u32> = asked.values().map(|e| e.rank).collect();
        if last && section.cross_rank && fleet_ranks.len() >= 2 {
            for evaluator in asked.values_mut() {
                evaluator.cross = fleet_ranks.iter().copied().filter(|&r| r != evaluator.rank).collect();
            }
        }
        let asked_len = asked.len();
        self.federated.open.insert(model_round, Tally::new(model_round, asked.clone()));
        let deadline = self.evaluation_deadline_secs();
        let inputs = self.links.inputs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(deadline.into())).await;
            let _ = inputs.send(DriverInput::EvaluationDeadline { model_round });
        });
        info!(model_round, devices = asked_len, "federated evaluation: asking devices to score the model");
        asked
    }

    /// An evaluation task for `device` (not training this round) at `rank`, for model `model_round`,
    /// with the cross-rank view's `cross` ranks (the slice sent is then the largest rank's).
    pub(super) fn evaluation_delivery(
        &self,
        device: &str,
        model_round: u32,
        rank: u32,
        cross: &[u32],
        secure: Option<SecureEvaluation>,
    ) -> Option<TaskDelivery> {
        let connection = self.links.sessions.get(device)?.clone();
        let deadline_secs = self.evaluation_deadline_secs();
        let task = CoordinatorMessage::EvaluationTask(EvaluationTask {
            model_round,
            rank,
            base_version: self.base_version.clone(),
            deadline_secs,
            cross_ranks: cross.to_vec(),
            fold_tail: self.links.config.aggregation.method.folds_tail(),
            secure,
        });
        Some(TaskDelivery {
            device: device.to_string(),
            round: model_round,
            rank: cross.iter().copied().chain([rank]).max().unwrap_or(rank),
            connection,
            task,
            evaluation_only: true,
        })
    }

    /// After the last round: asks for the final model's evaluation and waits until every device
    /// asked has answered or left, or the deadline (other inputs are dropped, as after the run).
    pub(super) async fn evaluate_final_model(
        &mut self,
        rounds_completed: u32,
        inputs: &mut mpsc::UnboundedReceiver<DriverInput>,
    ) {
        self.ask_for_evaluations(rounds_completed, true);
        while !self.federated.open.is_empty() {
            match inputs.recv().await {
                Some(
                    federated @ (DriverInput::EvaluationReport { .. }
                    | DriverInput::EvaluationDeadline { .. }
                    | DriverInput::EvaluationSent { .. }
                    | DriverInput::EvaluationUnmasked { .. }),
                ) => self.federated_input(federated),
                Some(secure @ (DriverInput::Secure { .. } | DriverInput::SecureTimer { .. })) => {
                    self.secure_input(secure);
                }
                Some(DriverInput::Left { device, connection_id, .. }) => {
                    self.session_left(&device, connection_id);
                }
                Some(DriverInput::Evaluated { round, result }) => self.record_evaluation(round, result),
                Some(_) => {}
                None => return,
            }
        }
    }

    /// Opens model `model_round`'s evaluation if it is due (`last`: after the run's last round) and
    /// sends every device asked its evaluation task; under secure aggregation with its part of the
    /// evaluation's secure sum. Returns whether an evaluation opened.
    fn ask_for_evaluations(&mut self, model_round: u32, last: bool) -> bool {
        let evaluators = self.open_evaluation(model_round, last);
        if evaluators.is_empty() {
            return false;
        }
        let mut secure_parts = BTreeMap::new();
        if self.links.config.secure_aggregation.is_some() {
            match self.start_secure_evaluation(model_round, &evaluators) {
                Some(parts) => secure_parts = parts,
                None => return true, // closed already: it could not be secured, nothing was asked
            }
        }
        let deliveries: Vec<TaskDelivery> = evaluators
            .iter()
            .filter_map(|(device, e)| {
                let secure = secure_parts.remove(device);
                self.evaluation_delivery(device, model_round, e.rank, &e.cross, secure)
            })
            .collect();
        self.links.send_deliveries(deliveries, model_round);
        true
    }

    /// Under `[secure_aggregation]`, after round `round`'s record: its model is evaluated before the
    /// engine hears that the round is over (so before the next round's tasks, which would keep the
    /// devices from the evaluation's key agreement). Returns whether the engine must wait.
    pub(super) fn evaluate_between_rounds(&mut self, round: u32) -> bool {
        if self.links.config.secure_aggregation.is_none() || round >= self.links.config.round.rounds {
            return false; // the last round's model is evaluated after the run (`evaluate_final_model`)
        }
        // Set first: an evaluation that closes at once (it could not be secured) releases the
        // round through `close_evaluation`, like any other.
        self.federated.resume = Some(round);
        let asked = self.ask_for_evaluations(round, false);
        if !asked {
            self.federated.resume = None;
        }
        asked
    }

    /// `serve --evaluate-only`: waits until `[round] min_devices` have joined, asks them to score
    /// the resumed checkpoint's model (of `model_round`), and ends the run.
    pub(super) async fn evaluate_checkpoint(
        &mut self,
        model_round: u32,
        inputs: &mut mpsc::UnboundedReceiver<DriverInput>,
    ) -> anyhow::Result<crate::records::report::RunSummary> {
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
        Ok(self.summary.clone())
    }

    /// A report, a deadline or the bytes of evaluation tasks sent.
    pub(super) fn federated_input(&mut self, input: DriverInput) {
        match input {
            DriverInput::EvaluationReport { device, report, bytes, reply } => {
                self.evaluation_report(&device, report, bytes, reply)
            }
            // A secure evaluation's own phase deadlines close it.
            DriverInput::EvaluationDeadline { model_round } if self.federated.secure_model() != Some(model_round) => {
                self.close_evaluation(model_round)
            }
            DriverInput::EvaluationUnmasked { model_round, names, outcome } => {
                self.secure_evaluation_unmasked(model_round, &names, outcome);
            }
            DriverInput::EvaluationSent { model_round, bytes } => self.evaluation_sent(model_round, bytes),
            _ => {}
        }
    }

    fn evaluation_sent(&mut self, model_round: u32, bytes: u64) {
        if let Some(tally) = self.federated.open.get_mut(&model_round) {
            tally.bytes_down += bytes;
        }
    }

    /// A device's report: counted, or refused with the reason (and counted as refused).
    fn evaluation_report(
        &mut self,
        device: &str,
        report: Box<EvaluationReport>,
        bytes: u64,
        reply: oneshot::Sender<CoordinatorMessage>,
    ) {
        let model_round = report.model_round;
        let classes = self.evaluation_labels();
        let secure = self.federated.secure_model() == Some(model_round);
        let outcome = match self.federated.open.get_mut(&model_round) {
            Some(_) if secure => Err("this run evaluates under secure aggregation: the sums travel masked, in the \
                                      evaluation's secure sum, never in the clear"
                .to_string()),
            Some(tally) => {
                tally.bytes_up += bytes;
                tally.accept(device, &report, classes, &mut self.federated.held_out).map_err(|e| e.to_string())
            }
            None => Err(format!("the coordinator is not waiting for evaluations of model {model_round}")),
        };
        let answer = match outcome {
            Ok(()) => {
                metrics::counter!("fl_evaluation_reports_total", "status" => "accepted").increment(1);
                CoordinatorMessage::Ack(Ack { round: model_round })
            }
            Err(reason) => {
                warn!(device = %device, model_round, "evaluation report refused: {reason}");
                metrics::counter!("fl_evaluation_reports_total", "status" => "refused").increment(1);
                CoordinatorMessage::Reject(Reject { round: model_round, reason })
            }
        };
        let _ = reply.send(answer);
        if self.federated.open.get(&model_round).is_some_and(Tally::complete) {
            self.close_evaluation(model_round);
        }
    }

    pub(super) fn device_left_evaluation(&mut self, device: &str) {
        self.federated.left(device);
        let secure = self.federated.secure_model();
        let complete: Vec<u32> = self
            .federated
            .open
            .iter()
            .filter(|(round, t)| t.complete() && Some(**round) != secure)
            .map(|(round, _)| *round)
            .collect();
        complete.into_iter().for_each(|round| self.close_evaluation(round));
    }

    /// Ends model `model_round`'s evaluation: its record joins the round's (and a round held for it
    /// may end).
    pub(super) fn close_evaluation(&mut self, model_round: u32) {
        let Some(tally) = self.federated.open.remove(&model_round) else { return };
        if self.federated.resume == Some(model_round) {
            self.federated.ready = self.federated.resume.take();
        }
        let min_group = self.links.config.federated_evaluation.as_ref().map_or(1, |s| s.min_group_devices);
        let record = tally.record(min_group);
        match &record.overall {
            Some(overall) => {
                metrics::gauge!("fl_federated_eval_accuracy").set(overall.accuracy);
                info!(
                    model_round,
                    "federated evaluation: {:.1}% on {} held-out examples of {} devices ({} declined, {} refused, {} \
                     missing)",
                    overall.accuracy * 100.0,
                    overall.examples,
                    overall.devices,
                    record.declined,
                    record.refused,
                    record.missing
                );
            }
            None => info!(
                model_round,
                "federated evaluation: {} of {} devices reported, too few to publish a total",
                record.reported,
                record.asked
            ),
        }
        for (rank, scores) in &record.by_rank {
            metrics::gauge!("fl_federated_eval_accuracy_by_rank", "rank" => rank.to_string()).set(scores.accuracy);
        }
        if let Some(round) = self.summary.rounds.iter_mut().find(|r| r.round == model_round) {
            round.federated_evaluation = Some(Box::new(record));
            self.reports.submit(self.summary.clone());
        }
        self.publish_state();
    }
}
