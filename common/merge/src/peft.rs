//! PEFT names and `adapter_config.json`.
//!
//! For an adapted module `m`, `m.lora_A.weight` is `r × d_in` (rank on rows) and `m.lora_B.weight`
//! is `d_out × r` (rank on columns); the layer computes `W0·x + s·B·A·x`. Rank slot `i` is row `i`
//! of A and column `i` of B. Every other tensor is a trainable non-LoRA parameter (e.g. a
//! classifier head) that is shared at full size by every rank.

use serde::{Deserialize, Serialize};

pub const LORA_A_SUFFIX: &str = ".lora_A.weight";
pub const LORA_B_SUFFIX: &str = ".lora_B.weight";
/// A module's merged update `ΔW` (d_out × d_in, in weight units): online FLoRA folds each round's
/// exact aggregate into it, and a model adds it to the frozen base weight. Only the coordinator
/// makes it; it is never trained, so updates must not carry it.
pub const MERGED_DELTA_SUFFIX: &str = ".merged_delta";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// safetensors metadata key holding a client's sample count (a decimal string).
pub const NUM_SAMPLES_KEY: &str = "num_samples";
/// The largest LoRA rank an adapter config or `--max-rank` may ask for: far above any useful rank,
/// low enough that a lying config cannot make the merge allocate without bound.
pub const MAX_RANK: usize = 65_536;

/// What a tensor is, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorRole<'a> {
    LoraA(&'a str),
    LoraB(&'a str),
    /// A module's merged update (see [`MERGED_DELTA_SUFFIX`]).
    MergedDelta(&'a str),
    Other,
}

pub fn tensor_role(name: &str) -> TensorRole<'_> {
    if let Some(module) = name.strip_suffix(LORA_A_SUFFIX) {
        TensorRole::LoraA(module)
    } else if let Some(module) = name.strip_suffix(LORA_B_SUFFIX) {
        TensorRole::LoraB(module)
    } else if let Some(module) = name.strip_suffix(MERGED_DELTA_SUFFIX) {
        TensorRole::MergedDelta(module)
    } else {
        TensorRole::Other
    }
}

pub fn lora_a_name(module: &str) -> String {
    format!("{module}{LORA_A_SUFFIX}")
}

pub fn lora_b_name(module: &str) -> String {
    format!("{module}{LORA_B_SUFFIX}")
}

pub fn merged_delta_name(module: &str) -> String {
    format!("{module}{MERGED_DELTA_SUFFIX}")
}

/// The subset of HF PEFT's `adapter_config.json` that Flotilla writes and reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeftConfig {
    #[serde(default = "lora")]
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default = "yes")]
    pub inference_mode: bool,
}

fn lora() -> String {
    "LORA".into()
}
fn none() -> String {
    "none".into()
}
fn yes() -> bool {
    true
}

impl PeftConfig {
    /// The config of a LoRA adapter of rank `r` over the modules and non-LoRA tensors named in
    /// `tensor_names` (module paths are reduced to their last component, as PEFT lists them).
    pub fn for_tensors<'a>(tensor_names: impl IntoIterator<Item = &'a str>, r: usize, lora_alpha: f64) -> PeftConfig {
        let strip = |m: &str| m.rsplit('.').next().unwrap_or(m).to_string();
        let mut target_modules = Vec::new();
        let mut to_save = Vec::new();
        for name in tensor_names {
            match tensor_role(name) {
                TensorRole::LoraA(module) => target_modules.push(strip(module)),
                TensorRole::LoraB(_) | TensorRole::MergedDelta(_) => {}
                TensorRole::Other => {
                    if let Some((module, _)) = name.rsplit_once('.') {
                        to_save.push(strip(module));
                    }
                }
            }
        }
        // Layer after layer names the same modules: each once, as PEFT lists them.
        target_modules.sort();
        target_modules.dedup();
        to_save.sort();
        to_save.dedup();
        PeftConfig {
            peft_type: lora(),
            r,
            lora_alpha,
            target_modules,
            modules_to_save: (!to_save.is_empty()).then_some(to_save),
            lora_dropout: 0.0,
            bias: none(),
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            task_type: None,
            inference_mode: true,
        }
    }
}
