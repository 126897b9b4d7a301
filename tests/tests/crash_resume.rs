//! The coordinator is SIGKILLed mid-run and restarted: it resumes after the last finished round,
//! the devices reconnect on their own, the run completes, and the finished round's checkpoint is
//! byte-for-byte what it was. A restart with an incompatible configuration is refused, and a restart
//! of a complete run does nothing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use flotilla_tests::{binary, free_udp_port, provision, Process};

fn write_config(run: &Path, port: u16, max_rank: u32) -> std::path::PathBuf {
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
run_dir = "{run}"

[tls]
kit = "{run}/pki/kits/coordinator"

[round]
rounds = 3
min_devices = 2
deadline_secs = 120
local_steps = 1500
batch_size = 32
learning_rate = 0.005

[aggregation]
max_rank = {max_rank}

[model.architecture.mlp]
input = 64
hidden = [64]
classes = 10
"#,
        run = run.display()
    );
    let path = run.join(format!("coordinator-{max_rank}.toml"));
    std::fs::write(&path, config).unwrap();
    path
}

fn coordinator(config: &Path, logs: &Path, name: &str) -> Process {
    Process::spawn(name, Command::new(binary("flotilla-coordinator")).arg("serve").arg("--config").arg(config), logs)
}

/// The two devices of these runs (ranks 2 and 8), patient enough to outlive coordinator restarts.
fn spawn_edges(address: &str, pki: &Path, logs: &Path) -> Vec<Process> {
    [("dev-a", "2"), ("dev-b", "8")]
        .iter()
        .map(|(id, rank)| {
            Process::spawn(
                id,
                Command::new(binary("flotilla-edge"))
                    .args(["run", "--coordinator", address, "--rank", rank, "--samples", "256"])
                    .args(["--max-attempts", "30", "--idle-timeout-secs", "3", "--keep-alive-secs", "1"])
                    .arg("--kit")
                    .arg(pki.join("kits").join(id)),
                logs,
            )
        })
        .collect()
}

fn wait_for(path: &Path, timeout: Duration, process: &mut Process) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} never appeared\n{}", path.display(), process.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_mid_run_then_restart_resumes_after_the_last_finished_round() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["dev-a", "dev-b"]);
    let port = free_udp_port();
    let config = write_config(run, port, 8);
    let logs = run.join("logs");

    let mut first = coordinator(&config, &logs, "coordinator-1");
    std::thread::sleep(Duration::from_millis(300));
    let address = format!("127.0.0.1:{port}");
    let mut edges = spawn_edges(&address, &pki, &logs);

    // Round 1's checkpoint is complete once its state is in place: kill the coordinator right then,
    // in the middle of round 2.
    let round_1 = run.join("global/round-1");
    wait_for(&round_1.join("state.json"), Duration::from_secs(120), &mut first);
    let weights_before = std::fs::read(round_1.join("adapter_model.safetensors")).unwrap();
    first.kill();
    let killed_after = (1..=3).filter(|r| run.join(format!("global/round-{r}/state.json")).exists()).max().unwrap();
    assert!(killed_after < 3, "the kill must land before the run ends");

    // An incompatible configuration is refused.
    let changed = write_config(run, port, 16);
    let output =
        Command::new(binary("flotilla-coordinator")).arg("serve").arg("--config").arg(&changed).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("changed incompatibly"), "{stderr}");

    let mut second = coordinator(&config, &logs, "coordinator-2");
    let status = second.wait(Duration::from_secs(240));
    assert!(status.success(), "restarted coordinator failed\n{}", second.logs());
    assert!(
        second.stderr_text().contains(&format!("round={killed_after}")) && second.stderr_text().contains("resuming"),
        "{}",
        second.logs()
    );
    for edge in &mut edges {
        let status = edge.wait(Duration::from_secs(60));
        assert!(status.success(), "{} failed\n{}", edge.name, edge.logs());
    }
    assert!(second.stdout_text().contains("run finished: 3 round(s)"), "{}", second.logs());
    assert_eq!(std::fs::read(round_1.join("adapter_model.safetensors")).unwrap(), weights_before, "round 1 intact");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["rounds_completed"], 3);
    let rounds: Vec<u64> = summary["rounds"].as_array().unwrap().iter().map(|r| r["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, vec![1, 2, 3], "one entry per round, before and after the restart");
    // Round 1's record survived the kill with its checkpoint, even if summary.json had not caught up.
    assert_eq!(summary["rounds"][0]["updates"].as_array().unwrap().len(), 2, "{summary}");
    assert!(!run.join("global").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));

    // A complete run restarted does nothing.
    let output =
        Command::new(binary("flotilla-coordinator")).arg("serve").arg("--config").arg(&config).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stderr).contains("already completed"));
}

/// The coordinator is SIGKILLed in the middle of round 2's aggregation, restarted, SIGKILLed again
/// in the middle of round 2's checkpoint (its files written, not yet renamed into place), and
/// restarted once more: each restart resumes after round 1, the half-written checkpoint is ignored
/// and replaced, round 1's checkpoint never changes, and the run completes with one record per round.
#[test]
fn sigkill_mid_aggregation_and_mid_checkpoint_lose_nothing_finished() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["dev-a", "dev-b"]);
    let port = free_udp_port();
    let config = write_config(run, port, 8);
    let text = std::fs::read_to_string(&config).unwrap().replace("local_steps = 1500", "local_steps = 20");
    std::fs::write(&config, text).unwrap();
    let logs = run.join("logs");
    let start = |name: &str, fault: Option<&str>| {
        let mut command = Command::new(binary("flotilla-coordinator"));
        command.arg("serve").arg("--config").arg(&config);
        if let Some(fault) = fault {
            command.env("FLOTILLA_FAULT_PAUSE", fault);
        }
        Process::spawn(name, &mut command, &logs)
    };

    let mut first = start("coordinator-1", Some("mid-aggregation@2"));
    std::thread::sleep(Duration::from_millis(300));
    let address = format!("127.0.0.1:{port}");
    let mut edges = spawn_edges(&address, &pki, &logs);

    let round_1 = run.join("global/round-1");
    let round_2 = run.join("global/round-2");
    first.wait_for_stderr("paused at mid-aggregation@2", Duration::from_secs(120));
    let round_1_files: Vec<Vec<u8>> = ["adapter_model.safetensors", "state.json", "adapter_config.json"]
        .iter()
        .map(|f| std::fs::read(round_1.join(f)).unwrap())
        .collect();
    first.kill();
    assert!(!round_2.exists() && !run.join("global/round-2.tmp").exists(), "nothing of round 2 was written");

    let mut second = start("coordinator-2", Some("mid-checkpoint@2"));
    second.wait_for_stderr("paused at mid-checkpoint@2", Duration::from_secs(120));
    assert!(second.stderr_text().contains("resuming after the last finished round round=1"), "{}", second.logs());
    second.kill();
    assert!(!round_2.exists(), "round 2 was never renamed into place");
    assert!(run.join("global/round-2.tmp/state.json").exists(), "the kill landed mid-checkpoint");

    let mut third = start("coordinator-3", None);
    assert!(third.wait(Duration::from_secs(240)).success(), "{}", third.logs());
    assert!(third.stderr_text().contains("resuming after the last finished round round=1"), "{}", third.logs());
    for edge in &mut edges {
        assert!(edge.wait(Duration::from_secs(60)).success(), "{}", edge.logs());
    }
    let after: Vec<Vec<u8>> = ["adapter_model.safetensors", "state.json", "adapter_config.json"]
        .iter()
        .map(|f| std::fs::read(round_1.join(f)).unwrap())
        .collect();
    assert_eq!(after, round_1_files, "round 1's checkpoint is untouched");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let rounds: Vec<u64> = summary["rounds"].as_array().unwrap().iter().map(|r| r["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, vec![1, 2, 3]);
    let leftovers: Vec<String> = run
        .join("global")
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|name| name.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for round in 1..=3 {
        let (tensors, _) =
            flotilla_tests::read_safetensors(&run.join(format!("global/round-{round}/adapter_model.safetensors")));
        assert!(tensors.values().all(|m| m.values.iter().all(|v| v.is_finite())), "round {round} is sound");
    }
}
