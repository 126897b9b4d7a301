//! Fold-and-Fill through the real system: a coordinator with `method = "fold-and-fill"` and two
//! devices of ranks 2 and 4 run two rounds. The rank-2 device receives its slice with the rest of
//! the global adapter folded into a merged delta (round tasks), trains, and uploads its prefix. The
//! second round's global adapter is checked against the formula recomputed here from the first
//! round's global and the updates the coordinator recorded: slots both devices cover are their
//! sample-weighted mean; slots only the rank-4 device covers move by its share of the round.

use std::process::Command;
use std::time::Duration;

use flotilla_tests::{binary, provision, read_safetensors, start_coordinator, Process};

#[test]
fn fold_and_fill_moves_a_slot_by_the_share_of_the_round_that_covers_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["phone-1", "laptop-1"]);
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\n\
         [round]\nrounds = 2\nmin_devices = 2\nlocal_steps = 10\nlearning_rate = 0.01\n\
         [aggregation]\nmethod = \"fold-and-fill\"\nmax_rank = 4\nrecord_updates = true\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [12]\nclasses = 3\n",
        run = run.display()
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    // Different amounts of data: the rank-4 device's share is 96 / (32 + 96) = 0.75.
    let mut devices: Vec<Process> = [("phone-1", "2", "32"), ("laptop-1", "4", "96")]
        .iter()
        .map(|(id, rank, samples)| {
            Process::spawn(
                id,
                Command::new(binary("flotilla-edge"))
                    .args(["run", "--coordinator", &address, "--rank", rank, "--samples", samples, "--kit"])
                    .arg(pki.join("kits").join(id)),
                &run.join("logs"),
            )
        })
        .collect();
    for device in &mut devices {
        assert!(device.wait(Duration::from_secs(120)).success(), "{}", device.logs());
    }
    assert!(coordinator.wait(Duration::from_secs(30)).success(), "{}", coordinator.logs());

    let (before, _) = read_safetensors(&run.join("global/round-1/adapter_model.safetensors"));
    let (after, _) = read_safetensors(&run.join("global/round-2/adapter_model.safetensors"));
    let (phone, _) = read_safetensors(&run.join("updates/round-2/phone-1/adapter_model.safetensors"));
    let (laptop, _) = read_safetensors(&run.join("updates/round-2/laptop-1/adapter_model.safetensors"));
    let a = "base_model.model.fc1.lora_A.weight";
    let (p_phone, p_laptop) = (0.25, 0.75);
    for column in 0..16 {
        for slot in 0..4 {
            let g = before[a].at(slot, column);
            let want = if slot < 2 {
                p_phone * phone[a].at(slot, column) + p_laptop * laptop[a].at(slot, column)
            } else {
                g + p_laptop * (laptop[a].at(slot, column) - g)
            };
            let got = after[a].at(slot, column);
            assert!((got - want).abs() < 1e-5 * (1.0 + want.abs()), "slot {slot}, column {column}: {got} vs {want}");
        }
    }
    assert_eq!(phone[a].rows, 2, "the phone uploads its prefix only");
}
