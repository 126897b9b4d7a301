//! What the device's side of the protocol (`session`, `secure_session`) needs from a training
//! backend, and nothing of how it trains: those modules talk to [`LocalTrainer`] only, in wire
//! types, so a second backend (Android, where upstream libtorch is no longer served, needs one,
//! e.g. ExecuTorch) can come without touching the session, the protocol or the aggregation.
//! `trainer::Trainer` (libtorch, on its own thread) is the first implementation;
//! tests/tests/architecture.rs checks that these three modules stay free of libtorch.

use std::future::Future;
use std::path::PathBuf;

use flotilla_wire::model::Architecture;
use flotilla_wire::protocol::{LocalMetrics, SecureTask, TrainingSettings};
use flotilla_wire::tensor::WireTensors;

/// A device's training backend: it takes the coordinator's frozen base once per session, then
/// trains each round's slice of the global adapter at the device's rank.
pub trait LocalTrainer: Send + Sync {
    /// Loads the frozen base (`scale` is the LoRA scale α/r of the coordinator's model) and the
    /// local data; when the run evaluates on devices (an `evaluation` plan), sets the held-out data
    /// apart.
    fn set_base(
        &self,
        architecture: Architecture,
        scale: f64,
        base: BaseSource,
        evaluation: Option<flotilla_wire::evaluation::EvaluationPlan>,
    ) -> impl Future<Output = Result<(), BaseFailure>> + Send;

    /// Scores the global adapter's `slice` as a device of `scoring.rank` holds it (and as devices of
    /// `scoring.cross_ranks` do) on the held-out data, without training: sums only.
    fn evaluate(
        &self,
        slice: WireTensors,
        scoring: Scoring,
    ) -> impl Future<Output = anyhow::Result<HeldOutResult>> + Send;

    /// Trains the round's `slice` at `rank`: slots of the slice beyond `rank` (Fold-and-Fill sends
    /// the whole R_max adapter) are folded into the frozen weight and not trained. With a clipping
    /// bound in `shaping`, the change against the slice is clipped to it (differential privacy).
    fn train(
        &self,
        slice: WireTensors,
        rank: u32,
        settings: TrainingSettings,
        shaping: UpdateShaping,
    ) -> impl Future<Output = anyhow::Result<TrainedUpdate>> + Send;
}

/// Which models of a slice to score: the device's own rank's, and the cross-rank view's.
#[derive(Debug, Clone, Default)]
pub struct Scoring {
    pub rank: u32,
    pub cross_ranks: Vec<u32>,
    /// A rank-r model folds the slice's slots above r into the frozen weight (Fold-and-Fill); it
    /// keeps only its first r slots otherwise.
    pub fold_tail: bool,
}

/// What the held-out data says about a model: the sums, or why the device declines.
pub struct HeldOutResult {
    pub held_out_examples: u64,
    pub sums: Option<flotilla_wire::evaluation::EvaluationSums>,
    pub declined: String,
    /// The cross-rank view: each asked rank's model on the same data.
    pub cross: Vec<flotilla_wire::evaluation::RankSums>,
}

pub struct TrainedUpdate {
    pub tensors: WireTensors,
    pub rank: u32,
    pub num_samples: u64,
    pub metrics: LocalMetrics,
    /// Under differential privacy: the L2 norm of the change before it was clipped.
    pub change_norm: Option<f64>,
    /// Under secure aggregation: the update weighted and laid out for masking
    /// (the torch side's `aggregate::secure::pack`).
    pub packed: Option<Vec<f32>>,
}

/// What a round asks of an update besides training: a clipping bound (differential privacy), and
/// under secure aggregation how to pack it (its layout, sample cap and noise levels).
#[derive(Debug, Clone, Default)]
pub struct UpdateShaping {
    pub clip_norm: Option<f64>,
    pub secure: Option<SecureTask>,
}

/// Where the frozen base comes from: tensors sent with the Welcome, or a checkpoint directory
/// (weights and tokenizer, or a decoder's GGUF file) whose files match the coordinator's digests.
pub enum BaseSource {
    Tensors(WireTensors),
    Checkpoint(PathBuf),
}

/// Why a device cannot take the coordinator's model: the model itself, or its own data (which
/// only its operator can fix, and which the coordinator is told about by its close code).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BaseFailure {
    #[error("cannot use the coordinator's model: {0}")]
    Model(String),
    #[error("cannot use its own data: {0}")]
    Data(String),
}
