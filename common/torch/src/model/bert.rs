//! A BERT-family encoder (HF `BertModel`, eval mode) in tch, with LoRA on the targeted linear
//! modules and the configured pooling. Base tensors use HF's names without the `bert.` prefix
//! (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, ...);
//! adapter modules use PEFT's names under `BertForSequenceClassification`
//! (`bert.encoder.layer.0.attention.self.query`).
//!
//! Dropout is not applied (training is deterministic given its seed); the rest is HF's forward:
//! word + position + token-type-0 embeddings and LayerNorm; per layer, scaled dot-product
//! attention with the padding mask, output projection, residual and LayerNorm, then the
//! feed-forward block with the configured activation, residual and LayerNorm.

use flotilla_wire::model::{Activation, BertSpec, Pooling};
use tch::{Device, Kind, TchError, Tensor};

use super::{BaseWeights, Lora, ModelError};
use crate::data::seeded_uniform;

/// Prefix of the adapted modules' names (PEFT, under `BertForSequenceClassification`).
pub const ADAPTED_PREFIX: &str = "bert.";

/// Every base tensor the encoder needs, with its shape.
pub(super) fn base_shapes(spec: &BertSpec) -> Vec<(String, Vec<i64>)> {
    let (h, i) = (spec.hidden as i64, spec.intermediate as i64);
    let mut shapes = vec![
        ("embeddings.word_embeddings.weight".to_string(), vec![spec.vocab as i64, h]),
        ("embeddings.position_embeddings.weight".to_string(), vec![spec.max_positions as i64, h]),
        ("embeddings.token_type_embeddings.weight".to_string(), vec![spec.type_vocab as i64, h]),
        ("embeddings.LayerNorm.weight".to_string(), vec![h]),
        ("embeddings.LayerNorm.bias".to_string(), vec![h]),
    ];
    for layer in 0..spec.layers {
        let p = format!("encoder.layer.{layer}");
        for (module, d_in, d_out) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", h, i),
            ("output.dense", i, h),
        ] {
            shapes.push((format!("{p}.{module}.weight"), vec![d_out, d_in]));
            shapes.push((format!("{p}.{module}.bias"), vec![d_out]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{p}.{norm}.weight"), vec![h]));
            shapes.push((format!("{p}.{norm}.bias"), vec![h]));
        }
    }
    if spec.pooling == Pooling::Cls {
        shapes.push(("pooler.dense.weight".to_string(), vec![h, h]));
        shapes.push(("pooler.dense.bias".to_string(), vec![h]));
    }
    shapes
}

/// The base tensor name of an adapted module's weight (`bert.encoder...query` → `encoder...query.weight`).
pub(super) fn base_weight_name(module: &str) -> String {
    format!("{}.weight", module.strip_prefix(ADAPTED_PREFIX).unwrap_or(module))
}

/// A randomly initialised encoder (BERT's init: N(0, 0.02)-like weights, here uniform with that
/// standard deviation; LayerNorm at one and zero), reproducible from `seed`: for tests and for
/// trying the system without a checkpoint.
pub(super) fn init_base(spec: &BertSpec, seed: u64) -> BaseWeights {
    let bound = 0.02 * 3f64.sqrt();
    base_shapes(spec)
        .into_iter()
        .enumerate()
        .map(|(k, (name, shape))| {
            let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
            let tensor = if name.ends_with("LayerNorm.weight") {
                Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
            } else if name.ends_with(".bias") {
                Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu))
            } else {
                seeded_uniform(&dims, bound, seed.wrapping_mul(10_007).wrapping_add(k as u64))
            };
            (name, tensor)
        })
        .collect()
}

/// Checks that `base` has every tensor the encoder needs, with the right shape and as f32.
pub(super) fn check_base(spec: &BertSpec, base: &BaseWeights) -> Result<(), ModelError> {
    base_shapes(spec).into_iter().try_for_each(|(name, want)| super::check_dense(base, name, want))
}

/// The padding mask: `true` where a position holds a real token (`positions < length`), `[B, L]`.
pub(super) fn padding_mask(lengths: &Tensor, seq_len: i64) -> Result<Tensor, TchError> {
    let positions = Tensor::f_arange(seq_len, (Kind::Int64, lengths.device()))?;
    positions.f_unsqueeze(0)?.f_lt_tensor(&lengths.f_unsqueeze(1)?)
}

/// The pooled encoding of the base encoder alone (no LoRA), `[B, hidden]`: what parity with HF's
/// `BertModel` is checked on.
pub fn pooled(spec: &BertSpec, weights: &BaseWeights, ids: &Tensor, lengths: &Tensor) -> Result<Tensor, ModelError> {
    tch::no_grad(|| encode(spec, weights, None, ids, lengths))
}

/// The pooled encoding `[B, hidden]` of token ids `[B, L]` whose real lengths are `lengths` `[B]`.
pub(super) fn encode(
    spec: &BertSpec,
    weights: &BaseWeights,
    lora: Option<&Lora>,
    ids: &Tensor,
    lengths: &Tensor,
) -> Result<Tensor, ModelError> {
    let get = |name: &str| weights.get(name).ok_or_else(|| ModelError::Missing(name.to_string()));
    let (batch, seq_len) = ids.size2()?;
    let hidden = spec.hidden as i64;
    let mask = padding_mask(lengths, seq_len)?;

    let words = get("embeddings.word_embeddings.weight")?.f_index_select(0, &ids.f_flatten(0, -1)?)?;
    let positions = get("embeddings.position_embeddings.weight")?.f_narrow(0, 0, seq_len)?;
    let token_type = get("embeddings.token_type_embeddings.weight")?.f_get(0)?;
    let embedded = words.f_view([batch, seq_len, hidden])?.f_add(&positions)?.f_add(&token_type)?;
    let mut h = layer_norm(spec, &embedded, weights, "embeddings.LayerNorm")?;

    let heads = spec.heads as i64;
    let head_dim = hidden / heads;
    // [B, 1, 1, L]: every query attends to the real tokens only. A batch without padding needs no
    // mask, which lets libtorch pick its unmasked attention kernel.
    let padded = batch > 0 && lengths.f_min()?.f_int64_value(&[])? < seq_len;
    let attention_mask = if padded { Some(mask.f_view([batch, 1, 1, seq_len])?) } else { None };
    for layer in 0..spec.layers {
        let p = format!("encoder.layer.{layer}");
        let split = |t: Tensor| t.f_view([batch, seq_len, heads, head_dim])?.f_transpose(1, 2);
        let q = split(linear(&h, weights, lora, &format!("{p}.attention.self.query"))?)?;
        let k = split(linear(&h, weights, lora, &format!("{p}.attention.self.key"))?)?;
        let v = split(linear(&h, weights, lora, &format!("{p}.attention.self.value"))?)?;
        let context =
            Tensor::f_scaled_dot_product_attention(&q, &k, &v, attention_mask.as_ref(), 0.0, false, None, false)?
                .f_transpose(1, 2)?
                .f_reshape([batch, seq_len, hidden])?;
        let attended = linear(&context, weights, lora, &format!("{p}.attention.output.dense"))?.f_add(&h)?;
        let attended = layer_norm(spec, &attended, weights, &format!("{p}.attention.output.LayerNorm"))?;
        let inner =
            activation(spec.activation, &linear(&attended, weights, lora, &format!("{p}.intermediate.dense"))?)?;
        let out = linear(&inner, weights, lora, &format!("{p}.output.dense"))?.f_add(&attended)?;
        h = layer_norm(spec, &out, weights, &format!("{p}.output.LayerNorm"))?;
    }
    Ok(match spec.pooling {
        Pooling::Cls => {
            h.f_select(1, 0)?.f_linear(get("pooler.dense.weight")?, Some(get("pooler.dense.bias")?))?.f_tanh()?
        }
        Pooling::Mean => {
            let weights = mask.f_to_kind(h.kind())?.f_unsqueeze(-1)?;
            let counts = weights.f_sum_dim_intlist(1, false, h.kind())?.f_clamp_min(1.0)?;
            h.f_mul(&weights)?.f_sum_dim_intlist(1, false, h.kind())?.f_div(&counts)?
        }
    })
}

/// `x·Wᵀ + b`, plus `scale·(x·Aᵀ)·Bᵀ` when the module (`encoder.layer.0.attention.self.query`) is adapted.
fn linear(x: &Tensor, weights: &BaseWeights, lora: Option<&Lora>, module: &str) -> Result<Tensor, ModelError> {
    let get = |name: String| weights.get(&name).ok_or(ModelError::Missing(name));
    let out = x.f_linear(get(format!("{module}.weight"))?, Some(get(format!("{module}.bias"))?))?;
    let adapted = lora.and_then(|l| l.factors.get(&format!("{ADAPTED_PREFIX}{module}")).map(|f| (f, l.scale)));
    Ok(match adapted {
        Some(((a, b), scale)) => out.f_add(&x.f_matmul(&a.f_tr()?)?.f_matmul(&b.f_tr()?)?.f_mul_scalar(scale)?)?,
        None => out,
    })
}

fn layer_norm(spec: &BertSpec, x: &Tensor, weights: &BaseWeights, module: &str) -> Result<Tensor, ModelError> {
    let get = |name: String| weights.get(&name).ok_or(ModelError::Missing(name));
    Ok(x.f_layer_norm(
        [spec.hidden as i64],
        Some(get(format!("{module}.weight"))?),
        Some(get(format!("{module}.bias"))?),
        spec.layer_norm_eps,
        false,
    )?)
}

fn activation(kind: Activation, x: &Tensor) -> Result<Tensor, TchError> {
    match kind {
        Activation::Gelu => x.f_gelu("none"),
        Activation::GeluTanh => x.f_gelu("tanh"),
        Activation::Relu => x.f_relu(),
    }
}
