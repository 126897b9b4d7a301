//! The decoder on a tiny random Llama written as GGUF by the test (no checkpoint needed): its
//! tokenizer, the KV cache against the full forward, LoRA's zero start, headline examples, and
//! LoRA training that lowers the loss on the target tokens.

use flotilla_data::headline::HeadlineExample;
use flotilla_gguf::{tiny::tiny_llama, GgufFile, TensorType};
use flotilla_torch::data::decoder_tokenizer::{DecoderExample, DecoderTokenizer};
use flotilla_torch::model::decoder_lora::DecoderLora;
use flotilla_torch::model::llama::Decoder;
use tch::{Device, Tensor};

fn tiny(kind: TensorType) -> (Decoder, DecoderTokenizer) {
    let file = GgufFile::from_bytes(Box::new(tiny_llama(7, kind))).expect("the tiny file reads");
    (Decoder::load(&file, Device::Cpu).unwrap(), DecoderTokenizer::from_gguf(&file).unwrap())
}

fn article(i: usize) -> HeadlineExample {
    HeadlineExample {
        key: format!("business/{i:03}.txt"),
        headline: format!("Profits rise {i}"),
        body: format!("The company said its profits rose by {i} percent in the quarter, more than expected. ")
            .repeat(4),
        label: 0,
    }
}

#[test]
fn the_tiny_tokenizer_merges_and_round_trips() {
    let (_, tokenizer) = tiny(TensorType::F32);
    let ids = tokenizer.encode("in the thin").unwrap();
    // "in", " the", " t", "h", "in": three merges used.
    assert_eq!(ids.len(), 5, "{ids:?}");
    assert_eq!(tokenizer.decode(&ids).unwrap(), "in the thin");
    let chat = tokenizer.chat_prompt("hi").unwrap();
    assert_eq!(chat, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    assert_eq!(tokenizer.encode(&chat).unwrap()[0], 1, "<|im_start|> stays one special token");
}

#[test]
fn cached_generation_equals_the_full_forward_at_every_step() {
    for kind in [TensorType::F32, TensorType::Q8_0, TensorType::Q4_1] {
        let (decoder, _) = tiny(kind);
        let prompt: Vec<i64> = vec![1, 80, 90, 100, 110, 2, 1];
        let generated = decoder.generate_greedy(&prompt, 12, None, None).unwrap();
        let mut sequence = prompt.clone();
        for &next in &generated {
            let input = Tensor::from_slice(&sequence).view([1, sequence.len() as i64]);
            let logits = tch::no_grad(|| decoder.logits(&input, None)).unwrap();
            let expected = logits.get(0).get(sequence.len() as i64 - 1).argmax(-1, false).int64_value(&[]);
            assert_eq!(next, expected, "{kind:?}");
            sequence.push(next);
        }
    }
}

#[test]
fn fresh_lora_leaves_the_model_unchanged_and_trained_lora_changes_it() {
    let (decoder, tokenizer) = tiny(TensorType::Q8_0);
    let targets = vec!["q_proj".to_string(), "v_proj".to_string()];
    let mut lora = DecoderLora::new(&decoder.spec, &targets, 4, 2.0, 3, Device::Cpu).unwrap();
    assert_eq!(lora.factors().len(), 4, "q and v in each of 2 layers");
    let input = Tensor::from_slice(&[1i64, 50, 60, 70]).view([1, 4]);
    let base = tch::no_grad(|| decoder.logits(&input, None)).unwrap();
    let fresh = tch::no_grad(|| decoder.logits(&input, Some(&lora.lora()))).unwrap();
    assert_eq!(f64::try_from((&base - &fresh).abs().max()).unwrap(), 0.0);
    let examples = vec![tokenizer.headline_example(&article(1), 96).unwrap()];
    lora.train_steps(&decoder, &examples, 3, 1, 1e-2, 0).unwrap();
    let trained = tch::no_grad(|| decoder.logits(&input, Some(&lora.lora()))).unwrap();
    assert!(f64::try_from((&base - &trained).abs().max()).unwrap() > 1e-4);
}

#[test]
fn headline_examples_cut_the_body_and_put_the_loss_on_the_headline() {
    let (_, tokenizer) = tiny(TensorType::F32);
    let example = tokenizer.headline_example(&article(7), 120).unwrap();
    assert_eq!(example.ids.len(), 120);
    let target: Vec<u32> = example.ids[example.target_start..].iter().map(|&i| i as u32).collect();
    assert_eq!(tokenizer.decode(&target).unwrap(), "Profits rise 7<|im_end|>");
    let prompt: Vec<u32> = example.ids[..example.target_start].iter().map(|&i| i as u32).collect();
    let prompt = tokenizer.decode(&prompt).unwrap();
    assert!(prompt.starts_with("<|im_start|>user\nWrite a headline for this news article.\n\nThe company"), "{prompt}");
    assert!(prompt.ends_with("<|im_end|>\n<|im_start|>assistant\n"), "{prompt}");
    let error = tokenizer.headline_example(&article(7), 30).unwrap_err().to_string();
    assert!(error.contains("business/007.txt") && error.contains("maximum length 30"), "{error}");
}

#[test]
fn lora_training_lowers_the_headline_loss() {
    let (decoder, tokenizer) = tiny(TensorType::Q4_1);
    let targets = vec!["q_proj".to_string(), "v_proj".to_string()];
    let mut lora = DecoderLora::new(&decoder.spec, &targets, 8, 2.0, 1, Device::Cpu).unwrap();
    let examples: Vec<DecoderExample> = (0..6).map(|i| tokenizer.headline_example(&article(i), 96).unwrap()).collect();
    let before = lora.evaluate(&decoder, &examples, 4).unwrap();
    lora.train_steps(&decoder, &examples, 40, 4, 1e-2, 0).unwrap();
    let after = lora.evaluate(&decoder, &examples, 4).unwrap();
    assert!(after < 0.7 * before, "loss per headline token {before:.3} → {after:.3}");
}

#[test]
fn a_base_kept_4_bit_computes_what_the_dequantized_base_does() {
    let file = GgufFile::from_bytes(Box::new(tiny_llama(7, TensorType::Q4_1))).unwrap();
    let (spec, dense) = flotilla_torch::model::llama::load_base(&file).unwrap();
    let (_, packed) = flotilla_torch::model::quantized::load_base_q4(&file).unwrap();
    assert!(flotilla_torch::model::quantized::any_q4(&packed));
    assert!(!packed.contains_key("model.layers.0.self_attn.q_proj.weight"), "held 4-bit, not dense");
    let bytes = |weights: &flotilla_torch::model::BaseWeights| -> i64 {
        weights.values().map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64).sum()
    };
    assert!(bytes(&packed) * 2 < bytes(&dense), "{} bytes 4-bit, {} dense", bytes(&packed), bytes(&dense));
    let dense = Decoder::from_weights(spec.clone(), &dense, Device::Cpu).unwrap();
    let packed = Decoder::from_weights(spec, &packed, Device::Cpu).unwrap();
    let input = Tensor::from_slice(&[1i64, 40, 50, 60, 70, 80]).view([1, 6]);
    let (a, b) = tch::no_grad(|| (dense.logits(&input, None).unwrap(), packed.logits(&input, None).unwrap()));
    assert_eq!(f64::try_from((&a - &b).abs().max()).unwrap(), 0.0, "the same weights, dequantized the same way");
}

#[test]
fn layer_by_layer_training_takes_the_steps_plain_autograd_takes() {
    let (decoder, tokenizer) = tiny(TensorType::Q8_0);
    let targets = vec!["q_proj".to_string(), "v_proj".to_string()];
    let examples: Vec<DecoderExample> = (0..4).map(|i| tokenizer.headline_example(&article(i), 96).unwrap()).collect();
    let mut plain = DecoderLora::new(&decoder.spec, &targets, 4, 2.0, 5, Device::Cpu).unwrap();
    let mut layered = DecoderLora::new(&decoder.spec, &targets, 4, 2.0, 5, Device::Cpu).unwrap();
    layered.layered = true;
    let plain_losses = plain.train_steps(&decoder, &examples, 3, 4, 1e-2, 9).unwrap();
    let layered_losses = layered.train_steps(&decoder, &examples, 3, 4, 1e-2, 9).unwrap();
    for (p, l) in plain_losses.iter().zip(&layered_losses) {
        assert!((p - l).abs() < 1e-4, "losses {plain_losses:?} vs {layered_losses:?}");
    }
    for ((name, (pa, pb)), (_, (la, lb))) in plain.factors().iter().zip(layered.factors()) {
        let worst = f64::try_from((pa - la).abs().max()).unwrap().max(f64::try_from((pb - lb).abs().max()).unwrap());
        assert!(worst < 1e-5, "{name}: factors differ by {worst}");
    }
}

#[test]
fn with_a_frozen_every_a_stays_bit_for_bit_and_b_trains_in_both_ways_of_stepping() {
    let (decoder, tokenizer) = tiny(TensorType::Q8_0);
    let targets = vec!["q_proj".to_string(), "v_proj".to_string()];
    let examples: Vec<DecoderExample> = (0..4).map(|i| tokenizer.headline_example(&article(i), 96).unwrap()).collect();
    for layered in [false, true] {
        let mut lora = DecoderLora::new(&decoder.spec, &targets, 4, 2.0, 5, Device::Cpu).unwrap();
        lora.layered = layered;
        lora.frozen_a = true;
        let before: Vec<(Tensor, Tensor)> =
            lora.factors().values().map(|(a, b)| (a.detach().copy(), b.detach().copy())).collect();
        lora.train_steps(&decoder, &examples, 3, 4, 1e-2, 9).unwrap();
        for ((a, b), (a0, b0)) in lora.factors().values().zip(&before) {
            assert!(a.equal(a0), "layered {layered}: an A moved");
            assert!(!b.equal(b0), "layered {layered}: a B did not train");
        }
    }
}
