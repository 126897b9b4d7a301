//! The CNN end to end: a coordinator configured with `[model.architecture.cnn]` and two devices of
//! different ranks run a round of RBLA over LoRA factors of convolutions and of a linear layer; the
//! global adapter has R_max slots for every layer, and the merged export has 4-D conv kernels.

use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, provision, read_safetensors, run_ok, start_coordinator, Process};

#[test]
fn a_cnn_round_aggregates_conv_lora_factors_of_different_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["cam-a", "cam-b"]);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 1\nmin_devices = 2\nlocal_steps = 5\n[aggregation]\nmethod = \"rbla\"\nmax_rank = 4\n\
         [model.architecture.cnn]\nside = 28\nchannels = 1\nconv = [4, 8]\nhidden = 16\nclasses = 10\n",
        run = run.display()
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let mut devices: Vec<Process> = [("cam-a", "2"), ("cam-b", "4")]
        .iter()
        .map(|(id, rank)| {
            Process::spawn(
                id,
                Command::new(binary("flotilla-edge"))
                    .args(["run", "--coordinator", &address, "--rank", rank, "--samples", "64", "--kit"])
                    .arg(pki.join("kits").join(id)),
                &run.join("logs"),
            )
        })
        .collect();
    for device in &mut devices {
        assert!(device.wait(Duration::from_secs(120)).success(), "{}", device.logs());
    }
    assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());
    let (global, _) = read_safetensors(&run.join("global/round-1/adapter_model.safetensors"));
    let shape = |name: &str| (global[name].rows, global[name].cols);
    assert_eq!(shape("base_model.model.conv1.lora_A.weight"), (4, 9));
    assert_eq!(shape("base_model.model.conv2.lora_A.weight"), (4, 4 * 9));
    assert_eq!(shape("base_model.model.conv2.lora_B.weight"), (8, 4));
    assert_eq!(shape("base_model.model.fc1.lora_A.weight"), (4, 8 * 7 * 7));
    // Slots 3-4 of B come from the rank-4 device only; they moved off zero.
    let b = &global["base_model.model.conv2.lora_B.weight"];
    assert!((0..8).any(|r| b.at(r, 3) != 0.0), "the rank-4 device's slots were aggregated");

    run_ok(
        Command::new(binary("flotilla-coordinator"))
            .args(["export", "--merged", "--config"])
            .arg(run.join("c.toml"))
            .arg("--out")
            .arg(run.join("export")),
    );
    let bytes = std::fs::read(run.join("export/model.safetensors")).unwrap();
    let merged = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(merged.tensor("conv2.weight").unwrap().shape(), [8, 4, 3, 3]);
    assert_eq!(merged.tensor("fc1.weight").unwrap().shape(), [16, 8 * 7 * 7]);
}
