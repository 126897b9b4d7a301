//! The decoder against HF transformers on SmolLM2-135M-Instruct loaded from the same GGUF
//! (`deploy/transformer/decoder_reference.py` wrote the fixture): token ids identical, logits within
//! 1e-4, 32 greedy tokens identical. Runs when the cache has the model (`deploy/fetch-text-assets.sh`);
//! `FLOTILLA_REQUIRE_SMOLLM2=1`, set by the test command, makes its absence a failure.

use std::path::PathBuf;

use flotilla_gguf::GgufFile;
use flotilla_torch::data::decoder_tokenizer::DecoderTokenizer;
use flotilla_torch::model::llama::Decoder;
use serde_json::Value;
use tch::{Device, Tensor};

fn smollm2() -> Option<PathBuf> {
    let path = flotilla_torch::cache::smollm2_file();
    if path.is_file() {
        return Some(path);
    }
    assert!(std::env::var_os("FLOTILLA_REQUIRE_SMOLLM2").is_none(), "{} is missing", path.display());
    None
}

fn reference() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2-reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(value: &Value) -> Vec<i64> {
    value.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

fn floats(value: &Value) -> Vec<f32> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

#[test]
fn the_tokenizer_and_chat_template_match_hf() {
    let Some(path) = smollm2() else { return };
    let file = GgufFile::open(&path).unwrap();
    let tokenizer = DecoderTokenizer::from_gguf(&file).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49152);
    let reference = reference();
    let strings = reference["strings"].as_array().unwrap();
    for (text, (hf, upstream)) in strings.iter().zip(
        reference["gguf_tokenizer_ids"]
            .as_array()
            .unwrap()
            .iter()
            .zip(reference["upstream_tokenizer_ids"].as_array().unwrap()),
    ) {
        let text = text.as_str().unwrap();
        let ours: Vec<i64> = tokenizer.encode(text).unwrap().into_iter().map(i64::from).collect();
        assert_eq!(ours, ids(hf), "{text:?}");
        assert_eq!(ours, ids(upstream), "{text:?}");
        let round_trip = tokenizer.decode(&ours.iter().map(|&i| i as u32).collect::<Vec<_>>()).unwrap();
        assert_eq!(round_trip, text);
    }
    for prompt in reference["prompts"].as_array().unwrap() {
        let text = tokenizer.chat_prompt(prompt["prompt"].as_str().unwrap()).unwrap();
        assert_eq!(text, prompt["text"].as_str().unwrap());
        let ours: Vec<i64> = tokenizer.encode(&text).unwrap().into_iter().map(i64::from).collect();
        assert_eq!(ours, ids(&prompt["ids"]));
    }
}

#[test]
fn logits_and_greedy_generation_match_hf_llama_for_causal_lm() {
    let Some(path) = smollm2() else { return };
    tch::set_num_threads(1);
    let file = GgufFile::open(&path).unwrap();
    let decoder = Decoder::load(&file, Device::Cpu).unwrap();
    let parameters: i64 = decoder.weights.values().map(|t| t.numel() as i64).sum();
    let reference = reference();
    assert_eq!(parameters, reference["parameters"].as_i64().unwrap(), "LlamaForCausalLM's count (tied output)");
    let probes: Vec<i64> = ids(&reference["probe_ids"]);
    let probe_index = Tensor::from_slice(&probes);
    let mut worst = 0f32;
    for (k, prompt) in reference["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt_ids = ids(&prompt["ids"]);
        let input = Tensor::from_slice(&prompt_ids).view([1, prompt_ids.len() as i64]);
        let logits = tch::no_grad(|| decoder.logits(&input, None)).unwrap().get(0);
        let expected: Vec<Vec<f32>> = prompt["probe_logits"].as_array().unwrap().iter().map(floats).collect();
        let ours = logits.index_select(1, &probe_index);
        for (position, row) in expected.iter().enumerate() {
            let got = Vec::<f32>::try_from(ours.get(position as i64)).unwrap();
            worst = row.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
        }
        if k == 0 {
            let last = Vec::<f32>::try_from(logits.get(prompt_ids.len() as i64 - 1)).unwrap();
            let expected = floats(&prompt["last_logits"]);
            assert_eq!(last.len(), expected.len());
            worst = expected.iter().zip(&last).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
        }
        let greedy = decoder.generate_greedy(&prompt_ids, 32, None, None).unwrap();
        assert_eq!(greedy, ids(&prompt["greedy"]), "greedy tokens for {:?}", prompt["prompt"]);
    }
    assert!(worst <= 1e-4, "logits differ from HF's by up to {worst}");
    eprintln!("largest logit difference from HF: {worst:e}");
}
