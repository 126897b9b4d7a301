//! The real SmolLM2-135M-Instruct GGUF from the cache (`deploy/fetch-text-assets.sh`), when the
//! cache has it; `FLOTILLA_REQUIRE_SMOLLM2=1` (set by the test command) makes its absence a failure.

use std::path::PathBuf;

use flotilla_gguf::{GgufFile, TensorType};

fn smollm2() -> Option<PathBuf> {
    let path = std::env::var_os("FLOTILLA_SMOLLM2").map(PathBuf::from).or_else(|| {
        let cache = std::env::var_os("FLOTILLA_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/flotilla")))?;
        Some(cache.join("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"))
    })?;
    if path.is_file() {
        return Some(path);
    }
    assert!(std::env::var_os("FLOTILLA_REQUIRE_SMOLLM2").is_none(), "{} is missing", path.display());
    None
}

#[test]
fn the_smollm2_file_has_the_documented_layout() {
    let Some(path) = smollm2() else { return };
    let file = GgufFile::open(&path).expect("open SmolLM2");
    let metadata = file.metadata();
    assert_eq!(metadata.str("general.architecture").unwrap(), "llama");
    assert_eq!(metadata.u64("llama.block_count").unwrap(), 30);
    assert_eq!(metadata.u64("llama.embedding_length").unwrap(), 576);
    assert_eq!(metadata.u64("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(metadata.strings("tokenizer.ggml.tokens").unwrap().len(), 49152);
    let mut counts = std::collections::BTreeMap::new();
    for info in file.tensors() {
        *counts.entry(info.kind().unwrap().name()).or_insert(0) += 1;
    }
    assert_eq!(counts.get("Q4_1"), Some(&210));
    assert_eq!(counts.get("F32"), Some(&61));
    assert_eq!(counts.get("Q8_0"), Some(&1));
    let embedding = file.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(embedding.shape, [49152, 576]);
    assert!(embedding.values.iter().all(|v| v.is_finite()));
    assert_eq!(file.tensor_info("token_embd.weight").unwrap().kind().unwrap(), TensorType::Q8_0);
}

#[test]
fn the_chat_template_renders_as_hf_renders_it() {
    let Some(path) = smollm2() else { return };
    let file = GgufFile::open(&path).expect("open SmolLM2");
    let template = flotilla_gguf::ChatTemplate::from_metadata(file.metadata()).unwrap();
    let text = template.render(&[flotilla_gguf::ChatMessage::user("What is the capital of France?")], true).unwrap();
    // HF transformers' apply_chat_template on the same file (common/torch/tests/fixtures/smollm2-reference.json).
    let expected =
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
                    <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(text, expected);
}
