//! The training thread: owns libtorch on the device (its own thread count, CUDA when available),
//! the local dataset and the frozen base model. The network side sends it jobs and awaits replies.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use flotilla_torch::adapter::Adapter;
use flotilla_torch::data::decoder_tokenizer::{load_headlines, DecoderTokenizer};
use flotilla_torch::data::idx::{load_split, Split};
use flotilla_torch::data::partition::{partition, PartitionSpec};
use flotilla_torch::data::text::TextSplit;
use flotilla_torch::data::tokenizer::load_tokenized;
use flotilla_torch::data::{synthetic_classification, Dataset};
use flotilla_torch::gguf::GgufFile;
use flotilla_torch::model::checkpoint::HfCheckpoint;
use flotilla_torch::model::llama::{llama_spec, load_base};
use flotilla_torch::model::quantized::load_base_q4;
use flotilla_torch::model::{Architecture, ArchitectureExt, BaseWeights, BertSpec, DecoderSpec, LocalModel};
use flotilla_wire::evaluation::{EvaluationPlan, EvaluationSums, RankSums};
use flotilla_wire::protocol::TrainingSettings;
use flotilla_wire::tensor::{DType, WireTensors};
use tokio::sync::oneshot;

use crate::held_adapter::{adapter_at_rank, held_at_rank};
use crate::held_out::HeldOut;
use crate::local_trainer::{
    BaseFailure, BaseSource, HeldOutResult, LocalTrainer, Scoring, TrainedUpdate, UpdateShaping,
};
use crate::secure_pack::pack_secure;

/// How a device holds a decoder's frozen base: dequantized to f32, or its 4-bit projections kept
/// 4-bit (`flotilla_torch::model::quantized`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecoderBase {
    F32,
    Q4,
}

enum Job {
    SetBase {
        architecture: Architecture,
        scale: f64,
        base: BaseSource,
        evaluation: Option<EvaluationPlan>,
        reply: oneshot::Sender<Result<(), BaseFailure>>,
    },
    Evaluate {
        slice: WireTensors,
        scoring: Scoring,
        reply: oneshot::Sender<Result<HeldOutResult, String>>,
    },
    Train {
        slice: WireTensors,
        rank: u32,
        settings: TrainingSettings,
        shaping: UpdateShaping,
        reply: oneshot::Sender<Result<TrainedUpdate, String>>,
    },
}

/// Where the local training data comes from.
#[derive(Debug, Clone)]
pub enum DataSource {
    /// A synthetic classification task shaped for the coordinator's model (see
    /// `flotilla_torch::data::synthetic_classification`); devices sharing `task_seed` share the task.
    Synthetic { samples: usize, task_seed: u64, sample_seed: u64 },
    /// A data set on disk, optionally only this device's part of it: the training split of an
    /// MNIST-style IDX directory for the small models, of labelled texts for a transformer.
    /// `keep` (in (0, 1]) is the share of the shard this device keeps (a seeded sample), so a
    /// study can make data size depend on rank.
    Path { path: PathBuf, shard: Option<(PartitionSpec, usize)>, keep: f64 },
}

/// What `--data` names, checked once: synthetic samples, or a data set on disk (an MNIST-style
/// IDX directory, or labelled texts for a transformer). Each device (a real one, or each of the
/// simulator's) then gets its own [`DataSource`] from it.
#[derive(Debug, Clone)]
pub enum DataChoice {
    Synthetic { samples: usize, task_seed: u64 },
    Path(PathBuf),
}

impl DataChoice {
    /// `synthetic`, `fashion-mnist` (Debian's dataset-fashion-mnist), `bbc-news` or
    /// `rotten-tomatoes` (fetched into the cache by deploy/fetch-text-assets.sh), or a path.
    pub fn parse(data: &str, samples: usize, task_seed: u64) -> anyhow::Result<DataChoice> {
        if data == "synthetic" {
            return Ok(DataChoice::Synthetic { samples, task_seed });
        }
        let cache = flotilla_torch::cache::root();
        let (path, hint) = match data {
            "fashion-mnist" => (
                PathBuf::from(flotilla_torch::data::idx::DEBIAN_FASHION_MNIST),
                " (install Debian's dataset-fashion-mnist)",
            ),
            "bbc-news" => (cache.join("datasets/bbc-news"), " (run deploy/fetch-text-assets.sh)"),
            "rotten-tomatoes" => (cache.join("datasets/rotten-tomatoes.csv"), " (run deploy/fetch-text-assets.sh)"),
            other => (PathBuf::from(other), ""),
        };
        anyhow::ensure!(path.exists(), "--data {data}: {} does not exist{hint}", path.display());
        Ok(DataChoice::Path(path))
    }

    /// The data of device `device_id`: its own synthetic samples (seeded by its id), or its part
    /// `shard` of the IDX training set (all of it without a partition).
    pub fn for_device(&self, device_id: &str, shard: Option<(PartitionSpec, usize)>) -> DataSource {
        match self {
            DataChoice::Synthetic { samples, task_seed } => DataSource::Synthetic {
                samples: *samples,
                task_seed: *task_seed,
                sample_seed: flotilla_wire::fingerprint::fnv1a(device_id.as_bytes()),
            },
            DataChoice::Path(path) => DataSource::Path { path: path.clone(), shard, keep: 1.0 },
        }
    }
}

impl DataSource {
    /// The local data for `architecture`; a transformer's texts are tokenized with `tokenizer`.
    fn load(&self, architecture: &Architecture, tokenizer: Option<&Path>) -> Result<Dataset, String> {
        self.load_split(architecture, tokenizer, false)
    }

    /// The local data, from the data set's training split or (`test`) its test split (IDX `t10k`
    /// files, the texts' stable test split), sharded alike.
    fn load_split(&self, architecture: &Architecture, tokenizer: Option<&Path>, test: bool) -> Result<Dataset, String> {
        match self {
            DataSource::Synthetic { samples, task_seed, sample_seed } => {
                if *samples == 0 {
                    return Err("no local samples".into());
                }
                if test {
                    return Err("synthetic data has no test split; hold out a share of it (--holdout-fraction)".into());
                }
                if architecture.takes_tokens() {
                    return Err("synthetic data is for the small models; give a transformer text data (--data bbc-news, a CSV, ...)".into());
                }
                Ok(synthetic_classification(
                    *samples,
                    architecture.input_size(),
                    architecture.classes(),
                    *task_seed,
                    *sample_seed,
                ))
            }
            DataSource::Path { path, shard, keep } => {
                let (split, text_split) =
                    if test { (Split::Test, TextSplit::Test) } else { (Split::Train, TextSplit::Train) };
                let data = match architecture {
                    Architecture::Bert(spec) => load_texts(spec, path, tokenizer, text_split)?,
                    Architecture::Llama(spec) => load_articles(spec, path, tokenizer, text_split)?,
                    _ => load_split(path, split, architecture.classes()).map_err(|e| e.to_string())?,
                };
                let Some((spec, index)) = shard else { return Ok(data) };
                let parts = partition(&data.labels_vec(), architecture.classes(), spec)?;
                let mine = parts.get(*index).ok_or_else(|| {
                    format!("device index {index} is outside the partition's {} devices", spec.devices)
                })?;
                let mine = kept_share(mine, *keep, spec.seed ^ (*index as u64).rotate_left(32));
                tracing::info!(samples = mine.len(), partition = %spec.scheme, index, keep, "local data: shard of {}", path.display());
                Ok(data.subset(&mine))
            }
        }
    }
}

/// A seeded sample of `keep` (in (0, 1]) of a shard's indices, at least one, in index order (a
/// shard's indices come grouped by class, so a prefix would not do).
fn kept_share(shard: &[usize], keep: f64, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut mine = shard.to_vec();
    if keep < 1.0 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        mine.shuffle(&mut rng);
        mine.truncate(((mine.len() as f64 * keep).ceil() as usize).max(1));
        mine.sort_unstable();
    }
    mine
}

/// A split of the labelled texts at `path`, tokenized.
fn load_texts(spec: &BertSpec, path: &Path, tokenizer: Option<&Path>, split: TextSplit) -> Result<Dataset, String> {
    let tokenizer = tokenizer.ok_or("a transformer needs its tokenizer.json")?;
    load_tokenized(spec, path, split, tokenizer).map_err(|e| e.to_string())
}

/// A split of the articles at `path` as headline examples, tokenized with the decoder's GGUF file
/// `gguf`.
fn load_articles(spec: &DecoderSpec, path: &Path, gguf: Option<&Path>, split: TextSplit) -> Result<Dataset, String> {
    let gguf = gguf.ok_or("a decoder needs its GGUF file")?;
    let file = GgufFile::open(gguf).map_err(|e| e.to_string())?;
    let tokenizer = DecoderTokenizer::from_gguf(&file).map_err(|e| e.to_string())?;
    load_headlines(spec, path, split, &tokenizer).map_err(|e| e.to_string())
}

/// The one GGUF file of a decoder's checkpoint directory.
pub fn gguf_in(dir: &Path) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut found: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "gguf")).collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(format!("{} holds {n} .gguf files; a decoder's checkpoint is exactly one", dir.display())),
    }
}

/// Training threads shared by one or many devices: a real device has a pool of one; the simulator
/// runs many virtual devices on a few threads, which bounds how many train at once. Each device's
/// data and base model stay in the pool between rounds.
pub struct TrainerPool {
    jobs: mpsc::Sender<(usize, Job)>,
    states: Arc<Mutex<HashMap<usize, DeviceState>>>,
    next_key: std::sync::atomic::AtomicUsize,
}

impl TrainerPool {
    /// Starts `workers` training threads, each using `threads` libtorch threads.
    pub fn new(workers: usize, threads: usize) -> anyhow::Result<TrainerPool> {
        TrainerPool::with_decoder_base(workers, threads, false)
    }

    /// [`TrainerPool::new`], a decoder's frozen projections kept 4-bit when `decoder_4bit` (about a
    /// fifth of the f32 base's memory, dequantized per layer; training then goes layer by layer).
    pub fn with_decoder_base(workers: usize, threads: usize, decoder_4bit: bool) -> anyhow::Result<TrainerPool> {
        let (jobs, receiver) = mpsc::channel::<(usize, Job)>();
        let receiver = Arc::new(Mutex::new(receiver));
        let states: Arc<Mutex<HashMap<usize, DeviceState>>> = Arc::default();
        let checkpoints = SharedCheckpoints { loaded: Arc::default(), decoder_4bit };
        for worker in 0..workers.max(1) {
            let receiver = receiver.clone();
            let states = states.clone();
            let checkpoints = checkpoints.clone();
            std::thread::Builder::new().name(format!("training-{worker}")).spawn(move || {
                tch::set_num_threads(threads.max(1) as i32);
                let device = tch::Device::cuda_if_available();
                loop {
                    let next = receiver.lock().map_err(|_| ()).and_then(|r| r.recv().map_err(|_| ()));
                    let Ok((key, job)) = next else { return };
                    // Take the device's state out while working on it; other workers serve others.
                    let state = states.lock().ok().and_then(|mut s| s.remove(&key));
                    let Some(mut state) = state else { continue };
                    // The state goes back before the answer: the device's next job may be taken by
                    // another worker the moment it is answered, and must find it.
                    let put_back = |state| {
                        if let Ok(mut states) = states.lock() {
                            states.insert(key, state);
                        }
                    };
                    match job {
                        Job::SetBase { architecture, scale, base, evaluation, reply } => {
                            let result = state.set_base(architecture, scale, &base, evaluation, &checkpoints);
                            put_back(state);
                            let _ = reply.send(result);
                        }
                        Job::Evaluate { slice, scoring, reply } => {
                            let result = state.evaluate(&slice, &scoring, device);
                            put_back(state);
                            let _ = reply.send(result);
                        }
                        Job::Train { slice, rank, settings, shaping, reply } => {
                            let result = state.train(&slice, rank, &settings, shaping, device);
                            put_back(state);
                            let _ = reply.send(result);
                        }
                    }
                }
            })?;
        }
        Ok(TrainerPool { jobs, states, next_key: Default::default() })
    }

    /// A handle for one device whose local data comes from `source` (loaded once the model is
    /// known), holding `held_out` apart when its run evaluates on devices.
    pub fn trainer(&self, source: DataSource, held_out: HeldOut) -> anyhow::Result<Trainer> {
        let key = self.next_key.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let state =
            DeviceState { source, held_out_choice: held_out, data: None, held_out: None, headlines: None, model: None };
        self.states.lock().map_err(|_| stopped())?.insert(key, state);
        Ok(Trainer { key, jobs: self.jobs.clone() })
    }
}

/// Handle to a device's training, on its pool's threads.
pub struct Trainer {
    key: usize,
    jobs: mpsc::Sender<(usize, Job)>,
}

impl Trainer {
    /// A device with its own training thread (what a real device runs).
    pub fn spawn(threads: usize, source: DataSource, held_out: HeldOut, decoder_4bit: bool) -> anyhow::Result<Trainer> {
        // The pool's threads live as long as a handle does; the pool itself can go.
        TrainerPool::with_decoder_base(1, threads, decoder_4bit)?.trainer(source, held_out)
    }
}

impl LocalTrainer for Trainer {
    async fn set_base(
        &self,
        architecture: Architecture,
        scale: f64,
        base: BaseSource,
        evaluation: Option<EvaluationPlan>,
    ) -> Result<(), BaseFailure> {
        let (reply, answer) = oneshot::channel();
        let stopped = || BaseFailure::Model(stopped().to_string());
        let job = Job::SetBase { architecture, scale, base, evaluation, reply };
        self.jobs.send((self.key, job)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn evaluate(&self, slice: WireTensors, scoring: Scoring) -> anyhow::Result<HeldOutResult> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send((self.key, Job::Evaluate { slice, scoring, reply })).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.map_err(anyhow::Error::msg)
    }

    async fn train(
        &self,
        slice: WireTensors,
        rank: u32,
        settings: TrainingSettings,
        shaping: UpdateShaping,
    ) -> anyhow::Result<TrainedUpdate> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send((self.key, Job::Train { slice, rank, settings, shaping, reply })).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.map_err(anyhow::Error::msg)
    }
}

fn stopped() -> anyhow::Error {
    anyhow::anyhow!("training thread stopped")
}

/// The frozen weights of the checkpoints this pool's devices use, loaded once and shared: the
/// simulator's virtual devices all train on one copy of a transformer's 90 MB (libtorch tensors
/// share storage, and frozen weights are never written).
#[derive(Clone, Default)]
struct SharedCheckpoints {
    loaded: Arc<Mutex<HashMap<(PathBuf, String), BaseWeights>>>,
    /// A decoder's projections stay 4-bit (`flotilla_torch::model::quantized`).
    decoder_4bit: bool,
}

impl SharedCheckpoints {
    /// The base cached under (`path`, `spec`), loaded by `load` the first time; every caller gets
    /// tensors sharing the one copy's storage.
    fn cached(
        &self,
        path: &Path,
        spec: &impl serde::Serialize,
        load: impl FnOnce() -> Result<BaseWeights, String>,
    ) -> Result<BaseWeights, String> {
        let key = (path.to_path_buf(), serde_json::to_string(spec).unwrap_or_default());
        let mut loaded =
            self.loaded.lock().map_err(|_| "a training thread failed while loading the base".to_string())?;
        if let Some(weights) = loaded.get(&key) {
            return Ok(weights.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect());
        }
        let weights = load()?;
        let shared = weights.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        loaded.insert(key, weights);
        Ok(shared)
    }

    fn weights(&self, checkpoint: &HfCheckpoint, spec: &BertSpec) -> Result<BaseWeights, String> {
        self.cached(&checkpoint.dir, spec, || checkpoint.load_weights(spec).map_err(|e| e.to_string()))
    }

    /// A decoder's base from its GGUF file, refused when the file is not the decoder `spec` describes.
    fn decoder_weights(&self, gguf: &Path, spec: &DecoderSpec) -> Result<BaseWeights, String> {
        self.cached(gguf, spec, || {
            let file = GgufFile::open(gguf).map_err(|e| format!("{}: {e}", gguf.display()))?;
            let loaded_base = if self.decoder_4bit { load_base_q4(&file) } else { load_base(&file) };
            let (described, weights) = loaded_base.map_err(|e| format!("{}: {e}", gguf.display()))?;
            if described != llama_spec(spec) {
                return Err(format!("{} is not the decoder the coordinator describes ({described:?})", gguf.display()));
            }
            Ok(weights)
        })
    }
}

/// What the pool keeps for one device between jobs.
struct DeviceState {
    source: DataSource,
    held_out_choice: HeldOut,
    data: Option<Dataset>,
    /// Set apart from `data` (or loaded on its own) when the run evaluates on devices.
    held_out: Option<Dataset>,
    /// A headline-writing decoder's tokenizer and how many headlines each evaluation writes.
    headlines: Option<(DecoderTokenizer, usize)>,
    model: Option<(Architecture, f64, BaseWeights)>,
}

impl DeviceState {
    fn set_base(
        &mut self,
        architecture: Architecture,
        scale: f64,
        base: &BaseSource,
        evaluation: Option<EvaluationPlan>,
        checkpoints: &SharedCheckpoints,
    ) -> Result<(), BaseFailure> {
        let evaluates = evaluation.is_some();
        let (weights, tokenizer) = self.base_weights(&architecture, base, checkpoints).map_err(BaseFailure::Model)?;
        // A reconnect brings the same base again: keep the data already loaded (and held out).
        let data = match self.data.take() {
            Some(data) => data,
            None => {
                let data = self.source.load(&architecture, tokenizer.as_deref()).map_err(BaseFailure::Data)?;
                let (data, held_out) = self.hold_out(data, evaluates, &architecture, tokenizer.as_deref())?;
                self.held_out = held_out;
                data
            }
        };
        if data.is_empty() {
            return Err(BaseFailure::Data("it holds no samples".into()));
        }
        if !architecture.takes_tokens() && architecture.input_size() as i64 != data.features.size()[1] {
            return Err(BaseFailure::Data(format!(
                "it has {} features per sample, but the coordinator's model takes {} inputs",
                data.features.size()[1],
                architecture.input_size()
            )));
        }
        self.headlines = headline_writer(&architecture, evaluation.as_ref(), tokenizer.as_deref())?;
        self.model = Some((architecture, scale, weights));
        self.data = Some(data);
        Ok(())
    }

    fn base_weights(
        &self,
        architecture: &Architecture,
        base: &BaseSource,
        checkpoints: &SharedCheckpoints,
    ) -> Result<(BaseWeights, Option<PathBuf>), String> {
        let (weights, tokenizer) = match (base, architecture) {
            (BaseSource::Tensors(tensors), _) => {
                let weights: BaseWeights = flotilla_torch::tensor::tensors_from_wire(tensors)
                    .map_err(|e| format!("base model: {e}"))?
                    .0
                    .into_iter()
                    .collect();
                (weights, None)
            }
            (BaseSource::Checkpoint(dir), Architecture::Bert(spec)) => {
                let checkpoint = HfCheckpoint::open(dir).map_err(|e| e.to_string())?;
                (checkpoints.weights(&checkpoint, spec)?, Some(checkpoint.tokenizer_path()))
            }
            (BaseSource::Checkpoint(dir), Architecture::Llama(spec)) => {
                let gguf = gguf_in(dir)?;
                (checkpoints.decoder_weights(&gguf, spec)?, Some(gguf))
            }
            (BaseSource::Checkpoint(_), _) => {
                return Err("a checkpoint base for a model that is not a transformer".into())
            }
        };
        architecture.check_base(&weights).map_err(|e| format!("base model: {e}"))?;
        Ok((weights, tokenizer))
    }

    /// Sets the held-out data apart when the run `evaluates` on devices: a stratified share of
    /// `data` (the rest is returned to train on), or a data set of its own.
    fn hold_out(
        &self,
        data: Dataset,
        evaluates: bool,
        architecture: &Architecture,
        tokenizer: Option<&Path>,
    ) -> Result<(Dataset, Option<Dataset>), BaseFailure> {
        if !evaluates {
            return Ok((data, None));
        }
        match &self.held_out_choice {
            HeldOut::Declined(_) => Ok((data, None)),
            HeldOut::Share(fraction) => {
                let labels: Vec<usize> = data.labels_vec().iter().map(|&l| l.max(0) as usize).collect();
                if labels.len() != data.len() {
                    return Err(BaseFailure::Data("its labels cannot be read to set held-out data apart".into()));
                }
                let (training, held) = crate::held_out::split(&labels, *fraction, HELD_OUT_SEED);
                tracing::info!(held_out = held.len(), training = training.len(), "held out for federated evaluation");
                Ok((data.subset(&training), Some(data.subset(&held))))
            }
            HeldOut::TestSplit => {
                let held = self
                    .source
                    .load_split(architecture, tokenizer, true)
                    .map_err(|e| BaseFailure::Data(format!("--holdout-test-split: {e}")))?;
                tracing::info!(
                    held_out = held.len(),
                    "held out for federated evaluation: this device's shard of the test split"
                );
                Ok((data, Some(held)))
            }
            HeldOut::Data(path) => {
                let source = DataSource::Path { path: path.clone(), shard: None, keep: 1.0 };
                let held = source
                    .load(architecture, tokenizer)
                    .map_err(|e| BaseFailure::Data(format!("--holdout-data {}: {e}", path.display())))?;
                tracing::info!(held_out = held.len(), "held-out data for federated evaluation: {}", path.display());
                Ok((data, Some(held)))
            }
        }
    }

    /// Scores the global adapter `slice` as a device of each asked rank holds it on the held-out
    /// data: sums only.
    fn evaluate(
        &mut self,
        slice: &WireTensors,
        scoring: &Scoring,
        device: tch::Device,
    ) -> Result<HeldOutResult, String> {
        let Some(held_out) = &self.held_out else {
            let declined = match &self.held_out_choice {
                HeldOut::Declined(why) => why.clone(),
                _ => "this device holds no data out".to_string(),
            };
            return Ok(HeldOutResult { held_out_examples: 0, sums: None, declined, cross: Vec::new() });
        };
        let (architecture, scale, base) = self.model.as_ref().ok_or("no base model received yet")?;
        let received = Adapter::from_wire(slice).map_err(|e| format!("global adapter slice: {e}"))?;
        let score = |rank: u32| -> Result<EvaluationSums, String> {
            let adapter = held_at_rank(&received, rank, *scale, scoring.fold_tail)?;
            let model = LocalModel::new(architecture, base, &adapter, *scale, device).map_err(|e| e.to_string())?;
            let mut sums = model.evaluation_sums(held_out).map_err(|e| e.to_string())?;
            if let Some((tokenizer, count)) = &self.headlines {
                let written = model.write_headlines(tokenizer, held_out, *count).map_err(|e| e.to_string())?;
                sums.generated = written.len() as u64;
                sums.rouge_l_sum = written.iter().map(|(_, score)| score).sum();
            }
            Ok(sums)
        };
        let sums = score(scoring.rank)?;
        let cross = scoring
            .cross_ranks
            .iter()
            .map(|&rank| Ok(RankSums { rank, sums: score(rank)? }))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(HeldOutResult { held_out_examples: held_out.len() as u64, sums: Some(sums), declined: String::new(), cross })
    }

    fn train(
        &mut self,
        slice: &WireTensors,
        rank: u32,
        settings: &TrainingSettings,
        shaping: UpdateShaping,
        device: tch::Device,
    ) -> Result<TrainedUpdate, String> {
        let (architecture, scale, base) = self.model.as_ref().ok_or("no base model received yet")?;
        let data = self.data.as_ref().ok_or("no local data loaded")?;
        let adapter = adapter_at_rank(slice, rank, *scale)?;
        let mut model = LocalModel::new(architecture, base, &adapter, *scale, device).map_err(|e| e.to_string())?;
        let metrics = model.train(data, settings).map_err(|e| e.to_string())?;
        let mut trained = model.adapter().map_err(|e| e.to_string())?;
        let change_norm = match shaping.clip_norm {
            Some(bound) => Some(trained.clip_change(&adapter, bound).map_err(|e| format!("clipping the update: {e}"))?),
            None => None,
        };
        let packed = match &shaping.secure {
            Some(packing) => Some(pack_secure(&trained, &adapter, data.len(), packing)?),
            None => None,
        };
        Ok(TrainedUpdate {
            tensors: trained.to_wire(DType::F32).map_err(|e| e.to_string())?,
            rank: trained.rank() as u32,
            num_samples: data.len() as u64,
            metrics,
            change_norm,
            packed,
        })
    }
}

/// A headline-writing decoder's tokenizer (from its GGUF file) when the plan asks for headlines.
fn headline_writer(
    architecture: &Architecture,
    plan: Option<&EvaluationPlan>,
    gguf: Option<&Path>,
) -> Result<Option<(DecoderTokenizer, usize)>, BaseFailure> {
    let count = plan.map_or(0, |p| p.headlines as usize);
    let (Architecture::Llama(spec), Some(gguf)) = (architecture, gguf) else { return Ok(None) };
    if count == 0 || spec.task != flotilla_wire::model::DecoderTask::Headline {
        return Ok(None);
    }
    let file = GgufFile::open(gguf).map_err(|e| BaseFailure::Model(format!("{}: {e}", gguf.display())))?;
    let tokenizer = DecoderTokenizer::from_gguf(&file).map_err(|e| BaseFailure::Model(e.to_string()))?;
    Ok(Some((tokenizer, count)))
}

/// Seed of the held-out split: a device's split depends only on its data.
const HELD_OUT_SEED: u64 = 0x0068_656c_646f_7574;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_share_is_a_seeded_sample_of_its_size() {
        // A shard grouped by class: 100 of class 0, then 100 of class 1.
        let shard: Vec<usize> = (0..200).collect();
        let kept = kept_share(&shard, 0.25, 9);
        assert_eq!(kept.len(), 50);
        assert!(kept.windows(2).all(|w| w[0] < w[1]) && kept.iter().all(|i| shard.contains(i)));
        let class_one = kept.iter().filter(|&&i| i >= 100).count();
        assert!((10..=40).contains(&class_one), "both classes stay: {class_one} of 50");
        assert_eq!(kept, kept_share(&shard, 0.25, 9));
        assert_ne!(kept, kept_share(&shard, 0.25, 10));
        assert_eq!(kept_share(&shard, 1.0, 9), shard);
        assert_eq!(kept_share(&shard, 1e-9, 9).len(), 1);
    }

    /// A device's jobs follow one another at once (Welcome → base, then task → train) and may land
    /// on different workers; each must find the device's state (a job that did not was dropped,
    /// and the device stopped with "training thread stopped").
    #[test]
    fn back_to_back_jobs_of_one_device_on_several_workers_all_complete() {
        let architecture = Architecture::Mlp { input: 8, hidden: vec![4], classes: 2 };
        let base = architecture.init_base(1);
        let base_wire =
            flotilla_torch::tensor::wire_from_tensors(base.iter().map(|(n, t)| (n.as_str(), t)), DType::F32).unwrap();
        let slice = architecture.init_adapter(2, 2).unwrap().to_wire(DType::F32).unwrap();
        let settings = TrainingSettings {
            local_steps: 1,
            local_epochs: 0,
            batch_size: 4,
            learning_rate: 0.01,
            seed: 3,
            trainable: Default::default(),
        };
        let pool = TrainerPool::new(4, 1).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            for device in 0..50u64 {
                let source = DataSource::Synthetic { samples: 8, task_seed: 1, sample_seed: device };
                let trainer = pool.trainer(source, HeldOut::default()).unwrap();
                let base = BaseSource::Tensors(base_wire.clone());
                trainer.set_base(architecture.clone(), 1.0, base, None).await.unwrap();
                for _ in 0..4 {
                    trainer.train(slice.clone(), 2, settings.clone(), UpdateShaping::default()).await.unwrap();
                }
            }
        });
    }
}
