//! The wire against raw QUIC, on loopback, in release, in one run:
//!
//! - **Upload**: one update of `--megabytes` (default 256) through the full stack — `write_frame` on a
//!   device endpoint, `read_frame_decoded` with the coordinator's limits (each tensor read straight
//!   into a tch tensor, every value checked finite), the aggregator's input (`Adapter::from_decoded`)
//!   and an `Ack` frame back — against a raw quinn bidirectional stream of the same bytes received into one buffer, with a
//!   one-byte answer (and, for reference, the same stream with its chunks dropped uncopied). Same endpoints, same certificates, same transport settings. Target: the full
//!   stack at ≥ 90% of the raw throughput.
//! - **Handshakes**: `--handshakes` (default 1000) new mutual-TLS connections accepted by the
//!   coordinator's endpoint (client certificate verified, device id read from it), against the same
//!   number of server-authenticated-only handshakes on an endpoint without client authentication.
//!   Session resumption is off so every handshake is a full one.
//!
//!   cargo bench -p flotilla-coordinator-torch --bench transport
//!   cargo bench -p flotilla-coordinator-torch --bench transport -- --megabytes 64 --handshakes 200   # quicker

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use flotilla_certs::kit::Placement;
use flotilla_certs::{CoordinatorRequest, DeviceRequest, Pki};
use flotilla_torch::adapter::{lora_a_name, lora_b_name, Adapter};
use flotilla_torch::tensor::read_frame_decoded;
use flotilla_wire::framing::{read_frame, write_frame, FrameLimits};
use flotilla_wire::protocol::{Ack, CoordinatorMessage, DeviceMessage, LocalMetrics, Update};
use flotilla_wire::quic::{self, TransportSettings};
use flotilla_wire::tensor::{DType, WireTensors};
use flotilla_wire::tls::{self, KitPaths};
use tch::{Device, Kind, Tensor};

const RUNS: usize = 5;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// An adapter of `megabytes` MiB: rank-64 A and B factors of 4096-wide layers (1 MiB each).
fn update_tensors(megabytes: usize) -> WireTensors {
    let mut tensors = Vec::new();
    for layer in 0..megabytes / 2 {
        let module = format!("base_model.model.layers.{layer}.q_proj");
        tensors.push((lora_a_name(&module), Tensor::randn([64, 4096], (Kind::Float, Device::Cpu)) * 0.02));
        tensors.push((lora_b_name(&module), Tensor::randn([4096, 64], (Kind::Float, Device::Cpu)) * 0.02));
    }
    flotilla_torch::tensor::wire_from_tensors(tensors.iter().map(|(n, t)| (n.as_str(), t)), DType::F32)
        .expect("wire tensors")
}

fn client_without_resumption(kit: &KitPaths, transport: &TransportSettings) -> quinn::Endpoint {
    let mut tls = tls::client_config(kit).expect("client TLS");
    tls.resumption = rustls::client::Resumption::disabled();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC client");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport.to_quinn().expect("transport")));
    let mut endpoint = quic::endpoint(([127, 0, 0, 1], 0).into(), None, transport).expect("client endpoint");
    endpoint.set_default_client_config(config);
    endpoint
}

/// The same server certificate, no client authentication: the baseline for the handshake cost.
fn server_auth_only(kit: &KitPaths, transport: &TransportSettings) -> quinn::Endpoint {
    use rustls::pki_types::pem::PemObject;
    let chain =
        rustls::pki_types::CertificateDer::pem_file_iter(&kit.cert).unwrap().collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&kit.key).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![flotilla_wire::protocol::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport.to_quinn().unwrap()));
    quic::endpoint(([127, 0, 0, 1], 0).into(), Some(config), transport).unwrap()
}

async fn upload_full(connection: &quinn::Connection, server: &quinn::Connection, wire: &WireTensors) -> f64 {
    let limits = FrameLimits { max_body_bytes: 2 << 30, ..FrameLimits::default() };
    let start = Instant::now();
    let receive = async {
        let (mut send, mut recv) = server.accept_bi().await.expect("accept");
        // As the coordinator receives an upload: decoded into tensors while it arrives.
        let (message, tensors) = read_frame_decoded::<_, DeviceMessage>(&mut recv, &limits, None).await.expect("frame");
        assert!(matches!(message, DeviceMessage::Update(_)));
        let adapter = Adapter::from_decoded(tensors).expect("valid update");
        assert_eq!(adapter.tensors().len(), wire.descs.len());
        write_frame(&mut send, &CoordinatorMessage::Ack(Ack { round: 1 }), &WireTensors::default()).await.unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
    };
    let upload = async {
        let (mut send, mut recv) = connection.open_bi().await.expect("open");
        let update = DeviceMessage::Update(Update {
            round: 1,
            rank: 64,
            num_samples: 1,
            metrics: Some(LocalMetrics::default()),
        });
        write_frame(&mut send, &update, wire).await.expect("write");
        send.finish().unwrap();
        let (reply, _) = read_frame::<_, CoordinatorMessage>(&mut recv, &FrameLimits::default()).await.expect("reply");
        assert!(matches!(reply, CoordinatorMessage::Ack(_)));
    };
    tokio::join!(receive, upload);
    start.elapsed().as_secs_f64()
}

/// How the raw baseline receives the bytes.
#[derive(Clone, Copy)]
enum RawReceive {
    /// Into one buffer of the right size (one copy, no zero-fill, no reallocation): the least an
    /// application that keeps the data can do.
    IntoMemory,
    /// Take quinn's own chunks and drop them (no copy at all): the transport's roofline.
    Discard,
}

async fn upload_raw(connection: &quinn::Connection, server: &quinn::Connection, bytes: &[u8], mode: RawReceive) -> f64 {
    let start = Instant::now();
    let receive = async {
        let (mut send, mut recv) = server.accept_bi().await.expect("accept");
        let mut received = 0;
        let mut memory = Vec::with_capacity(match mode {
            RawReceive::IntoMemory => bytes.len(),
            RawReceive::Discard => 0,
        });
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.expect("read") {
            received += chunk.bytes.len();
            if let RawReceive::IntoMemory = mode {
                memory.extend_from_slice(&chunk.bytes);
            }
        }
        assert_eq!(received, bytes.len());
        std::hint::black_box(&memory);
        send.write_all(&[1]).await.unwrap();
        send.finish().unwrap();
        let _ = send.stopped().await;
    };
    let upload = async {
        let (mut send, mut recv) = connection.open_bi().await.expect("open");
        send.write_all(bytes).await.expect("write");
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(1).await.expect("reply"), vec![1]);
    };
    tokio::join!(receive, upload);
    start.elapsed().as_secs_f64()
}

/// Seconds for the server to accept `count` handshakes, with `inflight` in flight at a time.
async fn handshakes(
    server: &quinn::Endpoint,
    client: &quinn::Endpoint,
    count: usize,
    inflight: usize,
    mutual: bool,
) -> f64 {
    let address: SocketAddr = server.local_addr().unwrap();
    let start = Instant::now();
    let acceptor = {
        let server = server.clone();
        tokio::spawn(async move {
            let mut accepted = Vec::with_capacity(count);
            while accepted.len() < count {
                let incoming = server.accept().await.expect("incoming");
                accepted.push(tokio::spawn(async move {
                    let connection = incoming.await.expect("handshake");
                    if mutual {
                        tls::peer_device(&connection).expect("device id");
                    }
                    connection
                }));
            }
            let mut connections = Vec::with_capacity(count);
            for task in accepted {
                connections.push(task.await.unwrap());
            }
            connections
        })
    };
    let semaphore = Arc::new(tokio::sync::Semaphore::new(inflight));
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        clients.push(tokio::spawn(async move {
            let connection = client.connect(address, "localhost").unwrap().await.expect("client handshake");
            drop(permit);
            connection
        }));
    }
    let connections = acceptor.await.unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let mut client_connections = Vec::new();
    for task in clients {
        client_connections.push(task.await.unwrap());
    }
    for connection in connections.iter().chain(&client_connections) {
        connection.close(0u32.into(), b"bench done");
    }
    seconds
}

fn main() {
    let megabytes = arg("--megabytes", 256);
    let handshake_count = arg("--handshakes", 1000);
    let inflight = arg("--inflight", 32);
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let pki = Pki::init(&pki_dir, "bench CA", 30, None).unwrap();
    let placement = |d: &std::path::Path| Placement {
        install_dir: d.to_path_buf(),
        address: "127.0.0.1:0".into(),
        server_name: "localhost".into(),
    };
    pki.issue_coordinator(
        &CoordinatorRequest { name: "localhost", sans: &[], days: 10, loopback: false },
        &placement(&pki.kit_dir("coordinator")),
    )
    .unwrap();
    pki.issue_device(
        &DeviceRequest { id: "bench-device", validity: std::time::Duration::from_secs(10 * 86_400) },
        &placement(&pki.kit_dir("bench-device")),
    )
    .unwrap();
    let server_kit = KitPaths::in_dir(&pki.kit_dir("coordinator"));
    let device_kit = KitPaths::in_dir(&pki.kit_dir("bench-device"));
    let transport = TransportSettings::default();

    let wire = update_tensors(megabytes);
    let bytes = wire.body.clone();
    let size_mib = bytes.len() as f64 / (1 << 20) as f64;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let server =
            quic::server_endpoint(([127, 0, 0, 1], 0).into(), &server_kit, None, &transport, b"bench").unwrap();
        let client = quic::client_endpoint(&device_kit, &transport).unwrap();
        let address = server.local_addr().unwrap();
        let (client_conn, server_conn) =
            tokio::join!(async { client.connect(address, "localhost").unwrap().await.unwrap() }, async {
                server.accept().await.unwrap().await.unwrap()
            });
        // Warm-up of every path, then alternate so drift hits all alike.
        upload_raw(&client_conn, &server_conn, &bytes, RawReceive::IntoMemory).await;
        upload_raw(&client_conn, &server_conn, &bytes, RawReceive::Discard).await;
        upload_full(&client_conn, &server_conn, &wire).await;
        let (mut raw, mut roof, mut full) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            raw.push(upload_raw(&client_conn, &server_conn, &bytes, RawReceive::IntoMemory).await);
            roof.push(upload_raw(&client_conn, &server_conn, &bytes, RawReceive::Discard).await);
            full.push(upload_full(&client_conn, &server_conn, &wire).await);
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (raw_s, roof_s, full_s) = (median(&mut raw), median(&mut roof), median(&mut full));
        println!("upload of {size_mib:.0} MiB over loopback, median of {RUNS}:");
        println!("  raw quinn stream into memory  {:>7.3} s  {:>6.0} MiB/s", raw_s, size_mib / raw_s);
        println!("  raw quinn stream, discarded   {:>7.3} s  {:>6.0} MiB/s", roof_s, size_mib / roof_s);
        println!("  full stack into tensors       {:>7.3} s  {:>6.0} MiB/s", full_s, size_mib / full_s);
        println!("  full / raw-into-memory throughput {:>6.1}%  (target ≥ 90%)", 100.0 * raw_s / full_s);
        println!("  full / discarded throughput       {:>6.1}%", 100.0 * roof_s / full_s);
        client_conn.close(0u32.into(), b"done");

        let mutual_client = client_without_resumption(&device_kit, &transport);
        let plain_server = server_auth_only(&server_kit, &transport);
        // Warm-up, then each kind once.
        handshakes(&server, &mutual_client, 32, inflight, true).await;
        let plain = handshakes(&plain_server, &mutual_client, handshake_count, inflight, false).await;
        let mutual = handshakes(&server, &mutual_client, handshake_count, inflight, true).await;
        println!("{handshake_count} full handshakes accepted ({inflight} in flight, no resumption):");
        println!("  server auth only      {:>8.3} s  {:>7.0} /s", plain, handshake_count as f64 / plain);
        println!("  mutual TLS + identity {:>8.3} s  {:>7.0} /s", mutual, handshake_count as f64 / mutual);
        println!("  mutual / server-only time {:>5.2}×", mutual / plain);
    });
}
