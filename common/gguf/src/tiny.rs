//! A tiny random Llama as a GGUF file, for tests that need a real decoder but not a real
//! checkpoint: 2 layers, hidden 64, 4 query and 2 key/value heads, a byte-level vocabulary of the
//! 256 bytes plus ChatML's special tokens and a few merges, and SmolLM2's chat template shape.

use crate::dequant::quantize;
use crate::tensor::TensorType;
use crate::value::{Metadata, Value};
use crate::write::{write_gguf, TensorToWrite};

pub const TINY_HIDDEN: u64 = 64;
const LAYERS: u64 = 2;
const INTERMEDIATE: u64 = 128;
const HEADS: u64 = 4;
const KV_HEADS: u64 = 2;
const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const MERGES: [&str; 4] = ["Ġ t", "h e", "Ġt he", "i n"];
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + \
     message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// GPT-2's byte alphabet (the printable spelling of each byte), as [`crate::tokenizer`] uses it.
fn byte_tokens() -> Vec<String> {
    let mut next = 256u32;
    (0..256u32)
        .map(|byte| {
            let printable = (33..=126).contains(&byte) || (161..=172).contains(&byte) || (174..=255).contains(&byte);
            let code = if printable {
                byte
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).map(String::from).unwrap_or_default()
        })
        .collect()
}

fn vocabulary() -> Vec<String> {
    let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
    tokens.extend(byte_tokens());
    tokens.extend(MERGES.iter().map(|m| m.replace(' ', "")));
    tokens
}

/// A deterministic pseudo-random stream (SplitMix64) in ±`bound`.
fn values(count: u64, bound: f32, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * bound
        })
        .collect()
}

/// The tiny decoder's file; `kind` is the type of its projection weights (norms stay F32).
pub fn tiny_llama(seed: u64, kind: TensorType) -> Vec<u8> {
    let tokens = vocabulary();
    let vocab = tokens.len() as u64;
    let head_dim = TINY_HIDDEN / HEADS;
    let strings = |items: Vec<String>| Value::Array(items.into_iter().map(Value::String).collect());
    let metadata = Metadata {
        entries: vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("general.alignment".into(), Value::U32(32)),
            ("llama.block_count".into(), Value::U32(LAYERS as u32)),
            ("llama.context_length".into(), Value::U32(256)),
            ("llama.embedding_length".into(), Value::U32(TINY_HIDDEN as u32)),
            ("llama.feed_forward_length".into(), Value::U32(INTERMEDIATE as u32)),
            ("llama.attention.head_count".into(), Value::U32(HEADS as u32)),
            ("llama.attention.head_count_kv".into(), Value::U32(KV_HEADS as u32)),
            ("llama.rope.freq_base".into(), Value::F32(10_000.0)),
            ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
            ("llama.rope.dimension_count".into(), Value::U32(head_dim as u32)),
            ("llama.vocab_size".into(), Value::U32(vocab as u32)),
            ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
            ("tokenizer.ggml.pre".into(), Value::String("smollm".into())),
            ("tokenizer.ggml.tokens".into(), strings(tokens.clone())),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array((0..vocab).map(|i| Value::I32(if i < 3 { 3 } else { 1 })).collect()),
            ),
            ("tokenizer.ggml.merges".into(), strings(MERGES.iter().map(|m| m.to_string()).collect())),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
            ("tokenizer.chat_template".into(), Value::String(CHAT_TEMPLATE.into())),
        ],
    };
    let kv = KV_HEADS * head_dim;
    let mut shapes: Vec<(String, Vec<u64>, bool)> = vec![
        ("token_embd.weight".into(), vec![TINY_HIDDEN, vocab], false),
        ("output_norm.weight".into(), vec![TINY_HIDDEN], true),
    ];
    for layer in 0..LAYERS {
        for (name, dims, norm) in [
            ("attn_norm", vec![TINY_HIDDEN], true),
            ("attn_q", vec![TINY_HIDDEN, TINY_HIDDEN], false),
            ("attn_k", vec![TINY_HIDDEN, kv], false),
            ("attn_v", vec![TINY_HIDDEN, kv], false),
            ("attn_output", vec![TINY_HIDDEN, TINY_HIDDEN], false),
            ("ffn_norm", vec![TINY_HIDDEN], true),
            ("ffn_gate", vec![TINY_HIDDEN, INTERMEDIATE], false),
            ("ffn_up", vec![TINY_HIDDEN, INTERMEDIATE], false),
            ("ffn_down", vec![INTERMEDIATE, TINY_HIDDEN], false),
        ] {
            shapes.push((format!("blk.{layer}.{name}.weight"), dims, norm));
        }
    }
    let tensors: Vec<TensorToWrite> = shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, dims, norm))| {
            let count: u64 = dims.iter().product();
            let (kind, data) = if norm {
                let ones: Vec<f32> = values(count, 0.1, seed ^ i as u64).iter().map(|v| 1.0 + v).collect();
                (TensorType::F32, ones)
            } else {
                (kind, values(count, 0.5 / (dims[0] as f32).sqrt() * 3f32.sqrt(), seed.wrapping_mul(31) ^ i as u64))
            };
            TensorToWrite { name, dims, kind, bytes: quantize(kind, &data) }
        })
        .collect();
    write_gguf(&metadata, &tensors)
}
