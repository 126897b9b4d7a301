//! What the round driver starts from, and what sessions, timers, the aggregation worker and the
//! evaluation thread tell it.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla_engine::Timer;
use flotilla_wire::protocol::CoordinatorMessage;
use tokio::sync::{mpsc, oneshot};

use super::{Departure, SecureRequest};
use crate::config::CoordinatorConfig;
use crate::model::evaluation::RankAccuracy;
use crate::records::report::{RoundRecord, RunSummary};
use crate::serve::aggregation_worker::{AggregationWorker, FoldDone, Upload};
use crate::serve::metrics::SharedStatus;
use crate::serve::secure::SecurePhase;

/// What sessions, timers and the aggregation worker tell the driver.
pub enum DriverInput {
    Joined {
        device: String,
        rank: u32,
        /// The device class its Hello reported.
        class: String,
        connection: quinn::Connection,
    },
    Left {
        device: String,
        connection_id: usize,
        /// What the device said when it closed, if anything.
        why: Option<Departure>,
    },
    UpdateArrived(Upload),
    FoldDone(FoldDone),
    /// Round tasks of `bytes` in all are on their way to devices.
    TasksSent {
        round: u32,
        bytes: u64,
    },
    TimerFired {
        round: u32,
        timer: Timer,
    },
    AggregationDone {
        round: u32,
        result: Result<RoundRecord, String>,
    },
    /// A round's test results, from the evaluation thread (which runs beside the next round).
    Evaluated {
        round: u32,
        result: Result<Vec<RankAccuracy>, String>,
    },
    /// Something the run cannot go on without failed (the reason).
    Fatal(String),
    /// A device's federated evaluation report; `reply` is answered at once.
    EvaluationReport {
        device: String,
        report: Box<flotilla_wire::evaluation::EvaluationReport>,
        /// The report's frame size.
        bytes: u64,
        reply: oneshot::Sender<CoordinatorMessage>,
    },
    /// Model `model_round`'s federated evaluation stops waiting.
    EvaluationDeadline {
        model_round: u32,
    },
    /// Evaluation tasks of `bytes` in all are on their way to devices.
    EvaluationSent {
        model_round: u32,
        bytes: u64,
    },
    /// A secure round's request from a device; `reply` is answered when its phase closes.
    Secure {
        device: String,
        request: SecureRequest,
        /// The request's frame size.
        bytes: u64,
        reply: oneshot::Sender<CoordinatorMessage>,
    },
    /// A secure evaluation's sums are unmasked (or why not); `names`: each participant's device.
    EvaluationUnmasked {
        model_round: u32,
        names: BTreeMap<u32, String>,
        outcome: Result<flotilla_secagg::server::Aggregate, String>,
    },
    /// A secure round's phase deadline.
    SecureTimer {
        session: u64,
        phase: SecurePhase,
    },
    /// A secure round's sums are unmasked (or the round is discarded).
    SecureUnmasked {
        round: u32,
        /// The round's record before unmasking (`SecureRound::record`).
        record: crate::records::report::SecureRoundRecord,
        outcome: Result<flotilla_secagg::server::Aggregate, String>,
    },
}

/// What the driver starts from.
pub(crate) struct DriverStart {
    pub config: Arc<CoordinatorConfig>,
    pub base_version: String,
    pub inputs: mpsc::UnboundedSender<DriverInput>,
    pub worker: AggregationWorker,
    pub summary: RunSummary,
    pub first_round: u32,
    pub status: SharedStatus,
    pub secure_layout: Option<flotilla_secagg::layout::Layout>,
    pub ledger: Option<crate::serve::privacy_ledger::PrivacyLedger>,
    /// Under `[privacy]`: what the noise will cost the model, for `/status`.
    pub privacy_plan: Option<crate::config::privacy_plan::PrivacyPlan>,
    /// Train nothing: once `[round] min_devices` have joined, evaluate the resumed checkpoint's
    /// model, of this round, on the devices (`serve --evaluate-only`).
    pub evaluate_only: Option<u32>,
}
