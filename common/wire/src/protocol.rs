//! The messages devices and the coordinator exchange.
//!
//! Each message travels on its own QUIC stream as one frame (see [`crate::framing`]): a bounded
//! bincode header holding the message and the descriptors of the tensors it carries, then the raw
//! tensor bytes. The protocol version is negotiated by ALPN ([`ALPN`]).
//!
//! Exchanges:
//! - device opens a bidirectional stream: `Hello` → `Welcome` (with the frozen base model's tensors,
//!   or for a transformer the digests of its checkpoint files) or `Refusal`.
//! - device opens a bidirectional stream per piece of a checkpoint file it lacks: `FetchBase` →
//!   `BaseChunk` or `Refusal` (so a fetch resumes from any offset).
//! - coordinator opens a unidirectional stream per push: `RoundTask` (with the global adapter slice
//!   for the device's rank) or `Finished`.
//! - device opens a bidirectional stream per upload: `Update` (with the trained adapter) → `Ack` or
//!   `Reject`.
//! - device opens a bidirectional stream to renew its certificate: `RenewCertificate` →
//!   `CertificateRenewed` or `Refusal` (a coordinator that does not renew certificates).
//! - federated evaluation ([`crate::evaluation`]): the coordinator pushes an `EvaluationTask` (with
//!   the adapter slice) to a device that does not train this round, or sets `evaluate` in its round
//!   task; the device opens a bidirectional stream: `EvaluationReport` (sums only) → `Ack` or
//!   `Reject`. Under secure aggregation evaluation has a SecAgg+ session of its own (the task's
//!   `secure`): the same phases as a secure round, with `MaskedEvaluation` as the upload.
//!
//! Under secure aggregation (a `RoundTask` with [`SecureTask`]), a round adds the SecAgg+ phases
//! (`flotilla_secagg`); each request is answered when its phase closes (every participant heard
//! from, or the phase's deadline):
//! - `SecureKeys` → `SecurePeers` (the device's neighbours and their keys) or `Reject`;
//! - `SecureShares` → `SecureSharesForYou` (the encrypted shares addressed to it) or `Reject`;
//! - `MaskedUpdate` (instead of `Update`) → `Ack` or `Reject`;
//! - the coordinator pushes `SecureUnmask` on a unidirectional stream once the uploads are in;
//!   `UnmaskShares` → `Ack` or `Reject`.
//!
//! Liveness is QUIC's own keep-alive and idle timeout.

use serde::{Deserialize, Serialize};

pub use crate::secure_task::SecureTask;

/// ALPN protocol id; a peer speaking another version fails the handshake with a clear error.
pub const ALPN: &[u8] = b"flotilla/5";
pub const PROTOCOL_VERSION: u32 = 5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceMessage {
    Hello(Hello),
    Update(Update),
    RenewCertificate(RenewCertificate),
    FetchBase(FetchBase),
    SecureKeys(SignedKeys),
    SecureShares(SecureShares),
    MaskedUpdate(MaskedUpdate),
    UnmaskShares(flotilla_secagg::messages::UnmaskShares),
    EvaluationReport(crate::evaluation::EvaluationReport),
    MaskedEvaluation(crate::evaluation::MaskedEvaluation),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CoordinatorMessage {
    Welcome(Welcome),
    Refusal(Refusal),
    RoundTask(RoundTask),
    Ack(Ack),
    Reject(Reject),
    Finished(Finished),
    CertificateRenewed(CertificateRenewed),
    BaseChunk(BaseChunk),
    SecurePeers(SecurePeers),
    SecureSharesForYou(SecureShares),
    SecureUnmask(flotilla_secagg::messages::UnmaskRequest),
    EvaluationTask(crate::evaluation::EvaluationTask),
}

impl DeviceMessage {
    /// The variant's name, for logs and refusals (which must not echo what an untrusted peer sent).
    pub fn name(&self) -> &'static str {
        match self {
            DeviceMessage::Hello(_) => "Hello",
            DeviceMessage::Update(_) => "Update",
            DeviceMessage::RenewCertificate(_) => "RenewCertificate",
            DeviceMessage::FetchBase(_) => "FetchBase",
            DeviceMessage::SecureKeys(_) => "SecureKeys",
            DeviceMessage::SecureShares(_) => "SecureShares",
            DeviceMessage::MaskedUpdate(_) => "MaskedUpdate",
            DeviceMessage::UnmaskShares(_) => "UnmaskShares",
            DeviceMessage::EvaluationReport(_) => "EvaluationReport",
            DeviceMessage::MaskedEvaluation(_) => "MaskedEvaluation",
        }
    }
}

impl CoordinatorMessage {
    /// The variant's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            CoordinatorMessage::Welcome(_) => "Welcome",
            CoordinatorMessage::Refusal(_) => "Refusal",
            CoordinatorMessage::RoundTask(_) => "RoundTask",
            CoordinatorMessage::Ack(_) => "Ack",
            CoordinatorMessage::Reject(_) => "Reject",
            CoordinatorMessage::Finished(_) => "Finished",
            CoordinatorMessage::CertificateRenewed(_) => "CertificateRenewed",
            CoordinatorMessage::BaseChunk(_) => "BaseChunk",
            CoordinatorMessage::SecurePeers(_) => "SecurePeers",
            CoordinatorMessage::SecureSharesForYou(_) => "SecureSharesForYou",
            CoordinatorMessage::SecureUnmask(_) => "SecureUnmask",
            CoordinatorMessage::EvaluationTask(_) => "EvaluationTask",
        }
    }
}

/// Application close codes (`CONNECTION_CLOSE` of type application).
pub mod close {
    /// Orderly end: the run finished, or the device is done.
    pub const DONE: u32 = 0;
    /// Not admitted; the reason text follows.
    pub const REFUSED: u32 = 1;
    /// Replaced by a newer connection of the same device.
    pub const REPLACED: u32 = 2;
    /// The certificate the session was opened with has expired.
    pub const CERTIFICATE_EXPIRED: u32 = 3;
    /// Admission did not complete in time (no Hello); the device reconnects with backoff. Under a
    /// burst of thousands of handshakes a device may be too slow to send its Hello, which is no
    /// reason to refuse it for good.
    pub const TRY_AGAIN: u32 = 4;
    /// The device refuses its round task (it is below the device's privacy floor); the reason text
    /// follows. The device stops: the same coordinator would send the same task again.
    pub const REFUSED_TASK: u32 = 5;
    /// The certificate the session was opened with has been revoked (the coordinator reloaded its
    /// CRL): the session ends at once, and the device cannot reconnect with it.
    pub const REVOKED: u32 = 6;
    /// The device cannot use its own training data (missing, empty, the wrong format or shape for
    /// the coordinator's model); the reason text follows. The device stops: its operator must fix
    /// the data.
    pub const DATA_UNUSABLE: u32 = 7;

    /// The most bytes of reason text a close carries (it travels in one packet: keep it short).
    pub const MAX_REASON: usize = 200;

    /// `text` cut to at most [`MAX_REASON`] bytes, at a character boundary, for a close's reason.
    pub fn reason(text: &str) -> &[u8] {
        let mut end = text.len().min(MAX_REASON);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text.as_bytes()[..end]
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn a_reason_is_cut_to_the_limit_at_a_character_boundary() {
            assert_eq!(super::reason("short"), b"short");
            let long = "é".repeat(150); // 300 bytes, 2 per character
            assert_eq!(super::reason(&long).len(), 200);
            let odd = format!("x{long}"); // the 200th byte is inside an 'é'
            let cut = super::reason(&odd);
            assert_eq!(cut.len(), 199);
            assert!(std::str::from_utf8(cut).is_ok());
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HardwareProfile {
    pub device_class: String,
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    pub cuda_devices: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal the identity in the device's certificate.
    pub device_id: String,
    pub protocol_version: u32,
    pub hardware: HardwareProfile,
    pub requested_rank: u32,
}

/// The model every participant trains: a frozen base plus LoRA adapters of rank ≤ `max_rank`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub architecture: crate::model::Architecture,
    /// One scale for every rank: the LoRA update is `lora_alpha / max_rank · B·A`.
    pub lora_alpha: f64,
    pub max_rank: u32,
}

impl ModelSpec {
    /// The LoRA scale every rank uses: `lora_alpha / max_rank`.
    pub fn scale(&self) -> f64 {
        lora_scale(self.lora_alpha, self.max_rank)
    }
}

/// The one LoRA scale of a run: `lora_alpha / R_max`, the same for every rank (a rank-r slice
/// computes the first r terms of the R_max update).
pub fn lora_scale(lora_alpha: f64, max_rank: u32) -> f64 {
    lora_alpha / f64::from(max_rank)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub assigned_rank: u32,
    pub model: ModelSpec,
    /// Identifies the base (for a checkpoint, `sha256:<digest of model.safetensors>`).
    pub base_version: String,
    pub base: BaseDelivery,
    /// The coordinator's CRL (PEM, signed by the CA), when it has one: a device whose kit holds an
    /// older one, checked against its CA, stores this one, and checks the coordinator against it
    /// from its next connection.
    pub crl_pem: Option<String>,
    /// The run evaluates on devices (`[federated_evaluation]`): the device sets its held-out share
    /// of its data apart, never to be trained on, and evaluates as the plan says.
    pub evaluation: Option<crate::evaluation::EvaluationPlan>,
}

/// How a device gets the frozen base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BaseDelivery {
    /// Its tensors travel with the Welcome (the small models).
    Inline,
    /// A checkpoint directory's files, by name, size and sha256: a device uses its own copy when
    /// the digests match, and otherwise fetches the files once with `FetchBase` and caches them.
    Checkpoint { files: Vec<CheckpointFile> },
}

/// The file of an encoder checkpoint that holds its weights (a decoder's is its one `.gguf` file).
pub const CHECKPOINT_WEIGHTS_FILE: &str = "model.safetensors";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointFile {
    /// A plain file name (`model.safetensors`), never a path.
    pub name: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// Asks for `length` bytes (at most [`BASE_CHUNK_BYTES`]) of one of the Welcome's checkpoint files
/// from `offset` on (a resumed fetch starts where the bytes on disk end). The file is named by its
/// digest too: a coordinator whose base changed since the Welcome refuses rather than send other bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchBase {
    pub name: String,
    pub sha256: String,
    pub offset: u64,
    pub length: u32,
}

/// Bytes `offset..offset + bytes.len()` of a checkpoint file of `size` bytes: what was asked for,
/// shortened at the file's end and at [`BASE_CHUNK_BYTES`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseChunk {
    pub offset: u64,
    pub size: u64,
    pub bytes: Vec<u8>,
}

/// Largest `BaseChunk::bytes`: inside the default frame header limit (1 MiB).
pub const BASE_CHUNK_BYTES: usize = 768 << 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refusal {
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSettings {
    /// Minibatch steps of local training ...
    pub local_steps: u32,
    /// ... unless this is above 0: then this many passes over the local data (⌈n / batch_size⌉
    /// steps each), so devices with more data train more.
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub seed: u64,
    /// Under `[privacy]` with `trainable = "b_only"`: train each B factor and the head only, every
    /// A staying exactly as sent (the coordinator refuses an update whose A changed).
    pub trainable: crate::model::Trainable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTask {
    pub round: u32,
    pub total_rounds: u32,
    pub rank: u32,
    pub base_version: String,
    pub training: TrainingSettings,
    /// Seconds from receipt until the coordinator stops waiting for this device's update.
    pub deadline_secs: u32,
    /// Under differential privacy: clip the update's change (its factors and head against what
    /// this task sent, in L2 norm) to this bound before uploading; the coordinator refuses more.
    pub clip_norm: Option<f64>,
    /// Under secure aggregation: this round's SecAgg+ setting; the device then runs the phases and
    /// uploads a `MaskedUpdate` instead of an `Update`.
    pub secure: Option<SecureTask>,
    /// Under `[privacy]`: the noise multiplier σ of the round's sums, for the device's own ledger
    /// (`--privacy-budget`).
    pub noise_multiplier: Option<f64>,
    /// Federated evaluation: before training, score the slice as received on the held-out data and
    /// send an `EvaluationReport` for model round `round - 1`.
    pub evaluate: bool,
}

/// A participant's encrypted shares: from it (`SecureShares`), or addressed to it
/// (`SecureSharesForYou`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureShares {
    pub session: u64,
    pub shares: Vec<flotilla_secagg::messages::EncryptedShare>,
}

/// The neighbours a participant shares its secrets with, and their keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecurePeers {
    pub session: u64,
    pub peers: Vec<flotilla_secagg::messages::Peer>,
    /// Each peer's certificate and its signature over its keys and rank (`signed_keys`).
    pub credentials: Vec<PeerCredential>,
}

/// A device's keys for a round, the rank it holds them at, and its signature over both with its
/// TLS key (`signed_keys`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedKeys {
    pub advert: flotilla_secagg::messages::AdvertiseKeys,
    pub rank: u32,
    pub signature: Vec<u8>,
}

/// What the coordinator relays with each peer's keys: its certificate and its signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerCredential {
    pub id: u32,
    /// The peer's TLS certificate (DER), as it presented it to the coordinator.
    pub certificate: Vec<u8>,
    pub signature: Vec<u8>,
}

/// A masked upload: the device's weighted, quantized adapter plus its masks, as little-endian u32s
/// (bytes, so that the header's integer encoding does not grow them). No sample count: the weight
/// is inside the masked values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskedUpdate {
    pub round: u32,
    pub rank: u32,
    pub masked: flotilla_secagg::messages::MaskedInput,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalMetrics {
    pub loss_before: f64,
    pub loss_after: f64,
    pub accuracy: f64,
    /// The whole local training call: the steps, and the local loss before and after them.
    pub train_seconds: f64,
    /// The optimizer steps alone (0 in records written before protocol 4).
    #[serde(default)]
    pub steps_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub round: u32,
    pub rank: u32,
    /// Under `[privacy]` (the task sets `clip_norm`) 1: every device weighs the same.
    pub num_samples: u64,
    /// The device's local loss, accuracy and training time; none under `[privacy]`.
    pub metrics: Option<LocalMetrics>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub round: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub round: u32,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub rounds_completed: u32,
    pub reason: String,
}

/// A certificate signing request for the device's own id, with a key the device just made; the
/// current certificate stays in use until the new one is installed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewCertificate {
    pub csr_pem: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertificateRenewed {
    pub certificate_pem: String,
}
