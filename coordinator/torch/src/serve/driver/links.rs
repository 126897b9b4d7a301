//! What every part of the round driver shares: the configuration, the driver's own input queue
//! (timers and background work report back through it), the aggregation worker and the live
//! device sessions.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_wire::protocol::CoordinatorMessage;
use tokio::sync::mpsc;
use tracing::warn;

use super::DriverInput;
use crate::config::CoordinatorConfig;
use crate::serve::aggregation_worker::AggregationWorker;
use crate::serve::secure::SecurePhase;

pub(super) struct Links {
    pub(super) config: Arc<CoordinatorConfig>,
    pub(super) inputs: mpsc::UnboundedSender<DriverInput>,
    pub(super) worker: Arc<AggregationWorker>,
    /// Each connected device's current session.
    pub(super) sessions: HashMap<String, quinn::Connection>,
}

impl Links {
    /// Hands the driver `input` once `after` has passed.
    pub(super) fn after(&self, after: Duration, input: DriverInput) {
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = inputs.send(input);
        });
    }

    /// A secure session's phase deadline, `[secure_aggregation] phase_secs` from now.
    pub(super) fn schedule_secure_timer(&self, session: u64, phase: SecurePhase) {
        let Some(section) = &self.config.secure_aggregation else { return };
        self.after(Duration::from_secs(section.phase_secs.into()), DriverInput::SecureTimer { session, phase });
    }

    /// Asks each survivor of a secure sum (a round's, or an evaluation's for model `round`) for
    /// its unmasking shares.
    pub(super) fn ask_for_unmasking(
        &self,
        request: flotilla_secagg::messages::UnmaskRequest,
        survivors: Vec<String>,
        round: u32,
    ) {
        let message = CoordinatorMessage::SecureUnmask(request);
        for device in survivors {
            let Some(connection) = self.sessions.get(&device).cloned() else { continue };
            let message = message.clone();
            tokio::spawn(async move {
                if let Err(error) = super::push(&connection, &message).await {
                    warn!(device = %device, round, "cannot ask for unmasking shares: {error:#}");
                }
            });
        }
    }
}
