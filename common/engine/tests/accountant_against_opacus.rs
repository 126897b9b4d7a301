//! Flotilla's RDP accountant against an independent implementation: (ε, order) from Opacus's RDP
//! accountant over a grid of noise multipliers, sampling rates, round counts and δ, computed by
//! `deploy/privacy/opacus_reference.py` into `fixtures/opacus_rdp.csv`.

use flotilla_engine::accountant::RdpAccountant;

/// Relative tolerance on ε. Both sides sum the same series with the same stopping rule; they differ
/// in their special functions (libm's erfc here, scipy's log_ndtr there) and in the order of
/// floating-point operations. Measured: at most 4.7e-12 over the grid (the test prints it with
/// --nocapture); 1e-9 leaves room for other platforms' libm and still catches any real error.
const TOLERANCE: f64 = 1e-9;

#[test]
fn epsilon_matches_opacus_over_the_grid() {
    let fixtures = include_str!("fixtures/opacus_rdp.csv");
    let mut checked = 0;
    let mut worst = 0.0f64;
    for line in fixtures.lines().skip(1) {
        let v: Vec<f64> = line.split(',').map(|x| x.parse().expect("a number")).collect();
        let (sigma, q, rounds, delta, want_eps, want_order) = (v[0], v[1], v[2] as u32, v[3], v[4], v[5]);
        let mut accountant = RdpAccountant::new();
        accountant.spend(sigma, q, rounds).expect("valid parameters");
        let (eps, order) = accountant.epsilon(delta).expect("valid delta");
        let relative = (eps - want_eps).abs() / want_eps.abs().max(1e-12);
        worst = worst.max(relative);
        assert!(
            relative < TOLERANCE,
            "{line}: ε {eps} (order {order}) against Opacus's {want_eps} (order {want_order})"
        );
        assert_eq!(order, want_order, "{line}: the same order gives the minimum");
        checked += 1;
    }
    assert_eq!(checked, 160, "every fixture row was checked");
    eprintln!("largest relative difference from Opacus: {worst:e}");
}
