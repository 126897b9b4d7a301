//! The generated block of docs/study.md: bounds, the rank sweep, one table, figure and per-rank
//! table per skew, and the tuning record.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::results::{choose, load_run, Chosen, Run, LAST_ROUNDS};
use super::{Arm, Plan, Skew};
use crate::results::Stat;

fn stat(values: &[f64]) -> Option<Stat> {
    Stat::of(values.iter().copied())
}

fn percent(s: &Option<Stat>) -> String {
    s.map_or("—".into(), Stat::percent)
}

fn ratio(s: &Option<Stat>) -> String {
    s.as_ref().map_or("—".into(), |s| format!("{:.2} ± {:.2}", s.mean, s.sd))
}

struct Report<'a> {
    plan: &'a Plan,
    dir: &'a Path,
    chosen: Chosen,
    figures_link: &'a str,
    figures_dir: &'a Path,
}

impl Report<'_> {
    /// Final runs of one setting, seed by seed.
    fn finals(&self, task: &'static str, skew: Option<Skew>, arm: Arm) -> Result<Vec<Run>> {
        let mut runs = Vec::new();
        for &seed in &self.plan.seeds {
            let Some(cell) = self.plan.final_cell((task, skew, arm), &self.chosen, seed) else { break };
            if let Some(run) = load_run(self.plan, self.dir, &cell)? {
                runs.push(run);
            }
        }
        Ok(runs)
    }

    fn learning_rate(&self, task: &str, skew: Option<Skew>, arm: Arm) -> String {
        self.chosen.get(&self.plan.setting_key(task, skew, arm)).map_or("—".into(), |(lr, _)| format!("{lr}"))
    }
}

pub fn markdown(plan: &Plan, dir: &Path, figures_link: &str, figures_dir: &Path) -> Result<String> {
    let report = Report { plan, dir, chosen: choose(plan, dir)?, figures_link, figures_dir };
    let mut out = String::new();
    writeln!(out, "{}", plan.begin_marker())?;
    writeln!(
        out,
        "Plan `{}`: fleet {} (R_max {}, scale {} at every rank); {} rounds of {} AdamW steps of batch {}; \
         learning rate chosen from {:?} on the validation split (seed 1); final runs on the test split, seeds {:?}; \
         scores are the mean of the last {LAST_ROUNDS} rounds, on {} held-out samples.\n",
        plan.name,
        plan.fleet.iter().map(|(c, r, n)| format!("{n} × {c} at rank {r}")).collect::<Vec<_>>().join(", "),
        plan.max_rank(),
        plan.scale,
        plan.rounds,
        plan.local_steps,
        plan.batch_size,
        plan.learning_rates,
        plan.seeds,
        plan.eval_samples,
    )?;
    crate::report::register_font()?;
    std::fs::create_dir_all(figures_dir)?;
    for task in &plan.tasks {
        writeln!(out, "### {}\n", task.title)?;
        let bounds = report.bounds_section(&mut out, task.key)?;
        for &skew in &plan.skews {
            report.skew_section(&mut out, task.key, task.title, skew, &bounds)?;
        }
        report.privacy_section(&mut out, task.key, &bounds)?;
        report.tuning_section(&mut out, task.key)?;
    }
    writeln!(out, "{}", plan.end_marker())?;
    Ok(out)
}

/// The base and the centralized reference at R_max: what gain recovered is measured against.
struct Bounds {
    base: Option<Stat>,
    centralized: Option<Stat>,
}

impl Bounds {
    /// G = (accuracy − base) / (centralized − base).
    fn gain(&self, accuracy: f64) -> Option<f64> {
        let (b, c) = (self.base.as_ref()?.mean, self.centralized.as_ref()?.mean);
        (c - b > 1e-9).then(|| (accuracy - b) / (c - b))
    }
}

impl Report<'_> {
    /// The bounds line and, when the plan has one, the centralized rank sweep.
    fn bounds_section(&self, out: &mut String, task: &'static str) -> Result<Bounds> {
        let plan = self.plan;
        let max_rank = plan.max_rank();
        let central = self.finals(task, None, Arm::Centralized(max_rank))?;
        let centralized = stat(&central.iter().filter_map(Run::max_rank_accuracy).collect::<Vec<_>>());
        let mut everything = Vec::new();
        for (t, skew, arm) in plan.settings(task) {
            everything.extend(self.finals(t, skew, arm)?);
        }
        let base = stat(&everything.iter().filter_map(|r| r.base).collect::<Vec<_>>());
        writeln!(
            out,
            "Bounds: the base alone **{}%**; centralized LoRA at rank {max_rank} on the pooled device data, same sample \
             budget, learning rate {}: **{}%** ({} seeds). Gain recovered G = (accuracy − base) / (centralized − base).\n",
            percent(&base),
            self.learning_rate(task, None, Arm::Centralized(max_rank)),
            percent(&centralized),
            centralized.as_ref().map_or(0, |s| s.n),
        )?;
        if plan.centralized_ranks().len() > 1 {
            writeln!(out, "Centralized rank sweep (what a rank buys with all the data; test accuracy %):\n")?;
            writeln!(out, "| rank | lr | accuracy (%) | seeds |\n|---|---|---|---|")?;
            for rank in plan.centralized_ranks() {
                let runs = self.finals(task, None, Arm::Centralized(rank))?;
                let accuracy = stat(&runs.iter().filter_map(Run::max_rank_accuracy).collect::<Vec<_>>());
                let lr = self.learning_rate(task, None, Arm::Centralized(rank));
                writeln!(out, "| {rank} | {lr} | {} | {} |", percent(&accuracy), runs.len())?;
            }
            writeln!(out)?;
        }
        Ok(Bounds { base, centralized })
    }

    /// One skew: the arms' table, the R_max curves, the per-rank slices.
    fn skew_section(
        &self,
        out: &mut String,
        task: &'static str,
        title: &str,
        skew: Skew,
        bounds: &Bounds,
    ) -> Result<()> {
        let plan = self.plan;
        writeln!(out, "#### {}\n", skew.title())?;
        writeln!(
            out,
            "| arm | lr | R_max accuracy (%) | fleet mean (%) | G, R_max | G, fleet | worst slice − base (points) | \
             MB up / round | MB down / round | wall (s) | seeds |\n|---|---|---|---|---|---|---|---|---|---|---|"
        )?;
        let mut curves = Vec::new();
        for arm in plan.arms(skew) {
            let runs = self.finals(task, Some(skew), arm)?;
            writeln!(out, "{}", self.arm_row(task, skew, arm, &runs, bounds))?;
            if arm.is_heterogeneous() && !runs.is_empty() {
                let length = runs.iter().map(|r| r.accuracy_curve().len()).min().unwrap_or(0);
                let curve = (0..length)
                    .map(|i| runs.iter().map(|r| r.accuracy_curve()[i]).sum::<f64>() / runs.len() as f64)
                    .collect();
                curves.push((arm.label(), curve));
            }
        }
        if !curves.is_empty() {
            let name = format!("{}-{task}-{}.svg", plan.suite, skew.key());
            let caption = format!("{title}: R_max test accuracy, {}, mean over seeds", skew.title());
            crate::report::draw(&self.figures_dir.join(&name), &caption, &curves)?;
            writeln!(out, "\n![{title}, {}]({}/{name})", skew.title(), self.figures_link)?;
        }
        writeln!(out, "\nPer-rank slices (test accuracy %, mean over seeds of the last {LAST_ROUNDS} rounds):\n")?;
        let ranks: Vec<u32> = plan.fleet.iter().map(|&(_, rank, _)| rank).collect();
        writeln!(out, "| method |{}", ranks.iter().map(|r| format!(" rank {r} |")).collect::<String>())?;
        writeln!(out, "|---|{}", "---|".repeat(ranks.len()))?;
        for arm in plan.arms(skew).into_iter().filter(|a| a.is_heterogeneous()) {
            let runs = self.finals(task, Some(skew), arm)?;
            let cells: String = ranks
                .iter()
                .map(|&rank| {
                    let values: Vec<f64> = runs.iter().filter_map(|r| r.rank_accuracy(rank)).collect();
                    format!(" {} |", percent(&stat(&values)))
                })
                .collect();
            writeln!(out, "| {} |{cells}", arm.label())?;
        }
        writeln!(out)?;
        Ok(())
    }

    /// One arm's row of a skew's table.
    fn arm_row(&self, task: &str, skew: Skew, arm: Arm, runs: &[Run], bounds: &Bounds) -> String {
        let fleet = &self.plan.fleet;
        let rmax: Vec<f64> = runs.iter().filter_map(Run::max_rank_accuracy).collect();
        let fleet_mean: Vec<f64> = runs.iter().filter_map(|r| r.fleet_accuracy(arm, fleet)).collect();
        let worst: Vec<f64> =
            runs.iter().filter_map(|r| Some(100.0 * (r.worst_slice(arm, fleet)? - r.base?))).collect();
        let mean_of = |f: fn(&Run) -> f64| runs.iter().map(f).sum::<f64>() / runs.len().max(1) as f64;
        let or_dash = |text: String| if runs.is_empty() { "—".to_string() } else { text };
        let g_rmax = stat(&rmax.iter().filter_map(|&a| bounds.gain(a)).collect::<Vec<_>>());
        let g_fleet = stat(&fleet_mean.iter().filter_map(|&a| bounds.gain(a)).collect::<Vec<_>>());
        let heterogeneous = arm.is_heterogeneous();
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            arm.label(),
            self.learning_rate(task, Some(skew), arm),
            percent(&stat(&rmax)),
            if heterogeneous { percent(&stat(&fleet_mean)) } else { "(= R_max)".into() },
            ratio(&g_rmax),
            if heterogeneous { ratio(&g_fleet) } else { String::new() },
            stat(&worst).map_or("—".into(), |s| format!("{:+.1} ± {:.1}", s.mean, s.sd)),
            or_dash(format!("{:.2}", mean_of(|r| r.upload_bytes_per_round) / 1e6)),
            or_dash(format!("{:.2}", mean_of(|r| r.download_bytes_per_round) / 1e6)),
            or_dash(format!("{:.0}", mean_of(|r| r.wall_seconds))),
            runs.len()
        )
    }

    /// The privacy axis: each private arm against its method without privacy, under the first skew.
    fn privacy_section(&self, out: &mut String, task: &'static str, bounds: &Bounds) -> Result<()> {
        let plan = self.plan;
        let Some(&skew) = plan.skews.first() else { return Ok(()) };
        if plan.private_methods.is_empty() || plan.epsilons.is_empty() {
            return Ok(());
        }
        let delta = super::privacy_delta(plan);
        writeln!(
            out,
            "#### Differential privacy ({}, central noise, δ = {delta:.2e}, every device every round)\n",
            skew.title()
        )?;
        writeln!(
            out,
            "| method | ε | noise multiplier | clipping bound (validation: score per bound) | R_max accuracy (%) | fleet mean (%) | G, R_max | G, fleet | seeds |\n|---|---|---|---|---|---|---|---|---|"
        )?;
        for &method in &plan.private_methods {
            let plain = self.finals(task, Some(skew), Arm::Method(method))?;
            let row = |label: String, runs: &[Run], noise: String, clip: String| {
                let rmax: Vec<f64> = runs.iter().filter_map(Run::max_rank_accuracy).collect();
                let fleet: Vec<f64> =
                    runs.iter().filter_map(|r| r.fleet_accuracy(Arm::Method(method), &plan.fleet)).collect();
                let g = |v: &[f64]| ratio(&stat(&v.iter().filter_map(|&a| bounds.gain(a)).collect::<Vec<_>>()));
                format!(
                    "| {method} | {label} | {noise} | {clip} | {} | {} | {} | {} | {} |",
                    percent(&stat(&rmax)),
                    percent(&stat(&fleet)),
                    g(&rmax),
                    g(&fleet),
                    runs.len()
                )
            };
            writeln!(out, "{}", row("∞ (none)".into(), &plain, "—".into(), "—".into()))?;
            for &epsilon in &plan.epsilons {
                let arm = Arm::Private { method, epsilon };
                let runs = self.finals(task, Some(skew), arm)?;
                let noise = format!("{:.2}", super::noise_for(f64::from(epsilon), plan.rounds, delta));
                let clip = match self.chosen.get(&plan.setting_key(task, Some(skew), arm)) {
                    Some((best, scores)) => {
                        let tried =
                            scores.iter().map(|(c, s)| format!("{c}: {:.1}", 100.0 * s)).collect::<Vec<_>>().join(", ");
                        format!("{best} ({tried})")
                    }
                    None => "—".into(),
                };
                writeln!(out, "{}", row(epsilon.to_string(), &runs, noise, clip))?;
            }
        }
        writeln!(out)?;
        Ok(())
    }

    /// The validation score of every learning rate tried, and the one kept.
    fn tuning_section(&self, out: &mut String, task: &'static str) -> Result<()> {
        let plan = self.plan;
        writeln!(out, "Tuning (validation score per learning rate, seed 1):\n")?;
        let rates = plan.learning_rates.iter().map(|l| format!("lr {l}")).collect::<Vec<_>>().join(" | ");
        writeln!(out, "| setting | {rates} | chosen |")?;
        writeln!(out, "|---|{}---|", "---|".repeat(plan.learning_rates.len()))?;
        for (t, skew, arm) in plan.settings(task).into_iter().filter(|s| !matches!(s.2, Arm::Private { .. })) {
            let Some((best, scores)) = self.chosen.get(&plan.setting_key(t, skew, arm)) else { continue };
            let setting = match skew {
                None => arm.label(),
                Some(skew) => format!("{}, {}", skew.title(), arm.label()),
            };
            let cells = scores.iter().map(|(_, s)| format!("{:.1}", 100.0 * s)).collect::<Vec<_>>().join(" | ");
            writeln!(out, "| {setting} | {cells} | {best} |")?;
        }
        writeln!(out)?;
        Ok(())
    }
}
