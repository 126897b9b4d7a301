//! The round driver's side of federated evaluation under `[secure_aggregation]`
//! (`crate::serve::secure_evaluation`): the evaluation's SecAgg+ session runs its phases like a secure
//! round (keys, shares, masked sums, unmasking), its requests told apart by session; its totals,
//! or why there are none, become the model's evaluation record.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_secagg::server::Aggregate;
use flotilla_wire::evaluation::SecureEvaluation;
use flotilla_wire::protocol::{Ack, CoordinatorMessage};
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::secure_phases::{refuse, SecureRequest};
use super::{DriverInput, RoundDriver};
use crate::serve::federated_evaluation::Evaluator;
use crate::serve::secure::{Closed, SecurePhase};
use crate::serve::secure_evaluation::SecureEvaluationSession;

impl RoundDriver {
    /// Starts model `model_round`'s secure sum among `evaluators`; returns each device's part of
    /// its task, or None (the evaluation closed, recording why) when it cannot be secured.
    pub(super) fn start_secure_evaluation(
        &mut self,
        model_round: u32,
        evaluators: &BTreeMap<String, Evaluator>,
    ) -> Option<BTreeMap<String, SecureEvaluation>> {
        let section = self.config.secure_aggregation.as_ref()?;
        let min_group = self.config.federated_evaluation.as_ref().map_or(1, |s| s.min_group_devices);
        let classes = self.evaluation_labels();
        match SecureEvaluationSession::start(model_round, evaluators, section, min_group, classes) {
            Ok((session, parts)) => {
                info!(
                    model_round,
                    devices = evaluators.len(),
                    groups = session.groups(),
                    "federated evaluation under secure aggregation: the sums will travel masked"
                );
                self.schedule_secure_timer(session.session(), SecurePhase::Keys);
                self.federated.secure = Some(session);
                Some(parts)
            }
            Err(error) => {
                let reason = format!("cannot be secured, no device was asked: {error:#}");
                warn!(model_round, "federated evaluation {reason}");
                self.discard_secure_evaluation(model_round, reason, 0);
                None
            }
        }
    }

    /// A request of the evaluation's secure sum.
    pub(super) fn secure_evaluation_request(
        &mut self,
        device: &str,
        request: SecureRequest,
        bytes: u64,
        reply: oneshot::Sender<CoordinatorMessage>,
    ) {
        let Some(session) = self.federated.secure.as_mut() else { return };
        let model_round = session.model_round;
        let Some(round) = session.round.as_mut() else {
            return refuse(reply, model_round, "the evaluation's sums are being unmasked".into());
        };
        round.protocol_bytes += bytes;
        let (phase, outcome) = match request {
            SecureRequest::Keys(keys, certificate) => (SecurePhase::Keys, round.keys(device, keys, certificate, reply)),
            SecureRequest::Shares(shares) => (SecurePhase::Shares, round.shares(device, shares, reply)),
            SecureRequest::MaskedEvaluation(masked) => {
                let answer = if masked.model_round != model_round {
                    Err(format!(
                        "masked sums of model {}, this evaluation is of model {model_round}",
                        masked.model_round
                    ))
                } else {
                    round.masked(device, masked.masked)
                };
                match answer {
                    Ok(()) => {
                        let _ = reply.send(CoordinatorMessage::Ack(Ack { round: model_round }));
                        if round.all_uploaded() {
                            self.begin_evaluation_unmask();
                        }
                    }
                    Err(reason) => {
                        warn!(device, model_round, "masked evaluation sums refused: {reason}");
                        refuse(reply, model_round, reason);
                    }
                }
                return;
            }
            SecureRequest::Unmask(shares) => {
                match round.unmask(device, shares) {
                    Ok(all_in) => {
                        let _ = reply.send(CoordinatorMessage::Ack(Ack { round: model_round }));
                        if all_in {
                            self.finish_evaluation_unmasking();
                        }
                    }
                    Err(reason) => refuse(reply, model_round, reason),
                }
                return;
            }
        };
        match outcome {
            Ok(true) => self.close_evaluation_phase(phase),
            Ok(false) => {}
            Err((reason, reply)) => {
                warn!(device, model_round, "secure evaluation {} message refused: {reason}", phase.name());
                refuse(reply, model_round, reason);
            }
        }
    }

    /// A phase deadline of the evaluation's secure sum.
    pub(super) fn secure_evaluation_timer(&mut self, phase: SecurePhase) {
        let current = self.federated.secure.as_ref().and_then(|s| s.round.as_ref()).map(|r| r.phase());
        if current != Some(phase) {
            return;
        }
        match phase {
            SecurePhase::Keys | SecurePhase::Shares => self.close_evaluation_phase(phase),
            SecurePhase::Upload => self.begin_evaluation_unmask(),
            SecurePhase::Unmask => self.finish_evaluation_unmasking(),
        }
    }

    /// Closes the keys or shares phase; after the shares, the devices have the evaluation's
    /// deadline to score the model and send their masked sums.
    fn close_evaluation_phase(&mut self, phase: SecurePhase) {
        let Some(session) = self.federated.secure.as_mut() else { return };
        let (model_round, session_id) = (session.model_round, session.session());
        let Some(round) = session.round.as_mut() else { return };
        let Closed { dropped, discarded } = match phase {
            SecurePhase::Keys => round.close_keys(),
            SecurePhase::Shares => round.close_shares(),
            SecurePhase::Upload | SecurePhase::Unmask => return,
        };
        let bytes = round.protocol_bytes;
        if !dropped.is_empty() {
            info!(model_round, "secure evaluation: the {} phase closed without {}", phase.name(), dropped.join(", "));
        }
        if let Some(reason) = discarded {
            warn!(model_round, "secure evaluation discarded, nothing revealed: {reason}");
            return self.discard_secure_evaluation(model_round, reason, bytes);
        }
        match phase {
            SecurePhase::Keys => self.schedule_secure_timer(session_id, SecurePhase::Shares),
            _ => {
                let after = Duration::from_secs(self.evaluation_deadline_secs().into());
                self.schedule_secure_timer_after(session_id, SecurePhase::Upload, after);
            }
        }
    }

    /// The masked sums are in (or their deadline passed): each device whose sums are in is asked
    /// for its unmasking shares.
    fn begin_evaluation_unmask(&mut self) {
        let Some(session) = self.federated.secure.as_mut() else { return };
        let (model_round, session_id) = (session.model_round, session.session());
        let Some(round) = session.round.as_mut() else { return };
        let (request, survivors) = round.begin_unmask();
        info!(model_round, "secure evaluation: {} masked sums in; unmasking", survivors.len());
        if survivors.is_empty() {
            return self.finish_evaluation_unmasking();
        }
        self.ask_for_unmasking(request, survivors, model_round, session_id);
    }

    /// Removes the masks off the async loop; the totals come back as `EvaluationUnmasked`.
    fn finish_evaluation_unmasking(&mut self) {
        let Some(session) = self.federated.secure.as_mut() else { return };
        let Some(round) = session.round.take() else { return };
        let model_round = session.model_round;
        if let Some(tally) = self.federated.open_tally(model_round) {
            tally.bytes_up += round.protocol_bytes;
        }
        let names = round.names();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let outcome = tokio::task::spawn_blocking(move || round.finish().map_err(|e| e.to_string()))
                .await
                .unwrap_or_else(|e| Err(format!("unmasking stopped: {e}")));
            let _ = inputs.send(DriverInput::EvaluationUnmasked { model_round, names, outcome });
        });
    }

    /// The unmasked sums: their groups' totals become the record, or the evaluation closes with
    /// why nothing is published.
    pub(super) fn secure_evaluation_unmasked(
        &mut self,
        model_round: u32,
        names: &BTreeMap<u32, String>,
        outcome: Result<Aggregate, String>,
    ) {
        let Some(session) = self.federated.secure.take_if(|s| s.model_round == model_round) else { return };
        let mut record = session.record();
        let totals = outcome.and_then(|aggregate| {
            record.survivors = aggregate.survivors.len();
            record.recovered = aggregate.dropped.len();
            session.totals(&aggregate, names)
        });
        let Some(tally) = self.federated.open_tally(model_round) else { return };
        match totals {
            Ok(totals) => {
                tally.masked_totals(&totals.survivors, totals.declined, totals.groups);
            }
            Err(reason) => {
                warn!(model_round, "secure evaluation discarded, nothing published: {reason}");
                record.discarded = Some(reason);
            }
        }
        tally.set_masked(record);
        self.close_evaluation(model_round);
    }

    /// Ends a secure evaluation that revealed nothing, recording why.
    fn discard_secure_evaluation(&mut self, model_round: u32, reason: String, protocol_bytes: u64) {
        let session = self.federated.secure.take_if(|s| s.model_round == model_round);
        let Some(tally) = self.federated.open_tally(model_round) else { return };
        tally.bytes_up += protocol_bytes;
        let mut record = session.map(|s| s.record()).unwrap_or_default();
        record.discarded = Some(reason);
        tally.set_masked(record);
        self.close_evaluation(model_round);
    }
}
