//! A plain LoRA, loadable by PEFT, for an adapter that carries merged deltas.
//!
//! Online FLoRA's global adapter holds, per module, a dense merged update D next to its factors,
//! so the module computes `W0·x + (D + s·B·A)·x`. PEFT's LoRA layout has no place for D: a PEFT
//! loader would report `…merged_delta` as an unexpected key, drop it and run a different model.
//! This writes the module's whole update T = D + s·B·A as factors instead, exactly: with the thin
//! SVD T = U·Σ·Vᵀ, `B' = U·√(Σ/s)` and `A' = √(Σ/s)·Vᵀ` give `s·B'·A' = T` at the same scale s.
//! The rank is the largest numerical rank of any module's T (singular values above
//! σ_max·max(d_out, d_in)·ε of f32, the usual cut-off for noise); modules of lower rank keep
//! their next components, which only makes them more exact, or zero slots past their size.
//! Cost: one f64 SVD per module, O(d_out·d_in·min(d_out, d_in)): the quickstart's whole export of
//! MiniLM's twelve 384 × 384 modules takes 0.8 s on one core.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::adapter::{lora_a_name, lora_b_name, tensor_role, Adapter, AdapterError, TensorRole};
use crate::tensor::{try_copy, TensorError};

/// The plain LoRA and how far it is from the adapter it stands for.
pub struct PlainLora {
    pub adapter: Adapter,
    /// The largest |s·B'·A' − T| over every module's values.
    pub largest_error: f64,
}

/// `adapter` without merged deltas, computing the same function at LoRA scale `scale`.
pub fn fold_merged_deltas(adapter: &Adapter, scale: f64) -> Result<PlainLora, AdapterError> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(AdapterError::Inconsistent(format!("LoRA scale {scale} is not a positive number")));
    }
    let mut decompositions = BTreeMap::new();
    let mut rank = 1;
    for module in adapter.modules() {
        let whole = whole_update(adapter, module, scale)?;
        // torch.svd gives V, not Vᵀ.
        let (u, sigma, vh) = whole
            .f_svd(true, true)
            .and_then(|(u, sigma, v)| Ok((u, sigma, v.f_transpose(0, 1)?)))
            .map_err(|source| torch(module, source))?;
        let (d_out, d_in) = (whole.size()[0], whole.size()[1]);
        let largest = sigma.f_max().and_then(|m| m.f_double_value(&[])).map_err(|source| torch(module, source))?;
        let cutoff = largest * d_out.max(d_in) as f64 * f64::from(f32::EPSILON);
        let kept = sigma.f_gt(cutoff).and_then(|k| k.f_sum(Kind::Int64)).map_err(|source| torch(module, source))?;
        rank = rank.max(i64::try_from(&kept).map_err(|source| torch(module, source))? as usize);
        decompositions.insert(module.clone(), (whole, u, sigma, vh));
    }
    let mut tensors = BTreeMap::new();
    let mut largest_error = 0f64;
    for (module, (whole, u, sigma, vh)) in &decompositions {
        let (a, b) = factors_of_rank(u, sigma, vh, rank, scale).map_err(|source| torch(module, source))?;
        let error = b
            .f_matmul(&a)
            .and_then(|p| p.f_mul_scalar(scale))
            .and_then(|p| (p - whole).f_abs())
            .and_then(|e| e.f_max())
            .and_then(|e| e.f_double_value(&[]))
            .map_err(|source| torch(module, source))?;
        largest_error = largest_error.max(error);
        tensors.insert(lora_a_name(module), a.f_to_kind(Kind::Float).map_err(|source| torch(module, source))?);
        tensors.insert(lora_b_name(module), b.f_to_kind(Kind::Float).map_err(|source| torch(module, source))?);
    }
    for (name, tensor) in adapter.tensors() {
        if tensor_role(name) == TensorRole::Other {
            let copy = try_copy(tensor).map_err(|source| TensorError::Torch { name: name.clone(), source })?;
            tensors.insert(name.clone(), copy);
        }
    }
    Ok(PlainLora { adapter: Adapter::new(tensors)?, largest_error })
}

/// T = D + s·B·A ([`Adapter::module_update`]), in f64 for the SVD.
fn whole_update(adapter: &Adapter, module: &str, scale: f64) -> Result<Tensor, AdapterError> {
    adapter
        .module_update(module, scale, Kind::Double)
        .ok_or_else(|| AdapterError::Inconsistent(format!("no module '{module}'")))?
        .map_err(|source| torch(module, source))
}

/// (A', B') of rank `rank` from the first components of U·Σ·Vᵀ, zero-padded past their count.
fn factors_of_rank(
    u: &Tensor,
    sigma: &Tensor,
    vh: &Tensor,
    rank: usize,
    scale: f64,
) -> Result<(Tensor, Tensor), tch::TchError> {
    let available = sigma.size()[0];
    let kept = (rank as i64).min(available);
    let root = sigma.f_narrow(0, 0, kept)?.f_div_scalar(scale)?.f_sqrt()?;
    let b = u.f_narrow(1, 0, kept)?.f_mul(&root.f_unsqueeze(0)?)?;
    let a = vh.f_narrow(0, 0, kept)?.f_mul(&root.f_unsqueeze(1)?)?;
    let missing = rank as i64 - kept;
    if missing == 0 {
        return Ok((a, b));
    }
    let options = (Kind::Double, a.device());
    let a = Tensor::f_cat(&[a.shallow_clone(), Tensor::f_zeros([missing, a.size()[1]], options)?], 0)?;
    let b = Tensor::f_cat(&[b.shallow_clone(), Tensor::f_zeros([b.size()[0], missing], options)?], 1)?;
    Ok((a, b))
}

fn torch(module: &str, source: tch::TchError) -> AdapterError {
    AdapterError::Wire(TensorError::Torch { name: module.to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::merged_delta_name;
    use tch::Device;

    fn random(shape: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    fn whole(adapter: &Adapter, module: &str, scale: f64) -> Tensor {
        whole_update(adapter, module, scale).unwrap()
    }

    #[test]
    fn the_plain_lora_computes_the_merged_deltas_and_the_factors_together() {
        let scale = 0.5;
        let mut tensors = BTreeMap::new();
        // A rank-3 delta on q (so the plain rank is 3 + 2), a full-rank one on a small v.
        let low = random(&[12, 3], 1).matmul(&random(&[3, 10], 2));
        tensors.insert(merged_delta_name("m.q"), low);
        tensors.insert(lora_a_name("m.q"), random(&[2, 10], 3));
        tensors.insert(lora_b_name("m.q"), random(&[12, 2], 4));
        tensors.insert(merged_delta_name("m.v"), random(&[4, 3], 5));
        tensors.insert(lora_a_name("m.v"), random(&[2, 3], 6));
        tensors.insert(lora_b_name("m.v"), random(&[4, 2], 7));
        tensors.insert("head.weight".into(), random(&[5, 4], 8));
        let adapter = Adapter::new(tensors).unwrap();

        let plain = fold_merged_deltas(&adapter, scale).unwrap();
        assert_eq!(plain.adapter.rank(), 5);
        assert_eq!(plain.adapter.merged_delta_names().count(), 0);
        // What is cut is f32 rounding in the delta made in f32: of the order of its ε.
        assert!(plain.largest_error < 1e-5, "{}", plain.largest_error);
        for module in ["m.q", "m.v"] {
            let difference = (whole(&plain.adapter, module, scale) - whole(&adapter, module, scale)).abs().max();
            assert!(difference.double_value(&[]) < 1e-5, "{module}: {difference}");
        }
        // v (4 × 3) has only 3 components: its slots 4 and 5 are zero.
        let (a_v, b_v) = plain.adapter.factors("m.v");
        assert_eq!(a_v.narrow(0, 3, 2).abs().sum(Kind::Double).double_value(&[]), 0.0);
        assert_eq!(b_v.narrow(1, 3, 2).abs().sum(Kind::Double).double_value(&[]), 0.0);
        assert_eq!(plain.adapter.get("head.weight").unwrap(), adapter.get("head.weight").unwrap());
    }

    #[test]
    fn an_adapter_without_merged_deltas_keeps_its_function_and_a_bad_scale_is_refused() {
        let mut tensors = BTreeMap::new();
        tensors.insert(lora_a_name("m.q"), random(&[4, 8], 9));
        tensors.insert(lora_b_name("m.q"), random(&[6, 4], 10));
        let adapter = Adapter::new(tensors).unwrap();
        let plain = fold_merged_deltas(&adapter, 2.0).unwrap();
        assert_eq!(plain.adapter.rank(), 4);
        let difference = (whole(&plain.adapter, "m.q", 2.0) - whole(&adapter, "m.q", 2.0)).abs().max();
        assert!(difference.double_value(&[]) < 1e-5);
        for scale in [0.0, -1.0, f64::NAN] {
            assert!(fold_merged_deltas(&adapter, scale).is_err(), "{scale}");
        }
    }
}
