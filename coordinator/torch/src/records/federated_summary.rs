//! The run summary's federated evaluation table: each evaluated model on the devices' own
//! held-out data (totals only), overall, per rank and per device class, printed beside the central
//! evaluation and labelled apart from it.

use crate::records::federated_evaluation::{FederatedEvaluation, HeldOutScores};
use crate::records::report::RunSummary;

/// The table's lines; none when no round was evaluated on devices.
pub fn lines(summary: &RunSummary) -> Vec<String> {
    let records: Vec<&FederatedEvaluation> =
        summary.rounds.iter().filter_map(|r| r.federated_evaluation.as_deref()).collect();
    if records.is_empty() {
        return Vec::new();
    }
    let mut ranks: Vec<u32> = records.iter().flat_map(|f| f.by_rank.keys().copied()).collect();
    ranks.sort_unstable_by(|a, b| b.cmp(a));
    ranks.dedup();
    let mut classes: Vec<String> = records.iter().flat_map(|f| f.by_class.keys().cloned()).collect();
    classes.sort();
    classes.dedup();
    let decoder = records.iter().filter_map(|f| f.overall.as_ref()).any(|o| o.macro_f1.is_none());
    let what = if decoder { "next-token accuracy" } else { "accuracy" };
    let mut lines = vec![
        String::new(),
        format!(
            "federated {what} on the devices' own held-out data (each device's model as it holds it; sums \
             only, no device's data or result seen):"
        ),
    ];
    let mut header = format!("{:>5}  {:>9}  {:>8} {:>8}", "model", "reported", "examples", "overall");
    ranks.iter().for_each(|r| header.push_str(&format!(" {:>8}", format!("rank {r}"))));
    classes.iter().for_each(|c| header.push_str(&format!(" {c:>8}")));
    let widths: Vec<usize> = classes.iter().map(|c| c.len().max(8)).collect();
    lines.push(header);
    let cell = |scores: Option<&HeldOutScores>| match scores {
        Some(s) => format!(" {:>7.1}%", s.accuracy * 100.0),
        None => format!(" {:>8}", "-"),
    };
    for record in &records {
        let overall = record.overall.as_ref();
        let mut line = format!(
            "{:>5}  {:>9}  {:>8}{}",
            record.model_round,
            format!("{}/{}", record.reported, record.asked),
            overall.map_or("-".to_string(), |o| o.examples.to_string()),
            cell(overall)
        );
        ranks.iter().for_each(|r| line.push_str(&cell(record.by_rank.get(r))));
        for (class, width) in classes.iter().zip(&widths) {
            line.push_str(&format!("{:>1$}", cell(record.by_class.get(class)), width + 1));
        }
        lines.push(line);
    }
    lines.push(
        "(\"-\": too few devices reported to publish that total; [federated_evaluation] min_group_devices)".into(),
    );
    for record in &records {
        if let Some((rouge_l, headlines)) = record.overall.as_ref().and_then(|o| Some((o.rouge_l?, o.headlines))) {
            lines.push(format!(
                "model {}: the devices' greedy headlines score ROUGE-L F1 {rouge_l:.3} ({headlines} headlines)",
                record.model_round
            ));
        }
    }
    if let Some(record) = records.iter().rev().find(|f| !f.cross_rank.is_empty()) {
        lines.extend(cross_rank_lines(record, what));
    }
    lines
}

/// The cross-rank view of `record`: each rank's model (a row) on each device class's held-out data
/// (a column).
fn cross_rank_lines(record: &FederatedEvaluation, what: &str) -> Vec<String> {
    let mut classes: Vec<&String> = record.cross_rank.values().flat_map(|by_class| by_class.keys()).collect();
    classes.sort();
    classes.dedup();
    let widths: Vec<usize> = classes.iter().map(|c| c.len().max(8)).collect();
    let mut header = format!("{:>8}", "model");
    for (class, width) in classes.iter().zip(&widths) {
        header.push_str(&format!(" {class:>width$}"));
    }
    let mut lines = vec![
        String::new(),
        format!(
            "cross-rank view, model {}: {what} of each rank's model (as a device of that rank holds it) on each \
             device class's held-out data:",
            record.model_round
        ),
        header,
    ];
    for (rank, by_class) in record.cross_rank.iter().rev() {
        let mut line = format!("{:>8}", format!("rank {rank}"));
        for (class, width) in classes.iter().zip(&widths) {
            let cell = by_class.get(*class).map_or("-".to_string(), |s| format!("{:.1}%", s.accuracy * 100.0));
            line.push_str(&format!(" {cell:>width$}"));
        }
        lines.push(line);
    }
    lines
}
