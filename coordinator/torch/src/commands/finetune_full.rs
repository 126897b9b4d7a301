//! `finetune-full`: centralized full fine-tuning, the study's bound above LoRA (issue 15). One
//! process trains every weight of the configured model (base and head, no LoRA) on pooled training
//! data with the configuration's round schedule: each round a fresh AdamW takes `[round]
//! local_steps` steps, with `serve`'s seed for the round. It evaluates like `serve` (the same held-out
//! set, before round 1 and after each round) and writes `<run_dir>/summary.json` in `serve`'s
//! shape, with every evaluation at R_max: what the full model stands in for.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use flotilla_torch::data::idx::{load_split, Split};
use flotilla_torch::data::text::TextSplit;
use flotilla_torch::data::tokenizer::load_tokenized;
use flotilla_torch::data::Dataset;
use flotilla_torch::model::checkpoint::TOKENIZER_FILE;
use flotilla_torch::model::{Architecture, FullModel};
use serde_json::json;
use tch::Device;
use tracing::info;

use crate::config::CoordinatorConfig;
use crate::model::base;
use crate::model::evaluation_set::load_test_set;
use crate::serve::driver::training_settings;

/// Batches of the held-out set per forward pass.
const EVALUATION_BATCH: usize = 64;

/// The pooled training data at `dir` as a single device would load it: a transformer's texts
/// tokenized with its checkpoint's tokenizer, or an MNIST-style directory's training split.
fn load_training_data(config: &CoordinatorConfig, dir: &Path) -> Result<Dataset> {
    let architecture = &config.model.architecture;
    match (architecture, &config.model.transformer) {
        (Architecture::Bert(spec), Some(transformer)) => {
            Ok(load_tokenized(spec, dir, TextSplit::Train, &transformer.checkpoint.join(TOKENIZER_FILE))?)
        }
        _ => Ok(load_split(dir, Split::Train, architecture.classes())?),
    }
}

/// The held-out set `serve` would evaluate on.
fn test_set(config: &CoordinatorConfig) -> Result<Dataset> {
    let set = crate::model::evaluation_set::EvaluationSet::of(config, true)
        .context("finetune-full needs [evaluation] test_data")?;
    load_test_set(&config.model.architecture, &set).context("cannot load the evaluation set")
}

/// Runs the bound and returns the summary it wrote.
pub fn run(config: &CoordinatorConfig, train_dir: &Path) -> Result<serde_json::Value> {
    let run_dir = &config.server.run_dir;
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let base = base::prepare(config)?;
    let architecture = &config.model.architecture;
    let max_rank = config.aggregation.max_rank as usize;
    let initial = base.initial_adapter(config)?;
    let (head_weight, head_bias) = architecture
        .head_names()
        .context("full fine-tuning is for classifiers; a decoder run has no classifier head to train")?;
    let head = (
        initial.get(&head_weight).with_context(|| format!("the initial adapter has no {head_weight}"))?,
        initial.get(&head_bias).with_context(|| format!("the initial adapter has no {head_bias}"))?,
    );
    let test = test_set(config)?;
    let data = load_training_data(config, train_dir)
        .with_context(|| format!("cannot load the training data in {}", train_dir.display()))?;
    anyhow::ensure!(!data.is_empty(), "{}: no training samples", train_dir.display());

    let mut model = FullModel::new(architecture, &base.weights, head, Device::Cpu)?;
    info!(
        samples = data.len(),
        parameters = model.trainable_parameters(),
        rounds = config.round.rounds,
        "centralized full fine-tuning"
    );
    let evaluate = |model: &FullModel| -> Result<serde_json::Value> {
        let (loss, accuracy) = model.evaluate(&test, EVALUATION_BATCH)?;
        Ok(json!([{ "rank": max_rank, "loss": loss, "accuracy": accuracy }]))
    };
    let initial_evaluation = evaluate(&model)?;
    let policy = config.round_policy();
    let mut rounds = Vec::new();
    for round in 1..=config.round.rounds {
        let started = Instant::now();
        model.train_steps(&data, &training_settings(policy.training(round), Default::default()))?;
        let evaluation = evaluate(&model)?;
        info!(round, accuracy = evaluation[0]["accuracy"].as_f64(), "[round {round}] full fine-tuning evaluated");
        rounds.push(json!({
            "round": round,
            "evaluation": evaluation,
            "round_seconds": started.elapsed().as_secs_f64(),
            "update_bytes": 0,
            "task_bytes": 0,
        }));
    }
    let summary = json!({
        "method": "full-finetune",
        "max_rank": max_rank,
        "trainable_parameters": model.trainable_parameters(),
        "initial_evaluation": initial_evaluation,
        "rounds_completed": rounds.len(),
        "rounds": rounds,
    });
    let path = run_dir.join("summary.json");
    flotilla_wire::files::write_atomically(&path, &serde_json::to_vec_pretty(&summary)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(summary)
}
