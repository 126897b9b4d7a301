//! The round driver's side of `[secure_aggregation]` (see `crate::serve::secure`): it starts each round's
//! SecAgg+ state with the round's tasks, answers the phases' requests when they close, asks the
//! survivors to unmask when the engine aggregates, and hands the unmasked sums to the worker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_engine::Event;
use flotilla_secagg::server::Aggregate;
use flotilla_wire::protocol::{Ack, CoordinatorMessage, Reject, SecureTask};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::{DriverInput, RoundDriver};
use crate::config::privacy::PrivacyMode;
use crate::records::report::{RoundFacts, SecureRoundRecord, UpdateRecord};
use crate::serve::aggregation_worker::{FoldDone, SecureOutcome};
use crate::serve::secure::{Closed, SecurePhase, SecureRound};

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

pub(super) fn publish_phase(current: Option<SecurePhase>) {
    for phase in [SecurePhase::Keys, SecurePhase::Shares, SecurePhase::Upload, SecurePhase::Unmask] {
        let value = if Some(phase) == current { 1.0 } else { 0.0 };
        metrics::gauge!("fl_secagg_phase", "phase" => phase.name()).set(value);
    }
}

impl RoundDriver {
    /// A secure round's input; returns what the engine must hear of it.
    pub(super) fn secure_input(&mut self, input: DriverInput) -> Vec<Event> {
        match input {
            DriverInput::Secure { device, request, bytes, reply } => {
                self.secure_request(&device, request, bytes, reply)
            }
            DriverInput::SecureTimer { session, phase } => self.secure_timer(session, phase),
            DriverInput::SecureUnmasked { round, record, outcome } => {
                self.secure_unmasked(round, record, outcome);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    pub(super) fn fold_masked(
        &mut self,
        device: String,
        masked: flotilla_wire::protocol::MaskedUpdate,
        reply: oneshot::Sender<CoordinatorMessage>,
        round: u32,
    ) {
        let (rank, wire_bytes) = (masked.rank, 4 * masked.masked.values.len() as u64);
        let result = match self.secure.as_mut() {
            Some(secure) if secure.round == round => secure.masked(&device, masked.masked).map(|()| wire_bytes),
            _ => Err(format!("round {round} is not a secure round in progress")),
        };
        self.answer_fold(device, rank, reply, round, result);
    }

    /// Answers a device's upload that the driver itself folded (or refused), and tells the engine.
    pub(super) fn answer_fold(
        &mut self,
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
                if let Some(secure) = self.secure.as_mut().filter(|s| s.round == round) {
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
        let _ = self.inputs.send(DriverInput::FoldDone(FoldDone { device, round, accepted }));
    }

    /// Under `[secure_aggregation]`: the round's SecAgg+ state for the devices about to get a
    /// task, and each one's part of its task (an empty map without secure aggregation). A round
    /// that cannot be secured gives `None`: no task may go out (it could be uploaded in the
    /// clear), and its devices are failed at once, so the engine skips the round.
    pub(super) fn start_secure_round(
        &mut self,
        reachable: &[(String, u32, u32, quinn::Connection)],
    ) -> Option<BTreeMap<String, SecureTask>> {
        let (Some(section), Some(layout)) = (&self.config.secure_aggregation, self.secure_layout) else {
            return Some(BTreeMap::new());
        };
        let round = reachable.first().map(|r| r.1)?;
        let participants: Vec<(String, u32)> = reachable.iter().map(|(d, _, rank, _)| (d.clone(), *rank)).collect();
        let distributed_privacy = self.config.privacy.as_ref().filter(|p| p.mode == PrivacyMode::Distributed);
        match SecureRound::start(round, &participants, section, layout, distributed_privacy) {
            Ok((secure, tasks)) => {
                info!(
                    "[round {round}] secure aggregation: {} devices, threshold {}",
                    participants.len(),
                    secure.threshold()
                );
                self.schedule_secure_timer(secure.session, SecurePhase::Keys);
                self.secure = Some(secure);
                publish_phase(Some(SecurePhase::Keys));
                Some(tasks)
            }
            Err(error) => {
                let reason = format!("cannot run securely, no task was sent: {error:#}");
                warn!("[round {round}] {reason}");
                metrics::counter!("fl_secagg_rounds_total", "outcome" => "discarded").increment(1);
                self.secure = None;
                self.cannot_run.insert(round, reason);
                for (device, ..) in &participants {
                    let done = FoldDone { device: device.clone(), round, accepted: false };
                    let _ = self.inputs.send(DriverInput::FoldDone(done));
                }
                // No task went out, so nothing can come: the round's deadline is now.
                let _ = self.inputs.send(DriverInput::TimerFired { round, timer: flotilla_engine::Timer::Deadline });
                None
            }
        }
    }

    /// A phase's deadline, `[secure_aggregation] phase_secs` from now.
    pub(super) fn schedule_secure_timer(&self, session: u64, phase: SecurePhase) {
        let Some(section) = &self.config.secure_aggregation else { return };
        self.schedule_secure_timer_after(session, phase, Duration::from_secs(section.phase_secs.into()));
    }

    pub(super) fn schedule_secure_timer_after(&self, session: u64, phase: SecurePhase, after: Duration) {
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = inputs.send(DriverInput::SecureTimer { session, phase });
        });
    }

    /// A device's keys, shares or unmasking shares; returns what the engine must hear of it.
    fn secure_request(
        &mut self,
        device: &str,
        request: SecureRequest,
        bytes: u64,
        reply: oneshot::Sender<CoordinatorMessage>,
    ) -> Vec<Event> {
        if self.federated.is_evaluation_session(request.session()) {
            self.secure_evaluation_request(device, request, bytes, reply);
            return Vec::new();
        }
        let Some(secure) = self.secure.as_mut() else {
            refuse(reply, 0, "no secure round is in progress".into());
            return Vec::new();
        };
        let round = secure.round;
        secure.protocol_bytes += bytes;
        metrics::counter!("fl_secagg_protocol_bytes_total").increment(bytes);
        let (phase, outcome) = match request {
            SecureRequest::Keys(keys, certificate) => {
                (SecurePhase::Keys, secure.keys(device, keys, certificate, reply))
            }
            SecureRequest::Shares(shares) => (SecurePhase::Shares, secure.shares(device, shares, reply)),
            SecureRequest::Unmask(shares) => {
                match secure.unmask(device, shares) {
                    Ok(all_in) => {
                        let _ = reply.send(CoordinatorMessage::Ack(Ack { round }));
                        if all_in {
                            self.finish_unmasking();
                        }
                    }
                    Err(reason) => {
                        warn!(device, round, "[round {round}] unmasking shares refused: {reason}");
                        refuse(reply, round, reason);
                    }
                }
                return Vec::new();
            }
            SecureRequest::MaskedEvaluation(masked) => {
                let reason = "a masked evaluation for a session that is not an evaluation in progress";
                refuse(reply, masked.model_round, reason.into());
                return Vec::new();
            }
        };
        match outcome {
            Ok(true) => self.close_secure_phase(phase),
            Ok(false) => Vec::new(),
            Err((reason, reply)) => {
                warn!(device, round, "[round {round}] secure {} message refused: {reason}", phase.name());
                metrics::counter!("fl_secagg_refused_total", "phase" => phase.name()).increment(1);
                refuse(reply, round, reason);
                Vec::new()
            }
        }
    }

    /// A phase's deadline: closes it if the round is still in it.
    fn secure_timer(&mut self, session: u64, phase: SecurePhase) -> Vec<Event> {
        if self.federated.is_evaluation_session(session) {
            self.secure_evaluation_timer(phase);
            return Vec::new();
        }
        let current = self.secure.as_ref().filter(|s| s.session == session && s.discarded().is_none());
        match current.map(SecureRound::phase) {
            Some(now) if now == phase => match phase {
                SecurePhase::Keys | SecurePhase::Shares => self.close_secure_phase(phase),
                SecurePhase::Unmask => {
                    self.finish_unmasking();
                    Vec::new()
                }
                SecurePhase::Upload => Vec::new(),
            },
            _ => Vec::new(),
        }
    }

    /// Closes the keys or shares phase: the devices that missed it are failed in the engine.
    fn close_secure_phase(&mut self, phase: SecurePhase) -> Vec<Event> {
        let Some(secure) = self.secure.as_mut() else { return Vec::new() };
        let Closed { dropped, discarded } = match phase {
            SecurePhase::Keys => secure.close_keys(),
            SecurePhase::Shares => secure.close_shares(),
            SecurePhase::Upload | SecurePhase::Unmask => return Vec::new(),
        };
        let (round, session) = (secure.round, secure.session);
        if !dropped.is_empty() {
            info!("[round {round}] secure {} phase closed without {}", phase.name(), dropped.join(", "));
        }
        match discarded {
            Some(reason) => {
                warn!("[round {round}] secure round discarded, nothing revealed: {reason}");
                publish_phase(None);
            }
            None => {
                let next = if phase == SecurePhase::Keys { SecurePhase::Shares } else { SecurePhase::Upload };
                publish_phase(Some(next));
                if next == SecurePhase::Shares {
                    self.schedule_secure_timer(session, next);
                }
            }
        }
        dropped.into_iter().map(|device| Event::UpdateInvalid { device, round }).collect()
    }

    /// The engine aggregates a secure round: each survivor is asked for its unmasking shares.
    pub(super) fn begin_unmask(&mut self, facts: RoundFacts) {
        let Some(secure) = self.secure.as_mut() else { return };
        if let Some(reason) = secure.noise_shortfall() {
            // Nothing is unmasked: the sums would carry too little noise.
            let (round, record) = (secure.round, secure.record());
            self.secure = None;
            self.unmasking = Some((facts, Instant::now()));
            return self.secure_unmasked(round, record, Err(reason));
        }
        let (request, survivors) = secure.begin_unmask();
        let (round, session) = (secure.round, secure.session);
        publish_phase(Some(SecurePhase::Unmask));
        info!("[round {round}] secure round: {} masked updates in; unmasking", survivors.len());
        self.unmasking = Some((facts, Instant::now()));
        if survivors.is_empty() {
            return self.finish_unmasking();
        }
        self.ask_for_unmasking(request, survivors, round, session);
    }

    /// Asks each survivor of a secure sum (a round's, or an evaluation's for model `round`) for
    /// its unmasking shares, and starts the unmask phase's deadline.
    pub(super) fn ask_for_unmasking(
        &self,
        request: flotilla_secagg::messages::UnmaskRequest,
        survivors: Vec<String>,
        round: u32,
        session: u64,
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
        self.schedule_secure_timer(session, SecurePhase::Unmask);
    }

    /// Unmasks the sums off the async loop; the result comes back as `SecureUnmasked`.
    fn finish_unmasking(&mut self) {
        let Some(secure) = self.secure.take() else { return };
        let (round, record) = (secure.round, secure.record());
        let inputs = self.inputs.clone();
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
    fn secure_unmasked(&mut self, round: u32, mut record: SecureRoundRecord, outcome: Result<Aggregate, String>) {
        publish_phase(None);
        let Some((mut facts, started)) = self.unmasking.take().filter(|(f, _)| f.round == round) else { return };
        record.unmask_seconds = started.elapsed().as_secs_f64();
        let outcome = match outcome {
            Ok(aggregate) => {
                record.survivors = aggregate.survivors.len();
                record.recovered = aggregate.dropped.len();
                record.sum_error_bound = aggregate.error_bound;
                record.revealed_rank = aggregate.revealed_rank;
                if let Some(layout) = self.secure_layout.filter(|l| aggregate.revealed_rank < l.max_rank) {
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
        let worker = self.worker.clone();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let result = worker.finish_secure(facts, outcome).await;
            let _ = inputs.send(DriverInput::AggregationDone { round, result });
        });
    }
}
