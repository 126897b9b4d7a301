//! The frozen base model every participant shares. Without `[model.pretrain]` it is a seeded
//! random initialisation; with it, the coordinator first trains the whole model centrally on public
//! data the devices do not hold, and the pretrained head becomes the initial global head. The result
//! is kept in `<run_dir>/base/` (model.safetensors + fingerprint) and reused by restarts and `export`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use flotilla_torch::adapter::{write_atomically, Adapter};
use flotilla_torch::data::idx::{load_split, Split};
use flotilla_torch::data::Dataset;
use flotilla_torch::model::ArchitectureExt;
use flotilla_torch::model::{with_head, BaseWeights, PretrainSettings, HEAD_BIAS, HEAD_WEIGHT};
use tch::Tensor;
use tracing::info;

use crate::config::{CoordinatorConfig, DecoderSection, PretrainSection, TransformerSection};
use flotilla_torch::model::checkpoint::{sha256_file, HfCheckpoint, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use flotilla_torch::model::Architecture;
use flotilla_wire::protocol::CheckpointFile;

pub struct Base {
    pub weights: BaseWeights,
    /// The pretrained head, when the base was pretrained.
    pub head: Option<(Tensor, Tensor)>,
    /// Identifies the base in `Welcome` and round tasks.
    pub version: String,
    /// For a transformer: the checkpoint directory and its files' digests, which devices are sent
    /// instead of the weights and may fetch.
    pub checkpoint: Option<ServedCheckpoint>,
}

/// A checkpoint directory whose files devices may fetch, by name and digest.
#[derive(Debug, Clone)]
pub struct ServedCheckpoint {
    pub dir: PathBuf,
    pub files: Vec<CheckpointFile>,
}

/// The files a device needs of a checkpoint.
pub const CHECKPOINT_FILES: [&str; 3] = [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE];

/// Loads the configured transformer checkpoint, checks its weights' digest against the pin, and
/// names the base by that digest.
fn prepare_transformer(config: &CoordinatorConfig, transformer: &TransformerSection) -> Result<Base> {
    let Architecture::Bert(spec) = &config.model.architecture else {
        anyhow::bail!("[model.transformer] is set but the configuration was not resolved against its checkpoint");
    };
    let checkpoint = HfCheckpoint::open(&transformer.checkpoint)?;
    let mut files = Vec::new();
    for name in CHECKPOINT_FILES {
        let path = checkpoint.dir.join(name);
        let size = std::fs::metadata(&path).with_context(|| format!("cannot read {}", path.display()))?.len();
        files.push(CheckpointFile { name: name.to_string(), size, sha256: sha256_file(&path)? });
    }
    let weights_digest = files.iter().find(|f| f.name == WEIGHTS_FILE).map(|f| f.sha256.clone()).unwrap_or_default();
    if let Some(pinned) = &transformer.sha256 {
        anyhow::ensure!(
            pinned.eq_ignore_ascii_case(&weights_digest),
            "{}: sha256 is {weights_digest}, but model.transformer.sha256 pins {pinned}",
            checkpoint.weights_path().display()
        );
    }
    let weights = checkpoint.load_weights(spec)?;
    info!(checkpoint = %checkpoint.dir.display(), sha256 = %weights_digest, "using the pretrained transformer");
    Ok(Base {
        weights,
        head: None,
        version: format!("sha256:{weights_digest}"),
        checkpoint: Some(ServedCheckpoint { dir: checkpoint.dir.clone(), files }),
    })
}

/// Loads the configured decoder's GGUF file (dequantized), checks its digest against the pin, and
/// serves that one file to devices, naming the base by its digest.
fn prepare_decoder(decoder: &DecoderSection) -> Result<Base> {
    let path = &decoder.gguf;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("model.decoder.gguf {} has no file name", path.display()))?
        .to_string();
    let size = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    let digest = sha256_file(path)?;
    if let Some(pinned) = &decoder.sha256 {
        anyhow::ensure!(
            pinned.eq_ignore_ascii_case(&digest),
            "{}: sha256 is {digest}, but model.decoder.sha256 pins {pinned}",
            path.display()
        );
    }
    let file = flotilla_torch::gguf::GgufFile::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let (_, weights) = flotilla_torch::model::llama::load_base(&file).with_context(|| path.display().to_string())?;
    info!(gguf = %path.display(), sha256 = %digest, "using the pretrained decoder");
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Base {
        weights,
        head: None,
        version: format!("sha256:{digest}"),
        checkpoint: Some(ServedCheckpoint { dir, files: vec![CheckpointFile { name, size, sha256: digest }] }),
    })
}

impl Base {
    /// The initial global adapter at R_max: seeded, with the pretrained head when there is one.
    pub fn initial_adapter(&self, config: &CoordinatorConfig) -> Result<Adapter> {
        let adapter =
            config.model.architecture.init_adapter(config.aggregation.max_rank as usize, config.model.seed)?;
        Ok(match &self.head {
            Some((weight, bias)) => with_head(&config.model.architecture, &adapter, weight, bias)?,
            None => adapter,
        })
    }
}

/// Writes tensors as safetensors via a temporary file, fsynced and renamed into place: a reader
/// never sees half a file.
pub fn write_safetensors_atomically(path: &Path, named: &[(&str, &Tensor)]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = flotilla_wire::files::temporary_beside(path);
    Tensor::write_safetensors(named, &tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    flotilla_wire::files::commit(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn base_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("base")
}

/// What determines the base: a different value means a different base.
fn fingerprint(config: &CoordinatorConfig) -> String {
    let identity = serde_json::json!({
        "architecture": config.model.architecture,
        "seed": config.model.seed,
        "pretrain": config.model.pretrain,
    });
    flotilla_wire::fingerprint::fnv1a_hex(identity.to_string().as_bytes())
}

/// The public images the base is pretrained on: the first `samples` of the test split.
fn pretraining_data(config: &CoordinatorConfig, pretrain: &PretrainSection) -> Result<Dataset> {
    let data = load_split(&pretrain.data, Split::Test, config.model.architecture.classes())
        .with_context(|| format!("cannot load the pretraining data in {}", pretrain.data.display()))?;
    anyhow::ensure!(
        data.len() >= pretrain.samples,
        "{}: the test split has {} images, fewer than model.pretrain.samples = {}",
        pretrain.data.display(),
        data.len(),
        pretrain.samples
    );
    Ok(data.subset(&(0..pretrain.samples).collect::<Vec<_>>()))
}

/// What [`prepare`] would fail on, found without writing anything: the transformer checkpoint and
/// its pin, or the pretraining data when the base is not made yet (a base already made is read).
pub fn check(config: &CoordinatorConfig) -> Result<()> {
    match &config.model.pretrain {
        Some(pretrain) if !base_is_made(config) => pretraining_data(config, pretrain).map(drop),
        _ => prepare(config).map(drop),
    }
}

/// Whether `<run_dir>/base/` holds the pretrained base these settings make.
fn base_is_made(config: &CoordinatorConfig) -> bool {
    let path = base_dir(&config.server.run_dir).join("fingerprint");
    std::fs::read_to_string(path).ok().as_deref() == Some(fingerprint(config).as_str())
}

/// The base for `config`: loaded from `<run_dir>/base/` when it was made for the same settings,
/// otherwise made (and pretrained, if configured) and saved there.
pub fn prepare(config: &CoordinatorConfig) -> Result<Base> {
    if let Some(transformer) = &config.model.transformer {
        return prepare_transformer(config, transformer);
    }
    if let Some(decoder) = &config.model.decoder {
        return prepare_decoder(decoder);
    }
    let architecture = &config.model.architecture;
    let seed_base = architecture.init_base(config.model.seed);
    let Some(pretrain) = &config.model.pretrain else {
        let version = format!("seed-{}", config.model.seed);
        return Ok(Base { weights: seed_base, head: None, version, checkpoint: None });
    };
    let fingerprint = fingerprint(config);
    let version = format!("seed-{}-pretrained-{fingerprint}", config.model.seed);
    let dir = base_dir(&config.server.run_dir);
    let model_path = dir.join("model.safetensors");
    let fingerprint_path = dir.join("fingerprint");
    if base_is_made(config) {
        let mut weights: BaseWeights = Tensor::read_safetensors(&model_path)
            .with_context(|| format!("cannot read the pretrained base {}", model_path.display()))?
            .into_iter()
            .collect();
        let head = match (weights.remove(HEAD_WEIGHT), weights.remove(HEAD_BIAS)) {
            (Some(w), Some(b)) => (w, b),
            _ => anyhow::bail!("{}: the pretrained head is missing", model_path.display()),
        };
        architecture.check_base(&weights).with_context(|| model_path.display().to_string())?;
        info!(base = %model_path.display(), "using the pretrained base");
        return Ok(Base { weights, head: Some(head), version, checkpoint: None });
    }

    let public = pretraining_data(config, pretrain)?;
    let initial = architecture.init_adapter(1, config.model.seed)?;
    let head = (
        initial.get("base_model.model.head.weight").context("initial head")?,
        initial.get("base_model.model.head.bias").context("initial head")?,
    );
    info!(samples = pretrain.samples, steps = pretrain.steps, "pretraining the base model on public data");
    let started = Instant::now();
    let settings = PretrainSettings {
        steps: pretrain.steps,
        batch_size: pretrain.batch_size,
        learning_rate: pretrain.learning_rate,
        seed: config.model.seed,
    };
    let (weights, head_w, head_b) = architecture.pretrain(&seed_base, head, &public, &settings)?;
    info!(seconds = format!("{:.1}", started.elapsed().as_secs_f64()), "base model pretrained");

    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut named: Vec<(&str, &Tensor)> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    named.push((HEAD_WEIGHT, &head_w));
    named.push((HEAD_BIAS, &head_b));
    write_safetensors_atomically(&model_path, &named)?;
    write_atomically(&fingerprint_path, fingerprint.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Base { weights, head: Some((head_w, head_b)), version, checkpoint: None })
}
