//! The model every participant trains, as plain data: the architecture (which the coordinator
//! announces in its Welcome) and the shapes of its adapted layers. Building and running it with
//! libtorch is the torch side's job (`flotilla_torch::model`).

use serde::{Deserialize, Serialize};

mod decoder;
pub use decoder::{DecoderSpec, DecoderTask, DEFAULT_DECODER_TARGETS};

/// Prefix of every adapter tensor name, as HF PEFT writes it.
pub const ADAPTER_PREFIX: &str = "base_model.model.";

/// Which LoRA factors devices train under `[privacy]`: all of them, or only each B (and the head)
/// with every A frozen at the global's (FFA-LoRA). With A the same on every device, a merge of the
/// B factors is the exact average of the devices' products B·A, and the noised coordinates are
/// about half as many.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trainable {
    #[default]
    Lora,
    BOnly,
}

impl Trainable {
    pub fn name(self) -> &'static str {
        match self {
            Trainable::Lora => "lora",
            Trainable::BOnly => "b_only",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// Fully connected layers with ReLU, LoRA on each hidden layer, then a trainable linear head.
    Mlp { input: u32, hidden: Vec<u32>, classes: u32 },
    /// A small CNN for `side`×`side` images with `channels` planes (given flattened): 3×3
    /// convolutions ('same' padding, ReLU, 2×2 max-pool) with `conv` output channels each, one
    /// hidden linear layer, then a trainable head. LoRA on every convolution and on the linear layer.
    Cnn { side: u32, channels: u32, conv: Vec<u32>, hidden: u32, classes: u32 },
    /// A pretrained BERT-family encoder (HF `BertModel`) with LoRA on the linear modules that
    /// `target_modules` names, and a trainable sequence-classification head on the pooled output.
    Bert(BertSpec),
    /// A pretrained Llama-family decoder (HF `LlamaForCausalLM`, from GGUF) with LoRA on the
    /// projections `target_modules` names, fine-tuned as a language model (no head).
    Llama(DecoderSpec),
}

/// A BERT-family encoder as its `config.json` describes it, plus what fine-tuning adds: where LoRA
/// goes, how the sequence is pooled, the classes and the longest input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BertSpec {
    pub layers: u32,
    pub hidden: u32,
    pub heads: u32,
    pub intermediate: u32,
    pub vocab: u32,
    pub max_positions: u32,
    pub type_vocab: u32,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    pub pooling: Pooling,
    /// PEFT's `target_modules`: a module is adapted when its name ends with `.<target>`, so
    /// `output.dense` adapts both `attention.output.dense` and the layer's `output.dense`.
    pub target_modules: Vec<String>,
    /// The class names, in the head's output order (a text's label must be one of them).
    pub labels: Vec<String>,
    /// Tokens per input: longer texts are truncated, batches padded to their longest input.
    pub max_length: u32,
}

/// The feed-forward activation (`hidden_act` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The exact (erf) GELU, HF's `gelu`.
    Gelu,
    /// The tanh approximation, HF's `gelu_new` / `gelu_pytorch_tanh`.
    GeluTanh,
    Relu,
}

impl Activation {
    /// The activation that HF's `hidden_act` names.
    pub fn from_hf(name: &str) -> Option<Activation> {
        match name {
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }
}

/// How the encoder's output becomes one vector per input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The [CLS] token through the checkpoint's pooler (dense + tanh), as HF's
    /// `BertForSequenceClassification` does: exports load there with the same logits.
    Cls,
    /// The mean of the last hidden states over the real (unpadded) tokens, as sentence-transformers do.
    Mean,
}

/// The linear modules of one BERT layer, by their path under `bert.encoder.layer.<i>.`, with
/// `(d_in, d_out)` as multiples of (hidden, intermediate).
const BERT_LAYER_MODULES: [(&str, BertDim, BertDim); 6] = [
    ("attention.self.query", BertDim::Hidden, BertDim::Hidden),
    ("attention.self.key", BertDim::Hidden, BertDim::Hidden),
    ("attention.self.value", BertDim::Hidden, BertDim::Hidden),
    ("attention.output.dense", BertDim::Hidden, BertDim::Hidden),
    ("intermediate.dense", BertDim::Hidden, BertDim::Intermediate),
    ("output.dense", BertDim::Intermediate, BertDim::Hidden),
];

#[derive(Clone, Copy)]
enum BertDim {
    Hidden,
    Intermediate,
}

/// The target modules PEFT users most often name; any suffix of a module path works.
pub const DEFAULT_TARGET_MODULES: [&str; 2] = ["query", "value"];

impl BertSpec {
    fn dim(&self, dim: BertDim) -> usize {
        match dim {
            BertDim::Hidden => self.hidden as usize,
            BertDim::Intermediate => self.intermediate as usize,
        }
    }

    /// Parameters of the encoder (embeddings, layers, pooler), without the head.
    /// Saturates instead of overflowing: the sizes may come from an untrusted description.
    pub fn base_parameters(&self) -> u64 {
        let (h, i) = (u64::from(self.hidden), u64::from(self.intermediate));
        let rows = u64::from(self.vocab) + u64::from(self.max_positions) + u64::from(self.type_vocab);
        let embeddings = rows.saturating_mul(h).saturating_add(2 * h);
        let square = h.saturating_mul(h);
        let layer = square
            .saturating_add(h)
            .saturating_mul(4)
            .saturating_add(h.saturating_mul(i).saturating_mul(2))
            .saturating_add(i + 5 * h);
        embeddings.saturating_add(u64::from(self.layers).saturating_mul(layer)).saturating_add(square + h)
    }

    /// The adapted modules' paths within one layer (e.g. `attention.self.query`), in layer order.
    pub fn targeted_layer_modules(&self) -> Vec<&'static str> {
        BERT_LAYER_MODULES
            .iter()
            .filter(|(path, ..)| self.target_modules.iter().any(|t| targets(path, t)))
            .map(|(path, ..)| *path)
            .collect()
    }

    fn adapted_layers(&self) -> Vec<LayerShape> {
        let mut shapes = Vec::new();
        for layer in 0..self.layers {
            for (path, d_in, d_out) in BERT_LAYER_MODULES {
                if self.target_modules.iter().any(|t| targets(path, t)) {
                    shapes.push(LayerShape {
                        name: format!("bert.encoder.layer.{layer}.{path}"),
                        d_in: self.dim(d_in),
                        d_out: self.dim(d_out),
                        kind: LayerKind::Linear,
                    });
                }
            }
        }
        shapes
    }

    fn validate(&self) -> Result<(), String> {
        if self.layers < 1 || self.hidden < 1 || self.heads < 1 || self.intermediate < 1 || self.vocab < 1 {
            return Err("bert: layers, hidden, heads, intermediate and vocab must be ≥ 1".into());
        }
        if !self.hidden.is_multiple_of(self.heads) {
            return Err(format!("bert: hidden {} is not a multiple of heads {}", self.hidden, self.heads));
        }
        if self.type_vocab < 1 || self.max_positions < 2 {
            return Err("bert: type_vocab must be ≥ 1 and max_positions ≥ 2".into());
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(format!("bert: layer_norm_eps {} must be a positive number", self.layer_norm_eps));
        }
        if self.labels.len() < 2 {
            return Err("bert: at least 2 labels (classes)".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for label in &self.labels {
            if label.trim().is_empty() || !seen.insert(label.as_str()) {
                return Err(format!("bert: label '{label}' is empty or repeated; labels must be distinct names"));
            }
        }
        if self.max_length < 2 || self.max_length > self.max_positions {
            return Err(format!(
                "bert: max_length {} must be between 2 and the model's {} positions",
                self.max_length, self.max_positions
            ));
        }
        if self.target_modules.is_empty() {
            return Err("bert: target_modules is empty; name at least one (e.g. query, value)".into());
        }
        if self.target_modules.iter().any(|t| t == "dense") {
            return Err("bert: target module 'dense' would also adapt the pooler under PEFT's rule; name the \
                        modules (attention.output.dense, intermediate.dense, output.dense)"
                .into());
        }
        let known: Vec<&str> = BERT_LAYER_MODULES.iter().map(|(p, ..)| *p).collect();
        for target in &self.target_modules {
            if !known.iter().any(|p| targets(p, target)) {
                return Err(format!(
                    "bert: target module '{target}' matches no linear module of a BERT layer ({})",
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }
}

/// PEFT's rule: a module is targeted when its path is the target or ends with `.<target>`.
pub(crate) fn targets(path: &str, target: &str) -> bool {
    !target.is_empty() && (path == target || path.ends_with(&format!(".{target}")))
}

/// Kernel size of the CNN's convolutions.
pub const CONV_KERNEL: usize = 3;

/// What kind of layer an adapted layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    Linear,
    /// A k×k convolution from `c_in` to `c_out` channels. Its LoRA factors are kept as matrices:
    /// A is `[r, c_in·k·k]` (a k×k convolution to r channels, flattened) and B is `[c_out, r]` (a
    /// 1×1 convolution), so that `B·A` has the shape of the flattened kernel and every
    /// aggregation method treats them like a linear layer's.
    Conv {
        c_in: usize,
        c_out: usize,
        kernel: usize,
    },
}

/// One adapted layer: its name, kind and `d_in → d_out` (for a convolution, `c_in·k·k → c_out`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShape {
    pub name: String,
    pub d_in: usize,
    pub d_out: usize,
    pub kind: LayerKind,
}

impl LayerShape {
    /// The shape of the base layer's weight.
    pub fn weight_shape(&self) -> Vec<i64> {
        match self.kind {
            LayerKind::Linear => vec![self.d_out as i64, self.d_in as i64],
            LayerKind::Conv { c_in, c_out, kernel } => vec![c_out as i64, c_in as i64, kernel as i64, kernel as i64],
        }
    }
}

impl Architecture {
    pub fn adapted_layers(&self) -> Vec<LayerShape> {
        match self {
            Architecture::Mlp { input, hidden, .. } => {
                let mut d_in = *input as usize;
                hidden
                    .iter()
                    .enumerate()
                    .map(|(i, &h)| {
                        let shape = LayerShape {
                            name: format!("fc{}", i + 1),
                            d_in,
                            d_out: h as usize,
                            kind: LayerKind::Linear,
                        };
                        d_in = h as usize;
                        shape
                    })
                    .collect()
            }
            Architecture::Cnn { side, channels, conv, hidden, .. } => {
                let mut layers = Vec::new();
                let (mut c_in, mut side) = (*channels as usize, *side as usize);
                for (i, &c_out) in conv.iter().enumerate() {
                    let c_out = c_out as usize;
                    let kind = LayerKind::Conv { c_in, c_out, kernel: CONV_KERNEL };
                    let d_in = c_in * CONV_KERNEL * CONV_KERNEL;
                    layers.push(LayerShape { name: format!("conv{}", i + 1), d_in, d_out: c_out, kind });
                    c_in = c_out;
                    side /= 2;
                }
                let d_in = c_in * side * side;
                layers.push(LayerShape { name: "fc1".into(), d_in, d_out: *hidden as usize, kind: LayerKind::Linear });
                layers
            }
            Architecture::Bert(spec) => spec.adapted_layers(),
            Architecture::Llama(spec) => spec.adapted_layers(),
        }
    }

    /// The classifier head's module name: `head` for the small models, `classifier` for an
    /// encoder (HF's name in `...ForSequenceClassification`); none for a decoder.
    pub fn head_module(&self) -> Option<&'static str> {
        match self {
            Architecture::Mlp { .. } | Architecture::Cnn { .. } => Some("head"),
            Architecture::Bert(_) => Some("classifier"),
            Architecture::Llama(_) => None,
        }
    }

    /// The adapter's head tensors, `(weight, bias)`, under their PEFT names (none for a decoder).
    pub fn head_names(&self) -> Option<(String, String)> {
        let module = self.head_module()?;
        Some((format!("{ADAPTER_PREFIX}{module}.weight"), format!("{ADAPTER_PREFIX}{module}.bias")))
    }

    /// Whether inputs are token ids (a transformer) rather than f32 features.
    pub fn takes_tokens(&self) -> bool {
        matches!(self, Architecture::Bert(_) | Architecture::Llama(_))
    }

    /// Whether this is a language model trained on its own next tokens (no classifier).
    pub fn is_decoder(&self) -> bool {
        matches!(self, Architecture::Llama(_))
    }

    /// `(d_in, classes)` of the trainable classifier head (none for a decoder).
    pub fn head_shape(&self) -> Option<(usize, usize)> {
        match self {
            Architecture::Mlp { input, hidden, classes } => {
                Some((hidden.last().copied().unwrap_or(*input) as usize, *classes as usize))
            }
            Architecture::Cnn { hidden, classes, .. } => Some((*hidden as usize, *classes as usize)),
            Architecture::Bert(spec) => Some((spec.hidden as usize, spec.labels.len())),
            Architecture::Llama(_) => None,
        }
    }

    /// Features per input: for a transformer, the longest input in tokens.
    pub fn input_size(&self) -> usize {
        match self {
            Architecture::Mlp { input, .. } => *input as usize,
            Architecture::Cnn { side, channels, .. } => (*side * *side * *channels) as usize,
            Architecture::Bert(spec) => spec.max_length as usize,
            Architecture::Llama(spec) => spec.max_length as usize,
        }
    }

    pub fn classes(&self) -> usize {
        match self {
            Architecture::Mlp { classes, .. } | Architecture::Cnn { classes, .. } => *classes as usize,
            Architecture::Bert(spec) => spec.labels.len(),
            Architecture::Llama(spec) => spec.labels.len(),
        }
    }

    /// Checks that the architecture makes sense (sizes ≥ 1, a CNN's image survives its pools).
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Architecture::Mlp { input, hidden, classes } => {
                if *input < 1 || *classes < 2 || hidden.is_empty() || hidden.contains(&0) {
                    return Err("mlp: input must be ≥ 1, classes ≥ 2, and hidden layers non-empty and ≥ 1".into());
                }
            }
            Architecture::Cnn { side, channels, conv, hidden, classes } => {
                if *channels < 1 || *hidden < 1 || *classes < 2 || conv.is_empty() || conv.contains(&0) {
                    return Err("cnn: channels, hidden ≥ 1, classes ≥ 2, and conv layers non-empty and ≥ 1".into());
                }
                if *side >> conv.len() == 0 {
                    return Err(format!("cnn: a {side}×{side} image does not survive {} 2×2 pools", conv.len()));
                }
            }
            Architecture::Bert(spec) => spec.validate()?,
            Architecture::Llama(spec) => spec.validate()?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(targets: &[&str]) -> BertSpec {
        BertSpec {
            layers: 2,
            hidden: 8,
            heads: 2,
            intermediate: 16,
            vocab: 50,
            max_positions: 32,
            type_vocab: 2,
            layer_norm_eps: 1e-12,
            activation: Activation::Gelu,
            pooling: Pooling::Cls,
            target_modules: targets.iter().map(|t| t.to_string()).collect(),
            labels: vec!["a".into(), "b".into(), "c".into()],
            max_length: 16,
        }
    }

    #[test]
    fn target_modules_match_by_suffix_as_in_peft() {
        let names = |targets: &[&str]| -> Vec<String> {
            Architecture::Bert(spec(targets)).adapted_layers().into_iter().map(|l| l.name).collect()
        };
        assert_eq!(
            names(&["query", "value"]),
            [
                "bert.encoder.layer.0.attention.self.query",
                "bert.encoder.layer.0.attention.self.value",
                "bert.encoder.layer.1.attention.self.query",
                "bert.encoder.layer.1.attention.self.value"
            ]
        );
        // `output.dense` is a suffix of both the attention output and the feed-forward output.
        let shapes = Architecture::Bert(spec(&["output.dense"])).adapted_layers();
        let first: Vec<(&str, usize, usize)> =
            shapes.iter().take(2).map(|l| (l.name.as_str(), l.d_in, l.d_out)).collect();
        assert_eq!(
            first,
            [("bert.encoder.layer.0.attention.output.dense", 8, 8), ("bert.encoder.layer.0.output.dense", 16, 8)]
        );
        assert_eq!(names(&["intermediate.dense"]).len(), 2);
    }

    #[test]
    fn bad_bert_settings_are_clear_errors() {
        let check = |edit: &dyn Fn(&mut BertSpec)| {
            let mut s = spec(&["query"]);
            edit(&mut s);
            Architecture::Bert(s).validate().unwrap_err()
        };
        assert!(check(&|s| s.target_modules = vec!["attention".into()]).contains("matches no linear module"));
        assert!(check(&|s| s.target_modules.clear()).contains("target_modules is empty"));
        assert!(check(&|s| s.heads = 3).contains("not a multiple of heads"));
        assert!(check(&|s| s.max_length = 64).contains("max_length 64"));
        assert!(check(&|s| s.labels.truncate(1)).contains("at least 2 labels"));
        assert!(check(&|s| s.labels[1] = "a".into()).contains("repeated"));
        assert!(check(&|s| s.target_modules = vec!["dense".into()]).contains("pooler"));
        assert!(Architecture::Bert(spec(&["query", "value"])).validate().is_ok());
    }

    #[test]
    fn a_decoder_adapts_its_targeted_projections_and_has_no_head() {
        let spec = decoder::tiny_spec();
        let architecture = Architecture::Llama(spec.clone());
        let layers = architecture.adapted_layers();
        let described: Vec<(&str, usize, usize)> =
            layers.iter().take(2).map(|l| (l.name.as_str(), l.d_in, l.d_out)).collect();
        assert_eq!(
            described,
            [("model.layers.0.self_attn.q_proj", 64, 64), ("model.layers.0.self_attn.v_proj", 64, 32)]
        );
        assert_eq!(layers.len(), 4);
        assert_eq!(architecture.head_names(), None);
        assert!(architecture.validate().is_ok());
        let mut wrong = spec.clone();
        wrong.target_modules = vec!["query".into()];
        assert!(Architecture::Llama(wrong).validate().unwrap_err().contains("matches no linear module"));
        let mut long = spec;
        long.max_length = 1000;
        assert!(Architecture::Llama(long).validate().unwrap_err().contains("max_length 1000"));
    }
}
