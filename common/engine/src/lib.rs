//! The round engine, kept pure so that every path can be driven in tests with virtual time and no
//! I/O: its dependency list (no libtorch, no tokio, no quinn) is the proof.
//!
//! - [`round`]: the state machine. Events in (devices joining and leaving, updates arriving and
//!   folded, timers firing, aggregation done), actions out (send a task, fold or reject an update,
//!   schedule a timer, aggregate, skip, finish).
//! - [`buffered`]: buffered (asynchronous) rounds, as a state machine of the same kind: devices
//!   train on whatever global version they were given, updates are weighted by their staleness and
//!   merged a buffer at a time (not yet driven by the coordinator).
//! - [`policy`]: what each round is made of — which devices are sampled, the seeds a round uses,
//!   and the training settings devices receive — in one place, as a strategy object.
//! - [`accountant`]: the Rényi-DP accountant of the subsampled Gaussian mechanism (what
//!   device-level differential privacy spends per round, and a run's (ε, δ)).

pub mod accountant;
pub mod buffered;
pub mod policy;
pub mod round;

pub use policy::{DrawRefused, RoundPolicy, RoundSize, Sampling, TrainingPlan};
pub use round::{Action, Engine, EngineConfig, Event, Phase, RejectKind, SkipWhy, Timer};

/// A device, by the identity in its certificate.
pub type DeviceId = String;
