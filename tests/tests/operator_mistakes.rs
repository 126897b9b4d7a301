//! Mistakes an operator makes that must not lose data (issue 37).

use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, edge_run, provision, start_coordinator, Process};

/// One round of one device on a small MLP in `run`, with `round` (more `[round]` settings).
fn config(run: &std::path::Path, round: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 1\nmin_devices = 1\nlocal_steps = 5\n{round}\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
        run = run.display()
    )
}

/// A second coordinator on the same run directory is refused at once, naming the first one's pid
/// and address, and writes nothing; the first goes on. A lock left by a killed coordinator is taken
/// over by the next.
#[test]
fn a_second_coordinator_on_a_run_directory_is_refused_and_a_stale_lock_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &["phone"]);
    let config = config(run, "");
    let (mut first, address) = start_coordinator(run, &config);
    let second_config = run.join("second.toml");
    std::fs::write(&second_config, config.replace("/addr\"", "/addr-2\"")).unwrap();
    let output =
        Command::new(binary("flotilla-coordinator")).args(["serve", "--config"]).arg(&second_config).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("is in use by another coordinator"), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.id())) && stderr.contains(&address), "{stderr}");
    assert!(!run.join("addr-2").exists(), "the second wrote nothing");
    let (ok, checked) = flotilla_tests::check_config(run, &config);
    assert!(!ok && checked.contains("in use by another coordinator"), "check sees the holder too: {checked}");
    assert_eq!(std::fs::read_to_string(run.join("addr")).unwrap(), address, "the first's address stands");

    first.kill();
    std::fs::remove_file(run.join("addr")).unwrap();
    let (mut third, third_address) = start_coordinator(run, &config);
    let mut phone =
        Process::spawn("phone", &mut edge_run(&third_address, &run.join("pki/kits/phone"), 2, 32), &run.join("logs"));
    assert!(phone.wait(Duration::from_secs(60)).success(), "{}", phone.logs());
    assert!(third.wait(Duration::from_secs(60)).success(), "{}", third.logs());
}

/// A device that cannot use its own data says so and closes with that reason; the coordinator logs
/// the true cause, waits for the round's deadline before skipping it (a broken fleet costs a round
/// per deadline, not the run in seconds), and a run that completed no round exits with a failure
/// that says why.
#[test]
fn a_device_without_usable_data_says_so_and_a_run_whose_every_round_was_skipped_fails() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &["phone"]);
    let deadline = Duration::from_secs(6);
    let config = config(run, &format!("deadline_secs = {}\n", deadline.as_secs()));
    let (mut coordinator, address) = start_coordinator(run, &config);
    let empty = run.join("no-data");
    std::fs::create_dir_all(&empty).unwrap();
    let started = std::time::Instant::now();
    let mut phone = Process::spawn(
        "phone",
        edge_run(&address, &run.join("pki/kits/phone"), 2, 32).arg("--data").arg(&empty),
        &run.join("logs"),
    );
    assert!(!phone.wait(Duration::from_secs(60)).success(), "{}", phone.logs());
    let device_says = phone.stderr_text();
    assert!(device_says.contains("cannot use its own data") && device_says.contains("no-data"), "{device_says}");
    assert!(!device_says.contains("coordinator's model"), "the device's data is not the model's fault: {device_says}");
    assert!(!coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
    assert!(started.elapsed() >= deadline, "the round was skipped before its deadline");
    let logs = coordinator.stderr_text();
    assert!(logs.contains("device cannot use its own data and left"), "{logs}");
    assert!(
        logs.contains("by the deadline, short of the quorum of 1 (1 participant(s) cannot use its own data"),
        "{logs}"
    );
    assert!(logs.contains("the run completed no round: all 1 were skipped"), "{logs}");
}

/// `check` makes every check `serve` makes before it listens — data sets present, the checkpoint
/// it would resume compatible — lists every problem at once, and writes nothing (it used to create
/// the run directory).
#[test]
fn check_is_as_strict_as_serve_lists_every_problem_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &[]);
    let run_dir = run.join("not/yet/there");
    let broken = config(&run_dir, "")
        .replace(&format!("{}/pki", run_dir.display()), &format!("{}/no-pki", run.display()))
        .replace(
            "[model.architecture.mlp]",
            &format!(
                "[evaluation]\ntest_data = \"{run}/no-test-set\"\n[model.pretrain]\ndata = \"{run}/no-public-set\"\n\
                 samples = 100\n[model.architecture.mlp]",
                run = run.display()
            ),
        )
        .replace("input = 16", "input = 784")
        .replace("classes = 4", "classes = 10");
    let (ok, out) = flotilla_tests::check_config(run, &broken);
    assert!(!ok, "{out}");
    for problem in
        ["3 problem(s)", "[tls]", "no-pki", "[model]", "no-public-set", "[evaluation] test_data", "no-test-set"]
    {
        assert!(out.contains(problem), "'{problem}' missing from:\n{out}");
    }
    assert!(!run.join("not").exists(), "check created {}", run_dir.display());

    // A run directory whose checkpoint `serve` would refuse to resume.
    let good_dir = run.join("resumed");
    let round = good_dir.join("global/round-1");
    std::fs::create_dir_all(&round).unwrap();
    std::fs::write(
        round.join("state.json"),
        r#"{"round": 1, "method": "fold-and-fill", "fingerprint": "from-another-model"}"#,
    )
    .unwrap();
    let config_for = |dir: &std::path::Path| {
        config(dir, "").replace(&format!("{}/pki", dir.display()), &format!("{}/pki", run.display()))
    };
    let (ok, out) = flotilla_tests::check_config(run, &config_for(&good_dir));
    assert!(!ok && out.contains("cannot resume") && out.contains("changed incompatibly"), "{out}");
    let entries = || std::fs::read_dir(&good_dir).unwrap().count();
    assert_eq!(entries(), 1, "check wrote into the run directory");
    let (ok, out) = flotilla_tests::check_config(run, &config_for(&run.join("fresh")));
    assert!(ok, "{out}");
    assert!(!run.join("fresh").exists());
}

/// Monitoring sees the configured run before any device joins: `/metrics` has the connected
/// devices (0) and the phase, and `status` the configured rounds and method.
#[test]
fn metrics_and_status_show_the_configured_run_before_any_device_joins() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &[]);
    let port = flotilla_tests::free_tcp_port();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 3\nmin_devices = 2\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\n\
         [privacy]\nclip_norm = 0.1\nnoise_multiplier = 1.0\nepsilon = 8.0\ndelta = 1e-3\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
        run = run.display()
    );
    let (mut coordinator, _) = start_coordinator(run, &config);
    // The address file is written as the ports open, a moment before the round driver starts.
    let mut body = String::new();
    for _ in 0..50 {
        body = flotilla_tests::http_get(port, "/metrics").expect("the metrics endpoint answers");
        if body.contains("fl_clients_connected") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(flotilla_tests::metric_value(&body, "fl_clients_connected"), Some(0.0), "{body}");
    assert_eq!(flotilla_tests::metric_value(&body, "fl_phase{phase=\"waiting_for_devices\"}"), Some(1.0), "{body}");
    let output = Command::new(binary("flotilla-coordinator"))
        .args(["status", "--address", &format!("127.0.0.1:{port}"), "--format", "json"])
        .output()
        .unwrap();
    let state: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(state["rounds_total"], 3, "{state}");
    assert_eq!(state["method"], "fold-and-fill", "{state}");
    assert_eq!(state["devices_connected"], 0, "{state}");
    // Under [privacy], the plan: LoRA on fc1 (16 → 8) at R_max 8, and the head (8 → 4).
    let plan = &state["privacy_plan"];
    assert_eq!(plan["noised_coordinates"], 8 * 16 + 8 * 8 + 4 * 8 + 4, "{state}");
    assert_eq!(plan["expected_cohort"], 2.0, "{state}");
    assert_eq!(state["privacy"]["epsilon"], 0.0, "no round sampled yet, nothing spent: {state}");
    assert!(plan["noise_to_signal"].as_f64().unwrap() > 1.0, "{state}");
    assert!(coordinator.stderr_text().contains("this run will learn almost nothing"), "{}", coordinator.logs());
    coordinator.kill();
}

/// A mistyped coordinator address: each attempt fails within seconds with "cannot reach", not
/// after the 60 s idle timeout, and the device gives up after its attempts.
#[test]
fn a_device_pointed_at_nothing_says_it_cannot_reach_it_within_seconds() {
    let dir = tempfile::tempdir().unwrap();
    provision(&dir.path().join("pki"), &["phone"]);
    let nowhere = format!("127.0.0.1:{}", flotilla_tests::free_udp_port());
    let started = std::time::Instant::now();
    let mut phone = Process::spawn(
        "phone",
        edge_run(&nowhere, &dir.path().join("pki/kits/phone"), 2, 32).args(["--max-attempts", "2"]),
        &dir.path().join("logs"),
    );
    assert!(!phone.wait(Duration::from_secs(90)).success(), "{}", phone.logs());
    // Each attempt used to wait out the 60 s idle timeout: two took over 2 minutes.
    assert!(started.elapsed() < Duration::from_secs(60), "two attempts took {:?}", started.elapsed());
    assert!(phone.stderr_text().contains(&format!("cannot reach {nowhere}: no answer")), "{}", phone.logs());
}

/// A private key others may read is refused, coordinator's and device's alike, with the fix.
#[test]
fn a_kit_key_others_may_read_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &["phone"]);
    let key = run.join("pki/kits/coordinator/key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = run.join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\n[tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
             [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
            run = run.display()
        ),
    )
    .unwrap();
    let output =
        Command::new(binary("flotilla-coordinator")).args(["serve", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains(&format!("chmod 600 {}", key.display())), "{stderr}");

    let device_key = run.join("pki/kits/phone/key.pem");
    std::fs::set_permissions(&device_key, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = Command::new(binary("flotilla-edge"))
        .args(["run", "--coordinator", "127.0.0.1:9", "--rank", "2", "--max-attempts", "1", "--kit"])
        .arg(run.join("pki/kits/phone"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("others may read or change it"), "{stderr}");
}

/// Kits issued without flags point devices at the coordinator the CA knows (its certificate's name
/// and its kit's port), `issue devices` writes the kit path its help promises, and `sim` takes
/// only kits the coordinator would admit, saying how many it took and which it skipped and why.
#[test]
fn kits_default_to_the_known_coordinator_and_sim_skips_revoked_and_foreign_kits() {
    use flotilla_tests::certs;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    certs(&pki, &["init"]);
    certs(&pki, &["issue", "coordinator", "--name", "localhost", "--loopback", "--address", "127.0.0.1:7443"]);
    certs(&pki, &["issue", "device", "--id", "phone"]);
    let env = std::fs::read_to_string(pki.join("kits/phone/edge.env")).unwrap();
    assert!(env.contains("FLOTILLA_COORDINATOR=localhost:7443\n"), "{env}");
    assert!(env.contains("FLOTILLA_SERVER_NAME=localhost\n"), "{env}");
    let help = certs(&pki, &["issue", "devices", "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("<pki>/kits/<id>"));
    certs(&pki, &["issue", "devices", "--prefix", "sim", "--count", "3"]);
    let env = std::fs::read_to_string(pki.join("kits/sim-0000/edge.env")).unwrap();
    assert!(env.contains(&format!("FLOTILLA_KIT={}\n", pki.join("kits/sim-0000").display())), "{env}");
    let inspected = certs(&pki, &["inspect", "--id", "coordinator"]);
    let text = String::from_utf8_lossy(&inspected.stdout);
    assert!(text.contains("id:          coordinator\n") && text.contains("name:        localhost\n"), "{text}");

    certs(&pki, &["revoke", "--id", "sim-0000"]);
    let other = run.join("other-pki");
    certs(&other, &["init"]);
    certs(&other, &["issue", "device", "--id", "sim-9999"]);
    std::fs::rename(other.join("kits/sim-9999"), pki.join("kits/sim-9999")).unwrap();
    let sim = |clients: &str, address: &str| {
        let mut command = Command::new(binary("flotilla-edge"));
        command.args(["sim", "--coordinator", address, "--clients", clients, "--samples", "32", "--kits"]);
        command.arg(pki.join("kits"));
        command
    };
    let output = sim("4", "127.0.0.1:9").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    for part in
        ["3 usable device kits", "1 revoked (sim-0000)", "1 from another CA (sim-9999)", "fewer than --clients 4"]
    {
        assert!(stderr.contains(part), "'{part}' missing: {stderr}");
    }

    let config = config(run, "").replace("min_devices = 1", "min_devices = 3");
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut fleet = Process::spawn("sim", &mut sim("3", &address), &run.join("logs"));
    assert!(fleet.wait(Duration::from_secs(120)).success(), "{}", fleet.logs());
    let stdout = fleet.stdout_text();
    assert!(stdout.contains("5 device kit(s)") && stdout.contains("3 of them usable"), "{stdout}");
    assert!(stdout.contains("sim: 3 of 3 device(s) finished"), "{stdout}");
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
}

/// A device making its own key installs its signed certificate as `docs/operations.md` shows,
/// without `--ca` (the `ca.crt` that `sign` wrote beside it is used); with no CA certificate
/// anywhere, one message says what to pass, once.
#[test]
fn install_finds_the_ca_certificate_sign_wrote_and_says_once_what_is_missing() {
    use flotilla_tests::certs;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    certs(&pki, &["init"]);
    let edge = |args: &[&str]| Command::new(binary("flotilla-certs")).args(args).output().unwrap();
    let kit = run.join("kit").display().to_string();
    assert!(edge(&["request", "--id", "dev-1", "--kit", &kit]).status.success());
    let signed = run.join("signed").display().to_string();
    certs(&pki, &["sign", "--csr", &format!("{kit}/request.csr"), "--out", &signed]);

    let lone = run.join("lone");
    std::fs::create_dir_all(&lone).unwrap();
    std::fs::copy(run.join("signed/cert.pem"), lone.join("cert.pem")).unwrap();
    let missing = edge(&["install", "--kit", &kit, "--cert", &lone.join("cert.pem").display().to_string()]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && stderr.contains("pass --ca"), "{stderr}");
    assert_eq!(stderr.matches("no CA certificate").count(), 1, "said once: {stderr}");

    let installed = edge(&["install", "--kit", &kit, "--cert", &format!("{signed}/cert.pem")]);
    assert!(installed.status.success(), "{}", String::from_utf8_lossy(&installed.stderr));
    assert!(run.join("kit/key.pem").exists() && run.join("kit/ca.crt").exists());
}
