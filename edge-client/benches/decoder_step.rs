//! The decoder's costs on this machine: the LoRA training step of SmolLM2-135M-Instruct (rank 8
//! on q_proj and v_proj, lora_alpha 16, batch 8, sequence length 128, loss on every token, AdamW,
//! no dropout), greedy generation speed, the time to load the GGUF, and the peak memory.
//!
//!   bash deploy/fetch-text-assets.sh
//!   cargo bench -p flotilla-edge --bench decoder_step [-- --threads N --json --q4]
//!
//! `--q4`: the frozen projections stay 4-bit (dequantized per layer as it runs) and training goes
//! layer by layer, recomputing each layer in the backward pass (QLoRA's memory shape).
//!
//! `deploy/transformer/bench_decoder.py` times the identical step and generation in PyTorch + HF
//! transformers + PEFT; `deploy/transformer/bench.sh --decoder` runs both (docs/benchmarks.md).

use std::time::Instant;

use flotilla_torch::data::decoder_tokenizer::DecoderExample;
use flotilla_torch::gguf::GgufFile;
use flotilla_torch::model::decoder_lora::DecoderLora;
use flotilla_torch::model::llama::Decoder;
use rand::{Rng, SeedableRng};

const BATCH: usize = 8;
const LENGTH: usize = 128;
const STEPS: usize = 3;
const NEW_TOKENS: usize = 32;

#[path = "support/mod.rs"]
mod support;
use support::{median, peak_rss_mib, threads_and_json};

fn main() {
    let (threads, json) = threads_and_json();
    tch::set_num_threads(threads);
    let device = tch::Device::cuda_if_available();
    let path = flotilla_torch::cache::smollm2_file();
    let started = Instant::now();
    let file = GgufFile::open(&path).expect("SmolLM2 (bash deploy/fetch-text-assets.sh)");
    let q4 = std::env::args().any(|a| a == "--q4");
    let (spec, weights) = if q4 {
        flotilla_torch::model::quantized::load_base_q4(&file).expect("decoder")
    } else {
        flotilla_torch::model::llama::load_base(&file).expect("decoder")
    };
    let decoder = Decoder::from_weights(spec, &weights, device).expect("decoder");
    drop(weights);
    let load_s = started.elapsed().as_secs_f64();

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let examples: Vec<DecoderExample> = (0..BATCH * 4)
        .map(|_| DecoderExample { ids: (0..LENGTH).map(|_| rng.random_range(100..49000)).collect(), target_start: 1 })
        .collect();
    let targets = vec!["q_proj".to_string(), "v_proj".to_string()];
    let mut lora = DecoderLora::new(&decoder.spec, &targets, 8, 2.0, 1, device).expect("lora");
    lora.layered = q4;
    lora.train_steps(&decoder, &examples, 1, BATCH, 1e-4, 0).expect("warm-up");
    let step_ms = median(
        (0..STEPS as u64)
            .map(|seed| {
                let start = Instant::now();
                lora.train_steps(&decoder, &examples, 1, BATCH, 1e-4, seed).expect("step");
                if let tch::Device::Cuda(index) = device {
                    tch::Cuda::synchronize(index as i64);
                }
                start.elapsed().as_secs_f64() * 1000.0
            })
            .collect(),
    );
    let train_peak_mib = peak_rss_mib();

    let prompt: Vec<i64> = examples[0].ids[..64].to_vec();
    let generated = Instant::now();
    let tokens = decoder.generate_greedy(&prompt, NEW_TOKENS, None, Some(&lora.lora())).expect("generate");
    let tokens_per_s = tokens.len() as f64 / generated.elapsed().as_secs_f64();

    if json {
        println!(
            "{{\"step_ms\": {step_ms:.1}, \"peak_rss_mib\": {train_peak_mib:.0}, \"load_s\": {load_s:.2}, \"tokens_per_s\": {tokens_per_s:.1}, \"threads\": {threads}, \"q4\": {q4}, \"device\": \"{device:?}\"}}"
        );
    } else {
        let base = if q4 { "4-bit base, layer by layer" } else { "f32 base" };
        println!(
            "SmolLM2-135M LoRA step (rank 8 on q/v, batch {BATCH}, {LENGTH} tokens, {threads} thread(s), {device:?}, {base}):"
        );
        println!("  step            {step_ms:.0} ms (median of {STEPS})");
        println!("  peak RSS        {train_peak_mib:.0} MiB (loading and training)");
        println!("  GGUF load       {load_s:.2} s");
        println!("  generation      {tokens_per_s:.1} tokens/s (greedy, KV cache, prompt of 64)");
    }
}
