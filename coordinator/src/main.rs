//! `flotilla-coordinator`: a small front end that does not load libtorch.
//!
//! `aggregate` with RBLA, zero-padding or FedAvg on clean f32 inputs runs here, on the fast path of
//! `flotilla_merge` (libtorch's start-up alone would cost several times a read of the inputs).
//! This package does not depend on libtorch at all; the suite's architecture test checks it.
//! Everything else — serving, exporting, the other methods, and any input the fast path declines —
//! is handed to `flotilla-coordinator-torch`, installed beside this binary, by `exec` with the same
//! arguments, so it behaves exactly as if it had been run directly.
//!
//! `FLOTILLA_AGGREGATE_PATH=torch` skips the fast path (benchmarks compare the two).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use flotilla_coordinator::aggregate::NotDone;

const TORCH_BINARY: &str = "flotilla-coordinator-torch";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut declined = None;
    if args.first().is_some_and(|a| a == "aggregate")
        && std::env::var_os("FLOTILLA_AGGREGATE_PATH").is_none_or(|p| p != "torch")
    {
        match flotilla_coordinator::aggregate::run_fast_path(&args[1..]) {
            Ok(()) => return ExitCode::SUCCESS,
            Err(NotDone::Refused(message)) => {
                eprintln!("Error: {message}");
                return ExitCode::FAILURE;
            }
            Err(NotDone::Declined(reason)) => declined = Some(reason),
        }
    }
    let torch = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(TORCH_BINARY),
        Err(error) => {
            eprintln!("flotilla-coordinator: cannot locate this executable to find {TORCH_BINARY}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut command = Command::new(&torch);
    command.arg0("flotilla-coordinator").args(&args);
    if let Some(reason) = declined {
        command.env(flotilla_coordinator::aggregate::DECLINED_ENV, reason);
    }
    let error = command.exec();
    eprintln!(
        "flotilla-coordinator: cannot run {}: {error} (it is installed beside flotilla-coordinator)",
        torch.display()
    );
    ExitCode::FAILURE
}
