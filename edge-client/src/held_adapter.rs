//! The global adapter as a device of rank r holds it: the slice a task carries, with the slots
//! above r folded into the frozen weight (Fold-and-Fill sends every device the whole adapter) or
//! cut off (the other methods send a rank-r device only its first r slots).

use flotilla_torch::adapter::Adapter;
use flotilla_wire::tensor::WireTensors;

/// The task's `slice` as the device holds it at `rank`: slots beyond `rank` (Fold-and-Fill sends
/// the whole adapter) are folded into the frozen weight.
pub(crate) fn adapter_at_rank(slice: &WireTensors, rank: u32, scale: f64) -> Result<Adapter, String> {
    let adapter = Adapter::from_wire(slice).map_err(|e| format!("global adapter slice: {e}"))?;
    if rank as usize == adapter.rank() {
        return Ok(adapter);
    }
    held_at_rank(&adapter, rank, scale, true)
}

/// `adapter` as a device of `rank` holds it: whole at its own rank; above it, with the slots beyond
/// `rank` folded into the frozen weight (`fold_tail`, Fold-and-Fill: W ← W0 + s·B[:, rank:]·A[rank:, :])
/// or cut off (the other methods send a rank-r device only its first r slots).
pub(crate) fn held_at_rank(adapter: &Adapter, rank: u32, scale: f64, fold_tail: bool) -> Result<Adapter, String> {
    let rank = rank as usize;
    if rank == 0 || rank > adapter.rank() {
        return Err(format!("the task asks for rank {rank}, but its adapter has rank {}", adapter.rank()));
    }
    let held = if fold_tail && rank < adapter.rank() {
        adapter.slice_with_folded_tail(rank, scale)
    } else {
        adapter.slice_to_rank(rank)
    };
    held.map_err(|e| format!("global adapter: {e}"))
}
