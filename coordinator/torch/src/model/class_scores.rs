//! Per-class results of a held-out evaluation, from its confusion matrix: each class's accuracy
//! (its recall: the share of its examples labelled correctly) and F1, and the macro-F1 (the mean of
//! the classes' F1, each class counted once whatever its size), so a model that does well on the
//! large classes and fails a small one cannot hide behind its overall accuracy.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassScore {
    pub label: String,
    /// Examples of this class in the evaluated set.
    pub count: u64,
    /// Correct / count (0 for a class with no example).
    pub accuracy: f64,
    pub f1: f64,
}

/// Each class's score (named by `labels`, or by its index past their end), and the macro-F1 over
/// the classes that occur in the evaluated set.
pub fn class_scores(confusion: &[Vec<u64>], labels: &[String]) -> (Vec<ClassScore>, f64) {
    let classes = confusion.len();
    let predicted = |c: usize| -> u64 { confusion.iter().map(|row| row.get(c).copied().unwrap_or(0)).sum() };
    let scores: Vec<ClassScore> = (0..classes)
        .map(|c| {
            let count: u64 = confusion[c].iter().sum();
            let correct = confusion[c].get(c).copied().unwrap_or(0);
            let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
            let (recall, precision) = (ratio(correct, count), ratio(correct, predicted(c)));
            let f1 = if recall + precision == 0.0 { 0.0 } else { 2.0 * recall * precision / (recall + precision) };
            let label = labels.get(c).cloned().unwrap_or_else(|| c.to_string());
            ClassScore { label, count, accuracy: recall, f1 }
        })
        .collect();
    let present: Vec<&ClassScore> = scores.iter().filter(|s| s.count > 0).collect();
    let macro_f1 =
        if present.is_empty() { 0.0 } else { present.iter().map(|s| s.f1).sum::<f64>() / present.len() as f64 };
    (scores, macro_f1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_that_ignores_a_small_class_shows_it_in_macro_f1() {
        // 90 of class a, all right; 10 of class b, all called a: 90% accuracy.
        let confusion = vec![vec![90, 0], vec![10, 0]];
        let (scores, macro_f1) = class_scores(&confusion, &["a".into(), "b".into()]);
        assert_eq!(scores[0].accuracy, 1.0);
        assert_eq!(scores[1].accuracy, 0.0);
        // F1 of a: precision 0.9, recall 1 → 0.947; of b: 0.
        assert!((scores[0].f1 - 2.0 * 0.9 / 1.9).abs() < 1e-12);
        assert!((macro_f1 - 0.9 / 1.9).abs() < 1e-12, "{macro_f1}");
        let (perfect, one) = class_scores(&[vec![3, 0, 0], vec![0, 2, 0], vec![0, 0, 0]], &[]);
        assert_eq!(one, 1.0, "a class absent from the set does not count");
        assert_eq!(perfect[2].label, "2");
    }
}
