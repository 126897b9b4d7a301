//! The README's main command, run as written (against the debug binaries, to skip a release build):
//! provisioning, coordinator, a fleet of three ranks, three rounds, a printed summary.

use std::process::Command;

use flotilla_tests::{binary, run_ok, workspace_root};

#[test]
fn quickstart_completes_and_prints_the_round_summary() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let bin_dir = binary("flotilla-coordinator").parent().unwrap().to_path_buf();
    let output = run_ok(
        Command::new("bash")
            .arg(workspace_root().join("deploy/quickstart.sh"))
            .env("FLOTILLA_BIN_DIR", &bin_dir)
            .env("FLOTILLA_RUN_DIR", &run_dir),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("run finished: 3 round(s) with rbla (R_max 8)"), "{stdout}");
    for round in 1..=3 {
        assert!(stdout.contains(&format!("[round {round}/3] aggregated 3 updates")), "{stdout}");
        assert!(run_dir.join(format!("global/round-{round}/adapter_model.safetensors")).exists());
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rounds_completed"], 3);
    // The federated run learns: test accuracy at R_max rises well above the base model's.
    assert!(stdout.contains("test accuracy of the global model"), "{stdout}");
    let accuracy_at_r_max = |evaluation: &serde_json::Value| {
        let first = &evaluation[0];
        assert_eq!(first["rank"], 8, "R_max comes first: {evaluation}");
        first["accuracy"].as_f64().unwrap()
    };
    let before = accuracy_at_r_max(&summary["initial_evaluation"]);
    let after = accuracy_at_r_max(&summary["rounds"][2]["evaluation"]);
    assert!(after > before + 0.3, "test accuracy at R_max: base {before:.3}, after 3 rounds {after:.3}");
    // Every rank that took part is evaluated.
    let ranks: Vec<u64> =
        summary["rounds"][2]["evaluation"].as_array().unwrap().iter().map(|e| e["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, vec![8, 4, 2]);
}
