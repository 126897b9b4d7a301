//! Local LoRA training step time per model and rank, on this machine's CPU (or GPU when libtorch
//! sees one): the median of 5 timed runs of 20 AdamW steps each, batch 32, after a warm-up.
//!
//!   cargo bench -p flotilla-edge --bench steps [-- --threads N --ranks 2,8,32 --json]
//!
//! `--json` prints one JSON object per (model, rank), as `deploy/bench/steps_pytorch.py` does for
//! the same models and step in PyTorch.

use std::time::Instant;

use flotilla_torch::data::synthetic_classification;
use flotilla_torch::model::{Architecture, ArchitectureExt, LoraModel};
use flotilla_wire::protocol::TrainingSettings;

const STEPS: u32 = 20;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: i32 = args
        .iter()
        .position(|a| a == "--threads")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let ranks: Vec<usize> = args
        .iter()
        .position(|a| a == "--ranks")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|r| r.parse().ok()).collect())
        .unwrap_or_else(|| vec![2, 4, 8, 16, 32, 64]);
    let json = args.iter().any(|a| a == "--json");
    tch::set_num_threads(threads);
    let device = tch::Device::cuda_if_available();
    let models = [
        ("mlp", "mlp 784-128-64-10", Architecture::Mlp { input: 784, hidden: vec![128, 64], classes: 10 }),
        (
            "cnn",
            "cnn 28x28 conv 16,32 fc 128",
            Architecture::Cnn { side: 28, channels: 1, conv: vec![16, 32], hidden: 128, classes: 10 },
        ),
    ];
    if !json {
        println!(
            "device {device:?}, {threads} libtorch thread(s), batch 32; ms per training step (median of 5 × {STEPS})"
        );
        println!("{:<28} {:>5} {:>10}", "model", "rank", "ms/step");
    }
    for (key, label, architecture) in models {
        let data = synthetic_classification(2048, architecture.input_size(), 10, 1, 2);
        let base = architecture.init_base(1);
        for &rank in &ranks {
            let adapter = architecture.init_adapter(rank, 2).expect("adapter");
            let mut model = LoraModel::new(&architecture, &base, &adapter, 2.0, device).expect("model");
            let settings = TrainingSettings {
                local_steps: STEPS,
                local_epochs: 0,
                batch_size: 32,
                learning_rate: 1e-3,
                seed: 3,
                trainable: Default::default(),
            };
            model.train_steps(&data, &settings).expect("warm-up");
            let mut times: Vec<f64> = (0..5)
                .map(|_| {
                    let start = Instant::now();
                    model.train_steps(&data, &settings).expect("steps");
                    start.elapsed().as_secs_f64() * 1e3 / f64::from(STEPS)
                })
                .collect();
            times.sort_by(f64::total_cmp);
            if json {
                println!(
                    "{{\"impl\": \"tch\", \"model\": \"{key}\", \"rank\": {rank}, \"ms_per_step\": {:.4}}}",
                    times[2]
                );
            } else {
                println!("{label:<28} {rank:>5} {:>10.2}", times[2]);
            }
        }
    }
}
