//! `flotilla-edge sim`: twelve virtual devices in one process — each with its own certificate and
//! QUIC connection, a profile mix of three ranks, training two at a time — take part in every round
//! of a real coordinator, exactly like separate device processes would.

use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, certs, provision, start_coordinator, start_sim};

#[test]
fn a_simulated_fleet_takes_part_in_every_round() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    let ids: Vec<String> = (0..12).map(|i| format!("sim-{i:04}")).collect();
    provision(&pki, &[]);
    let issued = certs(&pki, &["issue", "devices", "--prefix", "sim", "--count", "12"]);
    assert!(String::from_utf8_lossy(&issued.stdout).contains("issued 12 device kits sim-0000 .. sim-0011"));
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 2\nmin_devices = 12\nlocal_steps = 10\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
        run = run.display()
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut sim = start_sim(run, &pki, &address, 12, "phone=2,laptop:4=1,gpu:8=1");
    assert!(sim.wait(Duration::from_secs(120)).success(), "{}", sim.logs());
    assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());
    assert!(sim.stdout_text().contains("sim: 12 of 12 device(s) finished, 24 local round(s)"), "{}", sim.logs());
    assert!(sim.stderr_text().contains("6×phone(rank 2)"), "{}", sim.logs());

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    for round in summary["rounds"].as_array().unwrap() {
        let updates = round["updates"].as_array().unwrap();
        let mut devices: Vec<&str> = updates.iter().map(|u| u["device"].as_str().unwrap()).collect();
        devices.sort_unstable();
        assert_eq!(devices, ids.iter().map(String::as_str).collect::<Vec<_>>(), "every virtual device, once");
        let rank_count = |r: u64| updates.iter().filter(|u| u["rank"] == r).count();
        assert_eq!((rank_count(2), rank_count(4), rank_count(8)), (6, 3, 3));
    }

    // Too few kits for the fleet: a clear error.
    let output = Command::new(binary("flotilla-edge"))
        .args(["sim", "--coordinator", &address, "--clients", "50", "--kits"])
        .arg(pki.join("kits"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("fewer than --clients 50"), "{stderr}");
}

/// `--behaviour`: phones that vanish mid-training and come back, laptops four times slower, GPU
/// boxes that come and go. The synchronous run still completes every round with the devices that
/// are there; dropped rounds are counted, and devices offline when the run ends are not failures.
#[test]
fn a_fleet_that_comes_and_goes_still_completes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &[]);
    certs(&pki, &["issue", "devices", "--prefix", "sim", "--count", "12"]);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 6\nmin_devices = 4\nmin_updates = 2\ndeadline_secs = 4\nlocal_steps = 10\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
        run = run.display()
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let behaviour = "phone:drop=0.4,offline=0.5;laptop:speed=4;gpu:online=0.2,offline=0.2";
    let mut sim = flotilla_tests::Process::spawn(
        "sim",
        Command::new(binary("flotilla-edge"))
            .args(["sim", "--coordinator", &address, "--clients", "12", "--concurrency", "2", "--samples", "64"])
            .args(["--profile-mix", "phone=2,laptop:4=1,gpu:8=1", "--max-attempts", "2", "--behaviour", behaviour])
            .arg("--kits")
            .arg(pki.join("kits")),
        &run.join("logs"),
    );
    assert!(coordinator.wait(Duration::from_secs(180)).success(), "{}", coordinator.logs());
    assert!(sim.wait(Duration::from_secs(120)).success(), "{}", sim.logs());
    let stdout = sim.stdout_text();
    let line = stdout.lines().find(|l| l.contains("drop-off(s)")).unwrap_or_else(|| panic!("{}", sim.logs()));
    // "sim: D drop-off(s), A of them mid-training (rounds abandoned); O device(s) offline when the run ended"
    let numbers: Vec<u32> = line.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
    let (drop_offs, abandoned) = (numbers[0], numbers[1]);
    assert!(abandoned >= 1, "phones drop 40% of their rounds: {line}");
    assert!(drop_offs > abandoned, "the GPU boxes come and go between rounds too: {line}");

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let rounds = summary["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 6, "every round completes");
    let updates: Vec<&serde_json::Value> = rounds.iter().flat_map(|r| r["updates"].as_array().unwrap()).collect();
    let by_rank = |rank: u64| updates.iter().filter(|u| u["rank"] == rank).count();
    // Six phones drop about 40% of their rounds; the three slow laptops answer every round they are asked.
    assert!(updates.len() < 72, "some rounds lost devices: {} updates", updates.len());
    assert!(by_rank(4) >= 3 * 5, "the slow laptops still deliver: {} updates", by_rank(4));
    assert!(by_rank(2) < 6 * 6, "the phones lost rounds: {} updates", by_rank(2));
}
