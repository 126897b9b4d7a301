//! Crash-test hooks. `FLOTILLA_FAULT_PAUSE=<point>@<round>` (comma-separated for several) makes
//! the coordinator stop dead at a named point of that round, log that it did, and wait there so a
//! test can SIGKILL it at exactly that moment. Unset (always, in production) it does nothing.
//!
//! Points: `mid-aggregation` (the round's aggregate is computed, nothing is written yet) and
//! `mid-checkpoint` (the checkpoint's files are in `round-N.tmp/`, not yet renamed into place).

pub const ENV: &str = "FLOTILLA_FAULT_PAUSE";

pub fn point(name: &str, round: u32) {
    let Ok(spec) = std::env::var(ENV) else { return };
    let wanted = format!("{name}@{round}");
    if spec.split(',').any(|p| p.trim() == wanted) {
        tracing::warn!("fault injection: paused at {wanted} ({ENV}); waiting to be killed");
        loop {
            std::thread::park();
        }
    }
}
