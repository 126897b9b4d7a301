//! Federated evaluation on the wire: the coordinator asks devices to score a global model on
//! their own held-out data (an [`EvaluationTask`], or a round task with `evaluate` set), and each
//! answers with sums only ([`EvaluationReport`]): never an example, a prediction or a per-example
//! loss. The coordinator adds the sums up ([`EvaluationSums::add`]) after checking each report
//! against what the device said before ([`EvaluationSums::check`]).

use serde::{Deserialize, Serialize};

/// What the coordinator asks of a device's evaluations, told once in its `Welcome`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvaluationPlan {
    /// A headline-writing decoder also writes this many headlines (its first held-out articles)
    /// greedily and reports their ROUGE-L F1, summed.
    pub headlines: u32,
}

/// Asks a device to score the global adapter after round `model_round`, at its `rank`, on its
/// held-out data. The adapter slice travels with it, as with a round task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationTask {
    pub model_round: u32,
    pub rank: u32,
    pub base_version: String,
    /// Seconds from receipt until the coordinator stops waiting for the report.
    pub deadline_secs: u32,
    /// The cross-rank view: also score the models devices of these ranks hold (the slice sent is
    /// then the largest rank's). A rank-r model is the slice with its slots above r folded into the
    /// frozen weight when `fold_tail` (Fold-and-Fill), its first r slots otherwise.
    pub cross_ranks: Vec<u32>,
    pub fold_tail: bool,
    /// Under secure aggregation: the sums go up masked ([`MaskedEvaluation`]), in the blocks this
    /// names, after the SecAgg+ key agreement of its session; never as an `EvaluationReport`.
    pub secure: Option<SecureEvaluation>,
}

/// What a device puts in one block of its vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockFill {
    /// A group the device is not in: zeros.
    Empty,
    /// The scores of the model it was sent, at its own rank.
    Own,
    /// The cross-rank view: the scores of this rank's model.
    Rank(u32),
}

/// What makes an evaluation task secure: the SecAgg+ session and which blocks of the vector
/// (`secure_evaluation::SumsLayout`) are the device's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureEvaluation {
    pub task: crate::secure_task::SecureTask,
    /// One per block of the vector, in order.
    pub blocks: Vec<BlockFill>,
    /// Labels per block (0 for a decoder).
    pub classes: u32,
}

/// Under secure aggregation: a device's evaluation sums, laid out (`secure_evaluation::SumsLayout`)
/// and masked. Nothing else of its report travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskedEvaluation {
    pub model_round: u32,
    pub masked: flotilla_secagg::messages::MaskedInput,
}

/// A device's answer to an evaluation request: its sums, or `None` when it declines (its operator
/// turned evaluation off, or it holds no held-out data) with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluationReport {
    pub model_round: u32,
    pub rank: u32,
    /// Examples in the device's held-out set (the same in every report of a session).
    pub held_out_examples: u64,
    pub sums: Option<EvaluationSums>,
    /// Why the device declined (empty when it reports sums).
    pub declined: String,
    /// The task's `cross_ranks`, each rank's model scored on the same held-out data.
    pub cross: Vec<RankSums>,
}

/// One rank's model scored on a device's held-out data (the cross-rank view).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankSums {
    pub rank: u32,
    pub sums: EvaluationSums,
}

/// What a device's held-out data says about a model, as sums a coordinator can add up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvaluationSums {
    /// Held-out examples scored.
    pub examples: u64,
    /// What accuracy and loss are taken over: examples for a classifier, target tokens for a
    /// decoder.
    pub scored: u64,
    /// Correct predictions (a classifier's label, a decoder's next token).
    pub correct: u64,
    /// Cross-entropy summed over `scored`.
    pub loss_sum: f64,
    /// A classifier's counts per label index; empty for a decoder.
    pub labels: Vec<LabelSums>,
    /// A headline-writing decoder: headlines written, and their ROUGE-L F1 summed.
    pub generated: u64,
    pub rouge_l_sum: f64,
}

/// One label's counts on a device's held-out data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelSums {
    /// Examples whose true label this is.
    pub support: u64,
    /// Of those, predicted correctly.
    pub correct: u64,
    /// Examples predicted as this label.
    pub predicted: u64,
}

/// Why a report's sums cannot be counted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SumsError {
    #[error("{examples} examples scored, but the device holds {declared} held-out examples")]
    MoreThanHeldOut { examples: u64, declared: u64 },
    #[error("{correct} correct of {scored} scored")]
    MoreCorrectThanScored { correct: u64, scored: u64 },
    #[error("the loss sum {0} is not a finite, non-negative number")]
    BadLoss(f64),
    #[error("label index {index} is outside the model's {classes} labels")]
    LabelOutOfRange { index: usize, classes: usize },
    #[error("label {index}: {correct} correct of {support} examples")]
    LabelMoreCorrect { index: usize, correct: u64, support: u64 },
    #[error("the labels' counts ({support} true, {correct} correct, {predicted} predicted) do not add up to {examples} examples and {total_correct} correct")]
    LabelsDoNotAddUp { support: u64, correct: u64, predicted: u64, examples: u64, total_correct: u64 },
    #[error("a classifier scores examples: {scored} scored for {examples} examples")]
    ScoredNotExamples { scored: u64, examples: u64 },
    #[error("{generated} headlines written from {examples} examples")]
    MoreHeadlinesThanExamples { generated: u64, examples: u64 },
    #[error("the ROUGE-L sum {sum} is not between 0 and the {generated} headlines written")]
    BadRouge { sum: f64, generated: u64 },
    #[error("the counts overflow")]
    Overflow,
}

impl EvaluationSums {
    /// Checks the sums a device sent: at most its `declared` held-out examples; for a classifier
    /// (`classes` > 0) the per-label counts inside `classes` and adding up to the totals; for a
    /// decoder (`classes` == 0) no labels.
    pub fn check(&self, declared: u64, classes: usize) -> Result<(), SumsError> {
        if self.examples > declared {
            return Err(SumsError::MoreThanHeldOut { examples: self.examples, declared });
        }
        if self.correct > self.scored {
            return Err(SumsError::MoreCorrectThanScored { correct: self.correct, scored: self.scored });
        }
        if !self.loss_sum.is_finite() || self.loss_sum < 0.0 {
            return Err(SumsError::BadLoss(self.loss_sum));
        }
        if self.labels.len() > classes {
            return Err(SumsError::LabelOutOfRange { index: self.labels.len() - 1, classes });
        }
        if self.generated > self.examples || (classes > 0 && self.generated > 0) {
            return Err(SumsError::MoreHeadlinesThanExamples { generated: self.generated, examples: self.examples });
        }
        if !self.rouge_l_sum.is_finite() || self.rouge_l_sum < 0.0 || self.rouge_l_sum > self.generated as f64 {
            return Err(SumsError::BadRouge { sum: self.rouge_l_sum, generated: self.generated });
        }
        if classes == 0 {
            return Ok(());
        }
        if self.scored != self.examples {
            return Err(SumsError::ScoredNotExamples { scored: self.scored, examples: self.examples });
        }
        let (mut support, mut correct, mut predicted) = (0u64, 0u64, 0u64);
        for (index, label) in self.labels.iter().enumerate() {
            if label.correct > label.support {
                return Err(SumsError::LabelMoreCorrect { index, correct: label.correct, support: label.support });
            }
            support = support.checked_add(label.support).ok_or(SumsError::Overflow)?;
            correct = correct.checked_add(label.correct).ok_or(SumsError::Overflow)?;
            predicted = predicted.checked_add(label.predicted).ok_or(SumsError::Overflow)?;
        }
        if support != self.examples || predicted != self.examples || correct != self.correct {
            return Err(SumsError::LabelsDoNotAddUp {
                support,
                correct,
                predicted,
                examples: self.examples,
                total_correct: self.correct,
            });
        }
        Ok(())
    }

    /// Adds `other` (checked) into these sums.
    pub fn add(&mut self, other: &EvaluationSums) -> Result<(), SumsError> {
        let add = |a: u64, b: u64| a.checked_add(b).ok_or(SumsError::Overflow);
        self.examples = add(self.examples, other.examples)?;
        self.scored = add(self.scored, other.scored)?;
        self.correct = add(self.correct, other.correct)?;
        self.generated = add(self.generated, other.generated)?;
        self.loss_sum += other.loss_sum;
        self.rouge_l_sum += other.rouge_l_sum;
        if self.labels.len() < other.labels.len() {
            self.labels.resize(other.labels.len(), LabelSums::default());
        }
        for (mine, theirs) in self.labels.iter_mut().zip(&other.labels) {
            mine.support = add(mine.support, theirs.support)?;
            mine.correct = add(mine.correct, theirs.correct)?;
            mine.predicted = add(mine.predicted, theirs.predicted)?;
        }
        Ok(())
    }

    /// Sums from a confusion matrix `[true label][predicted label]` and a summed loss.
    pub fn from_confusion(confusion: &[Vec<u64>], loss_sum: f64) -> EvaluationSums {
        let classes = confusion.len().max(confusion.iter().map(Vec::len).max().unwrap_or(0));
        let mut labels = vec![LabelSums::default(); classes];
        for (truth, row) in confusion.iter().enumerate() {
            for (predicted, &n) in row.iter().enumerate() {
                labels[truth].support += n;
                labels[predicted].predicted += n;
                if truth == predicted {
                    labels[truth].correct += n;
                }
            }
        }
        let examples = labels.iter().map(|l| l.support).sum();
        let correct = labels.iter().map(|l| l.correct).sum();
        EvaluationSums { examples, scored: examples, correct, loss_sum, labels, generated: 0, rouge_l_sum: 0.0 }
    }

    /// Mean ROUGE-L F1 of the headlines written, if any were.
    pub fn rouge_l(&self) -> Option<f64> {
        (self.generated > 0).then(|| self.rouge_l_sum / self.generated as f64)
    }

    pub fn accuracy(&self) -> f64 {
        ratio(self.correct, self.scored)
    }

    /// Mean loss per scored example or token.
    pub fn mean_loss(&self) -> f64 {
        if self.scored == 0 {
            0.0
        } else {
            self.loss_sum / self.scored as f64
        }
    }

    /// Unweighted mean over the labels with examples of each label's F1 (0 without labels).
    pub fn macro_f1(&self) -> f64 {
        let present: Vec<f64> = self
            .labels
            .iter()
            .filter(|l| l.support > 0)
            .map(|l| {
                let denominator = l.support + l.predicted;
                ratio(2 * l.correct, denominator)
            })
            .collect();
        if present.is_empty() {
            0.0
        } else {
            present.iter().sum::<f64>() / present.len() as f64
        }
    }
}

fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classifier(confusion: &[Vec<u64>]) -> EvaluationSums {
        EvaluationSums::from_confusion(confusion, 1.5)
    }

    #[test]
    fn sums_from_a_confusion_matrix_add_up_and_pass_the_check() {
        let sums = classifier(&[vec![3, 1], vec![0, 4]]);
        assert_eq!((sums.examples, sums.scored, sums.correct), (8, 8, 7));
        assert_eq!(sums.labels[0], LabelSums { support: 4, correct: 3, predicted: 3 });
        assert_eq!(sums.labels[1], LabelSums { support: 4, correct: 4, predicted: 5 });
        sums.check(8, 2).unwrap();
        assert!((sums.accuracy() - 7.0 / 8.0).abs() < 1e-12);
        // F1: label 0 = 2·3/(4+3), label 1 = 2·4/(4+5).
        assert!((sums.macro_f1() - (6.0 / 7.0 + 8.0 / 9.0) / 2.0).abs() < 1e-12);
    }

    #[test]
    fn a_report_that_lies_is_refused_with_the_reason() {
        let good = classifier(&[vec![3, 1], vec![0, 4]]);
        assert!(matches!(good.check(7, 2), Err(SumsError::MoreThanHeldOut { examples: 8, declared: 7 })));
        assert!(matches!(good.check(8, 1), Err(SumsError::LabelOutOfRange { index: 1, classes: 1 })));
        let mut more_correct = good.clone();
        more_correct.correct = 9;
        assert!(matches!(more_correct.check(8, 2), Err(SumsError::MoreCorrectThanScored { .. })));
        for loss in [f64::NAN, f64::INFINITY, -1.0] {
            let mut bad = good.clone();
            bad.loss_sum = loss;
            assert!(matches!(bad.check(8, 2), Err(SumsError::BadLoss(_))), "{loss}");
        }
        let mut inconsistent = good.clone();
        inconsistent.labels[1].support = 5;
        assert!(matches!(inconsistent.check(8, 2), Err(SumsError::LabelsDoNotAddUp { .. })));
        let mut label_lies = good.clone();
        label_lies.labels[0].correct = 5;
        assert!(matches!(label_lies.check(8, 2), Err(SumsError::LabelMoreCorrect { .. })));
        let mut tokens = good.clone();
        tokens.scored = 100;
        assert!(matches!(tokens.check(8, 2), Err(SumsError::ScoredNotExamples { .. })));
        let mut huge = good;
        huge.labels[0].support = u64::MAX;
        assert!(huge.check(8, 2).is_err());
    }

    #[test]
    fn a_decoder_scores_tokens_and_carries_no_labels() {
        let sums = EvaluationSums {
            examples: 3,
            scored: 40,
            correct: 12,
            loss_sum: 80.0,
            labels: vec![],
            generated: 2,
            rouge_l_sum: 1.5,
        };
        sums.check(3, 0).unwrap();
        assert!((sums.mean_loss() - 2.0).abs() < 1e-12);
        assert_eq!(sums.rouge_l(), Some(0.75));
        let labelled = EvaluationSums { labels: vec![LabelSums::default()], ..sums.clone() };
        assert!(labelled.check(3, 0).is_err());
        let too_many = EvaluationSums { generated: 4, rouge_l_sum: 1.0, ..sums.clone() };
        assert!(matches!(too_many.check(3, 0), Err(SumsError::MoreHeadlinesThanExamples { .. })));
        for rouge_l_sum in [2.5, -0.1, f64::NAN] {
            let bad = EvaluationSums { rouge_l_sum, ..sums.clone() };
            assert!(matches!(bad.check(3, 0), Err(SumsError::BadRouge { .. })), "{rouge_l_sum}");
        }
    }

    #[test]
    fn adding_sums_adds_every_count() {
        let mut total = classifier(&[vec![3, 1], vec![0, 4]]);
        total.add(&classifier(&[vec![1, 0, 0], vec![0, 0, 1], vec![0, 0, 2]])).unwrap();
        assert_eq!((total.examples, total.correct), (12, 10));
        assert_eq!(total.labels.len(), 3);
        assert_eq!(total.labels[2], LabelSums { support: 2, correct: 2, predicted: 3 });
        total.check(12, 3).unwrap();
        let mut overflow = total.clone();
        overflow.examples = u64::MAX;
        assert_eq!(overflow.add(&total), Err(SumsError::Overflow));
    }
}
