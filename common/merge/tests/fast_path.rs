//! The offline fast path against a reference written here from the formulas, and its refusals:
//! anything unusual is declined with nothing written, for the libtorch path to handle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use flotilla_merge::fast_path::{merge, Request};
use flotilla_merge::method::Method;
use safetensors::{Dtype, SafeTensors};

const HEAD: &str = "base_model.model.head.weight";

struct Client {
    rank: usize,
    samples: u64,
    alpha: f64,
    /// (name, shape, values)
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

fn value(seed: u64, i: usize) -> f32 {
    let x = (seed.wrapping_mul(6364136223846793005).wrapping_add((i as u64).wrapping_mul(1442695040888963407)) >> 40)
        as f32;
    x / (1u64 << 24) as f32 - 0.5
}

/// Two modules (4 → 6 and 4 → 3) and a 2 × 4 head, values from `seed`.
fn client(rank: usize, samples: u64, alpha: f64, seed: u64) -> Client {
    let mut tensors = Vec::new();
    for (k, (module, d_in, d_out)) in [("q", 4, 6), ("v", 4, 3)].into_iter().enumerate() {
        let name = format!("base_model.model.layer.{module}");
        let s = seed * 10 + k as u64;
        tensors.push((
            format!("{name}.lora_A.weight"),
            vec![rank, d_in],
            (0..rank * d_in).map(|i| value(s, i)).collect(),
        ));
        tensors.push((
            format!("{name}.lora_B.weight"),
            vec![d_out, rank],
            (0..d_out * rank).map(|i| value(s + 5, i)).collect(),
        ));
    }
    tensors.push((HEAD.into(), vec![2, 4], (0..8).map(|i| value(seed + 99, i)).collect()));
    Client { rank, samples, alpha, tensors }
}

fn write(dir: &Path, client: &Client, dtype: Dtype) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let bytes: Vec<Vec<u8>> = client
        .tensors
        .iter()
        .map(|(_, _, v)| match dtype {
            Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            _ => v.iter().flat_map(|x| half_bits(*x).to_le_bytes()).collect(),
        })
        .collect();
    let views: Vec<_> = client
        .tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (name.clone(), safetensors::tensor::TensorView::new(dtype, shape.clone(), b).unwrap())
        })
        .collect();
    let meta = HashMap::from([("num_samples".to_string(), client.samples.to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &dir.join("adapter_model.safetensors")).unwrap();
    let config = format!(r#"{{"peft_type": "LORA", "r": {}, "lora_alpha": {}}}"#, client.rank, client.alpha);
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    dir.to_path_buf()
}

/// bf16 bits (truncation) — enough to make a non-f32 file.
fn half_bits(x: f32) -> u16 {
    (x.to_bits() >> 16) as u16
}

fn read(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// RBLA from the formula: per slot, the sample-weighted mean over the clients that have it (B
/// rescaled to the largest client's scale); the head's weighted mean over everyone.
fn reference_rbla(clients: &[Client], name: &str) -> Vec<f64> {
    let largest = clients.iter().max_by_key(|c| c.rank).unwrap();
    let target = largest.alpha / largest.rank as f64;
    let shape = &largest.tensors.iter().find(|t| t.0 == name).unwrap().1;
    let is_a = name.ends_with("lora_A.weight");
    let is_b = name.ends_with("lora_B.weight");
    let mut out = vec![0.0f64; shape.iter().product()];
    for (i, o) in out.iter_mut().enumerate() {
        let (row, col) = (i / shape[1], i % shape[1]);
        let slot = if is_a { row } else { col };
        let (mut sum, mut weight) = (0.0, 0.0);
        for c in clients {
            if (is_a || is_b) && slot >= c.rank {
                continue;
            }
            let t = c.tensors.iter().find(|t| t.0 == name).unwrap();
            let width = t.1[1];
            let x = t.2[row * width + col] as f64;
            let x = if is_b { x * (c.alpha / c.rank as f64) / target } else { x };
            sum += c.samples as f64 * x;
            weight += c.samples as f64;
        }
        *o = sum / weight;
    }
    out
}

fn request(method: Method, out: &Path, dirs: Vec<PathBuf>) -> Request {
    Request { method, out: out.to_path_buf(), max_rank: None, clients: dirs }
}

#[test]
fn rbla_matches_the_formula_with_mixed_ranks_and_scales() {
    let dir = tempfile::tempdir().unwrap();
    let clients = [client(2, 100, 4.0, 1), client(4, 300, 4.0, 2), client(8, 50, 16.0, 3), client(4, 7, 8.0, 4)];
    let dirs: Vec<PathBuf> =
        clients.iter().enumerate().map(|(i, c)| write(&dir.path().join(format!("c{i}")), c, Dtype::F32)).collect();
    let out = dir.path().join("out");
    let report = merge(&request(Method::Rbla, &out, dirs)).unwrap();
    assert_eq!((report.out_rank, report.ranks.clone()), (8, vec![2, 4, 8, 4]));
    assert_eq!(report.lora_alpha, 16.0);
    assert!(report.notes[0].contains("different LoRA scales"), "{:?}", report.notes);
    let got = read(&out.join("adapter_model.safetensors"));
    assert_eq!(got.len(), 5);
    for (name, (shape, values)) in &got {
        let want = reference_rbla(&clients, name);
        assert_eq!(values.len(), want.len(), "{name} {shape:?}");
        for (g, w) in values.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{name}: {g} vs {w}");
        }
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["r"].as_u64(), config["lora_alpha"].as_f64()), (Some(8), Some(16.0)));
}

#[test]
fn a_lone_top_slot_passes_through_bit_identical_and_uncovered_slots_get_a_fresh_init() {
    let dir = tempfile::tempdir().unwrap();
    let clients = [client(2, 10, 4.0, 5), client(4, 30, 8.0, 6)];
    let dirs: Vec<PathBuf> =
        clients.iter().enumerate().map(|(i, c)| write(&dir.path().join(format!("c{i}")), c, Dtype::F32)).collect();
    let out = dir.path().join("out");
    let mut req = request(Method::Rbla, &out, dirs);
    req.max_rank = Some(6);
    merge(&req).unwrap();
    let got = read(&out.join("adapter_model.safetensors"));
    let (shape, a) = &got["base_model.model.layer.q.lora_A.weight"];
    assert_eq!(shape, &vec![6, 4]);
    let lone = &clients[1].tensors[0].2;
    assert_eq!(&a[8..16], &lone[8..16], "slots 2 and 3 come from the rank-4 client alone");
    let bound = 0.5f32;
    assert!(a[16..].iter().all(|v| v.abs() <= bound) && a[16..].iter().any(|v| *v != 0.0), "fresh A init");
    let (_, b) = &got["base_model.model.layer.q.lora_B.weight"];
    assert!(b.chunks_exact(6).all(|row| row[4..] == [0.0, 0.0]), "fresh B is zero");
}

#[test]
fn zero_pad_and_fedavg() {
    let dir = tempfile::tempdir().unwrap();
    let same = [client(4, 10, 8.0, 7), client(4, 30, 8.0, 8)];
    let dirs: Vec<PathBuf> =
        same.iter().enumerate().map(|(i, c)| write(&dir.path().join(format!("s{i}")), c, Dtype::F32)).collect();
    let fedavg = dir.path().join("fedavg");
    merge(&request(Method::FedAvg, &fedavg, dirs.clone())).unwrap();
    let rbla = dir.path().join("rbla");
    merge(&request(Method::Rbla, &rbla, dirs)).unwrap();
    assert_eq!(
        read(&fedavg.join("adapter_model.safetensors")),
        read(&rbla.join("adapter_model.safetensors")),
        "equal ranks: RBLA = FedAvg"
    );

    let mixed = [client(2, 10, 4.0, 9), client(4, 30, 8.0, 10)];
    let dirs: Vec<PathBuf> =
        mixed.iter().enumerate().map(|(i, c)| write(&dir.path().join(format!("m{i}")), c, Dtype::F32)).collect();
    let refused = dir.path().join("refused");
    assert!(merge(&request(Method::FedAvg, &refused, dirs.clone())).is_err());
    assert!(!refused.exists());
    let padded = dir.path().join("zero-pad");
    merge(&request(Method::ZeroPad, &padded, dirs)).unwrap();
    let (_, a) = &read(&padded.join("adapter_model.safetensors"))["base_model.model.layer.v.lora_A.weight"];
    // Slot 3 is the rank-4 client's alone, weighted by its share of the samples (denominator: everyone).
    let lone = &mixed[1].tensors[2].2;
    for j in 0..4 {
        assert!((a[12 + j] - 0.75 * lone[12 + j]).abs() < 1e-6);
    }
}

#[test]
fn unusual_inputs_are_declined_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(&dir.path().join("good"), &client(4, 10, 8.0, 11), Dtype::F32);
    let out = dir.path().join("out");
    let mut nan = client(2, 10, 4.0, 12);
    nan.tensors[3].2[1] = f32::NAN;
    let mut inf = client(2, 10, 4.0, 13);
    inf.tensors[4].2[0] = f32::INFINITY;
    let cases = [
        ("nan", write(&dir.path().join("nan"), &nan, Dtype::F32)),
        ("inf in the head", write(&dir.path().join("inf"), &inf, Dtype::F32)),
        ("bf16", write(&dir.path().join("bf16"), &client(2, 10, 4.0, 14), Dtype::BF16)),
        ("missing", dir.path().join("missing")),
    ];
    for (label, bad) in cases {
        let declined = merge(&request(Method::Rbla, &out, vec![good.clone(), bad]));
        assert!(declined.is_err(), "{label}");
        assert!(!out.exists(), "{label}: nothing written");
    }
    let liar = write(&dir.path().join("liar"), &client(2, 10, 4.0, 15), Dtype::F32);
    std::fs::write(liar.join("adapter_config.json"), r#"{"r": 4, "lora_alpha": 8}"#).unwrap();
    assert!(merge(&request(Method::Rbla, &out, vec![good.clone(), liar])).is_err());
    let mut mismatch = client(2, 10, 4.0, 16);
    mismatch.tensors[0].1 = vec![2, 2];
    mismatch.tensors[0].2.truncate(4);
    let mismatch = write(&dir.path().join("mismatch"), &mismatch, Dtype::F32);
    assert!(merge(&request(Method::Rbla, &out, vec![good, mismatch])).is_err());
    assert!(!out.exists());
}
