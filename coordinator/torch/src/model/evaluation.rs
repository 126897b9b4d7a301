//! Evaluation of the global model (frozen base + global adapter) on a held-out test set, at R_max
//! and at every rank that took part, so operators see what a rank-2 phone actually gets.
//!
//! The initial model is evaluated before the first round. Each round's global adapter is then
//! evaluated on its own thread ([`EvaluationThread`]), from a copy, while the next round trains:
//! a transformer's evaluation takes seconds, and the round does not wait for it.

use std::collections::BTreeSet;
use std::path::PathBuf;

use flotilla_torch::adapter::{write_atomically, Adapter};
use flotilla_torch::data::decoder_tokenizer::DecoderTokenizer;
use flotilla_torch::data::Dataset;
use flotilla_torch::gguf::GgufFile;
use flotilla_torch::model::decoder_model::DecoderModel;
use flotilla_torch::model::{Architecture, BaseWeights, LoraModel};
use flotilla_wire::model::DecoderTask;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::model::class_scores::{class_scores, ClassScore};
use crate::model::evaluation_set::{class_labels, load_test_set, EvaluationSet};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RankAccuracy {
    pub rank: usize,
    pub loss: f64,
    pub accuracy: f64,
    /// The mean of the classes' F1 (each class once, whatever its size); absent in records
    /// written before it was measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    /// Each class's accuracy and F1 on the evaluated set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_class: Vec<ClassScore>,
    /// A decoder's mean ROUGE-L F1 of its greedy headlines against the true ones (`loss` is then
    /// the loss per headline token and `accuracy` the share of headline tokens predicted exactly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
    /// A decoder's held-out perplexity, exp(loss per target token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// A decoder's first greedy headlines, for people to read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headlines: Vec<String>,
}

pub struct Evaluator {
    architecture: Architecture,
    base: BaseWeights,
    scale: f64,
    test: Dataset,
    labels: Vec<String>,
    /// Every device receives the whole global adapter (Fold-and-Fill), so what a rank gets is
    /// the full model, not a truncated slice.
    whole_adapter_to_every_rank: bool,
    /// A decoder's tokenizer (to decode its headlines) and how many it writes per evaluation.
    headlines: Option<(DecoderTokenizer, usize)>,
}

/// Generated headlines kept in the records.
const HEADLINES_KEPT: usize = 3;

impl Evaluator {
    /// Loads the held-out set (see [`load_test_set`]) to evaluate `base` + adapter on.
    pub fn load(
        architecture: Architecture,
        base: BaseWeights,
        scale: f64,
        set: &EvaluationSet,
    ) -> anyhow::Result<Evaluator> {
        let test = load_test_set(&architecture, set)?;
        let labels = class_labels(&architecture);
        let headlines = match (&architecture, &set.tokenizer) {
            (Architecture::Llama(spec), Some(gguf)) if spec.task == DecoderTask::Headline => {
                let file = GgufFile::open(gguf).map_err(|e| anyhow::anyhow!("{}: {e}", gguf.display()))?;
                Some((DecoderTokenizer::from_gguf(&file)?, DEFAULT_ROUGE_SAMPLES))
            }
            _ => None,
        };
        Ok(Evaluator { architecture, base, scale, test, labels, whole_adapter_to_every_rank: false, headlines })
    }

    /// How many held-out articles a decoder writes a headline for at each evaluation.
    pub fn writing_headlines(mut self, count: usize) -> Evaluator {
        if let Some((_, samples)) = &mut self.headlines {
            *samples = count;
        }
        self
    }

    /// For a method that sends every device the whole adapter (its slots above the device's rank
    /// folded into the frozen weight, `Method::folds_tail`): each rank is evaluated as the model its
    /// devices hold, which computes the full global's logits.
    pub fn delivering_whole_adapter(mut self, whole: bool) -> Evaluator {
        self.whole_adapter_to_every_rank = whole;
        self
    }

    pub fn samples(&self) -> usize {
        self.test.len()
    }

    /// Loss and accuracy of the global adapter sliced to each of `ranks` (and to its full rank):
    /// what devices of each rank receive. When every device receives the whole adapter, a rank's
    /// model (its slice with the rest folded in) computes the full model's logits
    /// (`common/torch/tests/fold_and_fill_model.rs`), so the full model is evaluated once and stands for
    /// every rank.
    pub fn evaluate(&self, global: &Adapter, ranks: &BTreeSet<usize>) -> Result<Vec<RankAccuracy>, String> {
        let mut all: BTreeSet<usize> = ranks.iter().copied().filter(|&r| r >= 1 && r <= global.rank()).collect();
        if self.whole_adapter_to_every_rank {
            let whole = self.evaluate_rank(global, global.rank())?;
            all.insert(global.rank());
            return Ok(all.into_iter().rev().map(|rank| RankAccuracy { rank, ..whole.clone() }).collect());
        }
        all.insert(global.rank());
        all.into_iter().rev().map(|rank| self.evaluate_rank(global, rank)).collect()
    }

    /// Loss, accuracy, macro-F1 and per-class scores of `global`'s first `rank` slots.
    fn evaluate_rank(&self, global: &Adapter, rank: usize) -> Result<RankAccuracy, String> {
        let slice = global.slice_to_rank(rank).map_err(|e| e.to_string())?;
        if self.architecture.is_decoder() {
            return self.evaluate_decoder(&slice, rank);
        }
        let model = LoraModel::new(&self.architecture, &self.base, &slice, self.scale, tch::Device::Cpu)
            .map_err(|e| e.to_string())?;
        let batch = if self.architecture.takes_tokens() { 64 } else { 2048 };
        let (loss, confusion) = model.evaluate_confusion(&self.test, batch).map_err(|e| e.to_string())?;
        let correct: u64 = (0..confusion.len()).map(|c| confusion[c].get(c).copied().unwrap_or(0)).sum();
        let accuracy = if self.test.is_empty() { 0.0 } else { correct as f64 / self.test.len() as f64 };
        let (per_class, macro_f1) = class_scores(&confusion, &self.labels);
        Ok(RankAccuracy { rank, loss, accuracy, macro_f1: Some(macro_f1), per_class, ..RankAccuracy::default() })
    }
}

impl Evaluator {
    /// A decoder's loss and exact tokens on the held-out headlines, and ROUGE-L of the headlines
    /// it writes greedily for the first of them.
    fn evaluate_decoder(&self, slice: &Adapter, rank: usize) -> Result<RankAccuracy, String> {
        let model = DecoderModel::new(&self.architecture, &self.base, slice, self.scale, tch::Device::Cpu)
            .map_err(|e| e.to_string())?;
        let sums = model.evaluate_sums(&self.test).map_err(|e| e.to_string())?;
        let (rouge_l, headlines) = match &self.headlines {
            Some((tokenizer, count)) => {
                let (rouge, written) = write_headlines(&model, tokenizer, &self.test, *count)?;
                (Some(rouge), written.into_iter().take(HEADLINES_KEPT).collect())
            }
            None => (None, Vec::new()),
        };
        Ok(RankAccuracy {
            rank,
            loss: sums.mean_loss(),
            accuracy: sums.accuracy(),
            macro_f1: None,
            per_class: Vec::new(),
            rouge_l,
            perplexity: Some(sums.mean_loss().exp()),
            headlines,
        })
    }
}

/// Mean ROUGE-L F1 of greedy headlines for the first `count` held-out articles, and the headlines.
fn write_headlines(
    model: &DecoderModel,
    tokenizer: &DecoderTokenizer,
    test: &Dataset,
    count: usize,
) -> Result<(f64, Vec<String>), String> {
    let written = model.write_headlines(tokenizer, test, count).map_err(|e| e.to_string())?;
    let mean =
        if written.is_empty() { 0.0 } else { written.iter().map(|(_, s)| s).sum::<f64>() / written.len() as f64 };
    Ok((mean, written.into_iter().map(|(headline, _)| headline).collect()))
}

/// A round's test results, written into its checkpoint directory once its evaluation is done
/// (after the checkpoint itself: evaluation runs beside the next round).
pub const EVALUATION_FILE: &str = "evaluation.json";

/// Called with each round's results (or why there are none).
pub type EvaluationReport = Box<dyn Fn(u32, Result<Vec<RankAccuracy>, String>) + Send>;

struct EvaluationJob {
    round: u32,
    global: Adapter,
    ranks: BTreeSet<usize>,
    /// The round's checkpoint directory, where the results are written too.
    checkpoint_dir: PathBuf,
}

/// Rounds whose evaluation may wait at once: each holds a copy of the global adapter, so a
/// coordinator whose evaluation falls behind its rounds makes its aggregation wait rather than
/// holding ever more adapters.
const EVALUATIONS_QUEUED: usize = 2;

/// Evaluates rounds one after another, off the aggregation thread.
pub struct EvaluationThread {
    jobs: std::sync::mpsc::SyncSender<EvaluationJob>,
}

impl EvaluationThread {
    pub fn spawn(evaluator: Evaluator, report: EvaluationReport) -> anyhow::Result<EvaluationThread> {
        let (jobs, receiver) = std::sync::mpsc::sync_channel::<EvaluationJob>(EVALUATIONS_QUEUED);
        std::thread::Builder::new().name("evaluation".into()).spawn(move || {
            // One core: the other serves the network and the aggregation.
            tch::set_num_threads(1);
            while let Ok(job) = receiver.recv() {
                let round = job.round;
                let result = evaluator.evaluate(&job.global, &job.ranks);
                match &result {
                    Ok(results) => {
                        let what =
                            if evaluator.architecture.is_decoder() { "held-out headlines" } else { "test accuracy" };
                        info!(round, "[round {round}] {what} ({} samples): {}", evaluator.samples(), describe(results));
                        let path = job.checkpoint_dir.join(EVALUATION_FILE);
                        let written = serde_json::to_vec(results)
                            .map_err(|e| e.to_string())
                            .and_then(|bytes| write_atomically(&path, &bytes).map_err(|e| e.to_string()));
                        if let Err(error) = written {
                            warn!(round, "cannot write {}: {error}", path.display());
                        }
                    }
                    Err(error) => warn!(round, "[round {round}] evaluation failed: {error}"),
                }
                report(round, result);
            }
        })?;
        Ok(EvaluationThread { jobs })
    }

    /// Queues `global` of `round` for evaluation at R_max and at `ranks`; waits while
    /// [`EVALUATIONS_QUEUED`] rounds are already waiting.
    pub fn submit(&self, round: u32, global: Adapter, ranks: BTreeSet<usize>, checkpoint_dir: PathBuf) {
        if self.jobs.send(EvaluationJob { round, global, ranks, checkpoint_dir }).is_err() {
            warn!(round, "the evaluation thread has stopped; round {round} is not evaluated");
        }
    }
}

/// What evaluating `architecture` measures, for logs.
pub fn measured(architecture: &Architecture) -> &'static str {
    match architecture {
        Architecture::Llama(spec) if spec.task == DecoderTask::NextWord => "held-out next words",
        Architecture::Llama(_) => "held-out headlines",
        _ => "test accuracy",
    }
}

/// Held-out headlines written per evaluation unless `[model.decoder] rouge_samples` says otherwise.
pub const DEFAULT_ROUGE_SAMPLES: usize = 16;

/// "R_max 8 → 81.2%, rank 4 → 78.9%, …" for logs.
pub fn describe(results: &[RankAccuracy]) -> String {
    if results.iter().any(|r| r.perplexity.is_some()) {
        let ranks: Vec<String> = results
            .iter()
            .map(|r| match r.rouge_l {
                Some(rouge) => format!("rank {} → loss {:.3}, ROUGE-L {:.1}", r.rank, r.loss, rouge * 100.0),
                None => format!("rank {} → loss {:.3}, perplexity {:.1}", r.rank, r.loss, r.perplexity.unwrap_or(0.0)),
            })
            .collect();
        return ranks.join(", ");
    }
    let ranks = results.iter().map(|r| format!("rank {} → {:.1}%", r.rank, r.accuracy * 100.0)).collect::<Vec<_>>();
    match results.first().and_then(|r| r.macro_f1.map(|f| (r.rank, f))) {
        Some((rank, f1)) => format!("{} (macro-F1 at rank {rank}: {:.1}%)", ranks.join(", "), f1 * 100.0),
        None => ranks.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_torch::data::synthetic_classification;
    use flotilla_torch::model::ArchitectureExt;

    use super::*;

    #[test]
    fn a_method_that_sends_the_whole_adapter_is_evaluated_as_the_full_model_at_every_rank() {
        let architecture = Architecture::Mlp { input: 12, hidden: vec![10], classes: 3 };
        let global = architecture.init_adapter(4, 3).unwrap();
        // B starts at zero: give every slot a product, so that slices differ from the whole.
        let tensors = global.tensors().iter().map(|(n, t)| (n.clone(), t.ones_like() * 0.3 + t)).collect();
        let global = Adapter::new(tensors).unwrap();
        let evaluator = Evaluator {
            base: architecture.init_base(1),
            architecture,
            scale: 2.0,
            test: synthetic_classification(400, 12, 3, 5, 6),
            labels: vec!["a".into(), "b".into(), "c".into()],
            whole_adapter_to_every_rank: false,
            headlines: None,
        };
        let ranks = BTreeSet::from([1, 2]);
        let sliced = evaluator.evaluate(&global, &ranks).unwrap();
        assert_eq!(sliced.iter().map(|r| r.rank).collect::<Vec<_>>(), vec![4, 2, 1]);
        assert!(sliced[2].loss != sliced[0].loss, "a rank-1 slice is not the full model: {sliced:?}");
        let whole = evaluator.delivering_whole_adapter(true).evaluate(&global, &ranks).unwrap();
        assert_eq!(whole.iter().map(|r| r.rank).collect::<Vec<_>>(), vec![4, 2, 1]);
        assert!(whole.iter().all(|r| r.loss == sliced[0].loss && r.accuracy == sliced[0].accuracy), "{whole:?}");
        let classes: Vec<&str> = sliced[0].per_class.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(classes, ["a", "b", "c"]);
        assert_eq!(sliced[0].per_class.iter().map(|c| c.count).sum::<u64>(), 400);
        assert!(sliced[0].macro_f1.is_some_and(|f| (0.0..=1.0).contains(&f)));
    }
}
