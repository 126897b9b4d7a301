//! `[secure_aggregation]`: SecAgg+ rounds (docs/security.md). The coordinator relays the devices'
//! keys and encrypted shares, collects their masked uploads, and removes the masks from the sum
//! with the shares the survivors reveal: it learns the per-slot sums the slot-wise methods divide,
//! who took part and their ranks, and nothing about any one device.
//!
//! A round's phases (keys, shares, masked uploads, unmasking) are a sans-IO state machine,
//! `flotilla_secagg::session`, with virtual-time tests of its own; this module starts a session
//! for a round or a federated evaluation (its participants, each device's task) and carries the
//! machine's replies to the devices whose requests wait for them. The driver
//! (`driver/secure_phases.rs`) turns its other actions into deadlines, engine events and records.
//! Nothing of a round is persisted: a coordinator that restarts mid-round resumes from its last
//! checkpoint with fresh keys.

use std::collections::BTreeMap;

use flotilla_secagg::layout::Layout;
use flotilla_secagg::server::{Aggregate, ServerRound};
use flotilla_secagg::session::{Reply, SessionEvent, SessionMachine};
use flotilla_secagg::{Parameters, SecAggError};
use flotilla_wire::protocol::{Ack, CoordinatorMessage, Reject, SecurePeers, SecureShares, SecureTask};
use flotilla_wire::signed_keys::PeerCredential;
use tokio::sync::oneshot;

use crate::config::secure::SecureAggregationSection;
use crate::records::report::SecureRoundRecord;

pub use flotilla_secagg::session::Phase as SecurePhase;

/// What the session machine asks of the driver (a device's keys travel with its credential).
pub type SessionAction = flotilla_secagg::session::SessionAction<PeerCredential>;

/// How a round's devices weigh their vectors: the sample cap, and under distributed privacy the
/// contributors each sum needs and each device's noise share.
struct Weights {
    cap: u64,
    needed: Vec<usize>,
    noise_std: Vec<f64>,
}

/// A round (or an evaluation) of secure aggregation, as the coordinator sees it: the session's
/// machine, and the replies its held requests wait for.
pub struct SecureRound {
    pub round: u32,
    pub session: u64,
    /// The records of the masked uploads accepted (rank and size only).
    pub accepted: Vec<crate::records::report::UpdateRecord>,
    /// Bytes of the devices' protocol messages so far.
    pub protocol_bytes: u64,
    machine: SessionMachine<PeerCredential>,
    replies: BTreeMap<String, oneshot::Sender<CoordinatorMessage>>,
    /// Distributed privacy: the survivors each sum needs for its full noise, `[head, slot 0, …]`.
    needed: Vec<usize>,
}

/// A started session: its state, the machine's first actions, and each device's task part.
pub type Started = (SecureRound, Vec<SessionAction>, BTreeMap<String, SecureTask>);

impl SecureRound {
    /// A round among `participants` (device, rank); returns it and each device's task part.
    pub fn start(
        round: u32,
        participants: &[(String, u32)],
        section: &SecureAggregationSection,
        layout: Layout,
        privacy: Option<&crate::config::privacy::PrivacySection>,
    ) -> anyhow::Result<Started> {
        let parameters = section.parameters_for(participants.len())?;
        let mut ranks: Vec<u32> = participants.iter().map(|(_, rank)| *rank).collect();
        ranks.sort_unstable();
        // Distributed privacy: the contributors each sum needs ([head, slot 0, …]) and each device's
        // share of the noise σ·C on it.
        let covering: Vec<usize> = std::iter::once(ranks.len())
            .chain((0..layout.max_rank).map(|slot| ranks.iter().filter(|&&r| r > slot).count()))
            .collect();
        let (needed, noise_std): (Vec<usize>, Vec<f64>) = match privacy {
            Some(privacy) => covering
                .iter()
                .map(|&n| {
                    let needed = if n == 0 { 0 } else { privacy.contributors_needed(n) };
                    let sd = privacy.noise_multiplier * privacy.clip_norm / (needed.max(1) as f64).sqrt();
                    (needed, if n == 0 { 0.0 } else { sd })
                })
                .unzip(),
            None => (Vec::new(), Vec::new()),
        };
        let cap = section.weighting.cap(section.max_samples);
        Self::assemble(round, participants, parameters, layout, Weights { cap, needed, noise_std }, false)
    }

    /// Federated evaluation's secure sum of model `model_round` among `participants` (device, rank):
    /// the section's threshold and degree, the evaluation vectors' range, and one layout for every
    /// rank (`flotilla_wire::secure_evaluation`).
    pub fn start_evaluation(
        model_round: u32,
        participants: &[String],
        section: &SecureAggregationSection,
        layout: Layout,
    ) -> anyhow::Result<Started> {
        use flotilla_wire::secure_evaluation::{LIMB_RANGE, MAX_PARTICIPANTS};
        anyhow::ensure!(
            participants.len() <= MAX_PARTICIPANTS,
            "{} devices asked, more than the {MAX_PARTICIPANTS} a secure evaluation sums exactly",
            participants.len()
        );
        let parameters = Parameters {
            range: LIMB_RANGE,
            max_participants: participants.len().max(2),
            ..section.parameters_for(participants.len())?
        };
        parameters.validate().map_err(|e| anyhow::anyhow!("secure evaluation: {e}"))?;
        let participants: Vec<(String, u32)> = participants.iter().map(|d| (d.clone(), 0)).collect();
        let weights = Weights { cap: 1, needed: Vec::new(), noise_std: Vec::new() };
        // The evaluation's session closes its own uploads: every masked sum in, or its deadline.
        Self::assemble(model_round, &participants, parameters, layout, weights, true)
    }

    fn assemble(
        round: u32,
        participants: &[(String, u32)],
        parameters: Parameters,
        layout: Layout,
        weights: Weights,
        closes_own_uploads: bool,
    ) -> anyhow::Result<Started> {
        use rand::Rng;
        let mut rng = rand::rng();
        let session: u64 = rng.random();
        let mut sorted: Vec<&(String, u32)> = participants.iter().collect();
        sorted.sort();
        let ids: BTreeMap<String, u32> =
            sorted.iter().enumerate().map(|(i, (device, _))| (device.clone(), i as u32 + 1)).collect();
        let ranks: BTreeMap<u32, u32> = sorted.iter().map(|(device, rank)| (ids[device], *rank)).collect();
        let server = ServerRound::new(parameters, session, layout, ranks, rng.random())
            .map_err(|e| anyhow::anyhow!("round {round}: secure aggregation cannot start: {e}"))?;
        let Weights { cap, needed, noise_std } = weights;
        let tasks = ids
            .iter()
            .map(|(device, &participant)| {
                let task = SecureTask {
                    session,
                    participant,
                    parameters,
                    layout,
                    max_samples: cap,
                    noise_std: noise_std.clone(),
                    participants: ids.len() as u32,
                };
                (device.clone(), task)
            })
            .collect();
        let (machine, actions) = SessionMachine::new(format!("round {round}"), server, ids, closes_own_uploads);
        let round = SecureRound {
            round,
            session,
            accepted: Vec::new(),
            protocol_bytes: 0,
            machine,
            replies: BTreeMap::new(),
            needed,
        };
        Ok((round, actions, tasks))
    }

    /// The round's record as far as this state knows it: who was in it, the threshold and the
    /// protocol's bytes (unmasking fills in the rest).
    pub fn record(&self) -> SecureRoundRecord {
        SecureRoundRecord {
            participants: self.machine.participants(),
            threshold: self.machine.threshold(),
            protocol_bytes: self.protocol_bytes,
            ..SecureRoundRecord::default()
        }
    }

    pub fn threshold(&self) -> usize {
        self.machine.threshold()
    }

    /// Each participant id's device.
    pub fn names(&self) -> BTreeMap<u32, String> {
        self.machine.names()
    }

    /// The devices in the round.
    pub fn participants(&self) -> usize {
        self.machine.participants()
    }

    /// A device's request: its `reply` (if it waits for one) is held until the machine answers it.
    /// Returns the machine's actions (the answers to held requests are already sent).
    pub fn request(
        &mut self,
        device: &str,
        event: SessionEvent<PeerCredential>,
        reply: Option<oneshot::Sender<CoordinatorMessage>>,
    ) -> Vec<SessionAction> {
        if let Some(reply) = reply {
            self.replies.insert(device.to_string(), reply);
        }
        let actions = self.machine.handle(event);
        self.deliver(actions)
    }

    /// A deadline or the end of the uploads; returns what the driver must do.
    pub fn handle(&mut self, event: SessionEvent<PeerCredential>) -> Vec<SessionAction> {
        let actions = self.machine.handle(event);
        self.deliver(actions)
    }

    /// Sends each reply and refusal whose request is held; returns every action.
    fn deliver(&mut self, actions: Vec<SessionAction>) -> Vec<SessionAction> {
        for action in &actions {
            let (device, message) = match action {
                SessionAction::Reply { device, reply } => (device, answer(self.session, self.round, reply)),
                SessionAction::Refuse { device, reason } => {
                    (device, CoordinatorMessage::Reject(Reject { round: self.round, reason: reason.clone() }))
                }
                _ => continue,
            };
            if let Some(reply) = self.replies.remove(device) {
                let _ = reply.send(message);
            }
        }
        actions
    }

    /// Distributed privacy: why the uploads in cannot be unmasked (a sum that would be revealed
    /// would carry less than its full noise), if so. Slots too thinly held to be revealed at all
    /// ([`flotilla_secagg::Parameters::min_holders`]) do not count.
    pub fn noise_shortfall(&self) -> Option<String> {
        let survivors = self.machine.uploaded_ranks();
        let revealed = self.machine.revealable_rank() as usize;
        self.needed.iter().enumerate().take(revealed + 1).find_map(|(index, &needed)| {
            let have = match index {
                0 => survivors.len(),
                slot => survivors.iter().filter(|&&rank| rank as usize >= slot).count(),
            };
            (have < needed).then(|| {
                let what = if index == 0 { "the head".to_string() } else { format!("slot {}", index - 1) };
                format!(
                    "{have} surviving device(s) cover {what}, fewer than the {needed} whose noise it needs \
                     ([privacy] max_dropout)"
                )
            })
        })
    }

    /// Unmasks the sums (CPU work: run it off the async loop). Fails, revealing nothing, with
    /// fewer than the threshold of helpers or a secret that cannot be rebuilt.
    pub fn finish(self) -> Result<Aggregate, SecAggError> {
        self.machine.finish()
    }
}

/// A reply of the machine as the message the device receives.
fn answer(session: u64, round: u32, reply: &Reply<PeerCredential>) -> CoordinatorMessage {
    match reply {
        Reply::Peers { peers, credentials } => CoordinatorMessage::SecurePeers(SecurePeers {
            session,
            peers: peers.clone(),
            credentials: credentials.clone(),
        }),
        Reply::Shares(shares) => {
            CoordinatorMessage::SecureSharesForYou(SecureShares { session, shares: shares.clone() })
        }
        Reply::Accepted => CoordinatorMessage::Ack(Ack { round }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_secagg::messages::AdvertiseKeys;

    fn section() -> SecureAggregationSection {
        toml::from_str("").unwrap()
    }

    #[test]
    fn default_threshold_is_a_majority_of_the_neighbours() {
        let s = section();
        assert_eq!(s.parameters_for(3).unwrap().threshold, 2);
        assert_eq!(s.parameters_for(5).unwrap().degree, 4);
        assert_eq!(s.parameters_for(5).unwrap().threshold, 3);
        assert_eq!(s.parameters_for(100).unwrap().degree, 16);
        assert_eq!(s.parameters_for(100).unwrap().threshold, 9);
        let fixed = SecureAggregationSection { threshold: Some(4), ..section() };
        assert!(fixed.parameters_for(4).is_err(), "4 of 3 neighbours");
        assert_eq!(fixed.parameters_for(7).unwrap().threshold, 4);
        let half = fixed.parameters_for(10).unwrap_err().to_string();
        assert!(half.contains("not above half") && half.contains("at least 5"), "{half}");
        // An odd degree is rounded up to even by the graph: 15 asks for 16 neighbours, and the
        // default threshold is a majority of those 16, not of 15.
        let odd = SecureAggregationSection { degree: 15, ..section() };
        assert_eq!(odd.parameters_for(100).unwrap().degree, 16);
        assert_eq!(odd.parameters_for(100).unwrap().threshold, 9);
    }

    #[test]
    fn equal_weighting_sends_a_cap_of_one_and_the_noise_must_fit_the_range() {
        let layout = Layout { shared: 2, per_slot: 3, max_rank: 4 };
        let participants = vec![("a".to_string(), 2), ("b".to_string(), 4), ("c".to_string(), 4)];
        let (_, _, tasks) = SecureRound::start(1, &participants, &section(), layout, None).unwrap();
        assert!(tasks.values().all(|t| t.max_samples == 1), "equal weights by default");
        let by_samples =
            SecureAggregationSection { weighting: crate::config::secure::SecureWeighting::Samples, ..section() };
        let (_, _, tasks) = SecureRound::start(1, &participants, &by_samples, layout, None).unwrap();
        assert!(tasks.values().all(|t| t.max_samples == 1000));
        let privacy: crate::config::privacy::PrivacySection = toml::from_str(
            "mode = \"distributed\"\nclip_norm = 1.0\nnoise_multiplier = 5.54\nepsilon = 1.0\ndelta = 1e-5\nmax_dropout = 0.0",
        )
        .unwrap();
        // Rounds of 3: 3 holders, each adding 5.54/√3 = 3.2; range 8 would clip 4% of the draws.
        let error = section().check_noise_range(&privacy).unwrap_err().to_string();
        assert!(error.contains("at least 6·3.199 + 1 = 20.19"), "{error}");
        let wide = SecureAggregationSection { range: 21.0, ..section() };
        assert!(wide.check_noise_range(&privacy).is_ok());
    }

    #[test]
    fn replies_wait_for_the_machine_and_refusals_reach_the_device_that_asked() {
        let layout = Layout { shared: 2, per_slot: 3, max_rank: 4 };
        let participants = vec![("a".to_string(), 2), ("b".to_string(), 4), ("c".to_string(), 4)];
        let (mut round, first, tasks) = SecureRound::start(1, &participants, &section(), layout, None).unwrap();
        assert!(first.contains(&SessionAction::StartDeadline(SecurePhase::Keys)));
        assert_eq!(tasks.len(), 3);
        let task = &tasks["a"];
        let keys = |from: u32, session: u64| SessionEvent::Keys {
            device: "a".into(),
            advert: AdvertiseKeys { session, from, encryption_key: [1; 32], mask_key: [2; 32] },
            rank: 2,
            credential: PeerCredential { id: from, certificate: Vec::new(), signature: Vec::new() },
        };
        let (reply, mut answer) = oneshot::channel();
        round.request("a", keys(task.participant, task.session ^ 1), Some(reply));
        match answer.try_recv() {
            Ok(CoordinatorMessage::Reject(reject)) => assert!(reject.reason.contains("another secure round")),
            other => panic!("{other:?}"),
        }
        let (reply, mut answer) = oneshot::channel();
        assert!(round.request("a", keys(task.participant, task.session), Some(reply)).is_empty());
        assert!(answer.try_recv().is_err(), "held until the phase closes");
        // One of three advertised: the threshold of 2 needs more, the round is discarded.
        let closed = round.handle(SessionEvent::Deadline(SecurePhase::Keys));
        assert!(closed.iter().any(|a| matches!(a, SessionAction::Discarded(_))), "{closed:?}");
        assert!(closed.contains(&SessionAction::Dropped(vec!["a".into(), "b".into(), "c".into()])));
        match answer.try_recv() {
            Ok(CoordinatorMessage::Reject(reject)) => assert!(reject.reason.contains("secure round discarded")),
            other => panic!("{other:?}"),
        }
    }
}
