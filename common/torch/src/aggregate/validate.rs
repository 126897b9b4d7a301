//! Checks an update against the global adapter before anything is folded in.

use tch::Tensor;

use super::{AggregateError, ClientUpdate};
use crate::adapter::{tensor_role, Adapter, TensorRole};

/// Rejects, naming the client and the tensor: unknown or missing tensors, factor shapes inconsistent
/// with the global adapter or with the declared rank, a rank above R_max, non-finite values, and a
/// zero sample count.
pub fn validate_update(global: &Adapter, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
    let client = update.client;
    let invalid = |message: String| AggregateError::InvalidUpdate { client: client.to_string(), message };
    let bad_tensor = |tensor: &str, message: String| AggregateError::InvalidTensor {
        client: client.to_string(),
        tensor: tensor.to_string(),
        message,
    };
    if update.num_samples == 0 {
        return Err(invalid("sample count is zero".into()));
    }
    let rank = update.declared_rank;
    if rank == 0 || rank > global.rank() {
        return Err(invalid(format!("declared rank {rank} is outside 1..={} (R_max)", global.rank())));
    }
    let adapter = update.adapter;
    if let Some(merged) = adapter.merged_delta_names().next() {
        return Err(bad_tensor(merged, "a merged delta is made by the coordinator, never sent in an update".into()));
    }
    if let Some(unknown) = adapter.tensors().keys().find(|n| global.get(n).is_none()) {
        return Err(bad_tensor(unknown, "not part of the global adapter".into()));
    }
    let trainable = |n: &&String| !matches!(tensor_role(n), TensorRole::MergedDelta(_));
    if let Some(missing) = global.tensors().keys().filter(trainable).find(|n| adapter.get(n).is_none()) {
        return Err(bad_tensor(missing, "missing from the update".into()));
    }
    for (name, tensor) in adapter.tensors() {
        let expected = global.tensors()[name].size();
        let got = tensor.size();
        let want = match tensor_role(name) {
            TensorRole::LoraA(_) => vec![rank as i64, expected[1]],
            TensorRole::LoraB(_) => vec![expected[0], rank as i64],
            TensorRole::MergedDelta(_) | TensorRole::Other => expected,
        };
        if got != want {
            return Err(bad_tensor(name, format!("shape {got:?}, expected {want:?} for declared rank {rank}")));
        }
        if !adapter.finite_checked() && !all_finite(tensor)? {
            return Err(bad_tensor(name, "contains NaN or infinite values".into()));
        }
    }
    Ok(())
}

/// One read of the tensor and no allocation: an f64 sum of f32 values cannot overflow, and any
/// NaN or infinity (even +inf and -inf together) makes it non-finite.
fn all_finite(t: &Tensor) -> Result<bool, tch::TchError> {
    Ok(t.f_sum(tch::Kind::Double)?.f_double_value(&[])?.is_finite())
}
