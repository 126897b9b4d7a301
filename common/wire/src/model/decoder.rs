//! A Llama-family decoder as its GGUF file describes it (`flotilla_gguf::LlamaSpec`), plus what
//! fine-tuning adds: where LoRA goes, the longest sequence and the articles' classes (which the
//! Dirichlet skew among devices is drawn over).

use serde::{Deserialize, Serialize};

use super::{targets, LayerKind, LayerShape};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderSpec {
    pub layers: u32,
    pub hidden: u32,
    pub intermediate: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub vocab: u32,
    pub context: u32,
    pub rms_eps: f64,
    pub rope_base: f64,
    pub tied_embeddings: bool,
    /// PEFT's `target_modules` among `q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`.
    pub target_modules: Vec<String>,
    /// Tokens per example (prompt and headline): an article's body is cut to fit.
    pub max_length: u32,
    /// The texts' classes (folder names or the CSV's labels), in a fixed order.
    pub labels: Vec<String>,
    /// What the decoder learns from a device's texts.
    #[serde(default)]
    pub task: DecoderTask,
}

/// A decoder's task on a device's texts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecoderTask {
    /// An article's first line is its headline: the prompt is the chat template with the body,
    /// the loss is on the headline.
    #[default]
    Headline,
    /// Causal language modelling on the text itself (its first `max_length` tokens): the loss is
    /// on every token after the first; held-out perplexity measures it.
    NextWord,
}

/// LoRA on the attention's query and value projections, as PEFT's default for Llama.
pub const DEFAULT_DECODER_TARGETS: [&str; 2] = ["q_proj", "v_proj"];

/// Each layer's linear modules under `model.layers.N`, with `(d_in, d_out)` as functions of the spec.
const DECODER_LAYER_MODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl DecoderSpec {
    pub fn head_dim(&self) -> u32 {
        self.hidden / self.heads.max(1)
    }

    fn dims(&self, module: &str) -> (usize, usize) {
        let (h, i) = (self.hidden as usize, self.intermediate as usize);
        let kv = (self.kv_heads * self.head_dim()) as usize;
        match module {
            "self_attn.k_proj" | "self_attn.v_proj" => (h, kv),
            "mlp.gate_proj" | "mlp.up_proj" => (h, i),
            "mlp.down_proj" => (i, h),
            _ => (h, h),
        }
    }

    /// Parameters of the frozen base (embedding, layers, norms; the tied output counted once).
    /// Saturates: the sizes may come from an untrusted description.
    pub fn base_parameters(&self) -> u64 {
        let (h, v) = (u64::from(self.hidden), u64::from(self.vocab));
        let per_layer: u64 = DECODER_LAYER_MODULES
            .iter()
            .map(|m| {
                let (a, b) = self.dims(m);
                (a as u64).saturating_mul(b as u64)
            })
            .fold(2 * h, u64::saturating_add);
        let output = if self.tied_embeddings { 0 } else { v.saturating_mul(h) };
        v.saturating_mul(h)
            .saturating_add(h)
            .saturating_add(output)
            .saturating_add(u64::from(self.layers).saturating_mul(per_layer))
    }

    pub(super) fn adapted_layers(&self) -> Vec<LayerShape> {
        let mut shapes = Vec::new();
        for layer in 0..self.layers {
            for path in DECODER_LAYER_MODULES {
                if self.target_modules.iter().any(|t| targets(path, t)) {
                    let (d_in, d_out) = self.dims(path);
                    shapes.push(LayerShape {
                        name: format!("model.layers.{layer}.{path}"),
                        d_in,
                        d_out,
                        kind: LayerKind::Linear,
                    });
                }
            }
        }
        shapes
    }

    pub(super) fn validate(&self) -> Result<(), String> {
        if self.layers < 1
            || self.hidden < 1
            || self.heads < 1
            || self.kv_heads < 1
            || self.vocab < 1
            || self.intermediate < 1
        {
            return Err("decoder: layers, hidden, heads, kv_heads, intermediate and vocab must be ≥ 1".into());
        }
        if !self.hidden.is_multiple_of(self.heads) || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(format!(
                "decoder: {} heads and {} key/value heads do not split hidden {}",
                self.heads, self.kv_heads, self.hidden
            ));
        }
        if self.max_length < 8 || self.max_length > self.context {
            return Err(format!(
                "decoder: max_length {} must be between 8 and the model's context of {}",
                self.max_length, self.context
            ));
        }
        if self.labels.is_empty() || self.labels.iter().any(|l| l.trim().is_empty()) {
            return Err("decoder: labels must name the articles' classes (at least one, none empty)".into());
        }
        if self.target_modules.is_empty() {
            return Err("decoder: target_modules is empty; name at least one (e.g. q_proj, v_proj)".into());
        }
        for target in &self.target_modules {
            if !DECODER_LAYER_MODULES.iter().any(|p| targets(p, target)) {
                return Err(format!(
                    "decoder: target module '{target}' matches no linear module of a Llama layer ({})",
                    DECODER_LAYER_MODULES.join(", ")
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(super) fn tiny_spec() -> DecoderSpec {
    DecoderSpec {
        layers: 2,
        hidden: 64,
        intermediate: 128,
        heads: 4,
        kv_heads: 2,
        vocab: 263,
        context: 256,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
        tied_embeddings: true,
        target_modules: DEFAULT_DECODER_TARGETS.iter().map(|t| t.to_string()).collect(),
        max_length: 96,
        labels: vec!["business".into()],
        task: DecoderTask::Headline,
    }
}
