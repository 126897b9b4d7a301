//! A device killed in the middle of an upload (SIGKILL, after half its update frame): the round
//! closes without it once its connection times out, and nothing of its partial update reaches the
//! aggregate — the round's records and recorded updates hold the other device only.

use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, provision, start_coordinator, Process};

#[test]
fn a_device_killed_mid_upload_leaves_nothing_in_the_aggregate() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["steady", "victim"]);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [transport]\nidle_timeout_secs = 3\nkeep_alive_secs = 1\n\
         [round]\nrounds = 1\nmin_devices = 2\nlocal_steps = 5\ndeadline_secs = 120\n\
         [aggregation]\nrecord_updates = true\n\
         [model.architecture.mlp]\ninput = 64\nhidden = [64]\nclasses = 4\n",
        run = run.display()
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let edge = |id: &str, fault: Option<&str>| {
        let mut command = Command::new(binary("flotilla-edge"));
        command
            .args(["run", "--coordinator", &address, "--rank", "4", "--samples", "128", "--kit"])
            .arg(pki.join("kits").join(id));
        if let Some(fault) = fault {
            command.env("FLOTILLA_FAULT_PAUSE", fault);
        }
        Process::spawn(id, &mut command, &run.join("logs"))
    };
    let mut victim = edge("victim", Some("mid-upload@1"));
    let mut steady = edge("steady", None);

    victim.wait_for_stderr("paused at mid-upload@1", Duration::from_secs(60));
    victim.kill();

    assert!(steady.wait(Duration::from_secs(60)).success(), "{}", steady.logs());
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
    let log = coordinator.stderr_text();
    assert!(log.contains("device left: timed out device=victim"), "{log}");
    assert!(!log.contains("update accepted device=victim"), "{log}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let devices: Vec<&str> =
        summary["rounds"][0]["updates"].as_array().unwrap().iter().map(|u| u["device"].as_str().unwrap()).collect();
    assert_eq!(devices, vec!["steady"]);
    let recorded: Vec<String> = std::fs::read_dir(run.join("updates/round-1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(recorded, vec!["steady"], "only the complete update was folded");
}
