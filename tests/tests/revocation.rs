//! A device's certificate is revoked while the coordinator runs: the coordinator reloads the CRL
//! without a restart, refuses the revoked device in the handshake (the device stops with status 2
//! and a clear message), and the run goes on with the others.

use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, certs, edge_run, provision, start_coordinator, Process};

/// One round of `min_devices` devices, the CRL reloaded every second.
fn config(run: &std::path::Path, min_devices: usize) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\ncrl = \"{run}/pki/crl.pem\"\ncrl_reload_secs = 1\n\
         [round]\nrounds = 1\nmin_devices = {min_devices}\nlocal_steps = 10\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
        run = run.display()
    )
}

#[test]
fn a_device_revoked_while_the_coordinator_runs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["good-1", "good-2", "stolen"]);
    let config = config(run, 2);
    let (mut coordinator, address) = start_coordinator(run, &config);
    let logs = run.join("logs");

    let revoked = certs(&pki, &["revoke", "--id", "stolen"]);
    assert!(String::from_utf8_lossy(&revoked.stdout).contains("revoked device 'stolen'"));
    let listing = String::from_utf8_lossy(&certs(&pki, &["list"]).stdout).to_string();
    assert!(listing.lines().any(|l| l.contains("stolen") && l.contains("REVOKED")), "{listing}");
    assert!(!listing.lines().any(|l| l.contains("good-1") && l.contains("REVOKED")), "{listing}");
    coordinator.wait_for_stderr("revocation list reloaded", Duration::from_secs(20));

    let edge = |id: &str| {
        let mut command = Command::new(binary("flotilla-edge"));
        command
            .args(["run", "--coordinator", &address, "--rank", "2", "--samples", "64", "--kit"])
            .arg(pki.join("kits").join(id));
        command
    };
    let mut stolen = Process::spawn("stolen", &mut edge("stolen"), &logs);
    assert_eq!(stolen.wait(Duration::from_secs(60)).code(), Some(2), "{}", stolen.logs());
    assert!(stolen.stderr_text().contains("refused this device's certificate"), "{}", stolen.logs());

    let mut good: Vec<Process> =
        ["good-1", "good-2"].iter().map(|id| Process::spawn(id, &mut edge(id), &logs)).collect();
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
    for device in &mut good {
        assert!(device.wait(Duration::from_secs(30)).success(), "{}", device.logs());
    }
    assert!(coordinator.stdout_text().contains("run finished: 1 round(s)"), "{}", coordinator.logs());
}

/// Revoking a device that renewed its certificate revokes both certificates (the old one is still
/// within its validity, and a thief may hold its key), and a session opened before the revocation
/// is cut when the coordinator reloads its CRL: the device stops with the reason, and the old
/// certificate is refused in the handshake.
#[test]
fn revoking_a_renewed_device_locks_out_both_certificates_and_cuts_its_live_session() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["phone", "absent"]);
    let kit = pki.join("kits/phone");
    // The old certificate and key, as a thief might have copied them.
    let old_kit = run.join("old-kit");
    std::fs::create_dir_all(&old_kit).unwrap();
    for file in ["ca.crt", "cert.pem", "key.pem"] {
        std::fs::copy(kit.join(file), old_kit.join(file)).unwrap();
    }
    // Renewal at the CA: request, sign --renew, install.
    let run_certs = |args: &[&str]| {
        let output = Command::new(binary("flotilla-certs")).args(args).output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    };
    let kit_arg = kit.to_str().unwrap();
    run_certs(&["renew", "--kit", kit_arg]);
    let signed = run.join("signed");
    let request = kit.join("request.csr");
    run_certs(&[
        "--dir",
        pki.to_str().unwrap(),
        "sign",
        "--renew",
        "--csr",
        request.to_str().unwrap(),
        "--out",
        signed.to_str().unwrap(),
    ]);
    run_certs(&["install", "--kit", kit_arg, "--cert", signed.join("cert.pem").to_str().unwrap()]);

    // Two devices are needed, and only one comes: the phone's session stays open, waiting.
    let config = config(run, 2);
    let (mut coordinator, address) = start_coordinator(run, &config);
    let logs = run.join("logs");
    let edge = |kit: &std::path::Path| edge_run(&address, kit, 2, 64);
    let mut phone = Process::spawn("phone", &mut edge(&kit), &logs);
    coordinator.wait_for_stderr("device joined", Duration::from_secs(60));

    let revoked = String::from_utf8_lossy(&certs(&pki, &["revoke", "--id", "phone"]).stdout).to_string();
    assert!(revoked.contains("revoked device 'phone' (serials "), "{revoked}");
    assert_eq!(phone.wait(Duration::from_secs(30)).code(), Some(2), "{}", phone.logs());
    assert!(phone.stderr_text().contains("certificate was revoked"), "{}", phone.logs());
    assert!(coordinator.stderr_text().contains("certificate revoked; closing the session"), "{}", coordinator.logs());

    for (name, kit) in [("phone-new", &kit), ("phone-old", &old_kit)] {
        let mut again = Process::spawn(name, &mut edge(kit), &logs);
        assert_eq!(again.wait(Duration::from_secs(60)).code(), Some(2), "{}", again.logs());
        assert!(again.stderr_text().contains("refused this device's certificate"), "{}", again.logs());
    }
    coordinator.kill();
}

/// A device checks the coordinator's certificate against the CRL in its kit: once the coordinator's
/// certificate is revoked and the new CRL is in the kit, the device refuses to connect and says
/// why (it does not retry, and it never sends its Hello).
#[test]
fn a_device_refuses_a_coordinator_whose_certificate_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["phone"]);
    assert!(pki.join("kits/phone/crl.pem").exists(), "a device kit carries the CA's CRL");
    let config = config(run, 1);
    let (mut coordinator, address) = start_coordinator(run, &config);
    let revoked = String::from_utf8_lossy(&certs(&pki, &["revoke", "--id", "coordinator"]).stdout).to_string();
    assert!(revoked.contains("'coordinator' (serial"), "{revoked}");
    std::fs::copy(pki.join("crl.pem"), pki.join("kits/phone/crl.pem")).unwrap();
    let mut phone = Process::spawn("phone", &mut edge_run(&address, &pki.join("kits/phone"), 2, 64), &run.join("logs"));
    assert_eq!(phone.wait(Duration::from_secs(60)).code(), Some(2), "{}", phone.logs());
    assert!(phone.stderr_text().contains("presented a revoked certificate"), "{}", phone.logs());
    assert!(!coordinator.stderr_text().contains("device joined"), "{}", coordinator.logs());
    coordinator.kill();
}

/// A device's kit keeps its CRL current: the coordinator hands its CRL over in the Welcome, and
/// the device stores it, having checked it is its CA's and newer than its own.
#[test]
fn a_device_refreshes_its_kit_crl_from_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["phone", "lost"]);
    let issued_with = std::fs::read(pki.join("kits/phone/crl.pem")).unwrap();
    certs(&pki, &["revoke", "--id", "lost"]);
    let current = std::fs::read(pki.join("crl.pem")).unwrap();
    assert_ne!(issued_with, current);
    let (mut coordinator, address) = start_coordinator(run, &config(run, 1));
    let mut phone = Process::spawn("phone", &mut edge_run(&address, &pki.join("kits/phone"), 2, 64), &run.join("logs"));
    assert!(phone.wait(Duration::from_secs(60)).success(), "{}", phone.logs());
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
    assert!(phone.stderr_text().contains("revocation list was refreshed"), "{}", phone.logs());
    assert_eq!(std::fs::read(pki.join("kits/phone/crl.pem")).unwrap(), current, "the kit holds the current CRL");
}
