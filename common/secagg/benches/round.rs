//! What secure aggregation costs, in process: one round of the protocol for N participants of
//! mixed ranks against the plain sum of their vectors (what the coordinator does without it), and
//! the bytes each participant sends. MiniLM-sized by default: LoRA on query and value of 6 layers
//! (12 modules, 384 + 384 values per slot), R_max 16, ranks 2/4/8/16 in equal shares, a 5-class
//! head; degree 2·⌈log₂ N⌉, threshold half the degree + 1, 5% of the participants drop after
//! sharing their keys.
//!
//!   cargo bench -p flotilla-secagg --bench round -- [--participants 100,1000] [--per-slot 9217]

use std::collections::BTreeMap;
use std::time::Instant;

use flotilla_secagg::client::ClientRound;
use flotilla_secagg::layout::Layout;
use flotilla_secagg::server::ServerRound;
use flotilla_secagg::Parameters;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let counts: Vec<usize> =
        arg(&args, "--participants", "100,1000").split(',').filter_map(|n| n.parse().ok()).collect();
    // Per slot: its coverage weight, then 12 modules × (A row of 384 + B column of 384).
    let per_slot: usize = arg(&args, "--per-slot", "9217").parse().unwrap_or(9217);
    // Shared: the head (5 × 384 + 5) and the device's weight.
    let layout = Layout { shared: 5 * 384 + 5 + 1, per_slot, max_rank: 16 };
    println!("layout: {} values at R_max 16, {} at rank 8", layout.full_len(), layout.len(8));
    println!(
        "{:>6} {:>6} {:>9} {:>14} {:>16} {:>16} {:>12} {:>14}",
        "N", "degree", "threshold", "plain sum (s)", "secagg server (s)", "client, mean (s)", "upload ×", "dropped"
    );
    for n in counts {
        let degree = (2 * (n as f64).log2().ceil() as usize).min(n - 1).max(2);
        let threshold = degree / 2 + 1;
        let parameters = Parameters { threshold, degree, range: 4.0, max_participants: n };
        let ranks: BTreeMap<u32, u32> = (0..n as u32).map(|i| (i, [2, 4, 8, 16][i as usize % 4])).collect();
        let values: BTreeMap<u32, Vec<f32>> = ranks
            .iter()
            .map(|(&id, &rank)| {
                (id, (0..layout.len(rank)).map(|j| ((j * 31 + id as usize) % 97) as f32 / 97.0 - 0.5).collect())
            })
            .collect();

        // The plain round's aggregation: the per-coordinate sums of f32 updates.
        let started = Instant::now();
        let mut plain = vec![0f64; layout.full_len()];
        for v in values.values() {
            for (s, x) in plain.iter_mut().zip(v) {
                *s += f64::from(*x);
            }
        }
        let plain_seconds = started.elapsed().as_secs_f64();

        let mut server = ServerRound::new(parameters, 1, layout, ranks.clone(), 7).expect("session");
        let mut client_seconds = 0.0;
        let mut clients = BTreeMap::new();
        let mut overhead_bytes = 0usize;
        for (&id, &rank) in &ranks {
            let started = Instant::now();
            let (client, advert) = ClientRound::new(parameters, 1, id, rank, layout).expect("client");
            client_seconds += started.elapsed().as_secs_f64();
            overhead_bytes += 64;
            server.receive_keys(advert).expect("keys");
            clients.insert(id, client);
        }
        let started = Instant::now();
        for (&id, client) in clients.iter_mut() {
            let t = Instant::now();
            let shares = client.share_keys(&server.peers_for(id)).expect("share");
            client_seconds += t.elapsed().as_secs_f64();
            overhead_bytes += shares.iter().map(|s| s.ciphertext.len() + 64 + 16).sum::<usize>();
            server.receive_shares(id, shares).expect("shares");
        }
        let mut server_seconds = started.elapsed().as_secs_f64() - 0.0;
        for (&id, client) in clients.iter_mut() {
            let t = Instant::now();
            let errors = client.receive_shares(server.shares_for(id));
            client_seconds += t.elapsed().as_secs_f64();
            assert!(errors.is_empty());
        }
        let dropped: Vec<u32> = (0..n as u32).filter(|i| i % 20 == 19).collect();
        for (&id, client) in clients.iter_mut() {
            if dropped.contains(&id) {
                continue;
            }
            let t = Instant::now();
            let input = client.masked_input(&values[&id]).expect("input");
            client_seconds += t.elapsed().as_secs_f64();
            let t = Instant::now();
            server.receive_masked(input).expect("masked");
            server_seconds += t.elapsed().as_secs_f64();
        }
        let request = server.unmask_request();
        for (id, client) in clients {
            if dropped.contains(&id) {
                continue;
            }
            let t = Instant::now();
            let reply = client.unmask(&request).expect("unmask");
            client_seconds += t.elapsed().as_secs_f64();
            overhead_bytes +=
                reply.self_mask_shares.iter().chain(&reply.key_shares).map(|(_, s)| s.len() + 4).sum::<usize>();
            server.receive_unmask(reply).expect("reply");
        }
        let t = Instant::now();
        let aggregate = server.finish().expect("finish");
        server_seconds += t.elapsed().as_secs_f64();
        let plain_upload: usize = values.values().map(|v| v.len() * 4).sum();
        let rank8_upload = layout.len(8) * 4;
        let upload_ratio = (plain_upload + overhead_bytes) as f64 / plain_upload as f64;
        println!(
            "{n:>6} {degree:>6} {threshold:>9} {plain_seconds:>14.4} {server_seconds:>16.3} {:>16.4} {upload_ratio:>12.4} {:>14}",
            client_seconds / n as f64,
            aggregate.dropped.len()
        );
        println!(
            "       rank-8 device: {} bytes of values, about {} bytes of protocol; error bound {:.2e}",
            rank8_upload,
            overhead_bytes / n,
            aggregate.error_bound
        );
    }
}
