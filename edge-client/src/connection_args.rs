//! How `run` and `sim` keep their connection: liveness (idle timeout, keep-alive) and when to ask
//! for a renewed certificate.

use std::time::Duration;

use anyhow::Result;
use flotilla_wire::quic::TransportSettings;

#[derive(clap::Args)]
pub struct LivenessArgs {
    /// Seconds without any packet from the coordinator before the connection counts as lost (and
    /// the device reconnects).
    #[arg(long, default_value_t = TransportSettings::default().idle_timeout_secs)]
    pub idle_timeout_secs: u64,
    /// Seconds between keep-alive packets while idle (e.g. during long local training); also how
    /// soon a device learns that a restarted coordinator has forgotten its connection.
    #[arg(long, default_value_t = TransportSettings::default().keep_alive_secs)]
    pub keep_alive_secs: u64,
}

impl LivenessArgs {
    pub fn transport(&self) -> Result<TransportSettings> {
        anyhow::ensure!(
            self.keep_alive_secs < self.idle_timeout_secs,
            "--keep-alive-secs ({}) must be below --idle-timeout-secs ({})",
            self.keep_alive_secs,
            self.idle_timeout_secs
        );
        Ok(TransportSettings {
            idle_timeout_secs: self.idle_timeout_secs,
            keep_alive_secs: self.keep_alive_secs,
            ..TransportSettings::default()
        })
    }
}

#[derive(clap::Args)]
pub struct RenewalArgs {
    /// Ask the coordinator to renew this device's certificate once it ends within this time
    /// (30d, 12h, 90s, ...; 0s: never ask). A coordinator without [renewal] refuses, and the
    /// certificate serves until it ends.
    #[arg(long, env = "FLOTILLA_RENEW_WITHIN", default_value = "7days", value_parser = humantime::parse_duration)]
    pub renew_within: Duration,
}

impl RenewalArgs {
    pub fn window(&self) -> Option<Duration> {
        (!self.renew_within.is_zero()).then_some(self.renew_within)
    }
}
