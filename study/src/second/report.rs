//! The generated block of docs/study.md: bounds, the rank sweep, one table, figure and per-rank
//! table per skew, and the tuning record.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use super::results::{choose, load_run_with, Choice, Chosen, Metric, Run, LAST_ROUNDS};
use super::{Arm, Plan, Skew};
use crate::results::Stat;

mod decoder_metrics;
mod pairwise;

/// Marks a choice that still lies on an edge of what its tuning tried.
const EDGE_MARK: &str = "†";

fn stat(values: &[f64]) -> Option<Stat> {
    Stat::of(values.iter().copied())
}

fn percent(s: &Option<Stat>) -> String {
    s.map_or("—".into(), Stat::percent)
}

/// "1 seed", "3 seeds": how many runs a bound's mean is over.
fn seeds(s: Option<&Stat>) -> String {
    match s.map_or(0, |s| s.n) {
        1 => "1 seed".into(),
        n => format!("{n} seeds"),
    }
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
        self.finals_with(task, skew, arm, Metric::Accuracy)
    }

    /// Final runs of one setting, seed by seed, read for `metric`.
    fn finals_with(&self, task: &'static str, skew: Option<Skew>, arm: Arm, metric: Metric) -> Result<Vec<Run>> {
        let mut runs = Vec::new();
        for &seed in &self.plan.seeds {
            let Some(cell) = self.plan.final_cell((task, skew, arm), &self.chosen, seed) else { break };
            if let Some(run) = load_run_with(self.plan, self.dir, &cell, metric)? {
                runs.push(run);
            }
        }
        Ok(runs)
    }

    /// A setting's chosen learning rate (and local steps, where tuned).
    fn tuned(&self, task: &str, skew: Option<Skew>, arm: Arm) -> String {
        match self.chosen.get(&self.plan.setting_key(task, skew, arm)) {
            Some(tuned) if tuned.edges.is_empty() => self.plan.describe(&tuned.choice),
            Some(tuned) => format!("{} {EDGE_MARK}", self.plan.describe(&tuned.choice)),
            None => "—".into(),
        }
    }

    /// The column header of [`Report::tuned`].
    fn tuned_header(&self) -> &'static str {
        if self.plan.tunes_local_steps() {
            "lr, local steps"
        } else {
            "lr"
        }
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
        match plan.local_steps.as_slice() {
            [steps] => steps.to_string(),
            grid => format!("{grid:?} (tuned with the learning rate)"),
        },
        plan.batch_size,
        plan.learning_rates,
        plan.seeds,
        plan.eval_samples,
    )?;
    writeln!(out, "{}\n", edge_search_note(plan))?;
    crate::report::register_font()?;
    std::fs::create_dir_all(figures_dir)?;
    for task in &plan.tasks {
        writeln!(out, "### {}\n", task.title)?;
        if let super::TaskKind::Headlines { .. } = task.kind {
            writeln!(
                out,
                "For this decoder task \"accuracy\" is the share of held-out headline tokens the model \
                 predicts exactly (teacher-forced); each run's `evaluation.json` also keeps the loss per \
                 headline token and the ROUGE-L F1 of greedy headlines.\n"
            )?;
        }
        let bounds = report.bounds_section(&mut out, task.key)?;
        for &skew in &plan.skews {
            report.skew_section(&mut out, task.key, task.title, skew, &bounds)?;
        }
        if let super::TaskKind::Headlines { .. } = task.kind {
            writeln!(out, "#### The loss and ROUGE-L\n")?;
            decoder_metrics::section(&mut out, &report, task.key)?;
        }
        report.privacy_section(&mut out, task.key, &bounds)?;
        report.tuning_section(&mut out, task.key)?;
    }
    let standings = standings(plan, dir)?;
    rule_section(&mut out, &standings)?;
    pairwise::section(&mut out, &report, &standings)?;
    writeln!(out, "{}", plan.end_marker())?;
    Ok(out)
}

/// How the plan searches past its grid's edges, and what the mark on a choice means.
fn edge_search_note(plan: &Plan) -> String {
    let search = plan.edge_search;
    let mut note = format!(
        "Where a setting's best candidate has the highest (lowest) learning rate tried, tuning also tries twice (half) \
         that rate, up to {} value(s) past either end of the grid",
        search.learning_rate
    );
    if plan.tunes_local_steps() {
        note += &match search.local_steps {
            0 => "; the local steps are not searched past the grid".to_string(),
            n => format!("; the same for local steps, doubled or halved, up to {n} value(s) past either end"),
        };
    }
    note + &format!(". {EDGE_MARK}: the choice still lies on an edge of what was tried.")
}

/// One method's standing under issue 15's rule for the default method, over a suite's cells (a cell:
/// a task under a skew): its gain recovered in each cell whose final runs are all in ((G at R_max +
/// G of the fleet mean) / 2, means over seeds), and its lowest worst slice − floor there (points,
/// mean over seeds; the floor is the larger of the base's accuracy and the evaluated set's
/// majority-class rate, so a model collapsed onto one class never passes).
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    pub method: &'static str,
    pub gains: Vec<f64>,
    pub worst_slice_minus_floor: Option<f64>,
    /// The cells the suite has for it (a method short of some is not compared).
    pub cells: usize,
}

impl Standing {
    pub fn mean_gain(&self) -> Option<f64> {
        stat(&self.gains).map(|s| s.mean)
    }
}

/// Every method's standing in the suite of `plan`, from the results in `dir`.
pub fn standings(plan: &Plan, dir: &Path) -> Result<Vec<Standing>> {
    let report = Report { plan, dir, chosen: choose(plan, dir)?, figures_link: "", figures_dir: dir };
    let mut out: Vec<Standing> = plan
        .methods
        .iter()
        .map(|&method| Standing { method, gains: Vec::new(), worst_slice_minus_floor: None, cells: 0 })
        .collect();
    for task in &plan.tasks {
        let bounds = report.bounds(task.key)?;
        for &skew in &plan.skews {
            for standing in &mut out {
                standing.cells += 1;
                let arm = Arm::Method(standing.method);
                let runs = report.finals(task.key, Some(skew), arm)?;
                // A cell counts once every seed of it is in: fewer would compare unlike means.
                if runs.len() < plan.seeds.len() {
                    continue;
                }
                let mean = |values: Vec<f64>| stat(&values).map(|s| s.mean);
                let g_rmax = mean(runs.iter().filter_map(|r| bounds.gain(r.max_rank_accuracy()?)).collect());
                let g_fleet =
                    mean(runs.iter().filter_map(|r| bounds.gain(r.fleet_accuracy(arm, &plan.fleet)?)).collect());
                if let (Some(a), Some(b)) = (g_rmax, g_fleet) {
                    standing.gains.push((a + b) / 2.0);
                }
                let worst = mean(
                    runs.iter().filter_map(|r| Some(100.0 * (r.worst_slice(arm, &plan.fleet)? - r.floor()?))).collect(),
                );
                if let Some(worst) = worst {
                    let lowest = standing.worst_slice_minus_floor.map_or(worst, |w| w.min(worst));
                    standing.worst_slice_minus_floor = Some(lowest);
                }
            }
        }
    }
    Ok(out)
}

/// Each method's standing as a Markdown table.
pub fn rule_table(standings: &[Standing]) -> String {
    let mut out = String::from(
        "| method | cells measured | mean gain recovered | lowest worst slice − floor (points) |\n|---|---|---|---|\n",
    );
    for s in standings {
        out += &format!(
            "| {} | {} of {} | {} | {} |\n",
            s.method,
            s.gains.len(),
            s.cells,
            s.mean_gain().map_or("—".into(), |g| format!("{g:.3}")),
            s.worst_slice_minus_floor.map_or("—".into(), |w| format!("{w:+.1}"))
        );
    }
    out
}

/// The rule: among the methods measured in every cell whose slices never end below the base (on
/// the mean over seeds), the one with the best mean gain recovered. `None` when none qualifies.
pub fn choose_default(standings: &[Standing]) -> Option<&'static str> {
    standings
        .iter()
        .filter(|s| s.gains.len() == s.cells && s.cells > 0)
        .filter(|s| s.worst_slice_minus_floor.is_some_and(|w| w >= 0.0))
        .filter_map(|s| Some((s.method, s.mean_gain()?)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(method, _)| method)
}

/// The rule's pick over the suites asked for, or why there is none: a suite without results, or
/// a cell some method has not measured yet, leaves the comparison incomplete, so nothing is picked
/// (a method short of a cell would otherwise lose to one measured on fewer, easier cells).
pub fn pick(standings: &[Standing], missing_suites: &[&str]) -> Result<&'static str, String> {
    if !missing_suites.is_empty() {
        return Err(format!("no results for {}", missing_suites.join(", ")));
    }
    if let Some(short) = standings.iter().find(|s| s.gains.len() < s.cells || s.cells == 0) {
        return Err(format!("{} has {} of {} cells measured", short.method, short.gains.len(), short.cells));
    }
    choose_default(standings).ok_or_else(|| {
        "every method has a slice below the floor (the base or the majority class) in some cell".to_string()
    })
}

/// The heading of a suite's side of the rule in its generated block (`doc_rule` reads it back).
pub const RULE_HEADING: &str = "#### The default-method rule, over this suite's cells";

/// This suite's side of the default-method rule (`flotilla-study --choose-default` combines the
/// suites).
fn rule_section(out: &mut String, standings: &[Standing]) -> Result<()> {
    writeln!(out, "{RULE_HEADING}\n")?;
    write!(out, "{}", rule_table(standings))?;
    writeln!(
        out,
        "\nBy this suite alone the rule picks **{}**.\n",
        choose_default(standings).unwrap_or("none yet (a method is compared once it has every cell)")
    )?;
    Ok(())
}

/// The base and the centralized reference at R_max: what gain recovered is measured against.
#[derive(Clone)]
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
    fn bounds(&self, task: &'static str) -> Result<Bounds> {
        self.bounds_with(task, Metric::Accuracy)
    }

    /// The base's and the centralized bound's score for `metric`.
    fn bounds_with(&self, task: &'static str, metric: Metric) -> Result<Bounds> {
        let central = self.finals_with(task, None, Arm::Centralized(self.plan.max_rank()), metric)?;
        let centralized = stat(&central.iter().filter_map(Run::max_rank_accuracy).collect::<Vec<_>>());
        let mut everything = Vec::new();
        for (t, skew, arm) in self.plan.settings(task) {
            everything.extend(self.finals_with(t, skew, arm, metric)?);
        }
        let base = stat(&everything.iter().filter_map(|r| r.base).collect::<Vec<_>>());
        Ok(Bounds { base, centralized })
    }

    fn bounds_section(&self, out: &mut String, task: &'static str) -> Result<Bounds> {
        let plan = self.plan;
        let max_rank = plan.max_rank();
        let Bounds { base, centralized } = self.bounds(task)?;
        writeln!(
            out,
            "Bounds: the base alone **{}%**; centralized LoRA at rank {max_rank} on the pooled device data, same sample \
             budget, learning rate {}: **{}%** ({}). Gain recovered G = (accuracy − base) / (centralized − base).\n",
            percent(&base),
            self.tuned(task, None, Arm::Centralized(max_rank)),
            percent(&centralized),
            seeds(centralized.as_ref()),
        )?;
        if !plan.full_learning_rates.is_empty() {
            let runs = self.finals(task, None, Arm::FullFineTune)?;
            let accuracy = stat(&runs.iter().filter_map(Run::max_rank_accuracy).collect::<Vec<_>>());
            let tried = match self.chosen.get(&plan.setting_key(task, None, Arm::FullFineTune)) {
                Some(tuned) => tuned
                    .scores
                    .iter()
                    .map(|(c, s)| format!("{}: {:.1}%", plan.describe(c), 100.0 * s))
                    .collect::<Vec<_>>()
                    .join(", "),
                None => "not run yet".into(),
            };
            writeln!(
                out,
                "Centralized full fine-tuning (every weight of the model, the same data and steps; `flotilla-coordinator \
                 finetune-full`), learning rate {}: **{}%** ({}; validation {tried}). G stays relative to \
                 centralized LoRA.\n",
                self.tuned(task, None, Arm::FullFineTune),
                percent(&accuracy),
                seeds(accuracy.as_ref()),
            )?;
        }
        if plan.centralized_ranks().len() > 1 {
            writeln!(out, "Centralized rank sweep (what a rank buys with all the data; test accuracy %):\n")?;
            writeln!(out, "| rank | {} | accuracy (%) | seeds |\n|---|---|---|---|", self.tuned_header())?;
            for rank in plan.centralized_ranks() {
                let runs = self.finals(task, None, Arm::Centralized(rank))?;
                let accuracy = stat(&runs.iter().filter_map(Run::max_rank_accuracy).collect::<Vec<_>>());
                let lr = self.tuned(task, None, Arm::Centralized(rank));
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
            "| arm | {} | R_max accuracy (%) | fleet mean (%) | G, R_max | G, fleet | worst slice − base (points) | \
             MB up / round | MB down / round | wall (s) | seeds |\n|---|---|---|---|---|---|---|---|---|---|---|",
            self.tuned_header()
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
            self.tuned(task, Some(skew), arm),
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
                    Some(tuned) => {
                        let clip = |c: &Choice| c.clip_norm.map_or("—".into(), |c| c.to_string());
                        let tried = tuned
                            .scores
                            .iter()
                            .map(|(c, s)| format!("{}: {:.1}", clip(c), 100.0 * s))
                            .collect::<Vec<_>>();
                        format!("{} ({})", clip(&tuned.choice), tried.join(", "))
                    }
                    None => "—".into(),
                };
                writeln!(out, "{}", row(epsilon.to_string(), &runs, noise, clip))?;
            }
        }
        writeln!(out)?;
        Ok(())
    }

    /// The validation score of every candidate tried, and the one kept.
    fn tuning_section(&self, out: &mut String, task: &'static str) -> Result<()> {
        let plan = self.plan;
        let tuned = if plan.tunes_local_steps() { "learning rate and local steps" } else { "learning rate" };
        writeln!(
            out,
            "Tuning (validation score per {tuned}, seed 1; ² marks the mean of seeds 1 and 2, run where candidates \
             were within a point of the best):\n"
        )?;
        let label = |c: &Choice| match plan.tunes_local_steps() {
            false => format!("lr {}", c.learning_rate),
            true => format!("lr {}, {} steps", c.learning_rate, c.local_steps),
        };
        let grid = plan.rates_by_steps(&plan.learning_rates);
        let columns: Vec<String> = grid.iter().map(label).collect();
        writeln!(out, "| setting | {} | past the grid's edges | chosen |", columns.join(" | "))?;
        writeln!(out, "|---|{}---|---|", "---|".repeat(columns.len()))?;
        // Private arms and full fine-tuning have their own grids, reported where they are.
        let own_grid = |arm: Arm| matches!(arm, Arm::Private { .. } | Arm::FullFineTune);
        for (t, skew, arm) in plan.settings(task).into_iter().filter(|s| !own_grid(s.2)) {
            let Some(tuning) = self.chosen.get(&plan.setting_key(t, skew, arm)) else { continue };
            let setting = match skew {
                None => arm.label(),
                Some(skew) => format!("{}, {}", skew.title(), arm.label()),
            };
            let score_of = |choice: &Choice| tuning.scores.iter().find(|(c, _)| c == choice).map(|&(_, s)| s);
            let mark = |choice: &Choice| if tuning.doubled.contains(choice) { "²" } else { "" };
            let cells = grid
                .iter()
                .map(|c| score_of(c).map_or("—".into(), |s| format!("{:.1}{}", 100.0 * s, mark(c))))
                .collect::<Vec<_>>()
                .join(" | ");
            let past = tuning
                .scores
                .iter()
                .filter(|(c, _)| !grid.contains(c))
                .map(|(c, s)| format!("{}: {:.1}{}", label(c), 100.0 * s, mark(c)))
                .collect::<Vec<_>>()
                .join("; ");
            let edges = tuning.edges.iter().map(|e| e.describe()).collect::<Vec<_>>().join(", ");
            let chosen = match edges.is_empty() {
                true => self.tuned(t, skew, arm),
                false => format!("{} ({edges})", self.tuned(t, skew, arm)),
            };
            writeln!(out, "| {setting} | {cells} | {past} | {chosen} |")?;
        }
        writeln!(out)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::second::results::{Edge, Tuned};

    fn standing(method: &'static str, gains: &[f64], cells: usize, worst: f64) -> Standing {
        Standing { method, gains: gains.to_vec(), worst_slice_minus_floor: Some(worst), cells }
    }

    #[test]
    fn the_tuning_record_lists_the_grid_then_the_values_past_its_edges_and_marks_an_edge_choice() {
        let plan = Plan::text();
        let choice = |learning_rate| Choice { learning_rate, local_steps: 10, clip_norm: None };
        let mut chosen = Chosen::new();
        let skew = Some(Skew::labels(1.0));
        let scores = vec![(choice(0.002), 0.8), (choice(0.005), 0.85), (choice(0.01), 0.9), (choice(0.02), 0.95)];
        let tuned =
            Tuned { choice: choice(0.02), scores, edges: vec![Edge::HighestLearningRate], doubled: vec![choice(0.01)] };
        chosen.insert(plan.setting_key("bbc", skew, Arm::Method("flora")), tuned);
        let inside = Tuned {
            choice: choice(0.002),
            scores: vec![(choice(0.002), 0.9), (choice(0.005), 0.2), (choice(0.001), 0.8)],
            edges: Vec::new(),
            doubled: Vec::new(),
        };
        chosen.insert(plan.setting_key("bbc", None, Arm::Centralized(16)), inside);
        let report = Report { plan: &plan, dir: Path::new("."), chosen, figures_link: "", figures_dir: Path::new(".") };
        let mut out = String::new();
        report.tuning_section(&mut out, "bbc").unwrap();
        assert!(out.contains("| setting | lr 0.002 | lr 0.005 | past the grid's edges | chosen |"), "{out}");
        assert!(out.contains("| centralized LoRA at rank 16 | 90.0 | 20.0 | lr 0.001: 80.0 | 0.002 |"), "{out}");
        assert!(
            out.contains(
                "| Dirichlet α = 1, flora | 80.0 | 85.0 | lr 0.01: 90.0²; lr 0.02: 95.0 | 0.02 † (the highest learning rate tried) |"
            ),
            "{out}"
        );
        assert_eq!(report.tuned("bbc", skew, Arm::Method("flora")), "0.02 †");
        assert_eq!(report.tuned("bbc", skew, Arm::Method("rbla")), "—");
    }

    #[test]
    fn the_rule_takes_the_best_mean_gain_among_complete_methods_with_no_slice_below_the_base() {
        let all = [
            standing("best-but-below-base", &[0.95, 0.9], 2, -0.5),
            standing("incomplete", &[0.99], 2, 3.0),
            standing("good", &[0.9, 0.7], 2, 1.0),
            standing("fair", &[0.8, 0.7], 2, 0.0),
        ];
        assert_eq!(choose_default(&all), Some("good"));
        // Over the suites, nothing is picked while a suite or a cell is missing.
        assert_eq!(pick(&all, &[]), Err("incomplete has 1 of 2 cells measured".into()));
        let complete = [all[0].clone(), all[2].clone(), all[3].clone()];
        assert_eq!(pick(&complete, &[]), Ok("good"));
        assert_eq!(pick(&complete, &["text-reviews"]), Err("no results for text-reviews".into()));
        assert!(pick(&[standing("low", &[0.9], 1, -1.0)], &[]).is_err());
        assert_eq!(choose_default(&all[..2]), None);
        assert_eq!(standing("x", &[0.5, 1.0], 2, 0.0).mean_gain(), Some(0.75));
    }
}
