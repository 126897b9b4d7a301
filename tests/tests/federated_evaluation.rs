//! Federated evaluation with real processes: devices score the global model on held-out data of
//! their own and report sums only.
//!
//! - Three devices hold out known examples (`--holdout-data`) whose union is the coordinator's
//!   test set: the federated accuracy of every round's model equals the central evaluation of that
//!   union, count for count and label for label. Model 1 is scored by the devices that train round
//!   2 (a round task with `evaluate`), model 2 after the last round (evaluation tasks).
//! - A coordinator with no `[evaluation]` section runs and reports federated metrics only; a device
//!   that declines (`--no-evaluation`) is counted; a rank held by one device is left out.
//! - The independent protocol implementation lies in its reports (more examples than it holds, a
//!   label out of range, a non-finite loss): each is refused with the reason and none is counted.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, provision, start_coordinator, wire, Process};

/// An IDX file: magic (type u8, `dims.len()` dimensions), the dimensions, the data.
fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend(data);
    bytes
}

/// Examples `range` of a two-class task of 4×4 images (class 0 lights the left half, class 1 the
/// right, with speckle so no two are alike and some are hard), as IDX files `<prefix>-*` in `dir`.
fn write_examples(dir: &Path, prefix: &str, range: std::ops::Range<u32>) {
    std::fs::create_dir_all(dir).unwrap();
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for i in range.clone() {
        let class = ((i * 7) % 3 == 0) as u8;
        for pixel in 0..16u32 {
            let lit = (pixel % 4 < 2) == (class == 0);
            let speckle = ((i * 31 + pixel * 17 + i * i * 13) % 200) as u8;
            images.push(if lit { 40 + speckle } else { speckle });
        }
        labels.push(class);
    }
    let n = range.len() as u32;
    std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), idx_bytes(&[n, 4, 4], &images)).unwrap();
    std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), idx_bytes(&[n], &labels)).unwrap();
}

fn config(run: &Path, evaluation: &str, federated: &str, min_devices: usize) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
run_dir = "{run}"
address_file = "{run}/coordinator.addr"
[tls]
kit = "{run}/pki/kits/coordinator"
[round]
rounds = 2
min_devices = {min_devices}
deadline_secs = 60
local_steps = 6
batch_size = 16
learning_rate = 0.01
[aggregation]
method = "rbla"
max_rank = 4
lora_alpha = 8.0
[model]
seed = 3
[model.architecture.mlp]
input = 16
hidden = [8]
classes = 2
{evaluation}
{federated}
"#,
        run = run.display()
    )
}

fn edge(address: &str, kit: &Path, rank: u32, extra: &[&str]) -> Command {
    let mut command = Command::new(binary("flotilla-edge"));
    command
        .args(["run", "--coordinator", address, "--server-name", "localhost", "--rank", &rank.to_string()])
        .arg("--kit")
        .arg(kit)
        .args(extra);
    command
}

/// `devices` at rank 4 on 200 synthetic samples each, their processes named `<device>-<name>`.
fn synthetic_fleet(run: &Path, devices: &[&str], name: &str, address: &str) -> Vec<Process> {
    devices
        .iter()
        .map(|device| {
            let mut command = edge(address, &run.join("pki/kits").join(device), 4, &["--samples", "200"]);
            Process::spawn(&format!("{device}-{name}"), &mut command, &run.join("logs"))
        })
        .collect()
}

fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(run.join("summary.json")).unwrap()).unwrap()
}

#[test]
fn federated_accuracy_equals_the_central_evaluation_of_the_union_of_the_held_out_sets() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let devices = ["phone-1", "laptop-1", "desktop-1"];
    provision(&run.join("pki"), &devices);
    // Device k trains on examples 200k..200k+200 and holds out 1000+40k..1000+40k+40; the central
    // test set is 1000..1120, the union of the three held-out sets.
    for (k, device) in devices.iter().enumerate() {
        let k = k as u32;
        write_examples(&run.join("data").join(device).join("train"), "train", 200 * k..200 * k + 200);
        write_examples(&run.join("data").join(device).join("held-out"), "train", 1000 + 40 * k..1040 + 40 * k);
    }
    write_examples(&run.join("data/central"), "t10k", 1000..1120);
    let evaluation = format!("[evaluation]\ntest_data = \"{}\"", run.join("data/central").display());
    let federated = "[federated_evaluation]\nevery_rounds = 1\nmin_group_devices = 2";
    let (mut coordinator, address) = start_coordinator(run, &config(run, &evaluation, federated, 3));
    let logs = run.join("logs");
    let mut fleet: Vec<Process> = devices
        .iter()
        .map(|device| {
            let data = run.join("data").join(device);
            let mut command = edge(&address, &run.join("pki/kits").join(device), 4, &[]);
            command.arg("--data").arg(data.join("train")).arg("--holdout-data").arg(data.join("held-out"));
            Process::spawn(device, &mut command, &logs)
        })
        .collect();
    assert!(coordinator.wait(Duration::from_secs(240)).success(), "{}", coordinator.logs());
    for device in &mut fleet {
        assert!(device.wait(Duration::from_secs(30)).success(), "{}", device.logs());
        let stderr = device.stderr_text();
        assert!(stderr.contains("[model 1] evaluation report accepted"), "{}", device.logs());
        assert!(stderr.contains("[model 2] evaluation report accepted"), "{}", device.logs());
    }

    let summary = summary(run);
    let rounds = summary["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    // The comparison means something: model 1 gets some of each label right and some wrong.
    let first = &rounds[0]["federated_evaluation"]["overall"]["per_label_accuracy"];
    assert!(first.as_array().unwrap().iter().all(|a| (0.05..0.95).contains(&a.as_f64().unwrap())), "{first}");
    for record in rounds {
        let round = record["round"].as_u64().unwrap();
        let central = &record["evaluation"][0];
        assert_eq!(central["rank"], 4, "the central evaluation at R_max, which every device holds");
        let federated = &record["federated_evaluation"];
        assert_eq!(federated["model_round"], round);
        assert_eq!((federated["asked"].as_u64(), federated["reported"].as_u64()), (Some(3), Some(3)), "{federated}");
        let overall = &federated["overall"];
        assert_eq!(overall["examples"], 120, "{federated}");
        let count = |accuracy: &serde_json::Value| (accuracy.as_f64().unwrap() * 120.0).round() as u64;
        assert_eq!(count(&overall["accuracy"]), count(&central["accuracy"]), "round {round}: {federated}\n{central}");
        let (loss, central_loss) = (overall["loss"].as_f64().unwrap(), central["loss"].as_f64().unwrap());
        assert!((loss - central_loss).abs() < 1e-4 * (1.0 + central_loss), "round {round}: {loss} vs {central_loss}");
        let per_label: Vec<f64> =
            overall["per_label_accuracy"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let central_per_class: Vec<f64> =
            central["per_class"].as_array().unwrap().iter().map(|c| c["accuracy"].as_f64().unwrap()).collect();
        assert_eq!(per_label.len(), central_per_class.len());
        for (f, c) in per_label.iter().zip(&central_per_class) {
            assert!((f - c).abs() < 1e-12, "round {round}: per label {per_label:?} vs {central_per_class:?}");
        }
        let macro_f1 = overall["macro_f1"].as_f64().unwrap();
        assert!((macro_f1 - central["macro_f1"].as_f64().unwrap()).abs() < 1e-12, "{federated}\n{central}");
        assert_eq!(federated["by_rank"]["4"]["devices"], 3, "{federated}");
        // Nothing of one device: no ids anywhere in the record.
        for device in devices {
            assert!(!federated.to_string().contains(device), "{federated}");
        }
    }
    // Model 1 went out with round 2's tasks (no extra slice); model 2 with evaluation tasks.
    assert_eq!(rounds[0]["federated_evaluation"]["bytes_down"], 0);
    assert!(rounds[1]["federated_evaluation"]["bytes_down"].as_u64().unwrap() > 0);
    let csv = std::fs::read_to_string(run.join("rounds.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    for column in ["federated_accuracy", "federated_examples", "federated_accuracy_rank_4"] {
        assert!(header.contains(&column), "{column} in {header:?}");
    }
}

#[test]
fn without_central_data_the_run_reports_federated_metrics_and_counts_declines() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let devices = ["phone-1", "phone-2", "laptop-1", "desktop-1"];
    provision(&run.join("pki"), &devices);
    let federated = "[federated_evaluation]\nevery_rounds = 2\nmin_group_devices = 2";
    let (ok, said) = flotilla_tests::check_config(run, &config(run, "", federated, 4));
    assert!(ok, "{said}");
    assert!(said.contains("federated evaluation: the model after every 2 rounds and after round 2"), "{said}");
    let (mut coordinator, address) = start_coordinator(run, &config(run, "", federated, 4));
    let logs = run.join("logs");
    // Synthetic data: every device shares the task (the same --task-seed) and holds out 15%.
    let plan =
        [("phone-1", 2, "phone"), ("phone-2", 2, "phone"), ("laptop-1", 4, "laptop"), ("desktop-1", 4, "desktop")];
    let mut fleet: Vec<Process> = plan
        .iter()
        .map(|(device, rank, class)| {
            let mut extra = vec!["--samples", "200", "--device-class", class];
            if *device == "desktop-1" {
                extra.push("--no-evaluation");
            }
            Process::spawn(device, &mut edge(&address, &run.join("pki/kits").join(device), *rank, &extra), &logs)
        })
        .collect();
    assert!(coordinator.wait(Duration::from_secs(240)).success(), "{}", coordinator.logs());
    for device in &mut fleet {
        assert!(device.wait(Duration::from_secs(30)).success(), "{}", device.logs());
    }
    assert!(fleet[3].stderr_text().contains("declining evaluation"), "{}", fleet[3].logs());

    let summary = summary(run);
    let rounds = summary["rounds"].as_array().unwrap();
    assert!(rounds[0].get("federated_evaluation").is_none(), "every_rounds = 2: model 1 is not evaluated");
    assert!(rounds[0]["evaluation"].as_array().unwrap().is_empty(), "no central test set");
    let federated = &rounds[1]["federated_evaluation"];
    assert_eq!(federated["asked"], 4, "{federated}");
    assert_eq!(federated["reported"], 3, "{federated}");
    assert_eq!(federated["declined"], 1, "{federated}");
    // 15% of 200 synthetic samples each, three devices.
    assert_eq!(federated["overall"]["examples"], 90, "{federated}");
    let accuracy = federated["overall"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&accuracy), "{federated}");
    // Rank 2 is held by two phones; rank 4's only report is the laptop's, which is left out, as is
    // the laptop class.
    assert_eq!(federated["by_rank"]["2"]["devices"], 2, "{federated}");
    assert!(federated["by_rank"].get("4").is_none(), "{federated}");
    assert_eq!(federated["by_class"]["phone"]["devices"], 2, "{federated}");
    assert!(federated["by_class"].get("laptop").is_none(), "{federated}");
    // The cross-rank view of the final model: rank 4's model on the phones' data too. The
    // phones' own rank-2 scores agree with the per-rank total; the laptop's cells (one device)
    // are left out.
    let cross = &federated["cross_rank"];
    assert_eq!(cross["2"]["phone"], federated["by_rank"]["2"], "{federated}");
    assert_eq!(cross["4"]["phone"]["devices"], 2, "{federated}");
    assert_eq!(cross["4"]["phone"]["examples"], 60, "{federated}");
    assert!(cross["4"].get("laptop").is_none() && cross["2"].get("laptop").is_none(), "{federated}");
    assert_eq!(federated["suppressed_groups"], 4, "{federated}");
    let stdout = coordinator.stdout_text();
    assert!(stdout.contains("federated accuracy on the devices' own held-out data"), "{stdout}");
    assert!(stdout.contains("cross-rank view, model 2"), "{stdout}");
    assert!(!stdout.contains("coordinator's test set"), "no central evaluation to show\n{stdout}");
    let plot = std::fs::read_to_string(run.join("accuracy.svg")).unwrap();
    assert!(plot.contains("federated: the devices"), "the plot shows the federated accuracy");
}

/// What the lying device sends for model `model_round`: each breaks one rule.
fn lie(model_round: u32, rank: u32) -> (wire::EvaluationReport, &'static str) {
    let labels = |counts: &[(u64, u64, u64)]| {
        counts.iter().map(|&(support, correct, predicted)| wire::LabelSums { support, correct, predicted }).collect()
    };
    let sums = |examples: u64, loss_sum: f64, label_counts: &[(u64, u64, u64)]| wire::EvaluationSums {
        examples,
        scored: examples,
        correct: label_counts.iter().map(|c| c.1).sum(),
        loss_sum,
        labels: labels(label_counts),
        generated: 0,
        rouge_l_sum: 0.0,
    };
    let (sums, reason) = match model_round {
        1 => (sums(20, 5.0, &[(10, 9, 10), (10, 9, 10)]), "scored, but the device holds 10"),
        2 => (sums(9, 5.0, &[(3, 3, 3), (3, 3, 3), (3, 3, 3)]), "outside the model's 2 labels"),
        3 => (sums(10, f64::NAN, &[(5, 5, 5), (5, 5, 5)]), "not a finite, non-negative number"),
        _ => (sums(10, 1.0, &[(5, 5, 5), (5, 5, 5)]), "but the device was sent rank"),
    };
    let rank = if model_round >= 4 { rank - 1 } else { rank };
    let report = wire::EvaluationReport {
        model_round,
        rank,
        held_out_examples: 10,
        sums: Some(sums),
        declined: String::new(),
        cross: Vec::new(),
    };
    (report, reason)
}

#[test]
fn lies_in_evaluation_reports_are_refused_with_the_reason_and_never_counted() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    provision(&run.join("pki"), &["honest", "eve"]);
    let config = config(run, "", "[federated_evaluation]\nmin_group_devices = 1", 2)
        .replace("rounds = 2", "rounds = 4")
        .replace("deadline_secs = 60", "deadline_secs = 4");
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut honest = Process::spawn(
        "honest",
        &mut edge(&address, &run.join("pki/kits/honest"), 4, &["--samples", "200"]),
        &run.join("logs"),
    );
    // Eve trains nothing (her rounds close at their deadline without her) and lies in every report.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let answers = runtime.block_on(async {
        let endpoint = wire::endpoint(&wire::ClientCredentials::kit(&run.join("pki/kits/eve"))).unwrap();
        let connection = wire::connect(&endpoint, address.parse().unwrap()).await.unwrap();
        assert!(matches!(wire::hello(&connection, "eve", 4).await.unwrap(), wire::Reply::Welcome { .. }));
        let mut answers = Vec::new();
        loop {
            let asked = match wire::next_push(&connection, Duration::from_secs(60)).await.unwrap() {
                wire::Reply::RoundTask { task, .. } if task.evaluate => Some((task.round - 1, task.rank)),
                wire::Reply::RoundTask { .. } => None,
                wire::Reply::EvaluationTask { task } => Some((task.model_round, task.rank)),
                wire::Reply::Finished { .. } => break,
                other => panic!("unexpected {other:?}"),
            };
            let Some((model_round, rank)) = asked else { continue };
            let (report, reason) = lie(model_round, rank);
            let mut reports = vec![(report, reason)];
            if model_round == 1 {
                // A report nobody asked for, and a second one for model 1 (refused as a duplicate, or as late
                // once the honest device has answered too).
                for (other_round, reason) in [(9, "not waiting for evaluations of model 9"), (1, "model 1")] {
                    let (mut extra, _) = lie(1, rank);
                    extra.model_round = other_round;
                    reports.push((extra, reason));
                }
            }
            for (report, reason) in reports {
                let model_round = report.model_round;
                let frame = wire::frame(&wire::DeviceMessage::EvaluationReport(report), &[], &[]);
                answers.push((model_round, wire::request(&connection, &frame).await.unwrap(), reason));
            }
        }
        answers
    });
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.logs());
    assert!(honest.wait(Duration::from_secs(30)).success(), "{}", honest.logs());
    assert_eq!(answers.iter().map(|a| a.0).collect::<Vec<_>>(), vec![1, 9, 1, 2, 3, 4], "{answers:?}");
    for (model_round, answer, reason) in &answers {
        match answer {
            wire::Reply::Reject { reason: said, .. } => assert!(said.contains(reason), "model {model_round}: {said}"),
            other => panic!("model {model_round}: a lie was answered with {other:?}"),
        }
    }
    let summary = summary(run);
    for record in summary["rounds"].as_array().unwrap() {
        let federated = &record["federated_evaluation"];
        assert_eq!((federated["asked"].as_u64(), federated["refused"].as_u64()), (Some(2), Some(1)), "{federated}");
        // Only the honest device's 30 held-out samples (15% of 200) are in the totals.
        assert_eq!(federated["overall"]["examples"], 30, "{federated}");
    }
    assert!(coordinator.stderr_text().contains("evaluation report refused"), "{}", coordinator.logs());
}

/// `serve --evaluate-only` trains nothing: it asks the devices to score one of the run directory's
/// checkpoints (the last, or `--round N`'s), and gets the same totals the run's own evaluation of
/// that model got (the same model on the same held-out sets), keeping the run's other records.
#[test]
fn an_evaluate_only_run_scores_a_checkpoint_again() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let devices = ["phone-1", "laptop-1"];
    provision(&run.join("pki"), &devices);
    let config = config(run, "", "[federated_evaluation]\nmin_group_devices = 1", 2);
    let fleet = |name: &str, address: &str| synthetic_fleet(run, &devices, name, address);
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut trained = fleet("train", &address);
    assert!(coordinator.wait(Duration::from_secs(120)).success(), "{}", coordinator.logs());
    trained.iter_mut().for_each(|d| assert!(d.wait(Duration::from_secs(30)).success(), "{}", d.logs()));
    let after_training = summary(run)["rounds"].clone();
    for record in after_training.as_array().unwrap() {
        assert_eq!(record["federated_evaluation"]["reported"], 2, "{record}");
    }

    for (name, args, round) in
        [("last", vec!["--evaluate-only"], 1), ("first", vec!["--evaluate-only", "--round", "1"], 0)]
    {
        std::fs::remove_file(run.join("addr")).unwrap();
        let (mut evaluator, address) = flotilla_tests::start_coordinator_with(run, &config, &args);
        let mut again = fleet(name, &address);
        assert!(evaluator.wait(Duration::from_secs(120)).success(), "{}", evaluator.logs());
        for device in &mut again {
            assert!(device.wait(Duration::from_secs(30)).success(), "{}", device.logs());
            assert!(!device.stderr_text().contains("training at rank"), "nothing is trained\n{}", device.logs());
        }
        let rounds = summary(run)["rounds"].clone();
        assert_eq!(rounds.as_array().unwrap().len(), 2, "{name}: the run's records are all kept");
        let evaluated = &rounds[round]["federated_evaluation"];
        assert_eq!(evaluated["model_round"], round + 1);
        assert_eq!(evaluated["reported"], 2, "{evaluated}");
        let before = &after_training[round]["federated_evaluation"]["overall"];
        assert_eq!(evaluated["overall"], *before, "{name}: the same model on the same held-out data");
        assert!(evaluator.stdout_text().contains("federated accuracy"), "{}", evaluator.logs());
    }
    // A round with no checkpoint is refused before anything listens.
    let missing = Command::new(binary("flotilla-coordinator"))
        .args(["serve", "--evaluate-only", "--round", "7", "--config"])
        .arg(run.join("c.toml"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no checkpoint of round 7"), "{missing:?}");
}

/// Under `[secure_aggregation]` the sums travel masked, in a SecAgg+ session of the evaluation's
/// own between rounds, and only group totals are revealed: still exactly the central evaluation of
/// the union of the held-out sets, count for count; a class held by one device gets no total; no
/// device sends its sums in the clear.
#[test]
fn under_secure_aggregation_the_sums_travel_masked_and_only_totals_are_revealed() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let devices = ["phone-1", "phone-2", "phone-3", "laptop-1"];
    provision(&run.join("pki"), &devices);
    for (k, device) in devices.iter().enumerate() {
        let k = k as u32;
        write_examples(&run.join("data").join(device).join("train"), "train", 200 * k..200 * k + 200);
        write_examples(&run.join("data").join(device).join("held-out"), "train", 1000 + 30 * k..1030 + 30 * k);
    }
    write_examples(&run.join("data/central"), "t10k", 1000..1120);
    let evaluation = format!("[evaluation]\ntest_data = \"{}\"", run.join("data/central").display());
    let federated = "[federated_evaluation]\nmin_group_devices = 2\n[secure_aggregation]\nphase_secs = 20";
    let config = config(run, &evaluation, federated, 4);
    let (ok, said) = flotilla_tests::check_config(run, &config);
    assert!(ok, "{said}");
    assert!(said.contains("federated evaluation under secure aggregation: the sums travel masked"), "{said}");
    let (mut coordinator, address) = start_coordinator(run, &config);
    let logs = run.join("logs");
    let mut fleet: Vec<Process> = devices
        .iter()
        .map(|device| {
            let data = run.join("data").join(device);
            let class = device.split('-').next().unwrap();
            let mut command = edge(&address, &run.join("pki/kits").join(device), 4, &["--device-class", class]);
            command.arg("--data").arg(data.join("train")).arg("--holdout-data").arg(data.join("held-out"));
            Process::spawn(device, &mut command, &logs)
        })
        .collect();
    assert!(coordinator.wait(Duration::from_secs(300)).success(), "{}", coordinator.logs());
    for device in &mut fleet {
        assert!(device.wait(Duration::from_secs(30)).success(), "{}", device.logs());
        let stderr = device.stderr_text();
        for model in [1, 2] {
            assert!(stderr.contains(&format!("[model {model}] held-out evaluation at rank 4")), "{}", device.logs());
            assert!(stderr.contains(&format!("[model {model}] evaluation report accepted")), "{}", device.logs());
        }
        assert!(
            stderr.contains("sending the sums masked") && !stderr.contains("reporting the sums"),
            "{}",
            device.logs()
        );
    }
    assert!(coordinator.stderr_text().contains("the sums will travel masked"), "{}", coordinator.logs());

    let summary = summary(run);
    for record in summary["rounds"].as_array().unwrap() {
        let federated = &record["federated_evaluation"];
        let masked = &federated["masked"];
        assert_eq!((masked["participants"].as_u64(), masked["survivors"].as_u64()), (Some(4), Some(4)), "{federated}");
        assert!(masked.get("discarded").is_none(), "{federated}");
        assert_eq!(federated["reported"], 4, "{federated}");
        let (overall, central) = (&federated["overall"], &record["evaluation"][0]);
        assert_eq!(overall["examples"], 120, "{federated}");
        let count = |accuracy: &serde_json::Value| (accuracy.as_f64().unwrap() * 120.0).round() as u64;
        assert_eq!(count(&overall["accuracy"]), count(&central["accuracy"]), "{federated}\n{central}");
        let (loss, central_loss) = (overall["loss"].as_f64().unwrap(), central["loss"].as_f64().unwrap());
        assert!((loss - central_loss).abs() < 1e-4 * (1.0 + central_loss), "{loss} vs {central_loss}");
        assert!((overall["macro_f1"].as_f64().unwrap() - central["macro_f1"].as_f64().unwrap()).abs() < 1e-12);
        // Three phones make a total (threshold + 1 = 3 holders); one laptop does not.
        assert_eq!(federated["by_class"]["phone"]["devices"], 3, "{federated}");
        assert!(federated["by_class"].get("laptop").is_none(), "{federated}");
        for device in devices {
            assert!(!federated.to_string().contains(device), "{federated}");
        }
    }
}

/// `serve --evaluate-only` under `[secure_aggregation]`: the checkpoint's model is scored through
/// a secure sum, and the totals are the run's own masked totals of that model.
#[test]
fn an_evaluate_only_run_under_secure_aggregation_masks_the_sums_too() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let devices = ["phone-1", "phone-2", "phone-3"];
    provision(&run.join("pki"), &devices);
    let federated = "[federated_evaluation]\nmin_group_devices = 1\n[secure_aggregation]\nphase_secs = 20";
    let config = config(run, "", federated, 3);
    let fleet = |name: &str, address: &str| synthetic_fleet(run, &devices, name, address);
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut trained = fleet("train", &address);
    assert!(coordinator.wait(Duration::from_secs(180)).success(), "{}", coordinator.logs());
    trained.iter_mut().for_each(|d| assert!(d.wait(Duration::from_secs(30)).success(), "{}", d.logs()));
    let before = summary(run)["rounds"][1]["federated_evaluation"].clone();
    assert_eq!(before["masked"]["survivors"], 3, "{before}");

    std::fs::remove_file(run.join("addr")).unwrap();
    let (mut evaluator, address) = flotilla_tests::start_coordinator_with(run, &config, &["--evaluate-only"]);
    let mut again = fleet("again", &address);
    assert!(evaluator.wait(Duration::from_secs(120)).success(), "{}", evaluator.logs());
    for device in &mut again {
        assert!(device.wait(Duration::from_secs(30)).success(), "{}", device.logs());
        assert!(device.stderr_text().contains("sending the sums masked"), "{}", device.logs());
    }
    let after = summary(run)["rounds"][1]["federated_evaluation"].clone();
    assert_eq!(after["masked"]["survivors"], 3, "{after}");
    assert_eq!(after["overall"], before["overall"], "the same model on the same held-out data");
}
