//! Central differential privacy for the slot-wise methods: clipped changes, summed with fixed
//! weights, Gaussian noise on the sums, fixed denominators.
//!
//! Each device of rank r_k received the global adapter g (its first r_k slots, or all of it under
//! Fold-and-Fill) and uploads x_k; its change is Δ_k = x_k − g over its slots and the head. The
//! device clips ‖Δ_k‖₂ ≤ C over everything it uploads, and this accumulator refuses an update whose
//! change exceeds C. With every device weighing 1 (sample counts are the devices' data and
//! unbounded, so they cannot weigh a sum whose sensitivity must be bounded), the sums are
//!
//! ```text
//! SA_i = Σ_{k∈S_i} ΔA_k[i,:]    SB_i = Σ_{k∈S_i} ΔB_k[:,i]    SH = Σ_k ΔH_k        (S_i = { k : r_k > i })
//! ```
//!
//! One device is in each of these sums at most once and its changes together have norm ≤ C, so
//! adding or removing one device moves the vector of all the sums by at most C in L2: the
//! sensitivity is C. Every coordinate gets independent Gaussian noise of standard deviation σ·C
//! (σ: the noise multiplier), which is the Gaussian mechanism whose subsampled composition the
//! accountant (`flotilla_engine::accountant`) tracks. The new global is then post-processing with
//! denominators that depend only on the round's population (the connected devices and their
//! ranks, which the coordinator knows without any device's data) and the sampling rate q:
//!
//! ```text
//! rbla:                   A[i,:] = g_A[i,:] + (SA_i + N(0, σ²C²)) / (q·M_i)    M_i = #{population devices of rank > i}
//! fold-and-fill, fedavg:  A[i,:] = g_A[i,:] + (SA_i + N(0, σ²C²)) / (q·M)      M   = #population
//! head:                   H      = g_H      + (SH   + N(0, σ²C²)) / (q·M)
//! ```
//!
//! (B likewise.) With q = 1, every device answering and equal sample counts, these are exactly the
//! plain methods' formulas written as changes (RBLA averages each slot over its supporters;
//! Fold-and-Fill over the whole round). A slot no device of the population covers stays as it is
//! and gets no noise. Methods whose result depends on individual updates in other ways (zero-pad
//! averages the received values too, so a device's mere presence shifts a slot by g/N, beyond C;
//! HetLoRA's norms, FlexLoRA's products, FLoRA's stacking, coverage-scaled RBLA's √q_i) are not
//! offered under privacy: [`private_denominator`] is `None` for them.

use std::collections::BTreeMap;

use rand::Rng;
use rand_distr::{Distribution, Normal};
use tch::{Device, Kind, Tensor};

use flotilla_merge::slots::Denominator;

use super::{validate_update, AggregateError, Aggregated, ClientUpdate, Method};
use crate::adapter::{tensor_role, Adapter, TensorRole};
use crate::tensor::TensorError;
pub use flotilla_wire::model::Trainable;

/// The divisor `method` uses under differential privacy (its row, `MethodSpec::private`), or
/// `None` when it cannot run under it. Under privacy it is an expected count: `Coverage` is q·M_i,
/// the sampled devices expected to cover slot i (RBLA; FedAvg, whose devices cover every slot);
/// `AllClientsFilled` is q·M, every sampled device, a device that lacks a slot adding no change to
/// it (Fold-and-Fill).
pub fn private_denominator(method: Method) -> Option<Denominator> {
    method.spec().private.ok()
}

/// Why `method` cannot run under differential privacy (for configuration errors).
pub fn why_not_private(method: Method) -> Option<&'static str> {
    method.spec().private.err()
}

/// The clipping bound C, the noise multiplier σ (noise standard deviation σ·C on each sum), and
/// what devices train: under [`Trainable::BOnly`] every A factor is frozen at the global's, so A is
/// neither summed nor noised, an update that changed it is refused, and the next global keeps it
/// exactly.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyParameters {
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    pub trainable: Trainable,
}

/// Whether `name` is a tensor devices train (and the sums hold) under `trainable`.
fn noised(name: &str, trainable: Trainable) -> bool {
    !(trainable == Trainable::BOnly && matches!(tensor_role(name), TensorRole::LoraA(_)))
}

/// The coordinates the noise goes on: every trainable tensor of `global`, without the A factors
/// when they are frozen (the planner's d).
pub fn noised_coordinates(global: &Adapter, trainable: Trainable) -> usize {
    global.trainable_names().filter(|n| noised(n, trainable)).map(|n| global.tensors()[n].numel()).sum()
}

/// Slack on the clipping bound for what float rounding does to a clipped change (relative).
const CLIP_TOLERANCE: f64 = 1e-4;

/// A round's private accumulator: the sums of clipped changes.
pub struct PrivateSums {
    previous: Adapter,
    denominator: Denominator,
    parameters: PrivacyParameters,
    scale: f64,
    /// Per trainable tensor of the global adapter: the sum of the changes (f64, global-sized).
    sums: BTreeMap<String, Tensor>,
    folded: usize,
    largest_norm: f64,
}

impl PrivateSums {
    /// A fresh accumulator over `global` (whose factors use LoRA scale `scale`) for `method`.
    pub fn new(
        global: &Adapter,
        method: Method,
        scale: f64,
        parameters: PrivacyParameters,
    ) -> Result<PrivateSums, AggregateError> {
        let denominator = private_denominator(method)
            .filter(|d| matches!(d, Denominator::Coverage | Denominator::AllClientsFilled))
            .ok_or_else(|| AggregateError::InvalidUpdate {
                client: "configuration".into(),
                message: format!("{method} cannot run under differential privacy"),
            })?;
        let mut sums = BTreeMap::new();
        for name in global.trainable_names().filter(|n| noised(n, parameters.trainable)) {
            let t = &global.tensors()[name];
            sums.insert(name.to_string(), Tensor::f_zeros(t.size(), (Kind::Double, Device::Cpu))?);
        }
        Ok(PrivateSums {
            previous: global.deep_copy(),
            denominator,
            parameters,
            scale,
            sums,
            folded: 0,
            largest_norm: 0.0,
        })
    }

    /// An accumulator holding sums made elsewhere: the unmasked sums of a secure round whose
    /// devices added the noise themselves (distributed mode; see [`PrivateSums::finish_noised`]).
    pub fn from_sums(
        global: &Adapter,
        method: Method,
        scale: f64,
        parameters: PrivacyParameters,
        sums: BTreeMap<String, Tensor>,
        devices: usize,
    ) -> Result<PrivateSums, AggregateError> {
        let mut accumulator = PrivateSums::new(global, method, scale, parameters)?;
        for (name, sum) in &mut accumulator.sums {
            let given = sums.get(name).ok_or_else(|| AggregateError::InvalidUpdate {
                client: "secure aggregate".into(),
                message: format!("no sums for tensor '{name}'"),
            })?;
            *sum = given.f_to_kind(Kind::Double)?;
        }
        accumulator.folded = devices;
        Ok(accumulator)
    }

    pub fn folded(&self) -> usize {
        self.folded
    }

    /// Validates `update`, checks that its change is within the clipping bound, and adds it.
    pub fn fold(&mut self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        validate_update(&self.previous, update)?;
        let invalid = |message: String| AggregateError::InvalidUpdate { client: update.client.to_string(), message };
        if (update.scale - self.scale).abs() > 1e-9 * self.scale.abs().max(1.0) {
            return Err(invalid(format!(
                "under differential privacy every device trains at the coordinator's LoRA scale {}, not {}",
                self.scale, update.scale
            )));
        }
        let adapter = update.adapter;
        let norm = adapter.change_norm(&self.previous)?;
        let bound = self.parameters.clip_norm;
        if !norm.is_finite() || norm > bound * (1.0 + CLIP_TOLERANCE) {
            return Err(invalid(format!(
                "its change has L2 norm {norm:.6}, above the clipping bound {bound} of [privacy] (devices clip their \
                 updates under differential privacy; is this device's flotilla-edge too old?)"
            )));
        }
        let r = adapter.rank() as i64;
        self.check_frozen(update)?;
        for name in adapter.trainable_names().filter(|n| noised(n, self.parameters.trainable)) {
            let torch = |source| AggregateError::Adapter(TensorError::Torch { name: name.to_string(), source }.into());
            let sum =
                self.sums.get(name).ok_or_else(|| invalid(format!("tensor '{name}' is not in the global adapter")))?;
            let target = match tensor_role(name) {
                TensorRole::LoraA(_) => sum.f_narrow(0, 0, r),
                TensorRole::LoraB(_) => sum.f_narrow(1, 0, r),
                _ => Ok(sum.shallow_clone()),
            }
            .map_err(torch)?;
            let global = &self.previous.tensors()[name];
            let reference = match tensor_role(name) {
                TensorRole::LoraA(_) => global.f_narrow(0, 0, r),
                TensorRole::LoraB(_) => global.f_narrow(1, 0, r),
                _ => Ok(global.shallow_clone()),
            }
            .map_err(torch)?;
            let change = adapter.tensors()[name]
                .f_to_kind(Kind::Double)
                .and_then(|t| t.f_sub(&reference.f_to_kind(Kind::Double)?))
                .map_err(torch)?;
            let mut target = target;
            let _ = target.f_add_(&change).map_err(torch)?;
        }
        self.folded += 1;
        self.largest_norm = self.largest_norm.max(norm);
        Ok(())
    }

    /// Under [`Trainable::BOnly`]: refuses an update whose A factors are not the global's, bit for bit.
    fn check_frozen(&self, update: &ClientUpdate<'_>) -> Result<(), AggregateError> {
        if self.parameters.trainable != Trainable::BOnly {
            return Ok(());
        }
        let r = update.adapter.rank() as i64;
        for module in update.adapter.modules() {
            let (a, _) = update.adapter.factors(module);
            let (global_a, _) = self.previous.factors(module);
            let same = global_a.f_narrow(0, 0, r).is_ok_and(|g| g.size() == a.size() && g.equal(a));
            if !same {
                return Err(AggregateError::InvalidUpdate {
                    client: update.client.to_string(),
                    message: format!(
                        "its lora_A of '{module}' differs from the global's, but [privacy] trainable = \"b_only\" \
                         freezes every A factor"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Noises the sums and makes the next global adapter. `population` counts the devices the
    /// round sampled from by rank; `sampling_rate` is q; `rng` draws the noise (from the operating
    /// system's entropy in a real run).
    pub fn finish(
        self,
        population: &BTreeMap<u32, usize>,
        sampling_rate: f64,
        rng: &mut impl Rng,
    ) -> Result<Aggregated, AggregateError> {
        let sd = self.parameters.noise_multiplier * self.parameters.clip_norm;
        self.finish_with_noise(population, sampling_rate, Some((sd, rng)))
    }

    /// Makes the next global adapter from sums the devices already noised (distributed mode): the
    /// same fixed denominators as [`PrivateSums::finish`], no noise added here.
    pub fn finish_noised(
        self,
        population: &BTreeMap<u32, usize>,
        sampling_rate: f64,
    ) -> Result<Aggregated, AggregateError> {
        self.finish_with_noise::<rand_chacha::ChaCha20Rng>(population, sampling_rate, None)
    }

    /// The next global adapter, with Gaussian noise of standard deviation `noise.0` drawn from
    /// `noise.1` on each sum (none: the sums are already noised).
    fn finish_with_noise<R: Rng>(
        self,
        population: &BTreeMap<u32, usize>,
        sampling_rate: f64,
        mut noise: Option<(f64, &mut R)>,
    ) -> Result<Aggregated, AggregateError> {
        let sd = noise.as_ref().map_or(0.0, |(sd, _)| *sd);
        let normal = Normal::new(0.0, sd).map_err(|e| AggregateError::InvalidUpdate {
            client: "configuration".into(),
            message: format!("noise standard deviation {sd}: {e}"),
        })?;
        let total: usize = population.values().sum();
        // M_i: population devices whose rank covers slot i.
        let covering = |slot: usize| -> usize {
            population.iter().filter(|(&rank, _)| rank as usize > slot).map(|(_, &n)| n).sum()
        };
        let denominator = |slot: Option<usize>| -> f64 {
            let devices = match (self.denominator, slot) {
                (Denominator::Coverage, Some(slot)) => covering(slot),
                _ => total,
            };
            sampling_rate * devices as f64
        };
        let mut tensors = BTreeMap::new();
        for (name, t) in self.previous.tensors() {
            let torch = |source| AggregateError::Adapter(TensorError::Torch { name: name.clone(), source }.into());
            let Some(sum) = self.sums.get(name) else {
                tensors.insert(name.clone(), t.copy());
                continue;
            };
            // The divisor of each element: per slot for the factors, one for anything else.
            let (slot_dim, slots) = match tensor_role(name) {
                TensorRole::LoraA(_) => (Some(0), self.previous.rank()),
                TensorRole::LoraB(_) => (Some(1), self.previous.rank()),
                _ => (None, 1),
            };
            let divisors: Vec<f64> = (0..slots).map(|i| denominator(slot_dim.map(|_| i))).collect();
            let mut step = match noise.as_mut() {
                Some((_, rng)) => {
                    let values: Vec<f64> = (0..sum.numel()).map(|_| normal.sample(*rng)).collect();
                    let values = Tensor::f_from_slice(&values).and_then(|n| n.f_reshape(sum.size())).map_err(torch)?;
                    sum.f_add(&values).map_err(torch)?
                }
                None => sum.shallow_clone(),
            };
            // A slot (or head) no population device covers: no change, no noise.
            let divisors_safe: Vec<f64> = divisors.iter().map(|&d| if d > 0.0 { d } else { f64::INFINITY }).collect();
            let divisor = Tensor::f_from_slice(&divisors_safe).map_err(torch)?;
            let divisor = match slot_dim {
                Some(0) => divisor.f_reshape([slots as i64, 1]),
                Some(_) => divisor.f_reshape([1, slots as i64]),
                None => divisor.f_reshape(vec![1i64; sum.dim().max(1)].as_slice()),
            }
            .map_err(torch)?;
            step = step.f_div(&divisor).map_err(torch)?;
            let next = t
                .f_to_kind(Kind::Double)
                .and_then(|g| g.f_add(&step))
                .and_then(|n| n.f_to_kind(t.kind()))
                .map_err(torch)?;
            tensors.insert(name.clone(), next);
        }
        let adapter = Adapter::new(tensors)?;
        let notes = vec![format!(
            "privacy: {} clipped update(s) (largest change {:.4} ≤ C = {}), Gaussian noise σ·C = {sd:.4} on each sum \
             (0: added by the devices), q = {sampling_rate}, population {total}{}",
            self.folded,
            self.largest_norm,
            self.parameters.clip_norm,
            if self.parameters.trainable == Trainable::BOnly { "; every A factor frozen" } else { "" }
        )];
        Ok(Aggregated { adapter, notes })
    }
}
