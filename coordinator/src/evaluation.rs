//! Evaluation of the global model (frozen base + global adapter) on a held-out test set, at R_max
//! and at every rank that took part, so operators see what a rank-2 phone actually gets.
//! Runs on the aggregation thread, which owns the global adapter.

use std::collections::BTreeSet;
use std::path::Path;

use flotilla_torch::adapter::Adapter;
use flotilla_torch::data::idx::{load_split, Split};
use flotilla_torch::data::Dataset;
use flotilla_torch::model::{Architecture, BaseWeights, LoraModel};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankAccuracy {
    pub rank: usize,
    pub loss: f64,
    pub accuracy: f64,
}

pub struct Evaluator {
    architecture: Architecture,
    base: BaseWeights,
    scale: f64,
    test: Dataset,
}

impl Evaluator {
    /// Loads the test split of an MNIST-style directory: after the first `skip_samples`, at most
    /// `max_samples`.
    pub fn load(
        architecture: Architecture,
        base: BaseWeights,
        scale: f64,
        dir: &Path,
        max_samples: Option<usize>,
        skip_samples: usize,
    ) -> anyhow::Result<Evaluator> {
        let test = load_split(dir, Split::Test, architecture.classes())?;
        anyhow::ensure!(
            test.features.size()[1] == architecture.input_size() as i64,
            "{}: test images have {} features, the model takes {}",
            dir.display(),
            test.features.size()[1],
            architecture.input_size()
        );
        anyhow::ensure!(
            skip_samples < test.len(),
            "{}: evaluation.skip_samples = {skip_samples} leaves none of the {} test images",
            dir.display(),
            test.len()
        );
        let end = max_samples.map_or(test.len(), |n| (skip_samples + n).min(test.len()));
        let test = if skip_samples == 0 && end == test.len() {
            test
        } else {
            test.subset(&(skip_samples..end).collect::<Vec<_>>())
        };
        Ok(Evaluator { architecture, base, scale, test })
    }

    pub fn samples(&self) -> usize {
        self.test.len()
    }

    /// Loss and accuracy of the global adapter sliced to each of `ranks` (and to its full rank).
    pub fn evaluate(&self, global: &Adapter, ranks: &BTreeSet<usize>) -> Result<Vec<RankAccuracy>, String> {
        let mut all: BTreeSet<usize> = ranks.iter().copied().filter(|&r| r >= 1 && r <= global.rank()).collect();
        all.insert(global.rank());
        all.into_iter()
            .rev()
            .map(|rank| {
                let slice = global.slice_to_rank(rank).map_err(|e| e.to_string())?;
                let model = LoraModel::new(&self.architecture, &self.base, &slice, self.scale, tch::Device::Cpu)
                    .map_err(|e| e.to_string())?;
                let (loss, accuracy) = model.evaluate(&self.test, 2048).map_err(|e| e.to_string())?;
                Ok(RankAccuracy { rank, loss, accuracy })
            })
            .collect()
    }
}

/// "R_max 8 → 81.2%, rank 4 → 78.9%, …" for logs.
pub fn describe(results: &[RankAccuracy]) -> String {
    results.iter().map(|r| format!("rank {} → {:.1}%", r.rank, r.accuracy * 100.0)).collect::<Vec<_>>().join(", ")
}
