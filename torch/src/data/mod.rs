//! Datasets held on a device: features as an `N × d` f32 tensor, labels as an `N` i64 tensor.
//! [`idx`] reads MNIST-style files, [`partition`] splits a dataset among devices.

pub mod idx;
pub mod partition;

use std::path::PathBuf;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// A data file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DataError {
    pub path: PathBuf,
    pub message: String,
}

#[derive(Debug)]
pub struct Dataset {
    pub features: Tensor,
    pub labels: Tensor,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let index = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
        Dataset { features: self.features.index_select(0, &index), labels: self.labels.index_select(0, &index) }
    }

    pub fn labels_vec(&self) -> Vec<i64> {
        Vec::<i64>::try_from(&self.labels).unwrap_or_default()
    }
}

/// A reproducible classification task: inputs `x ~ N(0, 1)`, labels `argmax(W·x)` for a fixed random
/// "teacher" `W` drawn from `task_seed`; `sample_seed` draws this holder's samples. Devices that share
/// `task_seed` learn the same task from different data.
pub fn synthetic_classification(
    samples: usize,
    input: usize,
    classes: usize,
    task_seed: u64,
    sample_seed: u64,
) -> Dataset {
    let teacher = seeded_normal(&[classes, input], 1.0, task_seed);
    let features = seeded_normal(&[samples, input], 1.0, sample_seed);
    let labels = features.matmul(&teacher.tr()).argmax(1, false).to_kind(Kind::Int64);
    Dataset { features, labels }
}

/// An f32 tensor of normal samples with standard deviation `std`, reproducible from `seed` on any
/// machine (generated in Rust, not by libtorch's global generator).
pub fn seeded_normal(shape: &[usize], std: f64, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            // Box–Muller.
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect();
    Tensor::from_slice(&values).reshape(shape.iter().map(|&d| d as i64).collect::<Vec<_>>())
}

/// An f32 tensor uniform in `[-bound, bound)`, reproducible from `seed`.
pub fn seeded_uniform(shape: &[usize], bound: f64, seed: u64) -> Tensor {
    let values = flotilla_merge::init::seeded_uniform_values(shape.iter().product(), bound, seed);
    Tensor::from_slice(&values).reshape(shape.iter().map(|&d| d as i64).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_data_is_reproducible_and_uses_several_classes() {
        let a = synthetic_classification(200, 16, 4, 1, 2);
        let b = synthetic_classification(200, 16, 4, 1, 2);
        assert!(a.features.equal(&b.features) && a.labels.equal(&b.labels));
        assert_eq!(a.len(), 200);
        let distinct = a.labels.bincount(None::<Tensor>, 4).gt(0).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(distinct, 4);
    }
}
