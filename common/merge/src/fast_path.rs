//! The fast path of `flotilla-coordinator aggregate` for the sample-weighted slot-wise methods
//! (RBLA, zero-padding, FedAvg).
//!
//! It computes exactly what the libtorch path (`flotilla-coordinator-torch aggregate`) computes —
//! the same accumulator ([`crate::slots`]), in the same order per module, so the LoRA factors come
//! out bit-identical — but it runs in a process that does not load libtorch, reads the inputs
//! straight from their memory maps instead of copying them into tensors, and folds module by module
//! (all clients' factors of one module, then the next), so a module's sums stay in cache while the
//! inputs stream past once. Modules are folded on every core.
//!
//! Each worker reads a client's factors with pread into a small reused buffer (as `cat` does; faulting
//! in a map of every input costs more than the copy) and writes each finished module to its place in
//! the output file at once, starting its write-back, so memory stays at a few module-sized buffers.
//!
//! It is only a fast path: whenever an input is anything but a clean f32 PEFT adapter (a missing or
//! malformed file, a lying rank, a layer mismatch, NaN, f16 tensors, …) it declines with the reason,
//! and the caller hands the whole command to the libtorch path, which accepts what it can and
//! reports every problem in its own words. Nothing is written before every input has been checked.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use crate::init::seeded_uniform_values;
use crate::inputs::{self, InputError, Plan};
use crate::method::Method;
use crate::peft::{
    lora_a_name, lora_b_name, tensor_role, PeftConfig, TensorRole, ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE,
};
use crate::slots::{Denominator, Factors, ModuleSlots};

pub struct Request {
    /// RBLA, zero-padding or FedAvg (any other method is declined: it needs libtorch).
    pub method: Method,
    pub out: PathBuf,
    pub max_rank: Option<usize>,
    pub clients: Vec<PathBuf>,
}

/// What was merged, for the command's summary line.
#[derive(Debug)]
pub struct Report {
    pub clients: usize,
    pub ranks: Vec<usize>,
    pub out_rank: usize,
    pub lora_alpha: f64,
    pub notes: Vec<String>,
    /// Seconds per phase: open (configs, maps, headers, checks), fold (LoRA modules), others, write.
    pub phases: Vec<(&'static str, f64)>,
}

/// Why the fast path left the command to the libtorch path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declined(pub String);

impl From<InputError> for Declined {
    fn from(e: InputError) -> Declined {
        Declined(e.0)
    }
}

fn decline<T>(reason: impl Into<String>) -> Result<T, Declined> {
    Err(Declined(reason.into()))
}

/// One input tensor: its shape and where its little-endian f32 values lie in the file's map.
struct TensorSpan {
    shape: Vec<usize>,
    bytes: Range<usize>,
}

struct Client {
    dir: PathBuf,
    config: PeftConfig,
    samples: u64,
    file: fs::File,
    tensors: BTreeMap<String, TensorSpan>,
}

impl Client {
    fn scale(&self) -> f64 {
        inputs::scale(&self.config)
    }

    /// Reads tensor `name` into the front of `buffer` (grown if needed) and returns those values.
    /// Copying into a small reused buffer, as `cat` does, beats faulting in a map of the file.
    fn read<'b>(&self, name: &str, buffer: &'b mut Vec<f32>) -> Result<&'b [f32], Declined> {
        let bytes = &self.tensors[name].bytes;
        let n = bytes.len() / 4;
        if buffer.len() < n {
            buffer.resize(n, 0.0);
        }
        let values = &mut buffer[..n];
        self.file
            .read_exact_at(bytemuck::cast_slice_mut(values), bytes.start as u64)
            .map_err(|e| Declined(format!("{}: cannot read '{name}': {e}", self.dir.display())))?;
        Ok(values)
    }
}

fn open_client(dir: &Path) -> Result<Client, Declined> {
    let config = inputs::read_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let Ok(file) = fs::File::open(&path) else { return decline(format!("{}: unreadable", path.display())) };
    // The map is only for the header: the values are read with pread (see `Client::read`).
    // SAFETY: read-only and private to this process; adapter files are replaced atomically
    // (temporary file + rename), so a file being rewritten is never the one mapped.
    let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return decline(format!("{}: cannot map", path.display()));
    };
    // Parses and validates the header: offsets in order, inside the file, covering it exactly.
    let Ok((header_len, metadata)) = safetensors::SafeTensors::read_metadata(&map) else {
        return decline(format!("{}: not a valid safetensors file", path.display()));
    };
    let samples = inputs::num_samples(metadata.metadata().as_ref(), &path)?;
    let data_start = 8 + header_len;
    let mut tensors = BTreeMap::new();
    for (name, info) in metadata.tensors() {
        if info.dtype != safetensors::Dtype::F32 {
            return decline(format!("{}: tensor '{name}' is {:?}, not f32", path.display(), info.dtype));
        }
        let (begin, end) = info.data_offsets;
        let bytes = data_start + begin..data_start + end;
        if info.shape.contains(&0) {
            return decline(format!("{}: tensor '{name}' is empty", path.display()));
        }
        tensors.insert(name, TensorSpan { shape: info.shape.clone(), bytes });
    }
    drop(map);
    let client = Client { dir: dir.to_path_buf(), config, samples, file, tensors };
    check_own_shapes(&client)?;
    Ok(client)
}

/// Every module has both factors, 2-D, at the rank the config declares; no merged deltas.
fn check_own_shapes(client: &Client) -> Result<(), Declined> {
    let r = client.config.r;
    let dir = client.dir.display();
    for (name, span) in &client.tensors {
        let partner = match tensor_role(name) {
            TensorRole::LoraA(module) => lora_b_name(module),
            TensorRole::LoraB(module) => lora_a_name(module),
            TensorRole::MergedDelta(_) => return decline(format!("{dir}: carries a merged delta")),
            TensorRole::Other => continue,
        };
        let Some(other) = client.tensors.get(&partner) else {
            return decline(format!("{dir}: '{name}' has no partner"));
        };
        let rank_ok = match tensor_role(name) {
            TensorRole::LoraA(_) => span.shape.len() == 2 && span.shape[0] == r && other.shape.len() == 2,
            _ => span.shape.len() == 2 && span.shape[1] == r,
        };
        if !rank_ok {
            return decline(format!("{dir}: '{name}' has shape {:?}, config says r = {r}", span.shape));
        }
    }
    Ok(())
}

/// The same tensors as the template (the largest input), with the same module dimensions.
fn check_against(template: &Client, client: &Client) -> Result<(), Declined> {
    let dir = client.dir.display();
    if template.tensors.len() != client.tensors.len() || !template.tensors.keys().eq(client.tensors.keys()) {
        return decline(format!("{dir}: its tensors differ from {}", template.dir.display()));
    }
    for (name, span) in &client.tensors {
        let want = &template.tensors[name].shape;
        let same = match tensor_role(name) {
            TensorRole::LoraA(_) => span.shape[1] == want[1],
            TensorRole::LoraB(_) => span.shape[0] == want[0],
            _ => span.shape == *want,
        };
        if !same {
            return decline(format!(
                "{dir}: '{name}' has shape {:?}, {} has {want:?}",
                span.shape,
                template.dir.display()
            ));
        }
    }
    Ok(())
}

/// Merges the clients with `request.method` and writes `request.out`, or declines without writing.
pub fn merge(request: &Request) -> Result<Report, Declined> {
    let Some(denominator) = request.method.sample_weighted_denominator() else {
        return decline(format!("method '{}' needs libtorch", request.method));
    };
    let mut phases = Vec::new();
    let mut started = Instant::now();
    let mut lap = |name: &'static str| {
        phases.push((name, started.elapsed().as_secs_f64()));
        started = Instant::now();
    };
    let clients: Vec<Client> = request.clients.iter().map(|dir| open_client(dir)).collect::<Result<_, _>>()?;
    let configs: Vec<(&Path, &PeftConfig)> = clients.iter().map(|c| (c.dir.as_path(), &c.config)).collect();
    let Plan { largest, out_rank: r_max, target_scale, notes } = inputs::plan(&configs, request.max_rank)?;
    let template = &clients[largest];
    for client in &clients {
        check_against(template, client)?;
        if request.method == Method::FedAvg && client.config.r != r_max {
            return decline(format!("fedavg with {} at rank {}", client.dir.display(), client.config.r));
        }
    }
    let b_factors: Vec<f64> = clients.iter().map(|c| c.scale() / target_scale).collect();

    // Modules in name order; `seed_index` numbers them as the libtorch path's template does.
    let modules: Vec<(usize, &str)> = template
        .tensors
        .keys()
        .filter_map(|name| match tensor_role(name) {
            TensorRole::LoraA(module) => Some(module),
            _ => None,
        })
        .enumerate()
        .collect();
    let total_samples: u64 = clients.iter().map(|c| c.samples).sum();
    let lora_alpha = target_scale * r_max as f64;
    let mut config = clients[0].config.clone();
    config.r = r_max;
    config.lora_alpha = lora_alpha;
    let metadata = inputs::output_metadata(request.method, clients.len(), total_samples, target_scale, &notes);
    // Output layout: each module's A then B, in module order, then the other tensors.
    let mut layout = Vec::new();
    for &(_, module) in &modules {
        let d_in = template.tensors[&lora_a_name(module)].shape[1];
        let d_out = template.tensors[&lora_b_name(module)].shape[0];
        layout.push((lora_a_name(module), vec![r_max, d_in]));
        layout.push((lora_b_name(module), vec![d_out, r_max]));
    }
    let others: Vec<&String> = template.tensors.keys().filter(|n| tensor_role(n) == TensorRole::Other).collect();
    for name in &others {
        layout.push(((*name).clone(), template.tensors[*name].shape.clone()));
    }
    lap("open");

    let output = OutputFile::create(&request.out, &layout, &metadata)
        .map_err(|e| Declined(format!("cannot write {}: {e}", request.out.display())))?;
    let result = fold_modules(denominator, &clients, template, &modules, r_max, &b_factors, &output)
        .inspect(|()| lap("fold"))
        .and_then(|()| mean_of_others(&clients, template, &others, &output))
        .inspect(|()| lap("others"))
        .and_then(|()| {
            output.commit(&config).map_err(|e| Declined(format!("cannot write {}: {e}", request.out.display())))
        });
    if let Err(declined) = result {
        output.abandon();
        return Err(declined);
    }
    lap("write");
    Ok(Report {
        clients: clients.len(),
        ranks: clients.iter().map(|c| c.config.r).collect(),
        out_rank: r_max,
        lora_alpha,
        notes,
        phases,
    })
}

/// Folds every module on every core: each worker takes the next module, reads every client's
/// factors of it into its own buffers, folds them into its sums, checks the sums finite (a NaN or
/// infinity in any input makes them non-finite, since every factor is positive), divides, and
/// writes the module's A and B to their place in the output.
fn fold_modules(
    denominator: Denominator,
    clients: &[Client],
    template: &Client,
    modules: &[(usize, &str)],
    r_max: usize,
    b_factors: &[f64],
    output: &OutputFile,
) -> Result<(), Declined> {
    let max_input_rank = template.config.r;
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<Declined>> = Mutex::new(None);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8).min(modules.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut buffers = Buffers::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(seed_index, module)) = modules.get(i) else { break };
                    if failure.lock().map_or(true, |f| f.is_some()) {
                        break;
                    }
                    let job = ModuleJob {
                        denominator,
                        clients,
                        template,
                        module,
                        seed_index,
                        r_max,
                        b_factors,
                        max_input_rank,
                    };
                    if let Err(declined) = job.run(&mut buffers, output) {
                        if let Ok(mut f) = failure.lock() {
                            f.get_or_insert(declined);
                        }
                        break;
                    }
                }
            });
        }
    });
    match failure.into_inner() {
        Ok(None) => Ok(()),
        Ok(Some(declined)) => Err(declined),
        Err(_) => decline("a worker panicked"),
    }
}

/// A worker's reused memory: the module's sums and one client's factors.
#[derive(Default)]
struct Buffers {
    acc_a: Vec<f32>,
    acc_b: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
}

struct ModuleJob<'a> {
    denominator: Denominator,
    clients: &'a [Client],
    template: &'a Client,
    module: &'a str,
    seed_index: usize,
    r_max: usize,
    b_factors: &'a [f64],
    /// Slots from here to R_max are covered by no input.
    max_input_rank: usize,
}

impl ModuleJob<'_> {
    fn run(&self, buffers: &mut Buffers, output: &OutputFile) -> Result<(), Declined> {
        let (a_name, b_name) = (lora_a_name(self.module), lora_b_name(self.module));
        let d_in = self.template.tensors[&a_name].shape[1];
        let d_out = self.template.tensors[&b_name].shape[0];
        let r_max = self.r_max;
        let Buffers { acc_a, acc_b, a, b } = buffers;
        acc_a.clear();
        acc_a.resize(r_max * d_in, 0.0);
        acc_b.clear();
        acc_b.resize(d_out * r_max, 0.0);
        let mut slots = ModuleSlots::new(r_max);
        for (client, &b_factor) in self.clients.iter().zip(self.b_factors) {
            let factors = Factors { a: client.read(&a_name, a)?, b: client.read(&b_name, b)?, rank: client.config.r };
            slots.fold(acc_a, acc_b, factors, client.samples as f64, b_factor);
        }
        if !acc_a.iter().chain(acc_b.iter()).all(|v| v.is_finite()) {
            return decline(format!("module '{}': non-finite values in an input", self.module));
        }
        // Slots no input covers start as a fresh LoRA init (A uniform ±1/√d_in, B zero), seeded as
        // the libtorch path seeds them.
        let previous_a = (r_max > self.max_input_rank).then(|| {
            seeded_uniform_values(
                r_max * d_in,
                1.0 / (d_in as f64).sqrt(),
                inputs::uncovered_slot_seed(self.seed_index),
            )
        });
        slots.finish(self.denominator, acc_a, acc_b, previous_a.as_deref(), None);
        output.write(&a_name, acc_a)?;
        output.write(&b_name, acc_b)
    }
}

/// Non-LoRA tensors: the sample-weighted mean `Σ n_k·X_k / Σ n_k`, summed in f64.
fn mean_of_others(
    clients: &[Client],
    template: &Client,
    names: &[&String],
    output: &OutputFile,
) -> Result<(), Declined> {
    let total: f64 = clients.iter().map(|c| c.samples as f64).sum();
    let mut buffer = Vec::new();
    for name in names {
        let mut sum = vec![0.0f64; template.tensors[*name].shape.iter().product()];
        for client in clients {
            let n = client.samples as f64;
            for (s, &x) in sum.iter_mut().zip(client.read(name, &mut buffer)?) {
                *s += x as f64 * n;
            }
        }
        if !sum.iter().all(|v| v.is_finite()) {
            return decline(format!("tensor '{name}': non-finite values in an input"));
        }
        let mean: Vec<f32> = sum.iter().map(|&s| (s / total) as f32).collect();
        output.write(name, &mean)?;
    }
    Ok(())
}

/// `adapter_model.safetensors` being written: a safetensors header laid out up front, then each
/// tensor written to its place as soon as it is final, with the kernel's write-back started at once
/// so that the closing fsync has little left to wait for. It is a temporary file until
/// [`OutputFile::commit`] (fsync, rename, then `adapter_config.json`); [`OutputFile::abandon`]
/// removes it, and the output directory if this created it.
struct OutputFile {
    dir: PathBuf,
    created_dir: bool,
    tmp: PathBuf,
    file: fs::File,
    /// Where each tensor's bytes go, from the start of the file.
    places: HashMap<String, Range<u64>>,
}

impl OutputFile {
    fn create(
        dir: &Path,
        layout: &[(String, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
    ) -> std::io::Result<OutputFile> {
        let created_dir = !dir.exists();
        fs::create_dir_all(dir)?;
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::to_value(metadata)?);
        let mut offset = 0u64;
        let mut data_offsets = HashMap::new();
        for (name, shape) in layout {
            let len = 4 * shape.iter().product::<usize>() as u64;
            header.insert(
                name.clone(),
                serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len] }),
            );
            data_offsets.insert(name.clone(), offset..offset + len);
            offset += len;
        }
        let mut json = serde_json::to_vec(&header)?;
        // Pad with spaces so the data starts 8-byte aligned, as the reference writer does.
        json.resize(json.len().next_multiple_of(8), b' ');
        let data_start = 8 + json.len() as u64;
        let places = data_offsets.into_iter().map(|(n, r)| (n, r.start + data_start..r.end + data_start)).collect();
        let tmp = dir.join(ADAPTER_WEIGHTS_FILE).with_extension("tmp");
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&(json.len() as u64).to_le_bytes())?;
        file.write_all(&json)?;
        file.set_len(data_start + offset)?;
        Ok(OutputFile { dir: dir.to_path_buf(), created_dir, tmp, file, places })
    }

    /// Writes tensor `name`'s values (as many as its shape holds) and starts their write-back.
    fn write(&self, name: &str, values: &[f32]) -> Result<(), Declined> {
        let place = &self.places[name];
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let bytes = &bytes[..(place.end - place.start) as usize];
        self.file
            .write_all_at(bytes, place.start)
            .map_err(|e| Declined(format!("cannot write {}: {e}", self.tmp.display())))?;
        // SAFETY: a plain syscall on an open descriptor; it only schedules write-back.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                place.start as libc::off64_t,
                bytes.len() as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        Ok(())
    }

    fn commit(&self, config: &PeftConfig) -> std::io::Result<()> {
        self.file.sync_all()?;
        flotilla_files::commit(&self.tmp, &self.dir.join(ADAPTER_WEIGHTS_FILE))?;
        let json = serde_json::to_vec_pretty(config).map_err(std::io::Error::other)?;
        flotilla_files::write_atomically(&self.dir.join(ADAPTER_CONFIG_FILE), &json)
    }

    fn abandon(&self) {
        let _ = fs::remove_file(&self.tmp);
        if self.created_dir {
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("the offline fast path reads safetensors' little-endian f32 in place");
