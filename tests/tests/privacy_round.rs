//! Differential privacy through the real system (`[privacy]`, central mode): two devices of ranks
//! 2 and 4 clip their changes, the coordinator adds calibrated noise to the sums, divides by the
//! fixed denominators, stops when the ε budget would be exceeded, and reports ε. Settings it cannot
//! honour are refused by `check`.

use std::collections::HashMap;
use std::time::Duration;

use flotilla_tests::{check_config, edge_run, provision, read_safetensors, start_coordinator, Matrix, Process};

const CLIP: f64 = 0.05;
const NOISE_MULTIPLIER: f64 = 1.0;

fn config(run: &std::path::Path, method: &str, epsilon: f64) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 4\nmin_devices = 2\nlocal_steps = 10\nlearning_rate = 0.05\n\
         [aggregation]\nmethod = \"{method}\"\nmax_rank = 4\nrecord_updates = true\n\
         [model.architecture.mlp]\ninput = 64\nhidden = [32]\nclasses = 3\n\
         [privacy]\nclip_norm = {CLIP}\nnoise_multiplier = {NOISE_MULTIPLIER}\nepsilon = {epsilon}\ndelta = 1e-3\n",
        run = run.display()
    )
}

/// The change of `update` against `global` over the update's tensors (its first `rank` slots).
fn change(update: &HashMap<String, Matrix>, global: &HashMap<String, Matrix>) -> HashMap<String, Vec<f64>> {
    update
        .iter()
        .map(|(name, u)| {
            let g = &global[name];
            let values =
                (0..u.rows).flat_map(|r| (0..u.cols).map(move |c| (r, c))).map(|(r, c)| u.at(r, c) - g.at(r, c));
            (name.clone(), values.collect())
        })
        .collect()
}

#[test]
fn clipped_updates_calibrated_noise_and_a_budget_that_ends_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["phone-1", "laptop-1"]);
    // ε after 1, 2, 3, 4 rounds at σ = 1, q = 1, δ = 1e-3: 3.54, 5.42, 7.00, 8.42 (check prints
    // them): a budget of 6 pays for 2 of the 4 rounds.
    let (mut coordinator, address) = start_coordinator(run, &config(run, "rbla", 6.0));
    let mut devices: Vec<Process> = [("phone-1", "2"), ("laptop-1", "4")]
        .iter()
        .map(|(id, rank)| {
            Process::spawn(id, &mut edge_run(&address, &pki.join("kits").join(id), rank, 128), &run.join("logs"))
        })
        .collect();
    for device in &mut devices {
        assert!(device.wait(Duration::from_secs(120)).success(), "{}", device.logs());
        assert!(device.logs().contains(&format!("clipped to {CLIP}")), "the device clips: {}", device.logs());
    }
    assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());
    let logs = coordinator.logs();
    assert!(logs.contains("privacy budget: ε = 6 at δ = 0.001 pays for"), "{logs}");

    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let privacy = &summary["privacy"];
    let allowed = privacy["rounds_allowed"].as_u64().unwrap();
    assert_eq!(allowed, 2, "{privacy}");
    assert_eq!(privacy["rounds_configured"], 4);
    assert_eq!(summary["rounds_completed"].as_u64(), Some(allowed), "the budget ended the run");
    let spent = privacy["epsilon_spent"].as_f64().unwrap();
    assert!(spent > 3.0 && spent <= 6.0, "{privacy}");
    // Nothing of one device is kept in the reports or checkpoints: no id, no sample count, no
    // local metric (devices send none under [privacy]; the recorded updates of `record_updates`
    // are the operator's explicit choice, docs/privacy.md).
    let mut reports = vec![run.join("summary.json"), run.join("rounds.json"), run.join("rounds.csv")];
    reports.extend((1..=2).map(|r| run.join(format!("global/round-{r}/state.json"))));
    for report in &reports {
        let text = std::fs::read_to_string(report).unwrap();
        for needle in ["phone-1", "laptop-1", "num_samples", "loss_before", "loss_after", "train_seconds"] {
            assert!(!text.contains(needle), "{} holds '{needle}'", report.display());
        }
    }
    let per_round: Vec<f64> =
        summary["rounds"].as_array().unwrap().iter().map(|r| r["privacy_epsilon"].as_f64().unwrap()).collect();
    assert!(per_round.windows(2).all(|w| w[0] < w[1]) && per_round.last() == Some(&spent), "{per_round:?}");

    // Round 2 from round 1: every recorded (clipped) change within C, and the new global minus
    // the old, times the slot's denominator (q·M_i with q = 1: 2 devices cover slots 0-1 and the
    // head, 1 covers slots 2-3), minus the sum of the changes, is the noise: N(0, (σC)²).
    let (before, _) = read_safetensors(&run.join("global/round-1/adapter_model.safetensors"));
    let (after, _) = read_safetensors(&run.join("global/round-2/adapter_model.safetensors"));
    let mut sums: HashMap<String, Vec<f64>> = HashMap::new();
    for device in ["phone-1", "laptop-1"] {
        let (update, _) = read_safetensors(&run.join(format!("updates/round-2/{device}/adapter_model.safetensors")));
        let changes = change(&update, &before);
        let norm = changes.values().flatten().map(|v| v * v).sum::<f64>().sqrt();
        assert!(norm <= CLIP * 1.0001, "{device}: change {norm} > {CLIP}");
        assert!(norm > CLIP * 0.99, "{device}: training moved it beyond C, so it was clipped to C: {norm}");
        for (name, values) in changes {
            let rows = update[&name].rows;
            let cols = update[&name].cols;
            let g = &before[&name];
            let sum = sums.entry(name.clone()).or_insert_with(|| vec![0.0; g.rows * g.cols]);
            for r in 0..rows {
                for c in 0..cols {
                    sum[r * g.cols + c] += values[r * cols + c];
                }
            }
        }
    }
    let mut noise = Vec::new();
    for (name, g) in &before {
        let a = &after[name];
        for r in 0..g.rows {
            for c in 0..g.cols {
                let slot = if name.contains("lora_A") {
                    Some(r)
                } else if name.contains("lora_B") {
                    Some(c)
                } else {
                    None
                };
                let covering = match slot {
                    Some(slot) => [2usize, 4].iter().filter(|&&rank| rank > slot).count(),
                    None => 2,
                } as f64;
                let sum = sums.get(name).map_or(0.0, |s| s[r * g.cols + c]);
                noise.push((a.at(r, c) - g.at(r, c)) * covering - sum);
            }
        }
    }
    // 64·4 + 32·4 + 3·32 + 3 = 483 draws: the sample sd of n normals has standard error
    // sd/√(2n) ≈ 3.2%; a 20% band is over 6 standard errors wide and still far from the noise one
    // denominator off (×2) or none at all.
    let n = noise.len() as f64;
    let mean = noise.iter().sum::<f64>() / n;
    let sd = (noise.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let want = NOISE_MULTIPLIER * CLIP;
    eprintln!("{allowed} rounds, ε {per_round:?}; noise sd {sd:.5} (want {want}) mean {mean:.5} over {n} draws");
    assert!(n > 450.0, "{n}");
    assert!((sd / want - 1.0).abs() < 0.2, "noise sd {sd}, want {want} over {n} draws");
    assert!(mean.abs() < 4.0 * want / n.sqrt(), "noise mean {mean}");

    // The budget belongs to the run directory, not to one run: the ledger counted both sampled
    // rounds before their tasks went out, and a `--fresh` run on the same directory (the same
    // devices' data) finds the budget spent and runs nothing.
    let ledger: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("privacy-ledger.json")).unwrap()).unwrap();
    assert_eq!(ledger["sampled_rounds"], 2, "{ledger}");
    let before = std::fs::read(run.join("summary.json")).unwrap();
    let (mut again, _) = flotilla_tests::start_coordinator_with(run, &config(run, "rbla", 6.0), &["--fresh"]);
    assert!(again.wait(Duration::from_secs(60)).success(), "{}", again.logs());
    assert!(again.logs().contains("pays for 2 sampled rounds and 2 are spent"), "{}", again.logs());
    assert!(again.logs().contains("no round left to run"), "{}", again.logs());
    assert_eq!(std::fs::read(run.join("summary.json")).unwrap(), before, "the first run's results stay");
    let ledger: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("privacy-ledger.json")).unwrap()).unwrap();
    assert_eq!(ledger["sampled_rounds"], 2, "nothing more was sampled: {ledger}");
}

#[test]
fn check_refuses_what_privacy_cannot_honour() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &[]);
    let check = |config: String| check_config(run, &config);
    let (ok, text) = check(config(run, "rbla", 6.0));
    assert!(ok, "{text}");
    assert!(text.contains("privacy: clip 0.05") && text.contains("of the 4 configured rounds"), "{text}");
    // The planner: what the noise will cost, and a warning when it swamps the signal.
    assert!(text.contains("privacy plan: d = ") && text.contains("noise/signal on the averaged update"), "{text}");
    assert!(text.contains("this run will learn almost nothing"), "two devices cannot carry this noise: {text}");
    let (ok, text) = check(config(run, "rbla", 1.0));
    assert!(!ok && text.contains("cannot pay for one round"), "{text}");
    let (ok, text) = check(config(run, "zero-pad", 6.0));
    assert!(!ok && text.contains("cannot run under [privacy]"), "{text}");
    let (ok, text) = check(config(run, "rbla", 6.0).replace("delta = 1e-3", "delta = 0.5"));
    assert!(!ok && text.contains("privacy.delta"), "{text}");
    let (ok, text) = check(config(run, "rbla", 6.0).replace("clip_norm = 0.05", "clip_norm = -1"));
    assert!(!ok && text.contains("privacy.clip_norm"), "{text}");
}

/// Distributed privacy under secure aggregation, one round of rank-2 and rank-4 devices. A learning
/// rate so small that each change is ~1e-9: what moves the global is the noise.
fn distributed_config(run: &std::path::Path, max_dropout: f64, min_updates: usize) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 1\nmin_devices = 4\nmin_updates = {min_updates}\ngrace_secs = 1\nlocal_steps = 1\n\
         learning_rate = 1e-9\n\
         [aggregation]\nmethod = \"rbla\"\nmax_rank = 4\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [128]\nclasses = 3\n\
         [privacy]\nmode = \"distributed\"\nmax_dropout = {max_dropout}\nclip_norm = {CLIP}\n\
         noise_multiplier = {NOISE_MULTIPLIER}\nepsilon = 6.0\ndelta = 1e-3\n\
         [secure_aggregation]\nrange = 2.0\nmax_participants = 16\nphase_secs = 20\n",
        run = run.display()
    )
}

#[test]
fn a_dropout_beyond_max_dropout_discards_the_distributed_round_unrevealed() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    let devices = [("phone-1", "2"), ("phone-2", "2"), ("laptop-1", "4"), ("laptop-2", "4")];
    provision(&pki, &devices.map(|d| d.0));
    // No dropout allowed; laptop-2 drops after sharing its keys: the head (and slots 2-3) would hold
    // the noise of too few devices.
    let (mut coordinator, address) = start_coordinator(run, &distributed_config(run, 0.0, 3));
    let mut processes: Vec<Process> = devices
        .iter()
        .map(|(id, rank)| {
            let mut command = edge_run(&address, &pki.join("kits").join(id), rank, 64);
            if *id == "laptop-2" {
                command.env("FLOTILLA_FAULT_PAUSE", "after-shares@1");
            }
            Process::spawn(id, &mut command, &run.join("logs"))
        })
        .collect();
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.logs());
    for device in &mut processes {
        device.kill();
    }
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    let reason = summary["rounds"][0]["secure"]["discarded"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("3 surviving device(s)") && reason.contains("whose noise it needs"), "{summary}");
    let (global, _) = read_safetensors(&run.join("global/round-1/adapter_model.safetensors"));
    let b = &global["base_model.model.fc1.lora_B.weight"];
    assert!(b.values.iter().all(|v| *v == 0.0), "nothing was unmasked: B is still zero");
}

#[test]
fn distributed_noise_under_secure_aggregation_has_the_calibrated_scale() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    let devices = [("phone-1", "2"), ("phone-2", "2"), ("laptop-1", "4"), ("laptop-2", "4")];
    provision(&pki, &devices.map(|d| d.0));
    let config = distributed_config(run, 0.0, 4);
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut processes: Vec<Process> = devices
        .iter()
        .map(|(id, rank)| {
            Process::spawn(id, &mut edge_run(&address, &pki.join("kits").join(id), rank, 64), &run.join("logs"))
        })
        .collect();
    for device in &mut processes {
        assert!(device.wait(Duration::from_secs(120)).success(), "{}", device.logs());
    }
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["privacy"]["mode"], "distributed", "{summary}");
    assert!(summary["rounds"][0]["privacy_epsilon"].as_f64().is_some_and(|e| e > 3.0 && e < 4.0), "{summary}");
    assert_eq!(summary["rounds"][0]["secure"]["survivors"], 4, "{summary}");

    // B starts at zero. Each of the n devices covering a slot adds N(0, (σC)²/n) to its values, the
    // sum carries N(0, (σC)²), and RBLA's private form divides by q·M_i (q = 1; 4 devices cover
    // slots 0-1): B[:, i]·M_i is the noise. Slots 2-3 are held by the two laptops alone, fewer than
    // threshold 2 + 1: they are never revealed, and B's columns there stay zero.
    assert_eq!(summary["rounds"][0]["secure"]["revealed_rank"], 2, "{summary}");
    let (global, _) = read_safetensors(&run.join("global/round-1/adapter_model.safetensors"));
    let b = &global["base_model.model.fc1.lora_B.weight"];
    assert!((0..b.rows).all(|r| b.at(r, 2) == 0.0 && b.at(r, 3) == 0.0), "an unrevealed slot moved");
    let noise: Vec<f64> =
        (0..b.rows).flat_map(|r| (0..2).map(move |c| (r, c))).map(|(r, c)| b.at(r, c) * 4.0).collect();
    // 128·2 = 256 draws: the sample sd has standard error sd/√(2n) ≈ 4.4%; a 20% band is over 4 of
    // them wide and far from the noise one denominator off (×2) or that of one device alone (×½).
    let n = noise.len() as f64;
    let mean = noise.iter().sum::<f64>() / n;
    let sd = (noise.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let want = NOISE_MULTIPLIER * CLIP;
    eprintln!("distributed noise sd {sd:.5} (want {want}) mean {mean:.5} over {n} draws");
    assert!((sd / want - 1.0).abs() < 0.2, "noise sd {sd}, want {want} over {n} draws");
    assert!(mean.abs() < 4.0 * want / n.sqrt(), "noise mean {mean}");
}

/// A device with a budget of its own (`--privacy-budget`) counts every round it trains in, before
/// it trains, in a ledger of its own, and refuses the round that would take it past its budget,
/// whatever the coordinator's budget says: at σ = 1 and δ = 1e-5, one round costs it ε 5.30 and
/// two 7.79, so a budget of 6 takes one round.
#[test]
fn a_device_refuses_the_round_past_its_own_privacy_budget() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["careful", "other"]);
    let config = config(run, "rbla", 6.0).replace("rounds = 4", "rounds = 2\nmin_updates = 1");
    let (mut coordinator, address) = start_coordinator(run, &config);
    let ledger = run.join("careful-ledger");
    let mut careful = Process::spawn(
        "careful",
        edge_run(&address, &pki.join("kits/careful"), 2, 128)
            .args(["--privacy-budget", "6", "--privacy-ledger"])
            .arg(&ledger),
        &run.join("logs"),
    );
    let mut other =
        Process::spawn("other", &mut edge_run(&address, &pki.join("kits/other"), 4, 128), &run.join("logs"));
    assert!(!careful.wait(Duration::from_secs(120)).success(), "{}", careful.logs());
    assert!(careful.stderr_text().contains("past its --privacy-budget of 6"), "{}", careful.logs());
    assert!(other.wait(Duration::from_secs(120)).success(), "{}", other.logs());
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
    assert!(coordinator.stderr_text().contains("device refused its round task"), "{}", coordinator.logs());
    let files: Vec<_> = std::fs::read_dir(&ledger).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "one ledger, for the one CA: {files:?}");
    let entries: serde_json::Value = serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(entries["rounds"], 1, "round 1 counted, round 2 refused: {entries}");
}

/// `[privacy] trainable = "b_only"` (FFA-LoRA): devices train each B and the head only. Every A of
/// every global is the first's, bit for bit, in central mode (Fold-and-Fill, two ranks) and in
/// distributed mode under secure aggregation (RBLA, four devices); the B factors move; `check`
/// counts only B and the head in d.
#[test]
fn under_b_only_every_a_stays_as_it_was_and_only_b_and_the_head_are_noised() {
    for distributed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        let pki = run.join("pki");
        let devices: &[(&str, &str)] = if distributed {
            &[("phone-1", "2"), ("phone-2", "2"), ("laptop-1", "4"), ("laptop-2", "4")]
        } else {
            &[("phone-1", "2"), ("laptop-1", "4")]
        };
        provision(&pki, &devices.iter().map(|d| d.0).collect::<Vec<_>>());
        let base = if distributed {
            distributed_config(run, 0.2, 4).replace("rounds = 1", "rounds = 2").replace("1e-9", "0.05")
        } else {
            config(run, "fold-and-fill", 20.0).replace("rounds = 4", "rounds = 3")
        };
        let text = base.replace("[privacy]\n", "[privacy]\ntrainable = \"b_only\"\n");
        let (ok, lora) = check_config(run, &base);
        assert!(ok, "{lora}");
        let (ok, frozen) = check_config(run, &text);
        assert!(ok, "{frozen}");
        let d = |out: &str| -> u64 {
            let at = out.find("privacy plan: d = ").expect("a plan") + "privacy plan: d = ".len();
            out[at..].split_whitespace().next().unwrap().parse().unwrap()
        };
        assert!(frozen.contains("every A frozen") && d(&frozen) < d(&lora), "{frozen}");
        let (mut coordinator, address) = start_coordinator(run, &text);
        let mut processes: Vec<Process> = devices
            .iter()
            .map(|(id, rank)| {
                Process::spawn(id, &mut edge_run(&address, &pki.join("kits").join(id), rank, 64), &run.join("logs"))
            })
            .collect();
        for device in &mut processes {
            assert!(device.wait(Duration::from_secs(180)).success(), "{}", device.logs());
        }
        assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());
        let rounds = if distributed { 2 } else { 3 };
        let globals: Vec<HashMap<String, Matrix>> = (1..=rounds)
            .map(|r| read_safetensors(&run.join(format!("global/round-{r}/adapter_model.safetensors"))).0)
            .collect();
        let (first, last) = (&globals[0], &globals[rounds - 1]);
        for (name, tensor) in first {
            let same = globals.iter().all(|g| g[name].values == tensor.values);
            if name.contains("lora_A") {
                assert!(same, "distributed {distributed}: {name} moved");
            } else if name.contains("lora_B") {
                assert!(last[name].values != tensor.values, "distributed {distributed}: {name} did not train");
            }
        }
    }
}
