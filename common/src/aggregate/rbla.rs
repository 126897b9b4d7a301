//! RBLA — Rank-Based LoRA Aggregation (arXiv 2408.08699).
//!
//! Per rank slot, a weighted mean over only the clients that have that slot:
//!
//! ```text
//! S_i = { k : r_k > i },   p_k = n_k / Σ_j n_j
//! Ā[i,:] = Σ_{k∈S_i} p_k·A_k[i,:] / Σ_{k∈S_i} p_k
//! B̄[:,i] = Σ_{k∈S_i} p_k·B_k[:,i] / Σ_{k∈S_i} p_k
//! ```
//!
//! A and B are averaged separately. A slot no participant covered this round (S_i empty) keeps its
//! previous global value, so the global adapter keeps all R_max slots (the authors' code shrinks it
//! to the round's largest rank; that is a defect). Non-LoRA tensors get the `p_k`-weighted mean.
//!
//! Streaming: per module keep `Σ n_k·A_k` (R_max × d_in), `Σ n_k·B_k` (d_out × R_max) and the
//! per-slot `Σ n_k`; the normalisation by `Σ n_j` cancels. Accumulators are f64.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::{validate_update, AggregateError, Aggregator, ClientUpdate, Method};
use crate::adapter::{lora_a_name, lora_b_name, Adapter};

struct ModuleSums {
    a: Tensor,
    b: Tensor,
}

pub struct Rbla {
    previous: Adapter,
    modules: BTreeMap<String, ModuleSums>,
    /// Σ n_k over the clients covering each slot.
    slot_weight: Vec<f64>,
    others: BTreeMap<String, Tensor>,
    other_weight: f64,
    folded: usize,
}

impl Rbla {
    pub fn new(global: &Adapter) -> Result<Rbla, AggregateError> {
        let mut modules = BTreeMap::new();
        for module in global.modules() {
            let (a, b) = global.factors(module);
            modules.insert(
                module.clone(),
                ModuleSums {
                    a: Tensor::f_zeros(a.size(), (Kind::Double, a.device()))?,
                    b: Tensor::f_zeros(b.size(), (Kind::Double, b.device()))?,
                },
            );
        }
        let others = global
            .other_names()
            .map(|name| {
                let t = &global.tensors()[name];
                Ok((name.to_string(), Tensor::f_zeros(t.size(), (Kind::Double, t.device()))?))
            })
            .collect::<Result<_, tch::TchError>>()?;
        Ok(Rbla {
            previous: global.deep_copy(),
            modules,
            slot_weight: vec![0.0; global.rank()],
            others,
            other_weight: 0.0,
            folded: 0,
        })
    }
}

impl Aggregator for Rbla {
    fn method(&self) -> Method {
        Method::Rbla
    }

    fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        validate_update(&self.previous, update)?;
        let n = update.num_samples as f64;
        let r = update.declared_rank as i64;
        let adapter = update.adapter;
        for (module, sums) in &mut self.modules {
            let (a, b) = adapter.factors(module);
            let _ = sums.a.f_narrow(0, 0, r)?.f_add_(&(a.f_to_kind(Kind::Double)? * n))?;
            let _ = sums.b.f_narrow(1, 0, r)?.f_add_(&(b.f_to_kind(Kind::Double)? * n))?;
        }
        for (name, sum) in &mut self.others {
            let _ = sum.f_add_(&(adapter.tensors()[name].f_to_kind(Kind::Double)? * n))?;
        }
        for w in &mut self.slot_weight[..update.declared_rank] {
            *w += n;
        }
        self.other_weight += n;
        self.folded += 1;
        Ok(())
    }

    fn folded(&self) -> usize {
        self.folded
    }

    fn finish(self: Box<Self>) -> Result<Adapter, AggregateError> {
        let weights = Tensor::from_slice(&self.slot_weight);
        let covered = weights.f_gt(0.0)?;
        let denominators = weights.f_clamp_min(f64::MIN_POSITIVE)?;
        let mut tensors = BTreeMap::new();
        for (module, sums) in &self.modules {
            let (prev_a, prev_b) = self.previous.factors(module);
            let mean_a = sums.a.f_div(&denominators.f_unsqueeze(1)?)?;
            let mean_b = sums.b.f_div(&denominators.f_unsqueeze(0)?)?;
            let a = mean_a.f_where_self(&covered.f_unsqueeze(1)?, &prev_a.f_to_kind(Kind::Double)?)?;
            let b = mean_b.f_where_self(&covered.f_unsqueeze(0)?, &prev_b.f_to_kind(Kind::Double)?)?;
            tensors.insert(lora_a_name(module), a.f_to_kind(Kind::Float)?);
            tensors.insert(lora_b_name(module), b.f_to_kind(Kind::Float)?);
        }
        for (name, sum) in &self.others {
            let value = if self.other_weight > 0.0 {
                (sum / self.other_weight).f_to_kind(Kind::Float)?
            } else {
                self.previous.tensors()[name].copy()
            };
            tensors.insert(name.clone(), value);
        }
        Ok(Adapter::new(tensors)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The worked example of the shared notes: ranks 2, 4, 8; n = (100, 200, 100); d_in 3, d_out 2;
    /// A_k[i,j] = c_k·(i+1) + j, B_k[o,i] = c_k·(o+1) + i with c = (1, 2, 4).
    fn worked_example_client(c: f64, rank: i64) -> Adapter {
        let a: Vec<f32> = (0..rank)
            .flat_map(|i| (0..3).map(move |j| (c * (i as f64 + 1.0) + j as f64) as f32))
            .collect();
        let b: Vec<f32> = (0..2)
            .flat_map(|o| (0..rank).map(move |i| (c * (o as f64 + 1.0) + i as f64) as f32))
            .collect();
        let mut t = BTreeMap::new();
        t.insert(lora_a_name("layer"), Tensor::from_slice(&a).reshape([rank, 3]));
        t.insert(lora_b_name("layer"), Tensor::from_slice(&b).reshape([2, rank]));
        Adapter::new(t).unwrap()
    }

    fn zeros_global(rank: i64) -> Adapter {
        let mut t = BTreeMap::new();
        t.insert(lora_a_name("layer"), Tensor::zeros([rank, 3], (Kind::Float, Device::Cpu)));
        t.insert(lora_b_name("layer"), Tensor::zeros([2, rank], (Kind::Float, Device::Cpu)));
        Adapter::new(t).unwrap()
    }

    fn to_vec(t: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 1e-5, "element {i}: got {g}, want {w}");
        }
    }

    #[test]
    fn worked_example_from_the_notes() {
        let clients = [(1.0, 2, 100), (2.0, 4, 200), (4.0, 8, 100)];
        let global = zeros_global(8);
        let mut agg: Box<dyn Aggregator> = Box::new(Rbla::new(&global).unwrap());
        for (i, &(c, rank, n)) in clients.iter().enumerate() {
            let adapter = worked_example_client(c, rank);
            let name = format!("client{i}");
            agg.fold(&ClientUpdate { client: &name, declared_rank: rank as usize, num_samples: n, adapter: &adapter })
                .unwrap();
        }
        let out = agg.finish().unwrap();
        let (a, b) = out.factors("layer");
        let want_a = [
            2.25, 3.25, 4.25, 4.5, 5.5, 6.5, 8.0, 9.0, 10.0, 32.0 / 3.0, 35.0 / 3.0, 38.0 / 3.0, 20.0, 21.0,
            22.0, 24.0, 25.0, 26.0, 28.0, 29.0, 30.0, 32.0, 33.0, 34.0,
        ];
        let want_b = [
            2.25, 3.25, 14.0 / 3.0, 17.0 / 3.0, 8.0, 9.0, 10.0, 11.0, 4.5, 5.5, 22.0 / 3.0, 25.0 / 3.0, 12.0,
            13.0, 14.0, 15.0,
        ];
        assert_close(&to_vec(a), &want_a);
        assert_close(&to_vec(b), &want_b);
    }

    #[test]
    fn uncovered_slots_keep_their_previous_value() {
        let global = worked_example_client(4.0, 8);
        let mut agg = Box::new(Rbla::new(&global).unwrap());
        let small = worked_example_client(1.0, 2);
        agg.fold(&ClientUpdate { client: "phone", declared_rank: 2, num_samples: 10, adapter: &small }).unwrap();
        let out = agg.finish().unwrap();
        assert_eq!(out.rank(), 8);
        let (a, _) = out.factors("layer");
        let (prev_a, _) = global.factors("layer");
        assert!(a.narrow(0, 2, 6).equal(&prev_a.narrow(0, 2, 6)));
        assert!(a.narrow(0, 0, 2).equal(&small.factors("layer").0));
    }

    #[test]
    fn a_rejected_update_leaves_the_accumulator_untouched() {
        let global = zeros_global(4);
        let mut agg = Box::new(Rbla::new(&global).unwrap());
        let good = worked_example_client(1.0, 2);
        let mut bad_tensors = BTreeMap::new();
        bad_tensors.insert(lora_a_name("layer"), Tensor::from_slice(&[f32::NAN, 0.0, 0.0, 1.0, 1.0, 1.0]).reshape([2, 3]));
        bad_tensors.insert(lora_b_name("layer"), Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)));
        let bad = Adapter::new(bad_tensors).unwrap();
        let err = agg
            .fold(&ClientUpdate { client: "evil", declared_rank: 2, num_samples: 5, adapter: &bad })
            .unwrap_err();
        assert!(err.to_string().contains("evil") && err.to_string().contains("NaN"), "{err}");
        let lying = agg.fold(&ClientUpdate { client: "liar", declared_rank: 3, num_samples: 5, adapter: &good });
        assert!(lying.unwrap_err().to_string().contains("liar"));
        let zero = agg.fold(&ClientUpdate { client: "zero", declared_rank: 2, num_samples: 0, adapter: &good });
        assert!(zero.is_err());
        assert_eq!(agg.folded(), 0);
        agg.fold(&ClientUpdate { client: "ok", declared_rank: 2, num_samples: 5, adapter: &good }).unwrap();
        let out = agg.finish().unwrap();
        assert!(out.factors("layer").0.narrow(0, 0, 2).equal(&good.factors("layer").0));
    }
}
