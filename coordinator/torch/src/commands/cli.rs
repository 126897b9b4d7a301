//! The command line of `flotilla-coordinator-torch` (run as `flotilla-coordinator` through the
//! front end): `serve`, `check`, `status`, `export`, `classify`, `generate`, `finetune-full`, and `aggregate` on the
//! libtorch path.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use flotilla_coordinator::aggregate::AggregateArgs;

use crate::{
    commands::aggregate, commands::check, commands::export, commands::finetune_full, config, model::evaluation,
    model::hf_model, records::report, serve::metrics, serve::setup,
};

/// Runs federated LoRA fine-tuning rounds for a fleet of devices over mutual-TLS QUIC, merging
/// updates of different ranks (Fold-and-Fill by default; RBLA, FLoRA and the others by name) into
/// one global adapter.
#[derive(Parser)]
#[command(name = "flotilla-coordinator", version)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"], env = "FLOTILLA_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve rounds until the configured number is done, then write the summary and exit.
    Serve {
        /// TOML configuration file (sections: server, tls, transport, limits, round, aggregation, model).
        #[arg(long, env = "FLOTILLA_CONFIG")]
        config: PathBuf,
        /// Override `server.listen`.
        #[arg(long, env = "FLOTILLA_LISTEN")]
        listen: Option<SocketAddr>,
        /// Override `server.run_dir`.
        #[arg(long, env = "FLOTILLA_RUN_DIR")]
        run_dir: Option<PathBuf>,
        /// Override `server.address_file`.
        #[arg(long)]
        address_file: Option<PathBuf>,
        /// Start at round 1 even if the run directory holds checkpoints (they are moved aside to
        /// `global.before-<time>/`, never deleted). Without it, a run resumes after its last
        /// finished round.
        #[arg(long)]
        fresh: bool,
        /// Train nothing: once [round] min_devices have joined, ask them to score the run
        /// directory's last checkpoint (or --round N's) on their held-out data
        /// ([federated_evaluation]), record it with that round and exit.
        #[arg(long)]
        evaluate_only: bool,
        /// With --evaluate-only: the round whose checkpoint is scored.
        #[arg(long, requires = "evaluate_only")]
        round: Option<u32>,
    },
    /// Check a configuration as `serve` would use it (environment overrides included): the
    /// settings, the TLS kit and CRL, the renewal CA, and that the run directory is writable.
    /// Exit status 1 with every problem found.
    Check {
        #[arg(long)]
        config: PathBuf,
        /// The fleet's ranks, one per device (e.g. 2,4,8,16): under [secure_aggregation], says
        /// which rank slots too few of them hold to ever be revealed.
        #[arg(long, value_delimiter = ',')]
        fleet: Vec<u32>,
    },
    /// Show a running coordinator's state (round, phase, devices) from its metrics port.
    Status {
        /// The coordinator's `[metrics] listen` address.
        #[arg(long, env = "FLOTILLA_METRICS_ADDRESS")]
        address: SocketAddr,
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// Export a finished round's global adapter (PEFT layout) and, with --merged, the full model
    /// with the adapter merged into the base (one safetensors file, no LoRA needed to run it).
    Export {
        /// The run's configuration (for its run directory, model and base).
        #[arg(long, env = "FLOTILLA_CONFIG")]
        config: PathBuf,
        /// Output directory: adapter/ (adapter_model.safetensors, adapter_config.json) and, with
        /// --merged, model.safetensors and model.json (a transformer: merged/, an HF model
        /// directory that AutoModelForSequenceClassification loads).
        #[arg(long)]
        out: PathBuf,
        /// Round to export (default: the last finished one).
        #[arg(long)]
        round: Option<u32>,
        /// Slice the adapter to this rank first (default: R_max).
        #[arg(long)]
        rank: Option<u32>,
        #[arg(long)]
        merged: bool,
    },
    /// Label texts with an exported transformer (`export --merged`'s merged/ directory, or any HF
    /// BertForSequenceClassification directory with id2label): one text per line of --input or
    /// stdin.
    Classify {
        /// The model directory (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// A file of texts, one per line (default: stdin).
        #[arg(long)]
        input: Option<PathBuf>,
        /// `text`: label, probability and the text's start per line; `json`: one JSON object per
        /// line with the label, its probability and the logits.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
        /// Tokens per text, 1 to the model's positions (default: the fine-tuning's maximum length).
        #[arg(long)]
        max_length: Option<u32>,
        /// Texts per forward pass (at least 1).
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
    },
    /// Write text with a decoder: an exported model (`export --merged`'s merged/ directory) or a
    /// decoder run's checkpoint. Prompts from --prompt, or one per line of --input or stdin (JSON
    /// lines give their "prompt"); each in the model's chat template unless --raw; greedy decoding.
    Generate(crate::commands::generate::GenerateArgs),
    /// Centralized full fine-tuning, the bound above LoRA: trains every weight of the configured
    /// model on the pooled training data in --data, on the configuration's round schedule, evaluates
    /// as `serve` does, and writes <run_dir>/summary.json. No devices, no network.
    FinetuneFull {
        #[arg(long, env = "FLOTILLA_CONFIG")]
        config: PathBuf,
        /// Training data: a directory of labelled texts (a transformer) or an MNIST-style directory.
        #[arg(long)]
        data: PathBuf,
    },
    /// Merge PEFT adapters from disk (one directory per client, with adapter_model.safetensors whose
    /// metadata holds `num_samples`, and adapter_config.json) into OUT_DIR.
    Aggregate(AggregateArgs),
}

/// `check`: everything `serve` needs before it listens, each problem reported, nothing written.
fn check(path: &std::path::Path, fleet: &[u32]) -> anyhow::Result<()> {
    let config = config::CoordinatorConfig::load(path)?;
    let problems = check::problems(&config);
    // Relative paths resolve against the working directory: say where this one is.
    let run_dir = std::path::absolute(&config.server.run_dir).unwrap_or_else(|_| config.server.run_dir.clone());
    if !problems.is_empty() {
        anyhow::bail!("{} problem(s) in {}:\n  {}", problems.len(), path.display(), problems.join("\n  "));
    }
    println!(
        "{}: OK — QUIC on {}, metrics on {}, run directory {}, {} rounds of {} at R_max {}, online renewal {}",
        path.display(),
        config.server.listen,
        config.metrics.listen.map(|a| a.to_string()).unwrap_or_else(|| "(off)".into()),
        run_dir.display(),
        config.round.rounds,
        config.aggregation.method,
        config.aggregation.max_rank,
        if config.renewal.pki.is_some() { "on" } else { "off" }
    );
    if let Some(privacy) = &config.privacy {
        let budget = privacy.budget(config.round.fraction, config.round.rounds)?;
        let allowed = budget.rounds_allowed();
        println!(
            "privacy: clip {}, noise multiplier {}, sampling rate {}: ε = {:.3} at δ = {} after round 1, {:.3} \
             after round {allowed}; the budget ε = {} pays for {allowed} of the {} configured rounds",
            privacy.clip_norm,
            privacy.noise_multiplier,
            config.round.fraction,
            budget.epsilon_at(1),
            privacy.delta,
            budget.epsilon_at(allowed),
            privacy.epsilon,
            config.round.rounds
        );
        if let Some(plan) = crate::config::privacy_plan::PrivacyPlan::of(&config)? {
            println!("{}", plan.describe());
            if let Some(warning) = plan.warning() {
                println!("{warning}");
            }
        }
    }
    if let Some(federated) = &config.federated_evaluation {
        let secure = config.secure_aggregation.is_some();
        println!("{}", federated.describe(config.round.rounds, config.round.deadline_secs, secure));
    }
    if let Some(secure) = &config.secure_aggregation {
        let parameters = secure.parameters_for(secure.max_participants)?;
        let quantizer = flotilla_secagg::quantize::Quantizer::new(&parameters);
        println!(
            "secure aggregation: each device shares its secrets with {} neighbours, {} of which rebuild them; \
             values clipped to ±{} and quantized in steps of {:.2e}; a sum of {} devices is within {:.2e}",
            parameters.degree,
            parameters.threshold,
            secure.range,
            1.0 / quantizer.scale(),
            secure.max_participants,
            quantizer.sum_error_bound(secure.max_participants)
        );
        let size = secure.round_size();
        let smallest = secure.parameters_for(config.round.min_devices.max(size.min))?;
        println!(
            "secure aggregation: a round is run with {}–{} devices (a draw outside that sends no task and the \
             round is skipped); warning: a rank slot is revealed only when at least threshold + 1 surviving devices \
             hold it ({} in a round of {} devices): slots that fewer devices' ranks reach are never unmasked and \
             keep their previous global values, so give every rank tier at least {} devices (docs/security.md)",
            size.min,
            size.max,
            smallest.min_holders(),
            config.round.min_devices.max(size.min),
            smallest.min_holders(),
        );
        if !fleet.is_empty() {
            println!("{}", thin_tiers(secure, config.aggregation.max_rank, fleet)?);
        }
    }
    Ok(())
}

/// What secure aggregation reveals of a fleet of `ranks` when every device survives: the slots
/// threshold + 1 of them hold, and a warning with the numbers for the slots they do not.
fn thin_tiers(
    secure: &crate::config::secure::SecureAggregationSection,
    max_rank: u32,
    ranks: &[u32],
) -> anyhow::Result<String> {
    let parameters = secure.parameters_for(ranks.len())?;
    let layout = flotilla_secagg::layout::Layout { shared: 1, per_slot: 1, max_rank };
    let revealed = layout.revealable_rank(ranks.iter().copied(), parameters.min_holders());
    let top = ranks.iter().copied().max().unwrap_or(0).min(max_rank);
    Ok(if revealed >= top {
        format!(
            "secure aggregation: a fleet of ranks {ranks:?} reveals every slot it trains (1–{top}): each has at least \
             {} holders",
            parameters.min_holders()
        )
    } else {
        let holders: Vec<String> = (revealed..top)
            .map(|slot| format!("slot {}: {}", slot + 1, ranks.iter().filter(|&&r| r > slot).count()))
            .collect();
        format!(
            "warning: secure aggregation over a fleet of ranks {ranks:?} (threshold {}) reveals slots 1–{revealed} only; \
             slots {}–{top} have fewer than the {} holders a revealed slot needs ({}) and keep their initial values",
            parameters.threshold,
            revealed + 1,
            parameters.min_holders(),
            holders.join(", ")
        )
    })
}

/// The `flotilla-coordinator-torch` binary.
pub fn main() {
    let cli = Cli::parse();
    flotilla_wire::logging::init(&cli.log_format);
    if let Err(error) = run(cli.command) {
        eprintln!("flotilla-coordinator: {error:#}");
        std::process::exit(1);
    }
}

fn print_export(done: &export::Exported) {
    let folded = match (done.folded_rank, done.tail_folded) {
        (Some(r), true) => format!(
            " (what a Fold-and-Fill device of rank {} runs: its slice plus the rest of the global, folded into its \
             frozen weight, written as a rank-{r} LoRA, as PEFT has no place for the tail)",
            done.rank
        ),
        (Some(r), false) => format!(" (FLoRA's merged update written as a rank-{r} LoRA, as PEFT has no place for it)"),
        (None, _) => String::new(),
    };
    println!(
        "exported round {} at rank {}: adapter in {}{folded}{}",
        done.round,
        done.rank,
        done.adapter_dir.display(),
        done.merged_model.as_ref().map(|p| format!(", merged model in {}", p.display())).unwrap_or_default()
    );
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve { config, listen, run_dir, address_file, fresh, evaluate_only, round } => {
            let mut config = config::CoordinatorConfig::load(&config)?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            if let Some(run_dir) = run_dir {
                config.server.run_dir = run_dir;
            }
            if address_file.is_some() {
                config.server.address_file = address_file;
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let evaluate_only =
                evaluate_only.then(|| round.map_or(setup::EvaluateOnly::Last, setup::EvaluateOnly::Round));
            let summary = runtime.block_on(setup::serve(config, fresh, evaluate_only))?;
            print_summary(&summary);
            completed_a_round(&summary)
        }
        Command::Check { config, fleet } => check(&config, &fleet),
        Command::Export { config, out, round, rank, merged } => {
            let config = config::CoordinatorConfig::load(&config)?;
            let done = export::export(&config, &export::ExportRequest { out, round, rank, merged })?;
            print_export(&done);
            Ok(())
        }
        Command::Status { address, format } => {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let status = runtime.block_on(fetch_status(address))?;
            print_status(&status, &format)
        }
        Command::Classify { model, input, format, max_length, batch_size } => {
            let classifier = hf_model::Classifier::load(&model, max_length)?;
            let texts = hf_model::read_texts(input.as_ref())?;
            for verdict in classifier.classify(&texts, batch_size)? {
                if format == "json" {
                    println!("{}", serde_json::to_string(&verdict)?);
                } else {
                    let start: String = verdict.text.chars().take(60).collect();
                    println!("{}\t{:.3}\t{start}", verdict.label, verdict.probability);
                }
            }
            Ok(())
        }
        Command::Generate(args) => crate::commands::generate::run(&args),
        Command::FinetuneFull { config, data } => finetune_full(&config, &data),
        Command::Aggregate(args) => {
            let report = aggregate::aggregate(&args)?;
            flotilla_coordinator::aggregate::print_summary(args.method, &args.out, &report);
            Ok(())
        }
    }
}

/// `finetune-full`: the centralized full fine-tuning bound, and its last accuracy.
fn finetune_full(config: &std::path::Path, data: &std::path::Path) -> Result<()> {
    let config = config::CoordinatorConfig::load(config)?;
    let summary = finetune_full::run(&config, data)?;
    let last =
        summary["rounds"].as_array().and_then(|r| r.last()).and_then(|r| r["evaluation"][0]["accuracy"].as_f64());
    println!(
        "full fine-tuning: {} rounds, final accuracy {}; summary in {}",
        summary["rounds_completed"],
        last.map_or("—".into(), |a| format!("{:.1}%", 100.0 * a)),
        config.server.run_dir.join("summary.json").display()
    );
    Ok(())
}

/// GET /status over plain HTTP/1.1 (the metrics port never speaks TLS); the reply is bounded.
async fn fetch_status(address: SocketAddr) -> Result<metrics::Status> {
    use anyhow::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream.write_all(b"GET /status HTTP/1.1\r\nHost: flotilla\r\nConnection: close\r\n\r\n").await?;
        let mut response = Vec::new();
        stream.take(1 << 20).read_to_end(&mut response).await?;
        std::io::Result::Ok(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), request)
        .await
        .with_context(|| format!("{address}: no answer within 10 s"))?
        .with_context(|| format!("cannot reach the coordinator's metrics port at {address}"))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").with_context(|| format!("{address}: not an HTTP response"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{address}: {}", head.lines().next().unwrap_or(""));
    serde_json::from_str(body).with_context(|| format!("{address}: unexpected /status reply"))
}

/// Rounds ran and none completed: the run produced nothing, whatever else went right.
fn completed_a_round(summary: &report::RunSummary) -> Result<()> {
    if summary.rounds_completed == 0 && !summary.skipped.is_empty() {
        let reasons: Vec<String> =
            summary.skipped.iter().take(3).map(|s| format!("round {}: {}", s.round, s.reason)).collect();
        anyhow::bail!(
            "the run completed no round: all {} were skipped ({}{})",
            summary.skipped.len(),
            reasons.join("; "),
            if summary.skipped.len() > 3 { "; …" } else { "" }
        );
    }
    Ok(())
}

/// `status`: the coordinator's `/status` as JSON, or in a few lines.
fn print_status(status: &crate::serve::metrics::Status, format: &str) -> Result<()> {
    if format == "json" {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        let ranks: Vec<String> =
            status.participants_by_rank.iter().map(|(rank, n)| format!("{n}×rank {rank}")).collect();
        println!(
            "round {}/{} ({}), {} completed; method {} (R_max {}); {} device(s) connected; in this round: {}",
            status.round,
            status.rounds_total,
            status.phase,
            status.rounds_completed,
            status.method,
            status.max_rank,
            status.devices_connected,
            if ranks.is_empty() { "none".to_string() } else { ranks.join(", ") }
        );
        if let Some(federated) = &status.federated_evaluation {
            let overall = federated.overall.as_ref();
            println!(
                "federated evaluation of model {}: {} of {} device(s) reported{}",
                federated.model_round,
                federated.reported,
                federated.asked,
                overall.map_or(String::new(), |o| format!(
                    ", {:.1}% on {} held-out examples",
                    o.accuracy * 100.0,
                    o.examples
                ))
            );
        }
    }
    Ok(())
}

fn print_summary(summary: &report::RunSummary) {
    println!(
        "run finished: {} round(s) with {} (R_max {})",
        summary.rounds_completed, summary.method, summary.max_rank
    );
    let mut all_ranks: Vec<usize> = summary
        .rounds
        .iter()
        .flat_map(|r| r.evaluation.iter().map(|e| e.rank))
        .chain(summary.initial_evaluation.iter().map(|r| r.rank))
        .collect();
    all_ranks.sort_unstable_by(|a, b| b.cmp(a));
    all_ranks.dedup();
    if crate::records::decoder_summary::is_decoder_run(summary) {
        crate::records::decoder_summary::lines(summary).iter().for_each(|line| println!("{line}"));
        crate::records::federated_summary::lines(summary).iter().for_each(|line| println!("{line}"));
        if let Some(path) = &summary.final_global {
            println!("global adapter: {}", path.display());
        }
        return;
    }
    if !all_ranks.is_empty() {
        println!();
        println!(
            "test accuracy of the global model on the coordinator's test set (frozen base + global adapter sliced to \
             each rank):"
        );
    }
    let header: Vec<String> = all_ranks.iter().map(|r| format!("{:>8}", format!("rank {r}"))).collect();
    println!("{:>5}  {:>7}  {:<22} {:>10}  {}", "round", "updates", "ranks", "local loss", header.join(" "));
    let cells = |results: &[evaluation::RankAccuracy]| -> String {
        all_ranks
            .iter()
            .map(|rank| match results.iter().find(|r| r.rank == *rank) {
                Some(r) => format!("{:>7.1}%", r.accuracy * 100.0),
                None => format!("{:>8}", "-"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    if !summary.initial_evaluation.is_empty() {
        println!("{:>5}  {:>7}  {:<22} {:>10}  {}", "base", "-", "-", "-", cells(&summary.initial_evaluation));
    }
    for round in &summary.rounds {
        let mut ranks: Vec<u32> = round.updates.iter().map(|u| u.rank).collect();
        ranks.sort_unstable();
        let ranks: Vec<String> = ranks.iter().map(u32::to_string).collect();
        let loss =
            crate::records::report::mean_local_loss(&round.updates).map_or("-".to_string(), |l| format!("{l:.4}"));
        println!(
            "{:>5}  {:>7}  {:<22} {:>10}  {}",
            round.round,
            round.updates.len(),
            ranks.join(","),
            loss,
            cells(&round.evaluation)
        );
    }
    if let Some(line) = per_class_line(summary) {
        println!("{line}");
    }
    crate::records::federated_summary::lines(summary).iter().for_each(|line| println!("{line}"));
    if let Some(path) = &summary.final_global {
        println!("global adapter: {}", path.display());
    }
}

/// The last evaluated model's per-class accuracy at R_max, and its macro-F1.
fn per_class_line(summary: &report::RunSummary) -> Option<String> {
    let (round, results) = summary
        .rounds
        .iter()
        .rev()
        .find(|r| !r.evaluation.is_empty())
        .map(|r| (format!("round {}", r.round), &r.evaluation))
        .or_else(|| {
            (!summary.initial_evaluation.is_empty()).then(|| ("the base".into(), &summary.initial_evaluation))
        })?;
    let at_max = results.iter().find(|r| r.rank == summary.max_rank as usize)?;
    let classes: Vec<String> =
        at_max.per_class.iter().map(|c| format!("{} {:.1}% of {}", c.label, c.accuracy * 100.0, c.count)).collect();
    Some(format!(
        "per class at R_max after {round} (macro-F1 {:.1}%): {}",
        at_max.macro_f1? * 100.0,
        classes.join(", ")
    ))
}
