//! A Rényi-DP accountant for the subsampled Gaussian mechanism: what device-level differential
//! privacy spends per round, and the (ε, δ) of a whole run.
//!
//! One round samples each device with probability `q` and adds Gaussian noise of standard deviation
//! `σ·C` to sums whose sensitivity to one device is `C` (σ is the noise multiplier). Its Rényi
//! divergence of order α is bounded by `log(A_α) / (α − 1)` (Mironov, Talwar and Zhang, "Rényi
//! Differential Privacy of the Sampled Gaussian Mechanism", 2019, §3.3), which composes additively
//! over rounds. An RDP guarantee converts to (ε, δ)-DP with Balle et al. 2020, Theorem 21:
//! `ε = rdp_α + log((α − 1)/α) − (log δ + log α) / (α − 1)`, minimised over the orders.
//!
//! The orders are those Opacus uses by default, so results can be checked against it
//! (`deploy/privacy/opacus_reference.py`, fixtures in `common/engine/tests/fixtures/`).

use std::f64::consts::PI;

/// Why the accountant cannot answer.
#[derive(Debug, Clone, PartialEq)]
pub enum AccountantError {
    /// The noise multiplier must be a positive, finite number.
    NoiseMultiplier(f64),
    /// The sampling rate must lie in [0, 1].
    SamplingRate(f64),
    /// δ must lie strictly between 0 and 1.
    Delta(f64),
    /// The series for a fractional order did not converge (parameters far outside any useful range).
    NoConvergence { order: f64 },
}

impl std::fmt::Display for AccountantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AccountantError::NoiseMultiplier(v) => {
                write!(f, "the noise multiplier must be positive and finite, got {v}")
            }
            AccountantError::SamplingRate(v) => write!(f, "the sampling rate must lie in [0, 1], got {v}"),
            AccountantError::Delta(v) => write!(f, "δ must lie strictly between 0 and 1, got {v}"),
            AccountantError::NoConvergence { order } => {
                write!(f, "the RDP series at order {order} did not converge")
            }
        }
    }
}

impl std::error::Error for AccountantError {}

/// The orders at which RDP is tracked: 1.1, 1.2, …, 10.9, then 12, 13, …, 63.
pub fn default_orders() -> Vec<f64> {
    (1..100).map(|x| 1.0 + f64::from(x) / 10.0).chain((12..64).map(f64::from)).collect()
}

/// The privacy spent so far, as RDP at each order.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        RdpAccountant::new()
    }
}

impl RdpAccountant {
    /// Nothing spent yet, at the [`default_orders`].
    pub fn new() -> RdpAccountant {
        let orders = default_orders();
        RdpAccountant { rdp: vec![0.0; orders.len()], orders }
    }

    /// The RDP of `rounds` more rounds with this noise multiplier and sampling rate.
    pub fn rounds_rdp(
        &self,
        noise_multiplier: f64,
        sampling_rate: f64,
        rounds: u32,
    ) -> Result<Vec<f64>, AccountantError> {
        self.orders
            .iter()
            .map(|&order| Ok(sampled_gaussian_rdp(sampling_rate, noise_multiplier, order)? * f64::from(rounds)))
            .collect()
    }

    /// Records `rounds` rounds.
    pub fn spend(&mut self, noise_multiplier: f64, sampling_rate: f64, rounds: u32) -> Result<(), AccountantError> {
        let more = self.rounds_rdp(noise_multiplier, sampling_rate, rounds)?;
        for (total, more) in self.rdp.iter_mut().zip(more) {
            *total += more;
        }
        Ok(())
    }

    /// (ε, the order that gave it) of what was spent, at `delta`.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), AccountantError> {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }

    /// (ε, order) if `rounds` more rounds were spent: what a budget check asks before a round starts.
    pub fn epsilon_after(
        &self,
        noise_multiplier: f64,
        sampling_rate: f64,
        rounds: u32,
        delta: f64,
    ) -> Result<(f64, f64), AccountantError> {
        let more = self.rounds_rdp(noise_multiplier, sampling_rate, rounds)?;
        let total: Vec<f64> = self.rdp.iter().zip(more).map(|(a, b)| a + b).collect();
        epsilon_from_rdp(&self.orders, &total, delta)
    }
}

/// The smallest ε over the orders (Balle et al. 2020, Theorem 21), and its order. `f64::INFINITY`
/// when every order gives no guarantee.
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64), AccountantError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::Delta(delta));
    }
    let best = orders
        .iter()
        .zip(rdp)
        .map(|(&alpha, &r)| (r + ((alpha - 1.0) / alpha).ln() - (delta.ln() + alpha.ln()) / (alpha - 1.0), alpha))
        .filter(|(eps, _)| !eps.is_nan())
        .min_by(|a, b| a.0.total_cmp(&b.0));
    Ok(best.unwrap_or((f64::INFINITY, f64::NAN)))
}

/// RDP at order `alpha` (> 1) of one round of the Gaussian mechanism with noise multiplier `sigma`
/// applied to a subsample drawn with rate `q`.
pub fn sampled_gaussian_rdp(q: f64, sigma: f64, alpha: f64) -> Result<f64, AccountantError> {
    if !(sigma.is_finite() && sigma > 0.0) {
        return Err(AccountantError::NoiseMultiplier(sigma));
    }
    if !(0.0..=1.0).contains(&q) {
        return Err(AccountantError::SamplingRate(q));
    }
    if q == 0.0 {
        return Ok(0.0);
    }
    if q == 1.0 {
        // The plain Gaussian mechanism: α / (2σ²).
        return Ok(alpha / (2.0 * sigma * sigma));
    }
    let log_a =
        if alpha.fract() == 0.0 { log_a_integer(q, sigma, alpha as u64) } else { log_a_fractional(q, sigma, alpha)? };
    Ok(log_a / (alpha - 1.0))
}

/// `log(A_α)` for an integer order: a finite binomial sum,
/// `A_α = Σ_{i=0..α} C(α, i) q^i (1−q)^(α−i) exp((i² − i) / (2σ²))`.
fn log_a_integer(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let mut log_binomial = 0.0; // log C(α, 0)
    for i in 0..=alpha {
        let i_f = i as f64;
        let term = log_binomial
            + i_f * q.ln()
            + (alpha as f64 - i_f) * (1.0 - q).ln()
            + (i_f * i_f - i_f) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
        log_binomial += ((alpha - i) as f64).ln() - ((i + 1) as f64).ln();
    }
    log_a
}

/// `log(A_α)` for a fractional order: the integral split at `z0` into two series whose terms are
/// generalised binomial coefficients times Gaussian tails, summed until both fall below e^-30.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> Result<f64, AccountantError> {
    const MAX_TERMS: u32 = 100_000;
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    // C(α, i) by its recurrence C(α, i+1) = C(α, i)·(α − i)/(i + 1): its logarithm and its sign.
    let (mut log_coef, mut positive) = (0.0f64, true);
    for i in 0..MAX_TERMS {
        let i_f = f64::from(i);
        let j = alpha - i_f;
        let log_t0 = log_coef + i_f * q.ln() + j * (1.0 - q).ln();
        let log_t1 = log_coef + j * q.ln() + i_f * (1.0 - q).ln();
        let log_e0 = 0.5f64.ln() + log_erfc((i_f - z0) / (2f64.sqrt() * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (2f64.sqrt() * sigma));
        let log_s0 = log_t0 + (i_f * i_f - i_f) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if positive {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        if log_s0.max(log_s1) < -30.0 {
            return Ok(log_add(log_a0, log_a1));
        }
        let factor = alpha - i_f;
        log_coef += factor.abs().ln() - (i_f + 1.0).ln();
        if factor < 0.0 {
            positive = !positive;
        }
    }
    Err(AccountantError::NoConvergence { order: alpha })
}

/// `log(e^a + e^b)`.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a >= b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `log(e^a − e^b)` for `a ≥ b`; when `b > a` (rounding at the end of a converged series) the
/// difference is taken as zero.
fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    if a <= b {
        return f64::NEG_INFINITY;
    }
    a + (-(b - a).exp()).ln_1p()
}

/// `log(erfc(x))`, accurate also where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        return libm::erfc(x).ln();
    }
    // erfc(x) = e^(−x²) / (x√π) · (1 − 1/(2x²) + 3/(4x⁴) − 15/(8x⁶) + …) for large x.
    let inv = 1.0 / (x * x);
    let series = 1.0 - 0.5 * inv + 0.75 * inv * inv - 1.875 * inv * inv * inv;
    -x * x - x.ln() - 0.5 * PI.ln() + series.ln()
}

#[cfg(test)]
mod tests {
    use std::f64::consts::LN_2;

    use super::*;

    #[test]
    fn without_subsampling_the_rdp_is_the_gaussian_closed_form() {
        for sigma in [0.5, 1.0, 3.0] {
            for alpha in [1.5, 2.0, 7.0, 32.0] {
                assert_eq!(sampled_gaussian_rdp(1.0, sigma, alpha).unwrap(), alpha / (2.0 * sigma * sigma));
            }
        }
        // ε of T rounds, minimised over the orders, against the conversion done by hand.
        let mut accountant = RdpAccountant::new();
        accountant.spend(2.0, 1.0, 10).unwrap();
        let (eps, order) = accountant.epsilon(1e-5).unwrap();
        let by_hand = |a: f64| 10.0 * a / 8.0 + ((a - 1.0) / a).ln() - (1e-5f64.ln() + a.ln()) / (a - 1.0);
        let best = default_orders().into_iter().map(by_hand).fold(f64::INFINITY, f64::min);
        assert!((eps - best).abs() < 1e-12 && (by_hand(order) - eps).abs() < 1e-12, "{eps} {best}");
    }

    #[test]
    fn subsampling_amplifies_privacy_and_rounds_compose() {
        let full = sampled_gaussian_rdp(1.0, 1.0, 8.0).unwrap();
        let sampled = sampled_gaussian_rdp(0.1, 1.0, 8.0).unwrap();
        assert!(sampled > 0.0 && sampled < full, "{sampled} vs {full}");
        assert_eq!(sampled_gaussian_rdp(0.0, 1.0, 8.0).unwrap(), 0.0);
        // Integer and fractional orders agree where they meet.
        let near = sampled_gaussian_rdp(0.1, 1.0, 8.0 + 1e-9).unwrap();
        assert!((near - sampled).abs() < 1e-6 * sampled, "{near} vs {sampled}");
        let mut once = RdpAccountant::new();
        once.spend(1.1, 0.05, 30).unwrap();
        let mut stepwise = RdpAccountant::new();
        for _ in 0..30 {
            stepwise.spend(1.1, 0.05, 1).unwrap();
        }
        let (a, b) = (once.epsilon(1e-5).unwrap().0, stepwise.epsilon(1e-5).unwrap().0);
        assert!((a - b).abs() < 1e-9 * a);
        assert_eq!(once.epsilon_after(1.1, 0.05, 0, 1e-5).unwrap(), once.epsilon(1e-5).unwrap());
        assert!(once.epsilon_after(1.1, 0.05, 1, 1e-5).unwrap().0 > a, "another round spends more");
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert_eq!(sampled_gaussian_rdp(0.1, 0.0, 2.0), Err(AccountantError::NoiseMultiplier(0.0)));
        assert_eq!(sampled_gaussian_rdp(0.1, -1.0, 2.0), Err(AccountantError::NoiseMultiplier(-1.0)));
        assert!(matches!(sampled_gaussian_rdp(0.1, f64::NAN, 2.0), Err(AccountantError::NoiseMultiplier(_))));
        assert_eq!(sampled_gaussian_rdp(1.5, 1.0, 2.0), Err(AccountantError::SamplingRate(1.5)));
        let accountant = RdpAccountant::new();
        for delta in [0.0, 1.0, -0.1, f64::NAN] {
            assert!(matches!(accountant.epsilon(delta), Err(AccountantError::Delta(_))));
        }
    }

    #[test]
    fn log_erfc_is_continuous_where_it_changes_method() {
        let below = log_erfc(25.0 - 1e-9);
        let above = log_erfc(25.0 + 1e-9);
        assert!((below - above).abs() < 1e-6 * below.abs(), "{below} {above}");
        assert!((log_erfc(0.0) - 0.0).abs() < 1e-15);
        assert!((log_erfc(-30.0) - LN_2).abs() < 1e-15);
    }
}
