//! `flotilla-coordinator finetune-full`, the study's centralized full fine-tuning bound, as a
//! process: it trains every weight on pooled data on the configuration's round schedule, evaluates
//! like `serve` and writes `serve`'s summary shape; bad inputs get clear errors.

use std::path::Path;
use std::process::Command;

use flotilla_tests::binary;

/// An IDX file: magic (type u8, `dims.len()` dimensions), the dimensions, the data.
fn idx_bytes(kind: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, kind, dims.len() as u8];
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend(data);
    bytes
}

/// 4×4 images of two classes: class 0 lights the left half, class 1 the right, with a varying
/// speckle so that no two images are alike.
fn write_split(dir: &Path, prefix: &str, n: u32) {
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let class = (i % 2) as u8;
        for pixel in 0..16u32 {
            let lit = (pixel % 4 < 2) == (class == 0);
            let speckle = ((i * 31 + pixel * 17) % 50) as u8;
            images.push(if lit { 180 + speckle } else { speckle });
        }
        labels.push(class);
    }
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), idx_bytes(8, &[n, 4, 4], &images)).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), idx_bytes(8, &[n], &labels)).unwrap();
}

fn finetune_full(config: &Path, data: &Path) -> std::process::Output {
    Command::new(binary("flotilla-coordinator"))
        .args(["finetune-full", "--config"])
        .arg(config)
        .arg("--data")
        .arg(data)
        .output()
        .unwrap()
}

#[test]
fn full_fine_tuning_trains_every_weight_and_reports_like_serve() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let data = run.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_split(&data, "train", 512);
    write_split(&data, "t10k", 128);
    let config = |evaluation: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}/out\"\n[tls]\nkit = \"{run}/no-kit\"\n\
             [round]\nrounds = 3\nmin_devices = 1\nlocal_steps = 40\nbatch_size = 16\nlearning_rate = 0.01\n\
             [aggregation]\nmax_rank = 4\n{evaluation}\
             [model]\nseed = 5\n[model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 2\n",
            run = run.display()
        )
    };
    let path = run.join("c.toml");
    std::fs::write(&path, config(&format!("[evaluation]\ntest_data = \"{}\"\n", data.display()))).unwrap();
    let output = finetune_full(&path, &data);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("full fine-tuning: 3 rounds, final accuracy"), "{stdout}");

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("out/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["method"], "full-finetune");
    assert_eq!(summary["rounds"].as_array().unwrap().len(), 3);
    // Every weight: 16·8 + 8 for the hidden layer, 8·2 + 2 for the head.
    assert_eq!(summary["trainable_parameters"], 16 * 8 + 8 + 8 * 2 + 2);
    let accuracy = |evaluation: &serde_json::Value| {
        assert_eq!(evaluation[0]["rank"], 4, "reported at R_max");
        evaluation[0]["accuracy"].as_f64().unwrap()
    };
    let before = accuracy(&summary["initial_evaluation"]);
    let after = accuracy(&summary["rounds"][2]["evaluation"]);
    assert!(after > 0.95 && after > before, "{before} -> {after}");

    // Bad inputs: a clear error each.
    std::fs::write(&path, config("")).unwrap();
    let output = finetune_full(&path, &data);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("finetune-full needs [evaluation] test_data"));
    std::fs::write(&path, config(&format!("[evaluation]\ntest_data = \"{}\"\n", data.display()))).unwrap();
    let output = finetune_full(&path, &run.join("missing"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("cannot load the training data in"), "{stderr}");
}
