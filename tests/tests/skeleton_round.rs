//! The walking skeleton, end to end with real processes: a CA and kits from `flotilla-certs`, a
//! coordinator on mutual-TLS QUIC, three edge clients with forced ranks 2, 4 and 8, one RBLA round.
//! The global adapter is checked against RBLA recomputed here, independently, from the updates the
//! coordinator recorded. A device whose certificate comes from another CA is refused, and the run
//! completes anyway.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, certs, provision, read_safetensors, wait_for_file, Matrix, Process};

const FLEET: [(&str, u32); 3] = [("phone-1", 2), ("laptop-1", 4), ("desktop-1", 8)];
const MAX_RANK: usize = 8;

fn write_config(dir: &Path) -> std::path::PathBuf {
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
run_dir = "{run}"
address_file = "{run}/coordinator.addr"

[tls]
kit = "{run}/pki/kits/coordinator"

[round]
rounds = 1
min_devices = 3
deadline_secs = 60
local_steps = 20
batch_size = 32
learning_rate = 0.01

[aggregation]
method = "rbla"
max_rank = {MAX_RANK}
lora_alpha = 16.0
record_updates = true

[model.architecture.mlp]
input = 32
hidden = [24, 16]
classes = 5
"#,
        run = dir.display()
    );
    let path = dir.join("coordinator.toml");
    std::fs::write(&path, config).unwrap();
    path
}

fn edge(kit: &Path, address: &str, rank: u32, extra: &[&str]) -> Command {
    let mut command = Command::new(binary("flotilla-edge"));
    command
        .args(["run", "--coordinator", address, "--server-name", "localhost", "--rank", &rank.to_string()])
        .arg("--kit")
        .arg(kit)
        .args(["--samples", "256"])
        .args(extra);
    command
}

/// RBLA written out plainly: per slot, the sample-weighted mean over the clients that have it.
fn reference_rbla(name: &str, updates: &[(HashMap<String, Matrix>, f64)]) -> Matrix {
    let first = &updates[0].0[name];
    let is_a = name.ends_with(".lora_A.weight");
    let is_b = name.ends_with(".lora_B.weight");
    let (rows, cols) = if is_a {
        (MAX_RANK, first.cols)
    } else if is_b {
        (first.rows, MAX_RANK)
    } else {
        (first.rows, first.cols)
    };
    let mut values = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            let slot = if is_a {
                r
            } else if is_b {
                c
            } else {
                0
            };
            let (mut sum, mut weight) = (0.0, 0.0);
            for (tensors, n) in updates {
                let t = &tensors[name];
                let has_slot = if is_a {
                    slot < t.rows
                } else if is_b {
                    slot < t.cols
                } else {
                    true
                };
                if has_slot {
                    sum += n * t.at(r, c);
                    weight += n;
                }
            }
            assert!(weight > 0.0, "slot {slot} of {name} uncovered: the rank-8 device covers every slot");
            values[r * cols + c] = sum / weight;
        }
    }
    Matrix { rows, cols, values }
}

#[test]
fn three_ranks_one_rbla_round_and_a_foreign_device_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &FLEET.map(|(id, _)| id));
    let rogue_pki = run.join("rogue-pki");
    certs(&rogue_pki, &["init", "--name", "Some other CA"]);
    certs(&rogue_pki, &["issue", "device", "--id", "intruder"]);
    // The intruder trusts the real CA (its certificate is public) but its own comes from another CA,
    // so it is the coordinator that must refuse it.
    std::fs::copy(pki.join("ca/ca.crt"), rogue_pki.join("kits/intruder/ca.crt")).unwrap();

    let config = write_config(run);
    let logs = run.join("logs");
    let mut coordinator = Process::spawn(
        "coordinator",
        Command::new(binary("flotilla-coordinator")).arg("serve").arg("--config").arg(&config),
        &logs,
    );
    let address = wait_for_file(&run.join("coordinator.addr"), Duration::from_secs(30), &mut coordinator);

    // The intruder goes first, so the coordinator has already refused it when the fleet arrives.
    let mut intruder = Process::spawn(
        "intruder",
        &mut edge(&rogue_pki.join("kits/intruder"), &address, 8, &["--max-attempts", "3"]),
        &logs,
    );
    let intruder_status = intruder.wait(Duration::from_secs(60));
    assert_eq!(intruder_status.code(), Some(2), "a refused certificate is fatal\n{}", intruder.logs());
    assert!(intruder.stderr_text().contains("refused this device's certificate"), "{}", intruder.logs());

    let mut devices: Vec<Process> = FLEET
        .iter()
        .map(|(id, rank)| Process::spawn(id, &mut edge(&pki.join("kits").join(id), &address, *rank, &[]), &logs))
        .collect();
    let status = coordinator.wait(Duration::from_secs(180));
    assert!(status.success(), "coordinator failed\n{}", coordinator.logs());
    for device in &mut devices {
        let status = device.wait(Duration::from_secs(30));
        assert!(status.success(), "{} failed\n{}", device.name, device.logs());
        assert!(device.stdout_text().contains("trained 1 round(s)"), "{}", device.logs());
    }
    assert!(coordinator.stdout_text().contains("run finished: 1 round(s) with rbla"), "{}", coordinator.logs());
    assert!(
        coordinator.stderr_text().contains("handshake failed"),
        "the intruder's attempt is logged\n{}",
        coordinator.logs()
    );

    // The updates the coordinator received, and the global adapter it wrote.
    let updates: Vec<(HashMap<String, Matrix>, f64)> = FLEET
        .iter()
        .map(|(id, rank)| {
            let (tensors, meta) =
                read_safetensors(&run.join("updates/round-1").join(id).join("adapter_model.safetensors"));
            for (name, t) in &tensors {
                if name.ends_with(".lora_A.weight") {
                    assert_eq!(t.rows, *rank as usize, "{id}: {name}");
                }
            }
            let n: f64 = meta["num_samples"].parse().unwrap();
            (tensors, n)
        })
        .collect();
    let global_dir = run.join("global/round-1");
    let (global, _) = read_safetensors(&global_dir.join("adapter_model.safetensors"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(global_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], MAX_RANK);
    assert_eq!(config["peft_type"], "LORA");

    let mut checked = 0;
    for (name, got) in &global {
        if name.ends_with(".lora_A.weight") {
            assert_eq!(got.rows, MAX_RANK, "{name} has {MAX_RANK} slots");
        }
        if name.ends_with(".lora_B.weight") {
            assert_eq!(got.cols, MAX_RANK, "{name} has {MAX_RANK} slots");
        }
        let want = reference_rbla(name, &updates);
        assert_eq!((got.rows, got.cols), (want.rows, want.cols), "{name}");
        for (i, (g, w)) in got.values.iter().zip(&want.values).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{name}[{i}]: global {g}, reference RBLA {w}");
        }
        checked += 1;
    }
    // Two adapted layers (A and B each) and the head's weight and bias.
    assert_eq!(checked, 6);
    // The slots only the rank-8 device has are its values exactly; shared slots are real averages.
    let a_name = "base_model.model.fc1.lora_A.weight";
    let desktop = &updates[2].0[a_name];
    assert_eq!(global[a_name].at(7, 0), desktop.at(7, 0));
    assert_ne!(global[a_name].at(0, 0), desktop.at(0, 0));
}
