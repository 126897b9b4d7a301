//! A straggler whose round closed without it: one update is the round's quorum, the run finishes,
//! and the coordinator closes while the other device is still training. That device learns from
//! the close that the run is over and stops cleanly, instead of reconnecting to a coordinator that
//! has gone until its attempts run out.

use std::process::Command;
use std::time::Duration;

use flotilla_tests::{edge_run, provision, start_coordinator, Process};

#[test]
fn a_device_still_training_when_the_run_finishes_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["quick", "straggler"]);
    // One update is a quorum and there is no grace: the first upload closes the round and the run.
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 1\nmin_devices = 2\nmin_updates = 1\ngrace_secs = 0\nlocal_steps = 20000\n\
         [aggregation]\nmethod = \"fedavg\"\nmax_rank = 2\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
        run = run.display()
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let device =
        |id: &str| Process::spawn(id, &mut edge_run(&address, &pki.join("kits").join(id), 2, 64), &run.join("logs"));
    let mut straggler = device("straggler");
    let mut quick = device("quick");
    // Both train for seconds; the straggler is frozen mid-training until the run is over and the
    // coordinator has gone.
    straggler.wait_for_stderr("training at rank 2", Duration::from_secs(60));
    let signal = |name: &str| {
        let status = Command::new("kill").args([name, &straggler.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill {name}");
    };
    signal("-STOP");
    assert!(quick.wait(Duration::from_secs(60)).success(), "{}", quick.logs());
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
    signal("-CONT");
    assert!(straggler.wait(Duration::from_secs(30)).success(), "{}", straggler.logs());

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rounds"][0]["updates"].as_array().unwrap().len(), 1, "{summary}");
    let log = straggler.stderr_text();
    assert!(log.contains("the coordinator ended the run while this device was"), "{log}");
    assert!(!log.contains("retrying"), "the straggler must not reconnect to a finished run: {log}");
    assert!(
        straggler.stdout_text().contains("the run finished while this device was training"),
        "{}",
        straggler.logs()
    );
}
