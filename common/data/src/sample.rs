//! A fair held-out subset: when only `n` of a test split are evaluated, each label keeps its
//! share of the split (largest remainders, so the counts add up to `n` and no label is off by
//! more than one example), the examples of a label are taken in the order of a stable hash of the
//! seed and the example's key, and the subset is listed in that hash order. The same split, seed
//! and `n` give the same subset on every run and every machine; another seed gives another one.
//!
//! Taking the first `n` in key order instead can leave whole labels out (the first 150 texts of
//! BBC News' test split are 100 `business` and 50 `entertainment` articles).

use crate::hash::fnv1a;

/// The stable order of an example: FNV-1a of the seed and its key.
pub fn stable_rank(seed: u64, key: &str) -> u64 {
    let mut bytes = seed.to_le_bytes().to_vec();
    bytes.extend_from_slice(key.as_bytes());
    fnv1a(&bytes)
}

/// The indices of a stratified sample of `n` of the examples whose labels are `labels` and whose
/// keys are `keys` (the same length), in hash order; all of them, in hash order, when `n` covers
/// the split.
pub fn stratified(labels: &[usize], keys: &[String], n: usize, seed: u64) -> Vec<usize> {
    let total = labels.len().min(keys.len());
    let classes = labels[..total].iter().max().map_or(0, |&l| l + 1);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (index, &label) in labels[..total].iter().enumerate() {
        members[label].push(index);
    }
    let rank = |index: &usize| (stable_rank(seed, &keys[*index]), *index);
    for group in &mut members {
        group.sort_by_key(rank);
    }
    let quotas = quotas(&members.iter().map(Vec::len).collect::<Vec<_>>(), n.min(total));
    let mut chosen: Vec<usize> =
        members.iter().zip(&quotas).flat_map(|(group, &quota)| group[..quota].iter().copied()).collect();
    chosen.sort_by_key(rank);
    chosen
}

/// Each class's share of `n` in proportion to `counts`: the floors, then one more for the
/// classes with the largest remainders (ties to the larger class, then the lower label).
fn quotas(counts: &[usize], n: usize) -> Vec<usize> {
    let total: usize = counts.iter().sum();
    if total == 0 {
        return vec![0; counts.len()];
    }
    let mut quotas: Vec<usize> = counts.iter().map(|&c| c * n / total).collect();
    let mut left = n - quotas.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..counts.len()).collect();
    order.sort_by_key(|&c| (std::cmp::Reverse(counts[c] * n % total), std::cmp::Reverse(counts[c]), c));
    for class in order {
        if left == 0 {
            break;
        }
        if quotas[class] < counts[class] {
            quotas[class] += 1;
            left -= 1;
        }
    }
    quotas
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A split in key order whose labels come in blocks, as BBC News' test split does.
    fn blocked(counts: &[usize]) -> (Vec<usize>, Vec<String>) {
        let labels: Vec<usize> = counts.iter().enumerate().flat_map(|(l, &c)| std::iter::repeat_n(l, c)).collect();
        let keys = (0..labels.len()).map(|i| format!("{}/{i:03}.txt", labels[i])).collect();
        (labels, keys)
    }

    #[test]
    fn every_label_keeps_its_share_of_the_split() {
        let (labels, keys) = blocked(&[102, 77, 84, 102, 80]);
        let chosen = stratified(&labels, &keys, 150, 42);
        assert_eq!(chosen.len(), 150);
        let mut counts = [0usize; 5];
        for &i in &chosen {
            counts[labels[i]] += 1;
        }
        for (label, &count) in counts.iter().enumerate() {
            let share = [102.0, 77.0, 84.0, 102.0, 80.0][label] * 150.0 / 445.0;
            assert!((count as f64 - share).abs() < 1.0, "label {label}: {count} for a share of {share:.2}");
        }
        let unique: std::collections::BTreeSet<_> = chosen.iter().collect();
        assert_eq!(unique.len(), 150, "no example twice");
    }

    #[test]
    fn the_sample_depends_on_the_seed_only_and_covers_the_split_when_asked_to() {
        let (labels, keys) = blocked(&[30, 20, 10]);
        assert_eq!(stratified(&labels, &keys, 12, 7), stratified(&labels, &keys, 12, 7));
        assert_ne!(stratified(&labels, &keys, 12, 7), stratified(&labels, &keys, 12, 8));
        let mut all = stratified(&labels, &keys, 1000, 7);
        assert_eq!(all.len(), 60);
        all.sort();
        assert_eq!(all, (0..60).collect::<Vec<_>>());
        assert!(stratified(&[], &[], 5, 1).is_empty());
    }

    #[test]
    fn quotas_add_up_and_never_exceed_a_class() {
        assert_eq!(quotas(&[5, 5, 5], 7), vec![3, 2, 2]);
        assert_eq!(quotas(&[1, 99], 10), vec![0, 10]);
        assert_eq!(quotas(&[1, 1], 2), vec![1, 1]);
        assert_eq!(quotas(&[0, 4], 3), vec![0, 3]);
    }
}
