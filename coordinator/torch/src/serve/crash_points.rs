//! The coordinator's crash-test points (see `flotilla_wire::crash_test`): `mid-aggregation` (the
//! round's aggregate is computed, nothing is written yet) and `mid-checkpoint` (the checkpoint's
//! files are in `round-N.tmp/`, not yet renamed into place), and under secure aggregation
//! `mid-unmask` (every masked update and unmasking share is in, the sums not yet unmasked).

use flotilla_wire::crash_test::{pause_requested, ENV};

/// Stops the calling thread for good when the environment asks for `name` in `round`.
pub fn point(name: &str, round: u32) {
    if pause_requested(name, round) {
        tracing::warn!("fault injection: paused at {name}@{round} ({ENV}); waiting to be killed");
        loop {
            std::thread::park();
        }
    }
}
