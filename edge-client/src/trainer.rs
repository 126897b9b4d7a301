//! The training thread: owns libtorch on the device (its own thread count, CUDA when available),
//! the local dataset and the frozen base model. The network side sends it jobs and awaits replies.

use std::sync::mpsc;

use flotilla_common::adapter::Adapter;
use flotilla_common::data::idx::{load_split, Split};
use flotilla_common::data::partition::{partition, PartitionSpec};
use flotilla_common::data::{synthetic_classification, Dataset};
use flotilla_common::model::{Architecture, BaseWeights, LoraModel};
use flotilla_common::protocol::{LocalMetrics, TrainingSettings};
use flotilla_common::tensor::{DType, WireTensors};
use tokio::sync::oneshot;

pub struct TrainedUpdate {
    pub tensors: WireTensors,
    pub rank: u32,
    pub num_samples: u64,
    pub metrics: LocalMetrics,
}

enum Job {
    SetBase { architecture: Architecture, scale: f64, base: WireTensors, reply: oneshot::Sender<Result<(), String>> },
    Train { slice: WireTensors, settings: TrainingSettings, reply: oneshot::Sender<Result<TrainedUpdate, String>> },
}

/// Where the local training data comes from.
#[derive(Debug, Clone)]
pub enum DataSource {
    /// A synthetic classification task shaped for the coordinator's model (see
    /// `flotilla_common::data::synthetic_classification`); devices sharing `task_seed` share the task.
    Synthetic { samples: usize, task_seed: u64, sample_seed: u64 },
    /// The training split of an MNIST-style IDX directory, optionally only this device's part of it.
    Idx { dir: std::path::PathBuf, shard: Option<(PartitionSpec, usize)> },
}

impl DataSource {
    fn load(&self, architecture: &Architecture) -> Result<Dataset, String> {
        match *self {
            DataSource::Synthetic { samples, task_seed, sample_seed } => {
                if samples == 0 {
                    return Err("no local samples".into());
                }
                Ok(synthetic_classification(
                    samples,
                    architecture.input_size(),
                    architecture.classes(),
                    task_seed,
                    sample_seed,
                ))
            }
            DataSource::Idx { ref dir, shard } => {
                let data = load_split(dir, Split::Train, architecture.classes()).map_err(|e| e.to_string())?;
                let Some((spec, index)) = shard else { return Ok(data) };
                let parts = partition(&data.labels_vec(), architecture.classes(), &spec)?;
                let mine = parts.get(index).ok_or_else(|| {
                    format!("device index {index} is outside the partition's {} devices", spec.devices)
                })?;
                tracing::info!(samples = mine.len(), partition = %spec.scheme, index, "local data: shard of {}", dir.display());
                Ok(data.subset(mine))
            }
        }
    }
}

/// Handle to the training thread.
pub struct Trainer {
    jobs: mpsc::Sender<Job>,
}

impl Trainer {
    /// Starts the thread. The data is loaded there once the model is known (tensors stay on it).
    pub fn spawn(threads: usize, source: DataSource) -> anyhow::Result<Trainer> {
        let (jobs, receiver) = mpsc::channel::<Job>();
        std::thread::Builder::new().name("training".into()).spawn(move || {
            tch::set_num_threads(threads.max(1) as i32);
            TrainingThread { source, data: None, device: tch::Device::cuda_if_available(), model: None }.run(receiver)
        })?;
        Ok(Trainer { jobs })
    }

    pub async fn set_base(&self, architecture: Architecture, scale: f64, base: WireTensors) -> anyhow::Result<()> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job::SetBase { architecture, scale, base, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.map_err(anyhow::Error::msg)
    }

    pub async fn train(&self, slice: WireTensors, settings: TrainingSettings) -> anyhow::Result<TrainedUpdate> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job::Train { slice, settings, reply }).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.map_err(anyhow::Error::msg)
    }
}

fn stopped() -> anyhow::Error {
    anyhow::anyhow!("training thread stopped")
}

struct TrainingThread {
    source: DataSource,
    data: Option<Dataset>,
    device: tch::Device,
    model: Option<(Architecture, f64, BaseWeights)>,
}

impl TrainingThread {
    fn run(mut self, receiver: mpsc::Receiver<Job>) {
        while let Ok(job) = receiver.recv() {
            match job {
                Job::SetBase { architecture, scale, base, reply } => {
                    let _ = reply.send(self.set_base(architecture, scale, &base));
                }
                Job::Train { slice, settings, reply } => {
                    let _ = reply.send(self.train(&slice, &settings));
                }
            }
        }
    }

    fn set_base(&mut self, architecture: Architecture, scale: f64, base: &WireTensors) -> Result<(), String> {
        let data = self.source.load(&architecture)?;
        if architecture.input_size() as i64 != data.features.size()[1] {
            return Err(format!(
                "the coordinator's model takes {} inputs but the local data has {} features",
                architecture.input_size(),
                data.features.size()[1]
            ));
        }
        let weights: BaseWeights = base.to_tensors().map_err(|e| format!("base model: {e}"))?.into_iter().collect();
        architecture.check_base(&weights).map_err(|e| format!("base model: {e}"))?;
        self.model = Some((architecture, scale, weights));
        self.data = Some(data);
        Ok(())
    }

    fn train(&mut self, slice: &WireTensors, settings: &TrainingSettings) -> Result<TrainedUpdate, String> {
        let (architecture, scale, base) = self.model.as_ref().ok_or("no base model received yet")?;
        let data = self.data.as_ref().ok_or("no local data loaded")?;
        let adapter = Adapter::from_wire(slice).map_err(|e| format!("global adapter slice: {e}"))?;
        let mut model = LoraModel::new(architecture, base, &adapter, *scale, self.device).map_err(|e| e.to_string())?;
        let metrics = model.train(data, settings).map_err(|e| e.to_string())?;
        let trained = model.adapter().map_err(|e| e.to_string())?;
        Ok(TrainedUpdate {
            tensors: trained.to_wire(DType::F32).map_err(|e| e.to_string())?,
            rank: trained.rank() as u32,
            num_samples: data.len() as u64,
            metrics,
        })
    }
}
