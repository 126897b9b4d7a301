//! The study's second edition (issue 15): every rank-heterogeneous method against its bounds, with
//! learning rates tuned on a validation split, through the real coordinator and simulator. Two
//! suites share this engine:
//!
//! - `--suite text`: all-MiniLM-L6-v2 with LoRA on `query` and `value`, fine-tuned on BBC News and
//!   Rotten Tomatoes by 12 devices, 3 at each of the ranks 2, 4, 8 and 16.
//! - `--suite image-shift`: the MLP pretrained on 5,000 upright public Fashion-MNIST images,
//!   fine-tuned by 18 devices (3 at each rank from 2 to 64) whose images are all rotated by 90°:
//!   a domain shift large enough that the rank of the correction matters (the centralized rank
//!   sweep shows it before the grid runs).
//!
//! Two phases, both cached cell by cell:
//!
//! - **tune**: seed 1, every learning rate of the grid, evaluated on a validation split the devices
//!   never train on. Each setting (a method under a skew, a homogeneous fleet, a centralized run)
//!   keeps the learning rate with the best validation score: the mean over the last 3 rounds of
//!   (R_max accuracy + fleet mean) / 2 for a heterogeneous method, of the R_max accuracy otherwise.
//! - **final**: every seed at the chosen learning rate, evaluated on the test split. The report
//!   uses only these.
//!
//! The bounds use the same training data and sample budget: the base alone (the coordinator's
//! evaluation before round 1), centralized LoRA (one device holding every device's data and taking
//! the whole fleet's steps) at R_max and, for the rank sweep, at other ranks, and FedAvg with every
//! device at one rank.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use flotilla_torch::data::idx::{read_idx, IdxArray, DEBIAN_FASHION_MNIST};
use flotilla_torch::data::text::{load_text, TextExample, TextSplit};

use crate::cell::{run_processes, Setup};

/// What a task's data is and how its model is made.
#[derive(Debug, Clone)]
pub enum TaskKind {
    /// Labelled texts from the per-user cache (deploy/fetch-text-assets.sh), fine-tuned from
    /// all-MiniLM-L6-v2.
    Text { source: &'static str, labels: &'static [&'static str], max_length: u32 },
    /// Fashion-MNIST whose device and held-out images are rotated by 90° while the base is
    /// pretrained on upright public images.
    RotatedImages,
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
        max_length: 64,
    },
};

pub const ROTTEN_TOMATOES: Task = Task {
    key: "rt",
    title: "Rotten Tomatoes (fresh, rotten, plot)",
    kind: TaskKind::Text {
        source: "datasets/rotten-tomatoes.csv",
        labels: &["fresh", "rotten", "plot"],
        max_length: 64,
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
const PUBLIC_IMAGES: usize = 5000;
const VALIDATION_IMAGES: usize = 2500;

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
}

impl Arm {
    fn key(self, max_rank: u32) -> String {
        match self {
            Arm::Method(m) => m.to_string(),
            Arm::Homogeneous(rank) => format!("fedavg-all-r{rank}"),
            Arm::Centralized(rank) if rank == max_rank => "centralized".into(),
            Arm::Centralized(rank) => format!("centralized-r{rank}"),
        }
    }

    pub fn label(self) -> String {
        match self {
            Arm::Method(m) => m.to_string(),
            Arm::Homogeneous(rank) => format!("fedavg, every device at rank {rank}"),
            Arm::Centralized(rank) => format!("centralized LoRA at rank {rank}"),
        }
    }

    fn method(self) -> &'static str {
        match self {
            Arm::Method(m) => m,
            _ => "fedavg",
        }
    }

    fn is_heterogeneous(self) -> bool {
        matches!(self, Arm::Method(_))
    }

    /// The run's R_max: FedAvg needs every device at it, so a homogeneous or centralized run's is
    /// its rank.
    fn max_rank(self, fleet_max: u32) -> u32 {
        match self {
            Arm::Method(_) => fleet_max,
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
    pub seeds: Vec<u64>,
    pub rounds: u32,
    pub local_steps: u32,
    pub batch_size: u32,
    /// Held-out samples each evaluation uses.
    pub eval_samples: usize,
}

pub const METHODS: [&str; 7] = ["rbla", "fold-and-fill", "rbla-coverage", "zero-pad", "hetlora", "flexlora", "flora"];

impl Plan {
    pub fn text() -> Plan {
        Plan {
            name: "text",
            suite: "text",
            tasks: vec![BBC_NEWS, ROTTEN_TOMATOES],
            fleet: vec![("phone", 2, 3), ("phone", 4, 3), ("laptop", 8, 3), ("desktop", 16, 3)],
            scale: 2.0,
            skews: vec![Skew::labels(1.0), Skew::labels(0.1)],
            methods: METHODS.to_vec(),
            homogeneous_ranks: vec![2, 4, 8, 16],
            sweep_ranks: vec![16],
            learning_rates: vec![1e-3, 3e-3],
            seeds: vec![1, 2, 3],
            rounds: 5,
            local_steps: 8,
            batch_size: 8,
            eval_samples: 200,
        }
    }

    /// One task, one skew, two methods, one learning rate and seed, 3 short rounds: checks the
    /// pipeline in about ten minutes.
    pub fn text_quick() -> Plan {
        Plan {
            name: "text-quick",
            tasks: vec![BBC_NEWS],
            skews: vec![Skew::labels(1.0)],
            methods: vec!["rbla", "fold-and-fill"],
            homogeneous_ranks: vec![2, 16],
            learning_rates: vec![2e-3],
            seeds: vec![1],
            rounds: 3,
            local_steps: 4,
            eval_samples: 100,
            ..Plan::text()
        }
    }

    pub fn image_shift() -> Plan {
        Plan {
            name: "image-shift",
            suite: "image-shift",
            tasks: vec![ROTATED_FASHION],
            fleet: vec![
                ("phone", 2, 3),
                ("phone", 4, 3),
                ("laptop", 8, 3),
                ("desktop", 16, 3),
                ("gpu", 32, 3),
                ("gpu", 64, 3),
            ],
            scale: 2.0,
            skews: vec![Skew::labels(1.0), Skew::labels(0.1), Skew { alpha: 1.0, share_power: 0.5 }],
            methods: METHODS.to_vec(),
            homogeneous_ranks: vec![2, 4, 8, 16, 32, 64],
            sweep_ranks: vec![2, 4, 8, 16, 32, 64],
            learning_rates: vec![0.001, 0.002, 0.005],
            seeds: vec![1, 2, 3],
            rounds: 20,
            local_steps: 30,
            batch_size: 32,
            eval_samples: 2500,
        }
    }

    /// One skew, two methods, one learning rate and seed, 4 rounds: minutes.
    pub fn image_shift_quick() -> Plan {
        Plan {
            name: "image-shift-quick",
            skews: vec![Skew::labels(1.0)],
            methods: vec!["rbla", "fold-and-fill"],
            homogeneous_ranks: vec![2, 64],
            sweep_ranks: vec![2, 64],
            learning_rates: vec![0.005],
            seeds: vec![1],
            rounds: 4,
            local_steps: 15,
            ..Plan::image_shift()
        }
    }

    pub fn max_rank(&self) -> u32 {
        self.fleet.iter().map(|&(_, rank, _)| rank).max().unwrap_or(1)
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

    /// Every setting of `task`: the centralized runs first, then each skew's arms.
    pub fn settings(&self, task: &'static str) -> Vec<Setting> {
        let mut settings: Vec<Setting> =
            self.centralized_ranks().into_iter().map(|rank| (task, None, Arm::Centralized(rank))).collect();
        for &skew in &self.skews {
            for arm in self.arms(skew) {
                settings.push((task, Some(skew), arm));
            }
        }
        settings
    }

    pub fn tuning_cells(&self, task: &'static str) -> Vec<Cell> {
        let mut cells = Vec::new();
        for (task, skew, arm) in self.settings(task) {
            for &learning_rate in &self.learning_rates {
                cells.push(Cell { task, phase: Phase::Tune, skew, arm, learning_rate, seed: 1 });
            }
        }
        cells
    }

    /// The final cells of the settings whose tuning is complete, at the chosen learning rate:
    /// seed by seed, so that a study cut short still covers every setting.
    pub fn final_cells(&self, task: &'static str, chosen: &Chosen) -> Vec<Cell> {
        let mut cells = Vec::new();
        for &seed in &self.seeds {
            for (task, skew, arm) in self.settings(task) {
                if let Some(&(learning_rate, _)) = chosen.get(&self.setting_key(task, skew, arm)) {
                    cells.push(Cell { task, phase: Phase::Final, skew, arm, learning_rate, seed });
                }
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

    /// A file-name-safe key; results are cached under it.
    pub fn cell_key(&self, cell: &Cell) -> String {
        let setting = cell.skew.map_or("pooled".to_string(), Skew::key);
        format!(
            "{}-{}-{setting}-{}-lr{}-seed{}",
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

// ---------------------------------------------------------------------------------------------
// Data.

fn bucket(key: &str) -> u64 {
    // FNV-1a of a salted key: independent of the data set's own test split.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in b"validation/".iter().chain(key.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn write_jsonl(path: &Path, examples: &[&TextExample], labels: &[&str]) -> Result<()> {
    let mut sorted = examples.to_vec();
    // Hash order: the first `eval_samples` of an evaluation file are a seeded sample of it.
    sorted.sort_by_key(|e| bucket(&e.key).rotate_left(17));
    let tmp = path.with_extension("jsonl.tmp");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for example in sorted {
        let line = serde_json::json!({ "text": example.text, "label": labels[example.label] });
        writeln!(file, "{line}")?;
    }
    file.flush()?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Text: `<work>/data/<task>/{tune,final}`, each with `train.jsonl` (the devices' texts, the same
/// in both) and `test.jsonl` (the validation split, or the data set's test split).
fn prepare_texts(task: &Task, source: &str, labels: &[&str], work: &Path) -> Result<()> {
    let dir = work.join("data").join(task.key);
    if dir.join("tune/test.jsonl").is_file() && dir.join("final/test.jsonl").is_file() {
        return Ok(());
    }
    let source = flotilla_torch::cache::root().join(source);
    let owned: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
    let missing = || format!("cannot read {} (run: bash deploy/fetch-text-assets.sh)", source.display());
    let train = load_text(&source, &owned, TextSplit::Train).with_context(missing)?;
    let test = load_text(&source, &owned, TextSplit::Test).with_context(missing)?;
    let (validation, devices): (Vec<&TextExample>, Vec<&TextExample>) =
        train.examples.iter().partition(|e| bucket(&e.key) % 100 < VALIDATION_PERCENT);
    for phase in ["tune", "final"] {
        std::fs::create_dir_all(dir.join(phase))?;
        write_jsonl(&dir.join(phase).join("train.jsonl"), &devices, labels)?;
    }
    write_jsonl(&dir.join("tune/test.jsonl"), &validation, labels)?;
    write_jsonl(&dir.join("final/test.jsonl"), &test.examples.iter().collect::<Vec<_>>(), labels)?;
    eprintln!(
        "{}: {} device texts, {} validation, {} test",
        task.key,
        devices.len(),
        validation.len(),
        test.examples.len()
    );
    Ok(())
}

/// The image rotated by 90° clockwise: output pixel (r, c) is input pixel (size − 1 − c, r).
pub fn rotate90(image: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size * size];
    for r in 0..size {
        for c in 0..size {
            out[r * size + c] = image[(size - 1 - c) * size + r];
        }
    }
    out
}

fn write_idx(path: &Path, array: &IdxArray) -> Result<()> {
    let mut bytes = vec![0u8, 0, 0x08, array.dims.len() as u8];
    for &d in &array.dims {
        bytes.extend_from_slice(&(d as u32).to_be_bytes());
    }
    bytes.extend_from_slice(&array.data);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Images: `<work>/data/<task>/`, an IDX directory whose training images are rotated, and whose
/// test images are upright for the first 5,000 (the public data the base is pretrained on) and
/// rotated after (validation 5,000–7,499, test 7,500–9,999).
fn prepare_rotated(task: &Task, work: &Path) -> Result<()> {
    let dir = work.join("data").join(task.key);
    if dir.join("t10k-labels-idx1-ubyte").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    let source = Path::new(DEBIAN_FASHION_MNIST);
    for (prefix, upright) in [("train", 0usize), ("t10k", PUBLIC_IMAGES)] {
        let images = read_idx(&source.join(format!("{prefix}-images-idx3-ubyte.gz")), 3)
            .with_context(|| format!("Fashion-MNIST in {} (Debian's dataset-fashion-mnist)", source.display()))?;
        let labels = read_idx(&source.join(format!("{prefix}-labels-idx1-ubyte.gz")), 1)?;
        let (n, size) = (images.dims[0], images.dims[1]);
        anyhow::ensure!(images.dims[2] == size, "{prefix} images are not square");
        let mut data = Vec::with_capacity(images.data.len());
        for (i, image) in images.data.chunks_exact(size * size).enumerate().take(n) {
            if i < upright {
                data.extend_from_slice(image);
            } else {
                data.extend(rotate90(image, size));
            }
        }
        write_idx(&dir.join(format!("{prefix}-images-idx3-ubyte")), &IdxArray { dims: images.dims.clone(), data })?;
        write_idx(&dir.join(format!("{prefix}-labels-idx1-ubyte")), &labels)?;
    }
    eprintln!("{}: rotated Fashion-MNIST written to {}", task.key, dir.display());
    Ok(())
}

pub fn prepare_data(task: &Task, work: &Path) -> Result<()> {
    match &task.kind {
        TaskKind::Text { source, labels, .. } => prepare_texts(task, source, labels, work),
        TaskKind::RotatedImages => prepare_rotated(task, work),
    }
}

// ---------------------------------------------------------------------------------------------
// Running a cell.

fn coordinator_config(plan: &Plan, cell: &Cell, task: &Task, data: &Path, pki: &Path, run_dir: &Path) -> String {
    let centralized = matches!(cell.arm, Arm::Centralized(_));
    let devices = if centralized { 1 } else { plan.fleet_size() };
    // The centralized device takes the whole fleet's steps: the same sample budget.
    let local_steps = if centralized { plan.local_steps * plan.fleet_size() } else { plan.local_steps };
    let max_rank = cell.arm.max_rank(plan.max_rank());
    let lora_alpha = plan.scale * f64::from(max_rank);
    let mut config = format!(
        r#"[server]
listen = "127.0.0.1:0"
run_dir = "{run_dir}"
address_file = "{run_dir}/coordinator.addr"

[tls]
kit = "{pki}/kits/coordinator"

[round]
rounds = {rounds}
min_devices = {devices}
deadline_secs = 3600
local_steps = {local_steps}
batch_size = {batch_size}
learning_rate = {learning_rate}

[aggregation]
method = "{method}"
max_rank = {max_rank}
lora_alpha = {lora_alpha}
"#,
        run_dir = run_dir.display(),
        pki = pki.display(),
        rounds = plan.rounds,
        batch_size = plan.batch_size,
        learning_rate = cell.learning_rate,
        method = cell.arm.method(),
    );
    match &task.kind {
        TaskKind::Text { labels, max_length, .. } => {
            let labels = labels.iter().map(|l| format!("\"{l}\"")).collect::<Vec<_>>().join(", ");
            config += &format!(
                r#"
[evaluation]
test_data = "{data}"
max_samples = {eval_samples}

[model]
seed = {seed}
[model.transformer]
checkpoint = "{checkpoint}"
target_modules = ["query", "value"]
labels = [{labels}]
max_length = {max_length}
"#,
                data = data.display(),
                eval_samples = plan.eval_samples,
                seed = cell.seed,
                checkpoint = flotilla_torch::cache::minilm_dir().display(),
            );
        }
        TaskKind::RotatedImages => {
            let skip = match cell.phase {
                Phase::Tune => PUBLIC_IMAGES,
                Phase::Final => PUBLIC_IMAGES + VALIDATION_IMAGES,
            };
            config += &format!(
                r#"
[evaluation]
test_data = "{data}"
skip_samples = {skip}
max_samples = {eval_samples}

[model]
seed = {seed}
[model.pretrain]
data = "{data}"
samples = {PUBLIC_IMAGES}
steps = 100
batch_size = 64
learning_rate = 0.002
[model.architecture.mlp]
input = 784
hidden = [128, 64]
classes = 10
"#,
                data = data.display(),
                eval_samples = plan.eval_samples.min(VALIDATION_IMAGES),
                seed = cell.seed,
            );
        }
    }
    config
}

fn profile_mix(plan: &Plan, arm: Arm) -> String {
    plan.fleet
        .iter()
        .map(|&(class, rank, n)| match arm {
            Arm::Homogeneous(all) => format!("{class}:{all}={n}"),
            _ => format!("{class}:{rank}={n}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

pub fn run_cell(plan: &Plan, cell: &Cell, setup: &Setup) -> Result<(serde_json::Value, f64)> {
    let task = plan.task(cell.task).with_context(|| format!("no task {}", cell.task))?;
    let data = match task.kind {
        TaskKind::Text { .. } => setup.work.join("data").join(task.key).join(cell.phase.key()),
        TaskKind::RotatedImages => setup.work.join("data").join(task.key),
    };
    let mut sim: Vec<OsString> = vec!["--data".into(), data.clone().into()];
    if let TaskKind::Text { .. } = task.kind {
        sim.extend(["--model-dir".into(), flotilla_torch::cache::minilm_dir().into()]);
    }
    match (cell.arm, cell.skew) {
        (Arm::Centralized(rank), _) => {
            sim.extend(["--clients".into(), "1".into(), "--profile-mix".into(), format!("gpu:{rank}=1").into()]);
        }
        (arm, skew) => {
            let skew = skew.context("a federated cell needs a skew")?;
            sim.extend(["--clients".into(), plan.fleet_size().to_string().into()]);
            sim.extend(["--profile-mix".into(), profile_mix(plan, arm).into()]);
            sim.extend(["--partition".into(), format!("dirichlet:{}", skew.alpha).into()]);
            sim.extend(["--partition-seed".into(), cell.seed.to_string().into()]);
            if skew.share_power > 0.0 {
                sim.extend(["--data-share-by-rank".into(), skew.share_power.to_string().into()]);
            }
        }
    }
    let pki = setup.pki();
    run_processes(
        setup,
        &plan.cell_key(cell),
        |run_dir| coordinator_config(plan, cell, task, &data, &pki, run_dir),
        &sim,
    )
}

// ---------------------------------------------------------------------------------------------
// Results.

/// One finished run: accuracy per round at R_max and at each rank, bytes and wall time.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// The run's R_max (a homogeneous or centralized run's rank).
    pub max_rank: u32,
    pub base: Option<f64>,
    /// Per round: rank → accuracy (R_max included).
    pub rounds: Vec<BTreeMap<u32, f64>>,
    pub upload_bytes_per_round: f64,
    pub download_bytes_per_round: f64,
    pub wall_seconds: f64,
}

/// Rounds averaged for a run's score: the last 3, not the best (no selection on test).
pub const LAST_ROUNDS: usize = 3;

impl Run {
    pub fn from_summary(summary: &serde_json::Value, wall_seconds: f64) -> Result<Run> {
        let by_rank = |evaluation: &serde_json::Value| -> BTreeMap<u32, f64> {
            evaluation
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| Some((e["rank"].as_u64()? as u32, e["accuracy"].as_f64()?)))
                .collect()
        };
        let rounds = summary["rounds"].as_array().context("summary.json has no rounds")?;
        anyhow::ensure!(!rounds.is_empty(), "no round finished (see the cell's logs)");
        let max_rank = summary["max_rank"].as_u64().context("summary.json has no max_rank")? as u32;
        let mut run = Run {
            max_rank,
            base: by_rank(&summary["initial_evaluation"]).values().next().copied(),
            wall_seconds,
            ..Run::default()
        };
        for round in rounds {
            let accuracies = by_rank(&round["evaluation"]);
            anyhow::ensure!(accuracies.contains_key(&max_rank), "round {} has no evaluation at R_max", round["round"]);
            run.rounds.push(accuracies);
            run.upload_bytes_per_round += round["update_bytes"].as_f64().unwrap_or(0.0);
            run.download_bytes_per_round += round["task_bytes"].as_f64().unwrap_or(0.0);
        }
        let n = run.rounds.len().max(1) as f64;
        run.upload_bytes_per_round /= n;
        run.download_bytes_per_round /= n;
        Ok(run)
    }

    fn last_rounds(&self) -> &[BTreeMap<u32, f64>] {
        &self.rounds[self.rounds.len().saturating_sub(LAST_ROUNDS)..]
    }

    fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
        let values: Vec<f64> = values.collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    }

    /// The global model at R_max, over the last rounds.
    pub fn max_rank_accuracy(&self) -> Option<f64> {
        Run::mean(self.last_rounds().iter().filter_map(|r| r.get(&self.max_rank).copied()))
    }

    /// One rank's slice, over the last rounds.
    pub fn rank_accuracy(&self, rank: u32) -> Option<f64> {
        Run::mean(self.last_rounds().iter().filter_map(|r| r.get(&rank).copied()))
    }

    /// Each device's own slice, averaged over `fleet`, over the last rounds; the R_max accuracy
    /// for a run whose devices all have its R_max.
    pub fn fleet_accuracy(&self, arm: Arm, fleet: &[(&str, u32, u32)]) -> Option<f64> {
        if !arm.is_heterogeneous() {
            return self.max_rank_accuracy();
        }
        let devices: u32 = fleet.iter().map(|&(_, _, n)| n).sum();
        let mut total = 0.0;
        for &(_, rank, n) in fleet {
            total += f64::from(n) * self.rank_accuracy(rank)?;
        }
        Some(total / f64::from(devices.max(1)))
    }

    /// The lowest slice accuracy of the fleet's ranks (R_max for a single-rank run).
    pub fn worst_slice(&self, arm: Arm, fleet: &[(&str, u32, u32)]) -> Option<f64> {
        if !arm.is_heterogeneous() {
            return self.max_rank_accuracy();
        }
        fleet
            .iter()
            .map(|&(_, rank, _)| self.rank_accuracy(rank))
            .collect::<Option<Vec<f64>>>()?
            .into_iter()
            .reduce(f64::min)
    }

    /// What tuning maximizes (on the validation split).
    pub fn score(&self, arm: Arm, fleet: &[(&str, u32, u32)]) -> Option<f64> {
        if arm.is_heterogeneous() {
            Some((self.max_rank_accuracy()? + self.fleet_accuracy(arm, fleet)?) / 2.0)
        } else {
            self.max_rank_accuracy()
        }
    }

    pub fn accuracy_curve(&self) -> Vec<f64> {
        self.rounds.iter().filter_map(|r| r.get(&self.max_rank).copied()).collect()
    }
}

pub fn load_run(plan: &Plan, dir: &Path, cell: &Cell) -> Result<Option<Run>> {
    let path = dir.join(format!("{}.json", plan.cell_key(cell)));
    let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
    let cached: serde_json::Value =
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))?;
    let wall = cached["wall_seconds"].as_f64().unwrap_or(0.0);
    Ok(Some(Run::from_summary(&cached["summary"], wall).with_context(|| path.display().to_string())?))
}

/// Per setting key: the chosen learning rate, and the validation score of each rate tried.
pub type Chosen = BTreeMap<String, (f64, Vec<(f64, f64)>)>;

/// The learning rate each setting keeps: the best validation score among its tuning runs, once
/// every learning rate of the grid has run.
pub fn choose(plan: &Plan, results_dir: &Path) -> Result<Chosen> {
    let mut chosen = BTreeMap::new();
    for task in &plan.tasks {
        for (task, skew, arm) in plan.settings(task.key) {
            let mut scores = Vec::new();
            for &learning_rate in &plan.learning_rates {
                let cell = Cell { task, phase: Phase::Tune, skew, arm, learning_rate, seed: 1 };
                if let Some(score) = load_run(plan, results_dir, &cell)?.and_then(|run| run.score(arm, &plan.fleet)) {
                    scores.push((learning_rate, score));
                }
            }
            if scores.len() == plan.learning_rates.len() {
                let best =
                    scores.iter().copied().fold((f64::NAN, f64::NEG_INFINITY), |b, s| if s.1 > b.1 { s } else { b });
                chosen.insert(plan.setting_key(task, skew, arm), (best.0, scores));
            }
        }
    }
    Ok(chosen)
}

// ---------------------------------------------------------------------------------------------
// The report.

struct Stat {
    mean: f64,
    sd: f64,
    n: usize,
}

fn stat(values: &[f64]) -> Option<Stat> {
    if values.is_empty() {
        return None;
    }
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    let sd = if n > 1 { (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt() } else { 0.0 };
    Some(Stat { mean, sd, n })
}

fn percent(s: &Option<Stat>) -> String {
    s.as_ref().map_or("—".into(), |s| format!("{:.1} ± {:.1}", 100.0 * s.mean, 100.0 * s.sd))
}

fn ratio(s: &Option<Stat>) -> String {
    s.as_ref().map_or("—".into(), |s| format!("{:.2} ± {:.2}", s.mean, s.sd))
}

struct Report<'a> {
    plan: &'a Plan,
    dir: &'a Path,
    chosen: Chosen,
}

impl Report<'_> {
    /// Final runs of one setting, seed by seed.
    fn finals(&self, task: &'static str, skew: Option<Skew>, arm: Arm) -> Result<Vec<Run>> {
        let Some(&(learning_rate, _)) = self.chosen.get(&self.plan.setting_key(task, skew, arm)) else {
            return Ok(Vec::new());
        };
        let mut runs = Vec::new();
        for &seed in &self.plan.seeds {
            let cell = Cell { task, phase: Phase::Final, skew, arm, learning_rate, seed };
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
    let report = Report { plan, dir, chosen: choose(plan, dir)? };
    let max_rank = plan.max_rank();
    let mut out = String::new();
    writeln!(out, "{}", plan.begin_marker())?;
    writeln!(
        out,
        "Plan `{}`: fleet {} (R_max {max_rank}, scale {} at every rank); {} rounds of {} AdamW steps of batch {}; \
         learning rate chosen from {:?} on the validation split (seed 1); final runs on the test split, seeds {:?}; \
         scores are the mean of the last {LAST_ROUNDS} rounds, on {} held-out samples.\n",
        plan.name,
        plan.fleet.iter().map(|(c, r, n)| format!("{n} × {c} at rank {r}")).collect::<Vec<_>>().join(", "),
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
        let central = report.finals(task.key, None, Arm::Centralized(max_rank))?;
        let central_acc = stat(&central.iter().filter_map(Run::max_rank_accuracy).collect::<Vec<_>>());
        let mut everything = Vec::new();
        for (t, skew, arm) in plan.settings(task.key) {
            everything.extend(report.finals(t, skew, arm)?);
        }
        let base = stat(&everything.iter().filter_map(|r| r.base).collect::<Vec<_>>());
        writeln!(
            out,
            "Bounds: the base alone **{}%**; centralized LoRA at rank {max_rank} on the pooled device data, same sample \
             budget, learning rate {}: **{}%** ({} seeds). Gain recovered G = (accuracy − base) / (centralized − base).\n",
            percent(&base),
            report.learning_rate(task.key, None, Arm::Centralized(max_rank)),
            percent(&central_acc),
            central_acc.as_ref().map_or(0, |s| s.n),
        )?;
        if plan.centralized_ranks().len() > 1 {
            writeln!(out, "Centralized rank sweep (what a rank buys with all the data; test accuracy %):\n")?;
            writeln!(out, "| rank | lr | accuracy (%) | seeds |\n|---|---|---|---|")?;
            for rank in plan.centralized_ranks() {
                let runs = report.finals(task.key, None, Arm::Centralized(rank))?;
                let acc = stat(&runs.iter().filter_map(Run::max_rank_accuracy).collect::<Vec<_>>());
                writeln!(
                    out,
                    "| {rank} | {} | {} | {} |",
                    report.learning_rate(task.key, None, Arm::Centralized(rank)),
                    percent(&acc),
                    runs.len()
                )?;
            }
            writeln!(out)?;
        }
        let gain = |acc: f64| -> Option<f64> {
            let (b, c) = (base.as_ref()?.mean, central_acc.as_ref()?.mean);
            (c - b > 1e-9).then(|| (acc - b) / (c - b))
        };
        for &skew in &plan.skews {
            writeln!(out, "#### {}\n", skew.title())?;
            writeln!(
                out,
                "| arm | lr | R_max accuracy (%) | fleet mean (%) | G, R_max | G, fleet | worst slice − base (points) | MB up / round | MB down / round | wall (s) | seeds |"
            )?;
            writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|")?;
            let mut curves = Vec::new();
            for arm in plan.arms(skew) {
                let runs = report.finals(task.key, Some(skew), arm)?;
                let rmax: Vec<f64> = runs.iter().filter_map(Run::max_rank_accuracy).collect();
                let fleet: Vec<f64> = runs.iter().filter_map(|r| r.fleet_accuracy(arm, &plan.fleet)).collect();
                let worst: Vec<f64> =
                    runs.iter().filter_map(|r| Some(100.0 * (r.worst_slice(arm, &plan.fleet)? - r.base?))).collect();
                let mean_of = |f: fn(&Run) -> f64| runs.iter().map(f).sum::<f64>() / runs.len().max(1) as f64;
                let or_dash = |text: String| if runs.is_empty() { "—".to_string() } else { text };
                let g_rmax = stat(&rmax.iter().filter_map(|&a| gain(a)).collect::<Vec<_>>());
                let g_fleet = stat(&fleet.iter().filter_map(|&a| gain(a)).collect::<Vec<_>>());
                let worst = stat(&worst);
                writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    arm.label(),
                    report.learning_rate(task.key, Some(skew), arm),
                    percent(&stat(&rmax)),
                    if arm.is_heterogeneous() { percent(&stat(&fleet)) } else { "(= R_max)".into() },
                    ratio(&g_rmax),
                    if arm.is_heterogeneous() { ratio(&g_fleet) } else { "".into() },
                    worst.as_ref().map_or("—".into(), |s| format!("{:+.1} ± {:.1}", s.mean, s.sd)),
                    or_dash(format!("{:.2}", mean_of(|r| r.upload_bytes_per_round) / 1e6)),
                    or_dash(format!("{:.2}", mean_of(|r| r.download_bytes_per_round) / 1e6)),
                    or_dash(format!("{:.0}", mean_of(|r| r.wall_seconds))),
                    runs.len()
                )?;
                if arm.is_heterogeneous() && !runs.is_empty() {
                    let length = runs.iter().map(|r| r.accuracy_curve().len()).min().unwrap_or(0);
                    let curve = (0..length)
                        .map(|i| runs.iter().map(|r| r.accuracy_curve()[i]).sum::<f64>() / runs.len() as f64)
                        .collect();
                    curves.push((arm.label(), curve));
                }
            }
            if !curves.is_empty() {
                let name = format!("{}-{}-{}.svg", plan.suite, task.key, skew.key());
                crate::report::draw(
                    &figures_dir.join(&name),
                    &format!("{}: R_max test accuracy, {}, mean over seeds", task.title, skew.title()),
                    &curves,
                )?;
                writeln!(out, "\n![{}, {}]({figures_link}/{name})", task.title, skew.title())?;
            }
            writeln!(out)?;
            writeln!(out, "Per-rank slices (test accuracy %, mean over seeds of the last {LAST_ROUNDS} rounds):\n")?;
            write!(out, "| method |")?;
            for &(_, rank, _) in &plan.fleet {
                write!(out, " rank {rank} |")?;
            }
            writeln!(out)?;
            writeln!(out, "|---|{}", "---|".repeat(plan.fleet.len()))?;
            for arm in plan.arms(skew).into_iter().filter(|a| a.is_heterogeneous()) {
                let runs = report.finals(task.key, Some(skew), arm)?;
                write!(out, "| {} |", arm.label())?;
                for &(_, rank, _) in &plan.fleet {
                    let values: Vec<f64> = runs.iter().filter_map(|r| r.rank_accuracy(rank)).collect();
                    write!(out, " {} |", percent(&stat(&values)))?;
                }
                writeln!(out)?;
            }
            writeln!(out)?;
        }
        writeln!(out, "Tuning (validation score per learning rate, seed 1):\n")?;
        writeln!(
            out,
            "| setting | {} | chosen |",
            plan.learning_rates.iter().map(|l| format!("lr {l}")).collect::<Vec<_>>().join(" | ")
        )?;
        writeln!(out, "|---|{}---|", "---|".repeat(plan.learning_rates.len()))?;
        for (t, skew, arm) in plan.settings(task.key) {
            let Some((best, scores)) = report.chosen.get(&plan.setting_key(t, skew, arm)) else { continue };
            let setting = match skew {
                None => arm.label(),
                Some(skew) => format!("{}, {}", skew.title(), arm.label()),
            };
            let cells = scores.iter().map(|(_, s)| format!("{:.1}", 100.0 * s)).collect::<Vec<_>>().join(" | ");
            writeln!(out, "| {setting} | {cells} | {best} |")?;
        }
        writeln!(out)?;
    }
    writeln!(out, "{}", plan.end_marker())?;
    Ok(out)
}

/// Runs what is missing, task by task (tuning, then the finals it unlocks), and rewrites the
/// report.
pub fn run(plan: &Plan, setup: &Setup, doc: &Path, only: &[String], report_only: bool) -> Result<()> {
    let results_dir = setup.work.join("results");
    std::fs::create_dir_all(&results_dir)?;
    let mut failed = Vec::new();
    if !report_only {
        setup.provision(plan.fleet_size())?;
        for task in &plan.tasks {
            prepare_data(task, &setup.work)?;
        }
        let selected = |cell: &Cell| only.is_empty() || only.iter().any(|o| plan.cell_key(cell).contains(o.as_str()));
        let run_all = |cells: Vec<Cell>, failed: &mut Vec<String>| -> Result<()> {
            let cells: Vec<Cell> = cells.into_iter().filter(|c| selected(c)).collect();
            for (i, cell) in cells.iter().enumerate() {
                let key = plan.cell_key(cell);
                let cached = results_dir.join(format!("{key}.json"));
                if cached.exists() {
                    continue;
                }
                eprintln!("[{}/{}] {key} ...", i + 1, cells.len());
                match run_cell(plan, cell, setup) {
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
                        let tmp = cached.with_extension("json.tmp");
                        std::fs::write(&tmp, serde_json::to_vec(&record)?)?;
                        std::fs::rename(&tmp, &cached)?;
                    }
                    Err(error) => {
                        eprintln!("[{}/{}] {key} failed: {error:#}", i + 1, cells.len());
                        failed.push(key);
                    }
                }
            }
            Ok(())
        };
        for task in &plan.tasks {
            run_all(plan.tuning_cells(task.key), &mut failed)?;
            let chosen = choose(plan, &results_dir)?;
            run_all(plan.final_cells(task.key, &chosen), &mut failed)?;
        }
    }
    let doc_dir: PathBuf = doc.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let block = markdown(plan, &results_dir, "figures/study", &doc_dir.join("figures/study"))?;
    crate::report::write_block(doc, &plan.begin_marker(), &plan.end_marker(), &block)?;
    eprintln!("wrote {}", doc.display());
    anyhow::ensure!(failed.is_empty(), "{} cell(s) failed (rerun to retry them): {}", failed.len(), failed.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plans_tune_every_setting_then_run_its_seeds_at_the_chosen_rate() {
        let plan = Plan::text();
        let settings = plan.settings("bbc");
        // The centralized reference, and under each of 2 skews 7 methods and 4 homogeneous fleets.
        assert_eq!(settings.len(), 1 + 2 * (7 + 4));
        let tuning = plan.tuning_cells("bbc");
        assert_eq!(tuning.len(), settings.len() * plan.learning_rates.len());
        let mut keys: Vec<String> = tuning.iter().map(|c| plan.cell_key(c)).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), tuning.len());
        // Keys the first text runs were cached under.
        assert!(keys.contains(&"bbc-tune-pooled-centralized-lr0.001-seed1".to_string()));
        assert!(keys.contains(&"bbc-tune-alpha1-fedavg-all-r2-lr0.003-seed1".to_string()));
        let mut chosen = Chosen::new();
        chosen.insert(plan.setting_key("bbc", Some(Skew::labels(1.0)), Arm::Method("rbla")), (3e-3, Vec::new()));
        let finals = plan.final_cells("bbc", &chosen);
        assert_eq!(finals.len(), 3);
        assert!(finals.iter().all(|c| c.phase == Phase::Final && c.learning_rate == 3e-3));
        assert_eq!(profile_mix(&plan, Arm::Homogeneous(8)), "phone:8=3,phone:8=3,laptop:8=3,desktop:8=3");
        assert_eq!(plan.fleet_size(), 12);

        let image = Plan::image_shift();
        assert_eq!(image.max_rank(), 64);
        assert_eq!(image.fleet_size(), 18);
        // The sweep's 6 ranks (R_max among them); under 2 label skews 7 methods and 6 homogeneous
        // fleets; under the shrinking-data skew the 7 methods.
        assert_eq!(image.settings("fashion-rot90").len(), 6 + 2 * (7 + 6) + 7);
        let share = Cell {
            task: "fashion-rot90",
            phase: Phase::Tune,
            skew: Some(Skew { alpha: 1.0, share_power: 0.5 }),
            arm: Arm::Centralized(8),
            learning_rate: 0.005,
            seed: 1,
        };
        assert_eq!(image.cell_key(&share), "fashion-rot90-tune-alpha1-share0.5-centralized-r8-lr0.005-seed1");
    }

    #[test]
    fn scores_average_the_last_rounds_and_the_fleet_sees_its_own_slices() {
        let fleet = Plan::text().fleet;
        let summary = serde_json::json!({
            "initial_evaluation": [{"rank": 16, "accuracy": 0.2}],
            "max_rank": 16,
            "rounds": (1..=4).map(|r| serde_json::json!({
                "round": r, "update_bytes": 10, "task_bytes": 30,
                "evaluation": [
                    {"rank": 2, "accuracy": 0.5}, {"rank": 4, "accuracy": 0.6},
                    {"rank": 8, "accuracy": 0.7}, {"rank": 16, "accuracy": 0.1 * f64::from(r)},
                ],
            })).collect::<Vec<_>>(),
        });
        let run = Run::from_summary(&summary, 5.0).unwrap();
        assert_eq!(run.base, Some(0.2));
        // Rounds 2-4 at R_max: 0.2, 0.3, 0.4.
        assert!((run.max_rank_accuracy().unwrap() - 0.3).abs() < 1e-12);
        let rbla = Arm::Method("rbla");
        let mean = (3.0 * 0.5 + 3.0 * 0.6 + 3.0 * 0.7 + 3.0 * 0.3) / 12.0;
        assert!((run.fleet_accuracy(rbla, &fleet).unwrap() - mean).abs() < 1e-12);
        assert!((run.score(rbla, &fleet).unwrap() - (0.3 + mean) / 2.0).abs() < 1e-12);
        assert!((run.worst_slice(rbla, &fleet).unwrap() - 0.3).abs() < 1e-12);
        assert!((run.score(Arm::Centralized(16), &fleet).unwrap() - 0.3).abs() < 1e-12);
        assert_eq!(run.upload_bytes_per_round, 10.0);
        let no_rmax =
            serde_json::json!({"max_rank": 16, "rounds": [{"round": 1, "evaluation": [{"rank": 2, "accuracy": 0.5}]}]});
        assert!(Run::from_summary(&no_rmax, 1.0).is_err());
        let no_rounds = serde_json::json!({"max_rank": 16, "rounds": []});
        assert!(Run::from_summary(&no_rounds, 1.0).is_err());
    }

    #[test]
    fn the_validation_split_is_stable_and_about_its_share() {
        let keys: Vec<String> = (0..4000).map(|i| format!("business/{i:03}.txt")).collect();
        let held = keys.iter().filter(|k| bucket(k) % 100 < VALIDATION_PERCENT).count();
        assert!((480..720).contains(&held), "{held} of 4000");
        assert_eq!(bucket("a"), bucket("a"));
    }

    #[test]
    fn rotation_by_90_degrees_turns_rows_into_columns() {
        // 3 × 3: 0 1 2 / 3 4 5 / 6 7 8 → clockwise: 6 3 0 / 7 4 1 / 8 5 2.
        let image: Vec<u8> = (0..9).collect();
        assert_eq!(rotate90(&image, 3), vec![6, 3, 0, 7, 4, 1, 8, 5, 2]);
        let four = (0..4).fold(image.clone(), |img, _| rotate90(&img, 3));
        assert_eq!(four, image);
    }
}
