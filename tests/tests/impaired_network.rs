//! Rounds over impaired links, through `flotilla_tests::impair` (a UDP proxy per device, since
//! `netem` is unavailable): 10% loss and 100 ms (+0–20 ms jitter) delay in each direction on every
//! device's link, and a device whose address keeps changing (QUIC connection migration) — with the
//! default transport settings, every round completes and nobody reconnects.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use flotilla_tests::impair::{ImpairProxy, Impairment};
use flotilla_tests::{binary, provision, start_coordinator, Process};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn config(run: &std::path::Path, rounds: u32, devices: usize, model: &str, max_rank: u32) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = {rounds}\nmin_devices = {devices}\nlocal_steps = 5\ndeadline_secs = 60\n\
         [aggregation]\nmax_rank = {max_rank}\n{model}",
        run = run.display()
    )
}

fn edge(id: &str, via: SocketAddr, rank: &str, pki: &std::path::Path, logs: &std::path::Path) -> Process {
    Process::spawn(
        id,
        Command::new(binary("flotilla-edge"))
            .args(["run", "--coordinator", &via.to_string(), "--rank", rank, "--samples", "64", "--kit"])
            .arg(pki.join("kits").join(id)),
        logs,
    )
}

#[test]
fn rounds_complete_with_ten_percent_loss_and_100_ms_delay_on_every_link() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["lossy-1", "lossy-2"]);
    let model = "[model.architecture.mlp]\ninput = 64\nhidden = [32]\nclasses = 4\n";
    let (mut coordinator, address) = start_coordinator(run, &config(run, 2, 2, model, 8));
    let coordinator_addr: SocketAddr = address.parse().unwrap();
    let rt = runtime();
    let bad = Impairment {
        loss: 0.10,
        delay: Duration::from_millis(100),
        jitter: Duration::from_millis(20),
        duplicate: 0.01,
    };
    let mut devices = Vec::new();
    for (i, id) in ["lossy-1", "lossy-2"].iter().enumerate() {
        let proxy = rt.block_on(ImpairProxy::start(coordinator_addr, bad, i as u64)).unwrap();
        devices.push(edge(id, proxy.address, "4", &pki, &run.join("logs")));
    }
    for device in &mut devices {
        assert!(device.wait(Duration::from_secs(120)).success(), "{}", device.logs());
    }
    assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());
    let log = coordinator.stderr_text();
    for round in 1..=2 {
        assert!(log.contains(&format!("[round {round}/2] aggregated 2 updates")), "{log}");
    }
    assert!(!log.contains("round skipped"), "{log}");
}

#[test]
fn a_device_whose_address_keeps_changing_uploads_without_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["mover"]);
    // A 1.8 MB update at rank 64, so that uploads span several address changes.
    let model = "[model.architecture.mlp]\ninput = 784\nhidden = [2048, 2048]\nclasses = 10\n";
    let (mut coordinator, address) = start_coordinator(run, &config(run, 2, 1, model, 64));
    let rt = runtime();
    let link = Impairment { delay: Duration::from_millis(5), ..Impairment::default() };
    let proxy = rt.block_on(ImpairProxy::start(address.parse().unwrap(), link, 7)).unwrap();
    let mut device = edge("mover", proxy.address, "64", &pki, &run.join("logs"));
    // QUIC forbids migrating during the handshake: move only once admitted; from then on the
    // device gets a new address whenever it sends and 25 ms have passed since its last move.
    device.wait_for_stderr("admitted by the coordinator", Duration::from_secs(60));
    proxy.move_while_sending(Duration::from_millis(25));
    assert!(device.wait(Duration::from_secs(120)).success(), "{}", device.logs());
    assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());
    // Two 1.8 MB uploads at this pace span many moves.
    assert!(proxy.moves() >= 10, "the device moved only {} times", proxy.moves());
    let device_log = device.stderr_text();
    assert!(!device_log.contains("connection to the coordinator lost"), "{device_log}");
    let log = coordinator.stderr_text();
    assert_eq!(log.matches("device joined device=mover").count(), 1, "one connection, never re-established\n{log}");
    assert_eq!(log.matches("update accepted device=mover").count(), 2, "{log}");
}
