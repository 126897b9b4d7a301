//! The coordinator's TOML configuration.

pub(crate) mod federated_evaluation;
pub(crate) mod privacy;
pub(crate) mod privacy_plan;
pub(crate) mod secure;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use flotilla_merge::method::Method;
use flotilla_torch::model::Architecture;
use flotilla_wire::framing::FrameLimits;
use flotilla_wire::quic::TransportSettings;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    pub server: ServerSection,
    pub tls: TlsSection,
    #[serde(default)]
    pub transport: TransportSettings,
    #[serde(default)]
    pub limits: FrameLimits,
    #[serde(default)]
    pub round: RoundSection,
    #[serde(default)]
    pub aggregation: AggregationSection,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub evaluation: EvaluationSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub renewal: RenewalSection,
    /// Highest rank a device class gets, e.g. `phone = 2` (devices report their class in Hello).
    #[serde(default)]
    pub rank_caps: std::collections::BTreeMap<String, u32>,
    /// Device-level differential privacy (off when absent); see `privacy.rs`.
    #[serde(default)]
    pub privacy: Option<crate::config::privacy::PrivacySection>,
    /// SecAgg+ rounds (off when absent); see `crate::serve::secure`.
    #[serde(default)]
    pub secure_aggregation: Option<secure::SecureAggregationSection>,
    /// The global model scored on the devices' held-out data (off when absent).
    #[serde(default)]
    pub federated_evaluation: Option<federated_evaluation::FederatedEvaluationSection>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSection {
    /// Plain-HTTP address for `/metrics` (Prometheus) and `/healthz`; off when unset.
    pub listen: Option<SocketAddr>,
}

/// Online certificate renewal: a device whose certificate nears its end sends a signing request
/// over its authenticated session and gets a new certificate for the same id. Off unless `pki` is
/// set; then the coordinator holds the CA key, so keep that directory as private as the CA itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RenewalSection {
    /// The CA directory from `flotilla-certs init`.
    pub pki: Option<PathBuf>,
    /// The CA key's password file, if `init` was given one.
    pub ca_password_file: Option<PathBuf>,
    /// Validity of a renewed certificate, in days.
    pub device_validity_days: u32,
    /// A certificate is renewed only once it ends within this many days, and only the id's newest
    /// certificate renews: one renewal per certificate, so a stolen older key cannot mint more.
    pub renew_within_days: u32,
}

impl Default for RenewalSection {
    fn default() -> Self {
        RenewalSection { pki: None, ca_password_file: None, device_validity_days: 30, renew_within_days: 7 }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluationSection {
    /// An MNIST-style IDX directory whose test split (t10k-*) is the held-out set; no evaluation
    /// when unset.
    pub test_data: Option<PathBuf>,
    /// Evaluate on at most N test samples (after `skip_samples`), chosen as `sample` says.
    pub max_samples: Option<usize>,
    /// Skip the first N test samples (those `[model.pretrain]` trained the base on).
    pub skip_samples: usize,
    /// Which `max_samples`: a stratified sample seeded with `[model] seed` (the default), or the
    /// first ones in the file's order (for a file that already is a seeded sample).
    pub sample: SampleChoice,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: SocketAddr,
    /// Where the global adapters, the summary and (optionally) received updates are written.
    pub run_dir: PathBuf,
    /// If set, the bound address is written here once listening (useful with port 0).
    #[serde(default)]
    pub address_file: Option<PathBuf>,
    /// How long a device has, once its handshake is done, to send its Hello. One that is late is
    /// closed with "try again" (close code 4) and reconnects; it is not refused.
    #[serde(default = "default_hello_timeout_secs")]
    pub hello_timeout_secs: u64,
}

fn default_hello_timeout_secs() -> u64 {
    10
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The coordinator's kit directory from `flotilla-certs issue coordinator` (ca.crt, cert.pem, key.pem).
    pub kit: PathBuf,
    /// The CA's revocation list (`<pki>/crl.pem`); revoked devices are refused in the handshake.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// How often the CRL file is checked for changes (reloaded without a restart).
    #[serde(default = "default_crl_reload_secs")]
    pub crl_reload_secs: u64,
}

fn default_crl_reload_secs() -> u64 {
    10
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundSection {
    pub rounds: u32,
    /// Devices that must be connected before a round starts.
    pub min_devices: usize,
    /// Fraction of the connected devices sampled into each round (at least `min_participants`).
    pub fraction: f64,
    /// Fewest devices sampled into a round (default: `min_devices`). Set it below `min_devices` to
    /// wait for a whole fleet and still train a fraction of it per round.
    pub min_participants: Option<usize>,
    /// Updates that make a round's quorum; a round short of it at the deadline gets one extension,
    /// then is skipped.
    pub min_updates: usize,
    /// Seconds to wait for stragglers once the quorum is in (default: `deadline_secs`, so a round
    /// waits for every participant until its deadline unless configured otherwise).
    pub grace_secs: Option<u32>,
    pub deadline_secs: u32,
    pub local_steps: u32,
    /// Passes over each device's local data instead of `local_steps` (0: use `local_steps`).
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
}

impl RoundSection {
    /// Seconds a round waits for stragglers once its quorum is in: `grace_secs`, or the deadline.
    pub fn grace(&self) -> u32 {
        self.grace_secs.unwrap_or(self.deadline_secs)
    }
}

impl Default for RoundSection {
    fn default() -> Self {
        RoundSection {
            rounds: 3,
            min_devices: 2,
            fraction: 1.0,
            min_participants: None,
            min_updates: 1,
            grace_secs: None,
            deadline_secs: 120,
            local_steps: 50,
            local_epochs: 0,
            batch_size: 32,
            learning_rate: 5e-3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregationSection {
    pub method: Method,
    pub max_rank: u32,
    pub lora_alpha: f64,
    /// Also write every accepted update to `<run_dir>/updates/round-N/<device>/` (for audits and tests).
    pub record_updates: bool,
    /// Ablation only (docs/study.md): after each round, zero every slot above the round's largest
    /// participating rank, as the RBLA authors' published code does. Zero is a dead point for LoRA
    /// (both factors' gradients vanish), so a round without an R_max device loses those slots for
    /// good; the default keeps a persistent R_max global adapter.
    pub ablation_shrink_to_round_rank: bool,
}

impl AggregationSection {
    /// The run's LoRA scale, `lora_alpha / max_rank` (see `flotilla_wire::protocol::lora_scale`).
    pub fn scale(&self) -> f64 {
        flotilla_wire::protocol::lora_scale(self.lora_alpha, self.max_rank)
    }
}

impl Default for AggregationSection {
    fn default() -> Self {
        AggregationSection {
            method: Method::DEFAULT,
            max_rank: 8,
            lora_alpha: 16.0,
            record_updates: false,
            ablation_shrink_to_round_rank: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A small model trained from a seeded (or centrally pretrained) base. Ignored when
    /// `[model.transformer]` is set: the checkpoint then defines the architecture.
    pub architecture: Architecture,
    /// A pretrained HF BERT-family checkpoint to fine-tune (`[model.transformer]`).
    pub transformer: Option<TransformerSection>,
    /// A pretrained Llama-family decoder in a GGUF file to fine-tune (`[model.decoder]`).
    pub decoder: Option<DecoderSection>,
    /// Seeds the base model and the initial global adapter.
    pub seed: u64,
    /// Pretrain the base centrally before round 1; without it the base is a seeded random init.
    pub pretrain: Option<PretrainSection>,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            architecture: Architecture::Mlp { input: 64, hidden: vec![64, 64], classes: 10 },
            seed: 42,
            pretrain: None,
            transformer: None,
            decoder: None,
        }
    }
}

/// A pretrained transformer: an HF checkpoint directory (`config.json`, `model.safetensors`,
/// `tokenizer.json`) and how to fine-tune it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerSection {
    pub checkpoint: PathBuf,
    /// The sha256 that `model.safetensors` must have (refused otherwise); unset: any.
    #[serde(default)]
    pub sha256: Option<String>,
    /// PEFT's `target_modules` (a module is adapted when its name ends with `.<target>`).
    #[serde(default = "default_target_modules")]
    pub target_modules: Vec<String>,
    /// `cls` (the checkpoint's pooler on [CLS], as HF's sequence classifier) or `mean`.
    #[serde(default = "default_pooling")]
    pub pooling: flotilla_torch::model::Pooling,
    /// The class names, in the head's order; every text's label must be one of them.
    pub labels: Vec<String>,
    /// Tokens per text (longer texts are truncated; batches are padded to their longest text).
    #[serde(default = "default_max_length")]
    pub max_length: u32,
}

fn default_target_modules() -> Vec<String> {
    flotilla_wire::model::DEFAULT_TARGET_MODULES.iter().map(|t| t.to_string()).collect()
}

fn default_pooling() -> flotilla_torch::model::Pooling {
    flotilla_torch::model::Pooling::Cls
}

fn default_max_length() -> u32 {
    64
}

impl TransformerSection {
    pub fn fine_tuning(&self) -> flotilla_torch::model::checkpoint::FineTuning {
        flotilla_torch::model::checkpoint::FineTuning {
            target_modules: self.target_modules.clone(),
            pooling: self.pooling,
            labels: self.labels.clone(),
            max_length: self.max_length,
        }
    }
}

/// A pretrained decoder: a GGUF file (SmolLM2-135M-Instruct's, or any Llama-architecture one with a
/// byte-level BPE tokenizer) and how to fine-tune it on headline writing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderSection {
    pub gguf: PathBuf,
    /// The sha256 the file must have (refused otherwise); unset: any.
    #[serde(default)]
    pub sha256: Option<String>,
    /// PEFT's `target_modules` among q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    #[serde(default = "default_decoder_targets")]
    pub target_modules: Vec<String>,
    /// The articles' classes (folder names): devices' data are skewed over them.
    pub labels: Vec<String>,
    /// Tokens per example (chat prompt with the article, then the headline); bodies are cut to fit.
    #[serde(default = "default_decoder_max_length")]
    pub max_length: u32,
    /// Held-out articles whose greedy headline is written and scored with ROUGE-L at each evaluation.
    #[serde(default = "default_rouge_samples")]
    pub rouge_samples: usize,
    /// `headline` (articles whose first line is the headline) or `next-word` (causal language
    /// modelling on the texts, measured by held-out perplexity).
    #[serde(default)]
    pub task: flotilla_wire::model::DecoderTask,
}

fn default_decoder_targets() -> Vec<String> {
    flotilla_wire::model::DEFAULT_DECODER_TARGETS.iter().map(|t| t.to_string()).collect()
}

fn default_decoder_max_length() -> u32 {
    192
}

fn default_rouge_samples() -> usize {
    16
}

/// Central pretraining of the base model (every weight, plus the head) on public data the devices
/// do not hold: the first `samples` images of the test split of `data`. Evaluation must then skip
/// them (`[evaluation] skip_samples`). The result is kept in `<run_dir>/base/` and reused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainSection {
    /// An MNIST-style IDX directory.
    pub data: PathBuf,
    pub samples: usize,
    pub steps: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
}

impl Default for PretrainSection {
    fn default() -> Self {
        PretrainSection {
            data: PathBuf::from(flotilla_torch::data::idx::DEBIAN_FASHION_MNIST),
            samples: 5000,
            steps: 300,
            batch_size: 64,
            learning_rate: 2e-3,
        }
    }
}

/// How `[evaluation] max_samples` are chosen from the test split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleChoice {
    /// Each label in proportion to the split, by a stable hash of the seed and the example's key.
    #[default]
    Stratified,
    /// The first `max_samples` in the order of the file.
    First,
}

/// Where `serve` lists the texts it evaluates.
pub fn examples_list(run_dir: &Path) -> PathBuf {
    run_dir.join("evaluation-examples.txt")
}

impl CoordinatorConfig {
    /// The per-round policy these settings define: sampling, seeds and training settings.
    pub fn round_policy(&self) -> flotilla_engine::RoundPolicy {
        let round = &self.round;
        flotilla_engine::RoundPolicy {
            seed: self.model.seed,
            fraction: round.fraction,
            min_participants: round.min_participants.unwrap_or(round.min_devices),
            // The accountant's amplification by subsampling assumes each device joins a round on
            // its own coin flip.
            sampling: if self.privacy.is_some() {
                flotilla_engine::Sampling::Poisson
            } else {
                flotilla_engine::Sampling::FixedSize
            },
            round_size: self.secure_aggregation.as_ref().map(|s| s.round_size()).unwrap_or_default(),
            training: flotilla_engine::TrainingPlan {
                local_steps: round.local_steps,
                local_epochs: round.local_epochs,
                batch_size: round.batch_size,
                learning_rate: round.learning_rate,
                seed: self.model.seed,
            },
        }
    }

    /// Reads the TOML file, applies the `FLOTILLA__SECTION__KEY=value` environment overrides
    /// (see [`apply_env_overrides`]) and validates the result.
    pub fn load(path: &Path) -> anyhow::Result<CoordinatorConfig> {
        Self::load_with_env(path, std::env::vars())
    }

    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<CoordinatorConfig> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
        let mut table: toml::Table =
            toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        let applied = apply_env_overrides(&mut table, env)?;
        let mut config: CoordinatorConfig = table.try_into().with_context(|| {
            if applied.is_empty() {
                format!("invalid config {}", path.display())
            } else {
                format!("invalid config {} with overrides {}", path.display(), applied.join(", "))
            }
        })?;
        config.resolve_transformer().with_context(|| format!("invalid config {}", path.display()))?;
        config.resolve_decoder().with_context(|| format!("invalid config {}", path.display()))?;
        config.validate().with_context(|| format!("invalid config {}", path.display()))?;
        applied.iter().for_each(|key| tracing::info!("config: {key} set from the environment"));
        Ok(config)
    }

    /// With `[model.transformer]`, reads the checkpoint's `config.json` and makes
    /// `model.architecture` the encoder it describes with the configured targets, pooling and labels.
    pub fn resolve_transformer(&mut self) -> anyhow::Result<()> {
        let Some(transformer) = &self.model.transformer else { return Ok(()) };
        anyhow::ensure!(
            self.model.architecture == ModelSection::default().architecture
                || matches!(self.model.architecture, Architecture::Bert(_)),
            "[model] architecture and [model.transformer] are exclusive: the checkpoint defines the architecture"
        );
        anyhow::ensure!(self.model.pretrain.is_none(), "[model.pretrain] is for the small models, not a transformer");
        let checkpoint = flotilla_torch::model::checkpoint::HfCheckpoint::open(&transformer.checkpoint)
            .map_err(|e| anyhow::anyhow!("model.transformer.checkpoint: {e}"))?;
        let spec =
            checkpoint.spec(&transformer.fine_tuning()).map_err(|e| anyhow::anyhow!("model.transformer: {e}"))?;
        self.model.architecture = Architecture::Bert(spec);
        Ok(())
    }

    /// With `[model.decoder]`, reads the GGUF file's metadata and makes `model.architecture` the
    /// decoder it describes with the configured targets, length and labels.
    pub fn resolve_decoder(&mut self) -> anyhow::Result<()> {
        let Some(decoder) = &self.model.decoder else { return Ok(()) };
        anyhow::ensure!(
            self.model.transformer.is_none(),
            "[model.transformer] and [model.decoder] are exclusive: a run fine-tunes one model"
        );
        anyhow::ensure!(
            self.model.architecture == ModelSection::default().architecture
                || matches!(self.model.architecture, Architecture::Llama(_)),
            "[model] architecture and [model.decoder] are exclusive: the GGUF file defines the architecture"
        );
        anyhow::ensure!(self.model.pretrain.is_none(), "[model.pretrain] is for the small models, not a decoder");
        let file = flotilla_torch::gguf::GgufFile::open(&decoder.gguf)
            .map_err(|e| anyhow::anyhow!("model.decoder.gguf: {e}"))?;
        let described = flotilla_torch::gguf::LlamaSpec::from_file(&file)
            .map_err(|e| anyhow::anyhow!("model.decoder.gguf {}: {e}", decoder.gguf.display()))?;
        let mut spec = flotilla_torch::model::llama::decoder_spec(
            &described,
            decoder.target_modules.clone(),
            decoder.max_length,
            decoder.labels.clone(),
        );
        spec.task = decoder.task;
        self.model.architecture = Architecture::Llama(spec);
        self.model.architecture.validate().map_err(|e| anyhow::anyhow!("model.decoder: {e}"))?;
        Ok(())
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.round.rounds >= 1, "round.rounds must be at least 1");
        anyhow::ensure!(self.round.deadline_secs >= 1, "round.deadline_secs must be at least 1");
        anyhow::ensure!(
            self.round.fraction > 0.0 && self.round.fraction <= 1.0,
            "round.fraction must be in (0, 1], got {}",
            self.round.fraction
        );
        anyhow::ensure!(self.round.min_updates >= 1, "round.min_updates must be at least 1");
        anyhow::ensure!(self.renewal.device_validity_days >= 1, "renewal.device_validity_days must be at least 1");
        anyhow::ensure!(self.renewal.renew_within_days >= 1, "renewal.renew_within_days must be at least 1");
        anyhow::ensure!(
            self.renewal.pki.is_some() || self.renewal.ca_password_file.is_none(),
            "renewal.ca_password_file is set but renewal.pki is not"
        );
        if let Some((class, _)) = self.rank_caps.iter().find(|(_, &cap)| cap == 0) {
            anyhow::bail!("rank_caps.{class} must be at least 1");
        }
        anyhow::ensure!(self.round.local_steps >= 1, "round.local_steps must be at least 1");
        anyhow::ensure!(self.round.batch_size >= 1, "round.batch_size must be at least 1");
        anyhow::ensure!(
            self.round.learning_rate.is_finite() && self.round.learning_rate > 0.0,
            "round.learning_rate must be a positive number"
        );
        anyhow::ensure!((1..=1024).contains(&self.aggregation.max_rank), "aggregation.max_rank must be in 1..=1024");
        if let Some(pretrain) = &self.model.pretrain {
            anyhow::ensure!(pretrain.samples >= 1, "model.pretrain.samples must be at least 1");
            anyhow::ensure!(pretrain.steps >= 1, "model.pretrain.steps must be at least 1");
            anyhow::ensure!(pretrain.batch_size >= 1, "model.pretrain.batch_size must be at least 1");
            anyhow::ensure!(
                pretrain.learning_rate.is_finite() && pretrain.learning_rate > 0.0,
                "model.pretrain.learning_rate must be a positive number"
            );
            if self.evaluation.test_data.as_deref() == Some(pretrain.data.as_path()) {
                anyhow::ensure!(
                    self.evaluation.skip_samples >= pretrain.samples,
                    "the evaluation set would include the {} test images the base is pretrained on: set \
                     [evaluation] skip_samples = {} (or more)",
                    pretrain.samples,
                    pretrain.samples
                );
            }
        }
        anyhow::ensure!(
            self.aggregation.lora_alpha.is_finite() && self.aggregation.lora_alpha > 0.0,
            "aggregation.lora_alpha must be a positive number"
        );
        self.model.architecture.validate().map_err(|e| anyhow::anyhow!("model.architecture.{e}"))?;
        if let Some(privacy) = &self.privacy {
            privacy.validate(
                self.aggregation.method,
                self.round.min_devices,
                self.round.fraction,
                self.aggregation.ablation_shrink_to_round_rank,
            )?;
        }
        let distributed =
            self.privacy.as_ref().is_some_and(|p| p.mode == crate::config::privacy::PrivacyMode::Distributed);
        anyhow::ensure!(
            !distributed || self.secure_aggregation.is_some(),
            "[privacy] mode = \"distributed\" needs [secure_aggregation]: each device's noise protects nothing unless its \
             update is masked"
        );
        if let Some(secure) = &self.secure_aggregation {
            secure.validate(self)?;
            if let Some(privacy) = self.privacy.as_ref().filter(|_| distributed) {
                secure.check_noise_range(privacy)?;
            }
        }
        if let Some(federated) = &self.federated_evaluation {
            federated.validate(self.privacy.is_some())?;
        }
        self.transport.to_quinn().map_err(|e| anyhow::anyhow!("transport: {e}"))?;
        Ok(())
    }
}

/// Prefix of environment variables that override config keys: `FLOTILLA__ROUND__DEADLINE_SECS=30`
/// sets `[round] deadline_secs = 30`; `FLOTILLA__RANK_CAPS__PHONE=2` sets `[rank_caps] phone = 2`.
/// Sections and keys are separated by `__`; names are lower-cased. A value is read as a TOML value
/// (number, boolean, array, quoted string) and otherwise taken as a plain string. Unknown keys are
/// refused like unknown keys in the file.
pub const ENV_PREFIX: &str = "FLOTILLA__";

/// Applies the overrides found in `env`; returns the dotted keys it set, sorted.
pub fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<Vec<String>> {
    let mut applied = Vec::new();
    let mut overrides: Vec<(String, String)> =
        env.into_iter().filter(|(name, _)| name.starts_with(ENV_PREFIX)).collect();
    overrides.sort();
    for (name, raw) in overrides {
        let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(str::to_lowercase).collect();
        if path.iter().any(String::is_empty) {
            anyhow::bail!("environment variable {name}: expected {ENV_PREFIX}SECTION__KEY");
        }
        let value = parse_env_value(&raw);
        let (last, parents) = path.split_last().ok_or_else(|| anyhow::anyhow!("{name}: no key"))?;
        let mut cursor = &mut *table;
        for part in parents {
            let entry = cursor.entry(part.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = entry.as_table_mut().ok_or_else(|| {
                anyhow::anyhow!("environment variable {name}: '{part}' is a value in the config, not a section")
            })?;
        }
        cursor.insert(last.clone(), value);
        applied.push(path.join("."));
    }
    Ok(applied)
}

fn parse_env_value(raw: &str) -> toml::Value {
    // `v = <raw>` parses as TOML when raw is a number, boolean, array or quoted string.
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut table) => table.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults_and_unknown_keys_are_refused() {
        let text = r#"
            [server]
            listen = "127.0.0.1:0"
            run_dir = "run"
            [tls]
            kit = "pki/kits/coordinator"
            [model.architecture.mlp]
            input = 784
            hidden = [128]
            classes = 10
        "#;
        let config: CoordinatorConfig = toml::from_str(text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.aggregation.method, Method::FoldAndFill);
        assert_eq!(config.model.architecture, Architecture::Mlp { input: 784, hidden: vec![128], classes: 10 });
        // Stragglers are waited for until the deadline unless a grace period is set.
        assert_eq!(config.round.grace(), config.round.deadline_secs);
        let long = text.to_string() + "[round]\ndeadline_secs = 3600\n";
        assert_eq!(toml::from_str::<CoordinatorConfig>(&long).unwrap().round.grace(), 3600);
        let graced = text.to_string() + "[round]\ndeadline_secs = 3600\ngrace_secs = 5\n";
        assert_eq!(toml::from_str::<CoordinatorConfig>(&graced).unwrap().round.grace(), 5);
        let typo = text.replace("[tls]", "[tls]\nkitt = 1");
        assert!(toml::from_str::<CoordinatorConfig>(&typo).is_err());
    }

    #[test]
    fn environment_overrides_any_key_and_refuses_unknown_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"r\"\n[tls]\nkit = \"k\"\n").unwrap();
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let config = CoordinatorConfig::load_with_env(
            &path,
            env(&[
                ("FLOTILLA__ROUND__ROUNDS", "7"),
                ("FLOTILLA__ROUND__FRACTION", "0.25"),
                ("FLOTILLA__AGGREGATION__METHOD", "zero-pad"),
                ("FLOTILLA__SERVER__RUN_DIR", "/var/lib/elsewhere"),
                ("FLOTILLA__RANK_CAPS__PHONE", "2"),
                ("FLOTILLA__TRANSPORT__SEGMENTATION_OFFLOAD", "false"),
                ("FLOTILLA_LOG_FORMAT", "json"),
            ]),
        )
        .unwrap();
        assert_eq!(config.round.rounds, 7);
        assert_eq!(config.round.fraction, 0.25);
        assert_eq!(config.aggregation.method, Method::ZeroPad);
        assert_eq!(config.server.run_dir, Path::new("/var/lib/elsewhere"));
        assert_eq!(config.rank_caps.get("phone"), Some(&2));
        assert!(!config.transport.segmentation_offload);
        let typo = CoordinatorConfig::load_with_env(&path, env(&[("FLOTILLA__ROUND__ROUNSD", "7")])).unwrap_err();
        assert!(format!("{typo:#}").contains("rounsd"), "{typo:#}");
        let bad = CoordinatorConfig::load_with_env(&path, env(&[("FLOTILLA__ROUND__ROUNDS", "many")])).unwrap_err();
        assert!(format!("{bad:#}").contains("round.rounds"), "{bad:#}");
        let zero = CoordinatorConfig::load_with_env(&path, env(&[("FLOTILLA__ROUND__ROUNDS", "0")])).unwrap_err();
        assert!(format!("{zero:#}").contains("round.rounds must be at least 1"), "{zero:#}");
    }

    #[test]
    fn nonsense_values_are_refused_with_the_key_name() {
        let mut config: CoordinatorConfig =
            toml::from_str("[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"r\"\n[tls]\nkit = \"k\"\n").unwrap();
        config.aggregation.max_rank = 0;
        assert!(config.validate().unwrap_err().to_string().contains("max_rank"));
    }

    #[test]
    fn a_transformer_is_resolved_against_its_checkpoint_and_its_pin_is_checked() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../common/torch/tests/fixtures/tiny-bert");
        let dir = tempfile::tempdir().unwrap();
        let write = |extra: &str| {
            let path = dir.path().join("c.toml");
            let text = format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\n[tls]\nkit = \"k\"\n\
                 [model.transformer]\ncheckpoint = \"{fixture}\"\nlabels = [\"a\", \"b\"]\n{extra}",
                run = dir.path().join("run").display(),
                fixture = fixture.display()
            );
            std::fs::write(&path, text).unwrap();
            path
        };
        let config = CoordinatorConfig::load(&write("")).unwrap();
        let Architecture::Bert(spec) = &config.model.architecture else { panic!("not resolved") };
        assert_eq!((spec.layers, spec.hidden, spec.max_length), (2, 32, 64));
        assert_eq!(spec.target_modules, ["query", "value"]);

        let pinned = CoordinatorConfig::load(&write(&format!("sha256 = \"{}\"\n", "0".repeat(64)))).unwrap();
        let err = crate::model::base::prepare(&pinned).err().unwrap();
        assert!(format!("{err:#}").contains("but model.transformer.sha256 pins"), "{err:#}");
        let digest = flotilla_torch::model::checkpoint::sha256_file(&fixture.join("model.safetensors")).unwrap();
        let pinned = CoordinatorConfig::load(&write(&format!("sha256 = \"{digest}\"\n"))).unwrap();
        assert_eq!(crate::model::base::prepare(&pinned).unwrap().version, format!("sha256:{digest}"));

        let err = CoordinatorConfig::load(&write("target_modules = [\"attention\"]\n")).unwrap_err();
        assert!(format!("{err:#}").contains("matches no linear module"), "{err:#}");
        let err = CoordinatorConfig::load(&write("[model.architecture.mlp]\ninput = 4\nhidden = [4]\nclasses = 2\n"))
            .unwrap_err();
        assert!(format!("{err:#}").contains("exclusive"), "{err:#}");
        let text = std::fs::read_to_string(write("")).unwrap().replace("tiny-bert", "no-such-model");
        let missing = dir.path().join("missing.toml");
        std::fs::write(&missing, text).unwrap();
        let err = CoordinatorConfig::load(&missing).unwrap_err();
        assert!(format!("{err:#}").contains("model.transformer.checkpoint"), "{err:#}");
    }
}
