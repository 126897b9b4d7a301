//! FlexLoRA (Bai et al. 2024): average the dense updates, then re-factor them by truncated SVD.
//!
//! ```text
//! T = Σ_k p_k·s_k·B_k·A_k                       (per adapted layer, d_out × d_in)
//! T/s ≈ U·Σ·Vᵀ (top R_max components)  →  B = U·Σ,  A = Vᵀ     (so s·B·A ≈ T)
//! ```
//!
//! A client of rank r receives the first r slots, which are the top r components (error
//! `sqrt(Σ_{j>r} σ_j²)` by Eckart–Young). Streaming keeps one dense `T` per layer (f32), so memory
//! does not grow with the number of clients, but it is dense. Layers whose smaller side is at most
//! [`EXACT_SVD_MAX_DIM`] get an exact SVD; larger ones a randomized one (16 extra samples, 2 power
//! iterations) whose relative error is reported. Slots beyond `min(d_out, d_in)` get a zero B column
//! (so `B·A` is exactly the truncated `T`) and keep their previous A row, like a fresh LoRA init. Known weakness: "rank collapse" toward the smaller ranks (raFLoRA, arXiv 2602.13486).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::dense::DenseRound;
use super::{AggregateError, Aggregated, Aggregator, ClientUpdate};
use crate::adapter::{lora_a_name, lora_b_name, Adapter};
use crate::data::seeded_normal;
use crate::tensor::try_copy;

/// Above this (smaller) layer dimension the SVD is randomized.
pub const EXACT_SVD_MAX_DIM: i64 = 1024;
const OVERSAMPLING: i64 = 16;
const POWER_ITERATIONS: usize = 2;

pub struct FlexLora {
    round: DenseRound,
}

impl FlexLora {
    pub fn new(global: &Adapter, scale: f64) -> Result<FlexLora, AggregateError> {
        Ok(FlexLora { round: DenseRound::new(global, scale, Kind::Float)? })
    }
}

/// Top-`k` singular triplets of `t` (k ≤ min dims): `(U_k, σ_k, Vᵀ_k)` and whether they are exact.
pub fn top_components(t: &Tensor, k: i64, seed: u64) -> Result<(Tensor, Tensor, Tensor, bool), AggregateError> {
    let (m, n) = (t.size()[0], t.size()[1]);
    if m.min(n) <= EXACT_SVD_MAX_DIM {
        let (u, s, vh) = thin_svd(t)?;
        return Ok((u.f_narrow(1, 0, k)?, s.f_narrow(0, 0, k)?, vh.f_narrow(0, 0, k)?, true));
    }
    let l = (k + OVERSAMPLING).min(m.min(n));
    let omega = seeded_normal(&[n as usize, l as usize], 1.0, seed).f_to_device(t.device())?.f_to_kind(t.kind())?;
    let mut q = Tensor::f_linalg_qr(&t.f_matmul(&omega)?, "reduced")?.0;
    for _ in 0..POWER_ITERATIONS {
        let z = Tensor::f_linalg_qr(&t.f_tr()?.f_matmul(&q)?, "reduced")?.0;
        q = Tensor::f_linalg_qr(&t.f_matmul(&z)?, "reduced")?.0;
    }
    let small = q.f_tr()?.f_matmul(t)?;
    let (u_small, s, vh) = thin_svd(&small)?;
    let u = q.f_matmul(&u_small)?;
    Ok((u.f_narrow(1, 0, k)?, s.f_narrow(0, 0, k)?, vh.f_narrow(0, 0, k)?, false))
}

/// `(U, σ, Vᵀ)` of the reduced SVD. (`linalg_svd` takes a driver name that the CPU backend refuses.)
fn thin_svd(t: &Tensor) -> Result<(Tensor, Tensor, Tensor), AggregateError> {
    let (u, s, v) = t.f_svd(true, true)?;
    Ok((u, s, v.f_tr()?))
}

/// Singular values of `t`, largest first.
pub fn singular_values(t: &Tensor) -> Result<Tensor, AggregateError> {
    Ok(t.f_svd(true, false)?.1)
}

impl Aggregator for FlexLora {
    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        self.round.fold(update)
    }

    fn folded(&self) -> usize {
        self.round.folded
    }

    fn finish(self: Box<Self>) -> Result<Aggregated, AggregateError> {
        let DenseRound { previous, dense, others, .. } = self.round;
        let mut tensors = BTreeMap::new();
        let mut notes = Vec::new();
        let r_max = previous.rank() as i64;
        if dense.is_empty() {
            return Ok(Aggregated::plain(previous));
        }
        for (index, mean) in dense.means().enumerate() {
            let (module, target) = mean?;
            let (prev_a, prev_b) = previous.factors(module);
            let k = r_max.min(target.size()[0]).min(target.size()[1]);
            let (u, s, vh, exact) = top_components(&target, k, 0x5eed + index as u64)?;
            // `target` is already T/s (the dense sums are kept in the global scale).
            let b_new = u.f_mul(&s.f_unsqueeze(0)?)?;
            let (a, b) = (try_copy(prev_a)?, prev_b.f_zeros_like()?);
            a.f_narrow(0, 0, k)?.f_copy_(&vh)?;
            b.f_narrow(1, 0, k)?.f_copy_(&b_new)?;
            if !exact {
                let approx = u.f_mul(&s.f_unsqueeze(0)?)?.f_matmul(&vh)?;
                let residual = (&target - approx).f_norm()?.f_double_value(&[])?;
                let total = target.f_norm()?.f_double_value(&[])?.max(f64::MIN_POSITIVE);
                notes.push(format!("flexlora: {module}: randomized SVD, relative error {:.2e}", residual / total));
            }
            tensors.insert(lora_a_name(module), a);
            tensors.insert(lora_b_name(module), b);
        }
        others.finish(&previous, &mut tensors)?;
        Ok(Aggregated { adapter: Adapter::new(tensors)?, notes })
    }
}
