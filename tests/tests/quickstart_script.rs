//! The README's main command, run as written (against the debug binaries, to skip a release build):
//! provisioning, a pretrained base, a fleet of six devices with four ranks, twelve rounds of RBLA on
//! Fashion-MNIST, the printed table, the reports and plots, and the exported adapter and merged model.

use std::process::Command;

use flotilla_tests::{binary, read_safetensors, run_ok, workspace_root};

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
    assert!(stdout.contains("run finished: 12 round(s) with rbla (R_max 16)"), "{stdout}");
    for round in 1..=12 {
        assert!(stdout.contains(&format!("[round {round}/12] aggregated 6 updates")), "{stdout}");
        assert!(run_dir.join(format!("global/round-{round}/adapter_model.safetensors")).exists());
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rounds_completed"], 12);
    // Fine-tuning improves on the pretrained base: test accuracy at R_max rises above the base's.
    assert!(stdout.contains("test accuracy of the global model"), "{stdout}");
    let accuracy_at_r_max = |evaluation: &serde_json::Value| {
        let first = &evaluation[0];
        assert_eq!(first["rank"], 16, "R_max comes first: {evaluation}");
        first["accuracy"].as_f64().unwrap()
    };
    let before = accuracy_at_r_max(&summary["initial_evaluation"]);
    assert!(before > 0.6, "the pretrained base is far better than chance: {before:.3}");
    let best = (0..12).map(|r| accuracy_at_r_max(&summary["rounds"][r]["evaluation"])).fold(0.0, f64::max);
    assert!(best > before + 0.03, "test accuracy at R_max: base {before:.3}, best round {best:.3}");
    // Every rank that took part is evaluated.
    let ranks: Vec<u64> =
        summary["rounds"][11]["evaluation"].as_array().unwrap().iter().map(|e| e["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, vec![16, 8, 4, 2]);
    // The reports, the plots and the exports are there.
    let csv = std::fs::read_to_string(run_dir.join("rounds.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 13, "header, base, 12 rounds:\n{csv}");
    for file in ["accuracy.png", "accuracy.svg", "participation.png", "participation.svg", "rounds.json"] {
        assert!(run_dir.join(file).exists(), "{file}");
    }
    let (adapter, _) = read_safetensors(&run_dir.join("export/adapter/adapter_model.safetensors"));
    assert_eq!(adapter["base_model.model.fc1.lora_A.weight"].rows, 16);
    let (merged, _) = read_safetensors(&run_dir.join("export/model.safetensors"));
    assert_eq!((merged["fc1.weight"].rows, merged["fc1.weight"].cols), (128, 784));
    assert!(merged.contains_key("head.weight") && !merged.keys().any(|k| k.contains("lora")));
    assert!(stdout.contains("exported:"), "{stdout}");
}
