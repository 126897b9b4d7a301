//! A second, independent implementation of the device side of the wire protocol, written from
//! `docs/protocol.md` rather than from the library: the security tests use it to send what an
//! honest device never would (garbage, lies, oversize frames, poisoned tensors), and because it
//! does not share code with the product it also checks that the document is right.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

pub const ALPN: &[u8] = b"flotilla/5";

// ---- Messages, mirrored field by field from docs/protocol.md (bincode 2, standard config). ----

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum DeviceMessage {
    Hello(Hello),
    Update(Update),
    // 2–7 (renewal, checkpoint fetch, secure aggregation) are not sent by these tests.
    Reserved2,
    Reserved3,
    Reserved4,
    Reserved5,
    Reserved6,
    Reserved7,
    EvaluationReport(EvaluationReport),
}

/// Federated evaluation (docs/protocol.md): a device's sums on its held-out data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluationReport {
    pub model_round: u32,
    pub rank: u32,
    pub held_out_examples: u64,
    pub sums: Option<EvaluationSums>,
    pub declined: String,
    pub cross: Vec<RankSums>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankSums {
    pub rank: u32,
    pub sums: EvaluationSums,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EvaluationSums {
    pub examples: u64,
    pub scored: u64,
    pub correct: u64,
    pub loss_sum: f64,
    pub labels: Vec<LabelSums>,
    pub generated: u64,
    pub rouge_l_sum: f64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct LabelSums {
    pub support: u64,
    pub correct: u64,
    pub predicted: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluationTask {
    pub model_round: u32,
    pub rank: u32,
    pub base_version: String,
    pub deadline_secs: u32,
    pub cross_ranks: Vec<u32>,
    pub fold_tail: bool,
    /// Secure evaluation's session (docs/protocol.md); these tests never run one, so a task that
    /// carries one does not decode.
    pub secure: Option<NoSecureEvaluation>,
}

/// Stands for `SecureEvaluation`, which these tests never receive.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NoSecureEvaluation {}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub device_id: String,
    pub protocol_version: u32,
    pub hardware: HardwareProfile,
    pub requested_rank: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HardwareProfile {
    pub device_class: String,
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    pub cuda_devices: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Update {
    pub round: u32,
    pub rank: u32,
    pub num_samples: u64,
    pub metrics: Option<LocalMetrics>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LocalMetrics {
    pub loss_before: f64,
    pub loss_after: f64,
    pub accuracy: f64,
    pub train_seconds: f64,
    pub steps_seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    F32,
    BF16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainingSettings {
    pub local_steps: u32,
    pub local_epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub seed: u64,
    pub trainable: Trainable,
}

/// What the device trains: every factor (0), or B and the head with A frozen (1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trainable {
    Lora,
    BOnly,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundTask {
    pub round: u32,
    pub total_rounds: u32,
    pub rank: u32,
    pub base_version: String,
    pub training: TrainingSettings,
    pub deadline_secs: u32,
    pub clip_norm: Option<f64>,
    pub secure: Option<Box<SecureTask>>,
    pub noise_multiplier: Option<f64>,
    pub evaluate: bool,
}

/// Under secure aggregation (docs/protocol.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecureTask {
    pub session: u64,
    pub participant: u32,
    pub threshold: usize,
    pub degree: usize,
    pub range: f32,
    pub max_participants: usize,
    pub layout_shared: usize,
    pub layout_per_slot: usize,
    pub layout_max_rank: u32,
    pub max_samples: u64,
    pub noise_std: Vec<f64>,
    pub participants: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reason {
    reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoundAndReason {
    round: u32,
    reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Finished {
    rounds_completed: u32,
    reason: String,
}

/// What the coordinator said, as far as these tests need to know.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Only the leading field of `Welcome` is read; the model description and base weights are skipped.
    Welcome {
        assigned_rank: u32,
    },
    Refusal {
        reason: String,
    },
    RoundTask {
        task: RoundTask,
        tensors: Vec<TensorDesc>,
        body: Vec<u8>,
    },
    Ack {
        round: u32,
    },
    Reject {
        round: u32,
        reason: String,
    },
    Finished {
        rounds_completed: u32,
        reason: String,
    },
    EvaluationTask {
        task: EvaluationTask,
    },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// `u32 LE header length ‖ bincode((message, descriptors)) ‖ body`.
pub fn frame(message: &DeviceMessage, tensors: &[TensorDesc], body: &[u8]) -> Vec<u8> {
    let header = bincode::serde::encode_to_vec((message, tensors), config()).expect("encode header");
    let mut out = (header.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(body);
    out
}

/// Parses a whole coordinator frame.
pub fn parse_reply(bytes: &[u8]) -> Result<Reply> {
    let len = u32::from_le_bytes(bytes.get(..4).context("short frame")?.try_into()?) as usize;
    let header = bytes.get(4..4 + len).context("short header")?;
    let body = &bytes[4 + len..];
    let (variant, used): (u32, usize) = bincode::serde::decode_from_slice(header, config())?;
    let rest = &header[used..];
    Ok(match variant {
        0 => Reply::Welcome { assigned_rank: bincode::serde::decode_from_slice(rest, config())?.0 },
        1 => {
            let (r, _): (Reason, _) = bincode::serde::decode_from_slice(rest, config())?;
            Reply::Refusal { reason: r.reason }
        }
        2 => {
            let ((task, tensors), _): ((RoundTask, Vec<TensorDesc>), _) =
                bincode::serde::decode_from_slice(rest, config())?;
            Reply::RoundTask { task, tensors, body: body.to_vec() }
        }
        3 => Reply::Ack { round: bincode::serde::decode_from_slice(rest, config())?.0 },
        4 => {
            let (r, _): (RoundAndReason, _) = bincode::serde::decode_from_slice(rest, config())?;
            Reply::Reject { round: r.round, reason: r.reason }
        }
        5 => {
            let (f, _): (Finished, _) = bincode::serde::decode_from_slice(rest, config())?;
            Reply::Finished { rounds_completed: f.rounds_completed, reason: f.reason }
        }
        11 => {
            let ((task, _), _): ((EvaluationTask, Vec<TensorDesc>), _) =
                bincode::serde::decode_from_slice(rest, config())?;
            Reply::EvaluationTask { task }
        }
        other => bail!("unknown coordinator message {other}"),
    })
}

// ---- Connections. ----

/// Who the client claims to be in the TLS handshake.
pub struct ClientCredentials {
    /// CA certificate used to verify the coordinator.
    pub ca_cert: std::path::PathBuf,
    /// Own certificate and key; `None` presents no client certificate at all.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    pub alpn: Vec<u8>,
}

impl ClientCredentials {
    /// The credentials in a kit directory written by `flotilla-certs`.
    pub fn kit(dir: &Path) -> ClientCredentials {
        ClientCredentials {
            ca_cert: dir.join("ca.crt"),
            identity: Some((dir.join("cert.pem"), dir.join("key.pem"))),
            alpn: ALPN.to_vec(),
        }
    }
}

pub fn endpoint(credentials: &ClientCredentials) -> Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&credentials.ca_cert)? {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut tls = match &credentials.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key)?)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![credentials.alpn.clone()];
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(30).try_into()?));
    client.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// Connects and, with TLS 1.3, waits long enough to learn whether the server accepted the client
/// certificate (its verdict arrives after the client's handshake has finished).
pub async fn connect(endpoint: &quinn::Endpoint, address: SocketAddr) -> Result<quinn::Connection> {
    let connection = endpoint.connect(address, "localhost")?.await?;
    Ok(connection)
}

/// Opens a bidirectional stream, sends `bytes`, finishes the stream and reads the whole answer.
pub async fn request(connection: &quinn::Connection, bytes: &[u8]) -> Result<Reply> {
    let (mut send, mut recv) = connection.open_bi().await?;
    // The coordinator may refuse early and stop the stream; what it answers is what matters.
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    let answer = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(64 << 20))
        .await
        .context("no answer within 30 s")??;
    parse_reply(&answer)
}

pub async fn hello(connection: &quinn::Connection, device_id: &str, rank: u32) -> Result<Reply> {
    let message = DeviceMessage::Hello(Hello {
        device_id: device_id.to_string(),
        protocol_version: 5,
        hardware: HardwareProfile {
            device_class: "desktop".into(),
            cpu_cores: 2,
            memory_bytes: 1 << 30,
            cuda_devices: 0,
        },
        requested_rank: rank,
    });
    request(connection, &frame(&message, &[], &[])).await
}

/// Waits for the next message the coordinator pushes on a unidirectional stream.
pub async fn next_push(connection: &quinn::Connection, timeout: Duration) -> Result<Reply> {
    let mut recv = tokio::time::timeout(timeout, connection.accept_uni()).await.context("no push in time")??;
    parse_reply(&recv.read_to_end(64 << 20).await?)
}

/// A server that completes mutual TLS with `kit` (a coordinator kit) but offers only `alpn`: what a
/// device meets when the coordinator runs another protocol version.
pub fn server_endpoint(kit: &Path, alpn: &[u8]) -> Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(kit.join("ca.crt"))? {
        roots.add(cert?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let chain = CertificateDer::pem_file_iter(kit.join("cert.pem"))?.collect::<Result<Vec<_>, _>>()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, PrivateKeyDer::from_pem_file(kit.join("key.pem"))?)?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    Ok(quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(crypto)), ([127, 0, 0, 1], 0).into())?)
}
