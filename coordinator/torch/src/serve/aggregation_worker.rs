//! The aggregation worker: a dedicated thread that owns libtorch state on the coordinator — the
//! global adapter and the streaming accumulator of the current round — so no tensor work runs on
//! the async runtime. It folds updates and answers their devices itself, makes the round tasks'
//! slices, and at round end builds the round's record, evaluates and checkpoints.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use flotilla_torch::adapter::{peft_config_for, Adapter, NUM_SAMPLES_KEY};
use flotilla_torch::aggregate::{
    secure, AggregateError, Aggregated, Aggregator, ClientUpdate, Method, MethodExt, PrivacyParameters, PrivateSums,
};
use flotilla_torch::tensor::DecodedTensors;
use flotilla_wire::protocol::{Ack, CoordinatorMessage, Reject, Update};
use flotilla_wire::tensor::{DType, WireTensors};
use rand::SeedableRng;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::model::evaluation::{EvaluationReport, EvaluationThread, Evaluator, RankAccuracy};
use crate::records::report::{RoundFacts, RoundRecord, UpdateRecord};
use crate::serve::checkpoint::{self, CheckpointState};

/// An update as a session decoded it, with the way back to the device.
pub struct Upload {
    pub device: String,
    pub sent: Sent,
    pub reply: oneshot::Sender<CoordinatorMessage>,
}

/// What a device uploaded.
pub enum Sent {
    /// Its update (sample count, metrics) and its adapter's tensors.
    Plain { update: Update, tensors: DecodedTensors },
    /// Under secure aggregation: its masked vector and its rank; nothing else of the device travels.
    Masked(flotilla_wire::protocol::MaskedUpdate),
}

impl Upload {
    pub fn round(&self) -> u32 {
        match &self.sent {
            Sent::Plain { update, .. } => update.round,
            Sent::Masked(masked) => masked.round,
        }
    }

    pub fn rank(&self) -> u32 {
        match &self.sent {
            Sent::Plain { update, .. } => update.rank,
            Sent::Masked(masked) => masked.rank,
        }
    }

    /// Bytes of the update's values on the wire.
    pub fn wire_bytes(&self) -> u64 {
        match &self.sent {
            Sent::Plain { tensors, .. } => tensors.wire_bytes,
            Sent::Masked(masked) => 4 * masked.masked.values.len() as u64,
        }
    }
}

/// One update to fold into `round`. The worker answers the device through the upload's reply
/// (Ack, or Reject with the reason) and then calls `done`.
pub struct FoldRequest {
    pub upload: Upload,
    pub round: u32,
    pub done: Box<dyn FnOnce(FoldDone) + Send>,
}

/// An upload whose tensors made an adapter, waiting to be folded.
struct DecodedUpload {
    device: String,
    round: u32,
    update: Update,
    wire_bytes: u64,
    adapter: Adapter,
    reply: oneshot::Sender<CoordinatorMessage>,
    done: Box<dyn FnOnce(FoldDone) + Send>,
}

/// What became of a fold: whether the update was folded (its record stays with the round's
/// accumulator, which puts it in the round's record) or was invalid.
pub struct FoldDone {
    pub device: String,
    pub round: u32,
    pub accepted: bool,
}

enum WorkerCommand {
    /// The global adapter sliced to each rank, packed for the wire.
    Slices {
        ranks: Vec<u32>,
        reply: oneshot::Sender<Result<BTreeMap<u32, WireTensors>, String>>,
    },
    Fold(FoldRequest),
    /// Ends the round: aggregates (from the accumulator, or from a secure round's unmasked sums),
    /// checkpoints, queues the evaluation, and answers with the round's record.
    Finish {
        facts: RoundFacts,
        secure: Option<SecureOutcome>,
        reply: oneshot::Sender<Result<RoundRecord, String>>,
    },
    /// Drop what the current round folded (a skipped round); the global adapter is unchanged.
    Discard {
        round: u32,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// How a secure round ended: its unmasked per-coordinate sums (`flotilla_secagg` layout), or
/// discarded (the global adapter stays).
pub enum SecureOutcome {
    Sums(Vec<f64>),
    Discarded,
}

/// The most updates folded together; the rest of the queue waits for the next batch.
const MAX_BATCH: usize = 64;

pub struct WorkerSettings {
    pub method: Method,
    pub lora_alpha: f64,
    pub max_rank: u32,
    pub run_dir: PathBuf,
    pub record_updates: bool,
    /// `[aggregation] ablation_shrink_to_round_rank`.
    pub shrink_to_round_rank: bool,
    pub evaluator: Option<Evaluator>,
    /// Written into every checkpoint (see `checkpoint::fingerprint`).
    pub fingerprint: String,
    /// The run's round policy: it seeds what a method draws afresh each round (FLoRA's factors).
    pub policy: flotilla_engine::RoundPolicy,
    /// The round the first accumulator aggregates (1, or the one after a resumed checkpoint).
    pub first_round: u32,
    /// `[privacy]`: clipped changes, noised sums (see `flotilla_torch::aggregate::PrivateSums`).
    pub privacy: Option<PrivacyParameters>,
}

/// A round's accumulator: a method's own, or its differentially private form.
enum RoundAccumulator {
    Plain(Box<dyn Aggregator>),
    Private(PrivateSums),
}

impl RoundAccumulator {
    fn fold_batch(&mut self, updates: &[ClientUpdate<'_>]) -> Vec<Result<(), AggregateError>> {
        match self {
            RoundAccumulator::Plain(accumulator) => accumulator.fold_batch(updates),
            RoundAccumulator::Private(sums) => updates.iter().map(|update| sums.fold(update)).collect(),
        }
    }

    /// The next global adapter. A private round draws its noise from the operating system's
    /// entropy: noise anyone could replay would protect nothing.
    fn finish(self, facts: &RoundFacts, sampling_rate: f64) -> Result<Aggregated, AggregateError> {
        match self {
            RoundAccumulator::Plain(accumulator) => accumulator.finish(),
            RoundAccumulator::Private(sums) => {
                let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
                sums.finish(&facts.population_by_rank, sampling_rate, &mut rng)
            }
        }
    }
}

impl WorkerSettings {
    /// The one LoRA scale every rank uses: `lora_alpha / R_max`.
    fn scale(&self) -> f64 {
        flotilla_wire::protocol::lora_scale(self.lora_alpha, self.max_rank)
    }

    /// A fresh accumulator for `round`, seeded with the current global adapter.
    fn start(&self, global: &Adapter, round: u32) -> Result<RoundAccumulator, String> {
        match self.privacy {
            Some(parameters) => PrivateSums::new(global, self.method, self.scale(), parameters)
                .map(RoundAccumulator::Private)
                .map_err(|e| e.to_string()),
            None => self
                .method
                .start_online(global, self.scale(), self.policy.aggregation_seed(round))
                .map(RoundAccumulator::Plain)
                .map_err(|e| e.to_string()),
        }
    }
}

/// The handle through which the async side talks to the worker thread.
pub struct AggregationWorker {
    commands: mpsc::Sender<WorkerCommand>,
}

impl AggregationWorker {
    /// Starts the worker; returns it and the initial global model's test results (the lower bound).
    pub fn spawn(
        initial_global: Adapter,
        mut settings: WorkerSettings,
        report_evaluation: EvaluationReport,
    ) -> anyhow::Result<(AggregationWorker, Vec<RankAccuracy>)> {
        let initial = match &settings.evaluator {
            Some(evaluator) => evaluator.evaluate(&initial_global, &BTreeSet::new()).map_err(anyhow::Error::msg)?,
            None => Vec::new(),
        };
        let evaluations = match settings.evaluator.take() {
            Some(evaluator) => Some(EvaluationThread::spawn(evaluator, report_evaluation)?),
            None => None,
        };
        let (commands, receiver) = mpsc::channel();
        let accumulator = settings.start(&initial_global, settings.first_round).map_err(anyhow::Error::msg)?;
        std::thread::Builder::new().name("aggregation".into()).spawn(move || {
            // One core for tensor work; the rest serve the network.
            tch::set_num_threads(1);
            let state = AggregationThread {
                global: initial_global,
                accumulator: Some(accumulator),
                settings,
                evaluations,
                round_updates: Vec::new(),
            };
            state.run(receiver)
        })?;
        Ok((AggregationWorker { commands }, initial))
    }

    /// Queues an update (never waits); gives the request back if the worker has stopped.
    pub fn fold(&self, request: FoldRequest) -> Result<(), Box<FoldRequest>> {
        self.commands.send(WorkerCommand::Fold(request)).map_err(|e| match e.0 {
            WorkerCommand::Fold(request) => Box::new(request),
            _ => unreachable!("the command sent was a fold"),
        })
    }

    pub async fn slices(&self, ranks: Vec<u32>) -> Result<BTreeMap<u32, WireTensors>, String> {
        self.request(|reply| WorkerCommand::Slices { ranks, reply }).await
    }

    pub async fn finish(&self, facts: RoundFacts) -> Result<RoundRecord, String> {
        self.request(|reply| WorkerCommand::Finish { facts, secure: None, reply }).await
    }

    /// Ends a secure round from its outcome (the accumulator holds nothing of it).
    pub async fn finish_secure(&self, facts: RoundFacts, outcome: SecureOutcome) -> Result<RoundRecord, String> {
        self.request(|reply| WorkerCommand::Finish { facts, secure: Some(outcome), reply }).await
    }

    pub async fn discard(&self, round: u32) -> Result<(), String> {
        self.request(|reply| WorkerCommand::Discard { round, reply }).await
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> WorkerCommand,
    ) -> Result<T, String> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).map_err(|_| "aggregation worker stopped".to_string())?;
        answer.await.map_err(|_| "aggregation worker stopped".to_string())?
    }
}

/// The worker thread's state.
struct AggregationThread {
    global: Adapter,
    /// `None` only between finishing a round and starting the next accumulator.
    accumulator: Option<RoundAccumulator>,
    settings: WorkerSettings,
    evaluations: Option<EvaluationThread>,
    /// The records of the updates folded into the current round.
    round_updates: Vec<UpdateRecord>,
}

impl AggregationThread {
    fn run(mut self, receiver: mpsc::Receiver<WorkerCommand>) {
        let mut next = None;
        while let Some(command) = next.take().or_else(|| receiver.recv().ok()) {
            match command {
                WorkerCommand::Slices { ranks, reply } => {
                    let _ = reply.send(self.slices(&ranks));
                }
                WorkerCommand::Fold(first) => {
                    // Updates that queued up meanwhile are folded together (module by module, the
                    // same result as one by one); the first other command waits for them.
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match receiver.try_recv() {
                            Ok(WorkerCommand::Fold(request)) => batch.push(request),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.fold_batch(batch);
                }
                WorkerCommand::Finish { facts, secure, reply } => {
                    let _ = reply.send(self.finish(facts, secure));
                }
                WorkerCommand::Discard { round, reply } => {
                    self.round_updates.clear();
                    let fresh = self.settings.start(&self.global, round + 1);
                    let _ = reply.send(fresh.map(|acc| self.accumulator = Some(acc)));
                }
            }
        }
    }

    fn slices(&self, ranks: &[u32]) -> Result<BTreeMap<u32, WireTensors>, String> {
        let encode = |rank: usize| -> Result<WireTensors, String> {
            let slice = self.global.slice_to_rank(rank).map_err(|e| e.to_string())?;
            slice.to_wire(DType::F32).map_err(|e| e.to_string())
        };
        if self.settings.method.folds_tail() {
            // Fold-and-Fill: every device gets the whole R_max adapter, encoded once, and folds the
            // slots above its task's rank into its frozen weight.
            let whole = encode(self.global.rank())?;
            return Ok(ranks.iter().map(|&rank| (rank, whole.clone())).collect());
        }
        let mut out = BTreeMap::new();
        for &rank in ranks {
            if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(rank) {
                slot.insert(encode(rank as usize)?);
            }
        }
        Ok(out)
    }

    /// Folds the batch, answers each device and reports each result to the driver.
    fn fold_batch(&mut self, batch: Vec<FoldRequest>) {
        let mut decoded = Vec::with_capacity(batch.len());
        for FoldRequest { upload, round, done } in batch {
            let Upload { device, sent, reply } = upload;
            let Sent::Plain { update, tensors } = sent else {
                let reason = "a masked update is folded in its secure round, not here".to_string();
                answer_invalid(device, round, reason, reply, done);
                continue;
            };
            let wire_bytes = tensors.wire_bytes;
            match Adapter::from_decoded(tensors) {
                Ok(adapter) => decoded.push(DecodedUpload { device, round, update, wire_bytes, adapter, reply, done }),
                Err(e) => {
                    let reason = format!("update from '{device}' rejected: {e}");
                    answer_invalid(device, round, reason, reply, done)
                }
            }
        }
        let scale = self.settings.scale();
        let updates: Vec<ClientUpdate<'_>> = decoded
            .iter()
            .map(|d| ClientUpdate {
                client: &d.device,
                declared_rank: d.update.rank as usize,
                num_samples: d.update.num_samples,
                scale,
                adapter: &d.adapter,
            })
            .collect();
        let results: Vec<Result<(), String>> = match self.accumulator.as_mut() {
            Some(accumulator) => {
                accumulator.fold_batch(&updates).into_iter().map(|r| r.map_err(|e| e.to_string())).collect()
            }
            None => updates.iter().map(|_| Err("no round is being aggregated".to_string())).collect(),
        };
        drop(updates);
        for (upload, result) in decoded.into_iter().zip(results) {
            match result {
                Ok(()) => self.accepted(upload),
                Err(reason) => answer_invalid(upload.device, upload.round, reason, upload.reply, upload.done),
            }
        }
    }

    /// A folded update: recorded if configured, logged, counted, acked, and reported to the driver.
    fn accepted(&mut self, upload: DecodedUpload) {
        let DecodedUpload { device, round, update, wire_bytes, adapter, reply, done } = upload;
        if self.settings.record_updates {
            self.record_update(&device, round, update.rank, update.num_samples, &adapter);
        }
        let anonymous = self.settings.privacy.is_some();
        if anonymous {
            // Under [privacy] nothing of one device is logged or kept beyond its rank.
            info!(device = %device, round, rank = update.rank, "[round {round}] update accepted");
        } else {
            let loss = update.metrics.as_ref().map(|m| m.loss_after);
            info!(device = %device, round, rank = update.rank, samples = update.num_samples, loss,
                "[round {round}] update accepted");
        }
        metrics::counter!("fl_updates_total", "status" => "accepted", "reason" => "ok").increment(1);
        let _ = reply.send(CoordinatorMessage::Ack(Ack { round }));
        let record = UpdateRecord::new(&device, update.rank, update.num_samples, update.metrics, wire_bytes, anonymous);
        self.round_updates.push(record);
        done(FoldDone { device, round, accepted: true });
    }

    fn record_update(&self, device: &str, round: u32, rank: u32, num_samples: u64, adapter: &Adapter) {
        let dir = self.settings.run_dir.join("updates").join(format!("round-{round}")).join(device);
        let metadata = HashMap::from([(NUM_SAMPLES_KEY.to_string(), num_samples.to_string())]);
        let config = peft_config_for(adapter, self.settings.lora_alpha * rank as f64 / self.global.rank() as f64);
        if let Err(e) = adapter.save_peft(&dir, &config, metadata) {
            tracing::error!(device, round, "cannot record update: {e}");
        }
    }

    fn finish(&mut self, mut facts: RoundFacts, secure: Option<SecureOutcome>) -> Result<RoundRecord, String> {
        let round = facts.round;
        // A plain round's records are the accumulator's; a secure round's uploads never pass
        // through this thread, and come with the facts.
        facts.updates.append(&mut self.round_updates);
        let started = Instant::now();
        match secure {
            None => self.aggregate(&facts)?,
            Some(outcome) => self.aggregate_secure(&facts, outcome)?,
        }
        let aggregation_seconds = started.elapsed().as_secs_f64();
        crate::serve::crash_points::point("mid-aggregation", round);
        let ranks: BTreeSet<usize> = facts.updates.iter().map(|u| u.rank as usize).collect();
        let global_dir = checkpoint::checkpoint_dir(&self.settings.run_dir, round);
        // The test results follow from the evaluation thread.
        let record = RoundRecord::new(facts, aggregation_seconds, global_dir.clone(), Vec::new());
        let config = peft_config_for(&self.global, self.settings.lora_alpha);
        let metadata = HashMap::from([
            ("round".to_string(), round.to_string()),
            ("method".to_string(), self.settings.method.to_string()),
        ]);
        let state = CheckpointState {
            round,
            method: self.settings.method.to_string(),
            fingerprint: self.settings.fingerprint.clone(),
            record: Some(record.clone()),
        };
        checkpoint::write(&self.settings.run_dir, &state, &self.global, &config, metadata)
            .map_err(|e| format!("cannot write the checkpoint of round {round}: {e:#}"))?;
        if let Some(evaluations) = &self.evaluations {
            evaluations.submit(round, self.global.deep_copy(), ranks, global_dir);
        }
        Ok(record)
    }

    /// Makes the next global adapter from a secure round's unmasked sums (a discarded round keeps
    /// the current one).
    fn aggregate_secure(&mut self, facts: &RoundFacts, outcome: SecureOutcome) -> Result<(), String> {
        let round = facts.round;
        let SecureOutcome::Sums(sums) = outcome else {
            info!(round, "secure round discarded: the global adapter is unchanged");
            return Ok(());
        };
        let layout = secure::layout(&self.global);
        if let Some(parameters) = self.settings.privacy {
            // Distributed privacy: the sums are of clipped changes, already noised by the devices.
            let (sums, revealed) = secure::padded_sums(&sums, &layout).map_err(|e| e.to_string())?;
            let by_tensor = secure::sums_by_tensor(&sums, &self.global, &layout).map_err(|e| e.to_string())?;
            let (method, scale) = (self.settings.method, self.settings.scale());
            let aggregated =
                PrivateSums::from_sums(&self.global, method, scale, parameters, by_tensor, facts.updates.len())
                    .and_then(|s| s.finish_noised(&facts.population_by_rank, self.settings.policy.fraction))
                    .map_err(|e| e.to_string())?;
            for note in &aggregated.notes {
                info!(round, "{note}");
            }
            // The slots too thinly held to be revealed keep their previous values.
            aggregated.adapter.copy_slots_from(&self.global, revealed as usize).map_err(|e| e.to_string())?;
            self.global = aggregated.adapter;
            return Ok(());
        }
        let form = secure::secure_form(self.settings.method)
            .ok_or_else(|| format!("{} has no secure form", self.settings.method))?;
        self.global = secure::unpack(form, &sums, &self.global, &layout).map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Makes the next global adapter from the round's accumulator and starts the next one.
    fn aggregate(&mut self, facts: &RoundFacts) -> Result<(), String> {
        let round = facts.round;
        let finished = self.accumulator.take().ok_or("no round is being aggregated")?;
        // Whatever happens, the next round starts from the newest good global adapter.
        let round_rank = facts.updates.iter().map(|u| u.rank as usize).max();
        let shrink = self.settings.shrink_to_round_rank;
        let outcome = finished
            .finish(facts, self.settings.policy.fraction)
            .and_then(|aggregated| {
                for note in &aggregated.notes {
                    info!(round, "{note}");
                }
                if let (true, Some(rank)) = (shrink, round_rank) {
                    aggregated.adapter.zero_slots_from(rank)?;
                }
                self.global = aggregated.adapter;
                Ok(())
            })
            .map_err(|e| e.to_string());
        self.accumulator = Some(self.settings.start(&self.global, round + 1)?);
        outcome
    }
}

/// Tells the device its update was invalid, and the driver.
fn answer_invalid(
    device: String,
    round: u32,
    reason: String,
    reply: oneshot::Sender<CoordinatorMessage>,
    done: Box<dyn FnOnce(FoldDone) + Send>,
) {
    warn!(device = %device, round, "[round {round}] update rejected: {reason}");
    metrics::counter!("fl_updates_total", "status" => "rejected", "reason" => "invalid").increment(1);
    let _ = reply.send(CoordinatorMessage::Reject(Reject { round, reason }));
    done(FoldDone { device, round, accepted: false });
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;

    use flotilla_torch::model::{Architecture, ArchitectureExt};
    use flotilla_torch::tensor::DecodedTensors;
    use flotilla_wire::protocol::LocalMetrics;
    use tch::{Kind, Tensor};

    use super::*;

    const R_MAX: u32 = 4;

    fn worker(run_dir: &std::path::Path) -> (AggregationWorker, Adapter) {
        let global =
            Architecture::Mlp { input: 6, hidden: vec![5], classes: 3 }.init_adapter(R_MAX as usize, 1).unwrap();
        let settings = WorkerSettings {
            method: Method::Rbla,
            lora_alpha: 8.0,
            max_rank: R_MAX,
            run_dir: run_dir.to_path_buf(),
            record_updates: false,
            shrink_to_round_rank: false,
            evaluator: None,
            fingerprint: "test".into(),
            privacy: None,
            policy: flotilla_engine::RoundPolicy {
                seed: 1,
                fraction: 1.0,
                min_participants: 1,
                sampling: flotilla_engine::Sampling::FixedSize,
                round_size: flotilla_engine::RoundSize::default(),
                training: flotilla_engine::TrainingPlan {
                    local_steps: 1,
                    local_epochs: 0,
                    batch_size: 1,
                    learning_rate: 0.1,
                    seed: 1,
                },
            },
            first_round: 1,
        };
        let (worker, _) = AggregationWorker::spawn(global.deep_copy(), settings, Box::new(|_, _| {})).unwrap();
        (worker, global)
    }

    /// The global's tensors at `rank`, as a device would send them, after `edit`.
    fn tensors(global: &Adapter, rank: usize, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> DecodedTensors {
        let slice = global.slice_to_rank(rank).unwrap();
        let mut tensors: Vec<(String, Tensor)> = slice.tensors().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        edit(&mut tensors);
        let all_finite = tensors.iter().all(|(_, t)| t.isfinite().all().int64_value(&[]) != 0);
        DecodedTensors { tensors, all_finite, wire_bytes: 0, frame_bytes: 0 }
    }

    /// Sends one update through the worker; returns the device's answer and whether it was folded.
    fn fold(
        worker: &AggregationWorker,
        device: &str,
        rank: u32,
        tensors: DecodedTensors,
    ) -> (CoordinatorMessage, bool) {
        let (reply, answer) = oneshot::channel();
        let (done_tx, done_rx) = std_mpsc::channel();
        let update = Update { round: 1, rank, num_samples: 10, metrics: Some(LocalMetrics::default()) };
        let upload = Upload { device: device.into(), sent: Sent::Plain { update, tensors }, reply };
        let done = Box::new(move |done: FoldDone| {
            let _ = done_tx.send(done.accepted);
        });
        assert!(worker.fold(FoldRequest { upload, round: 1, done }).is_ok(), "the worker is running");
        let message = answer.blocking_recv().expect("the worker answers the device");
        (message, done_rx.recv().expect("the worker reports to the driver"))
    }

    #[test]
    fn crafted_updates_are_rejected_and_the_worker_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        let (worker, global) = worker(dir.path());
        let a = "base_model.model.fc1.lora_A.weight";
        let crafted: Vec<(&str, u32, DecodedTensors)> = vec![
            (
                "nan",
                2,
                tensors(&global, 2, |t| t[0].1 = Tensor::full([2, 6], f64::NAN, (Kind::Float, tch::Device::Cpu))),
            ),
            (
                "inf",
                2,
                tensors(&global, 2, |t| t[1].1 = Tensor::full([5, 2], f64::INFINITY, (Kind::Float, tch::Device::Cpu))),
            ),
            ("lying-rank", 3, tensors(&global, 2, |_| {})),
            ("above-r-max", R_MAX + 1, tensors(&global, R_MAX as usize, |_| {})),
            (
                "one-dimensional",
                2,
                tensors(&global, 2, |t| t[0].1 = Tensor::zeros([12], (Kind::Float, tch::Device::Cpu))),
            ),
            ("empty", 2, tensors(&global, 2, |t| t[0].1 = Tensor::zeros([0, 6], (Kind::Float, tch::Device::Cpu)))),
            ("duplicate", 2, tensors(&global, 2, |t| t.push((t[0].0.clone(), t[0].1.copy())))),
            (
                "merged-delta",
                2,
                tensors(&global, 2, |t| {
                    t.push((
                        "base_model.model.fc1.merged_delta".into(),
                        Tensor::zeros([5, 6], (Kind::Float, tch::Device::Cpu)),
                    ))
                }),
            ),
            (
                "stranger",
                2,
                tensors(&global, 2, |t| {
                    t.push(("x.weight".into(), Tensor::zeros([1], (Kind::Float, tch::Device::Cpu))))
                }),
            ),
            ("missing", 2, tensors(&global, 2, |t| t.retain(|(n, _)| n != a))),
        ];
        for (device, rank, tensors) in crafted {
            let (message, folded) = fold(&worker, device, rank, tensors);
            assert!(matches!(message, CoordinatorMessage::Reject(_)), "{device}: {message:?}");
            assert!(!folded, "{device} was not folded");
        }
        let (message, folded) = fold(&worker, "honest", 2, tensors(&global, 2, |_| {}));
        assert_eq!(message, CoordinatorMessage::Ack(Ack { round: 1 }));
        assert!(folded);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let facts = RoundFacts {
            round: 1,
            population_by_rank: BTreeMap::new(),
            updates: Vec::new(),
            task_bytes: 0,
            round_seconds: 0.0,
            secure: None,
        };
        let record = runtime.block_on(worker.finish(facts)).expect("the round finishes after every rejection");
        assert_eq!(record.round, 1);
        assert!(record.global_dir.is_some_and(|d| d.join("state.json").exists()));
    }
}
