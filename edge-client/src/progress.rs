//! What a person at a terminal sees while the device works: one progress bar over the run's rounds,
//! its message saying what is happening now. Not on a terminal (a service, a pipe) there is no bar;
//! the structured logs say the same.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar on stderr when `enabled` (a terminal with text logs); otherwise nothing.
    pub fn new(enabled: bool) -> Progress {
        Progress::with_target(enabled.then(ProgressDrawTarget::stderr))
    }

    /// No bar at all (the simulator, tests).
    pub fn none() -> Progress {
        Progress { bar: None }
    }

    fn with_target(target: Option<ProgressDrawTarget>) -> Progress {
        let bar = target.map(|target| {
            let bar = ProgressBar::with_draw_target(None, target);
            let style = ProgressStyle::with_template("{spinner} round {pos}/{len} [{bar:30}] {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Progress { bar }
    }

    fn update(&self, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(message);
        }
    }

    pub fn connecting(&self, coordinator: &str) {
        self.update(format!("connecting to {coordinator}"));
    }

    pub fn admitted(&self, rank: u32) {
        self.update(format!("admitted at rank {rank}; waiting for a round"));
    }

    pub fn training(&self, round: u32, total_rounds: u32, rank: u32) {
        if let Some(bar) = &self.bar {
            bar.set_length(u64::from(total_rounds));
            bar.set_position(u64::from(round.saturating_sub(1)));
        }
        self.update(format!("training round {round} at rank {rank}"));
    }

    pub fn uploading(&self, round: u32, loss_before: f64, loss_after: f64) {
        self.update(format!("uploading round {round} (local loss {loss_before:.3} → {loss_after:.3})"));
    }

    pub fn uploaded(&self, round: u32, outcome: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(u64::from(round));
        }
        self.update(format!("round {round} {outcome}; waiting for the next"));
    }

    pub fn reconnecting(&self, delay: Duration) {
        self.update(format!("connection lost; reconnecting in {:.1}s", delay.as_secs_f64()));
    }

    pub fn finish(&self, message: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_with_message(message.to_string());
        }
    }

    /// The current message, for tests.
    #[cfg(test)]
    fn message(&self) -> Option<String> {
        self.bar.as_ref().map(|b| b.message())
    }

    #[cfg(test)]
    fn position(&self) -> Option<(u64, Option<u64>)> {
        self.bar.as_ref().map(|b| (b.position(), b.length()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_follows_the_rounds_and_says_what_happens() {
        let progress = Progress::with_target(Some(ProgressDrawTarget::hidden()));
        progress.admitted(4);
        assert_eq!(progress.message().unwrap(), "admitted at rank 4; waiting for a round");
        progress.training(2, 12, 4);
        assert_eq!(progress.position(), Some((1, Some(12))));
        assert_eq!(progress.message().unwrap(), "training round 2 at rank 4");
        progress.uploading(2, 0.9, 0.5);
        assert!(progress.message().unwrap().starts_with("uploading round 2"));
        progress.uploaded(2, "accepted");
        assert_eq!(progress.position(), Some((2, Some(12))));
        let none = Progress::none();
        none.training(1, 3, 2);
        assert_eq!(none.message(), None);
    }
}
