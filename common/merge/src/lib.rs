//! The parts of Flotilla's aggregation that need no libtorch:
//!
//! - [`method`]: the aggregation methods by name (the one table of names);
//! - [`inputs`]: what both paths of the offline command read and decide before folding (configs,
//!   sample counts, the output's rank, scale, notes and metadata);
//! - [`peft`]: PEFT tensor names and `adapter_config.json`;
//! - [`slots`]: the slot-wise accumulator of RBLA, zero-padding, HetLoRA and FedAvg, on f32 slices
//!   (the online aggregators in `flotilla_torch::aggregate` run on it too);
//! - [`destination`]: what the offline command refuses before writing (an output that is or holds an
//!   input, a non-empty output without `--force`, the same client twice);
//! - [`fast_path`]: the fast path of `flotilla-coordinator aggregate` for RBLA, zero-padding and
//!   FedAvg, which merges adapters straight from the files in a process that never loads libtorch
//!   (libtorch's start-up alone costs about 0.3 s, several times a read of the inputs).
//!
//! No argument parsing and no printing: the command itself is `flotilla-coordinator`.

pub mod destination;
pub mod fast_path;
pub mod init;
pub mod inputs;
pub mod method;
pub mod peft;
pub mod slots;
