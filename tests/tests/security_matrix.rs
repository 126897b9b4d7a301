//! The security test matrix: hostile peers against a real coordinator process, with real
//! certificates, while an honest device (a real `flotilla-edge` process) trains next to them.
//!
//! Every hostile attempt must be refused with a specific reason, told to the peer where the protocol
//! allows and logged by the coordinator; the coordinator keeps serving, the honest device finishes
//! its rounds, and every update the coordinator accepted is in the round records.
//!
//! The hostile client is `flotilla_tests::wire`, an implementation of the device side written from
//! docs/protocol.md, independent of the product's code.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flotilla_tests::wire::{self, ClientCredentials, DeviceMessage, LocalMetrics, Reply, TensorDesc, Update};
use flotilla_tests::{binary, certs, provision, start_coordinator, Process};

/// A kit for `id` signed by the right CA but expired yesterday.
fn expired_kit(pki: &Path, id: &str, out: &Path) {
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(pki.join("ca/ca.key")).unwrap()).unwrap();
    let ca_pem = std::fs::read_to_string(pki.join("ca/ca.crt")).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, id);
    params.subject_alt_names = vec![SanType::URI(format!("urn:flotilla:device:{id}").try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(10);
    params.not_after = now - time::Duration::days(1);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("ca.crt"), ca_pem).unwrap();
    std::fs::write(out.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(out.join("key.pem"), key.serialize_pem()).unwrap();
}

/// Tries to join with `credentials`; returns the error the client saw (the attempt must fail).
async fn refused_join(address: SocketAddr, credentials: &ClientCredentials, claim: &str) -> String {
    let endpoint = wire::endpoint(credentials).unwrap();
    let outcome = async {
        let connection = wire::connect(&endpoint, address).await?;
        wire::hello(&connection, claim, 2).await
    }
    .await;
    match outcome {
        Ok(reply) => panic!("{claim}: a hostile handshake was let in: {reply:?}"),
        Err(error) => format!("{error:#}"),
    }
}

fn update_frame(round: u32, rank: u32, tensors: &[TensorDesc], body: &[u8]) -> Vec<u8> {
    let update =
        DeviceMessage::Update(Update { round, rank, num_samples: 100, metrics: Some(LocalMetrics::default()) });
    wire::frame(&update, tensors, body)
}

fn with_first_value(body: &[u8], value: f32) -> Vec<u8> {
    let mut poisoned = body.to_vec();
    poisoned[..4].copy_from_slice(&value.to_le_bytes());
    poisoned
}

#[track_caller]
fn expect_reject(reply: anyhow::Result<Reply>, needle: &str) -> String {
    match reply {
        Ok(Reply::Reject { reason, .. }) if reason.contains(needle) => reason,
        other => panic!("expected a Reject containing '{needle}', got {other:?}"),
    }
}

async fn round_task(connection: &quinn::Connection, round: u32) -> (u32, Vec<TensorDesc>, Vec<u8>) {
    match wire::next_push(connection, Duration::from_secs(60)).await.unwrap() {
        Reply::RoundTask { task, tensors, body } => {
            assert_eq!(task.round, round);
            (task.rank, tensors, body)
        }
        other => panic!("expected the task of round {round}, got {other:?}"),
    }
}

#[test]
fn hostile_peers_are_refused_with_reasons_while_an_honest_device_trains() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path();
    let pki = run.join("pki");
    provision(&pki, &["honest", "mallory", "eve", "stolen", "silent"]);
    certs(&pki, &["revoke", "--id", "stolen"]);
    let rogue = run.join("rogue-pki");
    certs(&rogue, &["init", "--name", "Rogue CA"]);
    certs(&rogue, &["issue", "device", "--id", "honest"]);
    expired_kit(&pki, "expired", &run.join("expired-kit"));

    // RBLA: the hand-written clients below echo their task's tensors as a fair update, which a
    // FLoRA task (it carries ΔW, which no device may send back) would not be.
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nrun_dir = \"{run}\"\naddress_file = \"{run}/addr\"\nhello_timeout_secs = 2\n\
         [tls]\nkit = \"{run}/pki/kits/coordinator\"\ncrl = \"{run}/pki/crl.pem\"\n\
         [limits]\nmax_body_bytes = 65536\n\
         [round]\nrounds = 2\nmin_devices = 2\nmin_updates = 1\ngrace_secs = 60\ndeadline_secs = 120\nlocal_steps = 5\n\
         [aggregation]\nmethod = \"rbla\"\n\
         [model.architecture.mlp]\ninput = 16\nhidden = [8]\nclasses = 4\n",
        run = run.display()
    );
    let (mut coordinator, address) = start_coordinator(run, &config);
    let address: SocketAddr = address.parse().unwrap();
    let mut honest = Process::spawn(
        "honest",
        Command::new(binary("flotilla-edge"))
            .args(["run", "--coordinator", &address.to_string(), "--rank", "4", "--samples", "64", "--kit"])
            .arg(pki.join("kits/honest")),
        &run.join("logs"),
    );
    let kit = |id: &str| ClientCredentials::kit(&pki.join("kits").join(id));

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cases = runtime.block_on(async {
        // ---- Refused in the handshake. ----
        let ca = pki.join("kits/honest/ca.crt");
        let handshakes = [
            (
                "no client certificate",
                ClientCredentials { ca_cert: ca.clone(), identity: None, alpn: wire::ALPN.into() },
            ),
            (
                "certificate from another CA",
                ClientCredentials { ca_cert: ca.clone(), ..ClientCredentials::kit(&rogue.join("kits/honest")) },
            ),
            ("expired certificate", ClientCredentials::kit(&run.join("expired-kit"))),
            ("revoked certificate", kit("stolen")),
            ("serverAuth-only certificate", kit("coordinator")),
            ("wrong ALPN", ClientCredentials { alpn: b"flotilla/1".to_vec(), ..kit("mallory") }),
        ];
        for (case, credentials) in &handshakes {
            let seen = refused_join(address, credentials, "honest").await;
            assert!(seen.contains("aborted by peer: the cryptographic handshake failed"), "{case}: {seen}");
        }

        // ---- A certificate that is fine, a Hello that lies. ----
        let liar = wire::connect(&wire::endpoint(&kit("mallory")).unwrap(), address).await.unwrap();
        match wire::hello(&liar, "honest", 2).await.unwrap() {
            Reply::Refusal { reason } => assert!(reason.contains("claims device id 'honest'"), "{reason}"),
            other => panic!("a Hello claiming another id was answered with {other:?}"),
        }

        // ---- A peer that completes the handshake and says nothing: closed with "try again" (code 4),
        // not refused, so a device too slow under a burst of handshakes reconnects. ----
        let silent = wire::connect(&wire::endpoint(&kit("silent")).unwrap(), address).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(30), silent.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
                assert_eq!(close.error_code, quinn::VarInt::from_u32(4), "{close:?}")
            }
            other => panic!("a silent peer should be closed with code 4, got {other:?}"),
        }

        // ---- Mallory joins properly and gets round 1. ----
        let mallory_endpoint = wire::endpoint(&kit("mallory")).unwrap();
        let mallory = wire::connect(&mallory_endpoint, address).await.unwrap();
        let Reply::Welcome { assigned_rank } = wire::hello(&mallory, "mallory", 2).await.unwrap() else {
            panic!("mallory was not welcomed")
        };
        assert_eq!(assigned_rank, 2);
        let (rank, tensors, body) = round_task(&mallory, 1).await;
        assert_eq!(rank, 2);
        let valid = update_frame(1, rank, &tensors, &body);

        // Eve joins mid-round: she was not assigned round 1.
        let eve_endpoint = wire::endpoint(&kit("eve")).unwrap();
        let eve = wire::connect(&eve_endpoint, address).await.unwrap();
        assert!(matches!(wire::hello(&eve, "eve", 2).await.unwrap(), Reply::Welcome { .. }));
        expect_reject(wire::request(&eve, &valid).await, "not part of the round");

        // ---- Broken frames: each is refused and the connection goes on. ----
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        expect_reject(wire::request(&mallory, &garbage).await, "malformed upload");
        let mut garbage_header = 64u32.to_le_bytes().to_vec();
        garbage_header.extend_from_slice(&[0xfe; 64]);
        expect_reject(wire::request(&mallory, &garbage_header).await, "frame header is malformed");
        let mut oversize_header = (64u32 << 20).to_le_bytes().to_vec();
        oversize_header.extend_from_slice(&[0; 1024]);
        expect_reject(wire::request(&mallory, &oversize_header).await, "frame header of 67108864 bytes exceeds");
        let huge = [TensorDesc { name: "x".into(), dtype: wire::DType::F32, shape: vec![1 << 40, 1 << 40] }];
        expect_reject(wire::request(&mallory, &update_frame(1, rank, &huge, &[])).await, "overflow");
        let big = [TensorDesc { name: "x".into(), dtype: wire::DType::F32, shape: vec![1 << 20] }];
        expect_reject(wire::request(&mallory, &update_frame(1, rank, &big, &[])).await, "exceeds the limit of");
        // Within [limits] max_body_bytes (65536) but beyond what a rank-2 update of this model can
        // be: refused from the header, before any of the body is read or set aside.
        let slice_bytes: u64 = tensors.iter().map(|t| 4 * t.shape.iter().product::<u64>()).sum();
        let beyond = [TensorDesc { name: tensors[0].name.clone(), dtype: wire::DType::F32, shape: vec![8192] }];
        let reason =
            expect_reject(wire::request(&mallory, &update_frame(1, rank, &beyond, &[])).await, "exceeds the limit of");
        let limit: u64 =
            reason.rsplit(' ').next().unwrap().trim_end_matches(|c: char| !c.is_ascii_digit()).parse().unwrap();
        assert!(
            limit < 32768 && limit >= slice_bytes,
            "the session's bound {limit} fits its slice of {slice_bytes} bytes"
        );
        // A name the global adapter does not have, or a shape beyond its own, is refused from the
        // header too.
        let stranger = [TensorDesc { name: "stranger".into(), dtype: wire::DType::F32, shape: vec![2] }];
        expect_reject(
            wire::request(&mallory, &update_frame(1, rank, &stranger, &[0; 8])).await,
            "not part of the global adapter",
        );
        let mut wider = tensors[0].clone();
        wider.shape = std::iter::once(64).chain(wider.shape[1..].iter().map(|_| 1)).collect();
        let wider = [wider];
        expect_reject(
            wire::request(&mallory, &update_frame(1, rank, &wider, &[])).await,
            "beyond the global adapter's",
        );
        expect_reject(wire::request(&mallory, &valid[..valid.len() - 10]).await, "before the frame was complete");
        let mut long = valid.clone();
        long.extend_from_slice(&[0; 4]);
        expect_reject(wire::request(&mallory, &long).await, "bytes after the end of the frame");

        // ---- Well-formed lies: refused by the round engine, participation intact. ----
        let greedy = update_frame(1, rank * 4, &tensors, &body);
        expect_reject(wire::request(&mallory, &greedy).await, "above the rank 2");
        expect_reject(wire::request(&mallory, &update_frame(7, rank, &tensors, &body)).await, "has not started");

        // ---- Poisoned values: refused by validation; mallory is out of round 1. ----
        let nan = update_frame(1, rank, &tensors, &with_first_value(&body, f32::NAN));
        expect_reject(wire::request(&mallory, &nan).await, "contains NaN or infinite values");

        // ---- Round 2: eve plays fair once, then mallory replays round 1 and sends poison. ----
        let (eve_rank, eve_tensors, eve_body) = round_task(&eve, 2).await;
        let (rank2, tensors2, body2) = round_task(&mallory, 2).await;
        let fair = update_frame(2, eve_rank, &eve_tensors, &eve_body);
        assert!(matches!(wire::request(&eve, &fair).await.unwrap(), Reply::Ack { round: 2 }));
        expect_reject(wire::request(&eve, &fair).await, "duplicate update");
        expect_reject(wire::request(&mallory, &valid).await, "stale update for round 1");
        let inf = update_frame(2, rank2, &tensors2, &with_first_value(&body2, f32::INFINITY));
        expect_reject(wire::request(&mallory, &inf).await, "contains NaN or infinite values");
        for connection in [&mallory, &eve] {
            match wire::next_push(connection, Duration::from_secs(120)).await.unwrap() {
                Reply::Finished { rounds_completed, .. } => assert_eq!(rounds_completed, 2),
                other => panic!("expected Finished, got {other:?}"),
            }
        }
        handshakes.map(|(case, _)| case)
    });

    assert!(honest.wait(Duration::from_secs(120)).success(), "{}", honest.logs());
    assert!(coordinator.wait(Duration::from_secs(60)).success(), "{}", coordinator.logs());

    // Every refusal is in the coordinator's log with its specific reason.
    let log = coordinator.stderr_text();
    for needle in [
        "handshake failed: the cryptographic handshake failed: error 116: peer sent no certificates",
        "invalid peer certificate: UnknownIssuer",
        "invalid peer certificate: certificate expired",
        "invalid peer certificate: Revoked",
        "certificate does not allow extended key usage for client authentication",
        "peer doesn't support any known protocol",
        "not admitted: hello claims device id 'honest' but the certificate is for 'mallory'",
        "malformed upload: frame header is malformed",
        "malformed upload: frame header of 67108864 bytes exceeds the limit",
        "malformed upload: declared tensor sizes overflow",
        "malformed upload: frame body of 4194304 bytes exceeds the limit of",
        "malformed upload: stream ended before the frame was complete",
        "malformed upload: bytes after the end of the frame",
        "update refused: update of rank 8 is above the rank 2 this device was assigned",
        "update refused: update for round 7, which has not started",
        "update refused: this device is not part of the round",
        "update refused: stale update for round 1",
        "update refused: duplicate update for this round",
        "update rejected: update from 'mallory' rejected: tensor",
    ] {
        assert!(log.contains(needle), "the coordinator did not log '{needle}'\n{log}");
    }
    assert_eq!(cases.len(), 6);

    // Nothing accepted was lost: round 1 holds the honest update, round 2 the honest one and eve's.
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let devices = |round: usize| -> Vec<String> {
        let mut ids: Vec<String> = summary["rounds"][round]["updates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["device"].as_str().unwrap().to_string())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(devices(0), vec!["honest"]);
    assert_eq!(devices(1), vec!["eve", "honest"]);
}

/// A device meeting a coordinator that speaks another protocol version stops at once (status 2,
/// no retry loop) and says why.
#[test]
fn a_device_refuses_a_coordinator_of_another_protocol_version() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    provision(&pki, &["phone"]);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let server =
        runtime.block_on(async { wire::server_endpoint(&pki.join("kits/coordinator"), b"flotilla/6") }).unwrap();
    let address = server.local_addr().unwrap();
    let accepting = server.clone();
    runtime.spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                let _ = incoming.await;
            });
        }
    });
    let mut device = Process::spawn(
        "phone",
        Command::new(binary("flotilla-edge"))
            .args(["run", "--coordinator", &address.to_string(), "--rank", "2", "--samples", "32", "--kit"])
            .arg(pki.join("kits/phone")),
        &dir.path().join("logs"),
    );
    assert_eq!(device.wait(Duration::from_secs(60)).code(), Some(2), "{}", device.logs());
    assert!(device.stderr_text().contains("does not speak flotilla/5"), "{}", device.logs());
    assert!(!device.stderr_text().contains("retrying"), "{}", device.logs());
}
