//! Datasets held on a device: features as an `N × d` f32 tensor, labels as an `N` i64 tensor.
//! [`idx`] reads MNIST-style files, [`text`] labelled texts that [`tokenizer`] turns into token
//! ids, [`partition`] splits a dataset among devices.

pub mod decoder_tokenizer;
pub mod idx;
pub mod tokenizer;

pub use flotilla_data::{headline, partition, sample, text, DataError};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// Inputs and labels. Features are `N × d` f32 for the small models; for a transformer they are
/// token ids `N × L` (i64, padded with 0 past each input's length) and `lengths` holds each
/// input's real length.
#[derive(Debug)]
pub struct Dataset {
    pub features: Tensor,
    pub labels: Tensor,
    pub lengths: Option<Tensor>,
    /// For a decoder's examples: where each sequence's target tokens start (the loss is on them);
    /// `labels` then hold the article's class, for partitions.
    pub target_starts: Option<Tensor>,
}

/// A minibatch, ready for the model: token batches are cut to their longest input.
#[derive(Debug)]
pub struct Batch {
    pub x: Tensor,
    pub y: Tensor,
    pub lengths: Option<Tensor>,
}

impl Batch {
    pub fn to_device(&self, device: tch::Device) -> Result<Batch, tch::TchError> {
        Ok(Batch {
            x: self.x.f_to_device(device)?,
            y: self.y.f_to_device(device)?,
            lengths: self.lengths.as_ref().map(|l| l.f_to_device(device)).transpose()?,
        })
    }
}

impl Dataset {
    /// A dataset of f32 features (`N × d`).
    pub fn new(features: Tensor, labels: Tensor) -> Dataset {
        Dataset { features, labels, lengths: None, target_starts: None }
    }

    /// A dataset of token ids (`N × L`, 0 past each length) with each input's length.
    pub fn tokens(ids: Tensor, lengths: Tensor, labels: Tensor) -> Dataset {
        Dataset { features: ids, labels, lengths: Some(lengths), target_starts: None }
    }

    /// A decoder's sequences (`N × L` ids, padded past each length), where each one's target starts,
    /// and each one's class.
    pub fn sequences(ids: Tensor, lengths: Tensor, target_starts: Tensor, labels: Tensor) -> Dataset {
        Dataset { features: ids, labels, lengths: Some(lengths), target_starts: Some(target_starts) }
    }

    /// The samples at `index` (an i64 tensor) as a batch; token ids are cut to the longest input.
    pub fn batch(&self, index: &Tensor) -> Result<Batch, tch::TchError> {
        let x = self.features.f_index_select(0, index)?;
        let y = self.labels.f_index_select(0, index)?;
        let Some(lengths) = &self.lengths else { return Ok(Batch { x, y, lengths: None }) };
        let lengths = lengths.f_index_select(0, index)?;
        let longest = if lengths.numel() == 0 { 1 } else { lengths.f_max()?.f_int64_value(&[])?.max(1) };
        Ok(Batch { x: x.f_narrow(1, 0, longest.min(x.size()[1]))?, y, lengths: Some(lengths) })
    }

    /// The batch of `len` samples from `start`.
    pub fn range(&self, start: usize, len: usize) -> Result<Batch, tch::TchError> {
        self.batch(&Tensor::f_arange_start(start as i64, (start + len) as i64, (Kind::Int64, tch::Device::Cpu))?)
    }

    pub fn len(&self) -> usize {
        self.labels.size()[0] as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The samples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let index = Tensor::from_slice(&indices.iter().map(|&i| i as i64).collect::<Vec<_>>());
        Dataset {
            features: self.features.index_select(0, &index),
            labels: self.labels.index_select(0, &index),
            lengths: self.lengths.as_ref().map(|l| l.index_select(0, &index)),
            target_starts: self.target_starts.as_ref().map(|t| t.index_select(0, &index)),
        }
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
    Dataset::new(features, labels)
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
