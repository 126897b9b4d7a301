//! A device certificate that ends during a run. The coordinator closes a session when the
//! certificate it was opened with expires (close code 3). With `[renewal]`, the device has already
//! renewed online and comes back with its new certificate; without it, the device stops with a clear
//! message (exit 2), and the run goes on with the others.

use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, certs, provision, start_coordinator, Process};

/// Long enough for a debug build to start and admit the device; short enough for CI.
const BRIEF_VALIDITY: &str = "30s";

fn config(run: &std::path::Path, rounds: u32, devices: usize, renewal: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = {rounds}\nmin_devices = {devices}\nlocal_steps = 3\ndeadline_secs = 60\n\
         [aggregation]\nmax_rank = 4\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 3\n{renewal}",
        run = run.display()
    )
}

fn edge(id: &str, address: &str, run: &std::path::Path, log_name: &str) -> Process {
    Process::spawn(
        log_name,
        Command::new(binary("flotilla-edge"))
            .args(["run", "--coordinator", address, "--rank", "4", "--samples", "32", "--renew-within", "1d"])
            .arg("--kit")
            .arg(run.join("pki/kits").join(id)),
        &run.join("logs"),
    )
}

#[test]
fn a_device_renews_online_and_comes_back_after_its_old_certificate_expires() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["steady"]);
    certs(&pki, &["issue", "device", "--id", "brief", "--valid-for", BRIEF_VALIDITY]);
    let renewal = format!("[renewal]\npki = \"{}\"\ndevice_validity_days = 30\n", pki.display());
    let (mut coordinator, address) = start_coordinator(run, &config(run, 2, 2, &renewal));

    let mut brief = edge("brief", &address, run, "brief");
    brief.wait_for_stderr("certificate renewed: valid until", Duration::from_secs(60));
    // The session still runs on the old certificate; at its end the coordinator closes it, and the
    // device reconnects with the renewed one.
    coordinator.wait_for_stderr("certificate expired; closing the session", Duration::from_secs(90));
    brief.wait_for_stderr_count("admitted by the coordinator", 2, Duration::from_secs(60));
    assert!(brief.stderr_text().contains("reconnecting with the renewed certificate"), "{}", brief.logs());

    let mut steady = edge("steady", &address, run, "steady");
    for device in [&mut brief, &mut steady] {
        assert!(device.wait(Duration::from_secs(120)).success(), "{}", device.logs());
    }
    assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());
    let log = coordinator.stderr_text();
    assert_eq!(log.matches("certificate renewed device=brief").count(), 1, "{log}");
    assert_eq!(log.matches("update accepted device=brief").count(), 2, "{log}");

    let inspected =
        certs(&pki, &["inspect", "--cert", &run.join("pki/kits/brief/cert.pem").to_string_lossy(), "--format", "json"]);
    let info: serde_json::Value = serde_json::from_slice(&inspected.stdout).unwrap();
    assert!(info["days_left"].as_i64().unwrap() >= 29, "{info}");
    // The CA's records know the renewal.
    let listed = String::from_utf8(certs(&pki, &["list", "--format", "json"]).stdout).unwrap();
    assert_eq!(listed.matches("\"id\": \"brief\"").count(), 2, "{listed}");
}

#[test]
fn without_renewal_an_expired_device_stops_cleanly_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["steady-1", "steady-2"]);
    certs(&pki, &["issue", "device", "--id", "brief", "--valid-for", BRIEF_VALIDITY]);
    let (mut coordinator, address) = start_coordinator(run, &config(run, 1, 2, ""));

    let mut brief = edge("brief", &address, run, "brief");
    brief.wait_for_stderr(
        "certificate not renewed: this coordinator does not renew certificates",
        Duration::from_secs(60),
    );
    let status = brief.wait(Duration::from_secs(90));
    assert_eq!(status.code(), Some(2), "{}", brief.logs());
    assert!(
        brief.stderr_text().contains("certificate (") && brief.stderr_text().contains("expired at"),
        "{}",
        brief.logs()
    );

    // Started again, it stops before connecting: the coordinator sees it once.
    let mut again = edge("brief", &address, run, "brief-again");
    assert_eq!(again.wait(Duration::from_secs(30)).code(), Some(2), "{}", again.logs());
    assert!(again.stderr_text().contains("flotilla-certs renew --kit"), "{}", again.logs());

    let mut steady: Vec<Process> = ["steady-1", "steady-2"].iter().map(|id| edge(id, &address, run, id)).collect();
    for device in &mut steady {
        assert!(device.wait(Duration::from_secs(120)).success(), "{}", device.logs());
    }
    assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());
    let log = coordinator.stderr_text();
    assert_eq!(log.matches("device joined device=brief").count(), 1, "{log}");
    assert!(log.contains("certificate expired; closing the session device=brief"), "{log}");
    assert!(log.contains("[round 1/1] aggregated 2 updates"), "{log}");
}
