//! Where each value sits in a device's vector: the values every rank holds first (the head and
//! the device's weight), then one block per rank slot (its coverage weight and every module's A row
//! and B column of that slot). A device of rank r holds exactly the first [`Layout::len`]`(r)`
//! values, so two devices of ranks r ≤ s share the prefix of length `len(r)`.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// Values every rank holds (before the slots).
    pub shared: usize,
    /// Values per rank slot.
    pub per_slot: usize,
    /// The highest rank (R_max).
    pub max_rank: u32,
}

impl Layout {
    /// The length of a rank-`rank` device's vector (ranks above R_max count as R_max).
    pub fn len(&self, rank: u32) -> usize {
        self.shared + self.per_slot * rank.min(self.max_rank) as usize
    }

    /// The length of the whole vector (R_max).
    pub fn full_len(&self) -> usize {
        self.len(self.max_rank)
    }
}
