//! A fine-tuned transformer as an HF model directory, and classifying texts with one.
//!
//! `export --merged` on a transformer writes `config.json` (the base's, made a
//! `BertForSequenceClassification` with the run's labels), `model.safetensors` (the adapter merged
//! into the base, under HF's names: `bert.…` and `classifier.…`) and the base's `tokenizer.json`:
//! `AutoModelForSequenceClassification.from_pretrained(dir)` loads it as is. `classify` reads the
//! same directory back and labels texts with it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flotilla_torch::data::tokenizer::TextTokenizer;
use flotilla_torch::model::checkpoint::{FineTuning, HfCheckpoint, CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE};
use flotilla_torch::model::{Architecture, ArchitectureExt, BaseWeights, BertSpec, Pooling};
use serde::Serialize;
use tch::{Kind, Tensor};

/// The key of `config.json` where Flotilla keeps what HF's config has no field for.
const FLOTILLA_KEY: &str = "flotilla";

/// Writes the merged model `merged` (from `ArchitectureExt::merge`) as an HF directory `out`,
/// taking `config.json` and `tokenizer.json` from the base checkpoint `base_dir`.
pub fn write_merged(out: &Path, spec: &BertSpec, merged: &BaseWeights, base_dir: &Path) -> Result<()> {
    if spec.pooling != Pooling::Cls {
        bail!(
            "--merged writes a BertForSequenceClassification, which pools with [CLS]; this run pools with the mean \
             of the tokens, so HF would compute other logits (export the adapter alone, or fine-tune with pooling = \"cls\")"
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let base_config = base_dir.join(CONFIG_FILE);
    let mut config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&base_config).with_context(|| format!("cannot read {}", base_config.display()))?,
    )
    .with_context(|| format!("{} is not JSON", base_config.display()))?;
    let object = config.as_object_mut().with_context(|| format!("{} is not a JSON object", base_config.display()))?;
    let id2label: serde_json::Map<String, serde_json::Value> =
        spec.labels.iter().enumerate().map(|(i, l)| (i.to_string(), l.clone().into())).collect();
    let label2id: serde_json::Map<String, serde_json::Value> =
        spec.labels.iter().enumerate().map(|(i, l)| (l.clone(), i.into())).collect();
    object.insert("architectures".into(), serde_json::json!(["BertForSequenceClassification"]));
    object.insert("id2label".into(), id2label.into());
    object.insert("label2id".into(), label2id.into());
    object.insert("problem_type".into(), "single_label_classification".into());
    object.insert(
        FLOTILLA_KEY.into(),
        serde_json::json!({ "max_length": spec.max_length, "target_modules": spec.target_modules }),
    );
    flotilla_wire::files::write_atomically(&out.join(CONFIG_FILE), serde_json::to_string_pretty(&config)?.as_bytes())
        .with_context(|| format!("cannot write {}", out.join(CONFIG_FILE).display()))?;

    let named: Vec<(String, &Tensor)> = merged
        .iter()
        .map(|(name, tensor)| {
            let hf = if name.starts_with("classifier.") { name.clone() } else { format!("bert.{name}") };
            (hf, tensor)
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
    crate::model::base::write_safetensors_atomically(&out.join(WEIGHTS_FILE), &refs)?;
    std::fs::copy(base_dir.join(TOKENIZER_FILE), out.join(TOKENIZER_FILE))
        .with_context(|| format!("cannot copy {}", base_dir.join(TOKENIZER_FILE).display()))?;
    Ok(())
}

/// A sequence classifier read from an HF directory (`export --merged`, or any
/// `BertForSequenceClassification` with `id2label`).
pub struct Classifier {
    architecture: Architecture,
    weights: BaseWeights,
    tokenizer: TextTokenizer,
    labels: Vec<String>,
}

/// One text's verdict.
#[derive(Debug, Serialize)]
pub struct Classified {
    pub text: String,
    pub label: String,
    pub probability: f64,
    pub logits: Vec<f32>,
}

impl Classifier {
    /// Loads `dir`; texts are truncated at `max_length` tokens (default: the fine-tuning's).
    pub fn load(dir: &Path, max_length: Option<u32>) -> Result<Classifier> {
        let checkpoint = HfCheckpoint::open(dir)?;
        let config_path = dir.join(CONFIG_FILE);
        let config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
        let labels = labels_of(&config).with_context(|| config_path.display().to_string())?;
        let positions = checkpoint.config.max_position_embeddings;
        if let Some(asked) = max_length {
            anyhow::ensure!(
                (1..=positions).contains(&asked),
                "--max-length {asked}: the model takes 1 to {positions} tokens per text"
            );
        }
        let max_length = max_length
            .or_else(|| config[FLOTILLA_KEY]["max_length"].as_u64().map(|n| n as u32))
            .unwrap_or(128)
            .min(positions);
        let spec = checkpoint.spec(&FineTuning {
            // No LoRA in a merged model: the targets only have to name a module.
            target_modules: vec!["query".into()],
            pooling: Pooling::Cls,
            labels: labels.clone(),
            max_length,
        })?;
        let mut weights = checkpoint.load_weights(&spec)?;
        let path = checkpoint.weights_path();
        let all: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .into_iter()
            .collect();
        for (name, want) in [
            ("classifier.weight", vec![labels.len() as i64, spec.hidden as i64]),
            ("classifier.bias", vec![labels.len() as i64]),
        ] {
            let tensor = all
                .get(name)
                .with_context(|| format!("{}: no '{name}' (not a sequence classifier)", path.display()))?;
            anyhow::ensure!(
                tensor.size() == want,
                "{}: '{name}' has shape {:?}, expected {want:?}",
                path.display(),
                tensor.size()
            );
            weights.insert(name.to_string(), tensor.f_to_kind(Kind::Float)?);
        }
        let tokenizer =
            TextTokenizer::from_file(&checkpoint.tokenizer_path(), max_length as usize, spec.vocab as usize)?;
        Ok(Classifier { architecture: Architecture::Bert(spec), weights, tokenizer, labels })
    }

    /// Labels `texts`, `batch` (at least 1) at a time.
    pub fn classify(&self, texts: &[String], batch: usize) -> Result<Vec<Classified>> {
        anyhow::ensure!(batch >= 1, "--batch-size must be at least 1");
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let data = self.tokenizer.dataset(&refs, &vec![0; refs.len()])?;
            let logits = tch::no_grad(|| {
                self.architecture.forward_merged(&self.weights, &data.features, data.lengths.as_ref())
            })?;
            let probabilities = logits.f_softmax(-1, Kind::Float)?;
            for (row, text) in chunk.iter().enumerate() {
                let row_logits: Vec<f32> = Vec::try_from(logits.get(row as i64))?;
                let row_probabilities: Vec<f32> = Vec::try_from(probabilities.get(row as i64))?;
                let (best, probability) =
                    row_probabilities
                        .iter()
                        .enumerate()
                        .fold((0, f32::MIN), |best, (i, &p)| if p > best.1 { (i, p) } else { best });
                out.push(Classified {
                    text: text.clone(),
                    label: self.labels[best].clone(),
                    probability: f64::from(probability),
                    logits: row_logits,
                });
            }
        }
        Ok(out)
    }
}

/// The labels of `id2label`, in id order (ids must be 0..n).
fn labels_of(config: &serde_json::Value) -> Result<Vec<String>> {
    let map = config["id2label"].as_object().context("no id2label: not a sequence classifier's config")?;
    let mut labels = vec![None; map.len()];
    for (id, label) in map {
        let index: usize = id.parse().with_context(|| format!("id2label key '{id}' is not a number"))?;
        let slot = labels.get_mut(index).with_context(|| format!("id2label ids must be 0..{}", map.len()))?;
        *slot = Some(label.as_str().context("id2label values must be strings")?.to_string());
    }
    labels.into_iter().map(|l| l.context("id2label has a gap")).collect()
}

/// The texts to classify: the lines of `input` (or stdin), blank lines skipped.
pub fn read_texts(input: Option<&PathBuf>) -> Result<Vec<String>> {
    let text = match input {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?,
        None => std::io::read_to_string(std::io::stdin()).context("cannot read stdin")?,
    };
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect())
}
