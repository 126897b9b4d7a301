//! Properties of every aggregation method (shared notes, aggregation.md), the worked example, and
//! randomized comparisons against plain reference implementations written here with `Vec<f64>`.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

use super::*;
use crate::adapter::{lora_a_name, lora_b_name, Adapter};
use crate::data::seeded_uniform;
use flotilla_merge::slots::Denominator;

/// (module, d_in, d_out)
const MODULES: [(&str, usize, usize); 2] = [("m.q", 5, 4), ("m.v", 5, 3)];
const HEAD: &str = "m.head.weight";
const R_MAX: usize = 8;

fn random_adapter(rank: usize, seed: u64) -> Adapter {
    let mut t = BTreeMap::new();
    for (i, (module, d_in, d_out)) in MODULES.iter().enumerate() {
        t.insert(lora_a_name(module), seeded_uniform(&[rank, *d_in], 1.0, seed * 31 + 2 * i as u64));
        t.insert(lora_b_name(module), seeded_uniform(&[*d_out, rank], 1.0, seed * 31 + 2 * i as u64 + 1));
    }
    t.insert(HEAD.into(), seeded_uniform(&[2, 4], 1.0, seed * 31 + 17));
    Adapter::new(t).unwrap()
}

struct Client {
    name: String,
    adapter: Adapter,
    n: u64,
    scale: f64,
}

fn client(rank: usize, n: u64, seed: u64) -> Client {
    Client { name: format!("client-{seed}"), adapter: random_adapter(rank, seed), n, scale: 1.0 }
}

fn update(c: &Client) -> ClientUpdate<'_> {
    ClientUpdate {
        client: &c.name,
        declared_rank: c.adapter.rank(),
        num_samples: c.n,
        scale: c.scale,
        adapter: &c.adapter,
    }
}

fn aggregate(method: Method, global: &Adapter, clients: &[&Client]) -> Adapter {
    let mut acc = method.start(global, 1.0).unwrap();
    for c in clients {
        acc.fold(&update(c)).unwrap();
    }
    acc.finish().unwrap().adapter
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn assert_close(got: &Adapter, want: &BTreeMap<String, Vec<f64>>, tol: f64) {
    assert_eq!(got.tensors().len(), want.len());
    for (name, w) in want {
        let g = values(got.get(name).unwrap_or_else(|| panic!("{name} missing")));
        assert_eq!(g.len(), w.len(), "{name}");
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{name}[{i}]: got {a}, want {b}");
        }
    }
}

fn as_map(adapter: &Adapter) -> BTreeMap<String, Vec<f64>> {
    adapter.tensors().iter().map(|(n, t)| (n.clone(), values(t))).collect()
}

// ---------- plain reference implementations ----------

/// Row-major dense `s·B·A` from plain vectors.
fn dense_product(a: &[f64], b: &[f64], rank: usize, d_in: usize, d_out: usize, factor: f64) -> Vec<f64> {
    let mut t = vec![0.0; d_out * d_in];
    for o in 0..d_out {
        for j in 0..d_in {
            t[o * d_in + j] = factor * (0..rank).map(|i| b[o * rank + i] * a[i * d_in + j]).sum::<f64>();
        }
    }
    t
}

/// The slot-wise methods written out: `weight(client, module)` and whether the denominator is the
/// slot's coverage (RBLA, FedAvg) or every client (zero-pad, HetLoRA).
fn reference_slotwise(global: &Adapter, clients: &[&Client], method: Method) -> BTreeMap<String, Vec<f64>> {
    let mut out = BTreeMap::new();
    for (module, d_in, d_out) in MODULES {
        let weights: Vec<f64> = clients
            .iter()
            .map(|c| match method {
                Method::HetLora => {
                    let (a, b) = c.adapter.factors(module);
                    let t = dense_product(&values(a), &values(b), c.adapter.rank(), d_in, d_out, c.scale);
                    t.iter().map(|x| x * x).sum::<f64>().sqrt()
                }
                _ => c.n as f64,
            })
            .collect();
        let total: f64 = weights.iter().sum();
        let (ga, gb) = global.factors(module);
        let (ga, gb) = (values(ga), values(gb));
        let mut a_out = vec![0.0; R_MAX * d_in];
        let mut b_out = vec![0.0; d_out * R_MAX];
        for slot in 0..R_MAX {
            let covering: Vec<usize> = (0..clients.len()).filter(|&k| clients[k].adapter.rank() > slot).collect();
            let covered: f64 = covering.iter().map(|&k| weights[k]).sum();
            let denominator = match method {
                Method::Rbla | Method::FedAvg => covered,
                // RBLA's mean times √q: divide by W_i / √(W_i / W).
                Method::RblaCoverage if covered > 0.0 => covered / (covered / total).sqrt(),
                Method::RblaCoverage => 0.0,
                _ => total,
            };
            // Fold-and-Fill: the clients that lack the slot count with the previous value.
            let filled = if method == Method::FoldAndFill { total - covered } else { 0.0 };
            for j in 0..d_in {
                a_out[slot * d_in + j] = if covering.is_empty() || denominator == 0.0 {
                    ga[slot * d_in + j]
                } else {
                    (covering
                        .iter()
                        .map(|&k| weights[k] * values(clients[k].adapter.factors(module).0)[slot * d_in + j])
                        .sum::<f64>()
                        + filled * ga[slot * d_in + j])
                        / denominator
                };
            }
            for o in 0..d_out {
                b_out[o * R_MAX + slot] = if covering.is_empty() || denominator == 0.0 {
                    gb[o * R_MAX + slot]
                } else {
                    (covering
                        .iter()
                        .map(|&k| {
                            let c = clients[k];
                            weights[k] * c.scale * values(c.adapter.factors(module).1)[o * c.adapter.rank() + slot]
                        })
                        .sum::<f64>()
                        + filled * gb[o * R_MAX + slot])
                        / denominator
                };
            }
        }
        out.insert(lora_a_name(module), a_out);
        out.insert(lora_b_name(module), b_out);
    }
    out.insert(HEAD.into(), reference_head(clients));
    out
}

fn reference_head(clients: &[&Client]) -> Vec<f64> {
    let total: f64 = clients.iter().map(|c| c.n as f64).sum();
    let mut head = vec![0.0; 8];
    for c in clients {
        for (h, v) in head.iter_mut().zip(values(c.adapter.get(HEAD).unwrap())) {
            *h += c.n as f64 * v / total;
        }
    }
    head
}

/// `T = Σ p_k·s_k·B_k·A_k` per module.
fn reference_dense(clients: &[&Client]) -> BTreeMap<&'static str, Vec<f64>> {
    let total: f64 = clients.iter().map(|c| c.n as f64).sum();
    MODULES
        .iter()
        .map(|&(module, d_in, d_out)| {
            let mut t = vec![0.0; d_out * d_in];
            for c in clients {
                let (a, b) = c.adapter.factors(module);
                let p =
                    dense_product(&values(a), &values(b), c.adapter.rank(), d_in, d_out, c.scale * c.n as f64 / total);
                for (x, y) in t.iter_mut().zip(p) {
                    *x += y;
                }
            }
            (module, t)
        })
        .collect()
}

fn product_of(adapter: &Adapter, module: &str, d_in: usize, d_out: usize) -> Vec<f64> {
    let (a, b) = adapter.factors(module);
    dense_product(&values(a), &values(b), adapter.rank(), d_in, d_out, 1.0)
}

// ---------- the worked example ----------

fn worked_example_client(c: f64, rank: i64, n: u64) -> Client {
    let a: Vec<f32> = (0..rank).flat_map(|i| (0..3).map(move |j| (c * (i as f64 + 1.0) + j as f64) as f32)).collect();
    let b: Vec<f32> = (0..2).flat_map(|o| (0..rank).map(move |i| (c * (o as f64 + 1.0) + i as f64) as f32)).collect();
    let mut t = BTreeMap::new();
    t.insert(lora_a_name("layer"), Tensor::from_slice(&a).reshape([rank, 3]));
    t.insert(lora_b_name("layer"), Tensor::from_slice(&b).reshape([2, rank]));
    Client { name: format!("rank-{rank}"), adapter: Adapter::new(t).unwrap(), n, scale: 1.0 }
}

fn worked_example() -> (Adapter, Vec<Client>) {
    let mut t = BTreeMap::new();
    t.insert(lora_a_name("layer"), Tensor::zeros([8, 3], (Kind::Float, Device::Cpu)));
    t.insert(lora_b_name("layer"), Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)));
    let clients = vec![
        worked_example_client(1.0, 2, 100),
        worked_example_client(2.0, 4, 200),
        worked_example_client(4.0, 8, 100),
    ];
    (Adapter::new(t).unwrap(), clients)
}

#[test]
fn worked_example_rbla() {
    let (global, clients) = worked_example();
    let out = aggregate(Method::Rbla, &global, &clients.iter().collect::<Vec<_>>());
    let want_a = vec![
        2.25,
        3.25,
        4.25,
        4.5,
        5.5,
        6.5,
        8.0,
        9.0,
        10.0,
        32.0 / 3.0,
        35.0 / 3.0,
        38.0 / 3.0,
        20.0,
        21.0,
        22.0,
        24.0,
        25.0,
        26.0,
        28.0,
        29.0,
        30.0,
        32.0,
        33.0,
        34.0,
    ];
    let want_b = vec![
        2.25,
        3.25,
        14.0 / 3.0,
        17.0 / 3.0,
        8.0,
        9.0,
        10.0,
        11.0,
        4.5,
        5.5,
        22.0 / 3.0,
        25.0 / 3.0,
        12.0,
        13.0,
        14.0,
        15.0,
    ];
    let want = BTreeMap::from([(lora_a_name("layer"), want_a), (lora_b_name("layer"), want_b)]);
    assert_close(&out, &want, 1e-6);
}

#[test]
fn worked_example_zero_padding() {
    let (global, clients) = worked_example();
    let out = aggregate(Method::ZeroPad, &global, &clients.iter().collect::<Vec<_>>());
    let want_a = vec![
        2.25, 3.25, 4.25, 4.5, 5.5, 6.5, 6.0, 6.75, 7.5, 8.0, 8.75, 9.5, 5.0, 5.25, 5.5, 6.0, 6.25, 6.5, 7.0, 7.25,
        7.5, 8.0, 8.25, 8.5,
    ];
    let want_b = vec![2.25, 3.25, 3.5, 4.25, 2.0, 2.25, 2.5, 2.75, 4.5, 5.5, 5.5, 6.25, 3.0, 3.25, 3.5, 3.75];
    let want = BTreeMap::from([(lora_a_name("layer"), want_a), (lora_b_name("layer"), want_b)]);
    assert_close(&out, &want, 1e-6);
}

#[test]
fn worked_example_dense_target_flora_and_flexlora() {
    let (global, clients) = worked_example();
    let refs: Vec<&Client> = clients.iter().collect();
    let want_t = [353.25, 376.0, 398.75, 518.0, 553.25, 588.5];
    let flora = aggregate(Method::Flora, &global, &refs);
    assert_eq!(flora.rank(), 14);
    let got = product_of(&flora, "layer", 3, 2);
    for (g, w) in got.iter().zip(want_t) {
        assert!((g - w).abs() < 1e-3, "flora: {got:?}");
    }
    // T is 2 × 3, so rank ≤ 2 ≤ R_max: FlexLoRA reconstructs it exactly.
    let flex = aggregate(Method::FlexLora, &global, &refs);
    assert_eq!(flex.rank(), 8);
    let got = product_of(&flex, "layer", 3, 2);
    for (g, w) in got.iter().zip(want_t) {
        assert!((g - w).abs() < 1e-3, "flexlora: {got:?}");
    }
}

// ---------- properties ----------

#[test]
fn equal_ranks_make_rbla_equal_fedavg() {
    let global = random_adapter(R_MAX, 1);
    let clients: Vec<Client> = (0..4).map(|k| client(R_MAX, 10 + 7 * k, 100 + k)).collect();
    let refs: Vec<&Client> = clients.iter().collect();
    let rbla = aggregate(Method::Rbla, &global, &refs);
    let fedavg = aggregate(Method::FedAvg, &global, &refs);
    for (name, t) in rbla.tensors() {
        assert!(t.equal(fedavg.get(name).unwrap()), "{name}");
    }
}

#[test]
fn fedavg_refuses_mixed_ranks_naming_the_client() {
    let global = random_adapter(R_MAX, 1);
    let small = client(2, 10, 5);
    let mut acc = Method::FedAvg.start(&global, 1.0).unwrap();
    let err = acc.fold(&update(&small)).unwrap_err().to_string();
    assert!(err.contains("client-5") && err.contains("rank"), "{err}");
}

#[test]
fn a_lone_max_rank_client_passes_its_tail_through_bit_identical() {
    let global = random_adapter(R_MAX, 1);
    let clients = [client(2, 30, 2), client(4, 50, 3), client(8, 70, 4)];
    let out = aggregate(Method::Rbla, &global, &clients.iter().collect::<Vec<_>>());
    for (module, _, _) in MODULES {
        let (a, b) = out.factors(module);
        let (ca, cb) = clients[2].adapter.factors(module);
        assert!(a.narrow(0, 4, 4).equal(&ca.narrow(0, 4, 4)), "{module} A tail");
        assert!(b.narrow(1, 4, 4).equal(&cb.narrow(1, 4, 4)), "{module} B tail");
    }
}

#[test]
fn fixed_point_rbla_keeps_the_global_and_zero_padding_scales_it_by_coverage() {
    let global = random_adapter(R_MAX, 9);
    let ranks_and_n = [(2usize, 100u64), (4, 200), (8, 100)];
    let clients: Vec<Client> = ranks_and_n
        .iter()
        .map(|&(r, n)| Client { name: format!("r{r}"), adapter: global.slice_to_rank(r).unwrap(), n, scale: 1.0 })
        .collect();
    let refs: Vec<&Client> = clients.iter().collect();
    let rbla = aggregate(Method::Rbla, &global, &refs);
    assert_close(&rbla, &as_map(&global), 1e-6);
    let zp = aggregate(Method::ZeroPad, &global, &refs);
    let q = [1.0, 1.0, 0.75, 0.75, 0.25, 0.25, 0.25, 0.25];
    for (module, _, _) in MODULES {
        let (ga, gb) = global.factors(module);
        let coverage = Tensor::from_slice(&q).to_kind(Kind::Float);
        let want_a = ga * coverage.unsqueeze(1);
        let want_b = gb * coverage.unsqueeze(0);
        let (a, b) = zp.factors(module);
        assert!(a.allclose(&want_a, 1e-6, 1e-6, false) && b.allclose(&want_b, 1e-6, 1e-6, false), "{module}");
    }
}

#[test]
fn scaling_sample_counts_or_permuting_clients_changes_nothing() {
    let global = random_adapter(R_MAX, 1);
    let clients = [client(2, 30, 2), client(8, 50, 3), client(4, 70, 4)];
    let scaled: Vec<Client> = clients
        .iter()
        .map(|c| Client { name: c.name.clone(), adapter: c.adapter.deep_copy(), n: c.n * 1000, scale: 1.0 })
        .collect();
    for method in [Method::Rbla, Method::ZeroPad, Method::HetLora, Method::FlexLora] {
        let base = aggregate(method, &global, &clients.iter().collect::<Vec<_>>());
        let permuted = aggregate(method, &global, &[&clients[2], &clients[0], &clients[1]]);
        let rescaled = aggregate(method, &global, &scaled.iter().collect::<Vec<_>>());
        assert_close(&permuted, &as_map(&base), 1e-5);
        assert_close(&rescaled, &as_map(&base), 1e-5);
    }
}

#[test]
fn per_slot_denominators_equal_the_coverage() {
    // Every client's A is all ones: RBLA gives 1 on every covered slot, zero-padding gives q_i.
    let ones = |rank: usize| {
        let mut t = BTreeMap::new();
        for (module, d_in, d_out) in MODULES {
            t.insert(lora_a_name(module), Tensor::ones([rank as i64, d_in as i64], (Kind::Float, Device::Cpu)));
            t.insert(lora_b_name(module), Tensor::ones([d_out as i64, rank as i64], (Kind::Float, Device::Cpu)));
        }
        t.insert(HEAD.into(), Tensor::ones([2, 4], (Kind::Float, Device::Cpu)));
        Adapter::new(t).unwrap()
    };
    let global = random_adapter(R_MAX, 1);
    let clients: Vec<Client> = [(2, 100), (4, 200), (8, 100)]
        .iter()
        .map(|&(r, n)| Client { name: format!("{r}"), adapter: ones(r), n, scale: 1.0 })
        .collect();
    let refs: Vec<&Client> = clients.iter().collect();
    let rbla = aggregate(Method::Rbla, &global, &refs);
    let zp = aggregate(Method::ZeroPad, &global, &refs);
    let q = [1.0, 1.0, 0.75, 0.75, 0.25, 0.25, 0.25, 0.25];
    for (module, _, _) in MODULES {
        let rows_rbla = values(&rbla.factors(module).0.mean_dim(1, false, Kind::Double));
        let rows_zp = values(&zp.factors(module).0.mean_dim(1, false, Kind::Double));
        for slot in 0..R_MAX {
            assert!((rows_rbla[slot] - 1.0).abs() < 1e-6);
            assert!((rows_zp[slot] - q[slot]).abs() < 1e-6, "slot {slot}: {} vs {}", rows_zp[slot], q[slot]);
        }
    }
}

#[test]
fn partial_participation_without_the_max_rank_client_keeps_the_tail() {
    let global = random_adapter(R_MAX, 4);
    let clients = [client(2, 30, 2), client(4, 50, 3)];
    for method in [Method::Rbla, Method::ZeroPad, Method::HetLora] {
        let out = aggregate(method, &global, &clients.iter().collect::<Vec<_>>());
        assert_eq!(out.rank(), R_MAX, "{method}");
        for (module, _, _) in MODULES {
            let (a, b) = out.factors(module);
            let (ga, gb) = global.factors(module);
            assert!(a.narrow(0, 4, 4).equal(&ga.narrow(0, 4, 4)), "{method} {module}");
            assert!(b.narrow(1, 4, 4).equal(&gb.narrow(1, 4, 4)), "{method} {module}");
            assert!(!a.narrow(0, 0, 4).equal(&ga.narrow(0, 0, 4)), "{method} {module}: head slots updated");
        }
    }
}

#[test]
fn flora_stacks_exactly_to_the_dense_target() {
    let global = random_adapter(R_MAX, 1);
    let clients = [client(2, 30, 2), client(8, 50, 3), client(4, 70, 4)];
    let refs: Vec<&Client> = clients.iter().collect();
    let out = aggregate(Method::Flora, &global, &refs);
    assert_eq!(out.rank(), 14);
    let dense = reference_dense(&refs);
    for (module, d_in, d_out) in MODULES {
        for (g, w) in product_of(&out, module, d_in, d_out).iter().zip(&dense[module]) {
            assert!((g - w).abs() < 1e-5 * (1.0 + w.abs()), "{module}");
        }
    }
}

fn aggregate_online(global: &Adapter, clients: &[&Client], round_seed: u64) -> Adapter {
    let mut acc = Method::Flora.start_online(global, 1.0, round_seed).unwrap();
    for c in clients {
        acc.fold(&update(c)).unwrap();
    }
    acc.finish().unwrap().adapter
}

fn merged_delta_values(adapter: &Adapter, module: &str) -> Vec<f64> {
    values(adapter.merged_delta(module).unwrap_or_else(|| panic!("{module}: no merged delta")))
}

#[test]
fn online_flora_merges_the_exact_target_and_restarts_the_factors() {
    let global = random_adapter(R_MAX, 1);
    let round_1 = [client(2, 30, 2), client(8, 50, 3), client(4, 70, 4)];
    let refs: Vec<&Client> = round_1.iter().collect();
    let out = aggregate_online(&global, &refs, 11);
    assert_eq!(out.rank(), R_MAX, "online FLoRA keeps R_max");
    let dense = reference_dense(&refs);
    for (module, d_in, _) in MODULES {
        for (g, w) in merged_delta_values(&out, module).iter().zip(&dense[module]) {
            assert!((g - w).abs() < 1e-5 * (1.0 + w.abs()), "{module}");
        }
        let (a, b) = out.factors(module);
        assert_eq!(b.abs().sum(Kind::Double).double_value(&[]), 0.0, "B restarts at zero");
        let bound = 1.0 / (d_in as f64).sqrt();
        assert!(values(a).iter().all(|v| v.abs() <= bound) && values(a).iter().any(|v| *v != 0.0));
    }
    assert_close_head(&out, &refs);
    // Fresh factors differ from round to round and are reproducible.
    let again = aggregate_online(&global, &refs, 11);
    let other_round = aggregate_online(&global, &refs, 12);
    assert_eq!(as_map(&again), as_map(&out));
    assert_ne!(values(other_round.factors("m.q").0), values(out.factors("m.q").0));

    // Round 2 folds into the merged delta; devices never send it, and one that does is refused.
    let round_2 = [client(4, 40, 5), client(2, 10, 6)];
    let refs_2: Vec<&Client> = round_2.iter().collect();
    let next = aggregate_online(&out, &refs_2, 12);
    let dense_2 = reference_dense(&refs_2);
    for (module, _, _) in MODULES {
        let want: Vec<f64> = dense[module].iter().zip(&dense_2[module]).map(|(x, y)| x + y).collect();
        for (g, w) in merged_delta_values(&next, module).iter().zip(&want) {
            assert!((g - w).abs() < 1e-5 * (1.0 + w.abs()), "{module}");
        }
    }
    let mut forged: BTreeMap<String, Tensor> =
        round_2[0].adapter.tensors().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    forged.insert(crate::adapter::merged_delta_name("m.q"), Tensor::zeros([4, 5], (Kind::Float, Device::Cpu)));
    let forged = Client { name: "forger".into(), adapter: Adapter::new(forged).unwrap(), n: 5, scale: 1.0 };
    let mut acc = Method::Flora.start_online(&out, 1.0, 13).unwrap();
    let error = acc.fold(&update(&forged)).unwrap_err().to_string();
    assert!(error.contains("forger") && error.contains("merged_delta"), "{error}");
    assert_eq!(acc.folded(), 0);

    // Other methods carry a merged delta over unchanged (a run that switches methods keeps it).
    let carried = aggregate(Method::Rbla, &out, &refs_2);
    assert_eq!(merged_delta_values(&carried, "m.v"), merged_delta_values(&out, "m.v"));
    // Slices carry it whole.
    assert_eq!(merged_delta_values(&out.slice_to_rank(2).unwrap(), "m.q"), merged_delta_values(&out, "m.q"));
}

#[test]
fn a_merged_delta_of_the_wrong_shape_or_without_factors_is_refused() {
    let mut t: BTreeMap<String, Tensor> =
        random_adapter(2, 1).tensors().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
    t.insert(crate::adapter::merged_delta_name("m.q"), Tensor::zeros([5, 4], (Kind::Float, Device::Cpu)));
    assert!(Adapter::new(t).unwrap_err().to_string().contains("expected [4, 5]"));
    let mut t = BTreeMap::new();
    t.insert(crate::adapter::merged_delta_name("m.x"), Tensor::zeros([4, 5], (Kind::Float, Device::Cpu)));
    assert!(Adapter::new(t).unwrap_err().to_string().contains("lora_A and lora_B"));
}

#[test]
fn flexlora_is_exact_when_the_rank_suffices_and_eckart_young_otherwise() {
    // d_out ≤ 4 here, so rank(T) ≤ 4 ≤ R_max = 8: exact.
    let global = random_adapter(R_MAX, 1);
    let clients = [client(2, 30, 2), client(8, 50, 3), client(4, 70, 4)];
    let refs: Vec<&Client> = clients.iter().collect();
    let out = aggregate(Method::FlexLora, &global, &refs);
    let dense = reference_dense(&refs);
    for (module, d_in, d_out) in MODULES {
        for (g, w) in product_of(&out, module, d_in, d_out).iter().zip(&dense[module]) {
            assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{module}");
        }
    }
    // A rank-2 client receives the top two components; its error is the tail of the spectrum.
    let slice = out.slice_to_rank(2).unwrap();
    for (module, d_in, d_out) in MODULES {
        let t = Tensor::from_slice(&dense[module]).reshape([d_out as i64, d_in as i64]);
        let sigma = values(&singular_values(&t).unwrap());
        let want = sigma[2..].iter().map(|s| s * s).sum::<f64>().sqrt();
        let got: f64 = product_of(&slice, module, d_in, d_out)
            .iter()
            .zip(&dense[module])
            .map(|(g, w)| (g - w) * (g - w))
            .sum::<f64>()
            .sqrt();
        assert!((got - want).abs() < 1e-4 * (1.0 + want), "{module}: error {got}, Eckart–Young {want}");
    }
}

#[test]
fn randomized_svd_matches_the_exact_one_on_a_low_rank_layer() {
    // A 1100 × 1100 layer of rank 12 is above EXACT_SVD_MAX_DIM; 8 components of it are recovered.
    let b = seeded_uniform(&[1100, 12], 1.0, 1).to_kind(Kind::Double);
    let a = seeded_uniform(&[12, 1100], 1.0, 2).to_kind(Kind::Double);
    let t = b.matmul(&a);
    let (u, s, vh, exact) = top_components(&t, 8, 3).unwrap();
    assert!(!exact);
    let exact_s = singular_values(&t).unwrap().narrow(0, 0, 8);
    assert!(s.allclose(&exact_s, 1e-6, 1e-6, false));
    assert_eq!((u.size(), vh.size()), (vec![1100, 8], vec![8, 1100]));
}

#[test]
fn different_client_scales_are_folded_into_b() {
    // A client whose factors use scale 2 contributes B·2 in a global of scale 1.
    let global = random_adapter(R_MAX, 1);
    let mut c = client(R_MAX, 10, 2);
    c.scale = 2.0;
    let out = aggregate(Method::Rbla, &global, &[&c]);
    let (_, b) = out.factors("m.q");
    let (_, cb) = c.adapter.factors("m.q");
    assert!(b.allclose(&(cb * 2.0), 1e-6, 1e-6, false));
}

#[test]
fn product_methods_reproduce_the_target_at_a_global_scale_other_than_one() {
    // Every client and the global use s = 2: s·B·A of the result must be T = Σ p_k·s·B_k·A_k.
    let global = random_adapter(R_MAX, 1);
    let mut clients = [client(2, 30, 2), client(8, 50, 3), client(4, 70, 4)];
    for c in clients.iter_mut() {
        c.scale = 2.0;
    }
    let refs: Vec<&Client> = clients.iter().collect();
    let dense = reference_dense(&refs);
    let mut flexlora = Method::FlexLora.start(&global, 2.0).unwrap();
    let mut online_flora = Method::Flora.start_online(&global, 2.0, 1).unwrap();
    for c in &refs {
        flexlora.fold(&update(c)).unwrap();
        online_flora.fold(&update(c)).unwrap();
    }
    let (flexlora, online_flora) = (flexlora.finish().unwrap().adapter, online_flora.finish().unwrap().adapter);
    for (module, d_in, d_out) in MODULES {
        for (g, w) in product_of(&flexlora, module, d_in, d_out).iter().zip(&dense[module]) {
            assert!((2.0 * g - w).abs() < 1e-4 * (1.0 + w.abs()), "flexlora {module}: s·B·A {} vs T {w}", 2.0 * g);
        }
        for (g, w) in merged_delta_values(&online_flora, module).iter().zip(&dense[module]) {
            assert!((g - w).abs() < 1e-5 * (1.0 + w.abs()), "online flora {module}: ΔW {g} vs T {w}");
        }
    }
}

#[test]
fn invalid_updates_are_rejected_naming_client_and_tensor_and_change_nothing() {
    let global = random_adapter(R_MAX, 1);
    let good = client(4, 10, 2);
    let reference = aggregate(Method::Rbla, &global, &[&good]);

    let with = |f: &dyn Fn(&mut BTreeMap<String, Tensor>)| {
        let mut t: BTreeMap<String, Tensor> =
            good.adapter.tensors().iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        f(&mut t);
        Adapter::new(t)
    };
    let nan = with(&|t| {
        let _ = t.get_mut(HEAD).unwrap().get(0).get(0).fill_(f64::NAN);
    })
    .unwrap();
    let unknown = with(&|t| {
        t.insert("m.extra.weight".into(), Tensor::zeros([1], (Kind::Float, Device::Cpu)));
    })
    .unwrap();
    let missing = with(&|t| {
        t.remove(HEAD);
    })
    .unwrap();
    let wrong_width = with(&|t| {
        t.insert(lora_a_name("m.q"), Tensor::zeros([4, 6], (Kind::Float, Device::Cpu)));
    })
    .unwrap();
    let too_big = random_adapter(16, 3);
    let cases: Vec<(&str, ClientUpdate, &str)> = vec![
        ("nan", ClientUpdate { client: "c-nan", declared_rank: 4, num_samples: 5, scale: 1.0, adapter: &nan }, HEAD),
        (
            "unknown",
            ClientUpdate { client: "c-unknown", declared_rank: 4, num_samples: 5, scale: 1.0, adapter: &unknown },
            "m.extra.weight",
        ),
        (
            "missing",
            ClientUpdate { client: "c-missing", declared_rank: 4, num_samples: 5, scale: 1.0, adapter: &missing },
            HEAD,
        ),
        (
            "width",
            ClientUpdate { client: "c-width", declared_rank: 4, num_samples: 5, scale: 1.0, adapter: &wrong_width },
            "m.q.lora_A",
        ),
        (
            "lying rank",
            ClientUpdate { client: "c-liar", declared_rank: 2, num_samples: 5, scale: 1.0, adapter: &good.adapter },
            "lora_",
        ),
        (
            "above R_max",
            ClientUpdate { client: "c-big", declared_rank: 16, num_samples: 5, scale: 1.0, adapter: &too_big },
            "R_max",
        ),
        (
            "zero samples",
            ClientUpdate { client: "c-zero", declared_rank: 4, num_samples: 0, scale: 1.0, adapter: &good.adapter },
            "sample",
        ),
    ];
    for method in Method::ALL {
        let mut acc = method.start(&global, 1.0).unwrap();
        for (what, bad, mentions) in &cases {
            let err = acc.fold(bad).expect_err(what).to_string();
            // FedAvg refuses any rank but R_max before looking at tensors.
            let names_tensor = method == Method::FedAvg || err.contains(mentions);
            assert!(err.contains(bad.client) && names_tensor, "{method} {what}: {err}");
        }
        assert_eq!(acc.folded(), 0, "{method}");
        if method == Method::Rbla {
            acc.fold(&update(&good)).unwrap();
            let out = acc.finish().unwrap().adapter;
            for (name, t) in out.tensors() {
                assert!(t.equal(reference.get(name).unwrap()), "{name}");
            }
        }
    }
}

#[test]
fn method_names_round_trip_and_unknown_names_list_the_known_ones() {
    for m in Method::ALL {
        assert_eq!(m.name().parse::<Method>().unwrap(), m);
    }
    let err = "fedprox".parse::<Method>().unwrap_err();
    assert!(err.contains("rbla") && err.contains("flexlora"), "{err}");
}

// ---------- randomized: streaming in any order equals the plain reference ----------

fn fleet() -> impl Strategy<Value = (Vec<(usize, u64)>, u64, Vec<usize>)> {
    let member = (prop::sample::select(vec![1usize, 2, 4, 8]), 1u64..1000);
    (prop::collection::vec(member, 1..6), any::<u64>()).prop_flat_map(|(members, seed)| {
        let order: Vec<usize> = (0..members.len()).collect();
        (Just(members), Just(seed), Just(order).prop_shuffle())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn streaming_in_any_order_equals_the_reference((members, seed, order) in fleet()) {
        let global = random_adapter(R_MAX, seed % 1000);
        let clients: Vec<Client> = members
            .iter()
            .enumerate()
            .map(|(k, &(rank, n))| client(rank, n, seed % 997 + 1 + k as u64))
            .collect();
        let in_order: Vec<&Client> = clients.iter().collect();
        let shuffled: Vec<&Client> = order.iter().map(|&k| &clients[k]).collect();
        for method in [Method::Rbla, Method::ZeroPad, Method::HetLora, Method::FoldAndFill, Method::RblaCoverage] {
            let want = reference_slotwise(&global, &in_order, method);
            assert_close(&aggregate(method, &global, &in_order), &want, 1e-5);
            assert_close(&aggregate(method, &global, &shuffled), &want, 1e-5);
        }
        let dense = reference_dense(&in_order);
        for (module, _, _) in MODULES {
            let online = aggregate_online(&global, &shuffled, seed);
            for (g, w) in merged_delta_values(&online, module).iter().zip(&dense[module]) {
                prop_assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "online flora {}: {} vs {}", module, g, w);
            }
        }
        for method in [Method::Flora, Method::FlexLora] {
            let out = aggregate(method, &global, &shuffled);
            for (module, d_in, d_out) in MODULES {
                for (g, w) in product_of(&out, module, d_in, d_out).iter().zip(&dense[module]) {
                    prop_assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{} {}: {} vs {}", method, module, g, w);
                }
            }
            assert_close_head(&out, &in_order);
        }
    }
}

fn assert_close_head(out: &Adapter, clients: &[&Client]) {
    for (g, w) in values(out.get(HEAD).unwrap()).iter().zip(reference_head(clients)) {
        assert!((g - w).abs() < 1e-5 * (1.0 + w.abs()));
    }
}

// ---------- folding queued updates together equals folding them one by one ----------

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn a_batch_folds_exactly_as_one_by_one_and_rejects_only_its_bad_updates(
        (members, seed, order) in fleet(),
        bad_at in 0usize..6,
    ) {
        let global = random_adapter(R_MAX, seed % 1000);
        let mut clients: Vec<Client> = order
            .iter()
            .map(|&k| client(members[k].0, members[k].1, seed % 997 + 1 + k as u64))
            .collect();
        // A rank above R_max, somewhere in the batch: rejected, and nothing of it folded.
        let bad = Client { name: "too-big".into(), adapter: random_adapter(R_MAX * 2, seed % 991), n: 5, scale: 1.0 };
        let bad_at = bad_at.min(clients.len());
        clients.insert(bad_at, bad);
        let updates: Vec<ClientUpdate<'_>> = clients.iter().map(update).collect();
        for method in Method::ALL {
            let mut one_by_one = method.start(&global, 1.0).unwrap();
            let singles: Vec<bool> = updates.iter().map(|u| one_by_one.fold(u).is_ok()).collect();
            let mut together = method.start(&global, 1.0).unwrap();
            let batch: Vec<bool> = together.fold_batch(&updates).iter().map(Result::is_ok).collect();
            prop_assert_eq!(&batch, &singles, "{}: the same updates accepted", method);
            prop_assert!(!batch[bad_at], "{}: the bad update is rejected", method);
            prop_assert_eq!(together.folded(), one_by_one.folded());
            if one_by_one.folded() == 0 {
                continue;
            }
            let (a, b) = (one_by_one.finish().unwrap().adapter, together.finish().unwrap().adapter);
            for (name, t) in a.tensors() {
                prop_assert!(t.equal(&b.tensors()[name]), "{} {}: not bit-identical", method, name);
            }
        }
    }
}

// ---------- Fold-and-Fill ----------

/// `client`'s adapter at R_max: its own slots, then the global adapter's from its rank on.
fn filled_from(global: &Adapter, client: &Client) -> Adapter {
    let r = client.adapter.rank();
    let mut tensors = BTreeMap::new();
    for (module, _, _) in MODULES {
        let (a, b) = client.adapter.factors(module);
        let (ga, gb) = global.factors(module);
        let tail = (R_MAX - r) as i64;
        tensors.insert(lora_a_name(module), Tensor::cat(&[a.shallow_clone(), ga.narrow(0, r as i64, tail)], 0));
        tensors.insert(lora_b_name(module), Tensor::cat(&[b.shallow_clone(), gb.narrow(1, r as i64, tail)], 1));
    }
    tensors.insert(HEAD.into(), client.adapter.get(HEAD).unwrap().shallow_clone());
    Adapter::new(tensors).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Fold-and-Fill equals FedAvg of full adapters in which each device froze the slots above
    /// its rank at the global values, in any order.
    #[test]
    fn fold_and_fill_is_fedavg_of_updates_filled_from_the_global((members, seed, order) in fleet()) {
        let global = random_adapter(R_MAX, seed % 1000);
        let clients: Vec<Client> = members
            .iter()
            .enumerate()
            .map(|(k, &(rank, n))| client(rank, n, seed % 997 + 1 + k as u64))
            .collect();
        let shuffled: Vec<&Client> = order.iter().map(|&k| &clients[k]).collect();
        let filled: Vec<Client> = clients
            .iter()
            .map(|c| Client { name: c.name.clone(), adapter: filled_from(&global, c), n: c.n, scale: 1.0 })
            .collect();
        let want = aggregate(Method::FedAvg, &global, &filled.iter().collect::<Vec<_>>());
        let got = aggregate(Method::FoldAndFill, &global, &shuffled);
        for (name, t) in want.tensors() {
            let difference = (t - &got.tensors()[name]).abs().max().double_value(&[]);
            prop_assert!(difference < 1e-5, "{}: {}", name, difference);
        }
    }

    /// Devices that send back what they received leave the global adapter where it was.
    #[test]
    fn fold_and_fill_has_the_global_as_fixed_point((members, seed, _order) in fleet()) {
        let global = random_adapter(R_MAX, seed % 1000);
        let clients: Vec<Client> = members
            .iter()
            .enumerate()
            .map(|(k, &(rank, n))| Client {
                name: format!("c{k}"),
                adapter: global.slice_to_rank(rank).unwrap(),
                n,
                scale: 1.0,
            })
            .collect();
        let got = aggregate(Method::FoldAndFill, &global, &clients.iter().collect::<Vec<_>>());
        for (name, t) in global.tensors() {
            let difference = (t - &got.tensors()[name]).abs().max().double_value(&[]);
            prop_assert!(difference < 1e-6, "{}: moved by {}", name, difference);
        }
    }

    /// A slot only one device covers moves by that device's share of the round, p·(x − g), not
    /// all the way to its values (as under RBLA).
    #[test]
    fn a_lone_supporter_moves_its_slots_by_its_share(n_lone in 1u64..1000, n_rest in 1u64..1000, seed in 0u64..500) {
        let global = random_adapter(R_MAX, seed);
        let lone = client(R_MAX, n_lone, seed + 1);
        let others = [client(2, n_rest, seed + 2), client(2, n_rest, seed + 3)];
        let got = aggregate(Method::FoldAndFill, &global, &[&lone, &others[0], &others[1]]);
        let p = n_lone as f64 / (n_lone + 2 * n_rest) as f64;
        for (module, d_in, _) in MODULES {
            let (x, g, out) = (
                values(lone.adapter.factors(module).0),
                values(global.factors(module).0),
                values(got.factors(module).0),
            );
            for j in 2 * d_in..R_MAX * d_in {
                let want = g[j] + p * (x[j] - g[j]);
                prop_assert!((out[j] - want).abs() < 1e-5 * (1.0 + want.abs()), "{} [{}]: {} vs {}", module, j, out[j], want);
            }
        }
    }
}

// ---------- differential privacy (private.rs) ----------

/// `global` moved by a random change of L2 norm `norm`, sliced to `rank`.
fn changed_slice(global: &Adapter, rank: usize, norm: f64, seed: u64) -> Adapter {
    let slice = global.slice_to_rank(rank).unwrap();
    let change = random_adapter(rank, seed);
    let raw = change.change_norm(&zeroed(&change)).unwrap();
    let tensors = slice.tensors().iter().map(|(n, t)| (n.clone(), t + change.get(n).unwrap() * (norm / raw))).collect();
    Adapter::new(tensors).unwrap()
}

fn zeroed(adapter: &Adapter) -> Adapter {
    Adapter::new(adapter.tensors().iter().map(|(n, t)| (n.clone(), t.zeros_like())).collect()).unwrap()
}

fn population(ranks: &[u32]) -> BTreeMap<u32, usize> {
    let mut p = BTreeMap::new();
    for &r in ranks {
        *p.entry(r).or_default() += 1;
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Clipping bounds the change, keeps its direction, and leaves a change within the bound alone.
    #[test]
    fn clipping_bounds_each_change_and_keeps_its_direction(
        rank in 1usize..=R_MAX, seed in 0u64..1000, scale in 0.001f64..50.0, bound in 0.01f64..5.0,
    ) {
        let reference = random_adapter(R_MAX, seed + 5000);
        let trained = changed_slice(&reference, rank, scale, seed);
        let before = trained.change_norm(&reference).unwrap();
        prop_assert!((before - scale).abs() <= 1e-4 * scale.max(1.0));
        let mut clipped = trained.deep_copy();
        let reported = clipped.clip_change(&reference, bound).unwrap();
        prop_assert!((reported - before).abs() <= 1e-9 * before.max(1.0));
        let after = clipped.change_norm(&reference).unwrap();
        prop_assert!(after <= bound * (1.0 + 1e-5), "{after} > {bound}");
        let factor = (bound / before).min(1.0);
        let slice = reference.slice_to_rank(rank).unwrap();
        for (name, t) in clipped.tensors() {
            let want = slice.get(name).unwrap() + (trained.get(name).unwrap() - slice.get(name).unwrap()) * factor;
            let diff = (t - want).abs().max().double_value(&[]);
            prop_assert!(diff < 1e-5, "{name}: {diff}");
        }
    }
}

#[test]
fn without_noise_and_with_everyone_private_sums_are_the_plain_methods_with_equal_weights() {
    let global = random_adapter(R_MAX, 900);
    let ranks = [2usize, 4, 4, 8];
    let clients: Vec<Client> = ranks
        .iter()
        .enumerate()
        .map(|(i, &r)| Client {
            name: format!("c{i}"),
            adapter: changed_slice(&global, r, 0.7, 40 + i as u64),
            n: 10,
            scale: 1.0,
        })
        .collect();
    let parameters = PrivacyParameters { clip_norm: 1.0, noise_multiplier: 1e-12, trainable: Trainable::Lora };
    let people = population(&ranks.map(|r| r as u32));
    for method in [Method::Rbla, Method::FoldAndFill] {
        let mut private = PrivateSums::new(&global, method, 1.0, parameters).unwrap();
        for c in &clients {
            private.fold(&update(c)).unwrap();
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let got = private.finish(&people, 1.0, &mut rng).unwrap().adapter;
        let want = aggregate(method, &global, &clients.iter().collect::<Vec<_>>());
        assert_close(&got, &as_map(&want), 1e-5);
    }
    for method in [Method::ZeroPad, Method::HetLora, Method::FlexLora, Method::Flora, Method::RblaCoverage] {
        assert!(PrivateSums::new(&global, method, 1.0, parameters).is_err(), "{method}");
        assert!(why_not_private(method).is_some());
    }
}

/// A device's rank-`rank` update under `trainable = "b_only"`: the global's slice with its B
/// factors and head changed (norm `norm` in all), every A exactly the global's.
fn changed_b_only(global: &Adapter, rank: usize, norm: f64, seed: u64) -> Adapter {
    let slice = global.slice_to_rank(rank).unwrap();
    let change = random_adapter(rank, seed);
    let frozen = |name: &str| matches!(crate::adapter::tensor_role(name), crate::adapter::TensorRole::LoraA(_));
    let moved: BTreeMap<String, Tensor> = change
        .tensors()
        .iter()
        .map(|(n, t)| (n.clone(), if frozen(n) { t.zeros_like() } else { t.shallow_clone() }))
        .collect();
    let moved = Adapter::new(moved).unwrap();
    let raw = moved.change_norm(&zeroed(&moved)).unwrap();
    let tensors = slice.tensors().iter().map(|(n, t)| (n.clone(), t + moved.get(n).unwrap() * (norm / raw))).collect();
    Adapter::new(tensors).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Under `b_only` the A factors of the next global are the global's, bit for bit, and the
    /// merged change of each module's product is exactly the devices' product changes summed over
    /// each slot's divisor (Fold-and-Fill: the round's devices, so the average of the devices'
    /// product changes; RBLA: each slot's holders).
    #[test]
    fn b_only_keeps_every_a_and_merges_the_products_exactly(
        ranks in proptest::collection::vec(1usize..=R_MAX, 2..6),
        seed in 0u64..1000,
    ) {
        let global = random_adapter(R_MAX, 910 + seed);
        let clients: Vec<Client> = ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| Client {
                name: format!("c{i}"),
                adapter: changed_b_only(&global, r, 0.6, seed * 7 + i as u64),
                n: 3,
                scale: 1.0,
            })
            .collect();
        let parameters = PrivacyParameters { clip_norm: 1.0, noise_multiplier: 1e-12, trainable: Trainable::BOnly };
        let ranks_u32: Vec<u32> = ranks.iter().map(|&r| r as u32).collect();
        for method in [Method::FoldAndFill, Method::Rbla] {
            let mut private = PrivateSums::new(&global, method, 1.0, parameters).unwrap();
            for c in &clients {
                private.fold(&update(c)).unwrap();
            }
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let next = private.finish(&population(&ranks_u32), 1.0, &mut rng).unwrap().adapter;
            for (module, _, _) in MODULES {
                let (a, b) = next.factors(module);
                let (ga, gb) = global.factors(module);
                prop_assert!(a.equal(ga), "{method}: {module}'s A moved");
                let merged = (b - gb).to_kind(Kind::Double).matmul(&ga.to_kind(Kind::Double));
                let mut want = merged.zeros_like();
                for slot in 0..R_MAX as i64 {
                    let holders: Vec<&Client> = clients.iter().filter(|c| c.adapter.rank() as i64 > slot).collect();
                    let divisor = match method {
                        Method::FoldAndFill => clients.len(),
                        _ => holders.len(),
                    };
                    if holders.is_empty() {
                        continue;
                    }
                    for c in holders {
                        let (ca, cb) = c.adapter.factors(module);
                        prop_assert!(ca.equal(&ga.narrow(0, 0, ca.size()[0])));
                        let db = (cb.narrow(1, slot, 1) - gb.narrow(1, slot, 1)).to_kind(Kind::Double);
                        want += db.matmul(&ga.narrow(0, slot, 1).to_kind(Kind::Double)) / divisor as f64;
                    }
                }
                let error = (merged - want).abs().max().double_value(&[]);
                prop_assert!(error < 1e-5, "{method}: {module}: {error}");
            }
        }
    }
}

#[test]
fn under_b_only_a_changed_a_is_refused_and_the_noise_skips_every_a() {
    let global = random_adapter(R_MAX, 920);
    let parameters = PrivacyParameters { clip_norm: 1.0, noise_multiplier: 1e-12, trainable: Trainable::BOnly };
    let mut private = PrivateSums::new(&global, Method::FoldAndFill, 1.0, parameters).unwrap();
    let moved = Client { name: "moved".into(), adapter: changed_slice(&global, 4, 0.5, 4), n: 3, scale: 1.0 };
    let error = private.fold(&update(&moved)).unwrap_err().to_string();
    assert!(error.contains("moved") && error.contains("b_only"), "{error}");
    assert_eq!(private.folded(), 0);
    let a_coordinates: usize = MODULES.iter().map(|(_, d_in, _)| R_MAX * d_in).sum();
    let all = noised_coordinates(&global, Trainable::Lora);
    assert_eq!(noised_coordinates(&global, Trainable::BOnly), all - a_coordinates);
    // Real noise: every B and the head move, no A does.
    let noisy = PrivacyParameters { noise_multiplier: 2.0, ..parameters };
    let private = PrivateSums::new(&global, Method::FoldAndFill, 1.0, noisy).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let next = private.finish(&population(&[4, 8]), 1.0, &mut rng).unwrap().adapter;
    for (module, _, _) in MODULES {
        let (a, b) = next.factors(module);
        let (ga, gb) = global.factors(module);
        assert!(a.equal(ga) && !b.equal(gb), "{module}");
    }
}

#[test]
fn an_update_beyond_the_clipping_bound_is_refused_and_leaves_the_sums_alone() {
    let global = random_adapter(R_MAX, 901);
    let parameters = PrivacyParameters { clip_norm: 0.5, noise_multiplier: 1e-12, trainable: Trainable::Lora };
    let mut private = PrivateSums::new(&global, Method::Rbla, 1.0, parameters).unwrap();
    let far = Client { name: "far".into(), adapter: changed_slice(&global, 4, 0.6, 3), n: 5, scale: 1.0 };
    let error = private.fold(&update(&far)).unwrap_err().to_string();
    assert!(error.contains("far") && error.contains("clipping bound 0.5"), "{error}");
    let other_scale = Client { name: "s".into(), adapter: changed_slice(&global, 4, 0.1, 3), n: 5, scale: 2.0 };
    assert!(private.fold(&update(&other_scale)).unwrap_err().to_string().contains("LoRA scale"));
    assert_eq!(private.folded(), 0);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let next = private.finish(&population(&[4]), 1.0, &mut rng).unwrap().adapter;
    // Nothing folded, noise ~1e-12: the global back; slots 4.. no population device covers are untouched exactly.
    assert_close(&next, &as_map(&global), 1e-9);
    for (module, _, _) in MODULES {
        let (a, _) = next.factors(module);
        let (ga, _) = global.factors(module);
        assert!(a.narrow(0, 4, 4).equal(&ga.narrow(0, 4, 4)));
    }
}

/// The noise on each slot has standard deviation σ·C / (q·M_i): with no update folded, the new
/// global minus the old is the noise alone. The draws are standardized by the slot's expected sd and
/// pooled per denominator class over 200 rounds.
#[test]
fn the_noise_has_the_calibrated_scale_per_slot() {
    let global = random_adapter(R_MAX, 902);
    let parameters = PrivacyParameters { clip_norm: 0.8, noise_multiplier: 1.5, trainable: Trainable::Lora };
    let people = population(&[2, 2, 4, 4, 8, 8]);
    let q = 0.5;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    // Standardized noise per slot class: slots 0-1 (M = 6), 2-3 (M = 4), 4-7 (M = 2), head (M = 6).
    let mut standardized: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..200 {
        let private = PrivateSums::new(&global, Method::Rbla, 1.0, parameters).unwrap();
        let next = private.finish(&people, q, &mut rng).unwrap().adapter;
        for (module, _, _) in MODULES {
            let (a, b) = next.factors(module);
            let (ga, gb) = global.factors(module);
            for slot in 0..R_MAX as i64 {
                let m = match slot {
                    0..=1 => 6.0,
                    2..=3 => 4.0,
                    _ => 2.0,
                };
                let sd = 1.5 * 0.8 / (q * m);
                let class = match slot {
                    0..=1 => "slots 0-1",
                    2..=3 => "slots 2-3",
                    _ => "slots 4-7",
                };
                let da = values(&(a.narrow(0, slot, 1) - ga.narrow(0, slot, 1)));
                let db = values(&(b.narrow(1, slot, 1) - gb.narrow(1, slot, 1)));
                standardized.entry(class).or_default().extend(da.iter().chain(&db).map(|v| v / sd));
            }
        }
        let head = values(&(next.get(HEAD).unwrap() - global.get(HEAD).unwrap()));
        standardized.entry("head").or_default().extend(head.iter().map(|v| v / (1.5 * 0.8 / (q * 6.0))));
    }
    // Each class has at least 200 × 8 = 1,600 draws (the head) and up to 200 × 4 × 17 = 13,600; the
    // sample sd of n standard normals has standard error 1/√(2n) ≤ 1.8%, the mean 1/√n ≤ 2.5%: a
    // 10% band on the sd and 0.1 on the mean is over 5 standard errors wide and still catches a
    // noise off by the slot's denominator (a factor of 1.5 or more here).
    for (class, draws) in &standardized {
        let n = draws.len() as f64;
        let mean = draws.iter().sum::<f64>() / n;
        let sd = (draws.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        assert!((sd - 1.0).abs() < 0.1, "{class}: sd {sd} over {n} draws");
        assert!(mean.abs() < 0.1, "{class}: mean {mean}");
    }
}

// ---------- secure aggregation's sums form (secure.rs) ----------

/// The plain method's result from the packed sums: what a secure round computes, without masks.
fn through_sums(method: Method, global: &Adapter, clients: &[&Client]) -> Adapter {
    let layout = secure::layout(global);
    let cap = clients.iter().map(|c| c.n).max().unwrap() as f64;
    let mut sums = vec![0.0f64; layout.full_len()];
    for c in clients {
        let packed = secure::pack(&c.adapter, c.n as f64 / cap, c.scale, &layout).unwrap();
        for (s, v) in sums.iter_mut().zip(packed) {
            *s += f64::from(v);
        }
    }
    secure::unpack(secure::secure_form(method).unwrap(), &sums, global, &layout).unwrap()
}

#[test]
fn the_sums_form_gives_each_slot_wise_method_its_plain_result() {
    let global = random_adapter(R_MAX, 910);
    let mixed = [client(2, 10, 1), client(4, 30, 2), client(4, 5, 3), client(6, 20, 4)];
    let mixed: Vec<&Client> = mixed.iter().collect();
    for method in [Method::Rbla, Method::ZeroPad, Method::FoldAndFill] {
        let want = aggregate(method, &global, &mixed);
        assert_close(&through_sums(method, &global, &mixed), &as_map(&want), 1e-5);
    }
    let full = [client(R_MAX, 7, 5), client(R_MAX, 9, 6)];
    let full: Vec<&Client> = full.iter().collect();
    assert_close(
        &through_sums(Method::FedAvg, &global, &full),
        &as_map(&aggregate(Method::FedAvg, &global, &full)),
        1e-5,
    );
    for method in [Method::HetLora, Method::FlexLora, Method::Flora, Method::RblaCoverage] {
        assert!(secure::secure_form(method).is_none(), "{method}");
    }
}

/// The same through the real protocol: six devices of mixed ranks pack, mask and upload, one drops
/// after sharing its keys, and the coordinator's unmasked sums give RBLA of the five that uploaded
/// within the quantization bound, on the slots enough of them hold to be revealed.
#[test]
fn a_secure_round_gives_rbla_of_the_survivors_within_the_quantization_bound() {
    use flotilla_secagg::client::ClientRound;
    use flotilla_secagg::server::ServerRound;
    let global = random_adapter(R_MAX, 911);
    let layout = secure::layout(&global);
    let clients = [
        client(2, 10, 11),
        client(4, 30, 12),
        client(8, 5, 13),
        client(6, 20, 14),
        client(8, 8, 15),
        client(3, 12, 16),
    ];
    let parameters = flotilla_secagg::Parameters { threshold: 3, degree: 4, range: 4.0, max_participants: 16 };
    let ranks: BTreeMap<u32, u32> =
        clients.iter().enumerate().map(|(i, c)| (i as u32, c.adapter.rank() as u32)).collect();
    let mut server = ServerRound::new(parameters, 1, layout, ranks.clone(), 3).unwrap();
    let mut devices = BTreeMap::new();
    for (&id, &rank) in &ranks {
        let (device, advert) = ClientRound::new(parameters, 1, id, rank, layout).unwrap();
        server.receive_keys(advert).unwrap();
        devices.insert(id, device);
    }
    for (&id, device) in devices.iter_mut() {
        let shares = device.share_keys(&server.peers_for(id)).unwrap();
        server.receive_shares(id, shares).unwrap();
    }
    for (&id, device) in devices.iter_mut() {
        assert!(device.receive_shares(server.shares_for(id)).is_empty());
    }
    let cap = 30.0;
    for (&id, device) in devices.iter_mut() {
        if id == 3 {
            continue; // drops after sharing its keys
        }
        let c = &clients[id as usize];
        let packed = secure::pack(&c.adapter, c.n as f64 / cap, c.scale, &layout).unwrap();
        server.receive_masked(device.masked_input(&packed).unwrap()).unwrap();
    }
    let request = server.unmask_request();
    for (id, device) in devices {
        if id != 3 {
            server.receive_unmask(device.unmask(&request).unwrap()).unwrap();
        }
    }
    let aggregate_sums = server.finish().unwrap();
    let got = secure::unpack(Denominator::Coverage, &aggregate_sums.sums, &global, &layout).unwrap();
    let survivors: Vec<&Client> = clients.iter().enumerate().filter(|(i, _)| *i != 3).map(|(_, c)| c).collect();
    let want = aggregate(Method::Rbla, &global, &survivors);
    // Survivors of ranks 2, 3, 4, 8, 8 at threshold 3: a slot is revealed with 4 holders, so slots
    // 0–2 are; slots 3.. (held by 3 survivors or fewer) are not, and keep the global's values.
    assert_eq!(aggregate_sums.revealed_rank, 3);
    assert_eq!(aggregate_sums.sums.len(), layout.len(3));
    want.copy_slots_from(&global, 3).unwrap();
    // Each sum is off by at most the bound; dividing by a slot weight of at least 5/30 multiplies
    // that by at most 6 (the coverage weight itself is also a sum).
    let tolerance = aggregate_sums.error_bound * 6.0 * 4.0;
    for (name, t) in want.tensors() {
        let diff = (got.get(name).unwrap() - t).abs().max().double_value(&[]);
        assert!(diff <= tolerance.max(1e-6), "{name}: {diff} > {tolerance}");
    }
}

/// Distributed privacy: noise goes on every value at its slot's level, never on the weight or a
/// coverage coordinate; the sums of changes come back shaped like the global's tensors.
#[test]
fn distributed_noise_spares_the_weights_and_the_sums_come_back_by_tensor() {
    // 1,000 values in the head and in each slot: a sample sd within 10% of its level is over four
    // standard errors (1/√2000 ≈ 2.2%) wide.
    let layout = flotilla_secagg::layout::Layout { shared: 1001, per_slot: 1001, max_rank: 4 };
    let mut packed = vec![0.0f32; layout.full_len()];
    let levels: Vec<f64> = (0..=4).map(|i| 0.5 + i as f64).collect();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    secure::add_noise(&mut packed, &layout, &levels, &mut rng).unwrap();
    assert_eq!(packed[layout.shared - 1], 0.0, "the weight");
    let sd = |values: &[f32]| {
        let n = values.len() as f64;
        (values.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n).sqrt()
    };
    assert!((sd(&packed[..layout.shared - 1]) / levels[0] - 1.0).abs() < 0.1, "the head's level");
    for slot in 0..4 {
        let block = &packed[layout.shared + slot * layout.per_slot..layout.shared + (slot + 1) * layout.per_slot];
        assert_eq!(block[0], 0.0, "slot {slot}'s coverage");
        assert!((sd(&block[1..]) / levels[slot + 1] - 1.0).abs() < 0.1, "slot {slot}'s level");
    }
    // A device's packed change comes back, tensor by tensor, where it was.
    let global = random_adapter(R_MAX, 912);
    let layout = secure::layout(&global);
    let change = client(3, 1, 913).adapter;
    let packed = secure::pack(&change, 1.0, 1.0, &layout).unwrap();
    let mut sums = vec![0.0f64; layout.full_len()];
    for (s, v) in sums.iter_mut().zip(packed) {
        *s = f64::from(v);
    }
    let by_tensor = secure::sums_by_tensor(&sums, &global, &layout).unwrap();
    for (name, t) in change.tensors() {
        let back = &by_tensor[name];
        let part = match crate::adapter::tensor_role(name) {
            crate::adapter::TensorRole::LoraA(_) => back.narrow(0, 0, 3),
            crate::adapter::TensorRole::LoraB(_) => back.narrow(1, 0, 3),
            _ => back.shallow_clone(),
        };
        let diff = (part - t.to_kind(Kind::Double)).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{name}: {diff}");
    }
}
