//! A decoder through the real system: a coordinator fine-tunes the tiny random Llama of
//! `tests/fixtures/tiny-llama.gguf` to write the headlines of generated articles, with two devices
//! of different ranks. One uses its own copy of the GGUF file and keeps it 4-bit; the other fetches
//! it from the coordinator (verified by digest). The held-out loss per headline token falls, ROUGE-L and the
//! greedy headlines are recorded per rank. A file whose digest differs from the pin, and a file
//! that is not GGUF, are refused by `check` with the reason.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, check_config, provision, start_coordinator, workspace_root, Process};

const COMPANIES: [&str; 6] = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Vandelay"];
const TEAMS: [&str; 6] = ["Leeds", "Wigan", "Derby", "Bolton", "Fulham", "Reading"];

/// Folder-per-class articles: a headline line, a blank line, a body that states the same fact.
fn write_articles(dir: &std::path::Path) {
    for (class, names, verb) in [("business", COMPANIES, "profits rise"), ("sport", TEAMS, "win again")] {
        let folder = dir.join(class);
        std::fs::create_dir_all(&folder).unwrap();
        for i in 0..60 {
            let name = names[i % names.len()];
            let headline = format!("{name} {verb}");
            let body = format!(
                "{name} said on Monday that it was a good week. The {name} news was that {name} did {verb} by {i} points. "
            )
            .repeat(2);
            std::fs::write(folder.join(format!("{i:03}.txt")), format!("{headline}\n\n{body}\n")).unwrap();
        }
    }
}

fn config(run: &std::path::Path, gguf: &std::path::Path, data: &std::path::Path, sha256: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}/run\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 3\nmin_devices = 2\nlocal_steps = 25\nbatch_size = 8\nlearning_rate = 0.02\n\
         [aggregation]\nmax_rank = 4\nlora_alpha = 8.0\n\
         [model.decoder]\ngguf = \"{gguf}\"\n{sha256}labels = [\"business\", \"sport\"]\nmax_length = 160\nrouge_samples = 4\n\
         [evaluation]\ntest_data = \"{data}\"\n",
        run = run.display(),
        gguf = gguf.display(),
        data = data.display(),
    )
}

/// `flotilla-edge run` for device `id` of `devices`: its kit, its own cache, its `partition` share.
fn edge(
    run: &Path,
    address: &str,
    data: &Path,
    (id, rank, index): (&str, &str, usize),
    devices: usize,
    partition: &str,
) -> Command {
    let mut command = Command::new(binary("flotilla-edge"));
    command
        .args(["run", "--coordinator", address, "--rank", rank, "--data"])
        .arg(data)
        .args(["--partition", partition, "--devices", &devices.to_string(), "--device-index", &index.to_string()])
        .arg("--cache-dir")
        .arg(run.join(format!("cache-{id}")))
        .arg("--kit")
        .arg(run.join("pki/kits").join(id));
    command
}

/// Waits for `devices` and then the coordinator to finish well; the run's summary.
fn finish(run: &Path, coordinator: &mut Process, devices: &mut [Process]) -> serde_json::Value {
    for device in devices.iter_mut() {
        assert!(device.wait(Duration::from_secs(240)).success(), "{}", device.logs());
    }
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());
    serde_json::from_slice(&std::fs::read(run.join("run/summary.json")).unwrap()).unwrap()
}

/// Starts one device per (id, rank) on `partition` shares of `data`.
fn fleet(run: &Path, address: &str, data: &Path, members: &[(&str, &str)], partition: &str) -> Vec<Process> {
    members
        .iter()
        .enumerate()
        .map(|(index, &(id, rank))| {
            Process::spawn(
                id,
                &mut edge(run, address, data, (id, rank, index), members.len(), partition),
                &run.join("logs"),
            )
        })
        .collect()
}

#[test]
fn devices_fine_tune_a_decoder_from_gguf_and_the_headline_loss_falls() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["phone-1", "laptop-1"]);
    let data = run.join("articles");
    write_articles(&data);
    let gguf = workspace_root().join("tests/fixtures/tiny-llama.gguf");
    let (mut coordinator, address) = start_coordinator(run, &config(run, &gguf, &data, ""));

    let own_copy = gguf.parent().unwrap().to_path_buf();
    let own_dir = run.join("own-copy");
    std::fs::create_dir_all(&own_dir).unwrap();
    std::fs::copy(own_copy.join("tiny-llama.gguf"), own_dir.join("tiny-llama.gguf")).unwrap();
    let device = |member, own: Option<&Path>| {
        let mut command = edge(run, &address, &data, member, 2, "dirichlet:1.0");
        if let Some(dir) = own {
            command.arg("--model-dir").arg(dir).args(["--decoder-base", "q4"]);
        }
        Process::spawn(member.0, &mut command, &run.join("logs"))
    };
    // The phone keeps the frozen base 4-bit and trains layer by layer (`--decoder-base q4`).
    let mut devices = vec![device(("phone-1", "2", 0), Some(&own_dir)), device(("laptop-1", "4", 1), None)];
    let summary = finish(run, &mut coordinator, &mut devices);
    assert!(devices[1].logs().contains("base checkpoint file fetched and verified"), "{}", devices[1].logs());

    let at_max = |evaluation: &serde_json::Value| evaluation.as_array().unwrap()[0].clone();
    let before = at_max(&summary["initial_evaluation"]);
    let rounds = summary["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 3, "{summary}");
    let after = at_max(&rounds[2]["evaluation"]);
    let (loss_before, loss_after) = (before["loss"].as_f64().unwrap(), after["loss"].as_f64().unwrap());
    eprintln!(
        "held-out loss per headline token {loss_before:.3} → {loss_after:.3}, ROUGE-L {} → {}",
        before["rouge_l"], after["rouge_l"]
    );
    assert!(loss_after < 0.8 * loss_before, "held-out loss per headline token {loss_before} → {loss_after}");
    for result in [&before, &after] {
        assert!(result["rouge_l"].as_f64().is_some_and(|r| (0.0..=1.0).contains(&r)), "{result}");
        assert_eq!(result["headlines"].as_array().map(Vec::len), Some(3), "{result}");
    }
    // Every rank that took part was evaluated, and the records carry ROUGE-L per rank.
    let ranks: Vec<u64> =
        rounds[2]["evaluation"].as_array().unwrap().iter().map(|r| r["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, [4, 2]);
    let csv = std::fs::read_to_string(run.join("run/rounds.csv")).unwrap();
    assert!(csv.lines().next().unwrap().contains("rouge_l_rank_2,rouge_l_rank_4"), "{csv}");
    let printed = coordinator.stdout_text();
    assert!(printed.contains("held-out headlines, per rank") && printed.contains("example headlines"), "{printed}");

    // The export: a PEFT causal-LM adapter, and a merged HF directory that `generate` reads back
    // with the same greedy output as the run's checkpoint (base + adapter).
    let config_path = run.join("c.toml");
    let out = run.join("export");
    let export = Command::new(binary("flotilla-coordinator"))
        .args(["export", "--merged", "--config"])
        .arg(&config_path)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(export.status.success(), "{}", String::from_utf8_lossy(&export.stderr));
    let peft: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(peft["task_type"], "CAUSAL_LM");
    assert_eq!(peft["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join("merged").join(file).is_file(), "merged/{file}");
    }
    let generate = |source: &[&str]| {
        let output = Command::new(binary("flotilla-coordinator"))
            .arg("generate")
            .args(source)
            .args(["--prompt", "Acme said on Monday", "--format", "json", "--max-new-tokens", "8"])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let line: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        line["generated_ids"].clone()
    };
    let merged = generate(&["--model", out.join("merged").to_str().unwrap()]);
    let checkpointed = generate(&["--config", config_path.to_str().unwrap()]);
    assert!(merged.as_array().is_some_and(|ids| !ids.is_empty()), "{merged}");
    assert_eq!(merged, checkpointed, "the merged export generates what the checkpoint does");
}

/// A decoder round under `[secure_aggregation]` (the masked sums of rank tiers) and under
/// `[privacy]` (clipped changes, central noise, ε reported): the slot math is the same as for the
/// encoder, so both complete, change the global adapter and are evaluated.
#[test]
fn a_decoder_round_completes_under_secure_aggregation_and_under_privacy() {
    for (mode, extra) in [
        ("secure", "[secure_aggregation]\nrange = 2.0\nmax_participants = 16\nmax_samples = 128\nphase_secs = 10\n"),
        ("private", "[privacy]\nclip_norm = 0.5\nnoise_multiplier = 0.5\nepsilon = 50.0\ndelta = 1e-3\n"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path();
        let pki = run.join("pki");
        // Secure aggregation needs rounds of at least 3 devices (each with 2 neighbours).
        provision(&pki, &["phone-1", "laptop-1", "desktop-1"]);
        let data = run.join("articles");
        write_articles(&data);
        let gguf = workspace_root().join("tests/fixtures/tiny-llama.gguf");
        let config = config(run, &gguf, &data, "")
            .replace("rounds = 3", "rounds = 1")
            .replace("min_devices = 2", "min_devices = 3")
            + extra;
        let (mut coordinator, address) = start_coordinator(run, &config);
        let members = [("phone-1", "2"), ("laptop-1", "4"), ("desktop-1", "4")];
        let mut devices = fleet(run, &address, &data, &members, "iid");
        let summary = finish(run, &mut coordinator, &mut devices);
        assert_eq!(summary["rounds_completed"], 1, "{mode}: {summary}");
        let round = &summary["rounds"][0];
        match mode {
            "secure" => assert!(round["secure"]["survivors"].as_u64() == Some(3), "{mode}: {round}"),
            _ => assert!(round["privacy_epsilon"].as_f64().is_some_and(|e| e > 0.0), "{mode}: {round}"),
        }
        let (before, after) = (&summary["initial_evaluation"][0], &round["evaluation"][0]);
        assert!(after["rouge_l"].as_f64().is_some(), "{mode}: {after}");
        assert_ne!(before["loss"], after["loss"], "{mode}: the global adapter moved");
    }
}

/// Next-word adaptation (`task = "next-word"`): the decoder learns the devices' own short texts
/// (a CSV of snippets, as Rotten Tomatoes is) and the held-out perplexity falls.
#[test]
fn next_word_adaptation_lowers_the_held_out_perplexity() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["phone-1", "laptop-1"]);
    let data = run.join("snippets.csv");
    let mut csv = String::from("text,label\n");
    for i in 0..200 {
        let (label, line) = if i % 2 == 0 {
            ("fresh", format!("a warm and funny film number {i} that the whole family will love"))
        } else {
            ("rotten", format!("a dull and slow film number {i} that nobody will remember"))
        };
        csv.push_str(&format!("{line},{label}\n"));
    }
    std::fs::write(&data, csv).unwrap();
    let gguf = workspace_root().join("tests/fixtures/tiny-llama.gguf");
    let config = config(run, &gguf, &data, "")
        .replace("labels = [\"business\", \"sport\"]", "labels = [\"fresh\", \"rotten\"]\ntask = \"next-word\"")
        .replace("rounds = 3", "rounds = 2");
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut devices = fleet(run, &address, &data, &[("phone-1", "2"), ("laptop-1", "4")], "dirichlet:1.0");
    let summary = finish(run, &mut coordinator, &mut devices);
    let perplexity = |evaluation: &serde_json::Value| evaluation[0]["perplexity"].as_f64().unwrap();
    let (before, after) = (perplexity(&summary["initial_evaluation"]), perplexity(&summary["rounds"][1]["evaluation"]));
    assert!(after < 0.5 * before, "held-out perplexity {before:.1} → {after:.1}");
    assert!(summary["rounds"][1]["evaluation"][0]["rouge_l"].is_null(), "no headlines in next-word adaptation");
    let printed = coordinator.stdout_text();
    assert!(printed.contains("held-out next words, per rank: loss per token / perplexity"), "{printed}");
}

/// Federated evaluation of a decoder: each device scores the model on its shard of the test split
/// (`--holdout-test-split`) and reports summed loss and next-token hits over the headline tokens;
/// the two shards together are the coordinator's test set, so the totals agree with its own
/// evaluation of the same model.
#[test]
fn devices_score_a_decoder_on_their_own_test_shards_and_agree_with_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &["phone-1", "laptop-1"]);
    let data = run.join("articles");
    write_articles(&data);
    let gguf = workspace_root().join("tests/fixtures/tiny-llama.gguf");
    let config = format!(
        "{}[federated_evaluation]\nmin_group_devices = 1\n",
        config(run, &gguf, &data, "").replace("rounds = 3", "rounds = 1")
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut devices: Vec<Process> = [("phone-1", 0), ("laptop-1", 1)]
        .iter()
        .map(|&(id, index)| {
            let mut command = edge(run, &address, &data, (id, "4", index), 2, "dirichlet:1.0");
            command.arg("--holdout-test-split");
            Process::spawn(id, &mut command, &run.join("logs"))
        })
        .collect();
    let summary = finish(run, &mut coordinator, &mut devices);
    let round = &summary["rounds"][0];
    let (central, federated) = (&round["evaluation"][0], &round["federated_evaluation"]);
    assert_eq!(central["rank"], 4, "{central}");
    assert_eq!(federated["reported"], 2, "{federated}");
    let overall = &federated["overall"];
    assert!(overall.get("macro_f1").is_none(), "a decoder reports no labels: {overall}");
    assert!(overall["scored"].as_u64().unwrap() > overall["examples"].as_u64().unwrap(), "tokens, not examples");
    let (loss, central_loss) = (overall["loss"].as_f64().unwrap(), central["loss"].as_f64().unwrap());
    assert!((loss - central_loss).abs() < 1e-4 * (1.0 + central_loss), "loss per token {loss} vs {central_loss}");
    let (accuracy, central_accuracy) = (overall["accuracy"].as_f64().unwrap(), central["accuracy"].as_f64().unwrap());
    assert!((accuracy - central_accuracy).abs() < 1e-9, "next-token accuracy {accuracy} vs {central_accuracy}");
    assert!(coordinator.stdout_text().contains("federated next-token accuracy"), "{}", coordinator.logs());
    // Each device also wrote greedy headlines for its first 4 held-out articles (the default).
    assert_eq!(overall["headlines"], 8, "{overall}");
    let rouge_l = overall["rouge_l"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&rouge_l), "{overall}");
    assert!(
        coordinator.stdout_text().contains("the devices' greedy headlines score ROUGE-L F1"),
        "{}",
        coordinator.logs()
    );
}

#[test]
fn check_refuses_a_decoder_file_that_is_not_the_pinned_one_or_not_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &[]);
    let data = run.join("articles");
    write_articles(&data);
    let gguf = workspace_root().join("tests/fixtures/tiny-llama.gguf");
    let (ok, text) = check_config(run, &config(run, &gguf, &data, "sha256 = \"00ff\"\n"));
    assert!(!ok && text.contains("but model.decoder.sha256 pins 00ff"), "{text}");

    let not_gguf = run.join("model.gguf");
    std::fs::write(&not_gguf, b"GGML this is not a GGUF file").unwrap();
    let (ok, text) = check_config(run, &config(run, &not_gguf, &data, ""));
    assert!(!ok && text.contains("model.decoder.gguf") && text.contains("not a GGUF file"), "{text}");
}
