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

    /// The highest rank r such that each of slots 0..r is held by at least `min_holders` of the
    /// devices of `ranks` (0 when fewer devices than that). Holders only thin out as the slot
    /// index grows, so the slots that may be revealed are always a prefix.
    pub fn revealable_rank(&self, ranks: impl IntoIterator<Item = u32>, min_holders: usize) -> u32 {
        let mut ranks: Vec<u32> = ranks.into_iter().map(|r| r.min(self.max_rank)).collect();
        ranks.sort_unstable_by(|a, b| b.cmp(a));
        match min_holders {
            0 => self.max_rank,
            k => ranks.get(k - 1).copied().unwrap_or(0),
        }
    }

    /// The rank whose vector is `len` long, if one is.
    pub fn rank_of_len(&self, len: usize) -> Option<u32> {
        let slots = len.checked_sub(self.shared)?;
        let rank = u32::try_from(slots / self.per_slot.max(1)).ok()?;
        (rank <= self.max_rank && self.len(rank) == len).then_some(rank)
    }
}
