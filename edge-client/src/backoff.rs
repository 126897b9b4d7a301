//! How long a device waits before reconnecting after a transient failure.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter: uniform in [d/2, d], d = min(max, initial·2^(n-1)).
pub(crate) fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(max);
    let millis = exp.as_millis().max(2) as u64;
    Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let (initial, max) = (Duration::from_millis(100), Duration::from_secs(5));
        for attempt in 1..30 {
            let d = backoff(attempt, initial, max);
            let ceiling = initial.saturating_mul(1 << (attempt - 1).min(16)).min(max);
            assert!(d <= ceiling && d >= ceiling / 2, "attempt {attempt}: {d:?} vs {ceiling:?}");
        }
    }
}
