//! The model every participant trains, as plain data: the architecture (which the coordinator
//! announces in its Welcome) and the shapes of its adapted layers. Building and running it with
//! libtorch is the torch side's job (`flotilla_torch::model`).

use serde::{Deserialize, Serialize};

/// Prefix of every adapter tensor name, as HF PEFT writes it.
pub const ADAPTER_PREFIX: &str = "base_model.model.";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// Fully connected layers with ReLU, LoRA on each hidden layer, then a trainable linear head.
    Mlp { input: u32, hidden: Vec<u32>, classes: u32 },
    /// A small CNN for `side`×`side` images with `channels` planes (given flattened): 3×3
    /// convolutions ('same' padding, ReLU, 2×2 max-pool) with `conv` output channels each, one
    /// hidden linear layer, then a trainable head. LoRA on every convolution and on the linear layer.
    Cnn { side: u32, channels: u32, conv: Vec<u32>, hidden: u32, classes: u32 },
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
        }
    }

    /// `(d_in, classes)` of the trainable classifier head.
    pub fn head_shape(&self) -> (usize, usize) {
        match self {
            Architecture::Mlp { input, hidden, classes } => {
                (hidden.last().copied().unwrap_or(*input) as usize, *classes as usize)
            }
            Architecture::Cnn { hidden, classes, .. } => (*hidden as usize, *classes as usize),
        }
    }

    pub fn input_size(&self) -> usize {
        match self {
            Architecture::Mlp { input, .. } => *input as usize,
            Architecture::Cnn { side, channels, .. } => (*side * *side * *channels) as usize,
        }
    }

    pub fn classes(&self) -> usize {
        match self {
            Architecture::Mlp { classes, .. } | Architecture::Cnn { classes, .. } => *classes as usize,
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
        }
        Ok(())
    }
}
