//! Splitting one dataset among devices, reproducibly from a seed, so a trial can give each device
//! its own shard:
//!
//! - `iid`: a random permutation cut into equal parts.
//! - `dirichlet:α`: label skew. For each class, proportions over the devices are drawn from
//!   Dirichlet(α) and that class's samples are dealt out accordingly (small α: few classes per
//!   device). Redrawn (up to 100 times) until every device holds at least `min(10, N / (2·devices))`
//!   samples.
//! - `shards:k`: sort by label, cut into `devices·k` equal shards, give each device k of them at
//!   random (McMahan et al.): at most k classes per device, roughly.
//!
//! Every scheme gives disjoint parts that together cover every sample.

use std::fmt;
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheme {
    Iid,
    Dirichlet { alpha: f64 },
    Shards { per_device: usize },
}

impl FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("partition scheme '{s}': expected iid, dirichlet:<alpha> or shards:<per device>");
        match s.split_once(':') {
            None if s == "iid" => Ok(Scheme::Iid),
            Some(("dirichlet", a)) => {
                let alpha: f64 = a.parse().map_err(|_| bad())?;
                if !(alpha.is_finite() && alpha > 0.0) {
                    return Err(format!("partition scheme '{s}': alpha must be a positive number"));
                }
                Ok(Scheme::Dirichlet { alpha })
            }
            Some(("shards", k)) => {
                let per_device: usize = k.parse().map_err(|_| bad())?;
                if per_device == 0 {
                    return Err(format!("partition scheme '{s}': at least one shard per device"));
                }
                Ok(Scheme::Shards { per_device })
            }
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scheme::Iid => write!(f, "iid"),
            Scheme::Dirichlet { alpha } => write!(f, "dirichlet:{alpha}"),
            Scheme::Shards { per_device } => write!(f, "shards:{per_device}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartitionSpec {
    pub scheme: Scheme,
    pub devices: usize,
    pub seed: u64,
}

/// Sample indices for every device. `labels` are class ids in `0..classes`.
pub fn partition(labels: &[i64], classes: usize, spec: &PartitionSpec) -> Result<Vec<Vec<usize>>, String> {
    let n = labels.len();
    if spec.devices == 0 {
        return Err("a partition needs at least one device".into());
    }
    if n < spec.devices {
        return Err(format!("cannot split {n} samples among {} devices", spec.devices));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    match spec.scheme {
        Scheme::Iid => {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng);
            Ok(split_evenly(&order, spec.devices))
        }
        Scheme::Shards { per_device } => {
            let shards = spec.devices * per_device;
            if shards > n {
                return Err(format!("cannot cut {n} samples into {shards} shards"));
            }
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut rng);
            order.sort_by_key(|&i| labels[i]); // stable: random order within a class
            let pieces = split_evenly(&order, shards);
            let mut assignment: Vec<usize> = (0..shards).collect();
            assignment.shuffle(&mut rng);
            Ok(assignment
                .chunks(per_device)
                .map(|chunk| chunk.iter().flat_map(|&s| pieces[s].iter().copied()).collect())
                .collect())
        }
        Scheme::Dirichlet { alpha } => dirichlet(labels, classes, spec.devices, alpha, &mut rng),
    }
}

fn split_evenly(order: &[usize], parts: usize) -> Vec<Vec<usize>> {
    let (base, extra) = (order.len() / parts, order.len() % parts);
    let mut out = Vec::with_capacity(parts);
    let mut start = 0;
    for p in 0..parts {
        let len = base + usize::from(p < extra);
        out.push(order[start..start + len].to_vec());
        start += len;
    }
    out
}

fn dirichlet(
    labels: &[i64],
    classes: usize,
    devices: usize,
    alpha: f64,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Vec<usize>>, String> {
    let gamma = Gamma::new(alpha, 1.0).map_err(|e| format!("dirichlet alpha {alpha}: {e}"))?;
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        let class = usize::try_from(l)
            .ok()
            .filter(|&c| c < classes)
            .ok_or_else(|| format!("label {l} outside 0..{classes}"))?;
        by_class[class].push(i);
    }
    let min_size = (labels.len() / (2 * devices)).clamp(1, 10);
    let mut last = Vec::new();
    for _ in 0..100 {
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); devices];
        for members in &by_class {
            let mut members = members.clone();
            members.shuffle(rng);
            let draws: Vec<f64> = (0..devices).map(|_| gamma.sample(rng)).collect();
            let total: f64 = draws.iter().sum();
            let mut start = 0usize;
            let mut cumulative = 0.0;
            for (d, draw) in draws.iter().enumerate() {
                cumulative += if total > 0.0 { draw / total } else { 1.0 / devices as f64 };
                let end = if d + 1 == devices {
                    members.len()
                } else {
                    ((cumulative * members.len() as f64).round() as usize).min(members.len())
                };
                parts[d].extend_from_slice(&members[start..end.max(start)]);
                start = end.max(start);
            }
        }
        if parts.iter().all(|p| p.len() >= min_size) {
            return Ok(parts);
        }
        last = parts;
    }
    let smallest = last.iter().map(Vec::len).min().unwrap_or(0);
    Err(format!(
        "dirichlet:{alpha} with {devices} devices: after 100 draws some device still had only {smallest} samples \
         (at least {min_size} needed); use a larger alpha or fewer devices"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(n: usize, classes: usize) -> Vec<i64> {
        (0..n).map(|i| (i * 7 % classes) as i64).collect()
    }

    fn check_cover(parts: &[Vec<usize>], n: usize) {
        let mut seen = vec![false; n];
        for part in parts {
            for &i in part {
                assert!(!seen[i], "sample {i} given twice");
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "every sample is given out");
    }

    fn classes_held(part: &[usize], labels: &[i64]) -> usize {
        let mut c: Vec<i64> = part.iter().map(|&i| labels[i]).collect();
        c.sort();
        c.dedup();
        c.len()
    }

    #[test]
    fn every_scheme_is_disjoint_covering_and_reproducible() {
        let labels = labels(2000, 10);
        for scheme in ["iid", "dirichlet:0.1", "dirichlet:1.0", "shards:2"] {
            let spec = PartitionSpec { scheme: scheme.parse().unwrap(), devices: 20, seed: 3 };
            let parts = partition(&labels, 10, &spec).unwrap();
            assert_eq!(parts.len(), 20);
            check_cover(&parts, labels.len());
            assert_eq!(parts, partition(&labels, 10, &spec).unwrap(), "{scheme}: same seed, same parts");
            let other = partition(&labels, 10, &PartitionSpec { seed: 4, ..spec }).unwrap();
            assert_ne!(parts, other, "{scheme}: another seed, other parts");
        }
    }

    #[test]
    fn skew_follows_the_scheme() {
        let labels = labels(6000, 10);
        let mean_classes = |scheme: &str| {
            let spec = PartitionSpec { scheme: scheme.parse().unwrap(), devices: 20, seed: 1 };
            let parts = partition(&labels, 10, &spec).unwrap();
            parts.iter().map(|p| classes_held(p, &labels)).sum::<usize>() as f64 / parts.len() as f64
        };
        // The share of a device's data that its most common class makes up, averaged over devices.
        let dominant_share = |scheme: &str| {
            let spec = PartitionSpec { scheme: scheme.parse().unwrap(), devices: 20, seed: 1 };
            let parts = partition(&labels, 10, &spec).unwrap();
            parts
                .iter()
                .map(|p| {
                    let mut counts = [0usize; 10];
                    for &i in p {
                        counts[labels[i] as usize] += 1;
                    }
                    *counts.iter().max().unwrap() as f64 / p.len() as f64
                })
                .sum::<f64>()
                / parts.len() as f64
        };
        assert_eq!(mean_classes("iid"), 10.0);
        assert!(mean_classes("shards:2") <= 2.0 + 1e-9);
        let (strong, mild, iid) =
            (dominant_share("dirichlet:0.1"), dominant_share("dirichlet:10"), dominant_share("iid"));
        assert!(
            strong > 0.5 && mild < 0.3 && iid < 0.2,
            "dominant class share: α=0.1 {strong}, α=10 {mild}, iid {iid}"
        );
    }

    #[test]
    fn bad_specs_are_clear_errors() {
        for bad in ["", "dirichlet", "dirichlet:0", "dirichlet:-1", "shards:0", "shards:x", "random"] {
            assert!(bad.parse::<Scheme>().is_err(), "{bad}");
        }
        let labels = labels(10, 2);
        let spec = |scheme: &str, devices| PartitionSpec { scheme: scheme.parse().unwrap(), devices, seed: 1 };
        assert!(partition(&labels, 2, &spec("iid", 11)).is_err());
        assert!(partition(&labels, 2, &spec("shards:2", 6)).is_err());
        assert!(partition(&labels, 2, &spec("iid", 0)).is_err());
    }
}
