//! The study's privacy axis: δ for the fleet, and the noise multiplier that spends a given ε over
//! a run's rounds (the coordinator's accountant, `flotilla_engine::accountant`).

use super::Plan;

/// δ of the privacy axis: a tenth of 1/N for the N devices of the fleet.
pub fn privacy_delta(plan: &Plan) -> f64 {
    0.1 / f64::from(plan.fleet_size())
}

/// The smallest noise multiplier (to 0.1%) whose `rounds` full-participation rounds stay within ε
/// at `delta`.
pub fn noise_for(epsilon: f64, rounds: u32, delta: f64) -> f64 {
    let spent = |sigma: f64| {
        flotilla_engine::accountant::RdpAccountant::new()
            .epsilon_after(sigma, 1.0, rounds, delta)
            .map_or(f64::INFINITY, |(e, _)| e)
    };
    let (mut low, mut high): (f64, f64) = (0.05, 10_000.0);
    while high / low > 1.001 {
        let mid = (low * high).sqrt();
        if spent(mid) <= epsilon {
            high = mid;
        } else {
            low = mid;
        }
    }
    high
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_noise_multiplier_spends_the_budget_over_the_rounds() {
        let delta = 1e-3;
        for (epsilon, rounds) in [(1.0, 20), (8.0, 20), (4.0, 5)] {
            let sigma = noise_for(epsilon, rounds, delta);
            let spent = |s: f64| {
                flotilla_engine::accountant::RdpAccountant::new().epsilon_after(s, 1.0, rounds, delta).unwrap().0
            };
            assert!(
                spent(sigma) <= epsilon && spent(sigma / 1.01) > epsilon,
                "ε {epsilon}, {rounds} rounds: σ {sigma}"
            );
        }
        assert!(noise_for(1.0, 20, delta) > noise_for(8.0, 20, delta));
    }
}
