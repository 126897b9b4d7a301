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

use flotilla_tests::wire::{self, Reply};
use flotilla_tests::{
    binary, check_config, edge_run, free_tcp_port, free_udp_port, http_get, metric_value, provision, read_safetensors,
    start_coordinator, Matrix, Process,
};

/// (device id, rank, samples, the crash-test point where it drops: `before-keys`, `after-shares`
/// or `before-unmask`)
type Device = (&'static str, u32, u32, Option<&'static str>);

/// Every slot is held by at least three devices (threshold 2 + 1), so every slot is revealed and
/// the secure round must equal the plain one; the phone is the one that drops in the dropout test,
/// which leaves three holders of every slot.
const DEVICES: [Device; 4] =
    [("laptop-1", 4, 32, None), ("laptop-2", 4, 64, None), ("laptop-3", 4, 48, None), ("phone-1", 2, 96, None)];

/// Whether a device's masked update reaches the coordinator.
fn uploads(device: &Device) -> bool {
    matches!(device.3, None | Some("before-unmask") | Some("corrupt-shares"))
}

/// The fault a device's point asks for: (environment variable, its value), and whether the device
/// pauses there (to be killed) rather than misbehaving and going on.
fn fault(point: &str) -> (&'static str, String, bool) {
    match point.strip_prefix("corrupt-") {
        Some(what) => ("FLOTILLA_FAULT_CORRUPT", format!("{what}@1"), false),
        None => ("FLOTILLA_FAULT_PAUSE", format!("{point}@1"), true),
    }
}

/// Values are weighted by samples / 128 and clipped to ±2; 16 participants at most: each unmasked
/// sum is within 16 / (2 · ⌊(2³¹ − 1) / 32⌋) ≈ 1.2e-7 of the exact one, and a slot's mean, divided
/// by a coverage weight of at least 0.75, within 2e-7. The tolerance leaves room for float
/// rounding in the two paths' different summation orders.
const TOLERANCE: f64 = 2e-5;

/// Ranks 2/4/8/16 as in the README's fleet: at threshold 2 a revealed slot needs three holders, so
/// only slots 1–4 are revealed; slots 5–16 (two holders, then one) are never unmasked and keep
/// their global values round after round. The plain round trains them, so the test can fail.
#[test]
fn a_slot_fewer_than_threshold_plus_one_devices_hold_is_never_revealed() {
    let fleet: [Device; 4] =
        [("phone-1", 2, 64, None), ("laptop-1", 4, 64, None), ("desktop-1", 8, 64, None), ("gpu-1", 16, 64, None)];
    let edit = |config: String| {
        config.replace("max_rank = 4", "max_rank = 16").replace("rounds = 1", "rounds = 2").replace("[12]", "[32]")
    };
    let secure_dir = tempfile::tempdir().unwrap();
    let (_, summary) = run_round_with(secure_dir.path(), "rbla", &fleet, None, true, &edit);
    let plain_dir = tempfile::tempdir().unwrap();
    let (plain, _) = run_round_with(plain_dir.path(), "rbla", &fleet, None, false, &edit);
    for round in [0, 1] {
        let record = &summary["rounds"][round]["secure"];
        assert_eq!(record["survivors"], 4, "{record}");
        assert_eq!(record["revealed_rank"], 4, "{record}");
    }
    let global = |round: u32| {
        read_safetensors(&secure_dir.path().join(format!("global/round-{round}/adapter_model.safetensors"))).0
    };
    let (first, second) = (global(1), global(2));
    let mut checked = 0;
    for (name, b) in second.iter().filter(|(n, _)| n.contains("lora_B")) {
        // Slots 1–4 trained; slots 5–16 are still the initial zeros after two rounds.
        let column = |m: &Matrix, c: usize| (0..m.rows).map(|r| m.at(r, c).abs()).fold(0.0, f64::max);
        assert!((0..4).all(|c| column(b, c) > 0.0), "{name}: the revealed slots moved");
        assert!((4..16).all(|c| column(b, c) == 0.0), "{name}: an unrevealed slot moved");
        assert!((4..16).any(|c| column(&plain[name], c) > 0.0), "{name}: the plain round trains slots 5–16");
        let a = &second[&name.replace("lora_B", "lora_A")];
        let a_first = &first[&name.replace("lora_B", "lora_A")];
        for row in 4..16 {
            for col in 0..a.cols {
                assert_eq!(a.at(row, col), a_first.at(row, col), "{name}: A row {row} is the previous global's");
            }
        }
        checked += 1;
    }
    assert!(checked > 0);
}

/// Poisson sampling (under `[privacy]`) draws 1 or 2 of 3 devices about 3 rounds in 4: too few
/// to secure. Such a round sends no task at all (before, it went out in the clear): every task the
/// devices receive has its secure part, and the run records each refused draw as a skipped round.
/// The devices here are the test's own protocol implementation, which reads every task it gets.
#[test]
fn a_poisson_draw_too_small_to_secure_sends_no_task() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let ids = ["d-1", "d-2", "d-3"];
    provision(&run.join("pki"), &ids);
    let config = config(run, "rbla", 3, 3, true)
        .replace("rounds = 1", "rounds = 12\nfraction = 0.5\ndeadline_secs = 2")
        .replace("phase_secs = 5", "phase_secs = 1")
        + "[privacy]\nmode = \"distributed\"\nclip_norm = 0.1\nnoise_multiplier = 1.0\nepsilon = 1000.0\n\
           delta = 1e-5\n";
    let (mut coordinator, address) = start_coordinator(run, &config);
    let address: std::net::SocketAddr = address.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let tasks: Vec<(u32, bool)> = runtime.block_on(async {
        let mut devices = Vec::new();
        for id in ids {
            let endpoint = wire::endpoint(&wire::ClientCredentials::kit(&run.join("pki/kits").join(id))).unwrap();
            let connection = wire::connect(&endpoint, address).await.unwrap();
            assert!(matches!(wire::hello(&connection, id, 2).await.unwrap(), Reply::Welcome { .. }));
            devices.push((endpoint, connection));
        }
        let mut tasks = Vec::new();
        for (_, connection) in &devices {
            // Each device reads what is pushed to it until the run is over.
            loop {
                match wire::next_push(connection, Duration::from_secs(120)).await {
                    Ok(Reply::RoundTask { task, .. }) => tasks.push((task.round, task.secure.is_some())),
                    Ok(Reply::Finished { .. }) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        }
        tasks
    });
    // The test's devices never take part in the protocol: every round is skipped, and a run that
    // completed no round fails.
    assert!(!coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.logs());
    assert!(coordinator.stderr_text().contains("the run completed no round"), "{}", coordinator.logs());
    assert!(tasks.iter().all(|(_, secure)| *secure), "a task without its secure part went out: {tasks:?}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let skipped = summary["skipped"].as_array().unwrap_or_else(|| panic!("no skipped rounds: {summary}"));
    let refused: Vec<u64> = skipped
        .iter()
        .filter(|s| s["reason"].as_str().is_some_and(|r| r.contains("a round needs at least 3")))
        .map(|s| s["round"].as_u64().unwrap())
        .collect();
    // P(no draw of 1 or 2 in 12 rounds) = (1/4)^12.
    assert!(!refused.is_empty(), "{summary}");
    for round in &refused {
        assert!(!tasks.iter().any(|(r, _)| u64::from(*r) == *round), "round {round} was refused, yet a task went out");
    }
    let rows: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("rounds.json")).unwrap()).unwrap();
    let skipped_rows = rows.as_array().unwrap().iter().filter(|r| r["skipped"].is_string()).count();
    assert_eq!(skipped_rows, skipped.len(), "rounds.json lists every skipped round: {rows}");
    assert!(coordinator.stderr_text().contains("no task was sent"), "{}", coordinator.logs());
}

/// A device with `--require-secure` refuses a coordinator without secure aggregation: it trains and
/// uploads nothing, says why, and the coordinator logs the refusal.
#[test]
fn a_device_that_requires_secure_aggregation_refuses_a_plain_round() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &["phone-1"]);
    let (mut coordinator, address) = start_coordinator(
        run,
        &config(run, "rbla", 1, 1, false).replace("grace_secs = 1", "grace_secs = 1\ndeadline_secs = 3"),
    );
    let mut device = Process::spawn(
        "phone-1",
        edge_run(&address, &run.join("pki/kits/phone-1"), 2, 32).arg("--require-secure"),
        &run.join("logs"),
    );
    let status = device.wait(Duration::from_secs(60));
    assert!(!status.success(), "{}", device.logs());
    assert!(device.stderr_text().contains("refuses to train or upload in the clear"), "{}", device.logs());
    assert!(!device.stderr_text().contains("uploading"), "{}", device.logs());
    coordinator.wait_for_stderr("device refused its round task", Duration::from_secs(30));
    coordinator.kill();
}

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
        // Weighted by samples, as the plain round is, so that the two can be compared exactly.
        config +=
            "[secure_aggregation]\nrange = 2.0\nmax_participants = 16\nmax_samples = 128\nweighting = \"samples\"\n\
                   phase_secs = 5\n";
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
                let (variable, value, _) = fault(point);
                command.env(variable, value);
            }
            (drops.filter(|p| fault(p).2), Process::spawn(id, &mut command, &run.join("logs")))
        })
        .collect();
    for (pauses, device) in &mut processes {
        if let Some(point) = pauses {
            device.wait_for_stderr(&format!("paused at {point}@1"), Duration::from_secs(120));
        }
    }
    assert!(coordinator.wait(Duration::from_secs(180)).success(), "{}", coordinator.logs());
    for (pauses, device) in &mut processes {
        if pauses.is_some() {
            device.kill();
        } else {
            assert!(device.wait(Duration::from_secs(60)).success(), "{}", device.logs());
        }
    }
    let (global, _) = read_safetensors(&run.join("global/round-1/adapter_model.safetensors"));
    let summary = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    (global, summary)
}

/// No file the coordinator wrote names a device, its sample count or its local metrics.
fn assert_nothing_of_one_device_is_kept(run: &Path, ids: &[&str]) {
    let mut files = Vec::new();
    let mut pending = vec![run.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            if path.is_dir() {
                // The test's own logs and the PKI are not the coordinator's output.
                if name != "logs" && name != "pki" {
                    pending.push(path);
                }
            } else {
                files.push(path);
            }
        }
    }
    let mut checked = 0;
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "json" || e == "csv")) {
        let text = std::fs::read_to_string(file).unwrap();
        for needle in ids.iter().copied().chain(["num_samples", "loss_before", "loss_after", "train_seconds"]) {
            assert!(!text.contains(needle), "{} holds '{needle}':\n{text}", file.display());
        }
        checked += 1;
    }
    assert!(checked >= 4, "summary, rounds.json, rounds.csv and a checkpoint's state: {files:?}");
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
        assert_eq!(record["revealed_rank"], 4, "{method}: every slot has three holders or more: {record}");
        // The coordinator never learns a device's sample count or metrics, and keeps nothing of
        // one device but its rank.
        assert_nothing_of_one_device_is_kept(secure_dir.path(), &DEVICES.map(|d| d.0));
        let difference = largest_difference(&plain, &secure);
        eprintln!("{method}: secure − plain ≤ {difference:.2e}, largest |B| {:.3}; {record}", largest_b(&plain));
        assert!(difference < TOLERANCE, "{method}: the secure round differs from the plain one by {difference}");
        assert!(largest_b(&plain) > 100.0 * TOLERANCE, "{method}: the round trained the adapter");
    }
}

#[test]
fn a_device_that_drops_at_any_phase_is_left_out_or_recovered() {
    // (where the phone drops, whether its update is in the sums, devices recovered)
    for (point, counted, recovered) in
        [("before-keys", false, 0), ("after-shares", false, 1), ("before-unmask", true, 0)]
    {
        let mut fleet = DEVICES;
        fleet[3].3 = Some(point); // the phone: three laptops still hold every slot
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

/// A device that garbles a share it sends: its recipient refuses the share and sits the round out
/// (its pairwise mask with the sender would not cancel), the coordinator recovers it as a dropout,
/// and the global adapter is exactly the plain round of the three others, not noise.
#[test]
fn a_device_sending_a_bad_share_does_not_corrupt_the_global() {
    let mut fleet: [Device; 4] = DEVICES.map(|(id, _, samples, _)| (id, 4, samples, None));
    fleet[0].3 = Some("corrupt-shares");
    let secure_dir = tempfile::tempdir().unwrap();
    let quorum_of_three = |config: String| config.replace("min_updates = 4", "min_updates = 3");
    let (secure, summary) = run_round_with(secure_dir.path(), "rbla", &fleet, None, true, &quorum_of_three);
    let logs = secure_dir.path().join("logs");
    let sitting_out: Vec<&str> = fleet
        .iter()
        .map(|d| d.0)
        .filter(|id| {
            std::fs::read_to_string(logs.join(format!("{id}.log")))
                .unwrap_or_default()
                .contains("a neighbour's share refused")
        })
        .collect();
    assert_eq!(sitting_out.len(), 1, "one recipient refuses the garbled share: {sitting_out:?}");
    let record = &summary["rounds"][0]["secure"];
    assert_eq!(record["survivors"], 3, "{record}");
    assert_eq!(record["recovered"], 1, "{record}");
    let others: Vec<Device> =
        fleet.iter().copied().filter(|d| d.0 != sitting_out[0]).map(|d| (d.0, d.1, d.2, None)).collect();
    let plain_dir = tempfile::tempdir().unwrap();
    let (plain, _) = run_round(plain_dir.path(), "rbla", &others, None, false);
    let difference = largest_difference(&plain, &secure);
    assert!(difference < TOLERANCE, "the secure round differs from the plain one by {difference}");
}

#[test]
fn a_round_with_fewer_survivors_than_the_threshold_is_discarded_and_reveals_nothing() {
    let mut fleet = DEVICES;
    fleet[2].3 = Some("after-shares");
    fleet[3].3 = Some("after-shares");
    let dir = tempfile::tempdir().unwrap();
    let (global, summary) = run_round_with(dir.path(), "rbla", &fleet, None, true, &|config| {
        config.replace("[secure_aggregation]\n", "[secure_aggregation]\nthreshold = 3\ndegree = 4\n")
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
    // Given the fleet's ranks, check says which slots too few devices hold to be revealed.
    let path = run.join("fleet.toml");
    std::fs::write(&path, config(run, "rbla", 4, 4, true).replace("max_rank = 4", "max_rank = 16")).unwrap();
    let fleet = |ranks: &str| {
        let output = Command::new(binary("flotilla-coordinator"))
            .args(["check", "--config"])
            .arg(&path)
            .args(["--fleet", ranks])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    let thin = fleet("2,4,8,16");
    assert!(
        thin.contains("reveals slots 1–4 only; slots 5–16 have fewer than the 3 holders")
            && thin.contains("slot 5: 2")
            && thin.contains("slot 9: 1"),
        "{thin}"
    );
    assert!(fleet("4,4,4,2").contains("reveals every slot it trains (1–4)"), "{}", fleet("4,4,4,2"));
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
