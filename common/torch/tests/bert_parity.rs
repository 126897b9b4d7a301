//! Parity with HF: the tokenizer gives HF's token ids and the encoder HF `BertModel`'s pooled
//! outputs, on a tiny checkpoint checked in here and on all-MiniLM-L6-v2 when the cache has it.
//! The reference values come from `deploy/transformer/hf_reference.py` (transformers 5.x).

use std::path::{Path, PathBuf};

use flotilla_torch::data::tokenizer::TextTokenizer;
use flotilla_torch::model::bert;
use flotilla_torch::model::checkpoint::{FineTuning, HfCheckpoint};
use flotilla_torch::model::{Architecture, ArchitectureExt, LoraModel, Pooling};
use tch::{Device, Tensor};

#[derive(serde::Deserialize)]
struct Reference {
    sentences: Vec<String>,
    max_length: u32,
    ids: Vec<Vec<u32>>,
    cls: Vec<Vec<f32>>,
    mean: Vec<Vec<f32>>,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fine_tuning(pooling: Pooling, max_length: u32) -> FineTuning {
    FineTuning {
        target_modules: vec!["query".into(), "value".into()],
        pooling,
        labels: vec!["a".into(), "b".into(), "c".into()],
        max_length,
    }
}

/// Checks ids and both poolings against `reference`; returns the largest absolute difference.
fn check_against(dir: &Path, reference: &Reference) -> f64 {
    let checkpoint = HfCheckpoint::open(dir).unwrap();
    let mut worst: f64 = 0.0;
    for (pooling, want) in [(Pooling::Cls, &reference.cls), (Pooling::Mean, &reference.mean)] {
        let spec = checkpoint.spec(&fine_tuning(pooling, reference.max_length)).unwrap();
        let weights = checkpoint.load_weights(&spec).unwrap();
        let tokenizer =
            TextTokenizer::from_file(&checkpoint.tokenizer_path(), reference.max_length as usize, spec.vocab as usize)
                .unwrap();
        for (sentence, ids) in reference.sentences.iter().zip(&reference.ids) {
            assert_eq!(&tokenizer.encode(sentence).unwrap(), ids, "token ids of {sentence:?}");
        }
        let texts: Vec<&str> = reference.sentences.iter().map(String::as_str).collect();
        let data = tokenizer.dataset(&texts, &vec![0; texts.len()]).unwrap();
        let ours = bert::pooled(&spec, &weights, &data.features, data.lengths.as_ref().unwrap()).unwrap();
        let flat: Vec<f32> = want.iter().flatten().copied().collect();
        let theirs = Tensor::from_slice(&flat).view([want.len() as i64, -1]);
        let difference = (&ours - &theirs).abs().max().double_value(&[]);
        assert!(difference < 1e-4, "{pooling:?} pooling differs from HF by {difference}");
        worst = worst.max(difference);
        // A batch without padding takes the unmasked attention path: the same result.
        for (row, text) in texts.iter().enumerate() {
            let alone = tokenizer.dataset(&[text], &[0]).unwrap();
            let pooled = bert::pooled(&spec, &weights, &alone.features, alone.lengths.as_ref().unwrap()).unwrap();
            let difference = (pooled.get(0) - theirs.get(row as i64)).abs().max().double_value(&[]);
            assert!(difference < 1e-4, "{text:?} alone differs from HF by {difference}");
        }

        // With B = 0 the LoRA model is the base encoder plus the head.
        let architecture = Architecture::Bert(spec);
        let adapter = architecture.init_adapter(4, 1).unwrap();
        let model = LoraModel::new(&architecture, &weights, &adapter, 2.0, Device::Cpu).unwrap();
        let logits = model.forward(&data.features, data.lengths.as_ref()).unwrap();
        let (w, b) = architecture.head_names().unwrap();
        let expected = ours.linear(adapter.get(&w).unwrap(), Some(adapter.get(&b).unwrap()));
        assert!((logits - expected).abs().max().double_value(&[]) < 1e-5);
    }
    worst
}

#[test]
fn tiny_checkpoint_matches_hf() {
    let dir = fixtures().join("tiny-bert");
    let reference: Reference = serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let worst = check_against(&dir, &reference);
    println!("tiny BERT: largest difference from HF {worst:.2e}");
}

/// all-MiniLM-L6-v2 from the cache (`deploy/fetch-text-assets.sh`); `FLOTILLA_REQUIRE_MINILM=1`
/// (set by `deploy/test.sh`) makes its absence a failure instead of a skip.
#[test]
fn minilm_matches_hf_when_the_cache_has_it() {
    let dir = flotilla_torch::cache::minilm_dir();
    if !dir.join("model.safetensors").is_file() {
        assert!(std::env::var_os("FLOTILLA_REQUIRE_MINILM").is_none(), "{} has no all-MiniLM-L6-v2", dir.display());
        eprintln!("skipped: {} has no all-MiniLM-L6-v2 (bash deploy/fetch-text-assets.sh)", dir.display());
        return;
    }
    let reference: Reference =
        serde_json::from_slice(&std::fs::read(fixtures().join("minilm-reference.json")).unwrap()).unwrap();
    let worst = check_against(&dir, &reference);
    println!("all-MiniLM-L6-v2: largest difference from HF {worst:.2e}");
}
