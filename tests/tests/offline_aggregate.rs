//! `flotilla-coordinator aggregate` on PEFT directories: the worked example of the shared notes
//! through the real command, and one clear line (non-zero exit) for each kind of bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use flotilla_tests::{binary, read_safetensors, run_ok, write_peft_adapter};

const A: &str = "base_model.model.layer.lora_A.weight";
const B: &str = "base_model.model.layer.lora_B.weight";

/// The notes' worked example: A_k[i,j] = c·(i+1) + j (r × 3), B_k[o,i] = c·(o+1) + i (2 × r).
fn worked_client(dir: &Path, c: f32, rank: usize, n: Option<u64>, alpha: f64) -> PathBuf {
    let a: Vec<f32> = (0..rank).flat_map(|i| (0..3).map(move |j| c * (i as f32 + 1.0) + j as f32)).collect();
    let b: Vec<f32> = (0..2).flat_map(|o| (0..rank).map(move |i| c * (o as f32 + 1.0) + i as f32)).collect();
    write_peft_adapter(dir, &[(A.into(), rank, 3, a), (B.into(), 2, rank, b)], rank, alpha, n);
    dir.to_path_buf()
}

/// Three clients with one constant scale lora_alpha / r = 2.
fn worked_fleet(root: &Path) -> Vec<PathBuf> {
    vec![
        worked_client(&root.join("c2"), 1.0, 2, Some(100), 4.0),
        worked_client(&root.join("c4"), 2.0, 4, Some(200), 8.0),
        worked_client(&root.join("c8"), 4.0, 8, Some(100), 16.0),
    ]
}

fn aggregate(method: &str, out: &Path, clients: &[PathBuf]) -> Command {
    let mut command = Command::new(binary("flotilla-coordinator"));
    command.args(["aggregate", "--method", method, "--out"]).arg(out).args(clients);
    command
}

fn assert_fails(command: &mut Command, mentions: &[&str]) -> Output {
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{command:?} should fail\n{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line, got:\n{stderr}");
    for m in mentions {
        assert!(stderr.contains(m), "error should mention '{m}': {stderr}");
    }
    output
}

#[test]
fn worked_example_through_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let clients = worked_fleet(dir.path());
    let out = dir.path().join("rbla");
    let output = run_ok(&mut aggregate("rbla", &out, &clients));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("aggregated 3 adapters (ranks 2,4,8) with rbla"), "{stdout}");
    let (tensors, meta) = read_safetensors(&out.join("adapter_model.safetensors"));
    assert_eq!(meta["num_samples"], "400");
    let want_b = [
        2.25,
        3.25,
        14.0 / 3.0,
        17.0 / 3.0,
        8.0,
        9.0,
        10.0,
        11.0,
        4.5,
        5.5,
        22.0 / 3.0,
        25.0 / 3.0,
        12.0,
        13.0,
        14.0,
        15.0,
    ];
    for (g, w) in tensors[B].values.iter().zip(want_b) {
        assert!((g - w).abs() < 1e-5, "{:?}", tensors[B].values);
    }
    assert_eq!((tensors[A].rows, tensors[A].cols), (8, 3));
    assert!((tensors[A].at(3, 0) - 32.0 / 3.0).abs() < 1e-5);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["r"], 8);
    assert_eq!(config["lora_alpha"], 16.0);
    assert_eq!(config["peft_type"], "LORA");

    let rbla_21 = tensors[A].at(2, 1);

    // Zero-padding on the same inputs (A row 2 = [6, 6.75, 7.5]).
    let out = dir.path().join("zp");
    run_ok(&mut aggregate("zero-pad", &out, &clients));
    let (tensors, _) = read_safetensors(&out.join("adapter_model.safetensors"));
    assert!((tensors[A].at(2, 1) - 6.75).abs() < 1e-5);

    // Coverage-scaled RBLA: RBLA·√q, and zero-pad is RBLA·q, so it is their geometric mean.
    let out = dir.path().join("rbla-coverage");
    run_ok(&mut aggregate("rbla-coverage", &out, &clients));
    let (scaled, _) = read_safetensors(&out.join("adapter_model.safetensors"));
    assert!((scaled[A].at(2, 1) - (rbla_21 * 6.75).sqrt()).abs() < 1e-5, "{} vs {rbla_21}", scaled[A].at(2, 1));
    // Fold-and-Fill fills from a previous global adapter, which `aggregate` does not take.
    assert_fails(&mut aggregate("fold-and-fill", &dir.path().join("ff"), &clients), &["previous global adapter"]);

    // FLoRA: stacked rank 14, and s·B_s·A_s = T = [[353.25, 376, 398.75], [518, 553.25, 588.5]] (s = 2 ⇒ B_s·A_s = T/2).
    let out = dir.path().join("flora");
    run_ok(&mut aggregate("flora", &out, &clients));
    let (tensors, _) = read_safetensors(&out.join("adapter_model.safetensors"));
    let (a, b) = (&tensors[A], &tensors[B]);
    assert_eq!(a.rows, 14);
    let t00: f64 = (0..14).map(|i| b.at(0, i) * a.at(i, 0)).sum::<f64>() * 2.0;
    assert!((t00 - 2.0 * 353.25).abs() < 1e-2, "{t00}");
}

#[test]
fn different_scales_are_folded_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let clients = vec![
        worked_client(&dir.path().join("c2"), 1.0, 2, Some(100), 2.0), // scale 1
        worked_client(&dir.path().join("c8"), 4.0, 8, Some(100), 16.0), // scale 2
    ];
    let out = dir.path().join("out");
    let output = run_ok(&mut aggregate("rbla", &out, &clients));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("note: inputs use different LoRA scales"), "{stdout}");
    let (tensors, meta) = read_safetensors(&out.join("adapter_model.safetensors"));
    assert!(meta["flotilla_notes"].contains("different LoRA scales"));
    // Slot 0 of B: c2 contributes B·(1/2) in the output scale 2: (1·0.5·100 + 4·100) / 200 = 2.25.
    assert!((tensors[B].at(0, 0) - 2.25).abs() < 1e-5, "{}", tensors[B].at(0, 0));
}

#[test]
fn bad_inputs_get_one_clear_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let good = worked_fleet(root);
    let out = root.join("out");

    let missing = root.join("nowhere");
    assert_fails(
        &mut aggregate("rbla", &out, &[good[0].clone(), missing.clone()]),
        &["nowhere", "adapter_config.json"],
    );

    let garbage = worked_client(&root.join("garbage"), 1.0, 2, Some(5), 4.0);
    std::fs::write(garbage.join("adapter_model.safetensors"), b"definitely not safetensors").unwrap();
    assert_fails(&mut aggregate("rbla", &out, &[good[2].clone(), garbage]), &["garbage", "safetensors"]);

    let no_samples = worked_client(&root.join("no-samples"), 1.0, 2, None, 4.0);
    assert_fails(&mut aggregate("rbla", &out, &[good[2].clone(), no_samples]), &["no-samples", "num_samples"]);

    let liar = root.join("liar");
    worked_client(&liar, 1.0, 2, Some(5), 4.0);
    let config = std::fs::read_to_string(liar.join("adapter_config.json")).unwrap().replace("\"r\": 2", "\"r\": 4");
    std::fs::write(liar.join("adapter_config.json"), config).unwrap();
    assert_fails(&mut aggregate("rbla", &out, &[good[2].clone(), liar]), &["liar", "r = 4", "rank 2"]);

    let other_layer = root.join("other-layer");
    let a: Vec<f32> = vec![1.0; 6];
    let b: Vec<f32> = vec![1.0; 4];
    write_peft_adapter(
        &other_layer,
        &[
            ("base_model.model.other.lora_A.weight".into(), 2, 3, a),
            ("base_model.model.other.lora_B.weight".into(), 2, 2, b),
        ],
        2,
        4.0,
        Some(10),
    );
    // Adapters of different models: both are named, with a tensor each lacks, whichever is larger.
    let mismatch = ["c8", "other-layer", "different tensors", "'base_model.model.layer.lora_A.weight'", "other.lora_A"];
    assert_fails(&mut aggregate("rbla", &out, &[good[2].clone(), other_layer.clone()]), &mismatch);
    assert_fails(&mut aggregate("hetlora", &out, &[other_layer, good[2].clone()]), &mismatch);

    // The largest input sizes the result, so its rank is checked before anything is allocated.
    let giant = root.join("giant");
    worked_client(&giant, 1.0, 2, Some(5), 4.0);
    let config =
        std::fs::read_to_string(giant.join("adapter_config.json")).unwrap().replace("\"r\": 2", "\"r\": 60000");
    std::fs::write(giant.join("adapter_config.json"), config).unwrap();
    assert_fails(&mut aggregate("rbla", &out, &[good[2].clone(), giant.clone()]), &["giant", "r = 60000", "rank 2"]);
    std::fs::write(giant.join("adapter_config.json"), r#"{"r": 100000000000, "lora_alpha": 4}"#).unwrap();
    assert_fails(&mut aggregate("rbla", &out, &[good[2].clone(), giant]), &["giant", "outside 1..=65536"]);
    assert_fails(aggregate("rbla", &out, &good).args(["--max-rank", "1000000000"]), &["--max-rank 1000000000"]);

    assert_fails(&mut aggregate("fedavg", &out, &good), &["c2", "fedavg"]);
    assert_fails(aggregate("rbla", &out, &good).args(["--max-rank", "4"]), &["--max-rank 4"]);
    // An unknown method is refused by the argument parser, which lists the known ones.
    let output = aggregate("mean", &out, &good).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("unknown aggregation method 'mean'") && stderr.contains("hetlora"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing is written when an input is bad");
}

/// A client with two modules (16 → 24, 16 → 8) and a head, pseudo-random values from `seed`.
fn random_client(dir: &Path, rank: usize, samples: u64, alpha: f64, seed: u32) -> PathBuf {
    let value = |i: usize, salt: u32| {
        let x = (i as u32).wrapping_mul(2654435761).wrapping_add(seed.wrapping_mul(40503)).wrapping_add(salt * 977);
        (x >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    let mut tensors = Vec::new();
    for (k, (module, d_in, d_out)) in [("q_proj", 16, 24), ("v_proj", 16, 8)].into_iter().enumerate() {
        let name = format!("base_model.model.layers.0.{module}");
        let salt = 2 * k as u32;
        tensors.push((format!("{name}.lora_A.weight"), rank, d_in, (0..rank * d_in).map(|i| value(i, salt)).collect()));
        tensors.push((
            format!("{name}.lora_B.weight"),
            d_out,
            rank,
            (0..d_out * rank).map(|i| value(i, salt + 1)).collect(),
        ));
    }
    tensors.push(("base_model.model.score.weight".into(), 3, 24, (0..72).map(|i| value(i, 9)).collect()));
    write_peft_adapter(dir, &tensors, rank, alpha, Some(samples));
    dir.to_path_buf()
}

/// `flotilla-coordinator` (the front end) runs RBLA, zero-padding and FedAvg itself, without libtorch;
/// its output must equal the libtorch binary's: LoRA factors bit for bit (the same accumulator code,
/// in the same order), non-LoRA tensors to f32 rounding, metadata and config exactly.
#[test]
fn the_fast_path_writes_what_the_libtorch_path_writes_without_loading_libtorch() {
    let ldd = Command::new("ldd").arg(binary("flotilla-coordinator")).output().unwrap();
    let linked = String::from_utf8_lossy(&ldd.stdout);
    assert!(ldd.status.success() && !linked.contains("libtorch"), "the front end must not link libtorch:\n{linked}");

    let dir = tempfile::tempdir().unwrap();
    let mixed: Vec<PathBuf> = [(2, 120, 4.0), (4, 80, 8.0), (8, 40, 32.0), (4, 9, 8.0)]
        .into_iter()
        .enumerate()
        .map(|(i, (r, n, alpha))| random_client(&dir.path().join(format!("m{i}")), r, n, alpha, i as u32 + 1))
        .collect();
    let equal: Vec<PathBuf> = (0..3)
        .map(|i| random_client(&dir.path().join(format!("e{i}")), 4, 10 + i as u64, 8.0, 50 + i as u32))
        .collect();
    let cases: [(&str, &[PathBuf], Option<&str>); 4] =
        [("rbla", &mixed, None), ("rbla", &mixed, Some("12")), ("zero-pad", &mixed, None), ("fedavg", &equal, None)];
    for (method, clients, max_rank) in cases {
        let label = format!("{method} --max-rank {max_rank:?}");
        let run = |path: &str| {
            let out = dir.path().join(format!("{method}-{}-{path}", max_rank.unwrap_or("none")));
            let mut command = aggregate(method, &out, clients);
            if let Some(r) = max_rank {
                command.args(["--max-rank", r]);
            }
            command.env("RUST_LOG", "debug");
            if path == "torch" {
                command.env("FLOTILLA_AGGREGATE_PATH", "torch");
            }
            (run_ok(&mut command), out)
        };
        let (fast, fast_out) = run("fast");
        let (torch, torch_out) = run("torch");
        let summary = |output: &Output, out: &Path| {
            String::from_utf8_lossy(&output.stdout).replace(&out.display().to_string(), "OUT")
        };
        assert_eq!(summary(&fast, &fast_out), summary(&torch, &torch_out), "{label}: the same summary");
        assert!(fast.stderr.is_empty(), "{label}: the fast path ran (no libtorch logs)");
        assert!(!torch.stderr.is_empty(), "{label}: the libtorch path ran and logged its timings");
        let (fast_tensors, fast_meta) = read_safetensors(&fast_out.join("adapter_model.safetensors"));
        let (torch_tensors, torch_meta) = read_safetensors(&torch_out.join("adapter_model.safetensors"));
        assert_eq!(fast_meta, torch_meta, "{label}");
        assert_eq!(fast_tensors.len(), torch_tensors.len(), "{label}");
        for (name, want) in &torch_tensors {
            let got = &fast_tensors[name];
            assert_eq!((got.rows, got.cols), (want.rows, want.cols), "{label} {name}");
            for (g, w) in got.values.iter().zip(&want.values) {
                if name.contains(".lora_") {
                    assert_eq!(g.to_bits(), w.to_bits(), "{label} {name}: {g} vs {w}");
                } else {
                    assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{label} {name}: {g} vs {w}");
                }
            }
        }
        assert_eq!(
            std::fs::read_to_string(fast_out.join("adapter_config.json")).unwrap(),
            std::fs::read_to_string(torch_out.join("adapter_config.json")).unwrap(),
            "{label}"
        );
    }
}

/// Operator mistakes that used to lose data (issue 37): an `--out` that is an input overwrote that
/// client's adapter, a non-empty `--out` was written into, and a client given twice counted twice.
/// Both paths refuse each one, with one line, before writing anything.
#[test]
fn an_output_that_would_destroy_an_input_or_double_a_client_is_refused_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let clients = worked_fleet(dir.path());
    let weights = |client: &Path| std::fs::read(client.join("adapter_model.safetensors")).unwrap();
    let before = weights(&clients[1]);
    for path in ["fast", "torch"] {
        let with_path = |mut command: Command| {
            if path == "torch" {
                command.env("FLOTILLA_AGGREGATE_PATH", "torch");
            }
            command
        };
        assert_fails(&mut with_path(aggregate("rbla", &clients[1], &clients)), &["is the input", "c4"]);
        assert_fails(&mut with_path(aggregate("hetlora", dir.path(), &clients)), &["contains the input"]);
        assert_eq!(weights(&clients[1]), before, "{path}: the input is untouched");

        let out = dir.path().join(format!("kept-{path}"));
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("notes.txt"), b"the operator's").unwrap();
        assert_fails(&mut with_path(aggregate("rbla", &out, &clients)), &["not empty", "--force"]);
        assert!(!out.join("adapter_model.safetensors").exists(), "{path}: nothing written");
        let mut forced = with_path(aggregate("rbla", &out, &clients));
        run_ok(forced.arg("--force"));
        assert!(out.join("adapter_model.safetensors").exists() && out.join("notes.txt").exists());

        let fresh = dir.path().join(format!("fresh-{path}"));
        let twice = [clients[0].clone(), clients[1].clone(), dir.path().join("c2/../c2")];
        assert_fails(&mut with_path(aggregate("rbla", &fresh, &twice)), &["same directory"]);
        let copy = dir.path().join(format!("copy-of-c2-{path}"));
        std::fs::create_dir(&copy).unwrap();
        for file in ["adapter_model.safetensors", "adapter_config.json"] {
            std::fs::copy(clients[0].join(file), copy.join(file)).unwrap();
        }
        let copied = [clients[0].clone(), clients[1].clone(), copy];
        assert_fails(&mut with_path(aggregate("rbla", &fresh, &copied)), &["byte for byte", "copy-of-c2"]);
        assert!(!fresh.exists(), "{path}: nothing written");
    }
}
