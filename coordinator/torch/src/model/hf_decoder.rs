//! A fine-tuned decoder as an HF model directory, and reading one back.
//!
//! `export --merged` on a decoder run writes `config.json` (a `LlamaForCausalLM` of the GGUF's
//! shape), `model.safetensors` (the adapter merged into the dequantized base, under HF's names; no
//! `lm_head.weight`, which is tied to the embedding), `tokenizer.json` (the GGUF's byte-level BPE)
//! and `tokenizer_config.json` (its special tokens and chat template):
//! `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)` load it.
//! `generate --model` reads the same directory back.

use std::path::Path;

use anyhow::{Context, Result};
use flotilla_torch::data::decoder_tokenizer::DecoderTokenizer;
use flotilla_torch::gguf::{tokenizer_json, GgufFile, LlamaSpec};
use flotilla_torch::model::llama::{decoder_spec, Decoder};
use flotilla_torch::model::{Architecture, ArchitectureExt, BaseWeights, DecoderSpec};
use tch::Tensor;

use crate::model::base::write_safetensors_atomically;

/// Writes the merged decoder `merged` (from `ArchitectureExt::merge`) as an HF directory `out`,
/// with the tokenizer of the GGUF file `gguf`.
pub fn write_merged_decoder(out: &Path, spec: &DecoderSpec, merged: &BaseWeights, gguf: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let file = GgufFile::open(gguf).with_context(|| format!("cannot open {}", gguf.display()))?;
    let (tokenizer_document, special) = tokenizer_json(file.metadata())?;
    let tokenizer = DecoderTokenizer::from_gguf(&file)?;
    let name = |id: Option<u32>| id.and_then(|id| tokenizer.token(id));
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": spec.context,
        "rms_norm_eps": spec.rms_eps,
        "rope_theta": spec.rope_base,
        "vocab_size": spec.vocab,
        "tie_word_embeddings": spec.tied_embeddings,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": special.bos,
        "eos_token_id": special.eos,
        "pad_token_id": special.pad,
        "torch_dtype": "float32",
        "flotilla": { "max_length": spec.max_length, "target_modules": spec.target_modules },
    });
    let tokenizer_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name(special.bos),
        "eos_token": name(special.eos),
        "pad_token": name(special.pad),
        "add_bos_token": special.add_bos,
        "chat_template": tokenizer.chat_template(),
        "model_max_length": spec.context,
    });
    for (file, value) in [
        ("config.json", &config),
        ("tokenizer.json", &tokenizer_document),
        ("tokenizer_config.json", &tokenizer_config),
    ] {
        let path = out.join(file);
        std::fs::write(&path, serde_json::to_string_pretty(value)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let named: Vec<(&str, &Tensor)> =
        merged.iter().filter(|(n, _)| n.as_str() != "lm_head.weight").map(|(n, t)| (n.as_str(), t)).collect();
    write_safetensors_atomically(&out.join("model.safetensors"), &named)
}

/// Reads a directory `write_merged_decoder` wrote (or any HF Llama directory in f32 with the same
/// files): its decoder and its tokenizer.
pub fn read_merged_decoder(dir: &Path, device: tch::Device) -> Result<(Decoder, DecoderTokenizer)> {
    let path = dir.join("config.json");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?)
            .with_context(|| format!("{} is not JSON", path.display()))?;
    let number = |key: &str| -> Result<u64> {
        config[key].as_u64().with_context(|| format!("{}: {key} is missing or not a whole number", path.display()))
    };
    let float = |key: &str, default: f64| config[key].as_f64().unwrap_or(default);
    let heads = number("num_attention_heads")? as usize;
    let spec = LlamaSpec {
        layers: number("num_hidden_layers")? as usize,
        hidden: number("hidden_size")? as usize,
        intermediate: number("intermediate_size")? as usize,
        heads,
        kv_heads: config["num_key_value_heads"].as_u64().map_or(heads, |k| k as usize),
        vocab: number("vocab_size")? as usize,
        context: number("max_position_embeddings")? as usize,
        rms_eps: float("rms_norm_eps", 1e-6),
        rope_base: float("rope_theta", 10_000.0),
        tied_embeddings: config["tie_word_embeddings"].as_bool().unwrap_or(false),
    };
    let weights_path = dir.join("model.safetensors");
    let weights: BaseWeights = Tensor::read_safetensors(&weights_path)
        .with_context(|| format!("cannot read {}", weights_path.display()))?
        .into_iter()
        .collect();
    let architecture = Architecture::Llama(decoder_spec(&spec, Vec::new(), 8, Vec::new()));
    architecture.check_base(&weights).with_context(|| weights_path.display().to_string())?;
    let decoder = Decoder::from_weights(spec, &weights, device)?;
    let tokenizer = DecoderTokenizer::from_hf_dir(dir)?;
    Ok((decoder, tokenizer))
}
