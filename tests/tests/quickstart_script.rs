//! The README's main command, run as written (against the debug binaries, to skip a release build):
//! provisioning, all-MiniLM-L6-v2 fetched by the devices from the coordinator, four devices of ranks
//! 2 to 16 on label-skewed BBC News shards, rounds of Fold-and-Fill (the default method; fewer and shorter rounds than the script's defaults,
//! to keep the suite quick), the per-rank table, the reports and plots, the exported adapter; and the
//! Fashion-MNIST demo behind `FLOTILLA_TASK=fashion-mnist`, with its pretrained base.

use std::process::Command;

use flotilla_tests::{binary, read_safetensors, run_ok, workspace_root};

#[test]
fn quickstart_fine_tunes_minilm_on_bbc_news_across_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let bin_dir = binary("flotilla-coordinator").parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("texts.txt"), "The striker scored twice in the final.\nShares fell sharply.\n")
        .unwrap();
    let output = run_ok(
        Command::new("bash")
            .arg(workspace_root().join("deploy/quickstart.sh"))
            .env("FLOTILLA_BIN_DIR", &bin_dir)
            .env("FLOTILLA_RUN_DIR", &run_dir)
            .env("FLOTILLA_ROUNDS", "3")
            .env("FLOTILLA_LOCAL_STEPS", "12")
            .env("FLOTILLA_EVAL_SAMPLES", "100"),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("run finished: 3 round(s) with fold-and-fill (R_max 16)"), "{stdout}");
    for round in 1..=3 {
        assert!(stdout.contains(&format!("[round {round}/3] aggregated 4 updates")), "{stdout}");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    let accuracy = |evaluation: &serde_json::Value, rank: u64| {
        evaluation.as_array().unwrap().iter().find(|e| e["rank"] == rank).unwrap()["accuracy"].as_f64().unwrap()
    };
    let before = accuracy(&summary["initial_evaluation"], 16);
    let last = &summary["rounds"][2]["evaluation"];
    let ranks: Vec<u64> = last.as_array().unwrap().iter().map(|e| e["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, vec![16, 8, 4, 2], "every rank that took part is evaluated");
    let best = ranks.iter().map(|&r| accuracy(last, r)).fold(0.0, f64::max);
    assert!(best > before + 0.1, "held-out accuracy: base {before:.3}, best slice after 3 rounds {best:.3}");
    // A stratified sample: every label in proportion to the test split, not the first 100 by key.
    let listed = std::fs::read_to_string(run_dir.join("evaluation-examples.txt")).unwrap();
    assert_eq!(listed.lines().count(), 100);
    let label_count = |label: &str| listed.lines().filter(|key| key.starts_with(&format!("{label}/"))).count();
    for label in ["business", "entertainment", "politics", "sports", "tech"] {
        assert!((14..=26).contains(&label_count(label)), "{label}: {} of 100\n{listed}", label_count(label));
    }
    let r_max = &last.as_array().unwrap()[0];
    assert_eq!(r_max["per_class"].as_array().unwrap().len(), 5, "{r_max}");
    assert!(r_max["macro_f1"].as_f64().unwrap() > 0.0);
    assert!(stdout.contains("per class at R_max after round 3 (macro-F1"), "{stdout}");
    // Federated evaluation: the four devices score every model on their shards of the test split,
    // which together are the whole split (the central evaluation above samples 100 of it).
    assert!(stdout.contains("federated accuracy on the devices' own held-out data"), "{stdout}");
    for round in summary["rounds"].as_array().unwrap() {
        let federated = &round["federated_evaluation"];
        assert_eq!(federated["reported"], 4, "{federated}");
        assert_eq!(federated["overall"]["examples"], 415, "{federated}");
        assert_eq!(federated["by_class"].as_object().unwrap().len(), 4, "{federated}");
    }
    let fetched = std::fs::read_dir(run_dir.join("device-cache/bases")).unwrap().count();
    assert_eq!(fetched, 1, "one base, fetched from the coordinator once into the devices' cache");
    let (adapter, _) = read_safetensors(&run_dir.join("export/adapter/adapter_model.safetensors"));
    // Fold-and-Fill's global is a plain rank-R_max LoRA: the PEFT adapter holds it as it is.
    let query = &adapter["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"];
    assert_eq!((query.rows, query.cols), (16, 384));
    assert!(adapter.keys().all(|name| !name.ends_with("merged_delta")), "PEFT has no place for ΔW");
    assert!(adapter.contains_key("base_model.model.classifier.weight"));
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(run_dir.join("export/merged").join(file).exists(), "{file}");
    }
    assert!(run_dir.join("accuracy.png").exists());
    // The exported model labels texts.
    let classify = run_ok(
        Command::new(binary("flotilla-coordinator"))
            .args(["classify", "--format", "json", "--input"])
            .arg(run_dir.join("texts.txt"))
            .arg("--model")
            .arg(run_dir.join("export/merged")),
    );
    let verdicts: Vec<serde_json::Value> =
        String::from_utf8_lossy(&classify.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(verdicts.len(), 2);
    assert!(verdicts.iter().all(|v| v["logits"].as_array().unwrap().len() == 5));
    // Settings it cannot honour are refused, not silently clamped.
    for (flag, value, says) in [("--max-length", "100000", "1 to 512 tokens"), ("--batch-size", "0", "at least 1")] {
        let refused = Command::new(binary("flotilla-coordinator"))
            .args(["classify", flag, value, "--input"])
            .arg(run_dir.join("texts.txt"))
            .arg("--model")
            .arg(run_dir.join("export/merged"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && stderr.contains(says), "{flag} {value}: {stderr}");
    }
}

#[test]
fn quickstart_fashion_mnist_demo_completes_and_prints_the_round_summary() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let bin_dir = binary("flotilla-coordinator").parent().unwrap().to_path_buf();
    let output = run_ok(
        Command::new("bash")
            .arg(workspace_root().join("deploy/quickstart.sh"))
            .env("FLOTILLA_BIN_DIR", &bin_dir)
            .env("FLOTILLA_RUN_DIR", &run_dir)
            .env("FLOTILLA_TASK", "fashion-mnist"),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("run finished: 12 round(s) with fold-and-fill (R_max 16)"), "{stdout}");
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
    // The global adapter at R_max, exported as it is.
    let fc1 = &adapter["base_model.model.fc1.lora_A.weight"];
    assert_eq!((fc1.rows, fc1.cols), (16, 784));
    let (merged, _) = read_safetensors(&run_dir.join("export/model.safetensors"));
    assert_eq!((merged["fc1.weight"].rows, merged["fc1.weight"].cols), (128, 784));
    assert!(merged.contains_key("head.weight") && !merged.keys().any(|k| k.contains("lora")));
    assert!(stdout.contains("exported:"), "{stdout}");
}

/// `FLOTILLA_TASK=smollm2`: the decoder writes BBC headlines; one short round here (the script's
/// default is 3). The held-out loss per headline token falls at every rank, the summary shows
/// ROUGE-L and example headlines, and the export is a PEFT causal-LM adapter plus an HF directory
/// that `generate` answers with.
#[test]
fn quickstart_smollm2_writes_headlines_and_the_headline_loss_falls() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let bin_dir = binary("flotilla-coordinator").parent().unwrap().to_path_buf();
    let output = run_ok(
        Command::new("bash")
            .arg(workspace_root().join("deploy/quickstart.sh"))
            .env("FLOTILLA_BIN_DIR", &bin_dir)
            .env("FLOTILLA_RUN_DIR", &run_dir)
            .env("FLOTILLA_TASK", "smollm2")
            .env("FLOTILLA_ROUNDS", "1")
            .env("FLOTILLA_LOCAL_STEPS", "3")
            .env("FLOTILLA_EVAL_SAMPLES", "8"),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("[round 1/1] aggregated 4 updates"), "{stdout}");
    assert!(
        stdout.contains("held-out headlines, per rank") && stdout.contains("example headlines at R_max"),
        "{stdout}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap();
    let loss = |evaluation: &serde_json::Value| evaluation[0]["loss"].as_f64().unwrap();
    let (before, after) = (loss(&summary["initial_evaluation"]), loss(&summary["rounds"][0]["evaluation"]));
    assert!(after < before, "held-out loss per headline token {before:.3} → {after:.3}");
    assert!(summary["rounds"][0]["evaluation"][0]["rouge_l"].as_f64().is_some());
    let (adapter, _) = read_safetensors(&run_dir.join("export/adapter/adapter_model.safetensors"));
    let query = &adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    assert_eq!((query.rows, query.cols), (16, 576));
    let answer = run_ok(
        Command::new(binary("flotilla-coordinator"))
            .args(["generate", "--max-new-tokens", "12", "--prompt", "What is the capital of France?", "--model"])
            .arg(run_dir.join("export/merged")),
    );
    assert!(!String::from_utf8_lossy(&answer.stdout).trim().is_empty(), "generate wrote nothing");
}
