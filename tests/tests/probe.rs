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
    // NVML: GPU names and memory where a driver is present, otherwise the reason there are none.
    let gpus = report["nvml"]["gpus"].as_array().unwrap();
    if gpus.is_empty() {
        assert!(report["nvml"]["unavailable"].is_string() || !cuda, "{report}");
    } else {
        assert!(gpus.iter().all(|g| g["memory_total_bytes"].as_u64().unwrap() > 0 && g["name"].is_string()));
    }
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
    // Step times vary with the machine's load; the step budget is lifted so only upload can bind.
    let report = probe(&[
        "--device-class",
        "phone",
        "--input",
        "4096",
        "--hidden",
        "4096,4096",
        "--batch-size",
        "8",
        "--step-budget-ms",
        "1e9",
    ]);
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

/// `run --rank auto` probes the device, asks the coordinator for the rank the policy picks, and
/// trains at it (here the coordinator's R_max of 64 does not lower it).
#[test]
fn run_with_rank_auto_asks_for_the_rank_the_probe_chooses() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    flotilla_tests::provision(&run.join("pki"), &["auto-1"]);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 1\nmin_devices = 1\nlocal_steps = 5\n[aggregation]\nmax_rank = 64\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
        run = run.display()
    );
    let (mut coordinator, address) = flotilla_tests::start_coordinator(run, &config);
    let mut device = flotilla_tests::Process::spawn(
        "auto-1",
        Command::new(binary("flotilla-edge"))
            .args(["run", "--coordinator", &address, "--rank", "auto", "--device-class", "phone", "--samples", "64"])
            .args(["--input", "16", "--hidden", "8", "--classes", "4", "--kit"])
            .arg(run.join("pki/kits/auto-1")),
        &run.join("logs"),
    );
    assert!(device.wait(std::time::Duration::from_secs(120)).success(), "{}", device.logs());
    assert!(coordinator.wait(std::time::Duration::from_secs(30)).success(), "{}", coordinator.logs());
    let log = device.stderr_text();
    let chosen: u64 = log
        .lines()
        .find(|l| l.contains("rank chosen by the probe"))
        .and_then(|l| l.split("rank=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no rank choice logged\n{log}"));
    assert!(log.contains("device_class=phone"), "the phone budgets were applied\n{log}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rounds"][0]["updates"][0]["rank"].as_u64(), Some(chosen));
    let report = probe(&["--device-class", "phone", "--input", "16", "--hidden", "8", "--classes", "4"]);
    assert_eq!(report["choice"]["rank"].as_u64(), Some(chosen), "the same policy as `probe`");
}

/// With `--transformer`, the probe times the checkpoint's LoRA step at the configured length, and
/// the memory column counts the frozen base and the activations, not only the adapter: a memory
/// budget below them rules out every rank.
#[test]
fn a_transformer_is_timed_at_its_length_and_its_activations_count_against_memory() {
    let tiny = flotilla_tests::workspace_root().join("common/torch/tests/fixtures/tiny-bert");
    let tiny = tiny.to_str().unwrap();
    let short = probe(&["--transformer", tiny, "--max-length", "8", "--batch-size", "4", "--max-rank", "4"]);
    let long = probe(&["--transformer", tiny, "--max-length", "64", "--batch-size", "4", "--max-rank", "4"]);
    let memory = |report: &serde_json::Value, rank: u64| {
        report["choice"]["candidates"].as_array().unwrap().iter().find(|c| c["rank"] == rank).unwrap()
            ["training_memory_bytes"]
            .as_u64()
            .unwrap()
    };
    // Adapter at rank 1: 2 layers × 2 modules × (32 + 32) values + the head, 16 bytes each: under 10 KB.
    // The base alone (about 24,000 parameters) adds 96 KB; activations grow with the length.
    assert!(memory(&short, 1) > 100_000, "{short}");
    assert!(memory(&long, 1) > memory(&short, 1) + 100_000, "{} vs {}", memory(&long, 1), memory(&short, 1));
    assert!(memory(&long, 4) > memory(&long, 1));
    for report in [&short, &long] {
        assert!(report["step_ms"].as_object().unwrap().values().all(|ms| ms.as_f64().unwrap() > 0.0));
    }
}

/// `probe | head`: a reader that goes away before the output is written is no panic, in either
/// format (the pipe is closed before the probe writes anything).
#[test]
fn probe_into_a_closed_pipe_exits_cleanly() {
    for format in ["json", "text"] {
        let mut child = std::process::Command::new(flotilla_tests::binary("flotilla-edge"))
            .args(["probe", "--format", format])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success() && !stderr.contains("panicked"), "{format}: {:?} {stderr}", output.status);
    }
}

/// With `--decoder`, the probe times a decoder's LoRA step (the tiny Llama of the fixtures) and
/// its memory column counts the decoder's base and activations.
#[test]
fn a_decoder_is_timed_and_its_base_counts_against_memory() {
    let tiny = flotilla_tests::workspace_root().join("tests/fixtures/tiny-llama.gguf");
    let report =
        probe(&["--decoder", tiny.to_str().unwrap(), "--max-length", "32", "--batch-size", "2", "--max-rank", "4"]);
    assert!(report["step_ms"].as_object().unwrap().values().all(|ms| ms.as_f64().unwrap() > 0.0), "{report}");
    let candidates = report["choice"]["candidates"].as_array().unwrap();
    let memory =
        |rank: u64| candidates.iter().find(|c| c["rank"] == rank).unwrap()["training_memory_bytes"].as_u64().unwrap();
    // The tiny decoder has about 90,000 base parameters: 360 KB in f32 before any activation.
    assert!(memory(1) > 360_000, "{report}");
    assert!(memory(4) > memory(1));
}
