//! Crash-test hooks shared by the daemons. `FLOTILLA_FAULT_PAUSE=<point>@<round>` (comma-separated
//! for several) asks a process to stop dead at a named point of that round, so a test can SIGKILL it
//! at exactly that moment. Unset — always, in production — nothing happens.

pub const ENV: &str = "FLOTILLA_FAULT_PAUSE";

/// Whether the environment asks to pause at `point` in `round`.
pub fn pause_requested(point: &str, round: u32) -> bool {
    let Ok(spec) = std::env::var(ENV) else { return false };
    let wanted = format!("{point}@{round}");
    spec.split(',').any(|p| p.trim() == wanted)
}
