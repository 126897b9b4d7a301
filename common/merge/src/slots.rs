//! Slot-wise sums of zero-padded LoRA factors: the arithmetic behind RBLA, zero-padding, HetLoRA
//! and FedAvg (their formulas are in `flotilla_torch::aggregate`, one file per method). They
//! differ only in each client's weight per module and in the denominator.
//!
//! Per module the caller owns two f32 sums, `Σ (w_k/ρ_i)·A_k` (R_max × d_in, row-major) and
//! `Σ (w_k/ρ_i)·B_k` (d_out × R_max, row-major) — libtorch tensors online, plain vectors in the
//! offline fast path — and [`ModuleSlots`] keeps the per-slot bookkeeping: `ρ_i`, the weight of the
//! first client that covered slot i, so that a slot's first contribution is added with factor
//! exactly 1 and a slot only one client covers passes through bit-identical; the per-slot relative
//! weight `Σ_{k∈S_i} w_k/ρ_i`; the module's total weight; how many clients covered each slot.
//! f32 sums keep the accumulator traffic at twice the input bytes. Memory is fixed by the global
//! adapter's size, whatever the number of clients.

/// What a covered slot's weighted sum is divided by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denominator {
    /// The weight of the clients that have the slot (RBLA, FedAvg).
    Coverage,
    /// RBLA's coverage mean, then both factors of slot i multiplied by `√q_i`, `q_i = W_i / W`
    /// (coverage-scaled RBLA: the slot's product `B·A` gets the weight `q_i`).
    CoverageScaled,
    /// The weight of every client of the round, as if missing slots were zeros (zero-pad, HetLoRA).
    AllClients,
    /// The weight of every client of the round, a client that lacks the slot counting with the
    /// previous global value (Fold-and-Fill): `(Σ_{k∈S_i} w_k·x_k + (W − W_i)·g_i) / W`.
    AllClientsFilled,
}

/// One module's per-slot bookkeeping.
#[derive(Debug, Clone)]
pub struct ModuleSlots {
    /// ρ_i: the weight of slot i's first contributor (0 while none).
    reference: Vec<f64>,
    /// Σ_{k∈S_i} w_k / ρ_i.
    relative_weight: Vec<f64>,
    slot_clients: Vec<u32>,
    total_weight: f64,
}

/// One client's factors for a module, row-major: `a` is rank × d_in, `b` is d_out × rank.
#[derive(Debug, Clone, Copy)]
pub struct Factors<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
}

impl ModuleSlots {
    pub fn new(r_max: usize) -> ModuleSlots {
        ModuleSlots {
            reference: vec![0.0; r_max],
            relative_weight: vec![0.0; r_max],
            slot_clients: vec![0; r_max],
            total_weight: 0.0,
        }
    }

    pub fn r_max(&self) -> usize {
        self.reference.len()
    }

    /// Adds one client's factors with weight `w`: `acc[s..e] += (w/ρ)·x[s..e]` for each run of
    /// slots sharing a reference, B also multiplied by `b_factor` (the client's LoRA scale over the
    /// global one). Shapes must already be validated: `acc_a.len() = R_max·d_in`,
    /// `acc_b.len() = d_out·R_max`, `factors.a.len() = rank·d_in`, `factors.b.len() = d_out·rank`,
    /// `rank ≤ R_max`; otherwise this panics.
    pub fn fold(&mut self, acc_a: &mut [f32], acc_b: &mut [f32], factors: Factors<'_>, w: f64, b_factor: f64) {
        let rank = factors.rank;
        let d_in = factors.a.len() / rank.max(1);
        for clients in &mut self.slot_clients[..rank] {
            *clients += 1;
        }
        self.total_weight += w;
        if w == 0.0 {
            return; // covers its slots, contributes nothing
        }
        for (start, end, factor) in self.segments(rank, w) {
            add_rows(acc_a, factors.a, d_in, start, end, factor as f32);
            add_cols(acc_b, self.r_max(), factors.b, rank, start, end, (factor * b_factor) as f32);
            for slot in start..end {
                self.relative_weight[slot] += factor;
            }
        }
    }

    /// Divides the sums in place into the module's averaged factors. A slot no client covered keeps
    /// its previous value (`previous_a`/`previous_b`, shaped like the sums; `None` is all zeros); so
    /// does every slot of a module whose total weight is zero (nothing to average).
    pub fn finish(
        &self,
        denominator: Denominator,
        acc_a: &mut [f32],
        acc_b: &mut [f32],
        previous_a: Option<&[f32]>,
        previous_b: Option<&[f32]>,
    ) {
        let r_max = self.r_max();
        // Per slot: the divisor in units of ρ_i, or None to keep the previous value.
        let divisors: Vec<Option<f64>> = (0..r_max)
            .map(|i| {
                let d = match denominator {
                    Denominator::Coverage => self.relative_weight[i],
                    Denominator::CoverageScaled if self.total_weight > 0.0 => {
                        let q = self.relative_weight[i] * self.reference[i] / self.total_weight;
                        if q > 0.0 {
                            self.relative_weight[i] / q.sqrt()
                        } else {
                            0.0
                        }
                    }
                    Denominator::CoverageScaled => 0.0,
                    Denominator::AllClients | Denominator::AllClientsFilled if self.reference[i] > 0.0 => {
                        self.total_weight / self.reference[i]
                    }
                    Denominator::AllClients | Denominator::AllClientsFilled => 0.0,
                };
                (self.slot_clients[i] > 0 && d > 0.0).then_some(d)
            })
            .collect();
        let scale: Vec<f32> = divisors.iter().map(|d| (1.0 / d.unwrap_or(1.0)) as f32).collect();
        if r_max == 0 {
            return;
        }
        let d_in = (acc_a.len() / r_max).max(1);
        for (slot, row) in acc_a.chunks_exact_mut(d_in).enumerate() {
            match (divisors[slot], previous_a) {
                (Some(_), _) => row.iter_mut().for_each(|v| *v *= scale[slot]),
                (None, Some(previous)) => row.copy_from_slice(&previous[slot * d_in..(slot + 1) * d_in]),
                (None, None) => row.fill(0.0),
            }
        }
        for row in acc_b.chunks_exact_mut(r_max) {
            for (v, s) in row.iter_mut().zip(&scale) {
                *v *= s;
            }
        }
        if denominator == Denominator::AllClientsFilled {
            self.fill(&divisors, acc_a, acc_b, previous_a, previous_b);
        }
        let uncovered: Vec<usize> = (0..r_max).filter(|&slot| divisors[slot].is_none()).collect();
        if !uncovered.is_empty() {
            for (o, row) in acc_b.chunks_exact_mut(r_max).enumerate() {
                for &slot in &uncovered {
                    row[slot] = previous_b.map_or(0.0, |p| p[o * r_max + slot]);
                }
            }
        }
    }

    /// Fold-and-Fill's second term: adds `(1 − q_i)·g_i` to every covered slot, where
    /// `q_i = W_i / W` is the share of the round's weight that covered slot i.
    fn fill(
        &self,
        divisors: &[Option<f64>],
        acc_a: &mut [f32],
        acc_b: &mut [f32],
        previous_a: Option<&[f32]>,
        previous_b: Option<&[f32]>,
    ) {
        let r_max = self.r_max();
        // In units of ρ_i, the divisor is W/ρ_i and the covered weight W_i/ρ_i: q_i = W_i / W.
        let keep: Vec<f32> = (0..r_max)
            .map(|i| divisors[i].map_or(0.0, |d| (1.0 - (self.relative_weight[i] / d).min(1.0)) as f32))
            .collect();
        let d_in = (acc_a.len() / r_max.max(1)).max(1);
        if let Some(previous) = previous_a {
            for (slot, (row, prev)) in acc_a.chunks_exact_mut(d_in).zip(previous.chunks_exact(d_in)).enumerate() {
                if keep[slot] != 0.0 {
                    row.iter_mut().zip(prev).for_each(|(v, g)| *v += keep[slot] * g);
                }
            }
        }
        if let Some(previous) = previous_b {
            for (row, prev) in acc_b.chunks_exact_mut(r_max).zip(previous.chunks_exact(r_max)) {
                for ((v, g), k) in row.iter_mut().zip(prev).zip(&keep) {
                    *v += k * g;
                }
            }
        }
    }

    /// Runs of consecutive slots in `0..rank` that share a reference weight, after giving
    /// uncovered slots the reference `w`: `(start, end, factor = w / ρ)`.
    fn segments(&mut self, rank: usize, w: f64) -> Vec<(usize, usize, f64)> {
        let mut out: Vec<(usize, usize, f64)> = Vec::new();
        for slot in 0..rank {
            if self.reference[slot] == 0.0 {
                self.reference[slot] = w;
            }
            let factor = w / self.reference[slot];
            match out.last_mut() {
                Some((_, end, f)) if *f == factor => *end = slot + 1,
                _ => out.push((slot, slot + 1, factor)),
            }
        }
        out
    }
}

/// `acc[i, :] += f·x[i, :]` for rows `start..end` (A factors: slot = row); both row-major with the
/// same width. A plain loop over contiguous f32 is auto-vectorised and memory-bound.
fn add_rows(acc: &mut [f32], x: &[f32], width: usize, start: usize, end: usize, f: f32) {
    let range = start * width..end * width;
    for (a, v) in acc[range.clone()].iter_mut().zip(&x[range]) {
        *a += f * v;
    }
}

/// `acc[:, j] += f·x[:, j]` for columns `start..end` (B factors: slot = column); `acc` has
/// `acc_width` columns and `x` has `x_width`, over the same rows.
fn add_cols(acc: &mut [f32], acc_width: usize, x: &[f32], x_width: usize, start: usize, end: usize, f: f32) {
    for (acc_row, x_row) in acc.chunks_exact_mut(acc_width).zip(x.chunks_exact(x_width)) {
        for (a, v) in acc_row[start..end].iter_mut().zip(&x_row[start..end]) {
            *a += f * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Folds `(rank, weight, a, b)` clients into R_max = `r_max` sums over d_in = d_out = 2.
    fn run(
        r_max: usize,
        clients: &[(usize, f64, Vec<f32>, Vec<f32>)],
        denominator: Denominator,
    ) -> (Vec<f32>, Vec<f32>) {
        let (mut acc_a, mut acc_b) = (vec![0.0; r_max * 2], vec![0.0; 2 * r_max]);
        let mut slots = ModuleSlots::new(r_max);
        for (rank, w, a, b) in clients {
            slots.fold(&mut acc_a, &mut acc_b, Factors { a, b, rank: *rank }, *w, 1.0);
        }
        let previous = vec![7.0; r_max * 2];
        slots.finish(denominator, &mut acc_a, &mut acc_b, Some(&previous), None);
        (acc_a, acc_b)
    }

    #[test]
    fn coverage_averages_each_slot_over_the_clients_that_have_it() {
        // Rank 1 (weight 1): A = [1, 2], B = [[3], [4]]; rank 2 (weight 3): A = [[5, 6], [7, 8]], B = [[1, 2], [3, 4]].
        let clients =
            [(1, 1.0, vec![1.0, 2.0], vec![3.0, 4.0]), (2, 3.0, vec![5.0, 6.0, 7.0, 8.0], vec![1.0, 2.0, 3.0, 4.0])];
        let (a, b) = run(3, &clients, Denominator::Coverage);
        // Slot 0: (1·x + 3·y) / 4; slot 1: the rank-2 client alone, bit-identical; slot 2: nobody, previous kept.
        assert_eq!(a, vec![4.0, 5.0, 7.0, 8.0, 7.0, 7.0]);
        assert_eq!(b, vec![1.5, 2.0, 0.0, 3.25, 4.0, 0.0]);
    }

    #[test]
    fn all_clients_divides_by_the_weight_of_the_whole_round() {
        let clients =
            [(1, 1.0, vec![1.0, 2.0], vec![3.0, 4.0]), (2, 3.0, vec![5.0, 6.0, 7.0, 8.0], vec![1.0, 2.0, 3.0, 4.0])];
        let (a, _) = run(2, &clients, Denominator::AllClients);
        assert_eq!(a, vec![4.0, 5.0, 5.25, 6.0]);
    }

    #[test]
    fn fold_and_fill_counts_a_missing_slot_as_the_previous_value() {
        let clients =
            [(1, 1.0, vec![1.0, 2.0], vec![3.0, 4.0]), (2, 3.0, vec![5.0, 6.0, 7.0, 8.0], vec![1.0, 2.0, 3.0, 4.0])];
        let (a, _) = run(3, &clients, Denominator::AllClientsFilled);
        // Slot 0: (1·x + 3·y) / 4, covered by all. Slot 1: (3·[7, 8] + 1·[7, 7]) / 4 with the
        // previous value 7 standing in for the rank-1 client. Slot 2: nobody, previous kept.
        assert_eq!(a, vec![4.0, 5.0, 7.0, 7.75, 7.0, 7.0]);
    }

    #[test]
    fn coverage_scaling_multiplies_each_factor_by_the_root_of_its_share() {
        let clients =
            [(1, 1.0, vec![1.0, 2.0], vec![3.0, 4.0]), (2, 3.0, vec![5.0, 6.0, 7.0, 8.0], vec![1.0, 2.0, 3.0, 4.0])];
        let (a, _) = run(3, &clients, Denominator::CoverageScaled);
        // Slot 0 is covered by all (q = 1): RBLA's [4, 5]; slot 1 by weight 3 of 4: RBLA's [7, 8]·√0.75.
        let root = 0.75f32.sqrt();
        let want = [4.0, 5.0, 7.0 * root, 8.0 * root, 7.0, 7.0];
        assert!(a.iter().zip(want).all(|(x, y)| (x - y).abs() < 1e-6), "{a:?}");
    }

    #[test]
    fn a_zero_weight_covers_slots_without_contributing() {
        let clients = [(2, 0.0, vec![9.0; 4], vec![9.0; 4]), (1, 2.0, vec![1.0, 1.0], vec![1.0, 1.0])];
        let (a, _) = run(2, &clients, Denominator::AllClients);
        // Slot 1 is covered by a weight-0 client only: its divisor is 0, so it keeps the previous value.
        assert_eq!(a, vec![1.0, 1.0, 7.0, 7.0]);
    }
}
