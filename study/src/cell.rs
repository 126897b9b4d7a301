//! Runs one cell of the study through the real system: a coordinator process and a simulator
//! process whose virtual devices connect to it over mutual-TLS QUIC on loopback, each with its
//! own kit, its own Dirichlet shard of Fashion-MNIST and its own rank.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::grid::{fleet_size, profile_mix, Arm, Cell, Plan, MAX_RANK};

pub struct Setup {
    pub bin_dir: PathBuf,
    pub work: PathBuf,
    /// Virtual devices training at once in the simulator.
    pub concurrency: usize,
}

impl Setup {
    pub fn pki(&self) -> PathBuf {
        self.work.join("pki")
    }

    fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Provisions a CA, the coordinator and `devices` device kits, once per work directory.
    pub fn provision(&self, devices: u32) -> Result<()> {
        let pki = self.pki();
        if pki.join("kits/coordinator/cert.pem").exists() {
            return Ok(());
        }
        let certs = |args: &[&str]| -> Result<()> {
            let output = Command::new(self.binary("flotilla-certs"))
                .arg("--dir")
                .arg(&pki)
                .args(args)
                .output()
                .with_context(|| format!("cannot run {}", self.binary("flotilla-certs").display()))?;
            if !output.status.success() {
                bail!("flotilla-certs {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
            }
            Ok(())
        };
        certs(&["init", "--name", "Flotilla study CA"])?;
        certs(&["issue", "coordinator", "--name", "localhost"])?;
        certs(&["issue", "devices", "--prefix", "device", "--count", &devices.to_string()])?;
        Ok(())
    }
}

/// The sections of a coordinator configuration every study run has: where it listens and writes,
/// its TLS kit, its rounds and its aggregation. Each edition appends its own keys to `[round]` and
/// `[aggregation]` (`round_extra`, `aggregation_extra`) and its own sections after.
pub struct RunBasics<'a> {
    pub run_dir: &'a Path,
    pub pki: &'a Path,
    pub rounds: u32,
    pub devices: u32,
    pub deadline_secs: u32,
    pub local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub method: &'a str,
    pub max_rank: u32,
    pub lora_alpha: f64,
    pub round_extra: String,
    pub aggregation_extra: String,
}

impl RunBasics<'_> {
    pub fn toml(&self) -> String {
        format!(
            r#"[server]
listen = "127.0.0.1:0"
run_dir = "{run_dir}"
address_file = "{run_dir}/coordinator.addr"

[tls]
kit = "{pki}/kits/coordinator"

[round]
rounds = {rounds}
min_devices = {devices}
deadline_secs = {deadline_secs}
local_steps = {local_steps}
batch_size = {batch_size}
learning_rate = {learning_rate}
{round_extra}
[aggregation]
method = "{method}"
max_rank = {max_rank}
lora_alpha = {lora_alpha}
{aggregation_extra}"#,
            run_dir = self.run_dir.display(),
            pki = self.pki.display(),
            rounds = self.rounds,
            devices = self.devices,
            deadline_secs = self.deadline_secs,
            local_steps = self.local_steps,
            batch_size = self.batch_size,
            learning_rate = self.learning_rate,
            round_extra = self.round_extra,
            method = self.method,
            max_rank = self.max_rank,
            lora_alpha = self.lora_alpha,
            aggregation_extra = self.aggregation_extra,
        )
    }
}

fn coordinator_config(plan: &Plan, cell: &Cell, setup: &Setup, data: &Path, run_dir: &Path) -> String {
    let pki = setup.pki();
    let basics = RunBasics {
        run_dir,
        pki: &pki,
        rounds: plan.rounds(cell.participation),
        devices: fleet_size(),
        deadline_secs: 900,
        local_steps: plan.local_steps,
        batch_size: plan.batch_size,
        learning_rate: plan.learning_rate,
        method: cell.arm.method(),
        max_rank: MAX_RANK,
        lora_alpha: plan.lora_alpha,
        round_extra: format!("min_participants = 1\nfraction = {}\n", cell.participation.fraction()),
        aggregation_extra: format!("ablation_shrink_to_round_rank = {}\n", cell.arm == Arm::RblaShrinkingGlobal),
    };
    basics.toml()
        + &format!(
            r#"
[evaluation]
test_data = "{data}"
skip_samples = {pretrain_samples}

[model]
seed = {seed}
[model.pretrain]
data = "{data}"
samples = {pretrain_samples}
steps = {pretrain_steps}
batch_size = 64
learning_rate = 0.002
[model.architecture.mlp]
input = 784
hidden = [128, 64]
classes = 10
"#,
            data = data.display(),
            pretrain_samples = plan.pretrain_samples,
            pretrain_steps = plan.pretrain_steps,
            seed = cell.seed,
        )
}

/// Kills a child process when dropped (a failed cell leaves nothing running).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Guard {
    fn wait(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Runs `cell` of the Fashion-MNIST study; returns the coordinator's `summary.json` and the wall time.
pub fn run(plan: &Plan, cell: &Cell, setup: &Setup, data: &Path) -> Result<(serde_json::Value, f64)> {
    let mut sim_args: Vec<std::ffi::OsString> = vec!["--clients".into(), fleet_size().to_string().into()];
    sim_args.extend(["--profile-mix".into(), profile_mix(cell.arm).into(), "--data".into(), data.into()]);
    sim_args.extend(["--partition".into(), format!("dirichlet:{}", cell.alpha).into()]);
    sim_args.extend(["--partition-seed".into(), cell.seed.to_string().into()]);
    run_processes(
        setup,
        &cell.key(),
        |run_dir| coordinator_config(plan, cell, setup, data, run_dir),
        &sim_args,
        fleet_size() as usize,
    )
}

/// Runs one study run in `<work>/cells/<key>/`: a coordinator with the config `config` writes for
/// its run directory, and a simulator with `sim_args` (after its kits and coordinator address) for
/// `devices` devices. Returns the coordinator's `summary.json` and the wall time.
pub fn run_processes(
    setup: &Setup,
    key: &str,
    config: impl FnOnce(&Path) -> String,
    sim_args: &[std::ffi::OsString],
    devices: usize,
) -> Result<(serde_json::Value, f64)> {
    // Fewer devices than training slots (a centralized run) give each device more libtorch threads.
    let workers = setup.concurrency.min(devices).max(1);
    let threads = (setup.concurrency / workers).max(1);
    let (run_dir, config_path) = fresh_run_dir(setup, key, config)?;

    let started = Instant::now();
    let coordinator_log = run_dir.join("logs/coordinator.log");
    let mut coordinator = Guard(
        Command::new(setup.binary("flotilla-coordinator"))
            .args(["--log-format", "json", "serve", "--config"])
            .arg(&config_path)
            .stdout(File::create(run_dir.join("summary.txt"))?)
            .stderr(File::create(&coordinator_log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", setup.binary("flotilla-coordinator").display()))?,
    );
    let address_file = run_dir.join("coordinator.addr");
    let address = loop {
        if let Ok(address) = std::fs::read_to_string(&address_file) {
            if !address.trim().is_empty() {
                break address.trim().to_string();
            }
        }
        if let Some(status) = coordinator.0.try_wait()? {
            bail!("the coordinator stopped before listening ({status}):\n{}", tail(&coordinator_log));
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the coordinator did not start listening within 10 minutes:\n{}", tail(&coordinator_log));
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    let sim_log = run_dir.join("logs/sim.log");
    let mut sim = Guard(
        Command::new(setup.binary("flotilla-edge"))
            .args(["--log-format", "json", "sim", "--coordinator", &address, "--kits"])
            .arg(setup.pki().join("kits"))
            .args(sim_args)
            .args(["--concurrency", &workers.to_string(), "--threads", &threads.to_string()])
            .stdout(Stdio::null())
            .stderr(File::create(&sim_log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", setup.binary("flotilla-edge").display()))?,
    );

    let status = coordinator.wait(Duration::from_secs(4 * 3600))?;
    let wall_seconds = started.elapsed().as_secs_f64();
    match status {
        Some(status) if status.success() => {}
        Some(status) => bail!("the coordinator failed ({status}):\n{}", tail(&coordinator_log)),
        None => bail!("the coordinator did not finish within 4 hours:\n{}", tail(&coordinator_log)),
    }
    match sim.wait(Duration::from_secs(60))? {
        Some(status) if status.success() => {}
        other => bail!("the simulator did not finish cleanly ({other:?}):\n{}", tail(&sim_log)),
    }
    Ok((read_summary(&run_dir)?, wall_seconds))
}

/// Runs centralized full fine-tuning in `<work>/cells/<key>/`: `flotilla-coordinator finetune-full`
/// with the config `config` writes, on the pooled training data in `train_data`. No devices.
/// Returns its `summary.json` and the wall time.
pub fn run_full_finetune(
    setup: &Setup,
    key: &str,
    config: impl FnOnce(&Path) -> String,
    train_data: &Path,
) -> Result<(serde_json::Value, f64)> {
    let (run_dir, config_path) = fresh_run_dir(setup, key, config)?;
    let started = Instant::now();
    let log = run_dir.join("logs/coordinator.log");
    let mut process = Guard(
        Command::new(setup.binary("flotilla-coordinator"))
            .args(["--log-format", "json", "finetune-full", "--config"])
            .arg(&config_path)
            .arg("--data")
            .arg(train_data)
            .stdout(File::create(run_dir.join("summary.txt"))?)
            .stderr(File::create(&log)?)
            .spawn()
            .with_context(|| format!("cannot start {}", setup.binary("flotilla-coordinator").display()))?,
    );
    match process.wait(Duration::from_secs(4 * 3600))? {
        Some(status) if status.success() => {}
        Some(status) => bail!("full fine-tuning failed ({status}):\n{}", tail(&log)),
        None => bail!("full fine-tuning did not finish within 4 hours:\n{}", tail(&log)),
    }
    Ok((read_summary(&run_dir)?, started.elapsed().as_secs_f64()))
}

/// An empty `<work>/cells/<key>/` (with `logs/`) holding the coordinator configuration `config`
/// writes for it; returns the directory and the configuration's path.
fn fresh_run_dir(setup: &Setup, key: &str, config: impl FnOnce(&Path) -> String) -> Result<(PathBuf, PathBuf)> {
    let run_dir = setup.work.join("cells").join(key);
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).with_context(|| format!("cannot clear {}", run_dir.display()))?;
    }
    std::fs::create_dir_all(run_dir.join("logs"))?;
    let run_dir = run_dir.canonicalize()?;
    let config_path = run_dir.join("coordinator.toml");
    std::fs::write(&config_path, config(&run_dir))?;
    Ok((run_dir, config_path))
}

fn read_summary(run_dir: &Path) -> Result<serde_json::Value> {
    let summary_path = run_dir.join("summary.json");
    serde_json::from_slice(
        &std::fs::read(&summary_path).with_context(|| format!("cannot read {}", summary_path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", summary_path.display()))
}
