//! Fleet-scale benchmarks through the real system: a coordinator process and `flotilla-edge sim`
//! (every virtual device with its own certificate and mutual-TLS QUIC connection) on this machine.
//!
//! ```sh
//! cargo build --release --bins
//! cargo bench -p flotilla-tests --bench fleet                                   # 100 and 1,000 devices, memory sweep
//! cargo bench -p flotilla-tests --bench fleet -- --devices 10000 --memory-devices 0
//! ```
//!
//! For each fleet size: how fast the fleet is admitted (handshake, Hello, base model), the round
//! overhead beyond training, the coordinator's peak RSS, and whether every update arrived. The
//! memory sweep keeps the fleet fixed and grows the number of devices per round (`[round]
//! fraction`), with updates large enough that buffering them would show. The method is RBLA, as
//! in the results docs/benchmarks.md records.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_tests::{
    binary, certs, free_tcp_port, free_udp_port, http_get, metric_value, proc_status_kib, provision, Process,
};

struct Args {
    devices: Vec<usize>,
    rounds: u32,
    memory_devices: usize,
    fractions: Vec<f64>,
    concurrency: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        devices: vec![100, 1000],
        rounds: 3,
        memory_devices: 1000,
        fractions: vec![0.1, 0.5, 1.0],
        concurrency: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--devices" => args.devices = value().split(',').map(|v| v.parse().expect("--devices N,N")).collect(),
            "--rounds" => args.rounds = value().parse().expect("--rounds N"),
            "--memory-devices" => args.memory_devices = value().parse().expect("--memory-devices N"),
            "--fractions" => args.fractions = value().split(',').map(|v| v.parse().expect("--fractions F,F")).collect(),
            "--concurrency" => args.concurrency = value().parse().expect("--concurrency N"),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// The model of a run: tiny for overhead, larger adapters for the memory sweep.
struct Shape {
    label: &'static str,
    architecture: &'static str,
    max_rank: u32,
    rank_mix: &'static str,
}

const TINY: Shape = Shape {
    label: "tiny adapters (MLP 16→8→3, ranks 2 and 4, ~0.5 KB per update)",
    architecture: "[model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 3\n",
    max_rank: 4,
    rank_mix: "phone=2,laptop:4=1",
};

const WIDE: Shape = Shape {
    label: "wide adapters (MLP 64→64→64→4 at rank 64, ~100 KB per update)",
    architecture: "[model.architecture.mlp]\ninput = 64\nhidden = [64, 64]\nclasses = 4\n",
    max_rank: 64,
    rank_mix: "gpu:64=1",
};

struct Measured {
    devices: usize,
    per_round: usize,
    admitted: Duration,
    round_seconds: Vec<f64>,
    training_seconds: Vec<f64>,
    aggregation_seconds: Vec<f64>,
    update_bytes: u64,
    coordinator_peak_mib: f64,
    complete: bool,
}

/// Devices with a live session; `None` until the gauge is first set.
fn connected(port: u16) -> Option<usize> {
    metric_value(&http_get(port, "/metrics")?, "fl_clients_connected ").map(|v| v as usize)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn run_fleet(pki: &Path, work: &Path, shape: &Shape, devices: usize, fraction: f64, args: &Args) -> Measured {
    let run = work.join(format!("run-{devices}-{fraction}-{}", shape.max_rank));
    std::fs::create_dir_all(&run).unwrap();
    let (port, metrics) = (free_udp_port(), free_tcp_port());
    let per_round = ((devices as f64 * fraction).ceil() as usize).max(1);
    let config = run.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nrun_dir = \"{run}\"\n\
             [tls]\nkit = \"{pki}/kits/coordinator\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [round]\nrounds = {rounds}\nmin_devices = {devices}\nmin_participants = 1\nfraction = {fraction}\n\
             min_updates = {per_round}\n\
             local_steps = 1\nbatch_size = 8\ndeadline_secs = 3600\n\
             [aggregation]\nmethod = \"rbla\"\nmax_rank = {max_rank}\n{architecture}",
            run = run.display(),
            pki = pki.display(),
            rounds = args.rounds,
            max_rank = shape.max_rank,
            architecture = shape.architecture,
        ),
    )
    .unwrap();
    let logs = run.join("logs");
    let mut coordinator = Process::spawn(
        "coordinator",
        Command::new(binary("flotilla-coordinator")).arg("serve").arg("--config").arg(&config),
        &logs,
    );
    while !http_get(metrics, "/healthz").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(std::fs::read_to_string(&coordinator.stdout).is_ok(), "{}", coordinator.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let mut sim = Process::spawn(
        "sim",
        Command::new(binary("flotilla-edge"))
            .args(["sim", "--coordinator", &format!("127.0.0.1:{port}"), "--clients", &devices.to_string()])
            .args(["--concurrency", &args.concurrency.to_string(), "--samples", "8", "--max-attempts", "30"])
            .args(["--profile-mix", shape.rank_mix, "--kits"])
            .arg(pki.join("kits")),
        &logs,
    );
    let mut admitted = None;
    let mut peak = 0u64;
    loop {
        if let Some(kib) = proc_status_kib(coordinator.id(), "VmHWM") {
            peak = peak.max(kib);
        }
        if admitted.is_none() && connected(metrics).is_some_and(|n| n >= devices) {
            admitted = Some(started.elapsed());
        }
        if std::fs::read_to_string(&coordinator.stdout).is_ok_and(|s| s.contains("run finished")) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3600), "the run did not finish\n{}", coordinator.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.logs());
    assert!(sim.wait(Duration::from_secs(300)).success(), "{}", sim.logs());

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let rounds = summary["rounds"].as_array().unwrap();
    let field = |r: &serde_json::Value, key: &str| r[key].as_f64().unwrap_or(f64::NAN);
    let complete = rounds.len() == args.rounds as usize
        && rounds.iter().all(|r| r["updates"].as_array().is_some_and(|u| u.len() == per_round));
    let training_seconds = rounds
        .iter()
        .map(|r| {
            let total: f64 = r["updates"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["metrics"]["train_seconds"].as_f64().unwrap_or(0.0))
                .sum();
            // The simulator trains `concurrency` devices at a time.
            total / args.concurrency as f64
        })
        .collect();
    Measured {
        devices,
        per_round,
        admitted: admitted.unwrap_or_default(),
        round_seconds: rounds.iter().map(|r| field(r, "round_seconds")).collect(),
        training_seconds,
        aggregation_seconds: rounds.iter().map(|r| field(r, "aggregation_seconds")).collect(),
        update_bytes: rounds.first().map(|r| r["update_bytes"].as_u64().unwrap_or(0)).unwrap_or(0),
        coordinator_peak_mib: peak as f64 / 1024.0,
        complete,
    }
}

fn main() {
    let args = parse_args();
    let work = tempfile::tempdir().unwrap();
    let pki = work.path().join("pki");
    let most = args.devices.iter().copied().chain([args.memory_devices]).max().unwrap_or(0);
    let issuing = Instant::now();
    provision(&pki, &[]);
    certs(&pki, &["issue", "devices", "--prefix", "fleet", "--count", &most.to_string()]);
    eprintln!("issued {most} device kits in {:.1} s", issuing.elapsed().as_secs_f64());

    println!("### Round overhead and admission ({})\n", TINY.label);
    println!("| devices | admitted in | admissions/s | round (median) | training (median) | overhead beyond training (median) | aggregation (median) | coordinator peak RSS | every update arrived |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for &devices in &args.devices {
        let m = run_fleet(&pki, work.path(), &TINY, devices, 1.0, &args);
        let overhead: Vec<f64> = m.round_seconds.iter().zip(&m.training_seconds).map(|(r, t)| r - t).collect();
        println!(
            "| {} | {:.2} s | {:.0} | {:.3} s | {:.3} s | {:.0} ms | {:.1} ms | {:.0} MiB | {} |",
            m.devices,
            m.admitted.as_secs_f64(),
            m.devices as f64 / m.admitted.as_secs_f64(),
            median(&m.round_seconds),
            median(&m.training_seconds),
            median(&overhead) * 1e3,
            median(&m.aggregation_seconds) * 1e3,
            m.coordinator_peak_mib,
            if m.complete { "yes" } else { "**no**" }
        );
    }

    if args.memory_devices > 0 {
        println!(
            "\n### Coordinator memory against devices per round ({}, {} connected)\n",
            WIDE.label, args.memory_devices
        );
        println!("| devices per round | update bytes per round | coordinator peak RSS | × the smallest | every update arrived |");
        println!("| ---: | ---: | ---: | ---: | --- |");
        let mut first = None;
        for &fraction in &args.fractions {
            let m = run_fleet(&pki, work.path(), &WIDE, args.memory_devices, fraction, &args);
            let base = *first.get_or_insert(m.coordinator_peak_mib);
            println!(
                "| {} | {:.1} MiB | {:.0} MiB | {:.2} | {} |",
                m.per_round,
                m.update_bytes as f64 / (1024.0 * 1024.0),
                m.coordinator_peak_mib,
                m.coordinator_peak_mib / base,
                if m.complete { "yes" } else { "**no**" }
            );
        }
    }
}
