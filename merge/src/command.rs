//! `flotilla-coordinator aggregate …` on the fast path: the same arguments and the same summary
//! as the libtorch binary's `aggregate` subcommand.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;

use crate::offline::{merge, Declined, Report, Request, SlotMethod};

/// The arguments of `flotilla-coordinator aggregate`.
#[derive(Parser)]
#[command(name = "flotilla-coordinator aggregate", disable_help_flag = true, disable_version_flag = true)]
struct AggregateArgs {
    #[arg(long, default_value = "rbla")]
    method: String,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    max_rank: Option<usize>,
    /// Accepted (it is a global option of the command) and unused: this path logs nothing.
    #[arg(long)]
    log_format: Option<String>,
    #[arg(required = true)]
    clients: Vec<PathBuf>,
}

/// Set by the front end for the libtorch binary when this path declined: the reason, for its log.
pub const DECLINED_ENV: &str = "FLOTILLA_FAST_PATH_DECLINED";

/// The command's summary on stdout, the same on both paths.
pub fn print_summary(method: &str, out: &Path, report: &Report) {
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
}

/// Runs `aggregate` with `args` (everything after the word `aggregate`) and prints its summary, or
/// declines with the reason, having written nothing, when the arguments, the method or an input
/// are anything this path does not handle (`--help` and argument errors included).
pub fn run_aggregate(args: &[OsString]) -> Result<(), Declined> {
    let argv = std::iter::once(OsString::from("aggregate")).chain(args.iter().cloned());
    let args = AggregateArgs::try_parse_from(argv).map_err(|e| Declined(format!("arguments: {}", e.kind())))?;
    let Some(method) = SlotMethod::from_name(&args.method) else {
        return Err(Declined(format!("method '{}' needs libtorch", args.method)));
    };
    let report = merge(&Request { method, out: args.out.clone(), max_rank: args.max_rank, clients: args.clients })?;
    print_summary(method.name(), &args.out, &report);
    if std::env::var_os("FLOTILLA_AGGREGATE_TIMINGS").is_some() {
        let phases: Vec<String> = report.phases.iter().map(|(name, s)| format!("{name} {s:.3} s")).collect();
        eprintln!("fast path: {}", phases.join(", "));
    }
    Ok(())
}
