//! Trainable non-LoRA tensors (a classifier head, biases, norms): the sample-weighted mean
//! `Σ n_k·X_k / Σ n_k` in every method. Merged deltas (online FLoRA) are not trained: every method
//! carries them over unchanged.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::{AggregateError, ClientUpdate};
use crate::adapter::Adapter;
use crate::tensor::try_copy;

pub(super) struct NonLoraMeans {
    sums: BTreeMap<String, Tensor>,
    weight: f64,
}

impl NonLoraMeans {
    pub(super) fn new(global: &Adapter) -> Result<NonLoraMeans, AggregateError> {
        let sums = global
            .other_names()
            .map(|name| {
                let t = &global.tensors()[name];
                Ok((name.to_string(), Tensor::f_zeros(t.size(), (Kind::Double, t.device()))?))
            })
            .collect::<Result<_, tch::TchError>>()?;
        Ok(NonLoraMeans { sums, weight: 0.0 })
    }

    /// `sum += n_k·X_k` for every tensor, fused.
    pub(super) fn add(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        let n = update.num_samples as f64;
        for (name, sum) in self.sums.iter_mut() {
            let _ = sum.f_addcmul_(&update.adapter.tensors()[name], &Tensor::from(n))?;
        }
        self.weight += n;
        Ok(())
    }

    pub(super) fn finish(&self, previous: &Adapter, out: &mut BTreeMap<String, Tensor>) -> Result<(), AggregateError> {
        for (name, sum) in &self.sums {
            let value = if self.weight > 0.0 {
                sum.f_div_scalar(self.weight)?.f_to_kind(Kind::Float)?
            } else {
                try_copy(&previous.tensors()[name])?
            };
            out.insert(name.clone(), value);
        }
        for name in previous.merged_delta_names() {
            if !out.contains_key(name) {
                out.insert(name.to_string(), try_copy(&previous.tensors()[name])?);
            }
        }
        Ok(())
    }
}
