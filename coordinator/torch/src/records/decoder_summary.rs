//! The end-of-run summary of a decoder run: per round and rank, the held-out loss per target token
//! and the ROUGE-L of the greedy headlines (or, for next-word adaptation, the perplexity), then a
//! few headlines from the base and from the last evaluated model side by side, so a person sees
//! what fine-tuning changed.

use crate::model::evaluation::RankAccuracy;
use crate::records::report::{mean_local_loss, RunSummary};

fn evaluations(summary: &RunSummary) -> impl Iterator<Item = &RankAccuracy> {
    summary.initial_evaluation.iter().chain(summary.rounds.iter().flat_map(|r| &r.evaluation))
}

/// Whether `summary` is a decoder's (its evaluations carry a perplexity or ROUGE-L).
pub fn is_decoder_run(summary: &RunSummary) -> bool {
    evaluations(summary).any(|r| r.perplexity.is_some() || r.rouge_l.is_some())
}

/// "3.021 / 17.1" (loss / ROUGE-L %, or loss / perplexity) for each rank in `ranks` (`-` where a
/// rank was not evaluated).
fn cells(ranks: &[usize], results: &[RankAccuracy]) -> String {
    ranks
        .iter()
        .map(|rank| match results.iter().find(|r| r.rank == *rank) {
            Some(r) => {
                let second = r.rouge_l.map_or(r.perplexity.unwrap_or(0.0), |rouge| rouge * 100.0);
                format!("{:>14}", format!("{:.3} / {:.1}", r.loss, second))
            }
            None => format!("{:>14}", "-"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn lines(summary: &RunSummary) -> Vec<String> {
    let mut ranks: Vec<usize> = summary
        .rounds
        .iter()
        .flat_map(|r| r.evaluation.iter().map(|e| e.rank))
        .chain(summary.initial_evaluation.iter().map(|r| r.rank))
        .collect();
    ranks.sort_unstable_by(|a, b| b.cmp(a));
    ranks.dedup();
    let headlines = evaluations(summary).any(|r| r.rouge_l.is_some());
    let title = if headlines {
        "held-out headlines, per rank: loss per headline token / ROUGE-L F1 (%) of the greedy headline:"
    } else {
        "held-out next words, per rank: loss per token / perplexity:"
    };
    let mut out = vec![String::new(), title.to_string()];
    let header: Vec<String> = ranks.iter().map(|r| format!("{:>14}", format!("rank {r}"))).collect();
    out.push(format!("{:>5}  {:>7}  {:>10}  {}", "round", "updates", "local loss", header.join(" ")));
    if !summary.initial_evaluation.is_empty() {
        out.push(format!("{:>5}  {:>7}  {:>10}  {}", "base", "-", "-", cells(&ranks, &summary.initial_evaluation)));
    }
    for round in &summary.rounds {
        let loss = mean_local_loss(&round.updates).map_or("-".to_string(), |l| format!("{l:.4}"));
        out.push(format!(
            "{:>5}  {:>7}  {:>10}  {}",
            round.round,
            round.updates.len(),
            loss,
            cells(&ranks, &round.evaluation)
        ));
    }
    let at_max = |results: &[RankAccuracy]| results.iter().find(|r| r.rank == summary.max_rank as usize).cloned();
    let base = at_max(&summary.initial_evaluation);
    let latest = summary.rounds.iter().rev().find_map(|r| at_max(&r.evaluation).map(|e| (r.round, e)));
    if let (Some(base), Some((round, latest))) = (base, latest) {
        out.push(format!("example headlines at R_max (the base → after round {round}):"));
        for (before, after) in base.headlines.iter().zip(&latest.headlines) {
            out.push(format!("  {before:?} → {after:?}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoder_summary_shows_loss_rouge_and_headlines() {
        let result = |loss: f64, rouge: f64, headline: &str| RankAccuracy {
            rank: 4,
            loss,
            rouge_l: Some(rouge),
            headlines: vec![headline.to_string()],
            ..RankAccuracy::default()
        };
        let mut summary: RunSummary = serde_json::from_value(serde_json::json!({
            "method": "fold-and-fill", "max_rank": 4, "rounds_completed": 1, "rounds": [],
            "final_global": null, "initial_evaluation": [],
        }))
        .unwrap();
        summary.initial_evaluation = vec![result(4.5, 0.1, "Hello")];
        assert!(is_decoder_run(&summary));
        let text = lines(&summary).join("\n");
        assert!(text.contains("4.500 / 10.0"), "{text}");
        assert!(!text.contains("example headlines"), "no round yet: {text}");
        let mut round: crate::records::report::RoundRecord = serde_json::from_value(serde_json::json!({
            "round": 1, "updates": [], "aggregation_seconds": 0.0, "round_seconds": 0.0,
            "global_dir": null, "evaluation": [],
        }))
        .unwrap();
        round.evaluation = vec![result(3.0, 0.25, "Profits rise")];
        summary.rounds.push(round);
        let text = lines(&summary).join("\n");
        assert!(text.contains("3.000 / 25.0") && text.contains("\"Hello\" → \"Profits rise\""), "{text}");
    }
}
