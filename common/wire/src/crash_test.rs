//! Crash-test hooks shared by the daemons. `FLOTILLA_FAULT_PAUSE=<point>@<round>` (comma-separated
//! for several) asks a process to stop dead at a named point of that round, so a test can SIGKILL it
//! at exactly that moment. Unset — always, in production — nothing happens.

pub const ENV: &str = "FLOTILLA_FAULT_PAUSE";
/// `FLOTILLA_FAULT_CORRUPT=<what>@<round>`: a device that misbehaves on purpose at `what`
/// (`shares`: one of its encrypted shares is garbled), for the tests of what honest devices and
/// the coordinator do about it. Unset — always, in production — nothing happens.
pub const CORRUPT_ENV: &str = "FLOTILLA_FAULT_CORRUPT";

/// Whether the environment asks this process to corrupt `what` in `round`.
pub fn corruption_requested(what: &str, round: u32) -> bool {
    let Ok(spec) = std::env::var(CORRUPT_ENV) else { return false };
    let wanted = format!("{what}@{round}");
    let requested = spec.split(',').any(|p| p.trim() == wanted);
    if requested {
        tracing::warn!("fault injection: corrupting {wanted} ({CORRUPT_ENV})");
    }
    requested
}

/// Whether the environment asks to pause at `point` in `round`.
pub fn pause_requested(point: &str, round: u32) -> bool {
    let Ok(spec) = std::env::var(ENV) else { return false };
    let wanted = format!("{point}@{round}");
    spec.split(',').any(|p| p.trim() == wanted)
}

/// Stops the calling task for good when the environment asks for `point` in `round` (a device's
/// session; the test then kills the process).
pub async fn pause_if_requested(point: &str, round: u32) {
    if pause_requested(point, round) {
        tracing::warn!("fault injection: paused at {point}@{round} ({ENV}); waiting to be killed");
        std::future::pending::<()>().await;
    }
}
