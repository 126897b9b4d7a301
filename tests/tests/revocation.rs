//! A device's certificate is revoked while the coordinator runs: the coordinator reloads the CRL
//! without a restart, refuses the revoked device in the handshake (the device stops with status 2
//! and a clear message), and the run goes on with the others.

use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, certs, provision, start_coordinator, Process};

#[test]
fn a_device_revoked_while_the_coordinator_runs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["good-1", "good-2", "stolen"]);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\ncrl = \"{run}/pki/crl.pem\"\ncrl_reload_secs = 1\n\
         [round]\nrounds = 1\nmin_devices = 2\nlocal_steps = 10\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
        run = run.display()
    );
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
