//! The study's second edition (issue 15): every rank-heterogeneous method against its bounds, with
//! learning rates tuned on a validation split, through the real coordinator and simulator. Two
//! suites share this engine:
//!
//! - `--suite text`: all-MiniLM-L6-v2 with LoRA on `query` and `value`, fine-tuned on BBC News by
//!   12 devices, 3 at each of the ranks 2, 4, 8 and 16; `--suite text-reviews`: the same on Rotten
//!   Tomatoes.
//! - `--suite headlines`: SmolLM2-135M-Instruct (a decoder, from its GGUF) learning to write BBC
//!   headlines, on a smaller fleet and grid that fit about 8 hours (issue 32).
//! - `--suite image-shift`: the MLP pretrained on 5,000 upright public Fashion-MNIST images,
//!   fine-tuned by 18 devices (3 at each rank from 2 to 64) whose images are all rotated by 90°:
//!   a domain shift large enough that the rank of the correction matters (the centralized rank
//!   sweep shows it before the grid runs).
//!
//! Two phases, both cached cell by cell:
//!
//! - **tune**: seed 1, every learning rate and local steps of the grid, evaluated on a validation
//!   split the devices never train on, and past the grid's edges where the best lies on one
//!   ([`tuning`]). Each setting (a method under a skew, a homogeneous fleet, a centralized run)
//!   keeps the candidate with the best validation score: the mean over the last 3 rounds of
//!   (R_max accuracy + fleet mean) / 2 for a heterogeneous method, of the R_max accuracy otherwise.
//! - **final**: every seed at the chosen values, evaluated on the test split. The report
//!   uses only these.
//!
//! The bounds use the same training data and sample budget: the base alone (the coordinator's
//! evaluation before round 1), centralized LoRA (one device holding every device's data and taking
//! the whole fleet's steps) at R_max and, for the rank sweep, at other ranks, and FedAvg with every
//! device at one rank.

mod cells;
mod data;
mod doc_rule;
mod plans;
mod privacy;
mod report;
mod results;
mod tuning;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cell::Setup;
pub use privacy::{noise_for, privacy_delta};
use results::{choose, Run};
pub use results::{Choice, Chosen};
pub use tuning::EdgeSearch;

/// What a task's data is and how its model is made.
#[derive(Debug, Clone)]
pub enum TaskKind {
    /// Labelled texts from the per-user cache (deploy/fetch-text-assets.sh), fine-tuned from
    /// all-MiniLM-L6-v2.
    Text { source: &'static str, labels: &'static [&'static str], max_length: u32 },
    /// Fashion-MNIST whose device and held-out images are rotated by 90° while the base is
    /// pretrained on upright public images.
    RotatedImages,
    /// Articles whose first line is the headline, for SmolLM2-135M-Instruct (from its GGUF) to
    /// learn to write: the score is the share of held-out headline tokens predicted exactly;
    /// the runs also keep the loss per headline token and ROUGE-L.
    Headlines { source: &'static str, labels: &'static [&'static str], max_length: u32 },
}

#[derive(Debug, Clone)]
pub struct Task {
    pub key: &'static str,
    pub title: &'static str,
    pub kind: TaskKind,
}

pub const BBC_NEWS: Task = Task {
    key: "bbc",
    title: "BBC News (5 topics)",
    kind: TaskKind::Text {
        source: "datasets/bbc-news",
        labels: &["business", "entertainment", "politics", "sports", "tech"],
        max_length: 32,
    },
};

pub const ROTTEN_TOMATOES: Task = Task {
    key: "rt",
    title: "Rotten Tomatoes (fresh, rotten, plot)",
    kind: TaskKind::Text {
        source: "datasets/rotten-tomatoes.csv",
        labels: &["fresh", "rotten", "plot"],
        max_length: 32,
    },
};

pub const BBC_HEADLINES: Task = Task {
    key: "bbc-headlines",
    title: "BBC News headline writing (SmolLM2-135M-Instruct)",
    kind: TaskKind::Headlines {
        source: "datasets/bbc-news",
        labels: &["business", "entertainment", "politics", "sports", "tech"],
        max_length: 96,
    },
};

pub const ROTATED_FASHION: Task = Task {
    key: "fashion-rot90",
    title: "Fashion-MNIST rotated by 90° (base pretrained upright)",
    kind: TaskKind::RotatedImages,
};

/// Percent of the training texts held out as the validation split.
pub const VALIDATION_PERCENT: u64 = 15;

/// The test images the base is pretrained on (upright); the rest of the test set is rotated and
/// split into validation and test halves.
pub(crate) const PUBLIC_IMAGES: usize = 5000;
pub(crate) const VALIDATION_IMAGES: usize = 2500;

/// A label skew, and optionally data that shrinks as rank grows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Skew {
    /// Dirichlet α of the label partition.
    pub alpha: f64,
    /// Each device keeps (lowest rank / its rank)^this of its shard (`--data-share-by-rank`).
    pub share_power: f64,
}

impl Skew {
    pub const fn labels(alpha: f64) -> Skew {
        Skew { alpha, share_power: 0.0 }
    }

    fn key(self) -> String {
        if self.share_power > 0.0 {
            format!("alpha{}-share{}", self.alpha, self.share_power)
        } else {
            format!("alpha{}", self.alpha)
        }
    }

    fn title(self) -> String {
        if self.share_power > 0.0 {
            format!(
                "Dirichlet α = {}, data shrinking with rank (each device keeps (2 / rank)^{} of its shard)",
                self.alpha, self.share_power
            )
        } else {
            format!("Dirichlet α = {}", self.alpha)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Arm {
    /// A rank-heterogeneous method on the fleet.
    Method(&'static str),
    /// FedAvg with every device at this rank: what the rank can buy in federation.
    Homogeneous(u32),
    /// One device holding every device's data and taking the whole fleet's steps, at this rank.
    Centralized(u32),
    /// The same data and steps, training every weight of the model instead of an adapter
    /// (`flotilla-coordinator finetune-full`).
    FullFineTune,
    /// A method under device-level differential privacy (central noise) at this ε, its learning
    /// rate the one the method chose without privacy, its clipping bound tuned.
    Private { method: &'static str, epsilon: u32 },
}

impl Arm {
    fn key(self, max_rank: u32) -> String {
        match self {
            Arm::Method(m) => m.to_string(),
            Arm::Homogeneous(rank) => format!("fedavg-all-r{rank}"),
            Arm::Centralized(rank) if rank == max_rank => "centralized".into(),
            Arm::Centralized(rank) => format!("centralized-r{rank}"),
            Arm::FullFineTune => "full-finetune".into(),
            Arm::Private { method, epsilon } => format!("{method}-dp-eps{epsilon}"),
        }
    }

    pub fn label(self) -> String {
        match self {
            Arm::Method(m) => m.to_string(),
            Arm::Homogeneous(rank) => format!("fedavg, every device at rank {rank}"),
            Arm::Centralized(rank) => format!("centralized LoRA at rank {rank}"),
            Arm::FullFineTune => "centralized full fine-tuning".into(),
            Arm::Private { method, epsilon } => format!("{method}, differential privacy ε = {epsilon}"),
        }
    }

    fn method(self) -> &'static str {
        match self {
            Arm::Method(m) | Arm::Private { method: m, .. } => m,
            _ => "fedavg",
        }
    }

    /// One process holding all the pooled data (centralized LoRA or full fine-tuning).
    fn is_centralized(self) -> bool {
        matches!(self, Arm::Centralized(_) | Arm::FullFineTune)
    }

    fn is_heterogeneous(self) -> bool {
        matches!(self, Arm::Method(_) | Arm::Private { .. })
    }

    /// The run's R_max: FedAvg needs every device at it, so a homogeneous or centralized run's is
    /// its rank.
    fn max_rank(self, fleet_max: u32) -> u32 {
        match self {
            Arm::Method(_) | Arm::Private { .. } | Arm::FullFineTune => fleet_max,
            Arm::Homogeneous(rank) | Arm::Centralized(rank) => rank,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Tune,
    Final,
}

impl Phase {
    fn key(self) -> &'static str {
        match self {
            Phase::Tune => "tune",
            Phase::Final => "final",
        }
    }
}

/// One run of the study. `skew` is `None` for a centralized run (it holds all the data).
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub task: &'static str,
    pub phase: Phase,
    pub skew: Option<Skew>,
    pub arm: Arm,
    pub learning_rate: f64,
    /// Local steps per round of each device (a centralized run takes the whole fleet's).
    pub local_steps: u32,
    /// A private arm's clipping bound.
    pub clip_norm: Option<f64>,
    pub seed: u64,
}

/// A setting compared in the report: a task, a skew (none when centralized) and an arm.
pub type Setting = (&'static str, Option<Skew>, Arm);

#[derive(Debug, Clone)]
pub struct Plan {
    pub name: &'static str,
    /// `text` or `image-shift`: names the generated block of docs/study.md.
    pub suite: &'static str,
    pub tasks: Vec<Task>,
    /// (device class, rank, devices), by rank ascending.
    pub fleet: Vec<(&'static str, u32, u32)>,
    /// LoRA scale of every rank: lora_alpha = scale · R_max.
    pub scale: f64,
    pub skews: Vec<Skew>,
    pub methods: Vec<&'static str>,
    pub homogeneous_ranks: Vec<u32>,
    /// Ranks of the centralized rank sweep (R_max, the reference, is always run).
    pub sweep_ranks: Vec<u32>,
    pub learning_rates: Vec<f64>,
    /// Learning rates of centralized full fine-tuning (every weight moves, so smaller ones).
    pub full_learning_rates: Vec<f64>,
    pub seeds: Vec<u64>,
    pub rounds: u32,
    /// Local steps per round, tuned together with the learning rates. Cell keys name any but the
    /// first, so a grid that grows keeps its cached runs.
    pub local_steps: Vec<u32>,
    pub batch_size: u32,
    /// Held-out samples each evaluation uses.
    pub eval_samples: usize,
    /// The privacy axis: these methods, under the first skew, at each ε, with the clipping bound
    /// chosen from `clip_norms` on the validation split (δ = [`privacy_delta`]).
    pub private_methods: Vec<&'static str>,
    pub epsilons: Vec<u32>,
    pub clip_norms: Vec<f64>,
    /// How far tuning searches past the edges of the learning rates and local steps.
    pub edge_search: EdgeSearch,
    /// Candidates whose validation scores are within this of the best (a fraction: 0.01 is one
    /// point) are run with a second seed and compared on their mean; `None`: one seed.
    pub close_call: Option<f64>,
}

pub const METHODS: [&str; 7] = ["rbla", "fold-and-fill", "rbla-coverage", "zero-pad", "hetlora", "flexlora", "flora"];

impl Plan {
    pub fn max_rank(&self) -> u32 {
        self.fleet.iter().map(|&(_, rank, _)| rank).max().unwrap_or(1)
    }

    /// The devices of an arm's run: the fleet, or one holding the pooled data.
    pub fn devices(&self, arm: Arm) -> u32 {
        if arm.is_centralized() {
            1
        } else {
            self.fleet_size()
        }
    }

    /// The updates each round of an arm's run must aggregate: one per device, none for full
    /// fine-tuning (one process, no federation).
    pub fn updates_per_round(&self, arm: Arm) -> usize {
        if arm == Arm::FullFineTune {
            0
        } else {
            self.devices(arm) as usize
        }
    }

    pub fn fleet_size(&self) -> u32 {
        self.fleet.iter().map(|&(_, _, n)| n).sum()
    }

    /// The arms run under one skew: the methods, and the homogeneous fleets under a plain label
    /// skew (a homogeneous fleet has no rank for its data to shrink with).
    pub fn arms(&self, skew: Skew) -> Vec<Arm> {
        let mut arms: Vec<Arm> = self.methods.iter().map(|&m| Arm::Method(m)).collect();
        if skew.share_power == 0.0 {
            arms.extend(self.homogeneous_ranks.iter().map(|&rank| Arm::Homogeneous(rank)));
        }
        arms
    }

    /// The centralized ranks: the sweep and R_max.
    pub fn centralized_ranks(&self) -> Vec<u32> {
        let mut ranks = self.sweep_ranks.clone();
        ranks.push(self.max_rank());
        ranks.sort_unstable();
        ranks.dedup();
        ranks
    }

    /// Every setting of `task`: the centralized runs first (LoRA at each rank, then full
    /// fine-tuning), then each skew's arms, then the privacy axis (under the first skew).
    pub fn settings(&self, task: &'static str) -> Vec<Setting> {
        let mut settings: Vec<Setting> =
            self.centralized_ranks().into_iter().map(|rank| (task, None, Arm::Centralized(rank))).collect();
        if !self.full_learning_rates.is_empty() {
            settings.push((task, None, Arm::FullFineTune));
        }
        for &skew in &self.skews {
            for arm in self.arms(skew) {
                settings.push((task, Some(skew), arm));
            }
        }
        if let Some(&skew) = self.skews.first() {
            for &method in &self.private_methods {
                for &epsilon in &self.epsilons {
                    settings.push((task, Some(skew), Arm::Private { method, epsilon }));
                }
            }
        }
        settings
    }

    /// A setting's final cell for `seed`, once its tuning (and its method's, for a private arm) chose.
    pub fn final_cell(&self, setting: Setting, chosen: &Chosen, seed: u64) -> Option<Cell> {
        let (task, skew, arm) = setting;
        let Choice { learning_rate, local_steps, clip_norm } = chosen.get(&self.setting_key(task, skew, arm))?.choice;
        Some(Cell { task, phase: Phase::Final, skew, arm, learning_rate, local_steps, clip_norm, seed })
    }

    /// The plan's base local steps: cell keys leave them out.
    fn base_local_steps(&self) -> u32 {
        self.local_steps.first().copied().unwrap_or(1)
    }

    /// Whether local steps are tuned (more than one value), so that reports name them.
    pub fn tunes_local_steps(&self) -> bool {
        self.local_steps.len() > 1
    }

    /// How the report names a choice: its learning rate, and its local steps where they were tuned.
    pub fn describe(&self, choice: &Choice) -> String {
        if self.tunes_local_steps() {
            format!("{}, {} steps", choice.learning_rate, choice.local_steps)
        } else {
            format!("{}", choice.learning_rate)
        }
    }

    /// The final cells of the settings whose tuning is complete, at the chosen values: seed by
    /// seed, so that a study cut short still covers every setting.
    pub fn final_cells(&self, task: &'static str, chosen: &Chosen) -> Vec<Cell> {
        let mut cells = Vec::new();
        for &seed in &self.seeds {
            for setting in self.settings(task) {
                cells.extend(self.final_cell(setting, chosen, seed));
            }
        }
        cells
    }

    fn task(&self, key: &str) -> Option<&Task> {
        self.tasks.iter().find(|t| t.key == key)
    }

    pub fn setting_key(&self, task: &str, skew: Option<Skew>, arm: Arm) -> String {
        let setting = skew.map_or("pooled".to_string(), Skew::key);
        format!("{task}-{setting}-{}", arm.key(self.max_rank()))
    }

    /// Where a finished cell's result is cached in `results_dir`.
    pub fn result_path(&self, results_dir: &Path, cell: &Cell) -> PathBuf {
        results_dir.join(format!("{}.json", self.cell_key(cell)))
    }

    /// A file-name-safe key; results are cached under it.
    pub fn cell_key(&self, cell: &Cell) -> String {
        let setting = cell.skew.map_or("pooled".to_string(), Skew::key);
        let clip = cell.clip_norm.map_or(String::new(), |c| format!("-clip{c}"));
        let steps = if cell.local_steps == self.base_local_steps() {
            String::new()
        } else {
            format!("-steps{}", cell.local_steps)
        };
        format!(
            "{}-{}-{setting}-{}-lr{}{steps}{clip}-seed{}",
            cell.task,
            cell.phase.key(),
            cell.arm.key(self.max_rank()),
            cell.learning_rate,
            cell.seed
        )
    }

    fn begin_marker(&self) -> String {
        format!("<!-- generated by flotilla-study --suite {}: begin -->", self.suite)
    }

    fn end_marker(&self) -> String {
        format!("<!-- generated by flotilla-study --suite {}: end -->", self.suite)
    }
}

/// Where a full suite's finished runs are cached: inside the repository, committed, so that its
/// report and the default-method rule regenerate on any clone without rerunning hours of runs.
pub fn committed_results_dir(suite: &str) -> PathBuf {
    PathBuf::from(format!("study/results/{suite}"))
}

/// Issue 15's rule across the suites: each method's gains over every measured cell, its lowest
/// worst slice − base, and the method the rule picks. The suites' standings come from their
/// cached results or, with `from_doc`, from the rule tables of the suites' generated blocks in
/// that document (for suites whose caches are not on this machine).
pub fn print_default_choice(suites: &[String], from_doc: Option<&Path>) -> Result<()> {
    let plans = [Plan::image_shift(), Plan::text(), Plan::text_reviews()];
    if let Some(unknown) = suites.iter().find(|s| !plans.iter().any(|p| p.suite == s.as_str())) {
        bail!("--suites {unknown}: expected some of image-shift, text, text-reviews");
    }
    let doc = match from_doc {
        Some(path) => {
            Some((path, std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?))
        }
        None => None,
    };
    let mut combined: Vec<report::Standing> = Vec::new();
    let mut missing: Vec<&str> = Vec::new();
    // Written at the end, once: a reader that stops early (`| head`) is no error.
    let mut out = String::new();
    use std::fmt::Write as _;
    for plan in plans.into_iter().filter(|p| suites.is_empty() || suites.iter().any(|s| s == p.suite)) {
        let standings = match &doc {
            Some((path, text)) => {
                let _ = writeln!(out, "{}: the rule table of its block in {}", plan.suite, path.display());
                doc_rule::standings_from_doc(&plan, text)?
            }
            None => {
                let dir = committed_results_dir(plan.suite);
                if !dir.is_dir() {
                    let _ = writeln!(out, "{}: no results in {}", plan.suite, dir.display());
                    missing.push(plan.suite);
                    continue;
                }
                let _ = writeln!(out, "{}", progress(&plan, &dir)?);
                report::standings(&plan, &dir)?
            }
        };
        for standing in standings {
            match combined.iter_mut().find(|c| c.method == standing.method) {
                Some(c) => {
                    c.gains.extend(&standing.gains);
                    c.cells += standing.cells;
                    c.worst_slice_minus_floor = match (c.worst_slice_minus_floor, standing.worst_slice_minus_floor) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                None => combined.push(standing),
            }
        }
    }
    out.push_str(&report::rule_table(&combined));
    let _ = match report::pick(&combined, &missing) {
        Ok(method) => writeln!(out, "the rule picks: {method}"),
        Err(why) => writeln!(out, "the rule picks none yet: {why}"),
    };
    let mut stdout = std::io::stdout().lock();
    match std::io::Write::write_all(&mut stdout, out.as_bytes()).and_then(|()| std::io::Write::flush(&mut stdout)) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => written.context("cannot write the rule's table"),
    }
}

/// What the cache holds against what the plan needs so far: settings tuned, tuning runs still
/// to run (more may follow past the grid's edges), final runs done.
fn progress(plan: &Plan, results_dir: &Path) -> Result<String> {
    let (chosen, needed) = results::tune_from_cache(plan, results_dir)?;
    let cached = |cell: &Cell| plan.result_path(results_dir, cell).exists();
    let settings: usize = plan.tasks.iter().map(|t| plan.settings(t.key).len()).sum();
    let finals: Vec<Cell> = plan.tasks.iter().flat_map(|t| plan.final_cells(t.key, &chosen)).collect();
    Ok(format!(
        "{}: {} of {settings} settings tuned, {} tuning run(s) to go; {} of {} final runs done for the tuned settings",
        plan.name,
        chosen.len(),
        needed.iter().filter(|c| !cached(c)).count(),
        finals.iter().filter(|c| cached(c)).count(),
        finals.len(),
    ))
}

/// Runs what is missing, task by task (tuning, then the finals it unlocks), and rewrites the
/// report.
pub fn run(
    plan: &Plan,
    setup: &Setup,
    results_dir: &Path,
    doc: &Path,
    only: &[String],
    report_only: bool,
) -> Result<()> {
    let mut failed = Vec::new();
    if !report_only {
        setup.provision(plan.fleet_size())?;
        for task in &plan.tasks {
            data::prepare_data(task, &setup.work)?;
        }
        let selected = |cell: &Cell| only.is_empty() || only.iter().any(|o| plan.cell_key(cell).contains(o.as_str()));
        // Runs the selected cells not yet cached nor failed in this study; returns how many it tried.
        let run_all = |cells: Vec<Cell>, failed: &mut Vec<String>| -> Result<usize> {
            let cells: Vec<Cell> = cells
                .into_iter()
                .filter(|c| {
                    selected(c) && !failed.contains(&plan.cell_key(c)) && !plan.result_path(results_dir, c).exists()
                })
                .collect();
            for (i, cell) in cells.iter().enumerate() {
                let key = plan.cell_key(cell);
                let cached = plan.result_path(results_dir, cell);
                eprintln!("[{}/{}] {key} ...", i + 1, cells.len());
                let outcome = cells::run_cell(plan, cell, setup).and_then(|(summary, wall_seconds)| {
                    results::check_every_device_counted(&summary, plan.updates_per_round(cell.arm))?;
                    Ok((summary, wall_seconds))
                });
                match outcome {
                    Ok((summary, wall_seconds)) => {
                        let run = Run::from_summary(&summary, wall_seconds)?;
                        eprintln!(
                            "[{}/{}] {key}: R_max {:.1}%, score {:.1}% in {wall_seconds:.0} s",
                            i + 1,
                            cells.len(),
                            100.0 * run.max_rank_accuracy().unwrap_or(f64::NAN),
                            100.0 * run.score(cell.arm, &plan.fleet).unwrap_or(f64::NAN),
                        );
                        let record = serde_json::json!({ "wall_seconds": wall_seconds, "summary": summary });
                        flotilla_files::write_atomically(&cached, &serde_json::to_vec(&record)?)?;
                    }
                    Err(error) => {
                        eprintln!("[{}/{}] {key} failed: {error:#}", i + 1, cells.len());
                        failed.push(key);
                    }
                }
            }
            Ok(cells.len())
        };
        // Tuning in waves: the grids, then the values past their edges and the private arms
        // (which need their method's choice), until no setting needs another run.
        while run_all(results::tune_from_cache(plan, results_dir)?.1, &mut failed)? > 0 {}
        let chosen = choose(plan, results_dir)?;
        for task in &plan.tasks {
            run_all(plan.final_cells(task.key, &chosen), &mut failed)?;
        }
    }
    eprintln!("{}", progress(plan, results_dir)?);
    let doc_dir: PathBuf = doc.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let block = report::markdown(plan, results_dir, "figures/study", &doc_dir.join("figures/study"))?;
    crate::report::write_block(doc, &plan.begin_marker(), &plan.end_marker(), &block)?;
    eprintln!("wrote {}", doc.display());
    anyhow::ensure!(failed.is_empty(), "{} cell(s) failed (rerun to retry them): {}", failed.len(), failed.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished tuning that kept `choice`.
    fn kept(choice: Choice) -> results::Tuned {
        results::Tuned { choice, scores: Vec::new(), edges: Vec::new(), doubled: Vec::new() }
    }

    /// A setting's grid as tuning cells.
    fn grid_cells(plan: &Plan, setting: Setting, chosen: &Chosen) -> Vec<Cell> {
        plan.grid(setting, chosen).into_iter().map(|c| plan.tuning_cell(setting, c, 1)).collect()
    }

    /// The cells' keys, sorted, without duplicates.
    fn keys_of(plan: &Plan, cells: &[Cell]) -> Vec<String> {
        let mut keys: Vec<String> = cells.iter().map(|c| plan.cell_key(c)).collect();
        keys.sort();
        keys.dedup();
        keys
    }

    #[test]
    fn the_plans_tune_every_setting_then_run_its_seeds_at_the_chosen_rate() {
        let plan = Plan::text();
        let settings = plan.settings("bbc");
        // The centralized reference and full fine-tuning, under each of 2 skews 7 methods and 2
        // homogeneous fleets, and Fold-and-Fill at 3 ε.
        assert_eq!(settings.len(), 2 + 2 * (7 + 2) + 3);
        let tuning = plan.tune_task("bbc", &mut |_| None).1;
        // The private arms wait for their method's learning rate; full fine-tuning has its own.
        assert_eq!(tuning.len(), (settings.len() - 4) * plan.learning_rates.len() + plan.full_learning_rates.len());
        assert!(keys_of(&plan, &tuning).contains(&"bbc-tune-pooled-full-finetune-lr0.0001-seed1".to_string()));
        let keys = keys_of(&plan, &tuning);
        assert_eq!(keys.len(), tuning.len());
        assert!(keys.contains(&"bbc-tune-pooled-centralized-lr0.002-seed1".to_string()));
        assert!(keys.contains(&"bbc-tune-alpha1-fedavg-all-r2-lr0.005-seed1".to_string()));
        let mut chosen = Chosen::new();
        let rbla = Choice { learning_rate: 3e-3, local_steps: 10, clip_norm: None };
        chosen.insert(plan.setting_key("bbc", Some(Skew::labels(1.0)), Arm::Method("rbla")), kept(rbla));
        let finals = plan.final_cells("bbc", &chosen);
        assert_eq!(finals.len(), 3);
        assert!(finals.iter().all(|c| c.phase == Phase::Final && c.learning_rate == 3e-3 && c.local_steps == 10));
        assert_eq!(cells::profile_mix(&plan, Arm::Homogeneous(8)), "phone:8=3,phone:8=3,laptop:8=3,desktop:8=3");
        assert_eq!(plan.fleet_size(), 12);

        let image = Plan::image_shift();
        assert_eq!(image.max_rank(), 64);
        assert_eq!(image.fleet_size(), 18);
        // The sweep's 6 ranks (R_max among them) and full fine-tuning; under 2 label skews 7
        // methods and 6 homogeneous fleets; under the shrinking-data skew the 7 methods; 2 methods
        // at 3 ε.
        assert_eq!(image.settings("fashion-rot90").len(), 6 + 1 + 2 * (7 + 6) + 7 + 2 * 3);
        // A private arm is tuned over the clipping bounds once its method has its learning rate.
        let private = ("fashion-rot90", Some(Skew::labels(1.0)), Arm::Private { method: "rbla", epsilon: 4 });
        assert!(image.grid(private, &Chosen::new()).is_empty());
        let mut chosen = Chosen::new();
        let plain = Choice { learning_rate: 0.002, local_steps: 30, clip_norm: None };
        chosen.insert(image.setting_key("fashion-rot90", Some(Skew::labels(1.0)), Arm::Method("rbla")), kept(plain));
        let candidates = grid_cells(&image, private, &chosen);
        assert_eq!(candidates.iter().map(|c| c.clip_norm).collect::<Vec<_>>(), vec![Some(0.05), Some(0.5), Some(2.0)]);
        assert!(candidates.iter().all(|c| c.learning_rate == 0.002 && c.local_steps == 30));
        assert_eq!(image.cell_key(&candidates[1]), "fashion-rot90-tune-alpha1-rbla-dp-eps4-lr0.002-clip0.5-seed1");
        chosen.insert(image.setting_key(private.0, private.1, private.2), kept(Choice::of(&candidates[1])));
        let last = image.final_cell(private, &chosen, 3).unwrap();
        assert_eq!((last.learning_rate, last.clip_norm, last.seed), (0.002, Some(0.5), 3));
        let share = Cell {
            task: "fashion-rot90",
            phase: Phase::Tune,
            skew: Some(Skew { alpha: 1.0, share_power: 0.5 }),
            arm: Arm::Centralized(8),
            learning_rate: 0.005,
            local_steps: 30,
            clip_norm: None,
            seed: 1,
        };
        assert_eq!(image.cell_key(&share), "fashion-rot90-tune-alpha1-share0.5-centralized-r8-lr0.005-seed1");
    }

    #[test]
    fn local_steps_are_tuned_with_the_learning_rate_and_only_extra_steps_are_named_in_keys() {
        let plan = Plan::text_reviews();
        let setting = ("rt", Some(Skew::labels(1.0)), Arm::Method("flora"));
        let candidates = grid_cells(&plan, setting, &Chosen::new());
        let grid: Vec<(f64, u32)> = candidates.iter().map(|c| (c.learning_rate, c.local_steps)).collect();
        assert_eq!(grid, vec![(1e-3, 10), (1e-3, 40), (2e-3, 10), (2e-3, 40)]);
        let keys: Vec<String> = candidates.iter().map(|c| plan.cell_key(c)).collect();
        // The base steps keep the keys a learning-rate-only grid wrote, so its cached runs count.
        assert_eq!(keys[0], "rt-tune-alpha1-flora-lr0.001-seed1");
        assert_eq!(keys[1], "rt-tune-alpha1-flora-lr0.001-steps40-seed1");
        let mut chosen = Chosen::new();
        let best = Choice::of(&candidates[3]);
        chosen.insert(plan.setting_key(setting.0, setting.1, setting.2), kept(best));
        let last = plan.final_cell(setting, &chosen, 2).unwrap();
        assert_eq!((last.learning_rate, last.local_steps, last.seed), (2e-3, 40, 2));
        assert_eq!(plan.cell_key(&last), "rt-final-alpha1-flora-lr0.002-steps40-seed2");
        assert_eq!(plan.describe(&best), "0.002, 40 steps");
        assert_eq!(Plan::text().describe(&best), "0.002");
    }
}
