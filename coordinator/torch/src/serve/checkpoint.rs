//! Crash-safe checkpoints. Each finished round's global adapter is a checkpoint directory
//! `<run_dir>/global/round-N/` (PEFT layout plus `state.json`), written in `round-N.tmp/`, fsynced
//! and renamed into place, so a crash at any point leaves either the complete checkpoint or a
//! `.tmp` directory that resume ignores. The coordinator resumes from the newest complete one.
//!
//! What a checkpoint holds: the global adapter, the round, the method and a fingerprint of the
//! configuration that must not change across a restart (architecture, model seed, R_max,
//! lora_alpha). Training seeds are derived from (model seed, round), so no other RNG state exists.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flotilla_torch::adapter::{write_atomically, Adapter, PeftConfig};
use serde::{Deserialize, Serialize};

use crate::config::CoordinatorConfig;
use crate::records::report::RoundRecord;

pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub round: u32,
    pub method: String,
    pub fingerprint: String,
    /// What happened in the round (updates, evaluation), kept with its adapter so a restart never
    /// loses it.
    #[serde(default)]
    pub record: Option<RoundRecord>,
}

/// FNV-1a over the canonical JSON of the settings a resumed run must share with its checkpoint.
pub fn fingerprint(config: &CoordinatorConfig) -> String {
    let mut identity = serde_json::json!({
        "architecture": config.model.architecture,
        "seed": config.model.seed,
        "max_rank": config.aggregation.max_rank,
        "lora_alpha": config.aggregation.lora_alpha,
    });
    // Only when set, so that runs without pretraining keep their fingerprints.
    if let Some(pretrain) = &config.model.pretrain {
        identity["pretrain"] = serde_json::json!(pretrain);
    }
    // A run resumed under other privacy settings would spend a budget its earlier rounds did not
    // account for.
    if let Some(privacy) = &config.privacy {
        identity["privacy"] = serde_json::json!(privacy);
        identity["fraction"] = serde_json::json!(config.round.fraction);
    }
    flotilla_wire::fingerprint::fnv1a_hex(identity.to_string().as_bytes())
}

fn global_root(run_dir: &Path) -> PathBuf {
    run_dir.join("global")
}

pub fn checkpoint_dir(run_dir: &Path, round: u32) -> PathBuf {
    global_root(run_dir).join(format!("round-{round}"))
}

/// Writes the checkpoint of `round` atomically; returns its directory.
pub fn write(
    run_dir: &Path,
    state: &CheckpointState,
    global: &Adapter,
    config: &PeftConfig,
    metadata: HashMap<String, String>,
) -> Result<PathBuf> {
    let done = checkpoint_dir(run_dir, state.round);
    let tmp = done.with_extension("tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    }
    global.save_peft(&tmp, config, metadata).map_err(|e| anyhow::anyhow!("{e}"))?;
    let state_json = serde_json::to_vec_pretty(state)?;
    write_atomically(&tmp.join(STATE_FILE), &state_json).map_err(|e| anyhow::anyhow!("{e}"))?;
    sync_dir(&tmp)?;
    crate::serve::crash_points::point("mid-checkpoint", state.round);
    if done.exists() {
        // A round re-run after a crash that happened after its rename: replace it.
        fs::remove_dir_all(&done).with_context(|| format!("cannot replace {}", done.display()))?;
    }
    fs::rename(&tmp, &done).with_context(|| format!("cannot move {} into place", tmp.display()))?;
    sync_dir(&global_root(run_dir))?;
    Ok(done)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))
}

/// The newest complete checkpoint, if any: its directory and state. Incomplete (`.tmp`) directories
/// and directories without a readable state are skipped.
pub fn latest(run_dir: &Path) -> Result<Option<(PathBuf, CheckpointState)>> {
    find(run_dir, None)
}

/// The complete checkpoint of round `only` (or with `None`, the newest), if there is one.
pub fn find(run_dir: &Path, only: Option<u32>) -> Result<Option<(PathBuf, CheckpointState)>> {
    let root = global_root(run_dir);
    let entries = match fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", root.display())),
    };
    let mut best: Option<(PathBuf, CheckpointState)> = None;
    for entry in entries {
        let path = entry?.path();
        let Some(round) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("round-"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = fs::read(path.join(STATE_FILE)) else { continue };
        match serde_json::from_slice::<CheckpointState>(&text) {
            Ok(state) if state.round == round && only.is_none_or(|wanted| wanted == round) => {
                if best.as_ref().is_none_or(|(_, b)| state.round > b.round) {
                    best = Some((path, state));
                }
            }
            _ => tracing::warn!(path = %path.display(), "ignoring a checkpoint with an unreadable state"),
        }
    }
    Ok(best)
}

/// The round records kept in the checkpoints of rounds `1..=upto`, in order (rounds whose checkpoint
/// has no record are left out), with each round's test results when its evaluation finished.
pub fn records(run_dir: &Path, upto: u32) -> Vec<RoundRecord> {
    (1..=upto)
        .filter_map(|round| {
            let dir = checkpoint_dir(run_dir, round);
            let text = fs::read(dir.join(STATE_FILE)).ok()?;
            let mut record = serde_json::from_slice::<CheckpointState>(&text).ok()?.record?;
            if let Some(results) = fs::read(dir.join(crate::model::evaluation::EVALUATION_FILE))
                .ok()
                .and_then(|t| serde_json::from_slice(&t).ok())
            {
                record.evaluation = results;
            }
            Some(record)
        })
        .collect()
}

/// Loads a checkpoint's global adapter and checks it against the current configuration.
pub fn resume(dir: &Path, state: &CheckpointState, config: &CoordinatorConfig) -> Result<Adapter> {
    let expected = fingerprint(config);
    if state.fingerprint != expected {
        bail!(
            "the configuration changed incompatibly since the checkpoint in {} (model architecture, model \
             seed, pretraining, max_rank or lora_alpha differ); restore the old settings, or start over with --fresh",
            dir.display()
        );
    }
    // Not in the fingerprint, whose older values must still match: the method is in the state.
    let method = config.aggregation.method;
    if state.method != method.name() {
        bail!(
            "the checkpoint in {} was made with method \"{}\" and the configuration now runs \"{method}\"{}; a run \
             keeps its method: set [aggregation] method = \"{}\" to resume it, or start over with --fresh",
            dir.display(),
            state.method,
            method.default_note(),
            state.method
        );
    }
    let loaded = Adapter::load_peft(dir).map_err(|e| anyhow::anyhow!("cannot load checkpoint: {e}"))?;
    if loaded.adapter.rank() != config.aggregation.max_rank as usize {
        bail!(
            "{}: checkpoint has rank {}, expected R_max {}",
            dir.display(),
            loaded.adapter.rank(),
            config.aggregation.max_rank
        );
    }
    Ok(loaded.adapter)
}

/// `--fresh`: moves earlier checkpoints aside (never deletes them) so the new run starts at round 1.
pub fn set_aside(run_dir: &Path) -> Result<Option<PathBuf>> {
    let root = global_root(run_dir);
    if !root.exists() {
        return Ok(None);
    }
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let aside = run_dir.join(format!("global.before-{stamp}"));
    fs::rename(&root, &aside).with_context(|| format!("cannot move {} aside", root.display()))?;
    Ok(Some(aside))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_torch::adapter::peft_config_for;
    use flotilla_torch::model::{Architecture, ArchitectureExt};

    fn config(dir: &Path) -> CoordinatorConfig {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{}\"\n[tls]\nkit = \"k\"\n[model.architecture.mlp]\ninput = 8\nhidden = [4]\nclasses = 3\n",
            dir.display()
        );
        toml::from_str(&text).unwrap()
    }

    fn save(dir: &Path, config: &CoordinatorConfig, round: u32, global: &Adapter) {
        let method = config.aggregation.method.name().into();
        let state = CheckpointState { round, method, fingerprint: fingerprint(config), record: None };
        write(dir, &state, global, &peft_config_for(global, 16.0), HashMap::new()).unwrap();
    }

    #[test]
    fn resume_takes_the_newest_complete_checkpoint_and_ignores_torn_ones() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let arch = Architecture::Mlp { input: 8, hidden: vec![4], classes: 3 };
        let g1 = arch.init_adapter(8, 1).unwrap();
        let g2 = arch.init_adapter(8, 2).unwrap();
        save(dir.path(), &config, 1, &g1);
        save(dir.path(), &config, 2, &g2);
        // A crash mid-checkpoint of round 3 leaves a .tmp directory; one after the rename but with a
        // broken state is skipped too.
        fs::create_dir_all(dir.path().join("global/round-3.tmp")).unwrap();
        fs::create_dir_all(dir.path().join("global/round-4")).unwrap();
        fs::write(dir.path().join("global/round-4/state.json"), b"{ torn").unwrap();
        let (path, state) = latest(dir.path()).unwrap().unwrap();
        assert_eq!(state.round, 2);
        let resumed = resume(&path, &state, &config).unwrap();
        for (name, t) in g2.tensors() {
            assert!(t.equal(resumed.get(name).unwrap()), "{name}");
        }
        // Re-writing round 3 over the leftover .tmp works.
        save(dir.path(), &config, 3, &g2);
        assert_eq!(latest(dir.path()).unwrap().unwrap().1.round, 3);
    }

    #[test]
    fn an_incompatible_config_is_refused_and_fresh_sets_old_checkpoints_aside() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let g = Architecture::Mlp { input: 8, hidden: vec![4], classes: 3 }.init_adapter(8, 1).unwrap();
        save(dir.path(), &config, 1, &g);
        let mut changed = config.clone();
        changed.aggregation.max_rank = 16;
        let (path, state) = latest(dir.path()).unwrap().unwrap();
        let err = resume(&path, &state, &changed).unwrap_err().to_string();
        assert!(err.contains("changed incompatibly") && err.contains("--fresh"), "{err}");
        // A run made by RBLA, resumed by a configuration that names no method (Fold-and-Fill now).
        let rbla = CheckpointState { method: "rbla".into(), ..state.clone() };
        let err = resume(&path, &rbla, &config).unwrap_err().to_string();
        assert!(err.contains("\"fold-and-fill\" (the default)") && err.contains("method = \"rbla\""), "{err}");
        let aside = set_aside(dir.path()).unwrap().unwrap();
        assert!(aside.join("round-1/state.json").exists());
        assert!(latest(dir.path()).unwrap().is_none());
    }

    #[test]
    fn no_checkpoint_is_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(latest(dir.path()).unwrap().is_none());
    }
}
