//! `check`: every check `serve` makes before it listens, made without writing anything, each
//! problem reported (not only the first). What `serve` would do and `check` only looks at: create
//! the run directory, take its lock, make the stateless-reset key, pretrain the base, list the
//! evaluated texts, bind its ports.

use std::path::Path;

use crate::config::CoordinatorConfig;
use crate::model::evaluation_set::{describe_mix, load_test_set};
use crate::{
    model::base, serve::checkpoint, serve::privacy_ledger, serve::renewal, serve::reset_secret, serve::run_lock,
};

/// Every problem `serve` would stop on, each with where it is; empty when it would start.
pub fn problems(config: &CoordinatorConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let kit = flotilla_wire::tls::KitPaths::in_dir(&config.tls.kit);
    if let Err(error) = flotilla_wire::tls::server_config(&kit, config.tls.crl.as_deref()) {
        problems.push(format!("[tls]: {error}"));
    }
    if let Err(error) = renewal::Renewal::open(&config.renewal) {
        problems.push(format!("[renewal]: {error:#}"));
    }
    let run_dir = &config.server.run_dir;
    match writable(run_dir) {
        Ok(()) => problems.extend(run_dir_problems(config)),
        Err(error) => problems.push(format!("[server] run_dir {}: {error}", run_dir.display())),
    }
    if let Err(error) = base::check(config) {
        problems.push(format!("[model]: {error:#}"));
    }
    if let Some(set) = crate::model::evaluation_set::EvaluationSet::of(config, false) {
        match load_test_set(&config.model.architecture, &set) {
            Ok(data) => println!("{}", describe_mix(&config.model.architecture, &set, &data)),
            Err(error) => problems.push(format!("[evaluation] test_data: {error:#}")),
        }
    }
    problems.extend(port_problems(config));
    problems
}

/// The run directory, or the nearest existing directory above it (where `serve` creates it),
/// accepts new files; checked with an unnamed temporary file, which leaves nothing behind.
fn writable(run_dir: &Path) -> Result<(), String> {
    let mut existing = run_dir;
    while !existing.exists() {
        existing = match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
    }
    if !existing.is_dir() {
        return Err(format!("{} is not a directory", existing.display()));
    }
    tempfile::tempfile_in(existing).map(drop).map_err(|error| {
        if existing == run_dir {
            format!("not writable: {error}")
        } else {
            format!("cannot be created in {}: {error}", existing.display())
        }
    })
}

/// What `serve` reads from an existing run directory: its lock, its stateless-reset key, its
/// privacy ledger and the checkpoint it would resume.
fn run_dir_problems(config: &CoordinatorConfig) -> Vec<String> {
    let run_dir = &config.server.run_dir;
    if !run_dir.exists() {
        return Vec::new();
    }
    let mut problems = Vec::new();
    match run_lock::RunLock::holder(run_dir) {
        Ok(Some(holder)) => problems.push(format!("[server]: {}", run_lock::in_use(run_dir, &holder))),
        Ok(None) => {}
        Err(error) => problems.push(format!("[server] run_dir: {error:#}")),
    }
    if let Err(error) = reset_secret::check(run_dir) {
        problems.push(format!("[server] run_dir: {error:#}"));
    }
    if config.privacy.is_some() {
        if let Err(error) = privacy_ledger::PrivacyLedger::open(run_dir) {
            problems.push(format!("[privacy]: {error:#}"));
        }
    }
    let resumable = checkpoint::latest(run_dir)
        .and_then(|latest| latest.map(|(dir, state)| checkpoint::resume(&dir, &state, config).map(drop)).transpose());
    if let Err(error) = resumable {
        problems.push(format!("[server] run_dir: cannot resume: {error:#}"));
    }
    problems
}

/// The QUIC and metrics ports are free (bound and at once released).
fn port_problems(config: &CoordinatorConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(error) = std::net::UdpSocket::bind(config.server.listen) {
        problems.push(format!("[server] listen {}: cannot listen (UDP): {error}", config.server.listen));
    }
    if let Some(listen) = config.metrics.listen {
        if let Err(error) = std::net::TcpListener::bind(listen) {
            problems.push(format!("[metrics] listen {listen}: cannot listen: {error}"));
        }
    }
    problems
}
