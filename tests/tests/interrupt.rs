//! Ctrl-C on a device: SIGINT while it trains abandons that round's training — nothing is sent —
//! closes the connection cleanly and exits with status 130; the coordinator finishes the round with
//! the other device and records nothing from the one that stopped.

use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_tests::{binary, provision, start_coordinator, Process};

#[test]
fn ctrl_c_while_training_abandons_the_round_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["steady", "quitter"]);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 1\nmin_devices = 2\nlocal_steps = 4000\ndeadline_secs = 120\n\
         [model.architecture.mlp]\ninput = 64\nhidden = [64]\nclasses = 4\n",
        run = run.display()
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let edge = |id: &str| {
        let mut command = Command::new(binary("flotilla-edge"));
        command
            .args(["run", "--coordinator", &address, "--rank", "2", "--samples", "256", "--kit"])
            .arg(pki.join("kits").join(id));
        Process::spawn(id, &mut command, &run.join("logs"))
    };
    let mut steady = edge("steady");
    let mut quitter = edge("quitter");

    quitter.wait_for_stderr("[round 1/1] training at rank", Duration::from_secs(60));
    let interrupted = Instant::now();
    let status = Command::new("kill").args(["-INT", &quitter.id().to_string()]).status().unwrap();
    assert!(status.success());
    let code = quitter.wait(Duration::from_secs(30));
    assert_eq!(code.code(), Some(130), "{code:?} {}", quitter.logs());
    assert!(interrupted.elapsed() < Duration::from_secs(20), "stopping took {:?}", interrupted.elapsed());
    assert!(quitter.stderr_text().contains("round 1's training abandoned, nothing sent"), "{}", quitter.logs());

    assert!(steady.wait(Duration::from_secs(120)).success(), "{}", steady.logs());
    assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());
    assert!(
        coordinator.stderr_text().contains("device left: closed by peer: device stopping"),
        "{}",
        coordinator.logs()
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let devices: Vec<&str> =
        summary["rounds"][0]["updates"].as_array().unwrap().iter().map(|u| u["device"].as_str().unwrap()).collect();
    assert_eq!(devices, vec!["steady"]);
}
