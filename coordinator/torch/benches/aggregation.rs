//! Aggregation against the roofline: an LLM-shaped set of client adapters (20 clients, ranks cycling
//! 4, 8, 16, 32, 64; 32 layers, each with a q-projection 4096 → 4096 and a v-projection 4096 → 1024),
//! aggregated with every method, each compared in the same run with one read of the same input bytes.
//!
//!   cargo bench -p flotilla-coordinator-torch --bench aggregation             # the full shape
//!   cargo bench -p flotilla-coordinator-torch --bench aggregation -- --layers 4   # quicker
//!
//! In memory, "one read" is one pass over every input tensor (an f64 sum, the cheapest kernel that
//! touches every byte) with the same thread count as the aggregator (one). The updates are decoded
//! from wire bytes first, as the coordinator receives them; decoding (which also checks every value
//! is finite) is timed on its own row, and the aggregation rows start from decoded updates.
//!
//!   ... -- --methods rbla,zero-pad      # only some methods (flexlora takes minutes at full size) End to end, the offline
//! command (load, aggregate, write) is compared with `cat` of the input files into /dev/null, both
//! with the files in the page cache.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use flotilla_torch::adapter::{lora_a_name, lora_b_name, peft_config_for, Adapter, NUM_SAMPLES_KEY};
use flotilla_torch::aggregate::{ClientUpdate, Method, MethodExt};
use flotilla_wire::tensor::{DType, WireTensors};
use tch::{Device, Kind, Tensor};

const CLIENTS: usize = 20;
const RANKS: [usize; 5] = [4, 8, 16, 32, 64];
const HIDDEN: i64 = 4096;
const V_OUT: i64 = 1024;

fn client_adapter(layers: usize, rank: usize) -> Adapter {
    let r = rank as i64;
    let mut t = BTreeMap::new();
    for layer in 0..layers {
        for (proj, d_out) in [("q_proj", HIDDEN), ("v_proj", V_OUT)] {
            let module = format!("base_model.model.model.layers.{layer}.self_attn.{proj}");
            t.insert(lora_a_name(&module), Tensor::randn([r, HIDDEN], (Kind::Float, Device::Cpu)) * 0.02);
            t.insert(lora_b_name(&module), Tensor::randn([d_out, r], (Kind::Float, Device::Cpu)) * 0.02);
        }
    }
    Adapter::new(t).expect("consistent adapter")
}

fn seconds(f: impl FnOnce()) -> f64 {
    let start = Instant::now();
    f();
    start.elapsed().as_secs_f64()
}

fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs).map(|_| seconds(&mut f)).fold(f64::INFINITY, f64::min)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let layers = args
        .iter()
        .position(|a| a == "--layers")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(32usize);
    let methods: Vec<Method> = args
        .iter()
        .position(|a| a == "--methods")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(|m| m.parse().expect("method name")).collect())
        .unwrap_or_else(|| vec![Method::Rbla, Method::ZeroPad, Method::HetLora, Method::Flora, Method::FlexLora]);
    tch::set_num_threads(1);
    tch::manual_seed(0);

    let ranks: Vec<usize> = (0..CLIENTS).map(|k| RANKS[k % RANKS.len()]).collect();
    let wires: Vec<WireTensors> =
        ranks.iter().map(|&r| client_adapter(layers, r).to_wire(DType::F32).expect("wire")).collect();
    let mut clients: Vec<(Adapter, u64)> = Vec::new();
    let decode = seconds(|| {
        clients = wires
            .iter()
            .enumerate()
            .map(|(k, w)| (Adapter::from_wire(w).expect("valid update"), 100 + 37 * k as u64))
            .collect()
    });
    drop(wires);
    let input_bytes: usize =
        clients.iter().map(|(a, _)| a.tensors().values().map(|t| t.numel() * 4).sum::<usize>()).sum();
    let r_max = *RANKS.iter().max().unwrap_or(&64);
    let global = client_adapter(layers, r_max);

    println!("# Aggregation benchmark");
    println!();
    println!(
        "{CLIENTS} clients, ranks {:?} cycling, {layers} layers × (q 4096→4096, v 4096→1024), R_max {r_max}, f32.",
        RANKS
    );
    println!("Input: {:.1} MB. One libtorch thread for every timing.", input_bytes as f64 / 1e6);
    println!();

    let read = best_of(3, || {
        for (adapter, _) in &clients {
            for t in adapter.tensors().values() {
                std::hint::black_box(t.sum(Kind::Double).double_value(&[]));
            }
        }
    });
    println!("| in memory | time | × one read of the input |");
    println!("| --- | ---: | ---: |");
    println!("| one read of the input ({:.1} GB/s) | {:.3} s | 1.00 |", input_bytes as f64 / read / 1e9, read);
    println!(
        "| decode {CLIENTS} updates from wire bytes (copy + finiteness check) | {:.3} s | {:.2} |",
        decode,
        decode / read
    );

    for method in methods {
        let names: Vec<String> = (0..clients.len()).map(|k| format!("client-{k}")).collect();
        let updates: Vec<ClientUpdate<'_>> = clients
            .iter()
            .zip(&names)
            .map(|((adapter, n), name)| ClientUpdate {
                client: name,
                declared_rank: adapter.rank(),
                num_samples: *n,
                scale: 1.0,
                adapter,
            })
            .collect();
        // One at a time, as updates that trickle in are folded; then all together, as the
        // coordinator folds updates that queued up (`Aggregator::fold_batch`).
        let runs = if method == Method::FlexLora { 1 } else { 2 };
        let mut notes = Vec::new();
        for together in [false, true] {
            if together && !matches!(method, Method::Rbla | Method::ZeroPad | Method::HetLora) {
                continue; // the other methods fold one at a time either way
            }
            let (mut fold_time, mut finish_time, mut best) = (0.0, 0.0, f64::INFINITY);
            for _ in 0..runs {
                let mut acc = method.start(&global, 1.0).expect("start");
                let fold = seconds(|| {
                    if together {
                        assert!(acc.fold_batch(&updates).iter().all(Result::is_ok), "valid updates");
                    } else {
                        for update in &updates {
                            acc.fold(update).expect("valid update");
                        }
                    }
                });
                let mut result = None;
                let finish = seconds(|| result = Some(acc.finish().expect("finish")));
                if fold + finish < best {
                    best = fold + finish;
                    fold_time = fold;
                    finish_time = finish;
                    notes = result.map(|r| r.notes).unwrap_or_default();
                }
            }
            let how = if together { "together" } else { "one at a time" };
            println!(
                "| {method}: fold {CLIENTS} updates {how} {:.3} s + finish {:.3} s | {:.3} s | {:.2} |",
                fold_time,
                finish_time,
                fold_time + finish_time,
                (fold_time + finish_time) / read
            );
        }
        if method == Method::FlexLora {
            let worst = notes
                .iter()
                .filter_map(|n| n.rsplit("relative error ").next().and_then(|v| v.parse::<f64>().ok()))
                .fold(0.0f64, f64::max);
            println!(
                "|  (flexlora: randomized SVD of {} layers; worst relative error {:.2e}) | | |",
                notes.len(),
                worst
            );
        }
    }

    // End to end through the offline command.
    let dir = tempfile::tempdir().expect("temp dir");
    // FLOTILLA_BENCH_KEEP=<dir>: also leave the client adapters there, for profiling the command.
    let keep = std::env::var_os("FLOTILLA_BENCH_KEEP").map(PathBuf::from);
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (k, (adapter, n)) in clients.iter().enumerate() {
        let path = keep.as_deref().unwrap_or(dir.path()).join(format!("client-{k:02}"));
        let config = peft_config_for(adapter, adapter.rank() as f64);
        adapter
            .save_peft(&path, &config, HashMap::from([(NUM_SAMPLES_KEY.to_string(), n.to_string())]))
            .expect("write client");
        dirs.push(path);
    }
    drop(clients);
    let files: Vec<PathBuf> = dirs.iter().map(|d| d.join("adapter_model.safetensors")).collect();
    let cat = || {
        let status = Command::new("cat").args(&files).stdout(std::process::Stdio::null()).status().expect("cat");
        assert!(status.success());
    };
    cat(); // warm the page cache
    let cat_time = best_of(3, cat);
    let out = dir.path().join("out");
    // The front end runs RBLA without libtorch; FLOTILLA_AGGREGATE_PATH=torch forces the libtorch binary.
    // It is another package's binary: built beside this bench (deploy/benchmarks.sh builds --bins).
    let front_end = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("flotilla-coordinator")))
        .filter(|path| path.exists())
        .expect("target/<profile>/flotilla-coordinator: build it first (cargo build --release --bins)");
    let offline = |method: &str, torch: bool| -> f64 {
        best_of(3, || {
            let mut command = Command::new(&front_end);
            command.args(["aggregate", "--force", "--method", method, "--out"]).arg(&out).args(&dirs);
            if torch {
                command.env("FLOTILLA_AGGREGATE_PATH", "torch");
            }
            let output = command.output().expect("run aggregate");
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        })
    };
    let fast = offline("rbla", false);
    let torch = offline("rbla", true);
    println!();
    println!("| end to end (files in page cache) | time | × cat of the inputs |");
    println!("| --- | ---: | ---: |");
    println!("| `cat` {} files > /dev/null | {:.3} s | 1.00 |", files.len(), cat_time);
    println!(
        "| `flotilla-coordinator aggregate --method rbla` (load, aggregate, write with fsync) | {:.3} s | {:.2} |",
        fast,
        fast / cat_time
    );
    println!(
        "| the same on the libtorch path (`FLOTILLA_AGGREGATE_PATH=torch`) | {:.3} s | {:.2} |",
        torch,
        torch / cat_time
    );
    let _ = Path::new(&out);
}
