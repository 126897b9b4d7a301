//! Online FLoRA through the real coordinator and simulator: each round's exact aggregate is merged
//! into the global adapter's ΔW, the factors restart, and every device — including one that sat a
//! round out under partial participation — receives ΔW with its slice and trains on top of it.

use std::time::Duration;

use flotilla_tests::{certs, provision, start_coordinator, start_sim};

#[test]
fn online_flora_merges_every_round_and_devices_receive_the_merged_delta() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &[]);
    certs(&pki, &["issue", "devices", "--prefix", "sim", "--count", "6"]);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 3\nmin_devices = 6\nfraction = 0.5\nlocal_steps = 10\n\
         [aggregation]\nmethod = \"flora\"\nmax_rank = 8\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
        run = run.display()
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut sim = start_sim(run, &pki, &address, 6, "phone=1,laptop:4=1,gpu:8=1");
    assert!(sim.wait(Duration::from_secs(120)).success(), "{}", sim.logs());
    assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());
    let log = coordinator.stderr_text();
    assert_eq!(log.matches("updates merged into ΔW; fresh rank-8 adapter").count(), 3, "{log}");

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let rounds = summary["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3);
    // Per task, round 1 sends only the slice; later rounds add ΔW: (16×8 + 8×8) floats.
    let per_task = |round: &serde_json::Value| {
        round["task_bytes"].as_u64().unwrap() / round["updates"].as_array().unwrap().len() as u64
    };
    let delta_bytes = 4 * (16 * 8 + 8 * 8);
    assert!(per_task(&rounds[1]) >= per_task(&rounds[0]) + delta_bytes - 4 * 8 * 8, "{rounds:?}");
    // Uploads stay rank-r factors and the head: no ΔW comes back.
    for round in rounds {
        for update in round["updates"].as_array().unwrap() {
            let rank = update["rank"].as_u64().unwrap();
            let factors = 4 * rank * (16 + 8 + 8 + 8);
            let head = 4 * (8 * 4 + 4);
            assert!(update["wire_bytes"].as_u64().unwrap() < factors + head + delta_bytes, "{update}");
        }
    }
    // The last checkpoint holds ΔW, so a restart resumes it.
    let checkpoint = run.join("global/round-3/adapter_model.safetensors");
    let bytes = std::fs::read(&checkpoint).unwrap();
    assert!(
        String::from_utf8_lossy(&bytes[..4096.min(bytes.len())]).contains("merged_delta"),
        "{}",
        checkpoint.display()
    );
}
