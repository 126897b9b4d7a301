//! `flotilla-edge probe` on this machine: hardware facts, a timed LoRA training step, and the rank
//! the policy picks — R_max where every budget allows it, less where a device class's budget binds.

use std::process::Command;

use flotilla_tests::{binary, run_ok};

fn probe(args: &[&str]) -> serde_json::Value {
    let output = run_ok(Command::new(binary("flotilla-edge")).arg("probe").args(args).args(["--format", "json"]));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn probe_reports_this_machine_and_a_rank() {
    let report = probe(&[]);
    assert!(report["logical_cores"].as_u64().unwrap() >= 1);
    assert!(report["memory_total_bytes"].as_u64().unwrap() > report["memory_available_bytes"].as_u64().unwrap() / 2);
    let cuda = report["cuda_available"].as_bool().unwrap();
    assert_eq!(cuda, report["cuda_devices"].as_i64().unwrap() > 0);
    assert_eq!(report["training_device"], if cuda { "Cuda(0)" } else { "Cpu" });
    for (rank, ms) in report["step_ms"].as_object().unwrap() {
        assert!(ms.as_f64().unwrap() > 0.0, "rank {rank}");
    }
    let ranks: Vec<u64> =
        report["choice"]["candidates"].as_array().unwrap().iter().map(|c| c["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, vec![1, 2, 4, 8, 16, 32, 64]);
    let chosen = report["choice"]["rank"].as_u64().unwrap();
    assert!(ranks.contains(&chosen));
}

#[test]
fn a_phone_budget_lowers_the_rank_of_a_large_model_and_says_why() {
    // 2 × (4096 + 4096) adapter parameters per rank: rank 64 uploads 4.2 MB, over a phone's 4 MiB.
    let report = probe(&["--device-class", "phone", "--input", "4096", "--hidden", "4096,4096", "--batch-size", "8"]);
    assert_eq!(report["choice"]["rank"], 32, "{report}");
    let reason = report["choice"]["reason"].as_str().unwrap();
    assert!(reason.contains("rank 64") && reason.contains("upload"), "{reason}");
}

#[test]
fn an_unknown_device_class_is_a_clear_error() {
    let output = Command::new(binary("flotilla-edge")).args(["probe", "--device-class", "toaster"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown device class 'toaster'"));
}
