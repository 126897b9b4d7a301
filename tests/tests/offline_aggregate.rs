//! `flotilla-coordinator aggregate` on PEFT directories: the worked example of the shared notes
//! through the real command, and one clear line (non-zero exit) for each kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flotilla_tests::{binary, read_safetensors, run_ok, write_peft_adapter};

const A: &str = "base_model.model.layer.lora_A.weight";
const B: &str = "base_model.model.layer.lora_B.weight";

/// The notes' worked example: A_k[i,j] = c·(i+1) + j (r × 3), B_k[o,i] = c·(o+1) + i (2 × r).
fn worked_client(dir: &Path, c: f32, rank: usize, n: Option<u64>, alpha: f64) -> PathBuf {
    let a: Vec<f32> = (0..rank).flat_map(|i| (0..3).map(move |j| c * (i as f32 + 1.0) + j as f32)).collect();
    let b: Vec<f32> = (0..2).flat_map(|o| (0..rank).map(move |i| c * (o as f32 + 1.0) + i as f32)).collect();
    write_peft_adapter(dir, &[(A.into(), rank, 3, a), (B.into(), 2, rank, b)], rank, alpha, n);
    dir.to_path_buf()
}

/// Three clients with one constant scale lora_alpha / r = 2.
fn worked_fleet(root: &Path) -> Vec<PathBuf> {
    vec![
        worked_client(&root.join("c2"), 1.0, 2, Some(100), 4.0),
        worked_client(&root.join("c4"), 2.0, 4, Some(200), 8.0),
        worked_client(&root.join("c8"), 4.0, 8, Some(100), 16.0),
    ]
}

fn aggregate(method: &str, out: &Path, clients: &[PathBuf]) -> Command {
    let mut command = Command::new(binary("flotilla-coordinator"));
    command.args(["aggregate", "--method", method, "--out"]).arg(out).args(clients);
    command
}

fn assert_fails(command: &mut Command, mentions: &[&str]) -> Output {
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{command:?} should fail\n{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line, got:\n{stderr}");
    for m in mentions {
        assert!(stderr.contains(m), "error should mention '{m}': {stderr}");
    }
    output
}

#[test]
fn worked_example_through_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let clients = worked_fleet(dir.path());
    let out = dir.path().join("rbla");
    let output = run_ok(&mut aggregate("rbla", &out, &clients));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("aggregated 3 adapters (ranks 2,4,8) with rbla"), "{stdout}");
    let (tensors, meta) = read_safetensors(&out.join("adapter_model.safetensors"));
    assert_eq!(meta["num_samples"], "400");
    let want_b = [
        2.25,
        3.25,
        14.0 / 3.0,
        17.0 / 3.0,
        8.0,
        9.0,
        10.0,
        11.0,
        4.5,
        5.5,
        22.0 / 3.0,
        25.0 / 3.0,
        12.0,
        13.0,
        14.0,
        15.0,
    ];
    for (g, w) in tensors[B].values.iter().zip(want_b) {
        assert!((g - w).abs() < 1e-5, "{:?}", tensors[B].values);
    }
    assert_eq!((tensors[A].rows, tensors[A].cols), (8, 3));
    assert!((tensors[A].at(3, 0) - 32.0 / 3.0).abs() < 1e-5);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16.0);
    assert_eq!(config["peft_type"], "LORA");

    // Zero-padding on the same inputs (A row 2 = [6, 6.75, 7.5]).
    let out = dir.path().join("zp");
    run_ok(&mut aggregate("zero-pad", &out, &clients));
    let (tensors, _) = read_safetensors(&out.join("adapter_model.safetensors"));
    assert!((tensors[A].at(2, 1) - 6.75).abs() < 1e-5);

    // FLoRA: stacked rank 14, and s·B_s·A_s = T = [[353.25, 376, 398.75], [518, 553.25, 588.5]] (s = 2 ⇒ B_s·A_s = T/2).
    let out = dir.path().join("flora");
    run_ok(&mut aggregate("flora", &out, &clients));
    let (tensors, _) = read_safetensors(&out.join("adapter_model.safetensors"));
    let (a, b) = (&tensors[A], &tensors[B]);
    assert_eq!(a.rows, 14);
    let t00: f64 = (0..14).map(|i| b.at(0, i) * a.at(i, 0)).sum::<f64>() * 2.0;
    assert!((t00 - 2.0 * 353.25).abs() < 1e-2, "{t00}");
}

#[test]
fn different_scales_are_folded_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let clients = vec![
        worked_client(&dir.path().join("c2"), 1.0, 2, Some(100), 2.0), // scale 1
        worked_client(&dir.path().join("c8"), 4.0, 8, Some(100), 16.0), // scale 2
    ];
    let out = dir.path().join("out");
    let output = run_ok(&mut aggregate("rbla", &out, &clients));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("note: inputs use different LoRA scales"), "{stdout}");
    let (tensors, meta) = read_safetensors(&out.join("adapter_model.safetensors"));
    assert!(meta["flotilla_notes"].contains("different LoRA scales"));
    // Slot 0 of B: c2 contributes B·(1/2) in the output scale 2: (1·0.5·100 + 4·100) / 200 = 2.25.
    assert!((tensors[B].at(0, 0) - 2.25).abs() < 1e-5, "{}", tensors[B].at(0, 0));
}

#[test]
fn bad_inputs_get_one_clear_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let good = worked_fleet(root);
    let out = root.join("out");

    let missing = root.join("nowhere");
    assert_fails(
        &mut aggregate("rbla", &out, &[good[0].clone(), missing.clone()]),
        &["nowhere", "adapter_config.json"],
    );

    let garbage = worked_client(&root.join("garbage"), 1.0, 2, Some(5), 4.0);
    std::fs::write(garbage.join("adapter_model.safetensors"), b"definitely not safetensors").unwrap();
    assert_fails(&mut aggregate("rbla", &out, &[good[2].clone(), garbage]), &["garbage", "safetensors"]);

    let no_samples = worked_client(&root.join("no-samples"), 1.0, 2, None, 4.0);
    assert_fails(&mut aggregate("rbla", &out, &[good[2].clone(), no_samples]), &["no-samples", "num_samples"]);

    let liar = root.join("liar");
    worked_client(&liar, 1.0, 2, Some(5), 4.0);
    let config = std::fs::read_to_string(liar.join("adapter_config.json")).unwrap().replace("\"r\": 2", "\"r\": 4");
    std::fs::write(liar.join("adapter_config.json"), config).unwrap();
    assert_fails(&mut aggregate("rbla", &out, &[good[2].clone(), liar]), &["liar", "r = 4", "rank 2"]);

    let other_layer = root.join("other-layer");
    let a: Vec<f32> = vec![1.0; 6];
    let b: Vec<f32> = vec![1.0; 4];
    write_peft_adapter(
        &other_layer,
        &[
            ("base_model.model.other.lora_A.weight".into(), 2, 3, a),
            ("base_model.model.other.lora_B.weight".into(), 2, 2, b),
        ],
        2,
        4.0,
        Some(10),
    );
    assert_fails(&mut aggregate("rbla", &out, &[good[2].clone(), other_layer]), &["other-layer", "other.lora_A"]);

    assert_fails(&mut aggregate("fedavg", &out, &good), &["c2", "fedavg"]);
    assert_fails(aggregate("rbla", &out, &good).args(["--max-rank", "4"]), &["--max-rank 4"]);
    // An unknown method is refused by the argument parser, which lists the known ones.
    let output = aggregate("mean", &out, &good).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("unknown aggregation method 'mean'") && stderr.contains("hetlora"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing is written when an input is bad");
}
