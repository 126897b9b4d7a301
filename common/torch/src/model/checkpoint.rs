//! An HF BERT-family checkpoint directory: `config.json`, `model.safetensors`, `tokenizer.json`.
//! Tensor names may carry HF's `bert.` prefix (a `BertFor...` model) or not (a bare `BertModel`,
//! as all-MiniLM-L6-v2 ships); pretraining heads, a classifier and `position_ids` are ignored.

use std::path::{Path, PathBuf};

use flotilla_wire::model::{Activation, BertSpec, Pooling};
use serde::Deserialize;
use tch::{Kind, Tensor};

use super::{bert, BaseWeights, ModelError};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = flotilla_wire::protocol::CHECKPOINT_WEIGHTS_FILE;
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// A checkpoint that cannot be used, naming the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CheckpointError {
    pub path: PathBuf,
    pub message: String,
}

fn error(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError { path: path.to_path_buf(), message: message.into() }
}

/// The fields of HF's `BertConfig` the encoder uses.
#[derive(Debug, Clone, Deserialize)]
pub struct HfBertConfig {
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: u32,
    pub num_hidden_layers: u32,
    pub num_attention_heads: u32,
    pub intermediate_size: u32,
    pub vocab_size: u32,
    pub max_position_embeddings: u32,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: u32,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_activation")]
    pub hidden_act: String,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_type_vocab() -> u32 {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_activation() -> String {
    "gelu".into()
}

/// What fine-tuning adds to the checkpoint's own description.
#[derive(Debug, Clone, PartialEq)]
pub struct FineTuning {
    pub target_modules: Vec<String>,
    pub pooling: Pooling,
    pub labels: Vec<String>,
    pub max_length: u32,
}

/// An opened checkpoint directory whose `config.json` describes a supported BERT encoder.
#[derive(Debug, Clone)]
pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub config: HfBertConfig,
}

impl HfCheckpoint {
    /// Opens `dir`: its three files must exist and `config.json` must describe a BERT encoder.
    pub fn open(dir: &Path) -> Result<HfCheckpoint, CheckpointError> {
        for file in [CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE] {
            let path = dir.join(file);
            if !path.is_file() {
                return Err(error(
                    &path,
                    "missing (a checkpoint directory holds config.json, model.safetensors and tokenizer.json)",
                ));
            }
        }
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|e| error(&config_path, e.to_string()))?;
        let config: HfBertConfig =
            serde_json::from_str(&text).map_err(|e| error(&config_path, format!("not a BERT config: {e}")))?;
        if config.model_type.as_deref() != Some("bert") {
            let named = config.model_type.as_ref().map_or("missing".to_string(), |t| format!("\"{t}\""));
            return Err(error(
                &config_path,
                format!(
                    "model_type {named} is not supported; Flotilla runs BERT-family encoders (model_type \"bert\")"
                ),
            ));
        }
        if let Some(kind) = config.position_embedding_type.as_deref().filter(|k| *k != "absolute") {
            return Err(error(
                &config_path,
                format!("position_embedding_type \"{kind}\" is not supported (only \"absolute\")"),
            ));
        }
        if Activation::from_hf(&config.hidden_act).is_none() {
            return Err(error(
                &config_path,
                format!("hidden_act \"{}\" is not supported (gelu, gelu_new, relu)", config.hidden_act),
            ));
        }
        Ok(HfCheckpoint { dir: dir.to_path_buf(), config })
    }

    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }

    pub fn tokenizer_path(&self) -> PathBuf {
        self.dir.join(TOKENIZER_FILE)
    }

    /// The architecture: the checkpoint's encoder with `fine_tuning`'s targets, pooling and labels.
    pub fn spec(&self, fine_tuning: &FineTuning) -> Result<BertSpec, CheckpointError> {
        let c = &self.config;
        let spec = BertSpec {
            layers: c.num_hidden_layers,
            hidden: c.hidden_size,
            heads: c.num_attention_heads,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            max_positions: c.max_position_embeddings,
            type_vocab: c.type_vocab_size,
            layer_norm_eps: c.layer_norm_eps,
            activation: Activation::from_hf(&c.hidden_act).unwrap_or(Activation::Gelu),
            pooling: fine_tuning.pooling,
            target_modules: fine_tuning.target_modules.clone(),
            labels: fine_tuning.labels.clone(),
            max_length: fine_tuning.max_length,
        };
        flotilla_wire::model::Architecture::Bert(spec.clone())
            .validate()
            .map_err(|e| error(&self.dir.join(CONFIG_FILE), e))?;
        Ok(spec)
    }

    /// The encoder's weights as f32, under names without the `bert.` prefix, checked against `spec`.
    pub fn load_weights(&self, spec: &BertSpec) -> Result<BaseWeights, CheckpointError> {
        let path = self.weights_path();
        let named =
            Tensor::read_safetensors(&path).map_err(|e| error(&path, format!("unreadable safetensors: {e}")))?;
        let wanted: std::collections::BTreeSet<String> =
            bert::base_shapes(spec).into_iter().map(|(name, _)| name).collect();
        let mut weights = BaseWeights::new();
        for (name, tensor) in named {
            let name = name.strip_prefix(bert::ADAPTED_PREFIX).unwrap_or(&name).to_string();
            if !wanted.contains(&name) {
                continue;
            }
            let tensor = match tensor.kind() {
                Kind::Float => tensor,
                Kind::Half | Kind::BFloat16 | Kind::Double => {
                    tensor.f_to_kind(Kind::Float).map_err(|e| error(&path, e.to_string()))?
                }
                kind => return Err(error(&path, format!("tensor '{name}' is {kind:?}, not a floating-point weight"))),
            };
            weights.insert(name, tensor);
        }
        super::bert::check_base(spec, &weights).map_err(|e| match e {
            ModelError::Missing(name) => error(&path, format!("tensor '{name}' (or 'bert.{name}') is missing")),
            other => error(&path, other.to_string()),
        })?;
        Ok(weights)
    }
}

/// The sha256 of a file, in lower-case hex (what `sha256sum` prints).
pub fn sha256_file(path: &Path) -> Result<String, CheckpointError> {
    flotilla_wire::files::sha256_file(path).map_err(|e| error(path, e.to_string()))
}
