//! A Llama-family decoder (HF `LlamaForCausalLM`, eval mode) in tch, loaded from GGUF, with LoRA
//! on the targeted projections. Base tensors use HF's names (`model.layers.0.self_attn.q_proj.weight`);
//! adapter modules PEFT's under `LlamaForCausalLM` (`model.layers.0.self_attn.q_proj`).
//!
//! The forward is HF's: token embedding; per layer RMSNorm, grouped-query attention with rotary
//! position embedding (`rotate_half` form) and a causal mask, residual, RMSNorm, SwiGLU MLP,
//! residual; a final RMSNorm and the (tied) output projection. Inputs are right-padded, so the
//! causal mask alone keeps every real position from seeing padding.

use flotilla_gguf::{GgufFile, LlamaSpec};
use flotilla_wire::model::DecoderSpec;
use tch::{Device, Kind, Tensor};

use super::{BaseWeights, Lora, ModelError};
use crate::data::seeded_uniform;

/// The GGUF reader's description of the decoder a run's spec names.
pub fn llama_spec(spec: &DecoderSpec) -> LlamaSpec {
    LlamaSpec {
        layers: spec.layers as usize,
        hidden: spec.hidden as usize,
        intermediate: spec.intermediate as usize,
        heads: spec.heads as usize,
        kv_heads: spec.kv_heads as usize,
        vocab: spec.vocab as usize,
        context: spec.context as usize,
        rms_eps: spec.rms_eps,
        rope_base: spec.rope_base,
        tied_embeddings: spec.tied_embeddings,
    }
}

/// A run's spec from the file's description and the fine-tuning settings.
pub fn decoder_spec(
    llama: &LlamaSpec,
    target_modules: Vec<String>,
    max_length: u32,
    labels: Vec<String>,
) -> DecoderSpec {
    DecoderSpec {
        layers: llama.layers as u32,
        hidden: llama.hidden as u32,
        intermediate: llama.intermediate as u32,
        heads: llama.heads as u32,
        kv_heads: llama.kv_heads as u32,
        vocab: llama.vocab as u32,
        context: llama.context as u32,
        rms_eps: llama.rms_eps,
        rope_base: llama.rope_base,
        tied_embeddings: llama.tied_embeddings,
        target_modules,
        max_length,
        labels,
        task: flotilla_wire::model::DecoderTask::Headline,
    }
}

/// A randomly initialised decoder (uniform weights with standard deviation 0.02, norms at one),
/// reproducible from `seed`: what the probe times steps with.
pub(super) fn init_base(spec: &DecoderSpec, seed: u64) -> BaseWeights {
    let bound = 0.02 * 3f64.sqrt();
    llama_spec(spec)
        .tensors()
        .into_iter()
        .enumerate()
        .map(|(k, (name, _, shape))| {
            let tensor = if shape.len() == 1 {
                Tensor::ones(shape.as_slice(), (Kind::Float, Device::Cpu))
            } else {
                let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                seeded_uniform(&dims, bound, seed.wrapping_mul(10_007).wrapping_add(k as u64))
            };
            (name, tensor)
        })
        .collect()
}

/// Checks that `base` has every tensor the decoder needs, with the right shape and as f32 (or a
/// projection held 4-bit, `super::quantized`).
pub(super) fn check_base(spec: &DecoderSpec, base: &BaseWeights) -> Result<(), ModelError> {
    for (name, _, want) in llama_spec(spec).tensors() {
        if super::quantized::is_q4(base, &name) {
            let got = super::quantized::shape(base, &name).unwrap_or_default();
            if got != want {
                return Err(ModelError::Shape { name, got, want });
            }
            continue;
        }
        super::check_dense(base, name, want)?;
    }
    Ok(())
}

/// The base tensors of the decoder in `file` (HF names), dequantized to f32 on the CPU.
pub fn load_base(file: &GgufFile) -> Result<(LlamaSpec, BaseWeights), ModelError> {
    let spec = LlamaSpec::from_file(file)?;
    let mut weights = BaseWeights::new();
    for (hf_name, gguf_name, shape) in spec.tensors() {
        let dense = spec.read_tensor(file, &gguf_name, &shape)?;
        weights.insert(hf_name, Tensor::f_from_slice(&dense.values)?.f_view(shape.as_slice())?);
    }
    Ok((spec, weights))
}

/// The decoder's frozen base, in f32, on one device.
pub struct Decoder {
    pub spec: LlamaSpec,
    pub weights: BaseWeights,
    device: Device,
}

/// Keys and values of the positions seen so far, per layer (`[B, kv_heads, T, head_dim]`, after RoPE).
#[derive(Default)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn len(&self) -> i64 {
        self.layers.first().map_or(0, |(k, _)| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Decoder {
    /// Dequantizes every base tensor to f32 onto `device`; a missing tensor or a shape the metadata
    /// does not imply is refused by name.
    pub fn load(file: &GgufFile, device: Device) -> Result<Decoder, ModelError> {
        let (spec, weights) = load_base(file)?;
        Decoder::from_weights(spec, &weights, device)
    }

    /// The decoder over base tensors already loaded (shared, not copied, on the CPU).
    pub fn from_weights(spec: LlamaSpec, weights: &BaseWeights, device: Device) -> Result<Decoder, ModelError> {
        let weights = weights
            .iter()
            .map(|(name, tensor)| Ok((name.clone(), tensor.f_to_device(device)?)))
            .collect::<Result<BaseWeights, ModelError>>()?;
        Ok(Decoder { spec, weights, device })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn get(&self, name: &str) -> Result<&Tensor, ModelError> {
        self.weights.get(name).ok_or_else(|| ModelError::Missing(name.to_string()))
    }

    /// Logits `[B, L, vocab]` for right-padded token ids `[B, L]`.
    pub fn logits(&self, ids: &Tensor, lora: Option<&Lora>) -> Result<Tensor, ModelError> {
        let hidden = self.hidden_states(ids, lora, None)?;
        self.project(&hidden)
    }

    /// Logits of the next token `[B, vocab]` after `ids` `[B, n]`, reusing and extending `cache`.
    pub fn next_logits(&self, ids: &Tensor, lora: Option<&Lora>, cache: &mut KvCache) -> Result<Tensor, ModelError> {
        let hidden = self.hidden_states(ids, lora, Some(cache))?;
        let last = hidden.f_select(1, hidden.size()[1] - 1)?;
        self.project(&last)
    }

    /// The final normalized hidden states `[B, L, hidden]` of right-padded ids `[B, L]`.
    pub fn hidden(&self, ids: &Tensor, lora: Option<&Lora>) -> Result<Tensor, ModelError> {
        self.hidden_states(ids, lora, None)
    }

    /// Logits of hidden states (any leading shape).
    pub fn project(&self, hidden: &Tensor) -> Result<Tensor, ModelError> {
        let output = if self.spec.tied_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
        Ok(hidden.f_linear::<&Tensor>(self.get(output)?, None)?)
    }

    /// The final normalized hidden states `[B, n, hidden]`.
    fn hidden_states(
        &self,
        ids: &Tensor,
        lora: Option<&Lora>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        let (_, length) = ids.size2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if past + length > self.spec.context as i64 {
            return Err(ModelError::Unsupported(format!(
                "{} tokens exceed the decoder's context of {}",
                past + length,
                self.spec.context
            )));
        }
        let mut h = self.embed(ids)?;
        let rotary = self.rotary(past, length)?;
        for layer in 0..self.spec.layers {
            let layer_cache = cache.as_deref_mut().map(|c| (c, layer));
            h = self.block(layer, &h, lora, (&rotary.0, &rotary.1), layer_cache)?;
        }
        self.final_norm(&h)
    }

    /// Token embeddings `[B, L, hidden]` of ids `[B, L]`.
    pub(crate) fn embed(&self, ids: &Tensor) -> Result<Tensor, ModelError> {
        let (batch, length) = ids.size2()?;
        let embedding = self.get("model.embed_tokens.weight")?;
        Ok(embedding.f_index_select(0, &ids.f_flatten(0, -1)?)?.f_view([batch, length, self.spec.hidden as i64])?)
    }

    /// One decoder layer: attention and MLP, each with its residual.
    pub(crate) fn block(
        &self,
        layer: usize,
        h: &Tensor,
        lora: Option<&Lora>,
        rotary: (&Tensor, &Tensor),
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor, ModelError> {
        let p = format!("model.layers.{layer}");
        let normed = self.rms_norm(h, &format!("{p}.input_layernorm.weight"))?;
        let h = h.f_add(&self.attention(&normed, lora, &p, rotary, cache)?)?;
        let normed = self.rms_norm(&h, &format!("{p}.post_attention_layernorm.weight"))?;
        let gate = self.linear(&normed, lora, &format!("{p}.mlp.gate_proj"))?.f_silu()?;
        let up = self.linear(&normed, lora, &format!("{p}.mlp.up_proj"))?;
        Ok(h.f_add(&self.linear(&gate.f_mul(&up)?, lora, &format!("{p}.mlp.down_proj"))?)?)
    }

    pub(crate) fn final_norm(&self, h: &Tensor) -> Result<Tensor, ModelError> {
        self.rms_norm(h, "model.norm.weight")
    }

    fn attention(
        &self,
        x: &Tensor,
        lora: Option<&Lora>,
        prefix: &str,
        rotary: (&Tensor, &Tensor),
        cache: Option<(&mut KvCache, usize)>,
    ) -> Result<Tensor, ModelError> {
        let (batch, length, _) = x.size3()?;
        let head_dim = self.spec.head_dim() as i64;
        let split = |t: Tensor, heads: usize| t.f_view([batch, length, heads as i64, head_dim])?.f_transpose(1, 2);
        let q = split(self.linear(x, lora, &format!("{prefix}.self_attn.q_proj"))?, self.spec.heads)?;
        let k = split(self.linear(x, lora, &format!("{prefix}.self_attn.k_proj"))?, self.spec.kv_heads)?;
        let v = split(self.linear(x, lora, &format!("{prefix}.self_attn.v_proj"))?, self.spec.kv_heads)?;
        let (q, mut k, mut v) = (apply_rotary(&q, rotary)?, apply_rotary(&k, rotary)?, v);
        let mut has_past = false;
        if let Some((cache, layer)) = cache {
            if let Some((past_k, past_v)) = cache.layers.get(layer) {
                has_past = true;
                k = Tensor::f_cat(&[past_k, &k], 2)?;
                v = Tensor::f_cat(&[past_v, &v], 2)?;
            }
            let entry = (k.shallow_clone(), v.shallow_clone());
            if layer < cache.layers.len() {
                cache.layers[layer] = entry;
            } else {
                cache.layers.push(entry);
            }
        }
        // New positions attend causally among themselves and to every cached one; one new position
        // after a cache needs no mask at all.
        let causal = !(has_past && length == 1);
        let mask = if causal && has_past { Some(self.mask_after_past(length, k.size()[2])?) } else { None };
        let context = Tensor::f_scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            0.0,
            causal && mask.is_none(),
            None,
            true,
        )?;
        let context = context.f_transpose(1, 2)?.f_reshape([batch, length, self.spec.hidden as i64])?;
        self.linear(&context, lora, &format!("{prefix}.self_attn.o_proj"))
    }

    /// `[length, total]`: new position i (at absolute total − length + i) sees keys up to itself.
    fn mask_after_past(&self, length: i64, total: i64) -> Result<Tensor, ModelError> {
        let options = (Kind::Int64, self.device);
        let rows = Tensor::f_arange(length, options)?.f_add_scalar(total - length)?.f_unsqueeze(1)?;
        let columns = Tensor::f_arange(total, options)?.f_unsqueeze(0)?;
        Ok(columns.f_le_tensor(&rows)?)
    }

    /// cos and sin `[1, 1, length, head_dim]` for positions `past..past + length` (HF's float32 recipe).
    pub(crate) fn rotary(&self, past: i64, length: i64) -> Result<(Tensor, Tensor), ModelError> {
        let dim = self.spec.head_dim() as i64;
        let options = (Kind::Float, self.device);
        let exponents = Tensor::f_arange_start_step(0, dim, 2, (Kind::Int64, self.device))?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(dim as f64)?;
        let inverse_frequencies = Tensor::f_pow_scalar(self.spec.rope_base, &exponents)?.f_reciprocal()?;
        let positions = Tensor::f_arange_start(past, past + length, options)?;
        let angles = positions.f_outer(&inverse_frequencies)?;
        let angles = Tensor::f_cat(&[&angles, &angles], -1)?.f_view([1, 1, length, dim])?;
        Ok((angles.f_cos()?, angles.f_sin()?))
    }

    fn rms_norm(&self, x: &Tensor, weight: &str) -> Result<Tensor, ModelError> {
        let variance = x.f_pow_tensor_scalar(2)?.f_mean_dim(-1, true, Kind::Float)?;
        let normed = x.f_mul(&variance.f_add_scalar(self.spec.rms_eps)?.f_rsqrt()?)?;
        Ok(normed.f_mul(self.get(weight)?)?)
    }

    /// `x·Wᵀ`, plus `scale·(x·Aᵀ)·Bᵀ` when the module is adapted.
    fn linear(&self, x: &Tensor, lora: Option<&Lora>, module: &str) -> Result<Tensor, ModelError> {
        // A 4-bit weight is dequantized here, for this call only.
        let weight = super::quantized::dense(&self.weights, &format!("{module}.weight"))?;
        let out = x.f_linear::<&Tensor>(&weight, None)?;
        let adapted = lora.and_then(|l| l.factors.get(module).map(|f| (f, l.scale)));
        Ok(match adapted {
            Some(((a, b), scale)) => out.f_add(&x.f_matmul(&a.f_tr()?)?.f_matmul(&b.f_tr()?)?.f_mul_scalar(scale)?)?,
            None => out,
        })
    }

    /// Greedy decoding: `prompt` then up to `max_new` tokens, stopping after `stop` if given.
    pub fn generate_greedy(
        &self,
        prompt: &[i64],
        max_new: usize,
        stop: Option<i64>,
        lora: Option<&Lora>,
    ) -> Result<Vec<i64>, ModelError> {
        tch::no_grad(|| {
            let mut cache = KvCache::default();
            let mut generated = Vec::with_capacity(max_new);
            let mut input = Tensor::f_from_slice(prompt)?.f_view([1, prompt.len() as i64])?.f_to_device(self.device)?;
            for _ in 0..max_new {
                let logits = self.next_logits(&input, lora, &mut cache)?;
                let next = logits.f_argmax(-1, false)?.f_int64_value(&[0])?;
                generated.push(next);
                if Some(next) == stop {
                    break;
                }
                input = Tensor::f_from_slice(&[next])?.f_view([1, 1])?.f_to_device(self.device)?;
            }
            Ok(generated)
        })
    }
}

/// `x·cos + rotate_half(x)·sin`, where `rotate_half` maps the halves `(x1, x2)` to `(−x2, x1)`.
fn apply_rotary(x: &Tensor, (cos, sin): (&Tensor, &Tensor)) -> Result<Tensor, ModelError> {
    let half = x.size()[3] / 2;
    let (first, second) = (x.f_narrow(3, 0, half)?, x.f_narrow(3, half, half)?);
    let rotated = Tensor::f_cat(&[&second.f_neg()?, &first], 3)?;
    Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
}
