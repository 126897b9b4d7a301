//! The parts of Flotilla's aggregation that need no libtorch:
//!
//! - [`method`]: the aggregation methods by name (the one table of names);
//! - [`peft`]: PEFT tensor names and `adapter_config.json`;
//! - [`slots`]: the slot-wise accumulator of RBLA, zero-padding, HetLoRA and FedAvg, on f32 slices
//!   (the online aggregators in `flotilla_torch::aggregate` run on it too);
//! - [`offline`]: the fast path of `flotilla-coordinator aggregate` for RBLA, zero-padding and
//!   FedAvg, which merges adapters straight from the files in a process that never loads libtorch
//!   (libtorch's start-up alone costs about 0.3 s, several times a read of the inputs).
//!
//! No argument parsing and no printing: the command itself is `flotilla-coordinator-front`.

pub mod init;
pub mod method;
pub mod offline;
pub mod peft;
pub mod slots;
