//! One cell of the study: the coordinator's configuration and the simulator's arguments for it,
//! run through the real processes.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{Context, Result};

use super::{Arm, Cell, Phase, Plan, Task, TaskKind, PUBLIC_IMAGES, VALIDATION_IMAGES};
use crate::cell::{run_full_finetune, run_processes, RunBasics, Setup};

// Long function: the configuration's task-specific sections as one TOML template per task kind,
// kept whole so that each reads as the file it writes.
fn coordinator_config(plan: &Plan, cell: &Cell, task: &Task, data: &Path, pki: &Path, run_dir: &Path) -> String {
    let centralized = cell.arm.is_centralized();
    let devices = plan.devices(cell.arm);
    // The centralized device takes the whole fleet's steps: the same sample budget.
    let local_steps = if centralized { cell.local_steps * plan.fleet_size() } else { cell.local_steps };
    let max_rank = cell.arm.max_rank(plan.max_rank());
    let lora_alpha = plan.scale * f64::from(max_rank);
    let mut config = RunBasics {
        run_dir,
        pki,
        rounds: plan.rounds,
        devices,
        deadline_secs: 3600,
        local_steps,
        batch_size: plan.batch_size,
        learning_rate: cell.learning_rate,
        method: cell.arm.method(),
        max_rank,
        lora_alpha,
        round_extra: String::new(),
        aggregation_extra: String::new(),
    }
    .toml();
    match &task.kind {
        TaskKind::Text { labels, max_length, .. } | TaskKind::Headlines { labels, max_length, .. } => {
            let labels = labels.iter().map(|l| format!("\"{l}\"")).collect::<Vec<_>>().join(", ");
            // The encoder from its checkpoint directory, or the decoder from its GGUF file.
            let model = match task.kind {
                TaskKind::Headlines { .. } => format!(
                    "[model.decoder]\ngguf = \"{}\"\ntarget_modules = [\"q_proj\", \"v_proj\"]\nrouge_samples = 16\n",
                    flotilla_data::cache::smollm2_file().display()
                ),
                _ => format!(
                    "[model.transformer]\ncheckpoint = \"{}\"\ntarget_modules = [\"query\", \"value\"]\n",
                    flotilla_data::cache::minilm_dir().display()
                ),
            };
            config += &format!(
                r#"
[evaluation]
test_data = "{data}"
max_samples = {eval_samples}
# The study's evaluation files are already seeded samples (hash order), and its image windows
# must not overlap: the first `max_samples` as written.
sample = "first"

[model]
seed = {seed}
{model}labels = [{labels}]
max_length = {max_length}
"#,
                data = data.display(),
                eval_samples = plan.eval_samples,
                seed = cell.seed,
            );
        }
        TaskKind::RotatedImages => {
            let skip = match cell.phase {
                Phase::Tune => PUBLIC_IMAGES,
                Phase::Final => PUBLIC_IMAGES + VALIDATION_IMAGES,
            };
            config += &format!(
                r#"
[evaluation]
test_data = "{data}"
skip_samples = {skip}
max_samples = {eval_samples}
sample = "first"

[model]
seed = {seed}
[model.pretrain]
data = "{data}"
samples = {PUBLIC_IMAGES}
steps = 100
batch_size = 64
learning_rate = 0.002
[model.architecture.mlp]
input = 784
hidden = [128, 64]
classes = 10
"#,
                data = data.display(),
                eval_samples = plan.eval_samples.min(VALIDATION_IMAGES),
                seed = cell.seed,
            );
        }
    }
    if let (Arm::Private { epsilon, .. }, Some(clip_norm)) = (cell.arm, cell.clip_norm) {
        let delta = super::privacy_delta(plan);
        let noise = super::noise_for(f64::from(epsilon), plan.rounds, delta);
        config += &format!(
            "\n[privacy]\nclip_norm = {clip_norm}\nnoise_multiplier = {noise}\nepsilon = {epsilon}\ndelta = {delta}\n"
        );
    }
    config
}

pub(super) fn profile_mix(plan: &Plan, arm: Arm) -> String {
    plan.fleet
        .iter()
        .map(|&(class, rank, n)| match arm {
            Arm::Homogeneous(all) => format!("{class}:{all}={n}"),
            _ => format!("{class}:{rank}={n}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub fn run_cell(plan: &Plan, cell: &Cell, setup: &Setup) -> Result<(serde_json::Value, f64)> {
    let task = plan.task(cell.task).with_context(|| format!("no task {}", cell.task))?;
    let data = match task.kind {
        TaskKind::Text { .. } | TaskKind::Headlines { .. } => {
            setup.work.join("data").join(task.key).join(cell.phase.key())
        }
        TaskKind::RotatedImages => setup.work.join("data").join(task.key),
    };
    let pki = setup.pki();
    if cell.arm == Arm::FullFineTune {
        return run_full_finetune(
            setup,
            &plan.cell_key(cell),
            |run_dir| coordinator_config(plan, cell, task, &data, &pki, run_dir),
            &data,
        );
    }
    let mut sim: Vec<OsString> = vec!["--data".into(), data.clone().into()];
    let devices = plan.devices(cell.arm) as usize;
    match task.kind {
        TaskKind::Text { .. } => sim.extend(["--model-dir".into(), flotilla_data::cache::minilm_dir().into()]),
        TaskKind::Headlines { .. } => {
            let gguf = flotilla_data::cache::smollm2_file();
            let dir = gguf.parent().map(Path::to_path_buf).unwrap_or_default();
            sim.extend(["--model-dir".into(), dir.into()]);
        }
        TaskKind::RotatedImages => {}
    }
    match (cell.arm, cell.skew) {
        (Arm::Centralized(rank), _) => {
            sim.extend(["--clients".into(), "1".into(), "--profile-mix".into(), format!("gpu:{rank}=1").into()]);
        }
        (arm, skew) => {
            let skew = skew.context("a federated cell needs a skew")?;
            sim.extend(["--clients".into(), plan.fleet_size().to_string().into()]);
            sim.extend(["--profile-mix".into(), profile_mix(plan, arm).into()]);
            sim.extend(["--partition".into(), format!("dirichlet:{}", skew.alpha).into()]);
            sim.extend(["--partition-seed".into(), cell.seed.to_string().into()]);
            if skew.share_power > 0.0 {
                sim.extend(["--data-share-by-rank".into(), skew.share_power.to_string().into()]);
            }
        }
    }
    run_processes(
        setup,
        &plan.cell_key(cell),
        |run_dir| coordinator_config(plan, cell, task, &data, &pki, run_dir),
        &sim,
        devices,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::second::{Arm, Phase, BBC_HEADLINES, BBC_NEWS};

    /// The lines of `config`'s section `name` (up to the next section header).
    fn section<'a>(config: &'a str, name: &str) -> Vec<&'a str> {
        let mut lines = config.lines().skip_while(|l| l.trim() != name);
        lines.next().expect(name);
        lines.take_while(|l| !l.starts_with('[')).collect()
    }

    #[test]
    fn text_cells_configure_the_encoder_and_headline_cells_the_decoder() {
        for (plan, task, section_name, model_line) in [
            (Plan::text(), BBC_NEWS, "[model.transformer]", "checkpoint = "),
            (Plan::headlines(), BBC_HEADLINES, "[model.decoder]", "gguf = "),
        ] {
            let cell = Cell {
                task: task.key,
                phase: Phase::Tune,
                skew: None,
                arm: Arm::Method("fold-and-fill"),
                learning_rate: 1e-3,
                local_steps: plan.local_steps[0],
                clip_norm: None,
                seed: 1,
            };
            let config =
                coordinator_config(&plan, &cell, &task, Path::new("/data"), Path::new("/pki"), Path::new("/run"));
            let model = section(&config, section_name);
            assert!(model.iter().any(|l| l.starts_with(model_line)), "{config}");
            assert!(model.iter().any(|l| l.starts_with("labels = [\"business\"")), "{config}");
            assert!(model.iter().any(|l| l.starts_with("max_length = ")), "{config}");
            assert!(section(&config, "[evaluation]").contains(&"test_data = \"/data\""), "{config}");
        }
    }
}
