//! `flotilla-coordinator`: the cloud side of Flotilla.

mod aggregation;
mod checkpoint;
mod config;
mod engine;
mod evaluation;
mod metrics;
mod offline;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use flotilla_common::aggregate::Method;

/// Runs federated LoRA fine-tuning rounds for a fleet of devices over mutual-TLS QUIC, merging
/// updates of different ranks (RBLA by default) into one global adapter.
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
    },
    /// Merge PEFT adapters from disk (one directory per client, with adapter_model.safetensors whose
    /// metadata holds `num_samples`, and adapter_config.json) into OUT_DIR.
    Aggregate {
        /// rbla, zero-pad, hetlora, flexlora, flora or fedavg.
        #[arg(long, default_value = "rbla")]
        method: Method,
        /// Output directory (adapter_model.safetensors in f32 + adapter_config.json).
        #[arg(long)]
        out: PathBuf,
        /// Rank of the result (default: the largest input rank). FLoRA's result has rank Σ r_k.
        #[arg(long)]
        max_rank: Option<usize>,
        /// Client adapter directories.
        #[arg(required = true)]
        clients: Vec<PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    flotilla_common::logging::init(&cli.log_format);
    if let Err(error) = run(cli.command) {
        eprintln!("flotilla-coordinator: {error:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Serve { config, listen, run_dir, address_file, fresh } => {
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
            let summary = runtime.block_on(server::serve(config, fresh))?;
            print_summary(&summary);
            Ok(())
        }
        Command::Aggregate { method, out, max_rank, clients } => {
            let report = offline::aggregate(&offline::OfflineRequest { method, out: out.clone(), max_rank, clients })?;
            let ranks: Vec<String> = report.ranks.iter().map(|r| r.to_string()).collect();
            println!(
                "aggregated {} adapters (ranks {}) with {method} → {} (r = {}, lora_alpha = {})",
                report.clients,
                ranks.join(","),
                out.display(),
                report.out_rank,
                report.lora_alpha
            );
            for note in &report.notes {
                println!("note: {note}");
            }
            Ok(())
        }
    }
}

fn print_summary(summary: &server::RunSummary) {
    println!(
        "run finished: {} round(s) with {} (R_max {})",
        summary.rounds_completed, summary.method, summary.max_rank
    );
    println!(
        "{:>5}  {:<16} {:>4} {:>8} {:>11} {:>10} {:>9}",
        "round", "device", "rank", "samples", "loss before", "loss after", "accuracy"
    );
    for round in &summary.rounds {
        for u in &round.updates {
            println!(
                "{:>5}  {:<16} {:>4} {:>8} {:>11.4} {:>10.4} {:>8.1}%",
                round.round,
                u.device,
                u.rank,
                u.num_samples,
                u.metrics.loss_before,
                u.metrics.loss_after,
                u.metrics.accuracy * 100.0
            );
        }
    }
    if !summary.initial_evaluation.is_empty() {
        println!();
        println!("test accuracy of the global model (frozen base + global adapter sliced to each rank):");
        let ranks: Vec<usize> = summary.initial_evaluation.iter().map(|r| r.rank).collect();
        let mut all_ranks: Vec<usize> =
            summary.rounds.iter().flat_map(|r| r.evaluation.iter().map(|e| e.rank)).chain(ranks).collect();
        all_ranks.sort_unstable_by(|a, b| b.cmp(a));
        all_ranks.dedup();
        let header: Vec<String> = all_ranks.iter().map(|r| format!("{:>9}", format!("rank {r}"))).collect();
        println!("{:>7}  {}", "round", header.join(" "));
        let row = |label: String, results: &[evaluation::RankAccuracy]| {
            let cells: Vec<String> = all_ranks
                .iter()
                .map(|rank| match results.iter().find(|r| r.rank == *rank) {
                    Some(r) => format!("{:>8.1}%", r.accuracy * 100.0),
                    None => format!("{:>9}", "-"),
                })
                .collect();
            println!("{label:>7}  {}", cells.join(" "));
        };
        row("base".into(), &summary.initial_evaluation);
        for round in &summary.rounds {
            row(round.round.to_string(), &round.evaluation);
        }
    }
    if let Some(path) = &summary.final_global {
        println!("global adapter: {}", path.display());
    }
}
