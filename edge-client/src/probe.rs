//! `flotilla-edge probe`: what this device can do — CPU, memory (container limits respected), CUDA
//! through libtorch — and how long one real LoRA training step of the model takes here, measured on
//! a dedicated thread. The rank policy turns that into the rank to ask for.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use flotilla_torch::data::{synthetic_classification, Dataset};
use flotilla_torch::model::{Architecture, ArchitectureExt, LocalModel};
use flotilla_wire::protocol::TrainingSettings;
use serde::Serialize;
use tch::{Kind, Tensor};

use crate::rank_policy::{self, AdapterSize, Budgets, RankChoice, TrainingFootprint};

/// Budgets for a device class, to emulate weaker hardware in trials. `None` (no class given) uses
/// the device's own measurements: a quarter of the available memory, 64 MiB of upload and 250 ms
/// per step.
pub fn class_budgets(class: &str) -> Option<Budgets> {
    const MIB: u64 = 1 << 20;
    Some(match class {
        "phone" => Budgets { memory_bytes: 256 * MIB, upload_bytes: 4 * MIB, step_ms: 50.0 },
        "laptop" => Budgets { memory_bytes: 1024 * MIB, upload_bytes: 16 * MIB, step_ms: 100.0 },
        "desktop" => Budgets { memory_bytes: 4096 * MIB, upload_bytes: 64 * MIB, step_ms: 200.0 },
        "gpu" => Budgets { memory_bytes: 16384 * MIB, upload_bytes: 256 * MIB, step_ms: 200.0 },
        _ => return None,
    })
}

#[derive(Debug, Serialize)]
pub struct ProbeReport {
    pub cpu_model: String,
    /// The machine's architecture as the kernel reports it (`uname -m`; under qemu-user, the emulated one).
    pub cpu_arch: String,
    pub logical_cores: usize,
    pub physical_cores: Option<usize>,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    /// The container (cgroup) memory limit, when one applies.
    pub cgroup_memory_limit_bytes: Option<u64>,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    /// GPU names and memory from the NVIDIA driver (NVML), or why there are none.
    pub nvml: crate::nvml::NvmlReport,
    pub training_device: String,
    /// Median LoRA training step time (ms) at the ranks measured.
    pub step_ms: BTreeMap<u32, f64>,
    pub device_class: String,
    pub budgets: Budgets,
    pub choice: RankChoice,
}

pub struct ProbeSettings {
    pub architecture: Architecture,
    pub device_class: String,
    pub r_min: u32,
    pub r_max: u32,
    pub threads: usize,
    pub batch_size: usize,
    /// Time allowed for each rank's measurement.
    pub time_budget: Duration,
    /// Replaces the step-time budget (of the class, or this device's own).
    pub step_budget_ms: Option<f64>,
    /// A decoder's projections kept 4-bit: memory is estimated so (the step is timed on f32).
    pub decoder_4bit: bool,
}

/// The model whose step the probe times: a transformer checkpoint, a decoder's GGUF file, or an MLP.
pub struct TimedModel<'a> {
    pub transformer: Option<&'a std::path::Path>,
    pub decoder: Option<&'a std::path::Path>,
    /// Tokens per input for a transformer or a decoder.
    pub max_length: u32,
    pub input: u32,
    pub hidden: &'a [u32],
    pub classes: u32,
}

pub fn timed_architecture(model: &TimedModel) -> anyhow::Result<Architecture> {
    use anyhow::Context;
    if let Some(gguf) = model.decoder {
        let file =
            flotilla_torch::gguf::GgufFile::open(gguf).with_context(|| format!("--decoder {}", gguf.display()))?;
        let llama = flotilla_torch::gguf::LlamaSpec::from_file(&file)
            .with_context(|| format!("--decoder {}", gguf.display()))?;
        let targets = flotilla_wire::model::DEFAULT_DECODER_TARGETS.iter().map(|t| t.to_string()).collect();
        let spec = flotilla_torch::model::llama::decoder_spec(&llama, targets, model.max_length, vec!["text".into()]);
        return Ok(Architecture::Llama(spec));
    }
    if let Some(dir) = model.transformer {
        let checkpoint = flotilla_torch::model::checkpoint::HfCheckpoint::open(dir)?;
        let spec = checkpoint.spec(&flotilla_torch::model::checkpoint::FineTuning {
            target_modules: flotilla_wire::model::DEFAULT_TARGET_MODULES.iter().map(|t| t.to_string()).collect(),
            pooling: flotilla_torch::model::Pooling::Cls,
            labels: (0..model.classes.max(2)).map(|c| format!("class-{c}")).collect(),
            max_length: model.max_length,
        })?;
        return Ok(Architecture::Bert(spec));
    }
    Ok(Architecture::Mlp { input: model.input, hidden: model.hidden.to_vec(), classes: model.classes })
}

pub fn probe(settings: &ProbeSettings) -> anyhow::Result<ProbeReport> {
    let mut system = sysinfo::System::new().map_err(|e| anyhow::anyhow!("cannot read system information: {e}"))?;
    system.refresh_memory();
    system.refresh_cpu_all();
    let cgroup = system.cgroup_limits();
    let memory_available = match &cgroup {
        Some(limits) => limits.free_memory.min(system.available_memory()),
        None => system.available_memory(),
    };
    let cpu_model = system.cpus().first().map(|c| c.brand().trim().to_string()).unwrap_or_default();
    let logical_cores = system.cpus().len().max(1);

    let candidates = rank_policy::candidates(settings.r_min, settings.r_max);
    let measured: Vec<u32> = match (candidates.first(), candidates.last()) {
        (Some(&lo), Some(&hi)) if lo != hi => vec![lo, hi],
        (Some(&only), _) => vec![only],
        _ => Vec::new(),
    };
    let step_ms = measure_steps(settings, &measured)?;
    let interpolate = |rank: u32| -> f64 {
        match (measured.first(), measured.last()) {
            (Some(&lo), Some(&hi)) if hi > lo => {
                let t = f64::from(rank - lo) / f64::from(hi - lo);
                step_ms[&lo] + t * (step_ms[&hi] - step_ms[&lo])
            }
            (Some(&only), _) => step_ms[&only],
            _ => 0.0,
        }
    };
    let mut budgets = class_budgets(&settings.device_class).unwrap_or(Budgets {
        memory_bytes: memory_available / 4,
        upload_bytes: 64 << 20,
        step_ms: 250.0,
    });
    if let Some(step_ms) = settings.step_budget_ms {
        budgets.step_ms = step_ms;
    }
    let per_rank: u64 = settings.architecture.adapted_layers().iter().map(|l| (l.d_in + l.d_out) as u64).sum();
    let head = settings.architecture.head_shape().map_or(0, |(head_in, classes)| (classes * (head_in + 1)) as u64);
    let choice = rank_policy::choose(
        AdapterSize { per_rank, fixed: head },
        TrainingFootprint::estimate_with(&settings.architecture, settings.batch_size, settings.decoder_4bit),
        interpolate,
        budgets,
        settings.r_min,
        settings.r_max,
    );
    Ok(ProbeReport {
        cpu_model,
        cpu_arch: sysinfo::System::cpu_arch(),
        logical_cores,
        physical_cores: sysinfo::System::physical_core_count().ok(),
        memory_total_bytes: cgroup
            .as_ref()
            .map_or(system.total_memory(), |c| c.total_memory.min(system.total_memory())),
        memory_available_bytes: memory_available,
        cgroup_memory_limit_bytes: cgroup.map(|c| c.total_memory),
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: tch::Cuda::device_count(),
        nvml: crate::nvml::query(),
        training_device: format!("{:?}", tch::Device::cuda_if_available()),
        step_ms,
        device_class: settings.device_class.clone(),
        budgets,
        choice,
    })
}

/// Logs where training runs. A CUDA build (the x86_64-cuda archive, or a build against the full
/// libtorch) on a machine whose GPU or driver libtorch cannot use trains on the CPU: say so once,
/// as a warning, rather than leave the operator to find out from step times.
pub fn log_torch_devices() {
    let (cuda_build, cuda_available) = (tch::utils::has_cudart(), tch::Cuda::is_available());
    tracing::info!(
        cuda_build,
        cuda_available,
        cuda_devices = tch::Cuda::device_count(),
        training_on = ?tch::Device::cuda_if_available(),
        "libtorch devices"
    );
    if cuda_build && !cuda_available {
        tracing::warn!(
            "this client is built with CUDA but no CUDA device is usable here (no NVIDIA GPU, or no driver): training on the CPU"
        );
    }
}

/// Median step time at each rank, on a dedicated thread (as training runs), after 3 warm-up steps.
/// Inputs to time steps on: synthetic features, or for a transformer random token ids of the full
/// configured length (the most a step costs).
fn probe_data(architecture: &Architecture, samples: usize) -> Dataset {
    match architecture {
        Architecture::Bert(spec) => {
            let (n, length) = (samples as i64, i64::from(spec.max_length));
            let cpu = (Kind::Int64, tch::Device::Cpu);
            Dataset::tokens(
                Tensor::randint_low(1, i64::from(spec.vocab), [n, length], cpu),
                Tensor::full([n], length, cpu),
                Tensor::randint(spec.labels.len() as i64, [n], cpu),
            )
        }
        Architecture::Llama(spec) => {
            // A headline's worth of target tokens at the end of each full-length sequence.
            let (n, length) = (samples as i64, i64::from(spec.max_length));
            let cpu = (Kind::Int64, tch::Device::Cpu);
            Dataset::sequences(
                Tensor::randint_low(3, i64::from(spec.vocab), [n, length], cpu),
                Tensor::full([n], length, cpu),
                Tensor::full([n], (length - 16).max(1), cpu),
                Tensor::zeros([n], cpu),
            )
        }
        _ => synthetic_classification(samples, architecture.input_size(), architecture.classes(), 1, 2),
    }
}

fn measure_steps(settings: &ProbeSettings, ranks: &[u32]) -> anyhow::Result<BTreeMap<u32, f64>> {
    let (architecture, ranks, threads, batch, budget) =
        (settings.architecture.clone(), ranks.to_vec(), settings.threads, settings.batch_size, settings.time_budget);
    std::thread::Builder::new()
        .name("probe".into())
        .spawn(move || -> anyhow::Result<BTreeMap<u32, f64>> {
            tch::set_num_threads(threads.max(1) as i32);
            let device = tch::Device::cuda_if_available();
            let base = architecture.init_base(1);
            let data = probe_data(&architecture, batch.max(1) * 8);
            let mut out = BTreeMap::new();
            for rank in ranks {
                let adapter = architecture.init_adapter(rank as usize, 3)?;
                let mut model = LocalModel::new(&architecture, &base, &adapter, 1.0, device)?;
                const STEPS: u32 = 5; // per sample, so the optimizer's creation is amortised
                let step = TrainingSettings {
                    local_steps: STEPS,
                    local_epochs: 0,
                    batch_size: batch as u32,
                    learning_rate: 1e-3,
                    seed: 1,
                    trainable: Default::default(),
                };
                let mut times = Vec::new();
                let started = Instant::now();
                for i in 0..53 {
                    let t = Instant::now();
                    model.train_steps(&data, &step)?;
                    if i >= 3 {
                        times.push(t.elapsed().as_secs_f64() * 1e3 / f64::from(STEPS));
                    }
                    if started.elapsed() > budget && times.len() >= 5 {
                        break;
                    }
                }
                times.sort_by(f64::total_cmp);
                out.insert(rank, times[times.len() / 2]);
            }
            Ok(out)
        })
        .context("cannot start the probe thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
}
