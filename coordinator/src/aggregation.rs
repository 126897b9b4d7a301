//! The aggregation worker: a dedicated thread that owns libtorch state on the coordinator — the
//! global adapter and the streaming accumulator of the current round — so no tensor work runs on
//! the async runtime. It receives commands and reports results back to the round driver.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use flotilla_torch::adapter::{peft_config_for, Adapter, NUM_SAMPLES_KEY};
use flotilla_torch::aggregate::{Aggregator, ClientUpdate, Method, MethodExt};
use flotilla_torch::tensor::DecodedTensors;
use flotilla_wire::tensor::{DType, WireTensors};
use tokio::sync::oneshot;

use crate::checkpoint::{self, CheckpointState};
use crate::evaluation::{describe, Evaluator, RankAccuracy};
use crate::report::RoundSummary;

pub enum Command {
    /// The global adapter sliced to each rank, packed for the wire.
    Slices {
        ranks: Vec<u32>,
        reply: oneshot::Sender<Result<BTreeMap<u32, WireTensors>, String>>,
    },
    Fold(FoldRequest),
    /// Ends the round: `record` holds what the driver knows (updates, duration); the worker adds
    /// the aggregation time and the evaluation and keeps it in the checkpoint.
    Finish {
        round: u32,
        record: RoundSummary,
        reply: oneshot::Sender<Result<RoundOutcome, String>>,
    },
    /// Drop what the current round folded (a skipped round); the global adapter is unchanged.
    Discard {
        round: u32,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The most updates folded together; the rest of the queue waits for the next batch.
const MAX_BATCH: usize = 64;

/// One device's update to fold into the current round, and where the result goes.
pub struct FoldRequest {
    pub device: String,
    pub round: u32,
    pub rank: u32,
    pub num_samples: u64,
    pub tensors: DecodedTensors,
    pub reply: oneshot::Sender<Result<(), String>>,
}

#[derive(Debug, Clone)]
pub struct RoundOutcome {
    pub round: u32,
    pub updates: usize,
    pub global_dir: PathBuf,
    pub seconds: f64,
    /// The round's complete record, as kept in its checkpoint.
    pub record: RoundSummary,
}

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
}

impl WorkerSettings {
    /// The one LoRA scale every rank uses: `lora_alpha / R_max`.
    fn scale(&self) -> f64 {
        self.lora_alpha / f64::from(self.max_rank)
    }

    /// A fresh accumulator for `round`, seeded with the current global adapter.
    fn start(&self, global: &Adapter, round: u32) -> Result<Box<dyn Aggregator>, String> {
        self.method.start_online(global, self.scale(), self.policy.aggregation_seed(round)).map_err(|e| e.to_string())
    }
}

pub struct AggregationWorker {
    commands: mpsc::Sender<Command>,
}

impl AggregationWorker {
    /// Starts the worker; returns it and the initial global model's test results (the lower bound).
    pub fn spawn(
        initial_global: Adapter,
        settings: WorkerSettings,
    ) -> anyhow::Result<(AggregationWorker, Vec<RankAccuracy>)> {
        let initial = match &settings.evaluator {
            Some(evaluator) => evaluator.evaluate(&initial_global, &BTreeSet::new()).map_err(anyhow::Error::msg)?,
            None => Vec::new(),
        };
        let (commands, receiver) = mpsc::channel();
        let accumulator = settings.start(&initial_global, settings.first_round).map_err(anyhow::Error::msg)?;
        std::thread::Builder::new().name("aggregation".into()).spawn(move || {
            // One core for tensor work; the rest serve the network.
            tch::set_num_threads(1);
            Worker { global: initial_global, accumulator: Some(accumulator), settings, round_ranks: BTreeSet::new() }
                .run(receiver)
        })?;
        Ok((AggregationWorker { commands }, initial))
    }

    pub async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> Command,
    ) -> Result<T, String> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).map_err(|_| "aggregation worker stopped".to_string())?;
        answer.await.map_err(|_| "aggregation worker stopped".to_string())?
    }
}

struct Worker {
    global: Adapter,
    /// `None` only between finishing a round and starting the next accumulator.
    accumulator: Option<Box<dyn Aggregator>>,
    settings: WorkerSettings,
    /// Ranks folded into the current round.
    round_ranks: BTreeSet<usize>,
}

impl Worker {
    fn run(mut self, receiver: mpsc::Receiver<Command>) {
        let mut next = None;
        while let Some(command) = next.take().or_else(|| receiver.recv().ok()) {
            match command {
                Command::Slices { ranks, reply } => {
                    let _ = reply.send(self.slices(&ranks));
                }
                Command::Fold(first) => {
                    // Updates that queued up meanwhile are folded together (module by module, the
                    // same result as one by one); the first other command waits for them.
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match receiver.try_recv() {
                            Ok(Command::Fold(request)) => batch.push(request),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.fold_batch(batch);
                }
                Command::Finish { round, record, reply } => {
                    let _ = reply.send(self.finish(round, record));
                }
                Command::Discard { round, reply } => {
                    self.round_ranks.clear();
                    let fresh = self.settings.start(&self.global, round + 1);
                    let _ = reply.send(fresh.map(|acc| self.accumulator = Some(acc)));
                }
            }
        }
    }

    fn slices(&self, ranks: &[u32]) -> Result<BTreeMap<u32, WireTensors>, String> {
        let mut out = BTreeMap::new();
        for &rank in ranks {
            if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(rank) {
                let slice = self.global.slice_to_rank(rank as usize).map_err(|e| e.to_string())?;
                slot.insert(slice.to_wire(DType::F32).map_err(|e| e.to_string())?);
            }
        }
        Ok(out)
    }

    /// Folds the batch and answers each update.
    fn fold_batch(&mut self, batch: Vec<FoldRequest>) {
        let mut replies = Vec::with_capacity(batch.len());
        let mut decoded = Vec::with_capacity(batch.len());
        for FoldRequest { device, round, rank, num_samples, tensors, reply } in batch {
            match Adapter::from_decoded(tensors) {
                Ok(adapter) => decoded.push((device, round, rank, num_samples, adapter, reply)),
                Err(e) => replies.push((reply, Err(format!("update from '{device}' rejected: {e}")))),
            }
        }
        let scale = self.settings.scale();
        let updates: Vec<ClientUpdate<'_>> = decoded
            .iter()
            .map(|(device, _, rank, num_samples, adapter, _)| ClientUpdate {
                client: device,
                declared_rank: *rank as usize,
                num_samples: *num_samples,
                scale,
                adapter,
            })
            .collect();
        let results: Vec<Result<(), String>> = match self.accumulator.as_mut() {
            Some(accumulator) => {
                accumulator.fold_batch(&updates).into_iter().map(|r| r.map_err(|e| e.to_string())).collect()
            }
            None => updates.iter().map(|_| Err("no round is being aggregated".to_string())).collect(),
        };
        drop(updates);
        for ((device, round, rank, num_samples, adapter, reply), result) in decoded.into_iter().zip(results) {
            if result.is_ok() {
                self.round_ranks.insert(rank as usize);
                if self.settings.record_updates {
                    self.record_update(&device, round, rank, num_samples, &adapter);
                }
            }
            replies.push((reply, result));
        }
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
    }

    fn record_update(&self, device: &str, round: u32, rank: u32, num_samples: u64, adapter: &Adapter) {
        let dir = self.settings.run_dir.join("updates").join(format!("round-{round}")).join(device);
        let metadata = HashMap::from([(NUM_SAMPLES_KEY.to_string(), num_samples.to_string())]);
        let config = peft_config_for(adapter, self.settings.lora_alpha * rank as f64 / self.global.rank() as f64);
        if let Err(e) = adapter.save_peft(&dir, &config, metadata) {
            tracing::error!(device, round, "cannot record update: {e}");
        }
    }

    fn finish(&mut self, round: u32, mut record: RoundSummary) -> Result<RoundOutcome, String> {
        let started = Instant::now();
        let finished = self.accumulator.take().ok_or("no round is being aggregated")?;
        let updates = finished.folded();
        // Whatever happens, the next round starts from the newest good global adapter.
        let round_rank = self.round_ranks.iter().copied().max();
        let shrink = self.settings.shrink_to_round_rank;
        let outcome = finished
            .finish()
            .and_then(|aggregated| {
                for note in &aggregated.notes {
                    tracing::info!(round, "{note}");
                }
                if let (true, Some(rank)) = (shrink, round_rank) {
                    aggregated.adapter.zero_slots_from(rank)?;
                }
                self.global = aggregated.adapter;
                Ok(())
            })
            .map_err(|e| e.to_string());
        self.accumulator = Some(self.settings.start(&self.global, round + 1)?);
        outcome?;
        let seconds = started.elapsed().as_secs_f64();
        crate::fault::point("mid-aggregation", round);
        let ranks = std::mem::take(&mut self.round_ranks);
        let evaluation = match &self.settings.evaluator {
            Some(evaluator) => {
                let results = evaluator.evaluate(&self.global, &ranks)?;
                tracing::info!(
                    round,
                    "[round {round}] test accuracy ({} samples): {}",
                    evaluator.samples(),
                    describe(&results)
                );
                results
            }
            None => Vec::new(),
        };
        record.aggregation_seconds = seconds;
        record.evaluation = evaluation;
        record.global_dir = Some(checkpoint::checkpoint_dir(&self.settings.run_dir, round));
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
        let global_dir = checkpoint::write(&self.settings.run_dir, &state, &self.global, &config, metadata)
            .map_err(|e| format!("cannot write the checkpoint of round {round}: {e:#}"))?;
        Ok(RoundOutcome { round, updates, global_dir, seconds, record })
    }
}
