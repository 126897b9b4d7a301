//! `flotilla-coordinator aggregate` on the libtorch path: every method, and every input the
//! front end's fast path declines; it reports every input problem.
//!
//! The command itself (arguments, summary) is `flotilla_coordinator::aggregate`, and what
//! both paths read and decide before folding (configs, sample counts, the output's rank, scale,
//! notes and metadata, the seeds of uncovered slots) is `flotilla_merge::inputs`: only the folding
//! is this file's own.
//!
//! Streaming, like the online path: the adapter configs are read first (ranks and scales), then each
//! client is loaded, validated, folded in and dropped, so memory holds the accumulator and one
//! client at a time (FLoRA's stacked result excepted).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use flotilla_merge::inputs::{self, Plan};
use flotilla_torch::adapter::{
    lora_a_name, lora_b_name, peft_shapes, tensor_role, Adapter, LoadedAdapter, PeftConfig, TensorRole,
    ADAPTER_CONFIG_FILE,
};
use flotilla_torch::aggregate::{Aggregator, ClientUpdate, MethodExt};
use flotilla_torch::data::seeded_uniform;
use tch::{Kind, Tensor};

use flotilla_coordinator::aggregate::AggregateArgs;
pub use flotilla_merge::fast_path::Report as OfflineReport;

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
    let n = inputs::num_samples(Some(&loaded.metadata), &weights)?;
    Ok((loaded, n))
}

/// The starting point for the accumulator: R_max slots shaped like the tensors in `shapes` (one
/// input's header). Slots no input covers start as a fresh LoRA init (see
/// `inputs::uncovered_slot_seed`). Inconsistent shapes are caught when that input is folded.
fn template(shapes: &BTreeMap<String, Vec<usize>>, max_rank: usize) -> Result<Adapter> {
    let dims = |name: &str| -> Result<(usize, usize)> {
        match shapes.get(name).map(Vec::as_slice) {
            Some(&[rows, cols]) => Ok((rows, cols)),
            Some(other) => bail!("tensor '{name}' has shape {other:?}; LoRA factors are 2-D"),
            None => bail!("tensor '{name}' is missing"),
        }
    };
    let mut tensors = BTreeMap::new();
    let mut index = 0usize;
    for (name, shape) in shapes {
        match tensor_role(name) {
            TensorRole::LoraA(module) => {
                let (_, d_in) = dims(name)?;
                let (d_out, _) = dims(&lora_b_name(module))?;
                let bound = 1.0 / (d_in as f64).sqrt();
                let seed = inputs::uncovered_slot_seed(index);
                tensors.insert(lora_a_name(module), seeded_uniform(&[max_rank, d_in], bound, seed));
                tensors.insert(
                    lora_b_name(module),
                    Tensor::f_zeros([d_out as i64, max_rank as i64], (Kind::Float, tch::Device::Cpu))?,
                );
                index += 1;
            }
            TensorRole::LoraB(_) => {}
            TensorRole::MergedDelta(_) => {
                bail!("tensor '{name}' is a merged delta (online FLoRA's global state), not part of a client update")
            }
            TensorRole::Other => {
                let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
                tensors.insert(name.clone(), Tensor::f_zeros(shape, (Kind::Float, tch::Device::Cpu))?);
            }
        }
    }
    Ok(Adapter::new(tensors)?)
}

/// The accumulator, seeded from the largest input's header (whose declared rank is checked against
/// its tensors first, so that a config that lies about r cannot size anything).
fn start_accumulator(
    request: &AggregateArgs,
    largest: (&Path, &PeftConfig),
    plan: &Plan,
) -> Result<Box<dyn Aggregator>> {
    let (dir, config) = largest;
    let shapes = peft_shapes(dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some((name, shape)) = shapes.iter().find(|(n, _)| matches!(tensor_role(n), TensorRole::LoraA(_))) {
        if shape.first() != Some(&config.r) {
            bail!(
                "{}: {} says r = {} but the tensors have rank {} ('{name}')",
                dir.display(),
                ADAPTER_CONFIG_FILE,
                config.r,
                shape.first().copied().unwrap_or(0)
            );
        }
    }
    let global = template(&shapes, plan.out_rank).with_context(|| format!("{}", dir.display()))?;
    Ok(request.method.start(&global, plan.target_scale)?)
}

/// Every input adapts the same tensors as the largest one (which sizes the result), read from the
/// headers alone. A mismatch names both inputs and a tensor on each side: neither is "the wrong
/// one" until the operator says which model is meant.
fn check_same_tensors(clients: &[PathBuf], largest: usize) -> Result<()> {
    let names = |dir: &Path| -> Result<std::collections::BTreeSet<String>> {
        Ok(peft_shapes(dir).map_err(|e| anyhow::anyhow!("{e}"))?.into_keys().collect())
    };
    let reference_dir = &clients[largest];
    let reference = names(reference_dir)?;
    for dir in clients.iter().filter(|d| *d != reference_dir) {
        let own = names(dir)?;
        if own == reference {
            continue;
        }
        let side = |of: &std::collections::BTreeSet<String>, lacking: &std::collections::BTreeSet<String>| {
            let extra: Vec<&String> = of.difference(lacking).collect();
            match extra.as_slice() {
                [] => "nothing the other lacks".to_string(),
                [one] => format!("'{one}'"),
                [first, rest @ ..] => format!("'{first}' and {} more", rest.len()),
            }
        };
        bail!(
            "{} and {} adapt different tensors ({} has {}; {} has {}): they are adapters of different models or \
             target modules, which cannot be merged",
            reference_dir.display(),
            dir.display(),
            reference_dir.display(),
            side(&reference, &own),
            dir.display(),
            side(&own, &reference),
        );
    }
    Ok(())
}

pub fn aggregate(request: &AggregateArgs) -> Result<OfflineReport> {
    if let Ok(reason) = std::env::var(flotilla_coordinator::aggregate::DECLINED_ENV) {
        tracing::debug!(%reason, "the libtorch-free fast path declined this command; aggregating with libtorch");
    }
    flotilla_coordinator::aggregate::check_destination(request).map_err(anyhow::Error::msg)?;
    if request.method.needs_previous_global() {
        bail!(
            "{} fills the slots a client lacks from the previous global adapter, which `aggregate` does not take; \
             it runs in `serve` (or use {} here)",
            request.method,
            flotilla_merge::method::Method::names_where(|m| !m.needs_previous_global)
        );
    }
    let configs: Vec<(PathBuf, PeftConfig)> =
        request.clients.iter().map(|dir| Ok((dir.clone(), inputs::read_config(dir)?))).collect::<Result<_>>()?;
    let views: Vec<(&Path, &PeftConfig)> = configs.iter().map(|(d, c)| (d.as_path(), c)).collect();
    let plan = inputs::plan(&views, request.max_rank)?;
    check_same_tensors(&request.clients, plan.largest)?;
    let mut accumulator = start_accumulator(request, views[plan.largest], &plan)?;
    let (mut load_s, mut fold_s) = (0.0, 0.0);
    let mut total_samples = 0u64;
    for (dir, _) in &configs {
        let started = Instant::now();
        let (loaded, n) = load_client(dir)?;
        load_s += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let client = dir.display().to_string();
        accumulator
            .fold(&ClientUpdate {
                client: &client,
                declared_rank: loaded.config.r,
                num_samples: n,
                scale: inputs::scale(&loaded.config),
                adapter: &loaded.adapter,
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        fold_s += started.elapsed().as_secs_f64();
        total_samples += n;
    }
    let started = Instant::now();
    let aggregated = accumulator.finish()?;
    let finish_s = started.elapsed().as_secs_f64();
    let mut notes = plan.notes;
    notes.extend(aggregated.notes);
    let adapter = aggregated.adapter;
    let out_rank = adapter.rank();
    let lora_alpha = plan.target_scale * out_rank as f64;
    let mut config = configs[0].1.clone();
    config.r = out_rank;
    config.lora_alpha = lora_alpha;
    let metadata = inputs::output_metadata(request.method, configs.len(), total_samples, plan.target_scale, &notes);
    let started = Instant::now();
    adapter
        .save_peft(&request.out, &config, metadata.into_iter().collect())
        .with_context(|| format!("cannot write the result to {}", request.out.display()))?;
    tracing::debug!(load_s, fold_s, finish_s, write_s = started.elapsed().as_secs_f64(), "offline aggregation timings");
    let ranks = configs.iter().map(|(_, c)| c.r).collect();
    Ok(OfflineReport { clients: configs.len(), ranks, out_rank, lora_alpha, notes, phases: Vec::new() })
}
