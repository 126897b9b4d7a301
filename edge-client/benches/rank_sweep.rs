//! Does the LoRA rank matter on a task? Centralized fine-tuning of all-MiniLM-L6-v2 at several
//! ranks on the pooled training split of a text task, each from the same seed and with the same
//! steps and scale, evaluated on held-out texts: the check the study's second edition asks for
//! before a federated grid (docs/study.md).
//!
//!   bash deploy/fetch-text-assets.sh
//!   cargo bench -p flotilla-edge --bench rank_sweep -- [--task rotten-tomatoes|bbc-news]
//!       [--ranks 2,4,8,16,32,64] [--steps 120] [--lr 0.002] [--eval 400] [--threads 2]

use std::path::PathBuf;
use std::time::Instant;

use flotilla_torch::data::text::{load_text, TextSplit};
use flotilla_torch::data::tokenizer::TextTokenizer;
use flotilla_torch::model::checkpoint::{FineTuning, HfCheckpoint};
use flotilla_torch::model::{Architecture, ArchitectureExt, LoraModel, Pooling};
use flotilla_wire::protocol::TrainingSettings;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let task: String = arg(&args, "--task", "rotten-tomatoes".to_string());
    let ranks: String = arg(&args, "--ranks", "2,4,8,16,32,64".to_string());
    let ranks: Vec<usize> = ranks.split(',').filter_map(|r| r.parse().ok()).collect();
    let steps: u32 = arg(&args, "--steps", 120);
    let learning_rate: f64 = arg(&args, "--lr", 2e-3);
    let eval: usize = arg(&args, "--eval", 400);
    tch::set_num_threads(arg(&args, "--threads", 2));
    let cache = flotilla_torch::cache::root();
    let (data, labels): (PathBuf, Vec<&str>) = match task.as_str() {
        "bbc-news" => {
            (cache.join("datasets/bbc-news"), vec!["business", "entertainment", "politics", "sports", "tech"])
        }
        _ => (cache.join("datasets/rotten-tomatoes.csv"), vec!["fresh", "rotten", "plot"]),
    };
    let labels: Vec<String> = labels.into_iter().map(String::from).collect();
    let checkpoint =
        HfCheckpoint::open(&flotilla_torch::cache::minilm_dir()).expect("bash deploy/fetch-text-assets.sh");
    let spec = checkpoint
        .spec(&FineTuning {
            target_modules: vec!["query".into(), "value".into()],
            pooling: Pooling::Cls,
            labels: labels.clone(),
            max_length: 64,
        })
        .expect("spec");
    let base = checkpoint.load_weights(&spec).expect("weights");
    let tokenizer = TextTokenizer::from_file(&checkpoint.tokenizer_path(), 64, spec.vocab as usize).expect("tokenizer");
    let train = load_text(&data, &labels, TextSplit::Train).expect("training texts");
    let test = load_text(&data, &labels, TextSplit::Test).expect("held-out texts");
    let train_set = tokenizer.dataset(&train.texts(), &train.labels()).expect("tokenize");
    let test_texts: Vec<&str> = test.texts().into_iter().take(eval).collect();
    let test_labels: Vec<i64> = test.labels().into_iter().take(eval).collect();
    let test_set = tokenizer.dataset(&test_texts, &test_labels).expect("tokenize");
    let architecture = Architecture::Bert(spec);
    let settings = TrainingSettings {
        local_steps: steps,
        local_epochs: 0,
        batch_size: 16,
        learning_rate,
        seed: 7,
        trainable: Default::default(),
    };
    println!(
        "{task}: {} training texts, {} held out; all-MiniLM-L6-v2, LoRA on query+value, scale 2, {steps} AdamW steps of 16 at lr {learning_rate}",
        train_set.len(),
        test_set.len()
    );
    println!("{:>5} {:>10} {:>10} {:>9}", "rank", "accuracy", "loss", "seconds");
    let untrained = architecture.init_adapter(ranks[0], 1).expect("adapter");
    let (loss, accuracy) = LoraModel::new(&architecture, &base, &untrained, 2.0, tch::Device::Cpu)
        .expect("model")
        .evaluate(&test_set, 64)
        .expect("evaluate");
    println!("{:>5} {:>9.1}% {:>10.4} {:>9}", "base", accuracy * 100.0, loss, "-");
    for rank in ranks {
        let started = Instant::now();
        let adapter = architecture.init_adapter(rank, 1).expect("adapter");
        let mut model = LoraModel::new(&architecture, &base, &adapter, 2.0, tch::Device::Cpu).expect("model");
        model.train_steps(&train_set, &settings).expect("train");
        let (loss, accuracy) = model.evaluate(&test_set, 64).expect("evaluate");
        println!("{rank:>5} {:>9.1}% {loss:>10.4} {:>9.0}", accuracy * 100.0, started.elapsed().as_secs_f64());
    }
}
