//! `flotilla-coordinator export`: a finished round's global adapter in the PEFT layout, optionally
//! sliced to a rank, and optionally the merged full model (base + scale·B·A, head included) as one
//! safetensors file that needs no LoRA support to run.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use flotilla_torch::adapter::{peft_config_for, Adapter};
use flotilla_torch::model::{Architecture, ArchitectureExt};
use flotilla_torch::peft_lora::fold_merged_deltas;
use tch::Tensor;

use crate::config::CoordinatorConfig;
use crate::serve::checkpoint::{self, CheckpointState, STATE_FILE};

pub struct ExportRequest {
    pub out: PathBuf,
    /// The round to export (default: the last finished one).
    pub round: Option<u32>,
    /// Slice the adapter to this rank (default: R_max), e.g. to ship what a rank-2 phone gets.
    pub rank: Option<u32>,
    pub merged: bool,
}

pub struct Exported {
    pub round: u32,
    pub rank: usize,
    pub adapter_dir: PathBuf,
    pub merged_model: Option<PathBuf>,
    /// Set when merged deltas (online FLoRA's, or a Fold-and-Fill device's frozen tail) were
    /// written as plain LoRA factors of this rank.
    pub folded_rank: Option<usize>,
    /// Whether the export is a Fold-and-Fill device's model: its slice plus the folded tail.
    pub tail_folded: bool,
}

/// What a device of `rank` holds: under Fold-and-Fill (`tail_folded`) its slice with the rest of
/// the global folded into its frozen weight (a plain slice would be a model no device runs);
/// otherwise the slice.
fn held_at_rank(global: Adapter, rank: usize, scale: f64, tail_folded: bool) -> Result<Adapter> {
    Ok(if rank == global.rank() {
        global
    } else if tail_folded {
        global.slice_with_folded_tail(rank, scale)?
    } else {
        global.slice_to_rank(rank)?
    })
}

/// A finished round's global adapter as a device of `rank` holds it: the round (default: the last
/// finished one), the rank (default: R_max), the adapter, and whether its tail is folded.
pub struct HeldAdapter {
    pub round: u32,
    pub method: String,
    pub max_rank: usize,
    pub rank: usize,
    pub tail_folded: bool,
    pub adapter: Adapter,
}

pub fn held_adapter(config: &CoordinatorConfig, round: Option<u32>, rank: Option<u32>) -> Result<HeldAdapter> {
    let run_dir = &config.server.run_dir;
    let (dir, state) = match round {
        None => checkpoint::latest(run_dir)?
            .with_context(|| format!("{}: no finished round to export yet", run_dir.display()))?,
        Some(round) => {
            let dir = checkpoint::checkpoint_dir(run_dir, round);
            let text = std::fs::read(dir.join(STATE_FILE))
                .with_context(|| format!("round {round} has no finished checkpoint in {}", run_dir.display()))?;
            let state: CheckpointState = serde_json::from_slice(&text)
                .with_context(|| format!("{}: unreadable state", dir.join(STATE_FILE).display()))?;
            (dir, state)
        }
    };
    let global = checkpoint::resume(&dir, &state, config)?;
    let max_rank = global.rank();
    let rank = rank.map_or(max_rank, |r| r as usize);
    if rank == 0 || rank > max_rank {
        bail!("--rank {rank}: the global adapter has rank {max_rank}; ask for 1..={max_rank}");
    }
    let scale = config.aggregation.scale();
    let tail_folded = rank < max_rank && config.aggregation.method.folds_tail();
    let adapter = held_at_rank(global, rank, scale, tail_folded)?;
    Ok(HeldAdapter { round: state.round, method: state.method, max_rank, rank, tail_folded, adapter })
}

pub fn export(config: &CoordinatorConfig, request: &ExportRequest) -> Result<Exported> {
    let HeldAdapter { round, method, max_rank, rank, tail_folded, adapter } =
        held_adapter(config, request.round, request.rank)?;
    let scale = config.aggregation.scale();
    let mut metadata = HashMap::from([
        ("round".to_string(), round.to_string()),
        ("method".to_string(), method.clone()),
        ("max_rank".to_string(), max_rank.to_string()),
    ]);
    if tail_folded {
        metadata.insert("fold_and_fill_device_rank".into(), rank.to_string());
    }
    // Merged deltas (online FLoRA's, or a Fold-and-Fill device's frozen tail) have no place in
    // PEFT's layout: the file gets a plain LoRA of the same function instead (flotilla_torch::peft_lora).
    let folded = if adapter.merged_delta_names().next().is_some() {
        let plain = fold_merged_deltas(&adapter, scale)?;
        metadata.insert("merged_deltas_folded".into(), format!("largest error {:.3e}", plain.largest_error));
        Some(plain)
    } else {
        None
    };
    let peft_adapter = folded.as_ref().map_or(&adapter, |plain| &plain.adapter);
    let folded_rank = folded.as_ref().map(|plain| plain.adapter.rank());
    // One scale for every rank: lora_alpha / R_max. PEFT computes lora_alpha / r, so an adapter of
    // another rank r gets alpha = scale·r.
    let peft_alpha = scale * peft_adapter.rank() as f64;
    let adapter_dir = request.out.join("adapter");
    let mut peft_config = peft_config_for(peft_adapter, peft_alpha);
    if let Some(transformer) = &config.model.transformer {
        // What PeftModel.from_pretrained needs to rebuild a sequence classifier over the base.
        peft_config.task_type = Some("SEQ_CLS".into());
        peft_config.base_model_name_or_path = Some(transformer.checkpoint.display().to_string());
    }
    if let Some(decoder) = &config.model.decoder {
        // A causal LM over the GGUF's model (HF loads it with `gguf_file=`).
        peft_config.task_type = Some("CAUSAL_LM".into());
        peft_config.base_model_name_or_path = Some(decoder.gguf.display().to_string());
    }
    peft_adapter
        .save_peft(&adapter_dir, &peft_config, metadata)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", adapter_dir.display()))?;

    let merged_model = if request.merged {
        let base = crate::model::base::prepare(config)?;
        let merged = config.model.architecture.merge(&base.weights, &adapter, scale)?;
        if let (Architecture::Bert(spec), Some(transformer)) = (&config.model.architecture, &config.model.transformer) {
            let dir = request.out.join("merged");
            crate::model::hf_model::write_merged(&dir, spec, &merged, &transformer.checkpoint)?;
            let merged_model = Some(dir);
            return Ok(Exported { round, rank, adapter_dir, merged_model, folded_rank, tail_folded });
        }
        if let (Architecture::Llama(spec), Some(decoder)) = (&config.model.architecture, &config.model.decoder) {
            let dir = request.out.join("merged");
            crate::model::hf_decoder::write_merged_decoder(&dir, spec, &merged, &decoder.gguf)?;
            let merged_model = Some(dir);
            return Ok(Exported { round, rank, adapter_dir, merged_model, folded_rank, tail_folded });
        }
        let path = request.out.join("model.safetensors");
        let named: Vec<(&str, &Tensor)> = merged.iter().map(|(n, t)| (n.as_str(), t)).collect();
        crate::model::base::write_safetensors_atomically(&path, &named)?;
        let architecture = serde_json::to_string_pretty(&config.model.architecture)?;
        std::fs::write(request.out.join("model.json"), architecture)
            .with_context(|| format!("cannot write {}", request.out.join("model.json").display()))?;
        Some(path)
    } else {
        None
    };
    Ok(Exported { round, rank, adapter_dir, merged_model, folded_rank, tail_folded })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_torch::model::LoraModel;
    use tch::{Device, Kind};

    /// A run directory holding one finished round of a 12-16-10-3 MLP at R_max 4 under `method`:
    /// the config, the base, and the global adapter (the initial one with B made non-zero, plus
    /// whatever `extra` adds) checkpointed as `round`.
    fn checkpointed(
        method: &str,
        round: u32,
        extra: impl Fn(&Adapter, &mut std::collections::BTreeMap<String, Tensor>),
    ) -> (tempfile::TempDir, CoordinatorConfig, crate::model::base::Base, Adapter) {
        let dir = tempfile::tempdir().unwrap();
        let mut config: CoordinatorConfig = toml::from_str(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{}\"\n[tls]\nkit = \"k\"\n\
             [aggregation]\nmethod = \"{method}\"\n[model.architecture.mlp]\ninput = 12\nhidden = [10]\nclasses = 3\n",
            dir.path().display()
        ))
        .unwrap();
        config.aggregation.max_rank = 4;
        let base = crate::model::base::prepare(&config).unwrap();
        let initial = base.initial_adapter(&config).unwrap();
        let mut tensors = initial
            .tensors()
            .iter()
            .map(|(n, t)| (n.clone(), if n.contains("lora_B") { t.rand_like() * 0.1 } else { t.copy() }))
            .collect();
        extra(&initial, &mut tensors);
        let global = Adapter::new(tensors).unwrap();
        let state = CheckpointState {
            round,
            method: method.into(),
            fingerprint: checkpoint::fingerprint(&config),
            record: None,
        };
        checkpoint::write(dir.path(), &state, &global, &peft_config_for(&global, 16.0), HashMap::new()).unwrap();
        (dir, config, base, global)
    }

    #[test]
    fn the_merged_export_computes_what_the_base_and_the_exported_adapter_compute() {
        let (dir, config, base, _) = checkpointed("rbla", 2, |_, _| {});
        let architecture = config.model.architecture.clone();
        let out = dir.path().join("export");
        let done =
            export(&config, &ExportRequest { out: out.clone(), round: None, rank: Some(2), merged: true }).unwrap();
        assert_eq!((done.round, done.rank), (2, 2));
        let loaded = flotilla_torch::adapter::Adapter::load_peft(&done.adapter_dir).unwrap();
        assert_eq!(loaded.adapter.rank(), 2);
        let merged: std::collections::BTreeMap<String, Tensor> =
            Tensor::read_safetensors(done.merged_model.unwrap()).unwrap().into_iter().collect();
        let x = Tensor::randn([5, 12], (Kind::Float, Device::Cpu));
        let scale = 16.0 / 4.0;
        let lora = LoraModel::new(&architecture, &base.weights, &loaded.adapter, scale, Device::Cpu)
            .unwrap()
            .forward(&x, None)
            .unwrap();
        let plain = architecture.forward_merged(&merged, &x, None).unwrap();
        assert!((lora - plain).abs().max().double_value(&[]) < 1e-5);
        let err = export(&config, &ExportRequest { out, round: Some(9), rank: None, merged: false }).err().unwrap();
        assert!(format!("{err:#}").contains("round 9 has no finished checkpoint"), "{err:#}");
    }

    #[test]
    fn an_online_flora_global_exports_as_a_plain_peft_lora_of_the_same_function() {
        let (dir, config, base, global) = checkpointed("flora", 3, |initial, tensors| {
            for module in initial.modules() {
                let (a, b) = initial.factors(module);
                let delta = Tensor::randn([b.size()[0], a.size()[1]], (Kind::Float, Device::Cpu)) * 0.05;
                tensors.insert(flotilla_torch::adapter::merged_delta_name(module), delta);
            }
        });
        let out = dir.path().join("export");
        let done = export(&config, &ExportRequest { out, round: None, rank: Some(2), merged: false }).unwrap();
        let loaded = flotilla_torch::adapter::Adapter::load_peft(&done.adapter_dir).unwrap();
        assert_eq!(loaded.adapter.merged_delta_names().count(), 0, "PEFT has no place for merged deltas");
        assert_eq!(done.folded_rank, Some(loaded.adapter.rank()));
        assert!(loaded.metadata["merged_deltas_folded"].starts_with("largest error"));
        // PEFT runs the file at lora_alpha / r; the device of rank 2 runs its slice plus ΔW at 16 / 4.
        let peft_scale = loaded.config.lora_alpha / loaded.config.r as f64;
        let architecture = &config.model.architecture;
        let x = Tensor::randn([5, 12], (Kind::Float, Device::Cpu));
        let slice = global.slice_to_rank(2).unwrap();
        let device = LoraModel::new(architecture, &base.weights, &slice, 16.0 / 4.0, Device::Cpu).unwrap();
        let peft = LoraModel::new(architecture, &base.weights, &loaded.adapter, peft_scale, Device::Cpu).unwrap();
        let difference = (device.forward(&x, None).unwrap() - peft.forward(&x, None).unwrap()).abs().max();
        assert!(difference.double_value(&[]) < 1e-5, "{difference}");
    }

    /// Under Fold-and-Fill a rank-2 device runs its slice plus the folded rest of the global: the
    /// export at rank 2 is that model (here, the whole global's function), not the truncation.
    #[test]
    fn a_fold_and_fill_export_at_a_rank_is_what_a_device_of_that_rank_runs() {
        let (dir, config, base, global) = checkpointed("fold-and-fill", 1, |_, _| {});
        let out = dir.path().join("export");
        let done = export(&config, &ExportRequest { out, round: None, rank: Some(2), merged: false }).unwrap();
        assert!(done.tail_folded);
        let loaded = flotilla_torch::adapter::Adapter::load_peft(&done.adapter_dir).unwrap();
        assert_eq!(loaded.metadata["fold_and_fill_device_rank"], "2");
        let peft_scale = loaded.config.lora_alpha / loaded.config.r as f64;
        let architecture = &config.model.architecture;
        let x = Tensor::randn([7, 12], (Kind::Float, Device::Cpu));
        let run = |adapter: &flotilla_torch::adapter::Adapter, scale: f64| {
            LoraModel::new(architecture, &base.weights, adapter, scale, Device::Cpu).unwrap().forward(&x, None).unwrap()
        };
        let device = run(&global.slice_with_folded_tail(2, 16.0 / 4.0).unwrap(), 16.0 / 4.0);
        let exported = run(&loaded.adapter, peft_scale);
        let gap = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
        assert!(gap(&device, &exported) < 1e-5, "the export runs what the device runs");
        let truncated = run(&global.slice_to_rank(2).unwrap(), 16.0 / 4.0);
        assert!(gap(&truncated, &exported) > 1e-3, "and not the plain truncation");
    }
}
