//! Secure aggregation through the real system (`[secure_aggregation]`, SecAgg+ with masks within
//! rank tiers): devices of ranks 2 and 4 agree keys through the coordinator, share their secrets,
//! upload masked vectors, and reveal the shares that remove the masks. The coordinator's global
//! adapter must equal the plain round's (same devices, same data, same seeds) within the
//! quantization bound, for every method that has a sums form; a device that drops after sharing
//! its keys is recovered; settings secure aggregation cannot honour are refused by `check`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_tests::{
    binary, check_config, edge_run, free_tcp_port, free_udp_port, http_get, metric_value, provision, read_safetensors,
    start_coordinator, Matrix, Process,
};

/// (device id, rank, samples, the crash-test point where it drops: `before-keys`, `after-shares`
/// or `before-unmask`)
type Device = (&'static str, u32, u32, Option<&'static str>);

const DEVICES: [Device; 4] =
    [("phone-1", 2, 32, None), ("phone-2", 2, 64, None), ("laptop-1", 4, 48, None), ("laptop-2", 4, 96, None)];

/// Whether a device's masked update reaches the coordinator.
fn uploads(device: &Device) -> bool {
    matches!(device.3, None | Some("before-unmask"))
}

/// Values are weighted by samples / 128 and clipped to ±2; 16 participants at most: each unmasked
/// sum is within 16 / (2 · ⌊(2³¹ − 1) / 32⌋) ≈ 1.2e-7 of the exact one, and a slot's mean, divided
/// by a coverage weight of at least 0.75, within 2e-7. The tolerance leaves room for float
/// rounding in the two paths' different summation orders.
const TOLERANCE: f64 = 2e-5;

fn config(run: &Path, method: &str, min_devices: usize, min_updates: usize, secure: bool) -> String {
    let mut config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 1\nmin_devices = {min_devices}\nmin_updates = {min_updates}\ngrace_secs = 1\n\
         local_steps = 8\n\
         learning_rate = 0.05\n\
         [aggregation]\nmethod = \"{method}\"\nmax_rank = 4\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [12]\nclasses = 3\n",
        run = run.display()
    );
    if secure {
        config += "[secure_aggregation]\nrange = 2.0\nmax_participants = 16\nmax_samples = 128\nphase_secs = 5\n";
    }
    config
}

/// Runs one round with `devices` (all at `rank` when given); returns the global adapter after it
/// and the run's summary.
fn run_round(
    run: &Path,
    method: &str,
    devices: &[Device],
    rank: Option<u32>,
    secure: bool,
) -> (HashMap<String, Matrix>, serde_json::Value) {
    run_round_with(run, method, devices, rank, secure, &|config| config)
}

/// [`run_round`] with the configuration edited by `edit`.
fn run_round_with(
    run: &Path,
    method: &str,
    devices: &[Device],
    rank: Option<u32>,
    secure: bool,
    edit: &dyn Fn(String) -> String,
) -> (HashMap<String, Matrix>, serde_json::Value) {
    let ids: Vec<&str> = devices.iter().map(|d| d.0).collect();
    provision(&run.join("pki"), &ids);
    let staying = devices.iter().filter(|d| uploads(d)).count();
    let (mut coordinator, address) = start_coordinator(run, &edit(config(run, method, devices.len(), staying, secure)));
    let mut processes: Vec<(Option<&str>, Process)> = devices
        .iter()
        .map(|&(id, device_rank, samples, drops)| {
            let rank = rank.unwrap_or(device_rank).to_string();
            let mut command = edge_run(&address, &run.join("pki/kits").join(id), rank, samples);
            if let Some(point) = drops {
                command.env("FLOTILLA_FAULT_PAUSE", format!("{point}@1"));
            }
            (drops, Process::spawn(id, &mut command, &run.join("logs")))
        })
        .collect();
    for (drops, device) in &mut processes {
        if let Some(point) = drops {
            device.wait_for_stderr(&format!("paused at {point}@1"), Duration::from_secs(120));
        }
    }
    assert!(coordinator.wait(Duration::from_secs(180)).success(), "{}", coordinator.logs());
    for (drops, device) in &mut processes {
        if drops.is_some() {
            device.kill();
        } else {
            assert!(device.wait(Duration::from_secs(60)).success(), "{}", device.logs());
        }
    }
    let (global, _) = read_safetensors(&run.join("global/round-1/adapter_model.safetensors"));
    let summary = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    (global, summary)
}

fn largest_difference(a: &HashMap<String, Matrix>, b: &HashMap<String, Matrix>) -> f64 {
    assert_eq!(a.keys().collect::<std::collections::BTreeSet<_>>(), b.keys().collect());
    a.iter().flat_map(|(name, m)| m.values.iter().zip(&b[name].values).map(|(x, y)| (x - y).abs())).fold(0.0, f64::max)
}

/// The largest |value| of the B factors, which start at zero.
fn largest_b(adapter: &HashMap<String, Matrix>) -> f64 {
    adapter
        .iter()
        .filter(|(n, _)| n.contains("lora_B"))
        .flat_map(|(_, m)| m.values.iter().map(|v| v.abs()))
        .fold(0.0, f64::max)
}

#[test]
fn a_secure_round_gives_the_plain_rounds_result_for_every_method_with_a_sums_form() {
    for (method, rank) in [("rbla", None), ("fold-and-fill", None), ("zero-pad", None), ("fedavg", Some(4))] {
        let plain_dir = tempfile::tempdir().unwrap();
        let secure_dir = tempfile::tempdir().unwrap();
        let (plain, _) = run_round(plain_dir.path(), method, &DEVICES, rank, false);
        let (secure, summary) = run_round(secure_dir.path(), method, &DEVICES, rank, true);
        let record = &summary["rounds"][0]["secure"];
        assert_eq!(record["survivors"], 4, "{method}: {record}");
        assert_eq!(record["recovered"], 0, "{method}: {record}");
        assert!(record["discarded"].is_null(), "{method}: {record}");
        let bound = record["sum_error_bound"].as_f64().unwrap();
        assert!(bound > 0.0 && bound < 1e-6, "{method}: {record}");
        // The coordinator never learns a device's sample count.
        let counts: Vec<u64> = summary["rounds"][0]["updates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["num_samples"].as_u64().unwrap())
            .collect();
        assert_eq!(counts, vec![0; 4], "{method}");
        let difference = largest_difference(&plain, &secure);
        eprintln!("{method}: secure − plain ≤ {difference:.2e}, largest |B| {:.3}; {record}", largest_b(&plain));
        assert!(difference < TOLERANCE, "{method}: the secure round differs from the plain one by {difference}");
        assert!(largest_b(&plain) > 100.0 * TOLERANCE, "{method}: the round trained the adapter");
    }
}

#[test]
fn a_device_that_drops_at_any_phase_is_left_out_or_recovered() {
    // (where the fourth device drops, whether its update is in the sums, devices recovered)
    for (point, counted, recovered) in
        [("before-keys", false, 0), ("after-shares", false, 1), ("before-unmask", true, 0)]
    {
        let mut fleet = DEVICES;
        fleet[3].3 = Some(point);
        let expected: Vec<Device> = if counted { DEVICES.to_vec() } else { DEVICES[..3].to_vec() };
        let plain_dir = tempfile::tempdir().unwrap();
        let secure_dir = tempfile::tempdir().unwrap();
        let (plain, _) = run_round(plain_dir.path(), "rbla", &expected, None, false);
        let (secure, summary) = run_round(secure_dir.path(), "rbla", &fleet, None, true);
        let record = &summary["rounds"][0]["secure"];
        assert_eq!(record["participants"], 4, "{point}: {record}");
        assert_eq!(record["survivors"], expected.len(), "{point}: {record}");
        assert_eq!(record["recovered"], recovered, "{point}: {record}");
        let difference = largest_difference(&plain, &secure);
        eprintln!("dropping {point}: secure − plain ≤ {difference:.2e}; {record}");
        assert!(difference < TOLERANCE, "{point}: the secure round differs from the plain one by {difference}");
    }
}

#[test]
fn a_round_with_fewer_survivors_than_the_threshold_is_discarded_and_reveals_nothing() {
    let mut fleet = DEVICES;
    fleet[2].3 = Some("after-shares");
    fleet[3].3 = Some("after-shares");
    let dir = tempfile::tempdir().unwrap();
    let (global, summary) = run_round_with(dir.path(), "rbla", &fleet, None, true, &|config| {
        config.replace("[secure_aggregation]\n", "[secure_aggregation]\nthreshold = 3\n")
    });
    let record = &summary["rounds"][0]["secure"];
    assert_eq!(record["threshold"], 3, "{record}");
    let reason = record["discarded"].as_str().unwrap_or_else(|| panic!("the round was not discarded: {record}"));
    assert!(reason.contains("threshold"), "{reason}");
    assert_eq!(largest_b(&global), 0.0, "the global adapter is the initial one (B = 0)");
}

#[test]
fn check_refuses_what_secure_aggregation_cannot_honour() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &[]);
    let check = |config: String| check_config(run, &config);
    let (ok, text) = check(config(run, "rbla", 4, 4, true));
    assert!(ok && text.contains("secure aggregation: each device shares its secrets with"), "{text}");
    for method in ["hetlora", "flexlora", "flora", "rbla-coverage"] {
        let (ok, text) = check(config(run, method, 4, 4, true));
        assert!(!ok && text.contains("cannot run under [secure_aggregation]"), "{method}: {text}");
    }
    let (ok, text) = check(config(run, "rbla", 2, 2, true));
    assert!(!ok && text.contains("min_devices"), "{text}");
    let (ok, text) =
        check(config(run, "rbla", 4, 4, true).replace("[aggregation]\n", "[aggregation]\nrecord_updates = true\n"));
    assert!(!ok && text.contains("record_updates"), "{text}");
    let privacy = "[privacy]\nclip_norm = 0.1\nnoise_multiplier = 1.0\nepsilon = 8.0\ndelta = 1e-3\n";
    let (ok, text) = check(config(run, "rbla", 4, 4, true) + privacy);
    assert!(!ok && text.contains("mode = \"central\" cannot run under [secure_aggregation]"), "{text}");
    let distributed = privacy.replace("[privacy]\n", "[privacy]\nmode = \"distributed\"\n");
    let (ok, text) = check(config(run, "rbla", 4, 4, false) + &distributed);
    assert!(!ok && text.contains("needs [secure_aggregation]"), "{text}");
    let (ok, text) = check(config(run, "rbla", 4, 4, true) + &distributed);
    assert!(ok, "{text}");
}

#[test]
fn a_coordinator_killed_mid_unmask_discards_the_round_and_resumes_with_fresh_keys() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let ids = ["phone-1", "phone-2", "laptop-1"];
    provision(&run.join("pki"), &ids);
    let port = free_udp_port();
    let metrics_port = free_tcp_port();
    let config = config(run, "rbla", 3, 3, true)
        .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace("rounds = 1", "rounds = 2")
        + &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
    let path = run.join("c.toml");
    std::fs::write(&path, config).unwrap();
    let coordinator = |name: &str, pause: Option<&str>| {
        let mut command = Command::new(binary("flotilla-coordinator"));
        command.args(["serve", "--config"]).arg(&path);
        if let Some(pause) = pause {
            command.env("FLOTILLA_FAULT_PAUSE", pause);
        }
        Process::spawn(name, &mut command, &run.join("logs"))
    };
    let mut first = coordinator("coordinator-1", Some("mid-unmask@2"));
    std::thread::sleep(Duration::from_millis(300));
    let mut devices: Vec<Process> = ids
        .iter()
        .zip(["2", "2", "4"])
        .map(|(id, rank)| {
            Process::spawn(
                id,
                edge_run(&format!("127.0.0.1:{port}"), &run.join("pki/kits").join(id), rank, 64).args([
                    "--max-attempts",
                    "30",
                    "--idle-timeout-secs",
                    "3",
                    "--keep-alive-secs",
                    "1",
                ]),
                &run.join("logs"),
            )
        })
        .collect();
    first.wait_for_stderr("paused at mid-unmask@2", Duration::from_secs(120));
    // Paused while unmasking: the metrics show the phase and round 1's outcome.
    let metrics = http_get(metrics_port, "/metrics").expect("the metrics endpoint answers");
    assert_eq!(metric_value(&metrics, "fl_secagg_phase{phase=\"unmask\"}"), Some(1.0), "{metrics}");
    assert_eq!(metric_value(&metrics, "fl_secagg_rounds_total{outcome=\"aggregated\"}"), Some(1.0), "{metrics}");
    assert_eq!(metric_value(&metrics, "fl_secagg_survivors"), Some(3.0), "{metrics}");
    assert!(metric_value(&metrics, "fl_secagg_protocol_bytes_total").is_some_and(|b| b > 0.0), "{metrics}");
    first.kill();
    assert!(run.join("global/round-1/state.json").exists() && !run.join("global/round-2").exists());
    assert!(!run.join("updates").exists(), "nothing of a device's update is written");

    let mut second = coordinator("coordinator-2", None);
    assert!(second.wait(Duration::from_secs(180)).success(), "{}", second.logs());
    assert!(second.stderr_text().contains("resuming"), "{}", second.logs());
    for device in &mut devices {
        assert!(device.wait(Duration::from_secs(60)).success(), "{}", device.logs());
    }
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rounds_completed"], 2, "{summary}");
    let second_round = &summary["rounds"][1]["secure"];
    assert_eq!(second_round["survivors"], 3, "round 2 ran again, securely: {second_round}");
    let csv = std::fs::read_to_string(run.join("rounds.csv")).unwrap();
    assert!(csv.lines().next().unwrap().ends_with("secure_survivors,secure_recovered,secure_discarded"), "{csv}");
    assert!(!run.join("updates").exists());
}
