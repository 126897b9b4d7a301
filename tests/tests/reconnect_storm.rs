//! A fleet reconnecting at once after a coordinator restart. Simulated devices
//! (`FLOTILLA_STORM_DEVICES`, default 100; `deploy/soak-reconnect.sh` runs 1,000) train with a
//! coordinator that is SIGKILLed once round 2 is checkpointed and restarted on the same run
//! directory. It answers the old connections with stateless resets (its reset key lives in the run
//! directory), so every device learns at once, long before its idle timeout, and reconnects with
//! backoff and jitter. The coordinator keeps answering `/healthz` through the storm, every device
//! rejoins, and every round holds every device's update.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_tests::{
    binary, certs, free_tcp_port, free_udp_port, http_get, metric_value, proc_status_kib, provision, Process,
};

const ROUNDS: usize = 4;

fn coordinator(config: &Path, logs: &Path, name: &str) -> Process {
    Process::spawn(name, Command::new(binary("flotilla-coordinator")).arg("serve").arg("--config").arg(config), logs)
}

#[test]
fn a_fleet_reconnects_at_once_after_a_coordinator_restart_and_nothing_is_lost() {
    let devices: usize = std::env::var("FLOTILLA_STORM_DEVICES").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    let keep_alive_secs: u64 =
        std::env::var("FLOTILLA_STORM_KEEP_ALIVE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    let logs = run.join("logs");
    provision(&pki, &[]);
    certs(&pki, &["issue", "devices", "--prefix", "storm", "--count", &devices.to_string()]);
    let (port, metrics_port) = (free_udp_port(), free_tcp_port());
    let config = run.join("coordinator.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nrun_dir = \"{run}\"\n\
             [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
             [round]\nrounds = {ROUNDS}\nmin_devices = {devices}\nmin_updates = {devices}\nlocal_steps = 2\n\
             deadline_secs = 300\n\
             [aggregation]\nmax_rank = 4\n\
             [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 3\n",
            run = run.display()
        ),
    )
    .unwrap();

    let mut first = coordinator(&config, &logs, "coordinator-1");
    let mut sim = Process::spawn(
        "sim",
        Command::new(binary("flotilla-edge"))
            .args(["sim", "--coordinator", &format!("127.0.0.1:{port}"), "--clients", &devices.to_string()])
            .args(["--concurrency", "2", "--samples", "32", "--profile-mix", "phone=2,laptop:4=1"])
            // The idle timeout stays at its default (60 s): the devices must learn of the restart
            // from the stateless resets, not by timing out.
            .args(["--max-attempts", "30", "--keep-alive-secs", &keep_alive_secs.to_string(), "--kits"])
            .arg(pki.join("kits")),
        &logs,
    );

    let round_2 = run.join("global/round-2/state.json");
    let deadline = Instant::now() + Duration::from_secs(600);
    while !round_2.exists() {
        assert!(Instant::now() < deadline, "round 2 never finished\n{}\n{}", first.logs(), sim.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill();
    let killed = Instant::now();
    let mut second = coordinator(&config, &logs, "coordinator-2");

    // Through the storm: how soon everyone is back, how long /healthz takes, how much memory.
    let (mut slowest_health, mut polls, mut peak_rss_kib) = (Duration::ZERO, 0u32, 0u64);
    let mut back_up: Option<Duration> = None;
    let rejoined = loop {
        assert!(Instant::now() < deadline, "the fleet never came back\n{}\n{}", second.logs(), sim.logs());
        let asked = Instant::now();
        if let Some(health) = http_get(metrics_port, "/healthz") {
            assert!(health.starts_with("HTTP/1.1 200"), "{health}");
            back_up.get_or_insert(killed.elapsed());
            slowest_health = slowest_health.max(asked.elapsed());
            polls += 1;
            peak_rss_kib = peak_rss_kib.max(proc_status_kib(second.id(), "VmRSS").unwrap_or(0));
            let connected = http_get(metrics_port, "/metrics")
                .and_then(|body| metric_value(&body, "fl_clients_connected "))
                .unwrap_or(0.0) as usize;
            if connected >= devices {
                break killed.elapsed();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };

    assert!(sim.wait(Duration::from_secs(600)).success(), "{}", sim.logs());
    assert!(second.wait(Duration::from_secs(60)).success(), "{}", second.logs());
    assert!(sim.stdout_text().contains(&format!("sim: {devices} of {devices} device(s) finished")), "{}", sim.logs());
    let resets = sim.stderr_text().matches("reset by peer").count();
    let timeouts = sim.stderr_text().matches("timed out").count();
    println!(
        "STORM devices={devices} keep_alive_secs={keep_alive_secs} serving_again_after_kill_secs={:.1} all_rejoined_after_kill_secs={:.1} \
         healthz_polls={polls} slowest_healthz_ms={:.1} peak_rss_mib={:.0} resets_seen={resets} idle_timeouts={timeouts}",
        back_up.unwrap_or_default().as_secs_f64(),
        rejoined.as_secs_f64(),
        slowest_health.as_secs_f64() * 1e3,
        peak_rss_kib as f64 / 1024.0
    );
    assert!(polls > 0, "/healthz never answered");
    // Learned from stateless resets, not from idle timeouts.
    assert_eq!(timeouts, 0, "{}", sim.logs());
    assert!(resets >= devices, "only {resets} resets for {devices} devices\n{}", sim.logs());

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let rounds = summary["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), ROUNDS, "{summary}");
    for round in rounds {
        assert_eq!(round["updates"].as_array().unwrap().len(), devices, "round {}", round["round"]);
    }
}
