//! The transformer's costs on this machine: the LoRA training step of all-MiniLM-L6-v2 (rank 8 on
//! query and value, a 5-class head, batch 16, sequence length 64, AdamW, no dropout), the peak
//! memory of the process, tokenization throughput, and the coordinator's evaluation cost.
//!
//!   bash deploy/fetch-text-assets.sh
//!   cargo bench -p flotilla-edge --bench transformer_step [-- --threads N --json]
//!
//! `deploy/transformer/bench_step.py` times the identical step in PyTorch + PEFT on the same
//! machine; docs/benchmarks.md has both and the command that compares them.

use std::time::Instant;

use flotilla_torch::data::text::{load_text, TextSplit};
use flotilla_torch::data::tokenizer::TextTokenizer;
use flotilla_torch::data::Dataset;
use flotilla_torch::model::checkpoint::{FineTuning, HfCheckpoint};
use flotilla_torch::model::{Architecture, ArchitectureExt, LoraModel, Pooling};
use flotilla_wire::protocol::TrainingSettings;
use tch::{Kind, Tensor};

const BATCH: i64 = 16;
const LENGTH: i64 = 64;
const STEPS: u32 = 10;

#[path = "support/mod.rs"]
mod support;
use support::{median, peak_rss_mib, threads_and_json};

fn main() {
    let (threads, json) = threads_and_json();
    tch::set_num_threads(threads);
    let device = tch::Device::cuda_if_available();
    let model_dir = flotilla_torch::cache::minilm_dir();
    let labels: Vec<String> = ["business", "entertainment", "politics", "sports", "tech"].map(String::from).to_vec();
    let checkpoint = HfCheckpoint::open(&model_dir).expect("all-MiniLM-L6-v2 (bash deploy/fetch-text-assets.sh)");
    let spec = checkpoint
        .spec(&FineTuning {
            target_modules: vec!["query".into(), "value".into()],
            pooling: Pooling::Cls,
            labels: labels.clone(),
            max_length: LENGTH as u32,
        })
        .expect("spec");
    let base = checkpoint.load_weights(&spec).expect("weights");
    let architecture = Architecture::Bert(spec.clone());

    // The step: fixed random token ids, every input exactly LENGTH tokens (as the PyTorch script).
    let ids = Tensor::randint_low(1000, 30000, [BATCH * 8, LENGTH], (Kind::Int64, tch::Device::Cpu));
    let data = Dataset::tokens(
        ids,
        Tensor::full([BATCH * 8], LENGTH, (Kind::Int64, tch::Device::Cpu)),
        Tensor::randint(5, [BATCH * 8], (Kind::Int64, tch::Device::Cpu)),
    );
    let adapter = architecture.init_adapter(8, 1).expect("adapter");
    let mut model = LoraModel::new(&architecture, &base, &adapter, 2.0, device).expect("model");
    let settings = TrainingSettings {
        local_steps: STEPS,
        local_epochs: 0,
        batch_size: BATCH as u32,
        learning_rate: 1e-3,
        seed: 3,
        trainable: Default::default(),
    };
    model.train_steps(&data, &settings).expect("warm-up");
    let step_ms = median(
        (0..5)
            .map(|_| {
                let start = Instant::now();
                model.train_steps(&data, &settings).expect("steps");
                if let tch::Device::Cuda(index) = device {
                    tch::Cuda::synchronize(index as i64);
                }
                start.elapsed().as_secs_f64() * 1000.0 / f64::from(STEPS)
            })
            .collect(),
    );
    let peak_mib = peak_rss_mib();

    // The coordinator's evaluation: forward passes at batch 64 over 128 such inputs.
    let eval_ms = median(
        (0..3)
            .map(|_| {
                let start = Instant::now();
                model.evaluate(&data, 64).expect("evaluate");
                start.elapsed().as_secs_f64() * 1000.0 / (BATCH * 8) as f64
            })
            .collect(),
    );

    // Tokenization of BBC News's training texts at length 64, when the cache has them.
    let bbc = flotilla_torch::cache::root().join("datasets/bbc-news");
    let tokenization = load_text(&bbc, &labels, TextSplit::Train).ok().map(|corpus| {
        let tokenizer = TextTokenizer::from_file(&checkpoint.tokenizer_path(), LENGTH as usize, spec.vocab as usize)
            .expect("tokenizer");
        let texts = corpus.texts();
        let start = Instant::now();
        tokenizer.dataset(&texts, &corpus.labels()).expect("tokenize");
        let seconds = start.elapsed().as_secs_f64();
        (texts.len(), texts.len() as f64 / seconds, texts.iter().map(|t| t.len()).sum::<usize>() as f64 / seconds / 1e6)
    });

    if json {
        println!(
            "{}",
            serde_json::json!({
                "implementation": "flotilla (tch)", "device": format!("{device:?}"), "threads": threads,
                "batch": BATCH, "length": LENGTH, "rank": 8, "step_ms": step_ms, "peak_rss_mib": peak_mib,
                "eval_ms_per_text": eval_ms,
                "tokenized_texts_per_s": tokenization.map(|t| t.1),
            })
        );
        return;
    }
    println!(
        "all-MiniLM-L6-v2, LoRA rank 8 on query+value, batch {BATCH}, length {LENGTH}, {threads} thread(s), {device:?}"
    );
    println!("  training step:      {step_ms:.1} ms (median of 5 x {STEPS} steps)");
    println!("  peak memory (RSS):  {peak_mib:.0} MiB");
    println!("  evaluation:         {eval_ms:.2} ms per text (batch 64)");
    match tokenization {
        Some((n, per_s, mb_s)) => {
            println!("  tokenization:       {n} BBC News texts at {per_s:.0} texts/s ({mb_s:.1} MB of text/s)")
        }
        None => println!("  tokenization:       skipped ({} not found)", bbc.display()),
    }
}
