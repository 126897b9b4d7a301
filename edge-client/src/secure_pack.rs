//! What a device uploads under secure aggregation: its update laid out and weighted for masking,
//! or under distributed differential privacy its clipped change with its share of the noise.

use flotilla_torch::adapter::Adapter;
use flotilla_wire::protocol::SecureTask;

/// A secure round's vector: the update weighted by min(samples, cap) / cap (the weight stands in
/// for the sample count, which never leaves the device), or under distributed differential privacy
/// the clipped change against `received` with weight 1 and this device's share of the noise.
pub(crate) fn pack_secure(
    trained: &Adapter,
    received: &Adapter,
    samples: usize,
    packing: &SecureTask,
) -> Result<Vec<f32>, String> {
    use flotilla_torch::aggregate::secure;
    let failed = |e: &dyn std::fmt::Display| format!("packing the update for secure aggregation: {e}");
    if packing.noise_std.is_empty() {
        let weight = samples.min(packing.max_samples as usize) as f64 / packing.max_samples.max(1) as f64;
        return secure::pack(trained, weight, 1.0, &packing.layout).map_err(|e| failed(&e));
    }
    let change = trained.change_from(received).map_err(|e| failed(&e))?;
    let mut packed = secure::pack(&change, 1.0, 1.0, &packing.layout).map_err(|e| failed(&e))?;
    // Noise anyone could replay would protect nothing: it comes from the operating system's entropy.
    let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::from_os_rng();
    secure::add_noise(&mut packed, &packing.layout, &packing.noise_std, &mut rng).map_err(|e| failed(&e))?;
    Ok(packed)
}
