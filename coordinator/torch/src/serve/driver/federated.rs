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
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::delivery::TaskDelivery;
use super::links::Links;
use super::DriverInput;
use crate::config::CoordinatorConfig;
use crate::records::federated_evaluation::FederatedEvaluation;
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
    /// Evaluations closed whose records the driver has not taken yet.
    closed: Vec<(u32, FederatedEvaluation)>,
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

    /// Whether a model's evaluation is open.
    pub(super) fn evaluating(&self) -> bool {
        !self.open.is_empty()
    }

    /// The round whose end the engine may now hear, its model's evaluation being closed.
    pub(super) fn take_ready(&mut self) -> Option<u32> {
        self.ready.take()
    }
}

impl FederatedState {
    /// With round `round`'s tasks: when model `round - 1` is due, picks its evaluators among the
    /// connected devices, opens its tally and returns them (with their ranks); participants of the
    /// round among them get `evaluate` set in their round task, the others an evaluation task.
    pub(super) fn evaluators_for_round(&mut self, links: &Links, round: u32) -> BTreeMap<String, u32> {
        if links.config.secure_aggregation.is_some() {
            return BTreeMap::new(); // evaluated between rounds (`evaluate_between_rounds`)
        }
        let model_round = round.saturating_sub(1);
        self.open_evaluation(links, model_round, false).into_iter().map(|(d, e)| (d, e.rank)).collect()
    }

    /// Opens model `model_round`'s evaluation (`last`: after the run's last round, when the
    /// cross-rank view asks each device for the other ranks' models too) if it is due.
    fn open_evaluation(&mut self, links: &Links, model_round: u32, last: bool) -> BTreeMap<String, Evaluator> {
        let Some(section) = links.config.federated_evaluation.clone() else { return BTreeMap::new() };
        let last_round = if last { model_round } else { links.config.round.rounds };
        if !section.due(model_round, last_round) || self.open.contains_key(&model_round) {
            return BTreeMap::new();
        }
        let mut connected: Vec<String> =
            self.members.keys().filter(|d| links.sessions.contains_key(*d)).cloned().collect();
        connected.sort();
        let chosen = sample_evaluators(&connected, section.fraction, links.config.model.seed, model_round);
        if chosen.is_empty() {
            warn!(model_round, "federated evaluation: no device is connected to evaluate the model");
            return BTreeMap::new();
        }
        let mut asked: BTreeMap<String, Evaluator> =
            chosen.iter().filter_map(|d| Some((d.clone(), self.members.get(d)?.clone()))).collect();
        let fleet_ranks: BTreeSet<u32> = asked.values().map(|e| e.rank).collect();
        if last && section.cross_rank && fleet_ranks.len() >= 2 {
            for evaluator in asked.values_mut() {
                evaluator.cross = fleet_ranks.iter().copied().filter(|&r| r != evaluator.rank).collect();
            }
        }
        let asked_len = asked.len();
        self.open.insert(model_round, Tally::new(model_round, asked.clone()));
        let deadline = evaluation_deadline_secs(&links.config);
        let inputs = links.inputs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(deadline.into())).await;
            let _ = inputs.send(DriverInput::EvaluationDeadline { model_round });
        });
        info!(model_round, devices = asked_len, "federated evaluation: asking devices to score the model");
        asked
    }

    /// Opens model `model_round`'s evaluation if it is due (`last`: after the run's last round) and
    /// sends every device asked its evaluation task; under secure aggregation with its part of the
    /// evaluation's secure sum. Returns whether an evaluation opened.
    pub(super) fn ask_for_evaluations(
        &mut self,
        links: &Links,
        base_version: &str,
        model_round: u32,
        last: bool,
    ) -> bool {
        let evaluators = self.open_evaluation(links, model_round, last);
        if evaluators.is_empty() {
            return false;
        }
        let mut secure_parts = BTreeMap::new();
        if links.config.secure_aggregation.is_some() {
            match self.start_secure_evaluation(links, model_round, &evaluators) {
                Some(parts) => secure_parts = parts,
                None => return true, // closed already: it could not be secured, nothing was asked
            }
        }
        let deliveries: Vec<TaskDelivery> = evaluators
            .iter()
            .filter_map(|(device, e)| {
                let secure = secure_parts.remove(device);
                evaluation_delivery(links, base_version, device, model_round, e.rank, &e.cross, secure)
            })
            .collect();
        links.send_deliveries(deliveries, model_round);
        true
    }

    /// Under `[secure_aggregation]`, after round `round`'s record: its model is evaluated before the
    /// engine hears that the round is over (so before the next round's tasks, which would keep the
    /// devices from the evaluation's key agreement). Returns whether the engine must wait.
    pub(super) fn evaluate_between_rounds(&mut self, links: &Links, base_version: &str, round: u32) -> bool {
        if links.config.secure_aggregation.is_none() || round >= links.config.round.rounds {
            return false; // the last round's model is evaluated after the run (`evaluate_final_model`)
        }
        // Set first: an evaluation that closes at once (it could not be secured) releases the
        // round through `close_evaluation`, like any other.
        self.resume = Some(round);
        let asked = self.ask_for_evaluations(links, base_version, round, false);
        if !asked {
            self.resume = None;
        }
        asked
    }

    /// A report, a deadline or the bytes of evaluation tasks sent.
    pub(super) fn input(&mut self, links: &Links, input: DriverInput) {
        match input {
            DriverInput::EvaluationReport { device, report, bytes, reply } => {
                self.evaluation_report(links, &device, report, bytes, reply)
            }
            // A secure evaluation's own phase deadlines close it.
            DriverInput::EvaluationDeadline { model_round } if self.secure_model() != Some(model_round) => {
                self.close_evaluation(links, model_round)
            }
            DriverInput::EvaluationUnmasked { model_round, names, outcome } => {
                self.secure_evaluation_unmasked(links, model_round, &names, outcome);
            }
            DriverInput::EvaluationSent { model_round, bytes } => self.evaluation_sent(model_round, bytes),
            _ => {}
        }
    }

    fn evaluation_sent(&mut self, model_round: u32, bytes: u64) {
        if let Some(tally) = self.open.get_mut(&model_round) {
            tally.bytes_down += bytes;
        }
    }

    /// A device's report: counted, or refused with the reason (and counted as refused).
    fn evaluation_report(
        &mut self,
        links: &Links,
        device: &str,
        report: Box<EvaluationReport>,
        bytes: u64,
        reply: oneshot::Sender<CoordinatorMessage>,
    ) {
        let model_round = report.model_round;
        let classes = evaluation_labels(&links.config);
        let secure = self.secure_model() == Some(model_round);
        let outcome = match self.open.get_mut(&model_round) {
            Some(_) if secure => Err("this run evaluates under secure aggregation: the sums travel masked, in the \
                                      evaluation's secure sum, never in the clear"
                .to_string()),
            Some(tally) => {
                tally.bytes_up += bytes;
                tally.accept(device, &report, classes, &mut self.held_out).map_err(|e| e.to_string())
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
        if self.open.get(&model_round).is_some_and(Tally::complete) {
            self.close_evaluation(links, model_round);
        }
    }

    /// A device left: it no longer counts as connected, and models it was asked about stop
    /// waiting for it (those that now have every answer close).
    pub(super) fn device_left(&mut self, links: &Links, device: &str) {
        self.left(device);
        let secure = self.secure_model();
        let complete: Vec<u32> = self
            .open
            .iter()
            .filter(|(round, t)| t.complete() && Some(**round) != secure)
            .map(|(round, _)| *round)
            .collect();
        complete.into_iter().for_each(|round| self.close_evaluation(links, round));
    }

    /// Ends model `model_round`'s evaluation: its record waits in `closed` for the driver to join it
    /// to the round's (and a round held for it may end).
    pub(super) fn close_evaluation(&mut self, links: &Links, model_round: u32) {
        let Some(tally) = self.open.remove(&model_round) else { return };
        if self.resume == Some(model_round) {
            self.ready = self.resume.take();
        }
        let min_group = links.config.federated_evaluation.as_ref().map_or(1, |s| s.min_group_devices);
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
        self.closed.push((model_round, record));
    }

    /// The evaluations closed since the last call, with their records.
    pub(super) fn take_closed(&mut self) -> Vec<(u32, FederatedEvaluation)> {
        std::mem::take(&mut self.closed)
    }
}

/// Seconds devices have to report an evaluation.
pub(super) fn evaluation_deadline_secs(config: &CoordinatorConfig) -> u32 {
    let round_deadline = config.round.deadline_secs;
    config.federated_evaluation.as_ref().map_or(round_deadline, |s| s.deadline(round_deadline))
}

/// Labels a device's evaluation sums count per label: the model's classes, 0 for a decoder.
pub(super) fn evaluation_labels(config: &CoordinatorConfig) -> usize {
    let architecture = &config.model.architecture;
    if architecture.is_decoder() {
        0
    } else {
        architecture.classes()
    }
}

/// An evaluation task for `device` (not training this round) at `rank`, for model `model_round`,
/// with the cross-rank view's `cross` ranks (the slice sent is then the largest rank's).
pub(super) fn evaluation_delivery(
    links: &Links,
    base_version: &str,
    device: &str,
    model_round: u32,
    rank: u32,
    cross: &[u32],
    secure: Option<SecureEvaluation>,
) -> Option<TaskDelivery> {
    let connection = links.sessions.get(device)?.clone();
    let deadline_secs = evaluation_deadline_secs(&links.config);
    let task = CoordinatorMessage::EvaluationTask(EvaluationTask {
        model_round,
        rank,
        base_version: base_version.to_string(),
        deadline_secs,
        cross_ranks: cross.to_vec(),
        fold_tail: links.config.aggregation.method.folds_tail(),
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
