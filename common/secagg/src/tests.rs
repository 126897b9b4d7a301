//! Whole rounds in process: mixed ranks, dropouts at every phase, tampering, and what the
//! coordinator can and cannot learn.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::client::ClientRound;
use crate::layout::Layout;
use crate::messages::{MaskedInput, UnmaskRequest};
use crate::quantize::Quantizer;
use crate::server::{Aggregate, ServerRound};
use crate::{Parameters, SecAggError};

const LAYOUT: Layout = Layout { shared: 5, per_slot: 7, max_rank: 8 };

fn parameters(threshold: usize, degree: usize) -> Parameters {
    Parameters { threshold, degree, range: 2.0, max_participants: 100 }
}

/// Who stops where: after advertising keys, after sharing them, after uploading.
#[derive(Default, Clone)]
struct Dropouts {
    after_keys: BTreeSet<u32>,
    after_shares: BTreeSet<u32>,
    after_upload: BTreeSet<u32>,
}

/// Random inputs for `ranks` (participant i has rank ranks[i]), shaped as a device packs them: a
/// weight w in (0, 1] at the end of the shared values and as each slot's coverage coordinate.
fn inputs(ranks: &[u32], seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    ranks
        .iter()
        .map(|&r| {
            let mut values: Vec<f32> = (0..LAYOUT.len(r)).map(|_| rng.random_range(-1.5f32..1.5)).collect();
            let weight = rng.random_range(0.05f32..=1.0);
            values[LAYOUT.shared - 1] = weight;
            for slot in 0..r as usize {
                values[LAYOUT.shared + slot * LAYOUT.per_slot] = weight;
            }
            values
        })
        .collect()
}

/// The plain per-coordinate sums over `who`.
fn plain_sums(values: &[Vec<f32>], who: &BTreeSet<u32>) -> Vec<f64> {
    let mut sums = vec![0.0; LAYOUT.full_len()];
    for &id in who {
        for (s, v) in sums.iter_mut().zip(&values[id as usize]) {
            *s += f64::from(*v);
        }
    }
    sums
}

fn run_round(
    parameters: Parameters,
    ranks: &[u32],
    values: &[Vec<f32>],
    drop: &Dropouts,
) -> Result<Aggregate, SecAggError> {
    let session = 7;
    let participants: BTreeMap<u32, u32> = ranks.iter().enumerate().map(|(i, &r)| (i as u32, r)).collect();
    let mut server = ServerRound::new(parameters, session, LAYOUT, participants.clone(), 42)?;
    let mut clients = BTreeMap::new();
    for (&id, &rank) in &participants {
        let (client, advert) = ClientRound::new(parameters, session, id, rank, LAYOUT)?;
        server.receive_keys(advert)?;
        clients.insert(id, client);
    }
    let sharing: Vec<u32> = participants.keys().copied().filter(|id| !drop.after_keys.contains(id)).collect();
    for &id in &sharing {
        let shares = clients.get_mut(&id).expect("a client").share_keys(&server.peers_for(id))?;
        server.receive_shares(id, shares)?;
    }
    for &id in &sharing {
        let routed = server.shares_for(id).to_vec();
        let errors = clients.get_mut(&id).expect("a client").receive_shares(&routed);
        assert!(errors.is_empty(), "{errors:?}");
    }
    let uploading: Vec<u32> = sharing.iter().copied().filter(|id| !drop.after_shares.contains(id)).collect();
    for &id in &uploading {
        let input = clients.get_mut(&id).expect("a client").masked_input(&values[id as usize])?;
        server.receive_masked(input)?;
    }
    let request = server.unmask_request();
    for &id in uploading.iter().filter(|id| !drop.after_upload.contains(id)) {
        server.receive_unmask(clients.remove(&id).expect("a client").unmask(&request)?)?;
    }
    server.finish()
}

/// The revealed sums match `want` over their length, which is the layout's length at the
/// revealed rank.
fn assert_sums(aggregate: &Aggregate, want: &[f64]) {
    assert_eq!(aggregate.sums.len(), LAYOUT.len(aggregate.revealed_rank));
    for (i, (got, want)) in aggregate.sums.iter().zip(want).enumerate() {
        assert!((got - want).abs() <= aggregate.error_bound + 1e-12, "coordinate {i}: {got} vs {want}");
    }
}

#[test]
fn mixed_ranks_give_the_per_coordinate_sums_of_the_holders() {
    let ranks = [2, 2, 4, 4, 8, 8, 1, 8, 4, 2];
    let values = inputs(&ranks, 1);
    let aggregate = run_round(parameters(3, 4), &ranks, &values, &Dropouts::default()).unwrap();
    let everyone: BTreeSet<u32> = (0..ranks.len() as u32).collect();
    assert_sums(&aggregate, &plain_sums(&values, &everyone));
    assert!(aggregate.error_bound < 1e-5, "{}", aggregate.error_bound);
    // Slots 0–3 have at least 4 holders (threshold 3 + 1); slots 4–7, which only the three
    // rank-8 devices hold, are not revealed at all.
    assert_eq!(aggregate.revealed_rank, 4);
    assert_eq!(aggregate.sums.len(), LAYOUT.len(4));
}

#[test]
fn a_slot_with_fewer_than_threshold_plus_one_holders_is_never_revealed() {
    // One device alone holds the top slots, two hold slot 3, three hold slot 2... Threshold 4 (of 6
    // neighbours): a revealed slot needs 5 holders.
    let ranks = [1, 1, 2, 2, 2, 4, 8];
    let values = inputs(&ranks, 4);
    let aggregate = run_round(parameters(4, 6), &ranks, &values, &Dropouts::default()).unwrap();
    // Slot 2 has 5 holders (three 2s, the 4 and the 8), slot 3 two: only slots 1 and 2 come out.
    assert_eq!(aggregate.revealed_rank, 2);
    let everyone: BTreeSet<u32> = (0..ranks.len() as u32).collect();
    assert_sums(&aggregate, &plain_sums(&values, &everyone));
    // A rank-2 device dropping after its keys thins slot 2 to four holders: only slot 1 is revealed.
    let drop = Dropouts { after_shares: [4].into(), ..Dropouts::default() };
    let aggregate = run_round(parameters(4, 6), &ranks, &values, &drop).unwrap();
    assert_eq!(aggregate.revealed_rank, 1);
    assert_eq!(aggregate.sums.len(), LAYOUT.len(1));
    let uploaded: BTreeSet<u32> = (0..ranks.len() as u32).filter(|&id| id != 4).collect();
    assert_sums(&aggregate, &plain_sums(&values, &uploaded));
    // Fewer than threshold + 1 survivors: nothing is revealed, not even the shared values (the
    // survivors refuse to unmask with fewer than the threshold of their neighbours left).
    let drop = Dropouts { after_shares: [2, 3, 4].into(), ..Dropouts::default() };
    let error = run_round(parameters(4, 6), &ranks, &values, &drop).unwrap_err();
    assert!(matches!(error, SecAggError::TooFewSurvivors { threshold: 4, .. }), "{error}");
}

#[test]
fn the_revealable_rank_is_the_rank_of_the_kth_highest_holder() {
    assert_eq!(LAYOUT.revealable_rank([2, 4, 8, 16], 3), 4);
    assert_eq!(LAYOUT.revealable_rank([2, 4, 8, 16], 1), 8, "ranks above R_max count as R_max");
    assert_eq!(LAYOUT.revealable_rank([2, 4], 3), 0);
    assert_eq!(LAYOUT.revealable_rank([8, 8, 8], 3), 8);
    assert_eq!(LAYOUT.rank_of_len(LAYOUT.len(3)), Some(3));
    assert_eq!(LAYOUT.rank_of_len(LAYOUT.len(3) + 1), None);
    assert_eq!(LAYOUT.rank_of_len(LAYOUT.shared - 1), None);
}

#[test]
fn dropouts_at_every_phase_are_recovered() {
    let ranks = [2, 4, 8, 8, 4, 2, 8, 4, 2, 8, 4, 2];
    let values = inputs(&ranks, 2);
    let drop = Dropouts { after_keys: [1].into(), after_shares: [3].into(), after_upload: [9].into() };
    // Degree 8 of 12, threshold 5 (above half of the 8 neighbours): three dropouts leave every
    // participant at least 5 holders of its shares.
    let aggregate = run_round(parameters(5, 8), &ranks, &values, &drop).unwrap();
    // The sum is over those who uploaded, the one that uploaded and then vanished included.
    let uploaded: BTreeSet<u32> = (0..12).filter(|id| ![1, 3].contains(id)).collect();
    assert_sums(&aggregate, &plain_sums(&values, &uploaded));
    assert_eq!(aggregate.dropped, vec![3]);
}

#[test]
fn fewer_survivors_than_the_threshold_discard_the_round() {
    let ranks = [2, 4, 8, 8, 4];
    let values = inputs(&ranks, 3);
    let drop = Dropouts { after_shares: [0, 1, 2].into(), ..Dropouts::default() };
    let error = run_round(parameters(3, 4), &ranks, &values, &drop).unwrap_err();
    assert!(matches!(error, SecAggError::TooFewSurvivors { threshold: 3, .. }), "{error}");
    // A participant itself refuses to reveal anything for fewer than the threshold of its own
    // neighbours; `unmask` consumes the round, so each request below needs a fresh participant.
    let ready = || {
        let (mut client, _) = ClientRound::new(parameters(3, 4), 1, 0, 2, LAYOUT).unwrap();
        let peers: Vec<crate::messages::Peer> = (1..4)
            .map(|id| {
                let (_, advert) = ClientRound::new(parameters(3, 4), 1, id, 2, LAYOUT).unwrap();
                crate::messages::Peer { id, rank: 2, encryption_key: advert.encryption_key, mask_key: advert.mask_key }
            })
            .collect();
        client.share_keys(&peers).unwrap();
        client.masked_input(&vec![0.0; LAYOUT.len(2)]).unwrap();
        client
    };
    let request = UnmaskRequest { session: 1, survivors: vec![0, 1], dropped: vec![2, 3] };
    assert!(matches!(ready().unmask(&request), Err(SecAggError::TooFewSurvivors { .. })));
    // Five survivors in all, but only one of its three neighbours among them.
    let strangers = UnmaskRequest { session: 1, survivors: vec![0, 1, 7, 8, 9], dropped: vec![2, 3] };
    assert!(matches!(ready().unmask(&strangers), Err(SecAggError::TooFewSurvivors { survivors: 1, threshold: 3 })));
    let both = UnmaskRequest { session: 1, survivors: vec![0, 1, 2], dropped: vec![2] };
    assert!(ready().unmask(&both).unwrap_err().to_string().contains("both survived and dropped"));
    let foreign = UnmaskRequest { session: 2, survivors: vec![0, 1, 2], dropped: vec![] };
    assert!(matches!(ready().unmask(&foreign), Err(SecAggError::WrongSession { expected: 1, got: 2 })));
    let fine = UnmaskRequest { session: 1, survivors: vec![0, 1, 2, 3], dropped: vec![] };
    assert!(ready().unmask(&fine).is_ok());
}

#[test]
fn a_threshold_of_half_the_neighbours_or_less_low_order_keys_and_non_finite_inputs_are_refused() {
    let (mut client, _) = ClientRound::new(parameters(2, 4), 1, 0, 2, LAYOUT).unwrap();
    let peers: Vec<crate::messages::Peer> = (1..5)
        .map(|id| {
            let (_, advert) = ClientRound::new(parameters(2, 4), 1, id, 2, LAYOUT).unwrap();
            crate::messages::Peer { id, rank: 2, encryption_key: advert.encryption_key, mask_key: advert.mask_key }
        })
        .collect();
    // Threshold 2 of 4 neighbours: two disjoint halves could each rebuild a secret.
    let error = client.share_keys(&peers).unwrap_err().to_string();
    assert!(error.contains("not above half"), "{error}");
    // A peer whose key has low order (here the identity, all zeros) is refused before anything is
    // shared with anyone.
    let mut weak = peers[..3].to_vec();
    weak[1].mask_key = [0; 32];
    let error = client.share_keys(&weak).unwrap_err().to_string();
    assert!(error.contains("low order"), "{error}");
    client.share_keys(&peers[..3]).unwrap();
    let mut values = vec![0.5; LAYOUT.len(2)];
    values[3] = f32::NAN;
    let error = client.masked_input(&values).unwrap_err().to_string();
    assert!(error.contains("value 3 of the input is NaN"), "{error}");
    values[3] = f32::INFINITY;
    assert!(client.masked_input(&values).is_err());
}

/// A round of participants at `ranks` through the keys phase, each participant's shares sent
/// to the coordinator (not yet received by their recipients).
fn shared_round(ranks: &[u32], parameters: Parameters) -> (ServerRound, BTreeMap<u32, ClientRound>) {
    let participants: BTreeMap<u32, u32> = ranks.iter().enumerate().map(|(i, &r)| (i as u32, r)).collect();
    let mut server = ServerRound::new(parameters, 3, LAYOUT, participants.clone(), 9).unwrap();
    let mut clients = BTreeMap::new();
    for (&id, &rank) in &participants {
        let (client, advert) = ClientRound::new(parameters, 3, id, rank, LAYOUT).unwrap();
        server.receive_keys(advert).unwrap();
        clients.insert(id, client);
    }
    for (&id, client) in clients.iter_mut() {
        let shares = client.share_keys(&server.peers_for(id)).unwrap();
        server.receive_shares(id, shares).unwrap();
    }
    (server, clients)
}

#[test]
fn a_mask_that_does_not_cancel_is_caught_and_the_round_discarded() {
    // A participant whose upload is masked with other keys than it shared (here: its words replaced
    // by noise, which is what such an upload looks like): the unmasked sums are noise over the
    // ring, far beyond what honest inputs can sum to.
    let ranks = [4, 4, 4, 4, 4];
    let values = inputs(&ranks, 6);
    let (mut server, mut clients) = shared_round(&ranks, parameters(3, 4));
    for id in 0..5u32 {
        assert!(clients.get_mut(&id).unwrap().receive_shares(server.shares_for(id)).is_empty());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for id in 0..5u32 {
        let mut input = clients.get_mut(&id).unwrap().masked_input(&values[id as usize]).unwrap();
        if id == 1 {
            input.values.iter_mut().for_each(|v| *v = rng.random());
        }
        server.receive_masked(input).unwrap();
    }
    let request = server.unmask_request();
    for id in 0..5u32 {
        server.receive_unmask(clients.remove(&id).unwrap().unmask(&request).unwrap()).unwrap();
    }
    let error = server.finish().unwrap_err();
    assert!(matches!(error, SecAggError::Inconsistent(_)), "{error}");
}

#[test]
fn a_single_masked_upload_is_indistinguishable_from_uniform_noise() {
    // Zeros, masked: what the coordinator receives from one device. Each byte of the words should
    // be uniform on 0..256: a chi-square test over 256 bins with 4 × 20,000 bytes. The masks come
    // from the OS's entropy, so the bound must hold for any honest draw: an honest draw exceeds 420
    // with probability about 4·10⁻¹⁰ (Wilson–Hilferty; the 99.9th percentile, 330, failed once in
    // the suite), and the plain quantized zeros would score about 20,000,000.
    let layout = Layout { shared: 20_000, per_slot: 1, max_rank: 1 };
    let parameters = parameters(2, 2);
    let participants: BTreeMap<u32, u32> = (0..3).map(|i| (i, 1)).collect();
    let mut server = ServerRound::new(parameters, 1, layout, participants.clone(), 5).unwrap();
    let mut clients = Vec::new();
    for &id in participants.keys() {
        let (client, advert) = ClientRound::new(parameters, 1, id, 1, layout).unwrap();
        server.receive_keys(advert).unwrap();
        clients.push(client);
    }
    for (id, client) in clients.iter_mut().enumerate() {
        let shares = client.share_keys(&server.peers_for(id as u32)).unwrap();
        server.receive_shares(id as u32, shares).unwrap();
    }
    for (id, client) in clients.iter_mut().enumerate() {
        assert!(client.receive_shares(server.shares_for(id as u32)).is_empty());
    }
    let MaskedInput { values, .. } = clients[0].masked_input(&vec![0.0; layout.len(1)]).unwrap();
    let mut counts = [0f64; 256];
    for word in &values {
        for byte in word.to_le_bytes() {
            counts[byte as usize] += 1.0;
        }
    }
    let expected = values.len() as f64 * 4.0 / 256.0;
    let chi_square: f64 = counts.iter().map(|c| (c - expected).powi(2) / expected).sum();
    assert!(chi_square < 420.0, "χ² = {chi_square}");
}

#[test]
fn garbage_shares_are_left_out_and_the_round_completes_with_enough_valid_ones() {
    let ranks = [4, 4, 4, 4, 4, 4];
    let values = inputs(&ranks, 4);
    let (mut server, mut clients) = shared_round(&ranks, parameters(3, 5));
    // A tampered ciphertext is refused by its recipient, naming the sender.
    let mut tampered = server.shares_for(0).to_vec();
    tampered[0].ciphertext[3] ^= 1;
    let sender = tampered[0].from;
    let errors = clients.get_mut(&0).unwrap().receive_shares(&tampered[..1]);
    assert!(matches!(&errors[..], [SecAggError::BadMessage { from, .. }] if *from == sender), "{errors:?}");
    for id in 0..6u32 {
        assert!(clients.get_mut(&id).unwrap().receive_shares(server.shares_for(id)).is_empty());
    }
    for id in 0..6u32 {
        let input = clients.get_mut(&id).unwrap().masked_input(&values[id as usize]).unwrap();
        server.receive_masked(input).unwrap();
    }
    let request = server.unmask_request();
    for id in 0..6u32 {
        let mut reply = clients.remove(&id).unwrap().unmask(&request).unwrap();
        if id == 2 {
            // A survivor that reveals garbage: its shares fail their commitments and are left out.
            for (_, share) in &mut reply.self_mask_shares {
                share.iter_mut().skip(1).for_each(|b| *b ^= 0x5a);
            }
        }
        server.receive_unmask(reply).unwrap();
    }
    let aggregate = server.finish().unwrap();
    let everyone: BTreeSet<u32> = (0..6).collect();
    assert_sums(&aggregate, &plain_sums(&values, &everyone));
}

#[test]
fn replayed_foreign_and_malformed_messages_are_refused() {
    let parameters = parameters(2, 2);
    let participants: BTreeMap<u32, u32> = (0..3).map(|i| (i, 2)).collect();
    let mut server = ServerRound::new(parameters, 5, LAYOUT, participants, 1).unwrap();
    let (mut client, advert) = ClientRound::new(parameters, 5, 0, 2, LAYOUT).unwrap();
    server.receive_keys(advert.clone()).unwrap();
    assert!(server.receive_keys(advert).unwrap_err().to_string().contains("twice"));
    let (_, old) = ClientRound::new(parameters, 4, 1, 2, LAYOUT).unwrap();
    assert!(matches!(server.receive_keys(old), Err(SecAggError::WrongSession { expected: 5, got: 4 })));
    let (_, stranger) = ClientRound::new(parameters, 5, 9, 2, LAYOUT).unwrap();
    assert!(matches!(server.receive_keys(stranger), Err(SecAggError::UnknownParticipant(9))));
    for id in 1..3 {
        let (_, advert) = ClientRound::new(parameters, 5, id, 2, LAYOUT).unwrap();
        server.receive_keys(advert).unwrap();
    }
    let shares = client.share_keys(&server.peers_for(0)).unwrap();
    assert!(server.receive_shares(0, shares[..1].to_vec()).unwrap_err().to_string().contains("expected one for each"));
    server.receive_shares(0, shares.clone()).unwrap();
    assert!(server.receive_shares(0, shares).is_err(), "shared twice");
    let short = MaskedInput { session: 5, from: 0, values: vec![0; 3] };
    assert!(server.receive_masked(short).unwrap_err().to_string().contains("values"));
    let early = MaskedInput { session: 5, from: 1, values: vec![0; LAYOUT.len(2)] };
    assert!(server.receive_masked(early).unwrap_err().to_string().contains("before sharing"));
    assert!(client.masked_input(&[0.0; 2]).unwrap_err().to_string().contains("values"));
    assert!(Parameters { threshold: 1, ..parameters }.validate().is_err());
    assert!(Parameters { threshold: 3, degree: 2, ..parameters }.validate().is_err());
    assert!(Parameters { range: 0.0, ..parameters }.validate().is_err());
}

#[test]
fn quantization_keeps_the_sum_of_the_most_participants_in_the_ring() {
    let parameters = Parameters { threshold: 2, degree: 2, range: 1.0, max_participants: 1000 };
    let q = Quantizer::new(&parameters);
    let all_max: u32 = (0..1000).fold(0u32, |s, _| s.wrapping_add(q.quantize(5.0)));
    assert!((q.dequantize(all_max) - 1000.0).abs() <= q.sum_error_bound(1000));
    let all_min: u32 = (0..1000).fold(0u32, |s, _| s.wrapping_add(q.quantize(-1.0)));
    assert!((q.dequantize(all_min) + 1000.0).abs() <= q.sum_error_bound(1000));
    assert!((q.dequantize(q.quantize(0.123_456)) - 0.123_456).abs() <= 0.5 / q.scale() + 1e-9);
    assert_eq!(q.quantize(f32::NAN), 0);
}

#[test]
fn the_graph_is_symmetric_with_the_degree_asked_for() {
    let ids: Vec<u32> = (0..50).collect();
    let graph = crate::graph::neighbours(&ids, 6, 3);
    for (id, near) in &graph {
        assert_eq!(near.len(), 6, "{id}");
        assert!(!near.contains(id));
        for other in near {
            assert!(graph[other].contains(id), "{id} – {other} is one-sided");
        }
    }
    assert_eq!(graph, crate::graph::neighbours(&ids, 6, 3));
    assert_ne!(graph, crate::graph::neighbours(&ids, 6, 4));
    let small = crate::graph::neighbours(&[1, 2, 3], 6, 3);
    assert_eq!(small[&1], vec![2, 3]);
}
