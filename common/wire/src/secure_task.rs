//! What a device needs to take part in a SecAgg+ session (a secure round's update, or federated
//! evaluation's sums): its own module, so that the protocol and federated evaluation both use it
//! without depending on each other.

use serde::{Deserialize, Serialize};

/// What a device needs for one round of secure aggregation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecureTask {
    /// A fresh random id of this round's key agreement: every SecAgg message of the round carries
    /// it, so a message of another round (or of this round number before a restart) is refused.
    pub session: u64,
    /// This device's participant id in the round.
    pub participant: u32,
    pub parameters: flotilla_secagg::Parameters,
    /// Where each value sits in the masked vector (the device checks it against its adapter).
    pub layout: flotilla_secagg::layout::Layout,
    /// A device's weight is min(its samples, this) / this: its sample count never leaves it.
    pub max_samples: u64,
    /// Under `[privacy] mode = "distributed"`: the device uploads its clipped change with weight 1
    /// and adds Gaussian noise of these standard deviations: `[head, slot 0, slot 1, …]`. Empty
    /// otherwise.
    pub noise_std: Vec<f64>,
    /// Devices sent a task in this round: a device checks its own noise share against its floor
    /// (`--min-noise-multiplier`) with it.
    pub participants: u32,
}
