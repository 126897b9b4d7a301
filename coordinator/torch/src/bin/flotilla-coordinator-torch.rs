//! `flotilla-coordinator-torch`: the coordinator's libtorch binary (serve, check, status, export,
//! and aggregate on the libtorch path). Users run it as `flotilla-coordinator`, the front end that
//! execs it; see `flotilla_coordinator_torch::commands::cli`.

fn main() {
    flotilla_coordinator_torch::commands::cli::main();
}
