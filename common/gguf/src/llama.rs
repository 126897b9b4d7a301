//! A Llama-architecture decoder as its GGUF describes it: the hyper-parameters, HF's names for
//! its tensors, and the row order llama.cpp's converter changed for rotary attention, undone.

use crate::error::{GgufError, Result};
use crate::file::{DenseTensor, GgufFile};
use crate::tensor::TensorType;
use crate::value::Metadata;

/// The decoder's shape (HF `LlamaConfig` terms).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaSpec {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub context: usize,
    pub rms_eps: f64,
    pub rope_base: f64,
    /// The output projection is the token embedding (no `output.weight` in the file).
    pub tied_embeddings: bool,
}

impl LlamaSpec {
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Reads and checks the hyper-parameters; any other architecture is refused by name.
    pub fn from_file(file: &GgufFile) -> Result<LlamaSpec> {
        let metadata = file.metadata();
        let architecture = metadata.str("general.architecture")?;
        if architecture != "llama" {
            return Err(GgufError::BadMetadata {
                key: "general.architecture".into(),
                problem: format!("{architecture:?} is not supported (Flotilla's decoder is \"llama\")"),
            });
        }
        let get = |key: &str| -> Result<usize> { Ok(metadata.u64(&format!("llama.{key}"))? as usize) };
        let vocab = match metadata.get("llama.vocab_size").and_then(|v| v.as_u64()) {
            Some(v) => v as usize,
            None => metadata.strings("tokenizer.ggml.tokens")?.len(),
        };
        let spec = LlamaSpec {
            layers: get("block_count")?,
            hidden: get("embedding_length")?,
            intermediate: get("feed_forward_length")?,
            heads: get("attention.head_count")?,
            kv_heads: get("attention.head_count_kv").or_else(|_| get("attention.head_count"))?,
            vocab,
            context: get("context_length")?,
            rms_eps: metadata.f64("llama.attention.layer_norm_rms_epsilon")?,
            rope_base: metadata.get("llama.rope.freq_base").and_then(|v| v.as_f64()).unwrap_or(10_000.0),
            tied_embeddings: file.tensor_info("output.weight").is_err(),
        };
        spec.check(metadata)?;
        Ok(spec)
    }

    fn check(&self, metadata: &Metadata) -> Result<()> {
        let bad = |key: &str, problem: String| GgufError::BadMetadata { key: key.into(), problem };
        let limits = [
            ("llama.block_count", self.layers, 1, 256),
            ("llama.embedding_length", self.hidden, 1, 1 << 16),
            ("llama.feed_forward_length", self.intermediate, 1, 1 << 18),
            ("llama.attention.head_count", self.heads, 1, 1024),
            ("llama.attention.head_count_kv", self.kv_heads, 1, 1024),
            ("llama.vocab_size", self.vocab, 1, 1 << 20),
            ("llama.context_length", self.context, 1, 1 << 24),
        ];
        for (key, value, low, high) in limits {
            if !(low..=high).contains(&value) {
                return Err(bad(key, format!("{value} is outside {low}..={high}")));
            }
        }
        if !self.hidden.is_multiple_of(self.heads) || !self.head_dim().is_multiple_of(2) {
            return Err(bad(
                "llama.attention.head_count",
                format!("{} heads do not split {} into even head dimensions", self.heads, self.hidden),
            ));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(bad(
                "llama.attention.head_count_kv",
                format!("{} key/value heads do not divide {} heads", self.kv_heads, self.heads),
            ));
        }
        if let Some(rope) = metadata.get("llama.rope.dimension_count").and_then(|v| v.as_u64()) {
            if rope as usize != self.head_dim() {
                return Err(bad(
                    "llama.rope.dimension_count",
                    format!("{rope}, but the head dimension is {} (partial rotary is not supported)", self.head_dim()),
                ));
            }
        }
        let usable = self.rms_eps > 0.0 && self.rms_eps < 1.0 && self.rope_base > 1.0 && self.rope_base.is_finite();
        if !usable {
            return Err(bad(
                "llama.attention.layer_norm_rms_epsilon",
                format!("ε {} or RoPE base {} is not usable", self.rms_eps, self.rope_base),
            ));
        }
        Ok(())
    }

    /// Every base tensor by HF name (`model.layers.0.self_attn.q_proj.weight`), with its GGUF name
    /// and the PyTorch shape it must have.
    pub fn tensors(&self) -> Vec<(String, String, Vec<i64>)> {
        let (h, i, v) = (self.hidden as i64, self.intermediate as i64, self.vocab as i64);
        let kv = (self.kv_heads * self.head_dim()) as i64;
        let mut out = vec![
            ("model.embed_tokens.weight".to_string(), "token_embd.weight".to_string(), vec![v, h]),
            ("model.norm.weight".to_string(), "output_norm.weight".to_string(), vec![h]),
        ];
        if !self.tied_embeddings {
            out.push(("lm_head.weight".to_string(), "output.weight".to_string(), vec![v, h]));
        }
        for layer in 0..self.layers {
            let (hf, gg) = (format!("model.layers.{layer}"), format!("blk.{layer}"));
            for (hf_name, gguf_name, shape) in [
                ("input_layernorm", "attn_norm", vec![h]),
                ("self_attn.q_proj", "attn_q", vec![h, h]),
                ("self_attn.k_proj", "attn_k", vec![kv, h]),
                ("self_attn.v_proj", "attn_v", vec![kv, h]),
                ("self_attn.o_proj", "attn_output", vec![h, h]),
                ("post_attention_layernorm", "ffn_norm", vec![h]),
                ("mlp.gate_proj", "ffn_gate", vec![i, h]),
                ("mlp.up_proj", "ffn_up", vec![i, h]),
                ("mlp.down_proj", "ffn_down", vec![h, i]),
            ] {
                out.push((format!("{hf}.{hf_name}.weight"), format!("{gg}.{gguf_name}.weight"), shape));
            }
        }
        out
    }

    /// One base tensor in HF's layout: dequantized, shape-checked, and for `attn_q`/`attn_k` with
    /// the rows put back in the order HF's rotary attention expects.
    pub fn read_tensor(&self, file: &GgufFile, gguf_name: &str, shape: &[i64]) -> Result<DenseTensor> {
        let mut tensor = file.tensor_f32(gguf_name)?;
        if tensor.shape != shape {
            return Err(GgufError::BadTensor {
                name: gguf_name.into(),
                problem: format!("shape {:?}, but the metadata implies {shape:?}", tensor.shape),
            });
        }
        if gguf_name.ends_with("attn_q.weight") {
            tensor.values = unpermute_rotary_rows(&tensor.values, self.heads, self.head_dim(), self.hidden);
        } else if gguf_name.ends_with("attn_k.weight") {
            tensor.values = unpermute_rotary_rows(&tensor.values, self.kv_heads, self.head_dim(), self.hidden);
        }
        Ok(tensor)
    }
}

/// llama.cpp's converter interleaves each head's two rotary halves (row `2i + j` of a head holds
/// HF's row `j·d/2 + i`); this undoes it for a `[heads·d, columns]` weight (or any per-row data,
/// such as a quantized weight's blocks).
pub fn unpermute_rotary_rows<T: Copy + Default>(values: &[T], heads: usize, head_dim: usize, columns: usize) -> Vec<T> {
    let half = head_dim / 2;
    let mut out = vec![T::default(); values.len()];
    for head in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let from = (head * head_dim + 2 * i + j) * columns;
                let to = (head * head_dim + j * half + i) * columns;
                out[to..to + columns].copy_from_slice(&values[from..from + columns]);
            }
        }
    }
    out
}

/// A 4-bit weight kept as it is stored: per block of 32, a scale and a minimum (w = scale·q +
/// minimum; Q4_0's minimum is −8·scale) and 16 bytes of nibbles in ggml's order. Rows are
/// `[out]`, blocks per row `in / 32`.
#[derive(Debug, Clone, PartialEq)]
pub struct Q4Parts {
    pub rows: usize,
    pub blocks_per_row: usize,
    pub scales: Vec<f32>,
    pub minimums: Vec<f32>,
    pub nibbles: Vec<u8>,
}

impl LlamaSpec {
    /// A projection weight in its 4-bit blocks, rows in HF's order; `None` when the file does not
    /// store it as Q4_0 or Q4_1 (it is then read dense).
    pub fn read_q4(&self, file: &GgufFile, gguf_name: &str, shape: &[i64]) -> Result<Option<Q4Parts>> {
        let (info, bytes) = file.tensor_bytes(gguf_name)?;
        let kind = info.kind()?;
        if !matches!(kind, TensorType::Q4_0 | TensorType::Q4_1) || shape.len() != 2 {
            return Ok(None);
        }
        if info.shape() != shape {
            return Err(GgufError::BadTensor {
                name: gguf_name.into(),
                problem: format!("shape {:?}, but the metadata implies {shape:?}", info.shape()),
            });
        }
        let (rows, blocks_per_row) = (shape[0] as usize, shape[1] as usize / 32);
        let block_bytes = kind.block().1 as usize;
        let half = |b: &[u8], at: usize| half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        let mut parts = Q4Parts { rows, blocks_per_row, scales: Vec::new(), minimums: Vec::new(), nibbles: Vec::new() };
        for block in bytes.chunks_exact(block_bytes) {
            let scale = half(block, 0);
            let (minimum, packed) = match kind {
                TensorType::Q4_1 => (half(block, 2), &block[4..20]),
                _ => (-8.0 * scale, &block[2..18]),
            };
            parts.scales.push(scale);
            parts.minimums.push(minimum);
            parts.nibbles.extend_from_slice(packed);
        }
        let heads = if gguf_name.ends_with("attn_q.weight") {
            Some(self.heads)
        } else if gguf_name.ends_with("attn_k.weight") {
            Some(self.kv_heads)
        } else {
            None
        };
        if let Some(heads) = heads {
            let dim = self.head_dim();
            parts.scales = unpermute_rotary_rows(&parts.scales, heads, dim, blocks_per_row);
            parts.minimums = unpermute_rotary_rows(&parts.minimums, heads, dim, blocks_per_row);
            parts.nibbles = unpermute_rotary_rows(&parts.nibbles, heads, dim, blocks_per_row * 16);
        }
        Ok(Some(parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_rows_come_back_in_halves() {
        // One head of dimension 4, one column: stored order [x0, y0, x1, y1] → HF [x0, x1, y0, y1].
        assert_eq!(unpermute_rotary_rows(&[0.0, 10.0, 1.0, 11.0], 1, 4, 1), [0.0, 1.0, 10.0, 11.0]);
        // Two heads keep to themselves; columns move with their row.
        let stored = [0., 0., 10., 10., 1., 1., 11., 11., 20., 20., 30., 30., 21., 21., 31., 31.];
        let hf = unpermute_rotary_rows(&stored, 2, 4, 2);
        assert_eq!(hf, [0., 0., 1., 1., 10., 10., 11., 11., 20., 20., 21., 21., 30., 30., 31., 31.]);
    }
}
