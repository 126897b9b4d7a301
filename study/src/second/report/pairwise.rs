//! The top methods, pairwise: in each cell and over all cells, the mean difference of gain
//! recovered between the leading method and each of the next two, over the seeds both ran, with
//! its 95% confidence interval (Student's t over the seed pairs), so the document says plainly
//! where a ranking is within noise.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Result;

use super::{Bounds, Report, Standing};
use crate::second::results::load_run;
use crate::second::{Arm, Skew};

/// Two-sided 95% quantiles of Student's t for 1 to 10 degrees of freedom.
const T95: [f64; 10] = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228];

fn t95(degrees: usize) -> f64 {
    // Past 10, 1.96 + 2.4/df is within 0.01 of the table's values.
    T95.get(degrees.wrapping_sub(1)).copied().unwrap_or(1.96 + 2.4 / degrees as f64)
}

/// The mean of paired differences and the half-width of its 95% interval (`None` below 2 pairs).
pub fn paired_interval(differences: &[f64]) -> Option<(f64, f64)> {
    let n = differences.len();
    if n < 2 {
        return None;
    }
    let mean = differences.iter().sum::<f64>() / n as f64;
    let variance = differences.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some((mean, t95(n - 1) * (variance / n as f64).sqrt()))
}

fn describe((mean, half): (f64, f64)) -> String {
    let verdict = if mean.abs() <= half {
        "within noise"
    } else if mean > 0.0 {
        "ahead"
    } else {
        "behind"
    };
    format!("{mean:+.3} ± {half:.3} ({verdict})")
}

impl Report<'_> {
    /// A method's gain recovered in one cell, seed by seed (the rule's (G at R_max + G fleet) / 2).
    fn seed_gains(
        &self,
        task: &'static str,
        skew: Skew,
        method: &'static str,
        bounds: &Bounds,
    ) -> Result<BTreeMap<u64, f64>> {
        let arm = Arm::Method(method);
        let mut gains = BTreeMap::new();
        for &seed in &self.plan.seeds {
            let Some(cell) = self.plan.final_cell((task, Some(skew), arm), &self.chosen, seed) else { break };
            let Some(run) = load_run(self.plan, self.dir, &cell)? else { continue };
            let at_max = run.max_rank_accuracy().and_then(|a| bounds.gain(a));
            let fleet = run.fleet_accuracy(arm, &self.plan.fleet).and_then(|a| bounds.gain(a));
            if let (Some(a), Some(b)) = (at_max, fleet) {
                gains.insert(seed, (a + b) / 2.0);
            }
        }
        Ok(gains)
    }
}

/// The leading method against each of the next two (by mean gain, among the methods measured in
/// every cell): one row per pair, one column per cell and one over all cells.
pub(super) fn section(out: &mut String, report: &Report, standings: &[Standing]) -> Result<()> {
    let mut ranked: Vec<&Standing> =
        standings.iter().filter(|s| s.cells > 0 && s.gains.len() == s.cells && s.mean_gain().is_some()).collect();
    ranked.sort_by(|a, b| b.mean_gain().unwrap_or(0.0).total_cmp(&a.mean_gain().unwrap_or(0.0)));
    if ranked.len() < 2 {
        return Ok(());
    }
    let plan = report.plan;
    let mut cells = Vec::new();
    for task in &plan.tasks {
        let bounds = report.bounds(task.key)?;
        for &skew in &plan.skews {
            cells.push((task.key, skew, bounds.clone()));
        }
    }
    writeln!(out, "#### The top methods, pairwise\n")?;
    writeln!(
        out,
        "Gain recovered of the leader minus the other's, paired by seed: mean ± the half-width of its 95% interval \
         (Student's t); \"within noise\" where the interval holds 0.\n"
    )?;
    let titles: Vec<String> = cells.iter().map(|(task, skew, _)| format!("{task}, {}", skew.title())).collect();
    writeln!(out, "| comparison | {} | all cells |", titles.join(" | "))?;
    writeln!(out, "|---|{}---|", "---|".repeat(titles.len()))?;
    let leader = ranked[0].method;
    for other in ranked.iter().skip(1).take(2).map(|s| s.method) {
        let (mut row, mut all) = (Vec::new(), Vec::new());
        for (task, skew, bounds) in &cells {
            let (mine, theirs) =
                (report.seed_gains(task, *skew, leader, bounds)?, report.seed_gains(task, *skew, other, bounds)?);
            let differences: Vec<f64> = mine.iter().filter_map(|(seed, g)| Some(g - theirs.get(seed)?)).collect();
            row.push(paired_interval(&differences).map_or("—".into(), describe));
            all.extend(differences);
        }
        let overall = paired_interval(&all).map_or("—".into(), describe);
        writeln!(out, "| {leader} − {other} | {} | {overall} |", row.join(" | "))?;
    }
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paired_interval_uses_the_t_quantile_and_says_when_it_holds_zero() {
        assert_eq!(paired_interval(&[0.1]), None, "one pair says nothing about noise");
        let (mean, half) = paired_interval(&[0.01, 0.03, 0.02]).unwrap();
        assert!((mean - 0.02).abs() < 1e-12);
        // sd 0.01, n 3: 4.303 · 0.01 / √3.
        assert!((half - 4.303 * 0.01 / 3f64.sqrt()).abs() < 1e-12, "{half}");
        assert_eq!(describe((mean, half)), "+0.020 ± 0.025 (within noise)");
        assert_eq!(describe((0.05, 0.01)), "+0.050 ± 0.010 (ahead)");
        assert_eq!(describe((-0.05, 0.01)), "-0.050 ± 0.010 (behind)");
        assert!((t95(30) - 2.04).abs() < 0.01);
    }
}
