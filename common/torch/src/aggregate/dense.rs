//! The dense target shared by the methods that average products rather than factors (FlexLoRA,
//! online FLoRA): per adapted layer, `Σ n_k·(s_k/s)·B_k·A_k` in the global LoRA scale `s`, and the
//! sample total, so that `s · sum / Σ n_k = T = Σ_k p_k·s_k·B_k·A_k`. One d_out × d_in buffer per
//! layer, whatever the number of clients.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::non_lora::NonLoraMeans;
use super::slot_sums::scaled_b;
use super::{validate_update, AggregateError, ClientUpdate};
use crate::adapter::Adapter;

/// What FlexLoRA and online FLoRA keep through a round: the global adapter it started from, the
/// dense target, the non-LoRA means and how many updates went in. They differ only at the finish.
pub(super) struct DenseRound {
    pub(super) previous: Adapter,
    pub(super) dense: DenseSums,
    pub(super) others: NonLoraMeans,
    pub(super) folded: usize,
}

impl DenseRound {
    /// A round starting from `global` (LoRA scale `scale`), with the dense sums in `kind`.
    pub(super) fn new(global: &Adapter, scale: f64, kind: Kind) -> Result<DenseRound, AggregateError> {
        Ok(DenseRound {
            others: NonLoraMeans::new(global)?,
            previous: global.deep_copy(),
            dense: DenseSums::new(global, scale, kind)?,
            folded: 0,
        })
    }

    /// Validates `update` and adds it to the dense target and the non-LoRA means.
    pub(super) fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        validate_update(&self.previous, update)?;
        self.dense.add(update)?;
        self.others.add(update)?;
        self.folded += 1;
        Ok(())
    }
}

pub(super) struct DenseSums {
    scale: f64,
    kind: Kind,
    sums: BTreeMap<String, Tensor>,
    total_samples: f64,
}

impl DenseSums {
    /// Zero sums shaped like `global`'s layers, accumulated in `kind`.
    pub(super) fn new(global: &Adapter, scale: f64, kind: Kind) -> Result<DenseSums, AggregateError> {
        let mut sums = BTreeMap::new();
        for module in global.modules() {
            let (a, b) = global.factors(module);
            sums.insert(module.clone(), Tensor::f_zeros([b.size()[0], a.size()[1]], (kind, a.device()))?);
        }
        Ok(DenseSums { scale, kind, sums, total_samples: 0.0 })
    }

    /// Adds a validated update's `n_k·(s_k/s)·B_k·A_k` to every layer; on a libtorch error no
    /// layer has changed.
    pub(super) fn add(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        let n = update.num_samples as f64;
        let mut products = Vec::with_capacity(self.sums.len());
        for module in self.sums.keys() {
            let (a, b) = update.adapter.factors(module);
            let b = scaled_b(b, update.scale, self.scale)?.f_mul_scalar(n)?.f_to_kind(self.kind)?;
            products.push(b.f_matmul(&a.f_to_kind(self.kind)?)?);
        }
        for (sum, product) in self.sums.values_mut().zip(products) {
            let _ = sum.f_add_(&product)?;
        }
        self.total_samples += n;
        Ok(())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.total_samples == 0.0
    }

    /// Per layer, in order: `T / s = sum / Σ n_k` (call only when not empty).
    pub(super) fn means(&self) -> impl Iterator<Item = Result<(&String, Tensor), AggregateError>> + '_ {
        self.sums.iter().map(|(module, sum)| Ok((module, sum.f_div_scalar(self.total_samples)?)))
    }
}
