//! The round driver's side of federated evaluation under `[secure_aggregation]`
//! (`crate::serve::secure_evaluation`): the evaluation's SecAgg+ session runs its phases like a secure
//! round (keys, shares, masked sums, unmasking), its requests told apart by session; its totals,
//! or why there are none, become the model's evaluation record.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_secagg::server::Aggregate;
use flotilla_wire::evaluation::SecureEvaluation;
use flotilla_wire::protocol::CoordinatorMessage;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::federated::{evaluation_deadline_secs, evaluation_labels, FederatedState};
use super::links::Links;
use super::secure_phases::{log_refusal, refuse, SecureRequest};
use super::DriverInput;
use crate::serve::federated_evaluation::Evaluator;
use crate::serve::secure::{SecurePhase, SessionAction};
use crate::serve::secure_evaluation::SecureEvaluationSession;
use flotilla_secagg::session::SessionEvent;

impl FederatedState {
    /// Starts model `model_round`'s secure sum among `evaluators`; returns each device's part of
    /// its task, or None (the evaluation closed, recording why) when it cannot be secured.
    pub(super) fn start_secure_evaluation(
        &mut self,
        links: &Links,
        model_round: u32,
        evaluators: &BTreeMap<String, Evaluator>,
    ) -> Option<BTreeMap<String, SecureEvaluation>> {
        let section = links.config.secure_aggregation.as_ref()?;
        let min_group = links.config.federated_evaluation.as_ref().map_or(1, |s| s.min_group_devices);
        let classes = evaluation_labels(&links.config);
        match SecureEvaluationSession::start(model_round, evaluators, section, min_group, classes) {
            Ok((session, actions, parts)) => {
                info!(
                    model_round,
                    devices = evaluators.len(),
                    groups = session.groups(),
                    "federated evaluation under secure aggregation: the sums will travel masked"
                );
                self.secure = Some(session);
                self.evaluation_session_actions(links, actions);
                Some(parts)
            }
            Err(error) => {
                let reason = format!("cannot be secured, no device was asked: {error:#}");
                warn!(model_round, "federated evaluation {reason}");
                self.discard_secure_evaluation(links, model_round, reason, 0);
                None
            }
        }
    }

    /// A request of the evaluation's secure sum.
    pub(super) fn secure_evaluation_request(
        &mut self,
        links: &Links,
        device: &str,
        request: SecureRequest,
        bytes: u64,
        reply: oneshot::Sender<CoordinatorMessage>,
    ) {
        let Some(session) = self.secure.as_mut() else { return };
        let model_round = session.model_round;
        let Some(round) = session.round.as_mut() else {
            return refuse(reply, model_round, "the evaluation's sums are being unmasked".into());
        };
        round.protocol_bytes += bytes;
        if let SecureRequest::MaskedEvaluation(masked) = &request {
            if masked.model_round != model_round {
                let reason =
                    format!("masked sums of model {}, this evaluation is of model {model_round}", masked.model_round);
                warn!(device, model_round, "masked evaluation sums refused: {reason}");
                return refuse(reply, model_round, reason);
            }
        }
        let phase = request.phase();
        let actions = round.request(device, request.event(device), Some(reply));
        log_refusal(&actions, device, model_round, phase, "secure evaluation");
        self.evaluation_session_actions(links, actions);
    }

    /// A phase deadline of the evaluation's secure sum.
    pub(super) fn secure_evaluation_timer(&mut self, links: &Links, phase: SecurePhase) {
        let Some(round) = self.secure.as_mut().and_then(|s| s.round.as_mut()) else { return };
        let actions = round.handle(SessionEvent::Deadline(phase));
        self.evaluation_session_actions(links, actions);
    }

    /// Carries out what the evaluation's session machine asks (its replies are already sent).
    /// After the shares, the devices have the evaluation's deadline to score the model and send
    /// their masked sums.
    fn evaluation_session_actions(&mut self, links: &Links, actions: Vec<SessionAction>) {
        let Some(session) = self.secure.as_ref() else { return };
        let (model_round, session_id) = (session.model_round, session.session());
        for action in actions {
            match action {
                SessionAction::StartDeadline(SecurePhase::Upload) => {
                    let after = Duration::from_secs(evaluation_deadline_secs(&links.config).into());
                    let timer = DriverInput::SecureTimer { session: session_id, phase: SecurePhase::Upload };
                    links.after(after, timer);
                }
                SessionAction::StartDeadline(phase) => links.schedule_secure_timer(session_id, phase),
                SessionAction::Dropped(devices) => {
                    info!(model_round, "secure evaluation goes on without {}", devices.join(", "));
                }
                SessionAction::Discarded(reason) => {
                    warn!(model_round, "secure evaluation discarded, nothing revealed: {reason}");
                    let bytes = self.secure.as_ref().and_then(|s| s.round.as_ref()).map_or(0, |r| r.protocol_bytes);
                    return self.discard_secure_evaluation(links, model_round, reason, bytes);
                }
                SessionAction::AskToUnmask { request, survivors } => {
                    info!(model_round, "secure evaluation: {} masked sums in; unmasking", survivors.len());
                    links.ask_for_unmasking(request, survivors, model_round);
                }
                SessionAction::ReadyToUnmask => self.finish_evaluation_unmasking(links),
                SessionAction::Entered(_) | SessionAction::Reply { .. } | SessionAction::Refuse { .. } => {}
            }
        }
    }

    /// Removes the masks off the async loop; the totals come back as `EvaluationUnmasked`.
    fn finish_evaluation_unmasking(&mut self, links: &Links) {
        let Some(session) = self.secure.as_mut() else { return };
        let Some(round) = session.round.take() else { return };
        let model_round = session.model_round;
        if let Some(tally) = self.open_tally(model_round) {
            tally.bytes_up += round.protocol_bytes;
        }
        let names = round.names();
        let inputs = links.inputs.clone();
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
        links: &Links,
        model_round: u32,
        names: &BTreeMap<u32, String>,
        outcome: Result<Aggregate, String>,
    ) {
        let Some(session) = self.secure.take_if(|s| s.model_round == model_round) else { return };
        let mut record = session.record();
        let totals = outcome.and_then(|aggregate| {
            record.survivors = aggregate.survivors.len();
            record.recovered = aggregate.dropped.len();
            session.totals(&aggregate, names)
        });
        let Some(tally) = self.open_tally(model_round) else { return };
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
        self.close_evaluation(links, model_round);
    }

    /// Ends a secure evaluation that revealed nothing, recording why.
    fn discard_secure_evaluation(&mut self, links: &Links, model_round: u32, reason: String, protocol_bytes: u64) {
        let session = self.secure.take_if(|s| s.model_round == model_round);
        let Some(tally) = self.open_tally(model_round) else { return };
        tally.bytes_up += protocol_bytes;
        let mut record = session.map(|s| s.record()).unwrap_or_default();
        record.discarded = Some(reason);
        tally.set_masked(record);
        self.close_evaluation(links, model_round);
    }
}
