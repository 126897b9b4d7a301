//! A live coordinator exposes Prometheus metrics and a health endpoint on a separate plain-HTTP
//! port: scraped in the middle of a run, they show the round, the connected devices, the
//! participants by rank and the accepted updates, with no per-device labels.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_tests::{binary, free_tcp_port, http_get, metric_value, provision, start_coordinator, Process};

fn get(port: u16, path: &str) -> String {
    http_get(port, path).unwrap_or_else(|| panic!("nothing answers GET {path} on port {port}"))
}

fn metric(body: &str, line_start: &str) -> f64 {
    metric_value(body, line_start).unwrap_or_else(|| panic!("no '{line_start}' in:\n{body}"))
}

#[test]
fn metrics_and_health_during_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["m-phone", "m-desktop"]);
    let metrics_port = free_tcp_port();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 2\nmin_devices = 2\nlocal_steps = 10000\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\
         [model.architecture.mlp]\ninput = 64\nhidden = [64]\nclasses = 10\n",
        run = run.display()
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let logs = run.join("logs");
    let health = get(metrics_port, "/healthz");
    assert!(health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"), "{health}");

    let mut edges: Vec<Process> = [("m-phone", "2"), ("m-desktop", "8")]
        .iter()
        .map(|(id, rank)| {
            Process::spawn(
                id,
                Command::new(binary("flotilla-edge"))
                    .args(["run", "--coordinator", &address, "--rank", rank, "--samples", "256", "--kit"])
                    .arg(pki.join("kits").join(id)),
                &logs,
            )
        })
        .collect();

    // Mid-run: round 1 is checkpointed, round 2 is training.
    let checkpoint = run.join("global/round-1/state.json");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !checkpoint.exists() {
        assert!(Instant::now() < deadline, "round 1 never finished\n{}", coordinator.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The driver records the round just after the worker's checkpoint: poll until it has.
    let body = loop {
        let body = get(metrics_port, "/metrics");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        if body.contains("fl_aggregation_duration_seconds_count") {
            break body;
        }
        assert!(Instant::now() < deadline, "round 1 never reached the metrics:\n{body}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(metric(&body, "fl_round ") >= 1.0);
    assert_eq!(metric(&body, "fl_clients_connected "), 2.0);
    assert!(metric(&body, "fl_updates_total{status=\"accepted\",reason=\"ok\"}") >= 2.0);
    assert_eq!(metric(&body, "fl_round_participants{rank=\"2\"}"), 1.0);
    assert_eq!(metric(&body, "fl_round_participants{rank=\"8\"}"), 1.0);
    assert!(metric(&body, "fl_update_bytes_total ") > 0.0);
    assert!(metric(&body, "fl_aggregation_duration_seconds_count{method=\"fold-and-fill\"}") >= 1.0);
    let in_round = metric(&body, "fl_phase{phase=\"training\"}") + metric(&body, "fl_phase{phase=\"aggregating\"}");
    assert_eq!(in_round, 1.0, "{body}");
    assert!(!body.contains("m-phone") && !body.contains("m-desktop"), "no per-device labels:\n{body}");
    assert!(get(metrics_port, "/nope").starts_with("HTTP/1.1 404"));

    // `flotilla-coordinator status` reads the same state.
    let status = |format: &str| {
        Command::new(binary("flotilla-coordinator"))
            .args(["status", "--address", &format!("127.0.0.1:{metrics_port}"), "--format", format])
            .output()
            .unwrap()
    };
    let json = status("json");
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let state: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(state["devices_connected"], 2);
    assert_eq!(state["rounds_total"], 2);
    assert_eq!(state["method"], "fold-and-fill", "the default method");
    assert!(state["round"].as_u64().unwrap() >= 1 && state["rounds_completed"].as_u64().unwrap() >= 1, "{state}");
    let text = String::from_utf8_lossy(&status("text").stdout).to_string();
    assert!(text.contains("/2") && text.contains("2 device(s) connected"), "{text}");

    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.logs());
    for edge in &mut edges {
        assert!(edge.wait(Duration::from_secs(30)).success(), "{}", edge.logs());
    }
    let _ = Path::new(run);

    // Nobody there: a clear error, not a hang.
    let output = Command::new(binary("flotilla-coordinator"))
        .args(["status", "--address", &format!("127.0.0.1:{metrics_port}")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("cannot reach the coordinator's metrics port"), "{stderr}");
}
