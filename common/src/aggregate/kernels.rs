//! `acc += f·x` over slot ranges, the inner loop of the slot-wise methods.
//!
//! libtorch's `addcmul_` with a broadcast scalar runs at a fraction of memory speed on one core; a
//! plain Rust loop over the contiguous f32 buffers is auto-vectorised and several times faster.
//! The fast path needs both tensors to be contiguous f32 on the CPU; anything else (a CUDA
//! accumulator, a strided input) goes through libtorch.

use tch::{Device, Kind, Tensor};

use super::AggregateError;

// SAFETY (for both kernels' storage views): `fast_path` checked that both tensors are contiguous
// f32 CPU tensors with at least one element; `acc` tensors are created and owned by the
// accumulators and `x` tensors by the update, so they never share storage.
use crate::tensor::f32_storage_mut as storage;

fn fast_path(acc: &Tensor, x: &Tensor) -> bool {
    acc.kind() == Kind::Float
        && x.kind() == Kind::Float
        && acc.device() == Device::Cpu
        && x.device() == Device::Cpu
        && acc.is_contiguous()
        && x.is_contiguous()
        && acc.dim() == 2
        && x.dim() == 2
        && acc.numel() > 0
        && x.numel() > 0
}

/// `acc[i, :] += f·x[i, :]` for rows `start..end` (A factors: slot = row).
pub(super) fn add_rows(acc: &Tensor, x: &Tensor, start: usize, end: usize, f: f32) -> Result<(), AggregateError> {
    if !fast_path(acc, x) || acc.size()[1] != x.size()[1] {
        let (s, len) = (start as i64, (end - start) as i64);
        let _ = acc.f_narrow(0, s, len)?.f_addcmul_(&x.f_narrow(0, s, len)?, &Tensor::from(f))?;
        return Ok(());
    }
    let width = acc.size()[1] as usize;
    // SAFETY: see the note on `storage` above; `acc` and `x` are distinct contiguous f32 CPU tensors.
    let (acc, x) = unsafe { (storage(acc), storage(x) as &[f32]) };
    let range = start * width..end * width;
    for (a, v) in acc[range.clone()].iter_mut().zip(&x[range]) {
        *a += f * v;
    }
    Ok(())
}

/// `acc[:, j] += f·x[:, j]` for columns `start..end` (B factors: slot = column).
pub(super) fn add_cols(acc: &Tensor, x: &Tensor, start: usize, end: usize, f: f32) -> Result<(), AggregateError> {
    if !fast_path(acc, x) || acc.size()[0] != x.size()[0] {
        let (s, len) = (start as i64, (end - start) as i64);
        let _ = acc.f_narrow(1, s, len)?.f_addcmul_(&x.f_narrow(1, s, len)?, &Tensor::from(f))?;
        return Ok(());
    }
    let (acc_width, x_width) = (acc.size()[1] as usize, x.size()[1] as usize);
    // SAFETY: see the note on `storage` above; `acc` and `x` are distinct contiguous f32 CPU tensors.
    let (acc, x) = unsafe { (storage(acc), storage(x) as &[f32]) };
    for (acc_row, x_row) in acc.chunks_exact_mut(acc_width).zip(x.chunks_exact(x_width)) {
        for (a, v) in acc_row[start..end].iter_mut().zip(&x_row[start..end]) {
            *a += f * v;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_and_fallback_paths_agree() {
        let x = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([4, 6]);
        let strided = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([6, 4]).tr(); // a non-contiguous 4 × 6 view
        for (input, label) in [(&x, "contiguous"), (&strided, "strided")] {
            let fast = Tensor::ones([4, 6], (Kind::Float, Device::Cpu));
            let slow = Tensor::ones([4, 6], (Kind::Float, Device::Cpu));
            add_rows(&fast, input, 1, 3, 0.5).unwrap();
            add_cols(&fast, input, 2, 5, 2.0).unwrap();
            let _ = slow.narrow(0, 1, 2).addcmul_(&input.narrow(0, 1, 2), &Tensor::from(0.5f32));
            let _ = slow.narrow(1, 2, 3).addcmul_(&input.narrow(1, 2, 3), &Tensor::from(2.0f32));
            assert!(fast.allclose(&slow, 1e-6, 1e-6, false), "{label}");
        }
    }
}
