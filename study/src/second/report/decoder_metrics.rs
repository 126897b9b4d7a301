//! A decoder suite's other two scores: the loss per headline token and the ROUGE-L F1 of greedy
//! headlines, with the gain recovered on each, read from the same cached runs as the accuracy.

use std::fmt::Write as _;

use anyhow::Result;

use super::{stat, Report};
use crate::results::Stat;
use crate::second::results::{Metric, Run};

fn mean_sd(s: Option<Stat>, scale: f64, digits: usize) -> String {
    s.map_or("—".into(), |s| format!("{:.digits$} ± {:.digits$}", scale * s.mean, scale.abs() * s.sd))
}

/// The section: the bounds on both scores, then per skew and arm the score at R_max and the gain
/// recovered on it at R_max and for the fleet.
pub(super) fn section(out: &mut String, report: &Report, task: &'static str) -> Result<()> {
    let metrics = [(Metric::NegatedLoss, -1.0, 3), (Metric::RougeL, 100.0, 1)];
    writeln!(
        out,
        "The same runs scored by the loss per headline token (lower is better; G = (base − loss) / (base − \
         centralized)) and by the ROUGE-L F1 of greedy headlines (16 held-out articles per evaluation, so noisier), \
         mean of the last rounds over the seeds. The bounds:\n"
    )?;
    let mut bounds_of = Vec::new();
    for (metric, scale, digits) in metrics {
        let bounds = report.bounds_with(task, metric)?;
        let (base, centralized) = (bounds.base, bounds.centralized);
        bounds_of.push(bounds);
        let name = if metric == Metric::NegatedLoss { "loss per headline token" } else { "ROUGE-L F1 (%)" };
        writeln!(
            out,
            "- {name}: the base {}, centralized LoRA {}",
            mean_sd(base, scale, digits),
            mean_sd(centralized, scale, digits)
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "| cell | arm | loss, R_max | G on loss, R_max | G on loss, fleet | ROUGE-L (%), R_max | G on ROUGE-L, R_max | G on ROUGE-L, fleet |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|")?;
    let fleet = &report.plan.fleet;
    for &skew in &report.plan.skews {
        for arm in report.plan.arms(skew) {
            let mut cells = Vec::new();
            for (i, (metric, scale, digits)) in metrics.iter().enumerate() {
                let runs = report.finals_with(task, Some(skew), arm, *metric)?;
                let bounds = &bounds_of[i];
                let g = |value: Option<f64>| value.and_then(|v| bounds.gain(v));
                let at_rmax = stat(&runs.iter().filter_map(Run::max_rank_accuracy).collect::<Vec<_>>());
                let g_rmax = stat(&runs.iter().filter_map(|r| g(r.max_rank_accuracy())).collect::<Vec<_>>());
                let g_fleet = stat(&runs.iter().filter_map(|r| g(r.fleet_accuracy(arm, fleet))).collect::<Vec<_>>());
                cells.push(mean_sd(at_rmax, *scale, *digits));
                cells.push(mean_sd(g_rmax, 1.0, 2));
                cells.push(if arm.is_heterogeneous() { mean_sd(g_fleet, 1.0, 2) } else { String::new() });
            }
            if cells.iter().all(|c| c == "—" || c.is_empty()) {
                continue;
            }
            writeln!(out, "| {} | {} | {} |", skew.title(), arm.label(), cells.join(" | "))?;
        }
    }
    writeln!(out)?;
    Ok(())
}
