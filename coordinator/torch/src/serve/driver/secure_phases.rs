//! The round driver's side of `[secure_aggregation]` (see `crate::serve::secure`): it starts each
//! round's SecAgg+ session with the round's tasks, feeds the session machine the devices' requests
//! and the deadlines it asked for, turns the devices it drops into engine events, ends the uploads
//! when the engine aggregates, and hands the unmasked sums to the worker.

use std::collections::BTreeMap;
use std::time::Instant;

use flotilla_engine::Event;
use flotilla_secagg::server::Aggregate;
use flotilla_wire::protocol::{Ack, CoordinatorMessage, Reject, SecureTask};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::links::Links;
use super::DriverInput;
use crate::config::privacy::PrivacyMode;
use crate::records::report::{RoundFacts, SecureRoundRecord, UpdateRecord};
use crate::serve::aggregation_worker::{FoldDone, SecureOutcome, Sent, Upload};
use crate::serve::secure::{SecurePhase, SecureRound, SessionAction};
use flotilla_secagg::session::SessionEvent;
use flotilla_wire::signed_keys::PeerCredential;

/// What a device asks in a secure round's phases.
pub enum SecureRequest {
    /// Its signed keys, and the certificate its session was opened with (relayed to its peers).
    Keys(flotilla_wire::signed_keys::SignedKeys, Vec<u8>),
    Shares(flotilla_wire::protocol::SecureShares),
    Unmask(flotilla_secagg::messages::UnmaskShares),
    /// Federated evaluation's masked sums (`crate::serve::secure_evaluation`).
    MaskedEvaluation(flotilla_wire::evaluation::MaskedEvaluation),
}

impl SecureRequest {
    /// The request as an event of the session machine (masked evaluation sums as a masked input).
    pub fn event(self, device: &str) -> SessionEvent<PeerCredential> {
        let device = device.to_string();
        match self {
            SecureRequest::Keys(signed, certificate) => {
                let flotilla_wire::signed_keys::SignedKeys { advert, rank, signature } = signed;
                let credential = PeerCredential { id: advert.from, certificate, signature };
                SessionEvent::Keys { device, advert, rank, credential }
            }
            SecureRequest::Shares(shares) => {
                SessionEvent::Shares { device, session: shares.session, shares: shares.shares }
            }
            SecureRequest::Unmask(shares) => SessionEvent::Unmask { device, shares },
            SecureRequest::MaskedEvaluation(masked) => SessionEvent::Masked { device, input: masked.masked },
        }
    }

    /// The phase the request belongs to.
    pub fn phase(&self) -> SecurePhase {
        match self {
            SecureRequest::Keys(..) => SecurePhase::Keys,
            SecureRequest::Shares(_) => SecurePhase::Shares,
            SecureRequest::MaskedEvaluation(_) => SecurePhase::Upload,
            SecureRequest::Unmask(_) => SecurePhase::Unmask,
        }
    }

    /// The SecAgg+ session the request belongs to.
    pub fn session(&self) -> u64 {
        match self {
            SecureRequest::Keys(keys, _) => keys.advert.session,
            SecureRequest::Shares(shares) => shares.session,
            SecureRequest::Unmask(shares) => shares.session,
            SecureRequest::MaskedEvaluation(masked) => masked.masked.session,
        }
    }
}

pub(super) fn refuse(reply: oneshot::Sender<CoordinatorMessage>, round: u32, reason: String) {
    let _ = reply.send(CoordinatorMessage::Reject(Reject { round, reason }));
}

/// Logs the refusal of `device`'s request among `actions`, if it was refused.
pub(super) fn log_refusal(actions: &[SessionAction], device: &str, round: u32, phase: SecurePhase, what: &str) {
    for action in actions {
        if let SessionAction::Refuse { device: refused, reason } = action {
            if refused != device {
                continue;
            }
            warn!(device, round, "[round {round}] {what} {} message refused: {reason}", phase.name());
            metrics::counter!("fl_secagg_refused_total", "phase" => phase.name()).increment(1);
        }
    }
}

pub(super) fn publish_phase(current: Option<SecurePhase>) {
    for phase in [SecurePhase::Keys, SecurePhase::Shares, SecurePhase::Upload, SecurePhase::Unmask] {
        let value = if Some(phase) == current { 1.0 } else { 0.0 };
        metrics::gauge!("fl_secagg_phase", "phase" => phase.name()).set(value);
    }
}

/// The secure rounds' side of the driver: the session of the round in progress, and the facts
/// of a round whose sums are being unmasked.
#[derive(Default)]
pub(super) struct SecureRounds {
    /// Under `[secure_aggregation]`: the layout of the masked vectors.
    layout: Option<flotilla_secagg::layout::Layout>,
    current: Option<SecureRound>,
    /// A secure round's facts while its sums are being unmasked, and when unmasking began.
    unmasking: Option<(RoundFacts, Instant)>,
}

/// What a round's devices get for their secure part.
pub(super) enum Secured {
    /// Each device's part of its task (empty without secure aggregation).
    Tasks(BTreeMap<String, SecureTask>),
    /// The round cannot be secured: no task may go out (it could be uploaded in the clear); its
    /// devices are failed at once, so the engine skips the round.
    CannotRun { round: u32, reason: String },
}

impl SecureRounds {
    pub(super) fn new(layout: Option<flotilla_secagg::layout::Layout>) -> SecureRounds {
        SecureRounds { layout, current: None, unmasking: None }
    }

    /// Whether a secure round's session is `round`'s.
    pub(super) fn is_round(&self, round: u32) -> bool {
        self.current.as_ref().is_some_and(|s| s.round == round)
    }

    /// Forgets `round`'s session (the round was skipped).
    pub(super) fn forget(&mut self, round: u32) {
        self.current.take_if(|s| s.round == round);
    }

    /// A secure round's input; returns what the engine must hear of it.
    pub(super) fn input(&mut self, links: &Links, input: DriverInput) -> Vec<Event> {
        match input {
            DriverInput::Secure { device, request, bytes, reply } => {
                self.request(links, &device, request, bytes, reply)
            }
            DriverInput::SecureTimer { session, phase } => self.timer(links, session, phase),
            DriverInput::SecureUnmasked { round, record, outcome } => {
                self.unmasked(links, round, record, outcome);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// An upload the engine let in: under secure aggregation (or masked) the session takes it or
    /// refuses it and the device is answered; otherwise it comes back for the aggregation worker.
    pub(super) fn fold(&mut self, links: &Links, upload: Upload, round: u32) -> Option<Upload> {
        if links.config.secure_aggregation.is_none() && !matches!(upload.sent, Sent::Masked(_)) {
            return Some(upload);
        }
        let Upload { device, sent, reply } = upload;
        match sent {
            Sent::Masked(masked) => self.fold_masked(links, device, masked, reply, round),
            Sent::Plain { update, .. } => {
                let refused = "this round runs under secure aggregation: the update must be masked (a MaskedUpdate)";
                self.answer_fold(links, device, update.rank, reply, round, Err(refused.into()))
            }
        }
        None
    }

    /// A masked upload the engine let in: the session takes it or refuses it, and the device is
    /// answered.
    fn fold_masked(
        &mut self,
        links: &Links,
        device: String,
        masked: flotilla_wire::protocol::MaskedUpdate,
        reply: oneshot::Sender<CoordinatorMessage>,
        round: u32,
    ) {
        let (rank, wire_bytes) = (masked.rank, 4 * masked.masked.values.len() as u64);
        let result = match self.current.as_mut() {
            Some(secure) if secure.round == round => {
                let event = SessionEvent::Masked { device: device.clone(), input: masked.masked };
                // No reply is held: the answer comes back as the verdict.
                let actions = secure.request(&device, event, None);
                match actions.iter().find_map(|a| match a {
                    SessionAction::Refuse { device: refused, reason } if *refused == device => Some(reason),
                    _ => None,
                }) {
                    Some(reason) => Err(reason.clone()),
                    None => Ok(wire_bytes),
                }
            }
            _ => Err(format!("round {round} is not a secure round in progress")),
        };
        self.answer_fold(links, device, rank, reply, round, result);
    }

    /// Answers a device's upload that the driver itself folded (or refused), and tells the engine.
    fn answer_fold(
        &mut self,
        links: &Links,
        device: String,
        rank: u32,
        reply: oneshot::Sender<CoordinatorMessage>,
        round: u32,
        result: Result<u64, String>,
    ) {
        let accepted = match result {
            Ok(wire_bytes) => {
                info!(device = %device, round, rank, "[round {round}] masked update accepted");
                metrics::counter!("fl_updates_total", "status" => "accepted", "reason" => "ok").increment(1);
                let _ = reply.send(CoordinatorMessage::Ack(Ack { round }));
                // A masked update: nothing of the device is kept but its rank.
                let record = UpdateRecord::new(&device, rank, 0, None, wire_bytes, true);
                if let Some(secure) = self.current.as_mut().filter(|s| s.round == round) {
                    secure.accepted.push(record);
                }
                true
            }
            Err(reason) => {
                warn!(device = %device, round, "[round {round}] update rejected: {reason}");
                metrics::counter!("fl_updates_total", "status" => "rejected", "reason" => "invalid").increment(1);
                let _ = reply.send(CoordinatorMessage::Reject(Reject { round, reason }));
                false
            }
        };
        let _ = links.inputs.send(DriverInput::FoldDone(FoldDone { device, round, accepted }));
    }

    /// Under `[secure_aggregation]`: the round's SecAgg+ session for the devices about to get a
    /// task, and each one's part of its task.
    pub(super) fn start_round(
        &mut self,
        links: &Links,
        reachable: &[(String, u32, u32, quinn::Connection)],
    ) -> Secured {
        let (Some(section), Some(layout), Some(round)) =
            (&links.config.secure_aggregation, self.layout, reachable.first().map(|r| r.1))
        else {
            return Secured::Tasks(BTreeMap::new());
        };
        let participants: Vec<(String, u32)> = reachable.iter().map(|(d, _, rank, _)| (d.clone(), *rank)).collect();
        let distributed_privacy = links.config.privacy.as_ref().filter(|p| p.mode == PrivacyMode::Distributed);
        match SecureRound::start(round, &participants, section, layout, distributed_privacy) {
            Ok((secure, actions, tasks)) => {
                info!(
                    "[round {round}] secure aggregation: {} devices, threshold {}",
                    participants.len(),
                    secure.threshold()
                );
                self.current = Some(secure);
                self.session_actions(links, actions);
                Secured::Tasks(tasks)
            }
            Err(error) => {
                let reason = format!("cannot run securely, no task was sent: {error:#}");
                warn!("[round {round}] {reason}");
                metrics::counter!("fl_secagg_rounds_total", "outcome" => "discarded").increment(1);
                self.current = None;
                for (device, ..) in &participants {
                    let done = FoldDone { device: device.clone(), round, accepted: false };
                    let _ = links.inputs.send(DriverInput::FoldDone(done));
                }
                // No task went out, so nothing can come: the round's deadline is now.
                let _ = links.inputs.send(DriverInput::TimerFired { round, timer: flotilla_engine::Timer::Deadline });
                Secured::CannotRun { round, reason }
            }
        }
    }

    /// A device's keys, shares or unmasking shares; returns what the engine must hear of it.
    fn request(
        &mut self,
        links: &Links,
        device: &str,
        request: SecureRequest,
        bytes: u64,
        reply: oneshot::Sender<CoordinatorMessage>,
    ) -> Vec<Event> {
        let Some(secure) = self.current.as_mut() else {
            refuse(reply, 0, "no secure round is in progress".into());
            return Vec::new();
        };
        let round = secure.round;
        secure.protocol_bytes += bytes;
        metrics::counter!("fl_secagg_protocol_bytes_total").increment(bytes);
        if let SecureRequest::MaskedEvaluation(masked) = &request {
            let reason = "a masked evaluation for a session that is not an evaluation in progress";
            refuse(reply, masked.model_round, reason.into());
            return Vec::new();
        }
        let phase = request.phase();
        let actions = secure.request(device, request.event(device), Some(reply));
        log_refusal(&actions, device, round, phase, "secure");
        self.session_actions(links, actions)
    }

    /// A phase's deadline: the session closes it if it is still in it.
    fn timer(&mut self, links: &Links, session: u64, phase: SecurePhase) -> Vec<Event> {
        let Some(secure) = self.current.as_mut().filter(|s| s.session == session) else { return Vec::new() };
        let actions = secure.handle(SessionEvent::Deadline(phase));
        self.session_actions(links, actions)
    }

    /// Carries out what a round's session machine asks (its replies are already sent); returns
    /// what the engine must hear: the devices out of the round failed.
    fn session_actions(&mut self, links: &Links, actions: Vec<SessionAction>) -> Vec<Event> {
        let Some((round, session)) = self.current.as_ref().map(|s| (s.round, s.session)) else { return Vec::new() };
        let mut events = Vec::new();
        for action in actions {
            match action {
                SessionAction::Entered(phase) => publish_phase(Some(phase)),
                SessionAction::StartDeadline(phase) => links.schedule_secure_timer(session, phase),
                SessionAction::Dropped(devices) => {
                    info!("[round {round}] secure aggregation goes on without {}", devices.join(", "));
                    events.extend(devices.into_iter().map(|device| Event::UpdateInvalid { device, round }));
                }
                SessionAction::Discarded(reason) => {
                    warn!("[round {round}] secure round discarded, nothing revealed: {reason}");
                    publish_phase(None);
                }
                SessionAction::AskToUnmask { request, survivors } => {
                    info!("[round {round}] secure round: {} masked updates in; unmasking", survivors.len());
                    links.ask_for_unmasking(request, survivors, round);
                }
                SessionAction::ReadyToUnmask => self.finish_unmasking(links),
                // Sent by the session to the requests it held.
                SessionAction::Reply { .. } | SessionAction::Refuse { .. } => {}
            }
        }
        events
    }

    /// The engine aggregates `facts.round`: if it is a secure round, the uploads are over and each
    /// survivor is asked for its unmasking shares; otherwise the facts come back.
    pub(super) fn aggregate(&mut self, links: &Links, mut facts: RoundFacts) -> Option<RoundFacts> {
        let round = facts.round;
        let Some(secure) = self.current.as_mut().filter(|s| s.round == round) else { return Some(facts) };
        facts.updates = std::mem::take(&mut secure.accepted);
        if let Some(reason) = secure.noise_shortfall() {
            // Nothing is unmasked: the sums would carry too little noise.
            let record = secure.record();
            self.current = None;
            self.unmasking = Some((facts, Instant::now()));
            self.unmasked(links, round, record, Err(reason));
            return None;
        }
        self.unmasking = Some((facts, Instant::now()));
        let actions = secure.handle(SessionEvent::UploadsClosed);
        self.session_actions(links, actions);
        None
    }

    /// Unmasks the sums off the async loop; the result comes back as `SecureUnmasked`.
    fn finish_unmasking(&mut self, links: &Links) {
        let Some(secure) = self.current.take() else { return };
        let (round, record) = (secure.round, secure.record());
        let inputs = links.inputs.clone();
        tokio::spawn(async move {
            let outcome = tokio::task::spawn_blocking(move || {
                crate::serve::crash_points::point("mid-unmask", round);
                secure.finish().map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(format!("unmasking stopped: {e}")));
            let _ = inputs.send(DriverInput::SecureUnmasked { round, record, outcome });
        });
    }

    /// The unmasked sums (or why there are none) go to the worker, which finishes the round.
    fn unmasked(
        &mut self,
        links: &Links,
        round: u32,
        mut record: SecureRoundRecord,
        outcome: Result<Aggregate, String>,
    ) {
        publish_phase(None);
        let Some((mut facts, started)) = self.unmasking.take().filter(|(f, _)| f.round == round) else { return };
        record.unmask_seconds = started.elapsed().as_secs_f64();
        let outcome = match outcome {
            Ok(aggregate) => {
                record.survivors = aggregate.survivors.len();
                record.recovered = aggregate.dropped.len();
                record.sum_error_bound = aggregate.error_bound;
                record.revealed_rank = aggregate.revealed_rank;
                if let Some(layout) = self.layout.filter(|l| aggregate.revealed_rank < l.max_rank) {
                    warn!(
                        "[round {round}] slots {}–{} are held by fewer than threshold + 1 = {} surviving devices: \
                         not revealed, they keep their previous global values",
                        aggregate.revealed_rank + 1,
                        layout.max_rank,
                        record.threshold + 1
                    );
                }
                metrics::gauge!("fl_secagg_revealed_rank").set(f64::from(aggregate.revealed_rank));
                metrics::counter!("fl_secagg_rounds_total", "outcome" => "aggregated").increment(1);
                metrics::counter!("fl_secagg_recovered_total").increment(aggregate.dropped.len() as u64);
                metrics::gauge!("fl_secagg_survivors").set(aggregate.survivors.len() as f64);
                info!(
                    "[round {round}] unmasked the sums of {} device(s) ({} recovered after dropping) in {:.2} s",
                    record.survivors, record.recovered, record.unmask_seconds
                );
                SecureOutcome::Sums(aggregate.sums)
            }
            Err(reason) => {
                warn!("[round {round}] secure round discarded, nothing revealed: {reason}");
                metrics::counter!("fl_secagg_rounds_total", "outcome" => "discarded").increment(1);
                record.discarded = Some(reason);
                SecureOutcome::Discarded
            }
        };
        facts.secure = Some(record);
        let worker = links.worker.clone();
        let inputs = links.inputs.clone();
        tokio::spawn(async move {
            let result = worker.finish_secure(facts, outcome).await;
            let _ = inputs.send(DriverInput::AggregationDone { round, result });
        });
    }
}
