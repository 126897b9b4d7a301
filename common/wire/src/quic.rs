//! QUIC endpoints and transport settings.
//!
//! quinn's defaults are tuned for web traffic, not model transfer: a 1.25 MB stream window caps a
//! stream at ~12.5 MB/s on a 100 ms path, the connection window is unbounded, and without keep-alive
//! an idle connection dies during long local training. [`TransportSettings`] fixes those.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use serde::{Deserialize, Serialize};

use crate::framing::{encode_header, FrameError};
use crate::tensor::SharedTensors;
use crate::tls::{self, KitPaths, TlsError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CongestionController {
    Cubic,
    NewReno,
    Bbr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportSettings {
    pub stream_receive_window_bytes: u32,
    pub connection_receive_window_bytes: u32,
    pub send_window_bytes: u64,
    pub idle_timeout_secs: u64,
    pub keep_alive_secs: u64,
    pub max_concurrent_bidi_streams: u32,
    pub max_concurrent_uni_streams: u32,
    pub congestion_controller: CongestionController,
    pub segmentation_offload: bool,
    /// Kernel receive buffer of the UDP socket. The default (~200 KB) overflows when many
    /// handshakes or uploads arrive at once, and every dropped datagram costs a retransmission
    /// timeout. Linux caps it at `net.core.rmem_max` (a warning says so).
    pub socket_receive_buffer_bytes: u32,
    /// Kernel send buffer of the UDP socket (capped by `net.core.wmem_max`).
    pub socket_send_buffer_bytes: u32,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            stream_receive_window_bytes: 16 << 20,
            connection_receive_window_bytes: 32 << 20,
            send_window_bytes: 32 << 20,
            idle_timeout_secs: 60,
            keep_alive_secs: 10,
            max_concurrent_bidi_streams: 8,
            max_concurrent_uni_streams: 8,
            congestion_controller: CongestionController::Cubic,
            segmentation_offload: true,
            socket_receive_buffer_bytes: 8 << 20,
            socket_send_buffer_bytes: 8 << 20,
        }
    }
}

impl TransportSettings {
    pub fn to_quinn(&self) -> Result<quinn::TransportConfig, String> {
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(self.stream_receive_window_bytes.into());
        t.receive_window(self.connection_receive_window_bytes.into());
        t.send_window(self.send_window_bytes);
        let idle = quinn::IdleTimeout::try_from(Duration::from_secs(self.idle_timeout_secs))
            .map_err(|e| format!("idle_timeout_secs {}: {e}", self.idle_timeout_secs))?;
        t.max_idle_timeout(Some(idle));
        t.keep_alive_interval((self.keep_alive_secs > 0).then(|| Duration::from_secs(self.keep_alive_secs)));
        t.max_concurrent_bidi_streams(self.max_concurrent_bidi_streams.into());
        t.max_concurrent_uni_streams(self.max_concurrent_uni_streams.into());
        t.enable_segmentation_offload(self.segmentation_offload);
        match self.congestion_controller {
            CongestionController::Cubic => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
            }
            CongestionController::NewReno => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
            }
            CongestionController::Bbr => {
                t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
            }
        };
        Ok(t)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("transport settings: {0}")]
    Transport(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The coordinator's QUIC server configuration (also rebuilt when the CRL changes).
pub fn server_config(
    kit: &KitPaths,
    crl: Option<&std::path::Path>,
    transport: &TransportSettings,
) -> Result<quinn::ServerConfig, EndpointError> {
    let tls = tls::server_config(kit, crl)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport.to_quinn().map_err(EndpointError::Transport)?));
    Ok(config)
}

/// A server endpoint. `reset_secret` keys QUIC stateless resets: a server restarted with the same
/// secret answers packets of the connections its previous life held with a valid reset, so those
/// peers learn at once that the connection is gone and reconnect, instead of waiting for their idle
/// timeout. Keep it as secret as a private key (whoever has it can end any session).
pub fn server_endpoint(
    addr: SocketAddr,
    kit: &KitPaths,
    crl: Option<&std::path::Path>,
    transport: &TransportSettings,
    reset_secret: &[u8],
) -> Result<quinn::Endpoint, EndpointError> {
    let config = server_config(kit, crl, transport)?;
    endpoint_with(addr, Some(config), transport, restartable_endpoint_config(reset_secret))
}

/// Stateless resets keyed by `secret`, and connection ids a restarted server still recognises as
/// its own: quinn answers a packet for an unknown connection only if its id passes the generator's
/// check, which a fresh random generator key would fail.
fn restartable_endpoint_config(secret: &[u8]) -> quinn::EndpointConfig {
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let derived = ring::hmac::sign(&reset_key, b"flotilla connection-id generator");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&derived.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    // quinn sends at most one reset per 20 ms by default (50/s, for the whole endpoint): after a
    // restart, 1,000 devices competing for those slots left a few to their idle timeout. A reset is
    // always smaller than the packet that incites it, so a faster rate cannot amplify anything.
    config.min_reset_interval(Duration::from_millis(1));
    config
}

pub fn client_endpoint(kit: &KitPaths, transport: &TransportSettings) -> Result<quinn::Endpoint, EndpointError> {
    let mut endpoint = endpoint(([0, 0, 0, 0], 0).into(), None, transport)?;
    endpoint.set_default_client_config(client_config(kit, transport)?);
    Ok(endpoint)
}

/// A device's QUIC client configuration: its kit's identity and the transport settings. Several
/// devices can share one endpoint (one UDP socket), each connecting with its own configuration.
pub fn client_config(kit: &KitPaths, transport: &TransportSettings) -> Result<quinn::ClientConfig, EndpointError> {
    let tls = tls::client_config(kit)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport.to_quinn().map_err(EndpointError::Transport)?));
    Ok(config)
}

/// An endpoint on a UDP socket with the configured kernel buffers (a server when `server` is given).
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    transport: &TransportSettings,
) -> Result<quinn::Endpoint, EndpointError> {
    endpoint_with(addr, server, transport, quinn::EndpointConfig::default())
}

fn endpoint_with(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    transport: &TransportSettings,
    config: quinn::EndpointConfig,
) -> Result<quinn::Endpoint, EndpointError> {
    let socket =
        udp_socket(addr, transport, server.is_some()).map_err(|source| EndpointError::Bind { addr, source })?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| EndpointError::Transport("no async runtime: start the endpoint inside tokio".into()))?;
    quinn::Endpoint::new(config, server, socket, runtime).map_err(|source| EndpointError::Bind { addr, source })
}

fn udp_socket(addr: SocketAddr, transport: &TransportSettings, server: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Dual stack where the system allows it, as quinn's own bind does.
        let _ = socket.set_only_v6(false);
    }
    let wanted = (transport.socket_receive_buffer_bytes as usize, transport.socket_send_buffer_bytes as usize);
    socket.set_recv_buffer_size(wanted.0)?;
    socket.set_send_buffer_size(wanted.1)?;
    // Linux reports twice the usable size it granted, capped by net.core.{r,w}mem_max.
    let (got_recv, got_send) = (socket.recv_buffer_size()? / 2, socket.send_buffer_size()? / 2);
    if got_recv < wanted.0 || got_send < wanted.1 {
        let message = "UDP socket buffers are smaller than configured; raise net.core.rmem_max / \
                       net.core.wmem_max (bursts of handshakes or uploads may be dropped and retransmitted)";
        // Matters for a coordinator facing a fleet; a device's single connection barely notices.
        if server {
            tracing::warn!(
                requested_receive = wanted.0,
                granted_receive = got_recv,
                requested_send = wanted.1,
                granted_send = got_send,
                "{message}"
            );
        } else {
            tracing::debug!(granted_receive = got_recv, granted_send = got_send, "{message}");
        }
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// TLS alert `no_application_protocol`: the peers share no ALPN id, i.e. no protocol version.
pub const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// The TLS alert behind a connection failure: a crypto close code is `0x100 + alert`.
pub fn tls_alert(error: &quinn::ConnectionError) -> Option<u8> {
    let code = match error {
        quinn::ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        quinn::ConnectionError::TransportError(e) => u64::from(e.code),
        _ => return None,
    };
    (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8)
}

/// TLS failures are permanent (bad or revoked certificate, unknown CA, wrong protocol version) and
/// must not be retried.
pub fn is_certificate_failure(error: &quinn::ConnectionError) -> bool {
    tls_alert(error).is_some()
}

/// Writes a frame whose body is shared (see [`SharedTensors`]) to a QUIC stream: the header is
/// written (copied, it is small), the body is queued by reference.
pub async fn write_frame_shared<M: Serialize>(
    send: &mut quinn::SendStream,
    message: &M,
    tensors: &SharedTensors,
) -> Result<(), FrameError> {
    send.write_all(&encode_header(message, &tensors.descs)?).await.map_err(std::io::Error::from)?;
    send.write_chunk(tensors.body.clone()).await.map_err(std::io::Error::from)?;
    Ok(())
}
