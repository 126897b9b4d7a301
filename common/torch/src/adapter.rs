//! A LoRA adapter: named tensors in PEFT layout.
//!
//! For an adapted module `m`, `m.lora_A.weight` is `r × d_in` (rank on rows) and `m.lora_B.weight`
//! is `d_out × r` (rank on columns); the layer computes `W0·x + s·B·A·x`. Rank slot `i` is row `i`
//! of A and column `i` of B. Every other tensor is a trainable non-LoRA parameter (e.g. a
//! classifier head) that is shared at full size by every rank.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use flotilla_wire::tensor::{all_finite_bytes, DType, FloatBits, WireTensors};

use crate::tensor::{
    f32_tensor_from_le_bytes, tensors_from_wire, try_copy, wire_from_tensors, DecodedTensors, TensorError,
};

pub use flotilla_merge::peft::{
    lora_a_name, lora_b_name, merged_delta_name, tensor_role, PeftConfig, TensorRole, ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE, LORA_A_SUFFIX, LORA_B_SUFFIX, MERGED_DELTA_SUFFIX, NUM_SAMPLES_KEY,
};

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("tensor '{name}': {message}")]
    Tensor { name: String, message: String },
    #[error("adapter is inconsistent: {0}")]
    Inconsistent(String),
    #[error(transparent)]
    Wire(#[from] TensorError),
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
}

/// A validated adapter: every module has both factors, all factors are 2-D and share one rank.
#[derive(Debug)]
pub struct Adapter {
    tensors: BTreeMap<String, Tensor>,
    modules: Vec<String>,
    rank: usize,
    /// Set when every value was checked finite while decoding untrusted bytes ([`Adapter::from_wire`],
    /// [`Adapter::load_peft`]), so validation need not read the tensors again.
    finite_checked: bool,
}

impl Adapter {
    pub fn new(tensors: BTreeMap<String, Tensor>) -> Result<Adapter, AdapterError> {
        let mut modules = Vec::new();
        let mut rank: Option<usize> = None;
        for name in tensors.keys() {
            let module = match tensor_role(name) {
                TensorRole::LoraA(module) => module,
                TensorRole::LoraB(module) => {
                    if !tensors.contains_key(&lora_a_name(module)) {
                        return Err(AdapterError::Tensor {
                            name: name.clone(),
                            message: "has no matching lora_A".into(),
                        });
                    }
                    continue;
                }
                TensorRole::MergedDelta(module) => {
                    let factors = tensors.get(&lora_a_name(module)).zip(tensors.get(&lora_b_name(module)));
                    let Some((a, b)) = factors else {
                        return Err(AdapterError::Tensor {
                            name: name.clone(),
                            message: "a merged delta needs the module's lora_A and lora_B".into(),
                        });
                    };
                    let want = vec![b.size().first().copied().unwrap_or(0), a.size().last().copied().unwrap_or(0)];
                    if tensors[name].size() != want {
                        return Err(AdapterError::Tensor {
                            name: name.clone(),
                            message: format!(
                                "shape {:?}, expected {want:?} (B's rows × A's columns)",
                                tensors[name].size()
                            ),
                        });
                    }
                    continue;
                }
                TensorRole::Other => continue,
            };
            let a = &tensors[name];
            let b_name = lora_b_name(module);
            let b = tensors
                .get(&b_name)
                .ok_or_else(|| AdapterError::Tensor { name: name.clone(), message: "has no matching lora_B".into() })?;
            let (a_size, b_size) = (a.size(), b.size());
            if a_size.len() != 2 || b_size.len() != 2 {
                return Err(AdapterError::Tensor {
                    name: name.clone(),
                    message: format!("LoRA factors must be 2-D, got A {a_size:?} and B {b_size:?}"),
                });
            }
            if a_size[0] != b_size[1] {
                return Err(AdapterError::Tensor {
                    name: name.clone(),
                    message: format!(
                        "A has {} rows but B has {} columns (shapes A {a_size:?}, B {b_size:?})",
                        a_size[0], b_size[1]
                    ),
                });
            }
            let module_rank = a_size[0] as usize;
            match rank {
                None => rank = Some(module_rank),
                Some(r) if r != module_rank => {
                    return Err(AdapterError::Tensor {
                        name: name.clone(),
                        message: format!("rank {module_rank} differs from the adapter's rank {r}"),
                    })
                }
                Some(_) => {}
            }
            modules.push(module.to_string());
        }
        Ok(Adapter { tensors, modules, rank: rank.unwrap_or(0), finite_checked: false })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Adapted module paths, sorted.
    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    pub fn tensors(&self) -> &BTreeMap<String, Tensor> {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// (A, B) of one module. Panics only if `module` is not one of [`Adapter::modules`].
    pub fn factors(&self, module: &str) -> (&Tensor, &Tensor) {
        (&self.tensors[&lora_a_name(module)], &self.tensors[&lora_b_name(module)])
    }

    /// A module's merged update, when online FLoRA has made one.
    pub fn merged_delta(&self, module: &str) -> Option<&Tensor> {
        self.tensors.get(&merged_delta_name(module))
    }

    /// A module's whole update, computed in `kind`: `scale·B·A`, plus its merged delta when it has
    /// one (online FLoRA); `None` when the adapter has no such module.
    pub fn module_update(&self, module: &str, scale: f64, kind: Kind) -> Option<Result<Tensor, tch::TchError>> {
        let (a, b) = (self.tensors.get(&lora_a_name(module))?, self.tensors.get(&lora_b_name(module))?);
        let update = || {
            let product = b.f_to_kind(kind)?.f_matmul(&a.f_to_kind(kind)?)?.f_mul_scalar(scale)?;
            match self.merged_delta(module) {
                Some(delta) => product.f_add(&delta.f_to_kind(kind)?),
                None => Ok(product),
            }
        };
        Some(update())
    }

    /// Names of the merged updates (never trained; carried from round to round).
    pub fn merged_delta_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().filter(|n| matches!(tensor_role(n), TensorRole::MergedDelta(_))).map(String::as_str)
    }

    /// Names of the trainable non-LoRA tensors.
    pub fn other_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().filter(|n| tensor_role(n) == TensorRole::Other).map(String::as_str)
    }

    /// The first `rank` slots of every module (a copy), other tensors copied whole.
    pub fn slice_to_rank(&self, rank: usize) -> Result<Adapter, AdapterError> {
        if rank == 0 || rank > self.rank {
            return Err(AdapterError::Inconsistent(format!(
                "cannot slice a rank-{} adapter to rank {rank}",
                self.rank
            )));
        }
        let r = rank as i64;
        let mut tensors = BTreeMap::new();
        for (name, t) in &self.tensors {
            let sliced = match tensor_role(name) {
                TensorRole::LoraA(_) => t.f_narrow(0, 0, r).and_then(|t| try_copy(&t)),
                TensorRole::LoraB(_) => t.f_narrow(1, 0, r).and_then(|t| try_copy(&t)),
                TensorRole::MergedDelta(_) | TensorRole::Other => try_copy(t),
            }
            .map_err(|source| TensorError::Torch { name: name.clone(), source })?;
            tensors.insert(name.clone(), sliced);
        }
        Adapter::new(tensors)
    }

    /// The first `rank` slots, with the rest of every module folded into a merged delta
    /// `scale·B[:, rank:]·A[rank:, :]` (added to any merged delta already there): what a
    /// Fold-and-Fill device of rank `rank` receives. At the full rank, the plain slice.
    pub fn slice_with_folded_tail(&self, rank: usize, scale: f64) -> Result<Adapter, AdapterError> {
        let slice = self.slice_to_rank(rank)?;
        if rank >= self.rank {
            return Ok(slice);
        }
        let (start, len) = (rank as i64, (self.rank - rank) as i64);
        let mut tensors: BTreeMap<String, Tensor> =
            slice.tensors.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
        for module in &self.modules {
            let (a, b) = self.factors(module);
            let name = merged_delta_name(module);
            let tail = b
                .f_narrow(1, start, len)
                .and_then(|b| b.f_matmul(&a.f_narrow(0, start, len)?))
                .and_then(|t| t.f_mul_scalar(scale))
                .and_then(|t| match self.merged_delta(module) {
                    Some(existing) => t.f_add(existing),
                    None => Ok(t),
                })
                .map_err(|source| TensorError::Torch { name: name.clone(), source })?;
            tensors.insert(name, tail);
        }
        Adapter::new(tensors)
    }

    /// Sets slots `rank..` of every module to zero (A's rows and B's columns), in place.
    pub fn zero_slots_from(&self, rank: usize) -> Result<(), tch::TchError> {
        if rank >= self.rank {
            return Ok(());
        }
        let (start, len) = (rank as i64, (self.rank - rank) as i64);
        for module in &self.modules {
            let (a, b) = self.factors(module);
            let _ = a.f_narrow(0, start, len)?.f_zero_()?;
            let _ = b.f_narrow(1, start, len)?.f_zero_()?;
        }
        Ok(())
    }

    /// Copies slots `rank..` of every module (A's rows and B's columns) from `source`, in place:
    /// the slots a secure round did not reveal keep `source`'s (the previous global) values.
    pub fn copy_slots_from(&self, source: &Adapter, rank: usize) -> Result<(), AdapterError> {
        if rank >= self.rank {
            return Ok(());
        }
        if source.rank != self.rank || source.modules != self.modules {
            return Err(AdapterError::Inconsistent(format!(
                "cannot copy slots from a rank-{} adapter into a rank-{} one with other modules",
                source.rank, self.rank
            )));
        }
        let (start, len) = (rank as i64, (self.rank - rank) as i64);
        for module in &self.modules {
            let (a, b) = self.factors(module);
            let (from_a, from_b) = source.factors(module);
            let torch = |source| AdapterError::from(TensorError::Torch { name: module.clone(), source });
            a.f_narrow(0, start, len)
                .and_then(|mut part| part.f_copy_(&from_a.f_narrow(0, start, len)?))
                .map_err(torch)?;
            b.f_narrow(1, start, len)
                .and_then(|mut part| part.f_copy_(&from_b.f_narrow(1, start, len)?))
                .map_err(torch)?;
        }
        Ok(())
    }

    /// `reference`'s part matching this adapter's tensor `name`: the first `self.rank` slots of a
    /// LoRA factor, a non-LoRA tensor whole.
    fn reference_part(&self, name: &str, reference: &Adapter) -> Result<Tensor, AdapterError> {
        let missing =
            || AdapterError::Tensor { name: name.to_string(), message: "is not in the reference adapter".into() };
        let t = reference.tensors.get(name).ok_or_else(missing)?;
        let r = self.rank as i64;
        let part = match tensor_role(name) {
            TensorRole::LoraA(_) if reference.rank >= self.rank => t.f_narrow(0, 0, r),
            TensorRole::LoraB(_) if reference.rank >= self.rank => t.f_narrow(1, 0, r),
            TensorRole::LoraA(_) | TensorRole::LoraB(_) => {
                return Err(AdapterError::Inconsistent(format!(
                    "a rank-{} adapter cannot be compared with a rank-{} reference",
                    self.rank, reference.rank
                )))
            }
            _ => Ok(t.shallow_clone()),
        }
        .map_err(|source| TensorError::Torch { name: name.to_string(), source })?;
        let own = &self.tensors[name];
        if part.size() != own.size() {
            return Err(AdapterError::Tensor {
                name: name.to_string(),
                message: format!("has shape {:?}, the reference's part {:?}", own.size(), part.size()),
            });
        }
        Ok(part)
    }

    /// The names whose change differential privacy bounds: the LoRA factors and the trainable
    /// non-LoRA tensors (merged deltas are frozen on devices).
    pub fn trainable_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().filter(|n| !matches!(tensor_role(n), TensorRole::MergedDelta(_))).map(String::as_str)
    }

    /// The L2 norm of this adapter's change against `reference` (the adapter it was trained from,
    /// or one it was sliced from: its first `self.rank()` slots are compared), over the LoRA factors
    /// and the trainable non-LoRA tensors.
    pub fn change_norm(&self, reference: &Adapter) -> Result<f64, AdapterError> {
        let mut squares = 0.0;
        for name in self.trainable_names() {
            let part = self.reference_part(name, reference)?;
            let torch = |source| AdapterError::Wire(TensorError::Torch { name: name.to_string(), source });
            let square = self.tensors[name]
                .f_to_kind(Kind::Double)
                .and_then(|t| t.f_sub(&part.f_to_kind(Kind::Double)?))
                .and_then(|d| d.f_square())
                .and_then(|d| d.f_sum(Kind::Double))
                .and_then(|d| d.f_double_value(&[]))
                .map_err(torch)?;
            squares += square;
        }
        Ok(squares.sqrt())
    }

    /// This adapter's change against `reference` (see [`Adapter::change_norm`]): its trainable
    /// tensors, each minus its part of the reference.
    pub fn change_from(&self, reference: &Adapter) -> Result<Adapter, AdapterError> {
        let mut changes = BTreeMap::new();
        for name in self.trainable_names() {
            let part = self.reference_part(name, reference)?;
            let change = self.tensors[name]
                .f_sub(&part)
                .map_err(|source| TensorError::Torch { name: name.to_string(), source })?;
            changes.insert(name.to_string(), change);
        }
        Adapter::new(changes)
    }

    /// Scales this adapter's change against `reference` (see [`Adapter::change_norm`]) so that
    /// its L2 norm is at most `bound`: each tensor becomes `ref + (t − ref)·min(1, bound/‖Δ‖)`.
    /// Returns the norm before clipping.
    pub fn clip_change(&mut self, reference: &Adapter, bound: f64) -> Result<f64, AdapterError> {
        let norm = self.change_norm(reference)?;
        if norm <= bound || norm == 0.0 {
            return Ok(norm);
        }
        let factor = bound / norm;
        let names: Vec<String> = self.trainable_names().map(String::from).collect();
        for name in names {
            let part = self.reference_part(&name, reference)?;
            let own = &self.tensors[&name];
            let clipped = own
                .f_sub(&part)
                .and_then(|d| d.f_mul_scalar(factor))
                .and_then(|d| d.f_add(&part))
                .and_then(|t| t.f_to_kind(own.kind()))
                .map_err(|source| TensorError::Torch { name: name.clone(), source })?;
            self.tensors.insert(name, clipped);
        }
        Ok(norm)
    }

    pub fn deep_copy(&self) -> Adapter {
        Adapter {
            tensors: self.tensors.iter().map(|(n, t)| (n.clone(), t.copy())).collect(),
            modules: self.modules.clone(),
            rank: self.rank,
            finite_checked: self.finite_checked,
        }
    }

    /// Whether every value is known to be finite (checked while decoding).
    pub fn finite_checked(&self) -> bool {
        self.finite_checked
    }

    pub fn to_wire(&self, dtype: DType) -> Result<WireTensors, AdapterError> {
        Ok(wire_from_tensors(self.tensors.iter().map(|(n, t)| (n.as_str(), t)), dtype)?)
    }

    /// Decodes untrusted tensors; every value is checked finite while it is copied.
    pub fn from_wire(wire: &WireTensors) -> Result<Adapter, AdapterError> {
        let (decoded, all_finite) = tensors_from_wire(wire)?;
        Adapter::from_decoded(DecodedTensors {
            tensors: decoded,
            all_finite,
            wire_bytes: wire.body.len() as u64,
            frame_bytes: 0,
        })
    }

    /// An adapter from tensors decoded off the wire (see `tensor::read_frame_decoded`); refused
    /// when a value is not finite (the error names the first such tensor) or a name repeats.
    pub fn from_decoded(decoded: DecodedTensors) -> Result<Adapter, AdapterError> {
        let DecodedTensors { tensors: decoded, all_finite, .. } = decoded;
        if !all_finite {
            // Which tensor: read with the fallible calls, as everything an update reaches is.
            let finite = |t: &Tensor| t.f_isfinite()?.f_all()?.f_int64_value(&[]).map(|all| all != 0);
            let name = decoded
                .iter()
                .find(|(_, t)| !finite(t).unwrap_or(false))
                .map_or("<some tensor>".to_string(), |(name, _)| name.clone());
            return Err(AdapterError::Tensor { name, message: "contains NaN or infinite values".into() });
        }
        let mut tensors = BTreeMap::new();
        for (name, tensor) in decoded {
            if tensors.insert(name.clone(), tensor).is_some() {
                return Err(AdapterError::Tensor { name, message: "appears twice".into() });
            }
        }
        let mut adapter = Adapter::new(tensors)?;
        adapter.finite_checked = true;
        Ok(adapter)
    }

    /// Writes `adapter_model.safetensors` (f32, with `metadata`) and `adapter_config.json`.
    pub fn save_peft(
        &self,
        dir: &Path,
        config: &PeftConfig,
        metadata: HashMap<String, String>,
    ) -> Result<(), AdapterError> {
        let file_err = |path: &Path, message: String| AdapterError::File { path: path.to_path_buf(), message };
        fs::create_dir_all(dir).map_err(|e| file_err(dir, e.to_string()))?;
        let wire = self.to_wire(DType::F32)?;
        let mut views = Vec::with_capacity(wire.descs.len());
        let mut offset = 0usize;
        for desc in &wire.descs {
            let len = desc.byte_len().unwrap_or(0) as usize;
            let shape: Vec<usize> = desc.shape.iter().map(|&d| d as usize).collect();
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &wire.body[offset..offset + len])
                    .map_err(|e| file_err(dir, format!("tensor '{}': {e}", desc.name)))?;
            views.push((desc.name.clone(), view));
            offset += len;
        }
        // Streamed from the tensor bytes into a temporary file, then committed (fsync, rename, fsync
        // of the directory).
        let path = dir.join(ADAPTER_WEIGHTS_FILE);
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file(views, Some(metadata), &tmp)
            .map_err(|e| file_err(&tmp, format!("cannot write: {e}")))?;
        flotilla_wire::files::commit(&tmp, &path).map_err(|e| file_err(&path, e.to_string()))?;
        let json =
            serde_json::to_vec_pretty(config).map_err(|e| file_err(dir, format!("cannot encode config: {e}")))?;
        write_atomically(&dir.join(ADAPTER_CONFIG_FILE), &json)
    }

    /// Reads a PEFT adapter directory. f32, f16 and bf16 tensors are widened to f32.
    pub fn load_peft(dir: &Path) -> Result<LoadedAdapter, AdapterError> {
        let weights_path = dir.join(ADAPTER_WEIGHTS_FILE);
        let file_err = |message: String| AdapterError::File { path: weights_path.clone(), message };
        let bytes = map_file(&weights_path)?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| file_err(format!("not a valid safetensors file: {e}")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| file_err(format!("not a valid safetensors file: {e}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let (kind, dtype) = match view.dtype() {
                safetensors::Dtype::F32 => (Kind::Float, FloatBits::F32),
                safetensors::Dtype::F16 => (Kind::Half, FloatBits::F16),
                safetensors::Dtype::BF16 => (Kind::BFloat16, FloatBits::BF16),
                other => return Err(file_err(format!("tensor '{name}' has unsupported dtype {other:?}"))),
            };
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let (tensor, finite) = if dtype == FloatBits::F32 {
                f32_tensor_from_le_bytes(&name, view.data(), &shape).map_err(|e| file_err(e.to_string()))?
            } else {
                let finite = all_finite_bytes(view.data(), dtype);
                let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)
                    .and_then(|t| t.f_to_kind(Kind::Float))
                    .map_err(|e| file_err(format!("tensor '{name}': {e}")))?;
                (tensor, finite)
            };
            if !finite {
                return Err(file_err(format!("tensor '{name}' contains NaN or infinite values")));
            }
            tensors.insert(name, tensor);
        }
        let mut adapter = Adapter::new(tensors).map_err(|e| file_err(e.to_string()))?;
        adapter.finite_checked = true;
        let config_path = dir.join(ADAPTER_CONFIG_FILE);
        let config_text = fs::read_to_string(&config_path)
            .map_err(|e| AdapterError::File { path: config_path.clone(), message: e.to_string() })?;
        let config: PeftConfig = serde_json::from_str(&config_text).map_err(|e| AdapterError::File {
            path: config_path.clone(),
            message: format!("not a valid adapter config: {e}"),
        })?;
        Ok(LoadedAdapter { adapter, config, metadata: header.metadata().clone().unwrap_or_default() })
    }
}

/// A read-only memory map of a file: tensors are copied straight out of the page cache, without
/// first reading the whole file into a fresh buffer.
fn map_file(path: &Path) -> Result<memmap2::Mmap, AdapterError> {
    let err = |message: String| AdapterError::File { path: path.to_path_buf(), message };
    let file = fs::File::open(path).map_err(|e| err(e.to_string()))?;
    // SAFETY: the map is read-only and private to this call; if another process truncates the file
    // meanwhile, reads fault (SIGBUS) rather than return torn data. Adapter files are written
    // atomically (temporary file + rename), so a file being replaced is never the one mapped.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err(format!("cannot map: {e}")))
}

/// Names and shapes of the tensors in a PEFT adapter directory, from the safetensors header only.
pub fn peft_shapes(dir: &Path) -> Result<BTreeMap<String, Vec<usize>>, AdapterError> {
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let bytes = map_file(&path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| AdapterError::File {
        path: path.clone(),
        message: format!("not a valid safetensors file: {e}"),
    })?;
    Ok(st.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect())
}

pub struct LoadedAdapter {
    pub adapter: Adapter,
    pub config: PeftConfig,
    pub metadata: HashMap<String, String>,
}

/// The PEFT config of `adapter` (its rank, its modules, its non-LoRA tensors) with `lora_alpha`.
pub fn peft_config_for(adapter: &Adapter, lora_alpha: f64) -> PeftConfig {
    PeftConfig::for_tensors(adapter.tensors().keys().map(String::as_str), adapter.rank(), lora_alpha)
}

/// Writes `path` so that a crash leaves either the old or the new file, never a torn one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    flotilla_wire::files::write_atomically(path, bytes)
        .map_err(|e| AdapterError::File { path: path.to_path_buf(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapter(rank: i64) -> Adapter {
        let mut t = BTreeMap::new();
        t.insert(lora_a_name("m.fc1"), Tensor::arange(rank * 3, (Kind::Float, tch::Device::Cpu)).reshape([rank, 3]));
        t.insert(lora_b_name("m.fc1"), Tensor::arange(2 * rank, (Kind::Float, tch::Device::Cpu)).reshape([2, rank]));
        t.insert("m.head.weight".into(), Tensor::ones([4, 2], (Kind::Float, tch::Device::Cpu)));
        Adapter::new(t).unwrap()
    }

    #[test]
    fn slicing_takes_rows_of_a_and_columns_of_b() {
        let a = adapter(4);
        let s = a.slice_to_rank(2).unwrap();
        assert_eq!(s.rank(), 2);
        let (sa, sb) = s.factors("m.fc1");
        assert_eq!(sa.size(), vec![2, 3]);
        assert_eq!(sb.size(), vec![2, 2]);
        assert_eq!(sb.double_value(&[1, 1]), 5.0);
        assert_eq!(s.get("m.head.weight").unwrap().size(), vec![4, 2]);
        assert!(a.slice_to_rank(5).is_err());
        assert!(a.slice_to_rank(0).is_err());
    }

    #[test]
    fn zeroing_slots_keeps_the_leading_ones_and_the_rank() {
        let a = adapter(4);
        a.zero_slots_from(2).unwrap();
        let (fa, fb) = a.factors("m.fc1");
        assert_eq!(a.rank(), 4);
        assert_eq!(fa.narrow(0, 0, 2), Tensor::arange(6, (Kind::Float, tch::Device::Cpu)).reshape([2, 3]));
        assert_eq!(fa.narrow(0, 2, 2).abs().sum(Kind::Double).double_value(&[]), 0.0);
        assert_eq!(fb.double_value(&[1, 1]), 5.0);
        assert_eq!(fb.narrow(1, 2, 2).abs().sum(Kind::Double).double_value(&[]), 0.0);
        assert_eq!(a.get("m.head.weight").unwrap().sum(Kind::Double).double_value(&[]), 8.0);
        a.zero_slots_from(4).unwrap();
        assert_eq!(fb.double_value(&[1, 1]), 5.0);
    }

    #[test]
    fn inconsistent_factors_are_rejected() {
        let mut t = BTreeMap::new();
        t.insert(lora_a_name("x"), Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)));
        t.insert(lora_b_name("x"), Tensor::zeros([4, 3], (Kind::Float, tch::Device::Cpu)));
        assert!(Adapter::new(t).is_err());
        let mut t = BTreeMap::new();
        t.insert(lora_a_name("x"), Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)));
        assert!(Adapter::new(t).is_err());
    }

    #[test]
    fn finiteness_is_read_off_the_bits() {
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert!(all_finite_bytes(&f32s(&[0.0, -1.5, f32::MAX, f32::MIN_POSITIVE, 1e-45]), FloatBits::F32));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(!all_finite_bytes(&f32s(&[1.0, bad, 2.0]), FloatBits::F32), "{bad}");
        }
        assert!(all_finite_bytes(&[0x80, 0x3f], FloatBits::BF16));
        assert!(!all_finite_bytes(&[0x80, 0x7f], FloatBits::BF16)); // +inf
        assert!(!all_finite_bytes(&[0xc1, 0xff], FloatBits::BF16)); // NaN
        assert!(!all_finite_bytes(&[0x00, 0x7c], FloatBits::F16)); // +inf
        let wire =
            crate::tensor::wire_from_tensors([("x", &Tensor::from_slice(&[1.0f32, f32::NAN]))], DType::F32).unwrap();
        assert!(Adapter::from_wire(&wire).unwrap_err().to_string().contains("NaN"));
    }

    #[test]
    fn peft_round_trip_keeps_values_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let a = adapter(4);
        let meta = HashMap::from([(NUM_SAMPLES_KEY.to_string(), "123".to_string())]);
        a.save_peft(dir.path(), &peft_config_for(&a, 16.0), meta).unwrap();
        let loaded = Adapter::load_peft(dir.path()).unwrap();
        assert_eq!(loaded.metadata[NUM_SAMPLES_KEY], "123");
        assert_eq!(loaded.config.r, 4);
        for (name, t) in a.tensors() {
            assert!(loaded.adapter.get(name).unwrap().equal(t), "{name}");
        }
    }
}
