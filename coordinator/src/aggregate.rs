//! `flotilla-coordinator aggregate`: the command's arguments and summary, defined once for both
//! paths, and its fast path.
//!
//! The front end runs RBLA, zero-padding and FedAvg on clean f32 inputs itself
//! ([`flotilla_merge::fast_path`]). Any other method, and any input that path declines, goes to
//! `flotilla-coordinator-torch`, which parses the same [`AggregateArgs`], runs the libtorch path
//! and prints the same [`print_summary`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Args, Parser};
use flotilla_merge::fast_path::{merge, Declined, Report, Request};
use flotilla_merge::method::Method;

/// Parses `--method` with the methods' own error, and lists every method in the help from their
/// table.
#[derive(Clone)]
struct MethodParser;

fn method_parser() -> MethodParser {
    MethodParser
}

impl clap::builder::TypedValueParser for MethodParser {
    type Value = Method;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Method, clap::Error> {
        let text = value.to_string_lossy();
        text.parse::<Method>().map_err(|e| clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("{e}\n")))
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        Some(Box::new(
            Method::ALL.into_iter().map(|m| clap::builder::PossibleValue::new(m.name()).help(m.spec().summary)),
        ))
    }
}

/// Merge PEFT adapters from disk (one directory per client, with adapter_model.safetensors whose
/// metadata holds `num_samples`, and adapter_config.json) into OUT_DIR.
#[derive(Debug, Clone, Args)]
pub struct AggregateArgs {
    /// The aggregation method (docs/aggregation.md); fold-and-fill needs the previous global adapter,
    /// so it runs in `serve` only.
    #[arg(long, default_value = "rbla", value_parser = method_parser())]
    pub method: Method,
    /// Output directory (adapter_model.safetensors in f32 + adapter_config.json). It may not be,
    /// or contain, an input; an existing non-empty one needs --force.
    #[arg(long)]
    pub out: PathBuf,
    /// Write into an existing non-empty --out (its adapter files are replaced).
    #[arg(long)]
    pub force: bool,
    /// Rank of the result (default: the largest input rank). FLoRA's result has rank Σ r_k.
    #[arg(long)]
    pub max_rank: Option<usize>,
    /// Client adapter directories.
    #[arg(required = true)]
    pub clients: Vec<PathBuf>,
}

/// What the front end parses after the word `aggregate`: the command's arguments, and the global
/// `--log-format` that may follow the subcommand (accepted and unused: this path logs nothing).
#[derive(Parser)]
#[command(name = "flotilla-coordinator aggregate", disable_help_flag = true, disable_version_flag = true)]
struct FrontArgs {
    #[command(flatten)]
    args: AggregateArgs,
    #[arg(long)]
    log_format: Option<String>,
}

/// Set by the front end for the libtorch binary when the fast path declined: the reason, for its log.
pub const DECLINED_ENV: &str = "FLOTILLA_FAST_PATH_DECLINED";

/// The command's summary on stdout, the same on both paths.
pub fn print_summary(method: Method, out: &Path, report: &Report) {
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

/// Why the fast path did not aggregate.
#[derive(Debug)]
pub enum NotDone {
    /// Something this path does not handle: the libtorch binary takes the command.
    Declined(String),
    /// A request no path may carry out (an output that would destroy an input, ...): the command
    /// fails with this message.
    Refused(String),
}

/// The checks both paths make before writing anything ([`flotilla_merge::destination`]).
pub fn check_destination(args: &AggregateArgs) -> Result<(), String> {
    flotilla_merge::destination::check(&args.out, &args.clients, args.force).map_err(|e| e.0)
}

/// Runs `aggregate` with `args` (everything after the word `aggregate`) on the fast path and prints
/// its summary; or refuses, having written nothing, a destination that would lose data; or declines
/// with the reason, having written nothing, when the arguments, the method or an input are anything
/// this path does not handle (`--help` and argument errors included: the libtorch binary reports
/// those in clap's words).
pub fn run_fast_path(args: &[OsString]) -> Result<(), NotDone> {
    let argv = std::iter::once(OsString::from("aggregate")).chain(args.iter().cloned());
    let FrontArgs { args, .. } =
        FrontArgs::try_parse_from(argv).map_err(|e| NotDone::Declined(format!("arguments: {}", e.kind())))?;
    check_destination(&args).map_err(NotDone::Refused)?;
    let report =
        merge(&Request { method: args.method, out: args.out.clone(), max_rank: args.max_rank, clients: args.clients })
            .map_err(|Declined(reason)| NotDone::Declined(reason))?;
    print_summary(args.method, &args.out, &report);
    if std::env::var_os("FLOTILLA_AGGREGATE_TIMINGS").is_some() {
        let phases: Vec<String> = report.phases.iter().map(|(name, s)| format!("{name} {s:.3} s")).collect();
        eprintln!("fast path: {}", phases.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_that_need_libtorch_and_bad_arguments_are_declined_before_anything_is_read() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let out = std::env::temp_dir().join("flotilla-front-never-written");
        let declined = run_fast_path(&os(&["--method", "hetlora", "--out", out.to_str().unwrap(), "a", "b"]));
        assert!(matches!(declined, Err(NotDone::Declined(r)) if r.contains("needs libtorch")));
        assert!(!out.exists());
        let unknown = run_fast_path(&os(&["--method", "nope", "--out", "x", "a"]));
        assert!(matches!(unknown, Err(NotDone::Declined(r)) if r.starts_with("arguments")));
        assert!(run_fast_path(&os(&["--help"])).is_err());
        assert!(run_fast_path(&os(&["--out", "x"])).is_err(), "clients are required");
    }
}
