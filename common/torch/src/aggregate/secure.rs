//! Adapters in and out of secure aggregation's layout (`flotilla_secagg::layout`): what a device
//! packs and masks, and how the coordinator turns the unmasked sums into the next global adapter
//! for the methods that need only sums.
//!
//! A device of rank r with weight w (its sample count over the configured cap, in (0, 1]) packs
//!
//! ```text
//! [ w·H (every non-LoRA tensor, by name), w,  slot 0: [w, w·A_m[0,:] for each module m, w·c·B_m[:,0] …], slot 1 … slot r−1 ]
//! ```
//!
//! with c = s_k / s its LoRA scale over the global one (so s·B·A is unchanged). Summed over the
//! round, slot i's block holds W_i = Σ_{k∈S_i} w_k and the weighted factor sums, and the shared part
//! holds W = Σ_k w_k and the weighted head sum: exactly what the slot-wise methods divide
//!
//! ```text
//! rbla, fedavg:   A[i,:] = SA_i / W_i            (W_i = 0: the previous global slot stays)
//! zero-pad:       A[i,:] = SA_i / W
//! fold-and-fill:  A[i,:] = (SA_i + (W − W_i)·g_A[i,:]) / W
//! head:           H = SH / W
//! ```
//!
//! (B likewise). The coordinator learns these sums, who took part and their ranks, and nothing
//! about any one device. Methods that need individual updates have no sums form:
//! [`secure_form`] is `None` for them.

use flotilla_secagg::layout::Layout;
use tch::{Device, Kind, Tensor};

use flotilla_merge::slots::Denominator;

use super::{AggregateError, Method};
use crate::adapter::{lora_a_name, lora_b_name, Adapter};
use crate::tensor::TensorError;

/// How `method` turns slot sums into the global adapter (`Coverage`: divide by the slot's coverage
/// weight; `AllClients`: by the round's weight; `AllClientsFilled`: fill the missing weight with
/// the previous global slot), when it can run on sums alone (its row, `MethodSpec::secure`).
pub fn secure_form(method: Method) -> Option<Denominator> {
    method.spec().secure.ok()
}

/// Why `method` cannot run under secure aggregation (`None`: it can).
pub fn why_not_secure(method: Method) -> Option<&'static str> {
    method.spec().secure.err()
}

/// The layout of `global`'s adapters: its non-LoRA values and the weight, then per slot the
/// coverage weight and every module's A row and B column.
pub fn layout(global: &Adapter) -> Layout {
    let shared: usize = global.other_names().map(|n| global.tensors()[n].numel()).sum::<usize>() + 1;
    let per_slot: usize = 1 + global
        .modules()
        .iter()
        .map(|m| {
            let (a, b) = global.factors(m);
            (a.size()[1] + b.size()[0]) as usize
        })
        .sum::<usize>();
    Layout { shared, per_slot, max_rank: global.rank() as u32 }
}

fn torch(name: &str) -> impl Fn(tch::TchError) -> AggregateError + '_ {
    move |source| AggregateError::Adapter(TensorError::Torch { name: name.to_string(), source }.into())
}

fn values(t: &Tensor, name: &str) -> Result<Vec<f32>, AggregateError> {
    let flat = t
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_flatten(0, -1))
        .map_err(torch(name))?;
    Vec::<f32>::try_from(&flat).map_err(torch(name))
}

/// A device's vector: `update` (rank r ≤ the layout's R_max) weighted by `weight`, its B factors
/// also by `b_factor` (its LoRA scale over the global one).
pub fn pack(update: &Adapter, weight: f64, b_factor: f64, layout: &Layout) -> Result<Vec<f32>, AggregateError> {
    let rank = update.rank();
    let mut out = Vec::with_capacity(layout.len(rank as u32));
    let w = weight as f32;
    for name in update.other_names() {
        out.extend(values(&update.tensors()[name], name)?.into_iter().map(|v| v * w));
    }
    out.push(w);
    let mut modules = Vec::new();
    for module in update.modules() {
        let (a, b) = update.factors(module);
        let d_out = b.size()[0] as usize;
        modules.push((values(a, &lora_a_name(module))?, values(b, &lora_b_name(module))?, d_out));
    }
    let bw = (weight * b_factor) as f32;
    for slot in 0..rank {
        out.push(w);
        for (a, b, d_out) in &modules {
            let d_in = a.len() / rank;
            out.extend(a[slot * d_in..(slot + 1) * d_in].iter().map(|v| v * w));
            out.extend((0..*d_out).map(|row| b[row * rank + slot] * bw));
        }
    }
    if out.len() != layout.len(rank as u32) {
        return Err(AggregateError::InvalidUpdate {
            client: "this device".into(),
            message: format!(
                "packs {} values, the layout's rank-{rank} length is {}",
                out.len(),
                layout.len(rank as u32)
            ),
        });
    }
    Ok(out)
}

/// Adds independent Gaussian noise to the values of a packed vector (not to its weight and coverage
/// coordinates): standard deviation `noise_std[0]` on the shared values (the head), `noise_std[i + 1]`
/// on slot i's. Distributed differential privacy: each device adds its share of the noise.
pub fn add_noise(
    packed: &mut [f32],
    layout: &Layout,
    noise_std: &[f64],
    rng: &mut impl rand::Rng,
) -> Result<(), String> {
    use rand_distr::{Distribution, Normal};
    let normal = |sd: f64| Normal::new(0.0, sd).map_err(|e| format!("noise standard deviation {sd}: {e}"));
    let shared = normal(noise_std.first().copied().unwrap_or(0.0))?;
    for value in packed.iter_mut().take(layout.shared.saturating_sub(1)) {
        *value += shared.sample(rng) as f32;
    }
    for (slot, block) in packed.get_mut(layout.shared..).unwrap_or_default().chunks_mut(layout.per_slot).enumerate() {
        let sd = noise_std.get(slot + 1).copied().ok_or_else(|| format!("no noise level for slot {slot}"))?;
        let noise = normal(sd)?;
        for value in block.iter_mut().skip(1) {
            *value += noise.sample(rng) as f32;
        }
    }
    Ok(())
}

/// The revealed sums, `layout.len(r)` long (slots 0..r revealed, the rest held by too few
/// devices to be), padded with zeros to the whole layout, and r. A padded slot has coverage 0:
/// [`unpack`] keeps its previous global value, as for a slot nobody trained.
pub fn padded_sums(sums: &[f64], layout: &Layout) -> Result<(Vec<f64>, u32), AggregateError> {
    let revealed = layout.rank_of_len(sums.len()).ok_or_else(|| AggregateError::InvalidUpdate {
        client: "secure aggregate".into(),
        message: format!("{} sums fit no rank of the layout (full length {})", sums.len(), layout.full_len()),
    })?;
    let mut padded = Vec::with_capacity(layout.full_len());
    padded.extend_from_slice(sums);
    padded.resize(layout.full_len(), 0.0);
    Ok((padded, revealed))
}

/// The round's unmasked sums as tensors shaped like `global`'s trainable ones (f64): each LoRA
/// factor's sums in its slots, the head's in place. For the differentially private forms, which
/// divide by fixed denominators (`PrivateSums::from_sums`); `sums` is the whole layout
/// ([`padded_sums`]), and the caller keeps the previous values of the slots not revealed.
pub fn sums_by_tensor(
    sums: &[f64],
    global: &Adapter,
    layout: &Layout,
) -> Result<std::collections::BTreeMap<String, Tensor>, AggregateError> {
    let invalid = |message: String| AggregateError::InvalidUpdate { client: "secure aggregate".into(), message };
    if sums.len() != layout.full_len() {
        return Err(invalid(format!("{} sums, the layout has {}", sums.len(), layout.full_len())));
    }
    let r_max = global.rank();
    let mut out = std::collections::BTreeMap::new();
    let mut at = 0;
    for name in global.other_names() {
        let t = &global.tensors()[name];
        let n = t.numel();
        let values =
            Tensor::f_from_slice(&sums[at..at + n]).and_then(|v| v.f_reshape(t.size())).map_err(torch(name))?;
        out.insert(name.to_string(), values);
        at += n;
    }
    let mut factors = Vec::new();
    for module in global.modules() {
        let (a, b) = global.factors(module);
        factors.push((module.clone(), a.size()[1] as usize, b.size()[0] as usize));
    }
    let mut a_sums: Vec<Vec<f64>> = factors.iter().map(|(_, d_in, _)| vec![0.0; r_max * d_in]).collect();
    let mut b_sums: Vec<Vec<f64>> = factors.iter().map(|(_, _, d_out)| vec![0.0; d_out * r_max]).collect();
    for slot in 0..r_max {
        let mut offset = layout.shared + slot * layout.per_slot + 1;
        for (m, (_, d_in, d_out)) in factors.iter().enumerate() {
            a_sums[m][slot * d_in..(slot + 1) * d_in].copy_from_slice(&sums[offset..offset + d_in]);
            offset += d_in;
            for row in 0..*d_out {
                b_sums[m][row * r_max + slot] = sums[offset + row];
            }
            offset += d_out;
        }
    }
    for (m, (module, d_in, d_out)) in factors.iter().enumerate() {
        let a = Tensor::f_from_slice(&a_sums[m]).and_then(|t| t.f_reshape([r_max as i64, *d_in as i64]));
        let b = Tensor::f_from_slice(&b_sums[m]).and_then(|t| t.f_reshape([*d_out as i64, r_max as i64]));
        out.insert(lora_a_name(module), a.map_err(torch(module))?);
        out.insert(lora_b_name(module), b.map_err(torch(module))?);
    }
    Ok(out)
}

/// The next global adapter from the round's unmasked sums, for `form`: the sums of slots
/// 0..r (`layout.len(r)` values); slots r.. were not revealed and keep their global values.
pub fn unpack(form: Denominator, sums: &[f64], global: &Adapter, layout: &Layout) -> Result<Adapter, AggregateError> {
    let invalid = |message: String| AggregateError::InvalidUpdate { client: "secure aggregate".into(), message };
    if form == Denominator::CoverageScaled {
        return Err(invalid("coverage-scaled sums have no secure form".into()));
    }
    let (padded, _) = padded_sums(sums, layout)?;
    let sums = padded.as_slice();
    let total = sums[layout.shared - 1];
    if total <= 0.0 {
        return Err(invalid(format!("the round's total weight is {total}")));
    }
    let r_max = global.rank();
    let mut tensors =
        global.tensors().iter().map(|(n, t)| (n.clone(), t.copy())).collect::<std::collections::BTreeMap<_, _>>();
    let mut at = 0;
    for name in global.other_names() {
        let t = &global.tensors()[name];
        let n = t.numel();
        let mean: Vec<f32> = sums[at..at + n].iter().map(|s| (s / total) as f32).collect();
        let next = Tensor::f_from_slice(&mean).and_then(|m| m.f_reshape(t.size())).map_err(torch(name))?;
        tensors.insert(name.to_string(), next);
        at += n;
    }
    let mut modules = Vec::new();
    for module in global.modules() {
        let (a, b) = global.factors(module);
        let (d_in, d_out) = (a.size()[1] as usize, b.size()[0] as usize);
        modules.push((module.clone(), d_in, d_out, values(a, &lora_a_name(module))?, values(b, &lora_b_name(module))?));
    }
    let mut next_a: Vec<Vec<f32>> = modules.iter().map(|m| m.3.clone()).collect();
    let mut next_b: Vec<Vec<f32>> = modules.iter().map(|m| m.4.clone()).collect();
    for slot in 0..r_max {
        let start = layout.shared + slot * layout.per_slot;
        let covered = sums[start];
        let mut offset = start + 1;
        for (m, (_, d_in, d_out, global_a, global_b)) in modules.iter().enumerate() {
            let finish = |sum: f64, previous: f32| -> f32 {
                match form {
                    // A slot nobody covered this round keeps its global value, as in the plain methods.
                    _ if covered <= 0.0 => previous,
                    Denominator::AllClients => (sum / total) as f32,
                    Denominator::AllClientsFilled => ((sum + (total - covered) * f64::from(previous)) / total) as f32,
                    // Refused at the top: coverage-scaled sums have no secure form.
                    Denominator::Coverage | Denominator::CoverageScaled => (sum / covered) as f32,
                }
            };
            for col in 0..*d_in {
                next_a[m][slot * d_in + col] = finish(sums[offset + col], global_a[slot * d_in + col]);
            }
            offset += d_in;
            for row in 0..*d_out {
                next_b[m][row * r_max + slot] = finish(sums[offset + row], global_b[row * r_max + slot]);
            }
            offset += d_out;
        }
    }
    for (m, (module, d_in, d_out, _, _)) in modules.iter().enumerate() {
        let shape_a = [r_max as i64, *d_in as i64];
        let shape_b = [*d_out as i64, r_max as i64];
        let a = Tensor::f_from_slice(&next_a[m]).and_then(|t| t.f_reshape(shape_a)).map_err(torch(module))?;
        let b = Tensor::f_from_slice(&next_b[m]).and_then(|t| t.f_reshape(shape_b)).map_err(torch(module))?;
        tensors.insert(lora_a_name(module), a.f_to_device(Device::Cpu).map_err(torch(module))?);
        tensors.insert(lora_b_name(module), b);
    }
    Ok(Adapter::new(tensors)?)
}
