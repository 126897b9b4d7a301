//! A checkpoint or tokenizer that cannot be used is a clear error naming the file and the field.

use std::path::{Path, PathBuf};

use flotilla_torch::data::tokenizer::TextTokenizer;
use flotilla_torch::model::checkpoint::{sha256_file, FineTuning, HfCheckpoint};
use flotilla_torch::model::Pooling;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bert")
}

/// A copy of the tiny checkpoint in a temporary directory, to break.
fn copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(file), dir.path().join(file)).unwrap();
    }
    dir
}

fn fine_tuning() -> FineTuning {
    FineTuning {
        target_modules: vec!["query".into(), "value".into()],
        pooling: Pooling::Cls,
        labels: vec!["a".into(), "b".into()],
        max_length: 16,
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(path, config.to_string()).unwrap();
}

#[test]
fn missing_files_and_unsupported_configs_name_the_file() {
    let dir = copy();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = HfCheckpoint::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("missing"), "{err}");

    let dir = copy();
    edit_config(dir.path(), |c| c["model_type"] = "gpt2".into());
    let err = HfCheckpoint::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("\"gpt2\" is not supported"), "{err}");

    let dir = copy();
    edit_config(dir.path(), |c| c["position_embedding_type"] = "relative_key".into());
    assert!(HfCheckpoint::open(dir.path()).unwrap_err().to_string().contains("relative_key"));

    let dir = copy();
    edit_config(dir.path(), |c| c["hidden_act"] = "swish".into());
    assert!(HfCheckpoint::open(dir.path()).unwrap_err().to_string().contains("hidden_act \"swish\""));

    let dir = copy();
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"bert\"}").unwrap();
    let err = HfCheckpoint::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json") && err.contains("hidden_size"), "{err}");

    // A target that names no module, and a max length beyond the positions.
    let checkpoint = HfCheckpoint::open(&fixture()).unwrap();
    let mut bad = fine_tuning();
    bad.target_modules = vec!["attention".into()];
    assert!(checkpoint.spec(&bad).unwrap_err().to_string().contains("matches no linear module"));
    let mut bad = fine_tuning();
    bad.max_length = 1000;
    assert!(checkpoint.spec(&bad).unwrap_err().to_string().contains("max_length 1000"));
}

#[test]
fn weights_that_do_not_fit_the_config_are_refused() {
    // config.json says 3 layers; the weights have 2.
    let dir = copy();
    edit_config(dir.path(), |c| c["num_hidden_layers"] = 3.into());
    let checkpoint = HfCheckpoint::open(dir.path()).unwrap();
    let spec = checkpoint.spec(&fine_tuning()).unwrap();
    let err = checkpoint.load_weights(&spec).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("encoder.layer.2"), "{err}");

    // config.json says hidden 64; the weights are 32 wide.
    let dir = copy();
    edit_config(dir.path(), |c| {
        c["hidden_size"] = 64.into();
        c["intermediate_size"] = 128.into();
    });
    let checkpoint = HfCheckpoint::open(dir.path()).unwrap();
    let spec = checkpoint.spec(&fine_tuning()).unwrap();
    let err = checkpoint.load_weights(&spec).unwrap_err().to_string();
    assert!(err.contains("has shape"), "{err}");

    // Not a safetensors file at all.
    let dir = copy();
    std::fs::write(dir.path().join("model.safetensors"), b"not safetensors").unwrap();
    let checkpoint = HfCheckpoint::open(dir.path()).unwrap();
    let spec = checkpoint.spec(&fine_tuning()).unwrap();
    let err = checkpoint.load_weights(&spec).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("unreadable safetensors"), "{err}");
    assert_ne!(
        sha256_file(&dir.path().join("model.safetensors")).unwrap(),
        sha256_file(&fixture().join("model.safetensors")).unwrap()
    );
}

#[test]
fn a_tokenizer_whose_vocabulary_does_not_match_the_embeddings_is_refused() {
    let checkpoint = HfCheckpoint::open(&fixture()).unwrap();
    let spec = checkpoint.spec(&fine_tuning()).unwrap();
    let err =
        TextTokenizer::from_file(&checkpoint.tokenizer_path(), 16, spec.vocab as usize + 1).err().unwrap().to_string();
    assert!(err.contains("tokenizer.json") && err.contains("word embeddings have"), "{err}");
    let dir = copy();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let err = TextTokenizer::from_file(&dir.path().join("tokenizer.json"), 16, spec.vocab as usize)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a tokenizer.json"), "{err}");
}
