//! `flotilla-edge`: the device side of Flotilla.

mod backoff;
mod base_cache;
mod base_store;
mod connection_args;
mod evaluation_session;
mod held_adapter;
mod held_out;
mod local_trainer;
mod nvml;
mod privacy_budget;
mod privacy_floor;
mod probe;
mod progress;
mod rank_policy;
mod renewal;
mod secure_pack;
mod secure_session;
mod session;
mod session_context;
mod sim;
mod sim_behaviour;
mod trainer;

use connection_args::{LivenessArgs, RenewalArgs};
use trainer::DataChoice;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use flotilla_torch::data::partition::{PartitionSpec, Scheme};
use flotilla_wire::framing::FrameLimits;
use flotilla_wire::protocol::HardwareProfile;
use flotilla_wire::quic;
use flotilla_wire::tls::{self, KitPaths};

/// Trains LoRA adapters on this device's own data and exchanges rank-tagged updates with a
/// Flotilla coordinator over mutual-TLS QUIC. Data never leaves the device.
#[derive(Parser)]
#[command(name = "flotilla-edge", version)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"], env = "FLOTILLA_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the coordinator's run and train every round until it is finished.
    Run(Box<RunArgs>),
    /// Show this device's hardware, a timed LoRA training step, and the rank the policy picks.
    Probe(ProbeArgs),
    /// Run many virtual devices in this process, each with its own kit and QUIC connection, through
    /// the same session and training code as `run`.
    Sim(SimArgs),
}

/// Where the coordinator is, for `run` and `sim`.
#[derive(clap::Args)]
struct CoordinatorTarget {
    /// Coordinator address (IP:port).
    #[arg(long, env = "FLOTILLA_COORDINATOR")]
    coordinator: SocketAddr,
    /// Name in the coordinator's certificate.
    #[arg(long, default_value = "localhost", env = "FLOTILLA_SERVER_NAME")]
    server_name: String,
}

#[derive(clap::Args)]
struct SimArgs {
    #[command(flatten)]
    target: CoordinatorTarget,
    /// A directory of device kits (e.g. <pki>/kits); the first --clients device kits by id are used.
    #[arg(long)]
    kits: PathBuf,
    /// Number of virtual devices.
    #[arg(long)]
    clients: usize,
    /// The fleet's make-up: class[:rank]=weight, comma-separated (default ranks: phone 2, laptop 8,
    /// desktop 16, gpu 32), e.g. `phone=3,laptop:4=2,gpu=1`.
    #[arg(long, default_value = "phone=2,laptop=1,desktop=1")]
    profile_mix: sim::ProfileMix,
    /// Local data: `synthetic`, `fashion-mnist`, an MNIST-style IDX directory, or for a
    /// transformer `bbc-news`, `rotten-tomatoes` or labelled texts (class folders, CSV, JSONL).
    #[arg(long, default_value = "synthetic")]
    data: String,
    #[command(flatten)]
    base: base_store::BaseArgs,
    /// How the IDX training set is split among the virtual devices: iid, dirichlet:<alpha>, shards:<k>.
    #[arg(long)]
    partition: Option<Scheme>,
    #[arg(long, default_value_t = 1)]
    partition_seed: u64,
    /// Each device keeps (lowest rank of the mix / its rank)^POWER of its part of the data (a
    /// seeded sample): 0 keeps everything; 0.5 or 1 makes devices of higher rank hold less data.
    #[arg(long, default_value_t = 0.0, value_name = "POWER")]
    data_share_by_rank: f64,
    /// Synthetic data: local training samples per device.
    #[arg(long, default_value_t = 512)]
    samples: usize,
    /// Synthetic data: seed of the task shared by all devices.
    #[arg(long, default_value_t = 7)]
    task_seed: u64,
    /// Virtual devices training at the same time (one thread each).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// libtorch threads per training thread.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Connection attempts per device before giving up on transient failures.
    #[arg(long, default_value_t = 8)]
    max_attempts: u32,
    /// How each class's devices behave, e.g. `phone:speed=5,drop=0.1,online=600,offline=60;laptop:speed=2`:
    /// `speed` times slower training, a mean of `online` seconds connected then `offline` seconds
    /// away, a `drop` probability of vanishing mid-training. Default: steady, full-speed devices.
    #[arg(long, default_value = "")]
    behaviour: sim_behaviour::BehaviourMix,
    /// Seeds every device's behaviour draws (with its id), so a rerun behaves the same.
    #[arg(long, default_value_t = 1)]
    behaviour_seed: u64,
    #[command(flatten)]
    liveness: LivenessArgs,
    #[command(flatten)]
    renewal: RenewalArgs,
}

/// What the rank policy weighs: the rank range and the model whose training step is timed.
#[derive(clap::Args, Clone)]
struct PolicyArgs {
    #[arg(long, default_value_t = 1)]
    min_rank: u32,
    #[arg(long, default_value_t = 64)]
    max_rank: u32,
    /// Time this transformer checkpoint (config.json, model.safetensors, tokenizer.json) at
    /// --max-length tokens instead of the MLP below; with `run`, default: --model-dir.
    #[arg(long, conflicts_with = "decoder")]
    transformer: Option<PathBuf>,
    /// Time this decoder's GGUF file (LoRA on q_proj and v_proj) at --max-length tokens; with
    /// `run`, default: the .gguf in --model-dir.
    #[arg(long)]
    decoder: Option<PathBuf>,
    /// Tokens per input when timing a transformer.
    #[arg(long, default_value_t = 64)]
    max_length: u32,
    /// The model to time (an MLP): inputs, hidden layer sizes (comma-separated), classes.
    #[arg(long, default_value_t = 784)]
    input: u32,
    #[arg(long, default_value = "128,64", value_delimiter = ',')]
    hidden: Vec<u32>,
    #[arg(long, default_value_t = 10)]
    classes: u32,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Replace the step-time budget of the class or this device: the milliseconds the adapter may
    /// add to a training step.
    #[arg(long)]
    step_budget_ms: Option<f64>,
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// Device class whose budgets to apply (phone, laptop, desktop, gpu); unset: this device's own.
    #[arg(long)]
    device_class: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    format: String,
}

/// `--rank`: a number, or `auto` to let the probe and the rank policy choose.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RankRequest {
    Auto,
    Fixed(u32),
}

impl std::str::FromStr for RankRequest {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(RankRequest::Auto),
            n => match n.parse::<u32>() {
                Ok(r) if r >= 1 => Ok(RankRequest::Fixed(r)),
                _ => Err(format!("'{text}': expected `auto` or a rank ≥ 1")),
            },
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    target: CoordinatorTarget,
    /// This device's kit directory from `flotilla-certs issue device` (ca.crt, cert.pem, key.pem).
    #[arg(long, env = "FLOTILLA_KIT")]
    kit: PathBuf,
    /// LoRA rank to ask for (the coordinator may lower it): a number, or `auto` to probe this
    /// device (hardware, a timed training step of the --input/--hidden/--classes model) and let the
    /// rank policy choose within --min-rank..--max-rank.
    #[arg(long, default_value = "auto")]
    rank: RankRequest,
    /// Device class reported to the coordinator (phone, laptop, desktop, gpu, ...); with
    /// `--rank auto` a known class's budgets apply instead of this device's own, to emulate it.
    #[arg(long)]
    device_class: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Local data: `synthetic`, `fashion-mnist` (Debian's dataset-fashion-mnist), an MNIST-style
    /// IDX directory (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]), or for a
    /// transformer `bbc-news`, `rotten-tomatoes` (deploy/fetch-text-assets.sh) or labelled texts
    /// (a directory of class folders of .txt files, a CSV or JSONL file with text and label).
    #[arg(long, default_value = "synthetic")]
    data: String,
    #[command(flatten)]
    base: base_store::BaseArgs,
    /// How the IDX training set is split among the trial's devices: iid, dirichlet:<alpha> or shards:<k>.
    #[arg(long)]
    partition: Option<Scheme>,
    /// Number of devices the partition is made for (with --partition).
    #[arg(long, default_value_t = 1)]
    devices: usize,
    /// This device's part of the partition, 0-based (with --partition).
    #[arg(long, default_value_t = 0)]
    device_index: usize,
    /// Seed of the partition; every device of a trial must use the same one.
    #[arg(long, default_value_t = 1)]
    partition_seed: u64,
    /// Synthetic data: local training samples.
    #[arg(long, default_value_t = 512)]
    samples: usize,
    /// Synthetic data: seed of the task; devices of one run must share it.
    #[arg(long, default_value_t = 7)]
    task_seed: u64,
    /// libtorch threads on the training thread.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A decoder's frozen base: `f32` (dequantized at load), or `q4` (its 4-bit projections kept
    /// 4-bit and dequantized per layer, training layer by layer: about half the memory, about 1.4
    /// times the step time; docs/decoder.md).
    #[arg(long, value_enum, default_value_t = trainer::DecoderBase::F32)]
    decoder_base: trainer::DecoderBase,
    /// Connection attempts before giving up on transient failures.
    #[arg(long, default_value_t = 8)]
    max_attempts: u32,
    #[command(flatten)]
    liveness: LivenessArgs,
    #[command(flatten)]
    renewal: RenewalArgs,
    #[command(flatten)]
    floor: privacy_floor::PrivacyFloorArgs,
    #[command(flatten)]
    held_out: held_out::HeldOutArgs,
}

fn main() {
    let cli = Cli::parse();
    // On a terminal, `run` shows a progress bar and only warnings as log lines (RUST_LOG still
    // rules when set); anywhere else, structured logs at info.
    let bar = matches!(cli.command, Command::Run(_))
        && cli.log_format == "text"
        && std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("RUST_LOG").is_none();
    flotilla_wire::logging::init_with_default(&cli.log_format, if bar { "warn" } else { "info" });
    let code = match cli.command {
        Command::Probe(args) => match run_probe(args) {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("flotilla-edge: {error:#}");
                1
            }
        },
        Command::Sim(args) => match run_sim(args) {
            Ok(code) => code,
            Err(error) => {
                eprintln!("flotilla-edge: {error:#}");
                1
            }
        },
        Command::Run(args) => match run(*args, progress::Progress::new(bar)) {
            Ok(()) => 0,
            Err(error) => {
                eprintln!("flotilla-edge: {error:#}");
                match error.downcast_ref::<session::SessionError>() {
                    // 2: refused (certificate, identity, version) — retrying will not help.
                    Some(session::SessionError::Fatal(_)) => 2,
                    // 130: stopped by Ctrl-C (SIGINT), as shells report it.
                    Some(session::SessionError::Stopped(_)) => 130,
                    _ => 1,
                }
            }
        },
    };
    // A training thread may still be inside libtorch (starting up, or stopped mid-step by Ctrl-C
    // or a fatal refusal): end without running libtorch's static destructors under it, which can
    // crash the process after everything has been said. Rust's own exit runs no destructors of
    // live state either, so flushing the standard streams is all that is lost.
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: _exit only ends the process; no Rust state is used after it.
    unsafe { libc::_exit(code) }
}

/// Probes this device (or, with a known `device_class`, applies that class's budgets).
fn probe_with(
    policy: &PolicyArgs,
    device_class: Option<&str>,
    threads: usize,
    decoder_4bit: bool,
) -> Result<probe::ProbeReport> {
    anyhow::ensure!(policy.min_rank >= 1 && policy.min_rank <= policy.max_rank, "need 1 <= --min-rank <= --max-rank");
    anyhow::ensure!(!policy.hidden.is_empty() && policy.hidden.iter().all(|&h| h > 0), "--hidden needs sizes > 0");
    let device_class = device_class.unwrap_or("this-device").to_string();
    let architecture = probe::timed_architecture(&probe::TimedModel {
        transformer: policy.transformer.as_deref(),
        decoder: policy.decoder.as_deref(),
        max_length: policy.max_length,
        input: policy.input,
        hidden: &policy.hidden,
        classes: policy.classes,
    })?;
    probe::probe(&probe::ProbeSettings {
        architecture,
        device_class,
        r_min: policy.min_rank,
        r_max: policy.max_rank,
        threads,
        batch_size: policy.batch_size,
        time_budget: Duration::from_secs(2),
        step_budget_ms: policy.step_budget_ms,
        decoder_4bit,
    })
}

fn run_probe(args: ProbeArgs) -> Result<()> {
    if let Some(class) = args.device_class.as_deref() {
        if probe::class_budgets(class).is_none() {
            anyhow::bail!("unknown device class '{class}' (known: phone, laptop, desktop, gpu)");
        }
    }
    let report = probe_with(&args.policy, args.device_class.as_deref(), args.threads, false)?;
    if args.format == "json" {
        return print_stdout(&format!("{}\n", serde_json::to_string_pretty(&report)?));
    }
    use std::fmt::Write as _;
    let mut out = String::new();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let _ = writeln!(
        out,
        "cpu: {} ({}, {} logical cores, {} physical)",
        report.cpu_model,
        report.cpu_arch,
        report.logical_cores,
        report.physical_cores.map_or("?".into(), |n| n.to_string())
    );
    let _ = writeln!(
        out,
        "memory: {:.0} MiB available of {:.0} MiB{}",
        mib(report.memory_available_bytes),
        mib(report.memory_total_bytes),
        report.cgroup_memory_limit_bytes.map_or(String::new(), |l| format!(" (container limit {:.0} MiB)", mib(l)))
    );
    let _ = writeln!(
        out,
        "cuda: {} ({} device(s)); training on {}",
        report.cuda_available, report.cuda_devices, report.training_device
    );
    for gpu in &report.nvml.gpus {
        let _ = writeln!(
            out,
            "gpu {}: {} — {:.0} MiB free of {:.0} MiB (driver {})",
            gpu.index,
            gpu.name,
            mib(gpu.memory_free_bytes),
            mib(gpu.memory_total_bytes),
            report.nvml.driver_version.as_deref().unwrap_or("?")
        );
    }
    if let Some(reason) = &report.nvml.unavailable {
        let _ = writeln!(out, "nvml: {reason}");
    }
    for (rank, ms) in &report.step_ms {
        let _ = writeln!(out, "training step at rank {rank}: {ms:.2} ms (median)");
    }
    let _ = writeln!(
        out,
        "budgets ({}): memory {:.0} MiB, upload {:.0} MiB per round, the adapter's share of a step {:.0} ms",
        report.device_class,
        mib(report.budgets.memory_bytes),
        mib(report.budgets.upload_bytes),
        report.budgets.step_ms
    );
    let _ = writeln!(out, "{:>5} {:>12} {:>12} {:>9} {:>9}  fits", "rank", "train mem", "upload", "step", "adapter");
    for row in &report.choice.candidates {
        let _ = writeln!(
            out,
            "{:>5} {:>10.2}Mi {:>10.2}Mi {:>7.2}ms {:>7.2}ms  {}",
            row.rank,
            mib(row.training_memory_bytes),
            mib(row.upload_bytes),
            row.step_ms,
            row.adapter_step_ms,
            row.exceeds.map_or("yes".to_string(), |b| format!("no ({b})"))
        );
    }
    let _ = writeln!(out, "chosen rank: {} — {}", report.choice.rank, report.choice.reason);
    print_stdout(&out)
}

/// Writes `text` to standard output; a reader that has gone away (`| head`) is not an error.
fn print_stdout(text: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        written => Ok(written?),
    }
}

/// Ctrl-C once: finish the upload in flight (if any), then stop; twice: stop now.
fn stop_on_ctrl_c() -> tokio::sync::watch::Receiver<session::Stop> {
    let (sender, receiver) = tokio::sync::watch::channel(session::Stop::Running);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        tracing::warn!("interrupted: stopping after the upload in flight, if any (Ctrl-C again to abandon it)");
        let _ = sender.send(session::Stop::AfterUpload);
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("interrupted again: abandoning now");
            let _ = sender.send(session::Stop::Now);
        }
        // Keep the sender alive so sessions can still see the request.
        std::future::pending::<()>().await;
    });
    receiver
}

fn run_sim(args: SimArgs) -> Result<i32> {
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    if args.data == "synthetic" && args.partition.is_some() {
        anyhow::bail!("--partition applies to data on disk (--data fashion-mnist, bbc-news, a directory or a file)");
    }
    sim::check_data_share(args.data_share_by_rank, args.partition.is_some())?;
    let partition =
        args.partition.map(|scheme| PartitionSpec { scheme, devices: args.clients, seed: args.partition_seed });
    let data = DataChoice::parse(&args.data, args.samples, args.task_seed)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let report = runtime.block_on(async {
        sim::run(sim::SimSettings {
            coordinator: args.target.coordinator,
            server_name: args.target.server_name,
            kits: args.kits,
            clients: args.clients,
            mix: args.profile_mix,
            data,
            partition,
            data_share_by_rank: args.data_share_by_rank,
            concurrency: args.concurrency,
            threads: args.threads,
            max_attempts: args.max_attempts,
            transport: args.liveness.transport()?,
            renew_within: args.renewal.window(),
            stop: stop_on_ctrl_c(),
            base_store: args.base.store(),
            behaviour: args.behaviour,
            behaviour_seed: args.behaviour_seed,
        })
        .await
    })?;
    Ok(report.print(args.clients))
}

/// The rank to ask for: `--rank`, or with `--rank auto` the probe's choice (timing the
/// `--transformer` or `--model-dir` checkpoint when there is one, else the MLP).
fn requested_rank(args: &RunArgs) -> Result<u32> {
    Ok(match args.rank {
        RankRequest::Fixed(rank) => rank,
        RankRequest::Auto => {
            // A class name that has budgets is emulated; any other name is only a label.
            let emulated = args.device_class.as_deref().filter(|c| probe::class_budgets(c).is_some());
            let mut policy = args.policy.clone();
            if policy.transformer.is_none() && policy.decoder.is_none() {
                // A decoder's model directory holds its one .gguf file; an encoder's, its files.
                match args.base.model_dir.as_deref().map(trainer::gguf_in) {
                    Some(Ok(gguf)) => policy.decoder = Some(gguf),
                    _ => policy.transformer = args.base.model_dir.clone(),
                }
            }
            let report = probe_with(&policy, emulated, args.threads, args.decoder_base == trainer::DecoderBase::Q4)?;
            tracing::info!(
                rank = report.choice.rank,
                device_class = %report.device_class,
                "rank chosen by the probe: {}",
                report.choice.reason
            );
            report.choice.rank
        }
    })
}

fn run(args: RunArgs, progress: progress::Progress) -> Result<()> {
    let kit = KitPaths::in_dir(&args.kit);
    let device_id = tls::own_device_id(&kit)?;
    let requested_rank = requested_rank(&args)?;

    let choice = DataChoice::parse(&args.data, args.samples, args.task_seed)?;
    let shard = args
        .partition
        .map(|scheme| (PartitionSpec { scheme, devices: args.devices, seed: args.partition_seed }, args.device_index));
    anyhow::ensure!(
        matches!(choice, DataChoice::Synthetic { .. }) || shard.is_none() || args.device_index < args.devices,
        "--device-index {} must be below --devices {}",
        args.device_index,
        args.devices
    );
    let data = choice.for_device(&device_id, shard);
    let trainer = trainer::Trainer::spawn(
        args.threads,
        data,
        args.held_out.choice(),
        args.decoder_base == trainer::DecoderBase::Q4,
    )?;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let transport = args.liveness.transport()?;
        let endpoint = quic::client_endpoint(&kit, &transport)?;
        let settings = session::SessionSettings {
            kit: kit.clone(),
            transport: transport.clone(),
            renew_within: args.renewal.window(),
            coordinator: args.target.coordinator,
            server_name: args.target.server_name,
            device_id: device_id.clone(),
            requested_rank,
            hardware: HardwareProfile {
                device_class: args.device_class.clone().unwrap_or_else(|| "unspecified".into()),
                cpu_cores: std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
                memory_bytes: 0,
                cuda_devices: tch::Cuda::device_count() as u32,
            },
            limits: FrameLimits::default(),
            max_attempts: args.max_attempts,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            stop: stop_on_ctrl_c(),
            progress: progress.clone(),
            base_store: args.base.store(),
            floor: args.floor.floor()?,
            budget: args.floor.budget(&kit)?,
        };
        progress.connecting(&settings.coordinator.to_string());
        tracing::info!(device = %device_id, coordinator = %settings.coordinator, rank = settings.requested_rank, "starting");
        probe::log_torch_devices();
        let outcome = session::run(&endpoint, &trainer, &settings).await;
        // Let the connection's close reach the coordinator before the process ends.
        let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
        let report = outcome?;
        match report.rounds_completed {
            Some(rounds) => {
                println!("device {device_id}: trained {} round(s); run finished after {rounds} round(s)", report.rounds_trained)
            }
            None => println!(
                "device {device_id}: trained {} round(s); the run finished while this device was training",
                report.rounds_trained
            ),
        }
        anyhow::Ok(())
    })
}
