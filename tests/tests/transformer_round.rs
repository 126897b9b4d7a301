//! A transformer through the real system: a coordinator fine-tunes the tiny BERT checkpoint of the
//! parity fixtures (`common/torch/tests/fixtures/tiny-bert`) on a keyword text task with two devices of
//! different ranks. One device uses its own copy of the checkpoint; the other has none and fetches
//! it from the coordinator over its session (verified by digest, cached); a device whose copy
//! differs is refused with both digests. The held-out accuracy rises, and the coordinator lists
//! exactly which texts it evaluated.

use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, provision, start_coordinator, workspace_root, Process};

const LABELS: [&str; 3] = ["food", "animals", "travel"];
const KEYWORDS: [[&str; 4]; 3] =
    [["eating", "food", "cafe", "prices"], ["fox", "dog", "jumps", "lazy"], ["zurich", "runs", "away", "wakes"]];
const FILLER: [&str; 12] = ["a", "man", "is", "the", "and", "until", "over", "again", "in", "up", "ok", "like"];

/// `count` texts of 6 to 9 words: two keywords of the text's class among filler, seeded.
fn texts(count: usize, seed: u64) -> String {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = |n: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    let mut csv = String::from("text,label\n");
    for _ in 0..count {
        let class = next(3);
        let mut words: Vec<&str> = (0..4 + next(4)).map(|_| FILLER[next(FILLER.len())]).collect();
        for _ in 0..2 {
            let at = next(words.len() + 1);
            words.insert(at, KEYWORDS[class][next(4)]);
        }
        csv.push_str(&format!("{},{}\n", words.join(" "), LABELS[class]));
    }
    csv
}

fn summary_accuracy(evaluation: &serde_json::Value) -> f64 {
    evaluation.as_array().and_then(|e| e.first()).and_then(|r| r["accuracy"].as_f64()).unwrap_or(-1.0)
}

#[test]
fn devices_fine_tune_a_transformer_fetching_the_base_once_and_accuracy_rises() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["phone-1", "laptop-1", "stranger-1"]);
    let data = run.join("keywords");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("train.csv"), texts(240, 1)).unwrap();
    std::fs::write(data.join("test.csv"), texts(90, 2)).unwrap();
    let checkpoint = workspace_root().join("common/torch/tests/fixtures/tiny-bert");

    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}/run\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 5\nmin_devices = 2\nlocal_steps = 40\nbatch_size = 16\nlearning_rate = 0.02\n\
         [aggregation]\nmax_rank = 4\n\
         [model.transformer]\ncheckpoint = \"{checkpoint}\"\nlabels = [\"food\", \"animals\", \"travel\"]\nmax_length = 16\n\
         [evaluation]\ntest_data = \"{data}\"\n",
        run = run.display(),
        checkpoint = checkpoint.display(),
        data = data.display(),
    );
    let (mut coordinator, address) = start_coordinator(run, &config);

    // A device whose copy differs (here: its tokenizer) is refused before it trains anything.
    let altered = run.join("altered-checkpoint");
    std::fs::create_dir_all(&altered).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(checkpoint.join(file), altered.join(file)).unwrap();
    }
    let mut tokenizer = std::fs::read_to_string(altered.join("tokenizer.json")).unwrap();
    tokenizer.push('\n');
    std::fs::write(altered.join("tokenizer.json"), tokenizer).unwrap();
    let edge = |id: &str, rank: &str, index: &str| {
        let mut command = Command::new(binary("flotilla-edge"));
        command
            .args(["run", "--coordinator", &address, "--rank", rank, "--data"])
            .arg(&data)
            .args(["--partition", "iid", "--devices", "2", "--device-index", index])
            .arg("--cache-dir")
            .arg(run.join(format!("cache-{id}")))
            // Small pieces: the 100 KB checkpoint takes several requests, as a real one does.
            .args(["--fetch-chunk-kib", "16"])
            .arg("--kit")
            .arg(pki.join("kits").join(id));
        command
    };
    let mut stranger =
        Process::spawn("stranger-1", edge("stranger-1", "2", "0").arg("--model-dir").arg(&altered), &run.join("logs"));
    let status = stranger.wait(Duration::from_secs(60));
    assert_eq!(status.code(), Some(2), "{}", stranger.logs());
    assert!(
        stranger.logs().contains("is not the coordinator's base: tokenizer.json has sha256"),
        "{}",
        stranger.logs()
    );

    // The laptop lost an earlier fetch after 10,000 bytes: it resumes from there.
    let weights_digest = flotilla_torch_digest(&checkpoint.join("model.safetensors"));
    let cached = run.join("cache-laptop-1/bases").join(&weights_digest);
    std::fs::create_dir_all(&cached).unwrap();
    let weights = std::fs::read(checkpoint.join("model.safetensors")).unwrap();
    std::fs::write(cached.join("model.safetensors.partial"), &weights[..10_000]).unwrap();

    let mut devices = vec![
        Process::spawn("phone-1", edge("phone-1", "2", "0").arg("--model-dir").arg(&checkpoint), &run.join("logs")),
        Process::spawn("laptop-1", &mut edge("laptop-1", "4", "1"), &run.join("logs")),
    ];
    for device in &mut devices {
        assert!(device.wait(Duration::from_secs(240)).success(), "{}", device.logs());
    }
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());

    // The laptop had no copy: it fetched each file once into its cache, verified, resuming the
    // weights where the earlier attempt stopped.
    assert!(devices[1].logs().contains("file=model.safetensors bytes=100420 resume_at=10000"), "{}", devices[1].logs());
    assert!(!cached.join("model.safetensors.partial").exists());
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(cached.join(file)).unwrap(),
            std::fs::read(checkpoint.join(file)).unwrap(),
            "{file} fetched intact"
        );
    }
    assert!(devices[1].logs().contains("base checkpoint file fetched and verified"), "{}", devices[1].logs());
    assert!(!run.join("cache-phone-1/bases").exists(), "the phone used its own copy and fetched nothing");

    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("run/summary.json")).unwrap()).unwrap();
    let before = summary_accuracy(&summary["initial_evaluation"]);
    let rounds = summary["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 5, "{summary}");
    let after = summary_accuracy(&rounds[4]["evaluation"]);
    assert!(after >= 0.7 && after > before + 0.2, "held-out accuracy {before} → {after}\n{summary}");
    // Each round was evaluated beside the next one, and its results kept with its checkpoint.
    for round in 1..=5 {
        let kept: serde_json::Value = serde_json::from_slice(
            &std::fs::read(run.join(format!("run/global/round-{round}/evaluation.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(kept, rounds[round - 1]["evaluation"], "round {round}");
    }
    let evaluated = std::fs::read_to_string(run.join("run/evaluation-examples.txt")).unwrap();
    assert_eq!(evaluated.lines().count(), 90);
    assert!(evaluated.lines().all(|key| key.starts_with("test.csv:")), "{evaluated}");
}

/// The sha256 of a file, as the coordinator names the base.
fn flotilla_torch_digest(path: &std::path::Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The simulator runs a fleet of virtual devices on the transformer through the same code, sharing
/// one copy of the frozen weights.
#[test]
fn the_simulator_fine_tunes_the_transformer_with_virtual_devices() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["v-1", "v-2", "v-3"]);
    let data = run.join("keywords.csv");
    std::fs::write(&data, texts(200, 3)).unwrap();
    let checkpoint = workspace_root().join("common/torch/tests/fixtures/tiny-bert");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}/run\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 2\nmin_devices = 3\nlocal_steps = 10\nbatch_size = 8\nlearning_rate = 0.02\n\
         [aggregation]\nmax_rank = 4\n\
         [model.transformer]\ncheckpoint = \"{checkpoint}\"\nlabels = [\"food\", \"animals\", \"travel\"]\nmax_length = 16\n",
        run = run.display(),
        checkpoint = checkpoint.display(),
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut sim = Process::spawn(
        "sim",
        Command::new(binary("flotilla-edge"))
            .args(["sim", "--coordinator", &address, "--clients", "3", "--concurrency", "2"])
            .args(["--profile-mix", "phone:2=2,laptop:4=1", "--partition", "dirichlet:1.0", "--data"])
            .arg(&data)
            .arg("--model-dir")
            .arg(&checkpoint)
            .arg("--kits")
            .arg(pki.join("kits")),
        &run.join("logs"),
    );
    assert!(sim.wait(Duration::from_secs(120)).success(), "{}", sim.logs());
    assert!(sim.stdout_text().contains("sim: 3 of 3 device(s) finished, 6 local round(s)"), "{}", sim.logs());
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
    assert!(run.join("run/global/round-2/adapter_model.safetensors").exists());
}
