//! A decoder's frozen projections kept 4-bit (QLoRA's memory shape): each weight stays as its
//! GGUF blocks — nibbles, scales, minimums — beside the dense tensors in the base, and is
//! dequantized by libtorch when a layer runs, so only the layer at hand exists in f32.
//!
//! In a base, a 4-bit weight `W` appears as three tensors: `W.q4_nibbles` (u8 `[rows, blocks, 16]`),
//! `W.q4_scales` and `W.q4_minimums` (f32 `[rows, blocks, 1]`); `w = scale·q + minimum` for the
//! nibble `q`, in ggml's order (a block's byte i holds weight i low and weight i + 16 high).

use flotilla_gguf::{GgufFile, LlamaSpec, Q4Parts};
use tch::{Kind, Tensor};

use super::{BaseWeights, ModelError};

const NIBBLES: &str = "q4_nibbles";
const SCALES: &str = "q4_scales";
const MINIMUMS: &str = "q4_minimums";

fn part(name: &str, which: &str) -> String {
    format!("{name}.{which}")
}

/// Whether `weights` hold `name` 4-bit.
pub fn is_q4(weights: &BaseWeights, name: &str) -> bool {
    weights.contains_key(&part(name, NIBBLES))
}

/// Whether any weight of `weights` is held 4-bit.
pub fn any_q4(weights: &BaseWeights) -> bool {
    weights.keys().any(|k| k.ends_with(NIBBLES))
}

fn insert(weights: &mut BaseWeights, name: &str, parts: &Q4Parts) -> Result<(), ModelError> {
    let (rows, blocks) = (parts.rows as i64, parts.blocks_per_row as i64);
    weights.insert(part(name, NIBBLES), Tensor::f_from_slice(&parts.nibbles)?.f_view([rows, blocks, 16])?);
    weights.insert(part(name, SCALES), Tensor::f_from_slice(&parts.scales)?.f_view([rows, blocks, 1])?);
    weights.insert(part(name, MINIMUMS), Tensor::f_from_slice(&parts.minimums)?.f_view([rows, blocks, 1])?);
    Ok(())
}

/// The f32 weight `name`: the dense tensor, or the 4-bit one dequantized now.
pub fn dense(weights: &BaseWeights, name: &str) -> Result<Tensor, ModelError> {
    if let Some(tensor) = weights.get(name) {
        return Ok(tensor.shallow_clone());
    }
    let get = |which: &str| weights.get(&part(name, which)).ok_or_else(|| ModelError::Missing(name.to_string()));
    let (nibbles, scales, minimums) = (get(NIBBLES)?, get(SCALES)?, get(MINIMUMS)?);
    let low = nibbles.f_bitwise_and(15)?;
    let high = nibbles.f_bitwise_right_shift_tensor_scalar(4)?;
    let values = Tensor::f_cat(&[&low, &high], 2)?.f_to_kind(Kind::Float)?;
    let rows = nibbles.size()[0];
    Ok(values.f_mul(scales)?.f_add(minimums)?.f_view([rows, -1])?)
}

/// The shape a weight of `weights` has, dense or 4-bit.
pub fn shape(weights: &BaseWeights, name: &str) -> Option<Vec<i64>> {
    if let Some(tensor) = weights.get(name) {
        return Some(tensor.size());
    }
    let nibbles = weights.get(&part(name, NIBBLES))?.size();
    Some(vec![nibbles[0], nibbles[1] * 32])
}

/// The decoder in `file` with its 4-bit projections kept 4-bit (the rest dequantized to f32).
pub fn load_base_q4(file: &GgufFile) -> Result<(LlamaSpec, BaseWeights), ModelError> {
    let spec = LlamaSpec::from_file(file)?;
    let mut weights = BaseWeights::new();
    for (hf_name, gguf_name, shape) in spec.tensors() {
        let is_projection = hf_name.starts_with("model.layers.") && shape.len() == 2;
        match if is_projection { spec.read_q4(file, &gguf_name, &shape)? } else { None } {
            Some(parts) => insert(&mut weights, &hf_name, &parts)?,
            None => {
                let dense = spec.read_tensor(file, &gguf_name, &shape)?;
                weights.insert(hf_name, Tensor::f_from_slice(&dense.values)?.f_view(shape.as_slice())?);
            }
        }
    }
    Ok((spec, weights))
}
