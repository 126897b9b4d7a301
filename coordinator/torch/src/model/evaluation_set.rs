//! The held-out set: the test split of the configured data set, after `skip_samples`, and of it
//! at most `max_samples`, chosen as a stratified sample seeded by the model's seed
//! (`flotilla_data::sample`): every label keeps its share of the split, the same examples on every
//! run with the same seed. `[evaluation] sample = "first"` takes the first `max_samples` in the
//! file's order instead, for evaluation files that already are a seeded sample (the study's).
//! A transformer's evaluated texts are listed by key, so a report says exactly what was scored.

use std::path::{Path, PathBuf};

use anyhow::Context;
use flotilla_torch::data::decoder_tokenizer::{sequences_dataset, DecoderTokenizer};
use flotilla_torch::data::headline::split_headline;
use flotilla_torch::data::idx::{load_split, Split};
use flotilla_torch::data::text::{load_text, TextSplit};
use flotilla_torch::data::tokenizer::TextTokenizer;
use flotilla_torch::data::Dataset;
use flotilla_torch::gguf::GgufFile;
use flotilla_torch::model::checkpoint::TOKENIZER_FILE;
use flotilla_torch::model::{Architecture, BertSpec, DecoderSpec};
use flotilla_wire::model::DecoderTask;

use crate::config::{examples_list, CoordinatorConfig, SampleChoice};
use tracing::warn;

/// Where the held-out set comes from and how much of it to use.
pub struct EvaluationSet<'a> {
    pub dir: &'a Path,
    pub max_samples: Option<usize>,
    pub skip_samples: usize,
    pub sample: SampleChoice,
    /// Seeds the stratified sample.
    pub seed: u64,
    /// A transformer's `tokenizer.json`.
    pub tokenizer: Option<PathBuf>,
    /// Where the list of evaluated texts is written (`None`: nowhere, as `check` reads only).
    pub examples_list: Option<PathBuf>,
}

impl EvaluationSet<'_> {
    /// The configured held-out set, or `None` without `[evaluation] test_data`. With `list`, the
    /// evaluated texts are listed in `<run_dir>/evaluation-examples.txt`.
    pub fn of(config: &CoordinatorConfig, list: bool) -> Option<EvaluationSet<'_>> {
        let evaluation = &config.evaluation;
        Some(EvaluationSet {
            dir: evaluation.test_data.as_deref()?,
            max_samples: evaluation.max_samples,
            skip_samples: evaluation.skip_samples,
            sample: evaluation.sample,
            seed: config.model.seed,
            tokenizer: match (&config.model.transformer, &config.model.decoder) {
                (Some(transformer), _) => Some(transformer.checkpoint.join(TOKENIZER_FILE)),
                (None, Some(decoder)) => Some(decoder.gguf.clone()),
                (None, None) => None,
            },
            examples_list: list.then(|| examples_list(&config.server.run_dir)),
        })
    }

    /// Which examples of a test split of `labels` (keys `keys`) are evaluated: indices into it.
    fn choose(&self, labels: &[usize], keys: &[String]) -> Vec<usize> {
        let total = labels.len();
        let rest = total - self.skip_samples.min(total);
        let n = self.max_samples.map_or(rest, |m| m.min(rest));
        let skip = total - rest;
        if n == rest {
            return (skip..total).collect();
        }
        match self.sample {
            SampleChoice::First => (skip..skip + n).collect(),
            SampleChoice::Stratified => {
                flotilla_torch::data::sample::stratified(&labels[skip..], &keys[skip..], n, self.seed)
                    .into_iter()
                    .map(|i| i + skip)
                    .collect()
            }
        }
    }
}

/// Loads the held-out set of `set`: of an MNIST-style directory, or for a transformer of labelled
/// texts (see `flotilla_torch::data::text`), tokenized with its tokenizer.
pub fn load_test_set(architecture: &Architecture, set: &EvaluationSet) -> anyhow::Result<Dataset> {
    match architecture {
        Architecture::Bert(spec) => return load_text_test(spec, set),
        Architecture::Llama(spec) => return load_headline_test(spec, set),
        _ => {}
    }
    let dir = set.dir;
    let test = load_split(dir, Split::Test, architecture.classes())?;
    anyhow::ensure!(
        test.features.size()[1] == architecture.input_size() as i64,
        "{}: test images have {} features, the model takes {}",
        dir.display(),
        test.features.size()[1],
        architecture.input_size()
    );
    anyhow::ensure!(
        set.skip_samples < test.len(),
        "{}: evaluation.skip_samples = {} leaves none of the {} test images",
        dir.display(),
        set.skip_samples,
        test.len()
    );
    let labels: Vec<usize> = test.labels_vec().into_iter().map(|l| l.max(0) as usize).collect();
    let keys: Vec<String> = (0..labels.len()).map(|i| i.to_string()).collect();
    let chosen = set.choose(&labels, &keys);
    Ok(if chosen.len() == test.len() { test } else { test.subset(&chosen) })
}

fn load_text_test(spec: &BertSpec, set: &EvaluationSet) -> anyhow::Result<Dataset> {
    let dir = set.dir;
    let tokenizer = set.tokenizer.as_deref().context("a transformer's evaluation needs its tokenizer.json")?;
    let corpus = load_text(dir, &spec.labels, TextSplit::Test)?;
    for file in &corpus.lossy_files {
        warn!(file = %file.display(), "not valid UTF-8; decoded with replacement characters");
    }
    anyhow::ensure!(
        set.skip_samples < corpus.examples.len(),
        "{}: evaluation.skip_samples = {} leaves none of the {} test texts",
        dir.display(),
        set.skip_samples,
        corpus.examples.len()
    );
    let labels: Vec<usize> = corpus.examples.iter().map(|e| e.label).collect();
    let keys: Vec<String> = corpus.examples.iter().map(|e| e.key.clone()).collect();
    let examples: Vec<_> = set.choose(&labels, &keys).into_iter().map(|i| &corpus.examples[i]).collect();
    let tokenizer = TextTokenizer::from_file(tokenizer, spec.max_length as usize, spec.vocab as usize)?;
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let labels: Vec<i64> = examples.iter().map(|e| e.label as i64).collect();
    let data = tokenizer.dataset(&texts, &labels)?;
    if let Some(list) = &set.examples_list {
        let keys: String = examples.iter().map(|e| format!("{}\n", e.key)).collect();
        flotilla_wire::files::write_atomically(list, keys.as_bytes())
            .with_context(|| format!("cannot write {}", list.display()))?;
        tracing::info!(texts = examples.len(), from = %dir.display(), "evaluation set: held-out texts (listed in {})", list.display());
    }
    Ok(data)
}

/// A decoder's held-out examples: the chosen texts of the test split, each as its task makes it
/// (headline: the chat prompt and the headline, articles without a body left out; next word: the
/// text itself), tokenized with the GGUF's tokenizer.
fn load_headline_test(spec: &DecoderSpec, set: &EvaluationSet) -> anyhow::Result<Dataset> {
    let dir = set.dir;
    let gguf = set.tokenizer.as_deref().context("a decoder's evaluation needs its GGUF file")?;
    let corpus = load_text(dir, &spec.labels, TextSplit::Test)?;
    anyhow::ensure!(
        set.skip_samples < corpus.examples.len(),
        "{}: evaluation.skip_samples = {} leaves none of the {} test articles",
        dir.display(),
        set.skip_samples,
        corpus.examples.len()
    );
    let labels: Vec<usize> = corpus.examples.iter().map(|e| e.label).collect();
    let keys: Vec<String> = corpus.examples.iter().map(|e| e.key.clone()).collect();
    let file = GgufFile::open(gguf).with_context(|| format!("cannot open {}", gguf.display()))?;
    let tokenizer = DecoderTokenizer::from_gguf(&file)?;
    let max_length = spec.max_length as usize;
    // (key, class, sequence) of each chosen text the task can use.
    let mut chosen = Vec::new();
    for example in set.choose(&labels, &keys).into_iter().map(|i| &corpus.examples[i]) {
        let sequence = match spec.task {
            DecoderTask::Headline => match split_headline(example) {
                Some(article) => tokenizer.headline_example(&article, max_length)?,
                None => continue,
            },
            DecoderTask::NextWord => match tokenizer.next_word_example(&example.key, &example.text, max_length) {
                Ok(sequence) => sequence,
                Err(_) => continue,
            },
        };
        chosen.push((example.key.clone(), example.label as i64, sequence));
    }
    anyhow::ensure!(!chosen.is_empty(), "{}: no held-out text the decoder's task can use", dir.display());
    let classes: Vec<i64> = chosen.iter().map(|(_, class, _)| *class).collect();
    let sequences: Vec<_> = chosen.iter().map(|(_, _, sequence)| sequence.clone()).collect();
    if let Some(list) = &set.examples_list {
        let keys: String = chosen.iter().map(|(key, ..)| format!("{key}\n")).collect();
        std::fs::write(list, keys).with_context(|| format!("cannot write {}", list.display()))?;
        tracing::info!(texts = chosen.len(), from = %dir.display(), "evaluation set: held-out texts (listed in {})", list.display());
    }
    Ok(sequences_dataset(&sequences, &classes))
}

/// The names of `architecture`'s classes: a transformer's labels, otherwise their indices.
pub fn class_labels(architecture: &Architecture) -> Vec<String> {
    match architecture {
        Architecture::Bert(spec) => spec.labels.clone(),
        Architecture::Llama(spec) => spec.labels.clone(),
        other => (0..other.classes()).map(|c| c.to_string()).collect(),
    }
}

/// "N of the test split (how): label count, ...": what `check` says of the evaluated set.
pub fn describe_mix(architecture: &Architecture, set: &EvaluationSet, data: &Dataset) -> String {
    let labels = class_labels(architecture);
    let mut counts = vec![0usize; labels.len()];
    for label in data.labels_vec() {
        if let Some(count) = usize::try_from(label).ok().and_then(|l| counts.get_mut(l)) {
            *count += 1;
        }
    }
    let how = match (set.max_samples.filter(|&m| m <= data.len()), set.sample) {
        (None, _) => "the whole test split".to_string(),
        (Some(_), SampleChoice::Stratified) => format!("a stratified sample seeded with {}", set.seed),
        (Some(_), SampleChoice::First) => "the first of the file, in its order".to_string(),
    };
    let how = match set.skip_samples {
        0 => how,
        skip => format!("{how} after the first {skip}"),
    };
    let mix: Vec<String> = labels.iter().zip(&counts).map(|(l, n)| format!("{l} {n}")).collect();
    format!("evaluation: {} examples ({how}) from {}: {}", data.len(), set.dir.display(), mix.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(max: Option<usize>, skip: usize, sample: SampleChoice) -> EvaluationSet<'static> {
        EvaluationSet {
            dir: Path::new("/nowhere"),
            max_samples: max,
            skip_samples: skip,
            sample,
            seed: 42,
            tokenizer: None,
            examples_list: None,
        }
    }

    #[test]
    fn a_subset_is_stratified_after_the_skipped_examples_or_the_first_ones_when_asked() {
        // Key order in blocks of labels, as a folder-per-label data set is read.
        let labels: Vec<usize> = (0..100).map(|i| i / 20).collect();
        let keys: Vec<String> = (0..100).map(|i| format!("{}/{i}", i / 20)).collect();
        let stratified = set(Some(20), 0, SampleChoice::Stratified).choose(&labels, &keys);
        let mut per_label = [0; 5];
        stratified.iter().for_each(|&i| per_label[labels[i]] += 1);
        assert_eq!(per_label, [4; 5], "every label in proportion");
        let first = set(Some(20), 0, SampleChoice::First).choose(&labels, &keys);
        assert_eq!(first, (0..20).collect::<Vec<_>>(), "one label only: what key order gave before");
        let after = set(Some(10), 50, SampleChoice::Stratified).choose(&labels, &keys);
        assert!(after.iter().all(|&i| i >= 50), "skipped examples are never evaluated");
        assert_eq!(set(None, 30, SampleChoice::Stratified).choose(&labels, &keys), (30..100).collect::<Vec<_>>());
    }
}
