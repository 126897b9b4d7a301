//! The record of a federated evaluation: totals only, per rank, per device class and across ranks
//! (computed by `crate::serve::federated_evaluation`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Under secure aggregation: the secure sum the totals came from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MaskedEvaluationRecord {
    /// Devices in the secure sum, whose masked sums were in, and whose masks were removed after
    /// they dropped.
    pub participants: usize,
    pub survivors: usize,
    pub recovered: usize,
    /// Groups with a block of their own (each has enough devices to be published).
    pub groups: usize,
    /// Why nothing was revealed, when nothing was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded: Option<String>,
}

/// A global model scored on the devices' held-out data: totals only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FederatedEvaluation {
    /// The global model after this round was scored.
    pub model_round: u32,
    /// Devices asked, that reported sums, that declined (by their operator's policy, or holding no
    /// held-out data), whose report was refused, and that did not answer in time or left.
    pub asked: usize,
    pub reported: usize,
    pub declined: usize,
    pub refused: usize,
    pub missing: usize,
    /// Over every reporting device; absent when fewer than `min_group_devices` reported.
    pub overall: Option<HeldOutScores>,
    /// Each rank's model on the held-out data of the devices that hold it.
    pub by_rank: BTreeMap<u32, HeldOutScores>,
    /// Each device class's held-out data, on the models its devices hold.
    pub by_class: BTreeMap<String, HeldOutScores>,
    /// The cross-rank view (`cross_rank`, the final model): each rank's model (the outer key) on
    /// each device class's held-out data.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cross_rank: BTreeMap<u32, BTreeMap<String, HeldOutScores>>,
    /// Groups (overall, ranks, classes) left out for having too few devices.
    pub suppressed_groups: usize,
    /// From the first request to the record.
    pub seconds: f64,
    /// Adapter slices sent for evaluation only, and the reports received.
    pub bytes_down: u64,
    pub bytes_up: u64,
    /// Under secure aggregation: the sums travelled masked and only these totals were revealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masked: Option<MaskedEvaluationRecord>,
}

/// Scores of a model on held-out data, from summed counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeldOutScores {
    pub devices: usize,
    pub examples: u64,
    /// Examples for a classifier, target tokens for a decoder.
    pub scored: u64,
    pub accuracy: f64,
    /// Mean cross-entropy per scored example or token (a decoder's perplexity is its exp).
    pub loss: f64,
    /// A classifier's macro-F1 and accuracy per label index; absent for a decoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_label_accuracy: Vec<Option<f64>>,
    /// A headline-writing decoder: the mean ROUGE-L F1 of the headlines the devices wrote, and how
    /// many they wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub headlines: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
