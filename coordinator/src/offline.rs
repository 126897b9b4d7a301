//! `flotilla-coordinator aggregate`: merge PEFT adapters from disk with any method.
//!
//! The front end (`flotilla-coordinator`, no libtorch) runs RBLA, zero-padding and FedAvg on clean
//! f32 inputs itself (`flotilla_merge::offline`); this is the libtorch path for every other method
//! and every input the fast path declines, and it reports every input problem.
//!
//! Streaming, like the online path: the adapter configs are read first (ranks and scales), then each
//! client is loaded, validated, folded in and dropped, so memory holds the accumulator and one
//! client at a time (FLoRA's stacked result excepted).
//!
//! LoRA scales: a PEFT adapter computes `lora_alpha / r · B·A`. When the inputs' scales differ, each
//! client's B is rescaled into one common scale before aggregating (the scale of the largest-rank
//! input), and the output's `lora_alpha` is set so that `lora_alpha / r_out` is that scale. The
//! output metadata and the command's output say when this happened.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use flotilla_torch::adapter::{
    lora_a_name, lora_b_name, peft_shapes, tensor_role, Adapter, LoadedAdapter, PeftConfig, TensorRole,
    ADAPTER_CONFIG_FILE, NUM_SAMPLES_KEY,
};
use flotilla_torch::aggregate::{ClientUpdate, MethodExt};
use flotilla_torch::data::seeded_uniform;
use flotilla_merge::peft::MAX_RANK;
use tch::{Kind, Tensor};

pub use flotilla_coordinator_front::aggregate::AggregateArgs as OfflineRequest;
pub use flotilla_merge::offline::Report as OfflineReport;

struct ClientHeader {
    dir: PathBuf,
    config: PeftConfig,
}

fn read_config(dir: &Path) -> Result<PeftConfig> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let config: PeftConfig =
        serde_json::from_str(&text).with_context(|| format!("{}: not a valid adapter config", path.display()))?;
    if config.r == 0 || config.r > MAX_RANK {
        bail!("{}: r = {} is outside 1..={MAX_RANK}", path.display(), config.r);
    }
    if !(config.lora_alpha.is_finite() && config.lora_alpha > 0.0) {
        bail!("{}: lora_alpha must be a positive number, got {}", path.display(), config.lora_alpha);
    }
    Ok(config)
}

fn load_client(dir: &Path) -> Result<(LoadedAdapter, u64)> {
    let loaded = Adapter::load_peft(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let weights = dir.join(flotilla_torch::adapter::ADAPTER_WEIGHTS_FILE);
    if loaded.adapter.rank() != loaded.config.r {
        bail!(
            "{}: {} says r = {} but the tensors have rank {}",
            dir.display(),
            ADAPTER_CONFIG_FILE,
            loaded.config.r,
            loaded.adapter.rank()
        );
    }
    let samples = loaded.metadata.get(NUM_SAMPLES_KEY).with_context(|| {
        format!(
            "{}: no '{NUM_SAMPLES_KEY}' entry in the safetensors metadata (the client's sample count)",
            weights.display()
        )
    })?;
    let n: u64 = samples.trim().parse().ok().filter(|&n| n > 0).with_context(|| {
        format!("{}: '{NUM_SAMPLES_KEY}' must be a positive integer, got '{samples}'", weights.display())
    })?;
    Ok((loaded, n))
}

/// The starting point for the accumulator: R_max slots shaped like the tensors in `shapes` (one
/// input's header). Slots no input covers (only when `--max-rank` exceeds every input's rank) start
/// as a fresh LoRA init: A uniform ±1/√d_in, B zero, so they do not change the model and can still
/// learn. Inconsistent shapes are caught when that input is folded.
fn template(shapes: &BTreeMap<String, Vec<usize>>, max_rank: usize) -> Result<Adapter> {
    let dims = |name: &str| -> Result<(usize, usize)> {
        match shapes.get(name).map(Vec::as_slice) {
            Some(&[rows, cols]) => Ok((rows, cols)),
            Some(other) => bail!("tensor '{name}' has shape {other:?}; LoRA factors are 2-D"),
            None => bail!("tensor '{name}' is missing"),
        }
    };
    let mut tensors = BTreeMap::new();
    let mut index = 0u64;
    for (name, shape) in shapes {
        match tensor_role(name) {
            TensorRole::LoraA(module) => {
                let (_, d_in) = dims(name)?;
                let (d_out, _) = dims(&lora_b_name(module))?;
                let bound = 1.0 / (d_in as f64).sqrt();
                tensors.insert(lora_a_name(module), seeded_uniform(&[max_rank, d_in], bound, 0xada9 + index));
                tensors.insert(
                    lora_b_name(module),
                    Tensor::zeros([d_out as i64, max_rank as i64], (Kind::Float, tch::Device::Cpu)),
                );
                index += 1;
            }
            TensorRole::LoraB(_) => {}
            TensorRole::MergedDelta(_) => {
                bail!("tensor '{name}' is a merged delta (online FLoRA's global state), not part of a client update")
            }
            TensorRole::Other => {
                let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                tensors.insert(name.clone(), Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)));
            }
        }
    }
    Ok(Adapter::new(tensors)?)
}

pub fn aggregate(request: &OfflineRequest) -> Result<OfflineReport> {
    if let Ok(reason) = std::env::var(flotilla_coordinator_front::aggregate::DECLINED_ENV) {
        tracing::debug!(%reason, "the libtorch-free fast path declined this command; aggregating with libtorch");
    }
    let headers: Vec<ClientHeader> = request
        .clients
        .iter()
        .map(|dir| Ok(ClientHeader { dir: dir.clone(), config: read_config(dir)? }))
        .collect::<Result<_>>()?;
    let Some(largest) = headers.iter().max_by_key(|h| h.config.r) else {
        bail!("no client adapter directories given");
    };
    let max_input_rank = largest.config.r;
    let out_rank_slots = match request.max_rank {
        Some(r) if r > MAX_RANK => bail!("--max-rank {r} is above the largest supported rank, {MAX_RANK}"),
        Some(r) if r < max_input_rank => bail!(
            "--max-rank {r} is below the rank of {} ({max_input_rank}); it must be at least the largest input rank",
            largest.dir.display()
        ),
        Some(r) => r,
        None => max_input_rank,
    };
    let scale_of = |c: &PeftConfig| c.lora_alpha / c.r as f64;
    let target_scale = scale_of(&largest.config);
    let mut notes = Vec::new();
    if headers.iter().any(|h| (scale_of(&h.config) - target_scale).abs() > 1e-12 * target_scale) {
        notes.push(format!(
            "inputs use different LoRA scales (lora_alpha / r); B factors were rescaled to the scale {target_scale} of {}",
            largest.dir.display()
        ));
    }

    let shapes = peft_shapes(&largest.dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    // The template is sized by the largest input's declared rank: check it against its tensors
    // first, so that a config that lies about r cannot size anything.
    if let Some((name, shape)) = shapes.iter().find(|(n, _)| matches!(tensor_role(n), TensorRole::LoraA(_))) {
        if shape.first() != Some(&max_input_rank) {
            bail!(
                "{}: {} says r = {max_input_rank} but the tensors have rank {} ('{name}')",
                largest.dir.display(),
                ADAPTER_CONFIG_FILE,
                shape.first().copied().unwrap_or(0)
            );
        }
    }
    let global = template(&shapes, out_rank_slots).with_context(|| format!("{}", largest.dir.display()))?;
    let mut accumulator = request.method.start(&global, target_scale)?;
    let (mut load_s, mut fold_s) = (0.0, 0.0);
    let mut total_samples = 0u64;
    let mut ranks = Vec::with_capacity(headers.len());
    let mut base_config: Option<PeftConfig> = None;
    for header in &headers {
        let started = Instant::now();
        let (loaded, n) = load_client(&header.dir)?;
        load_s += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let client = header.dir.display().to_string();
        accumulator
            .fold(&ClientUpdate {
                client: &client,
                declared_rank: loaded.config.r,
                num_samples: n,
                scale: scale_of(&loaded.config),
                adapter: &loaded.adapter,
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        fold_s += started.elapsed().as_secs_f64();
        total_samples += n;
        ranks.push(loaded.config.r);
        base_config.get_or_insert(loaded.config);
    }
    let started = Instant::now();
    let aggregated = accumulator.finish()?;
    let finish_s = started.elapsed().as_secs_f64();
    notes.extend(aggregated.notes);
    let adapter = aggregated.adapter;
    let out_rank = adapter.rank();
    let lora_alpha = target_scale * out_rank as f64;
    let Some(mut config) = base_config else { bail!("no client adapter directories given") };
    config.r = out_rank;
    config.lora_alpha = lora_alpha;
    let mut metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("flotilla_method".to_string(), request.method.to_string()),
        ("flotilla_clients".to_string(), headers.len().to_string()),
        (NUM_SAMPLES_KEY.to_string(), total_samples.to_string()),
        ("flotilla_lora_scale".to_string(), target_scale.to_string()),
    ]);
    if !notes.is_empty() {
        metadata.insert("flotilla_notes".to_string(), notes.join("; "));
    }
    let started = Instant::now();
    adapter
        .save_peft(&request.out, &config, metadata)
        .with_context(|| format!("cannot write the result to {}", request.out.display()))?;
    tracing::debug!(load_s, fold_s, finish_s, write_s = started.elapsed().as_secs_f64(), "offline aggregation timings");
    Ok(OfflineReport { clients: headers.len(), ranks, out_rank, lora_alpha, notes, phases: Vec::new() })
}
