//! `[secure_aggregation]`: SecAgg+ rounds (docs/security.md). The coordinator relays the devices'
//! keys and encrypted shares, collects their masked uploads, and removes the masks from the sum
//! with the shares the survivors reveal: it learns the per-slot sums the slot-wise methods divide,
//! who took part and their ranks, and nothing about any one device.
//!
//! A round's phases, each closed when every participant still in it has answered or when
//! `phase_secs` pass (whichever comes first):
//!
//! 1. **keys**: each device that got a task sends fresh public keys (`SecureKeys`); at the close,
//!    each is answered with its neighbours' keys (`SecurePeers`).
//! 2. **shares**: each sends its secrets' shares, encrypted for each neighbour (`SecureShares`);
//!    at the close, each is answered with the shares addressed to it.
//! 3. **upload**: the masked uploads (`MaskedUpdate`) go through the round engine like plain ones
//!    (deadline, grace, quorum).
//! 4. **unmask**: when the engine aggregates, each survivor is asked for the shares that remove
//!    the masks (`SecureUnmask` → `UnmaskShares`); at the close the sums are unmasked.
//!
//! A device that misses a phase is out of the round: the engine is told it failed, so the round
//! does not wait for it. Fewer than `threshold` devices left at any close discards the round:
//! nothing is revealed and the global adapter is unchanged. Nothing of a round is persisted: a
//! coordinator that restarts mid-round resumes from its last checkpoint with fresh keys.

use std::collections::{BTreeMap, BTreeSet};

use flotilla_secagg::layout::Layout;
use flotilla_secagg::messages::{MaskedInput, UnmaskRequest, UnmaskShares};
use flotilla_secagg::server::{Aggregate, ServerRound};
use flotilla_secagg::{Parameters, SecAggError};
use flotilla_wire::protocol::{CoordinatorMessage, Reject, SecurePeers, SecureShares, SecureTask};
use flotilla_wire::signed_keys::{PeerCredential, SignedKeys};
use tokio::sync::oneshot;

use crate::config::secure::SecureAggregationSection;
use crate::records::report::SecureRoundRecord;

/// Where a secure round is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurePhase {
    Keys,
    Shares,
    Upload,
    Unmask,
}

impl SecurePhase {
    pub fn name(self) -> &'static str {
        match self {
            SecurePhase::Keys => "keys",
            SecurePhase::Shares => "shares",
            SecurePhase::Upload => "upload",
            SecurePhase::Unmask => "unmask",
        }
    }
}

/// How a round's devices weigh their vectors: the sample cap, and under distributed privacy the
/// contributors each sum needs and each device's noise share.
struct Weights {
    cap: u64,
    needed: Vec<usize>,
    noise_std: Vec<f64>,
}

/// One reply held until its phase closes.
type Held = (u32, oneshot::Sender<CoordinatorMessage>);

/// What closing a phase did: devices now out of the round (the engine counts them as failed),
/// and, when too few are left, why the round is discarded.
#[derive(Debug, Default)]
pub struct Closed {
    pub dropped: Vec<String>,
    pub discarded: Option<String>,
}

/// A round of secure aggregation, as the coordinator sees it.
pub struct SecureRound {
    pub round: u32,
    pub session: u64,
    /// The records of the masked uploads accepted (rank and size only).
    pub accepted: Vec<crate::records::report::UpdateRecord>,
    /// Bytes of the devices' protocol messages so far.
    pub protocol_bytes: u64,
    phase: SecurePhase,
    server: ServerRound,
    parameters: Parameters,
    ids: BTreeMap<String, u32>,
    names: BTreeMap<u32, String>,
    advertised: BTreeSet<u32>,
    shared: BTreeSet<u32>,
    uploaded: BTreeSet<u32>,
    unmasked: BTreeSet<u32>,
    held: Vec<Held>,
    discarded: Option<String>,
    ranks: BTreeMap<u32, u32>,
    /// Distributed privacy: the survivors each sum needs for its full noise, `[head, slot 0, …]`.
    needed: Vec<usize>,
    /// Each advertiser's certificate and signature, relayed to its neighbours with its keys.
    credentials: BTreeMap<u32, PeerCredential>,
}

impl SecureRound {
    /// A round among `participants` (device, rank); returns it and each device's task part.
    pub fn start(
        round: u32,
        participants: &[(String, u32)],
        section: &SecureAggregationSection,
        layout: Layout,
        privacy: Option<&crate::config::privacy::PrivacySection>,
    ) -> anyhow::Result<(SecureRound, BTreeMap<String, SecureTask>)> {
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
        Self::assemble(round, participants, parameters, layout, Weights { cap, needed, noise_std })
    }

    /// Federated evaluation's secure sum of model `model_round` among `participants` (device, rank):
    /// the section's threshold and degree, the evaluation vectors' range, and one layout for every
    /// rank (`flotilla_wire::secure_evaluation`).
    pub fn start_evaluation(
        model_round: u32,
        participants: &[String],
        section: &SecureAggregationSection,
        layout: Layout,
    ) -> anyhow::Result<(SecureRound, BTreeMap<String, SecureTask>)> {
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
        Self::assemble(model_round, &participants, parameters, layout, weights)
    }

    fn assemble(
        round: u32,
        participants: &[(String, u32)],
        parameters: Parameters,
        layout: Layout,
        weights: Weights,
    ) -> anyhow::Result<(SecureRound, BTreeMap<String, SecureTask>)> {
        use rand::Rng;
        let mut rng = rand::rng();
        let session: u64 = rng.random();
        let mut sorted: Vec<&(String, u32)> = participants.iter().collect();
        sorted.sort();
        let ids: BTreeMap<String, u32> =
            sorted.iter().enumerate().map(|(i, (device, _))| (device.clone(), i as u32 + 1)).collect();
        let ranks: BTreeMap<u32, u32> = sorted.iter().map(|(device, rank)| (ids[device], *rank)).collect();
        let server = ServerRound::new(parameters, session, layout, ranks.clone(), rng.random())
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
        let names = ids.iter().map(|(d, &i)| (i, d.clone())).collect();
        let round = SecureRound {
            round,
            session,
            accepted: Vec::new(),
            protocol_bytes: 0,
            phase: SecurePhase::Keys,
            server,
            parameters,
            ids,
            names,
            advertised: BTreeSet::new(),
            shared: BTreeSet::new(),
            uploaded: BTreeSet::new(),
            unmasked: BTreeSet::new(),
            held: Vec::new(),
            discarded: None,
            ranks,
            needed,
            credentials: BTreeMap::new(),
        };
        Ok((round, tasks))
    }

    pub fn phase(&self) -> SecurePhase {
        self.phase
    }

    /// The round's record as far as this state knows it: who was in it, the threshold and the
    /// protocol's bytes (unmasking fills in the rest).
    pub fn record(&self) -> SecureRoundRecord {
        SecureRoundRecord {
            participants: self.ids.len(),
            threshold: self.parameters.threshold,
            protocol_bytes: self.protocol_bytes,
            ..SecureRoundRecord::default()
        }
    }

    pub fn threshold(&self) -> usize {
        self.parameters.threshold
    }

    pub fn discarded(&self) -> Option<&str> {
        self.discarded.as_deref()
    }

    /// The participant id of `device`, if it is in this round and its message is for `session`.
    fn participant(&self, device: &str, session: u64, phase: SecurePhase) -> Result<u32, String> {
        if session != self.session {
            return Err(format!("a message of another secure round (session {session:016x})"));
        }
        if let Some(reason) = &self.discarded {
            return Err(format!("round {} was discarded: {reason}", self.round));
        }
        if self.phase != phase {
            return Err(format!(
                "a {} message during the {} phase of round {}",
                phase.name(),
                self.phase.name(),
                self.round
            ));
        }
        self.ids.get(device).copied().ok_or_else(|| format!("'{device}' is not in round {}", self.round))
    }

    /// Phase 1: a device's signed keys and the certificate of its session; its answer waits for
    /// the close. Returns whether every participant has now advertised (close the phase). The
    /// signature is its peers' to check; the coordinator checks that it signed the rank it holds.
    pub fn keys(
        &mut self,
        device: &str,
        signed: SignedKeys,
        certificate: Vec<u8>,
        reply: oneshot::Sender<CoordinatorMessage>,
    ) -> Result<bool, (String, oneshot::Sender<CoordinatorMessage>)> {
        let SignedKeys { advert, rank, signature } = signed;
        let checked = self.participant(device, advert.session, SecurePhase::Keys).and_then(|id| {
            if advert.from != id {
                return Err(format!("keys for participant {}, this device is {id}", advert.from));
            }
            if self.ranks.get(&id) != Some(&rank) {
                return Err(format!("keys signed at rank {rank}, this device holds rank {:?}", self.ranks.get(&id)));
            }
            self.server.receive_keys(advert).map_err(|e| e.to_string()).map(|()| id)
        });
        if let Ok(id) = checked {
            self.credentials.insert(id, PeerCredential { id, certificate, signature });
        }
        self.hold(checked, reply, |r| &mut r.advertised)?;
        Ok(self.advertised.len() == self.ids.len())
    }

    /// Closes phase 1: each advertiser gets its neighbours' keys, certificates and signatures.
    pub fn close_keys(&mut self) -> Closed {
        let credentials = std::mem::take(&mut self.credentials);
        self.close(
            |r| &r.advertised,
            "sent keys",
            SecurePhase::Shares,
            |server, session, id| {
                let peers = server.peers_for(id);
                let credentials = peers.iter().filter_map(|p| credentials.get(&p.id).cloned()).collect();
                CoordinatorMessage::SecurePeers(SecurePeers { session, peers, credentials })
            },
        )
    }

    /// Phase 2: a device's encrypted shares; its answer waits for the close. Returns whether every
    /// advertiser has now shared.
    pub fn shares(
        &mut self,
        device: &str,
        shares: SecureShares,
        reply: oneshot::Sender<CoordinatorMessage>,
    ) -> Result<bool, (String, oneshot::Sender<CoordinatorMessage>)> {
        let checked = self
            .participant(device, shares.session, SecurePhase::Shares)
            .and_then(|id| self.server.receive_shares(id, shares.shares).map_err(|e| e.to_string()).map(|()| id));
        self.hold(checked, reply, |r| &mut r.shared)?;
        Ok(self.shared.len() == self.advertised.len())
    }

    /// Closes phase 2: each device that shared gets the shares addressed to it.
    pub fn close_shares(&mut self) -> Closed {
        self.close(
            |r| &r.shared,
            "shared their keys",
            SecurePhase::Upload,
            |server, session, id| {
                CoordinatorMessage::SecureSharesForYou(SecureShares { session, shares: server.shares_for(id).to_vec() })
            },
        )
    }

    /// A request `checked` let in: the device is marked in `answered` and its reply held for the
    /// close; a refused one gives its reply back with the reason.
    fn hold(
        &mut self,
        checked: Result<u32, String>,
        reply: oneshot::Sender<CoordinatorMessage>,
        answered: fn(&mut SecureRound) -> &mut BTreeSet<u32>,
    ) -> Result<(), (String, oneshot::Sender<CoordinatorMessage>)> {
        let id = match checked {
            Ok(id) => id,
            Err(reason) => return Err((reason, reply)),
        };
        answered(self).insert(id);
        self.held.push((id, reply));
        Ok(())
    }

    /// Closes the keys or shares phase: with the devices in `answered` (which `did` describes)
    /// too few for the threshold, the round is discarded; otherwise each held request gets
    /// `answer` and the round moves to `next`.
    fn close(
        &mut self,
        answered: fn(&SecureRound) -> &BTreeSet<u32>,
        did: &str,
        next: SecurePhase,
        answer: impl Fn(&ServerRound, u64, u32) -> CoordinatorMessage,
    ) -> Closed {
        let missing = self.missing(answered(self));
        let count = answered(self).len();
        // Each device's secrets need `threshold` other holders.
        if count <= self.parameters.threshold {
            let threshold = self.parameters.threshold;
            return self.discard(format!("{count} device(s) {did}; the threshold {threshold} needs more"));
        }
        for (id, reply) in std::mem::take(&mut self.held) {
            let _ = reply.send(answer(&self.server, self.session, id));
        }
        self.phase = next;
        Closed { dropped: missing, discarded: None }
    }

    /// Phase 3: a masked upload the engine let in.
    pub fn masked(&mut self, device: &str, input: MaskedInput) -> Result<(), String> {
        let id = self.participant(device, input.session, SecurePhase::Upload)?;
        if input.from != id {
            return Err(format!("a masked input for participant {}, this device is {id}", input.from));
        }
        self.server.receive_masked(input).map_err(|e| e.to_string())?;
        self.uploaded.insert(id);
        Ok(())
    }

    /// Every device that shared its keys has uploaded.
    pub fn all_uploaded(&self) -> bool {
        self.phase == SecurePhase::Upload && self.uploaded.len() == self.shared.len()
    }

    /// Each participant id's device.
    pub fn names(&self) -> BTreeMap<u32, String> {
        self.names.clone()
    }

    /// The devices in the round.
    pub fn participants(&self) -> usize {
        self.ids.len()
    }

    /// Distributed privacy: why the uploads in cannot be unmasked (a sum that would be revealed
    /// would carry less than its full noise), if so. Slots too thinly held to be revealed at all
    /// ([`flotilla_secagg::Parameters::min_holders`]) do not count.
    pub fn noise_shortfall(&self) -> Option<String> {
        let survivors: Vec<u32> = self.uploaded.iter().map(|id| self.ranks[id]).collect();
        let revealed = self.server.revealable_rank() as usize;
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

    /// Phase 4 begins: the request every survivor is sent, with the survivors' devices.
    pub fn begin_unmask(&mut self) -> (UnmaskRequest, Vec<String>) {
        self.phase = SecurePhase::Unmask;
        let request = self.server.unmask_request();
        let devices = request.survivors.iter().filter_map(|id| self.names.get(id).cloned()).collect();
        (request, devices)
    }

    /// Phase 4: a survivor's revealed shares. Returns whether every survivor has answered.
    pub fn unmask(&mut self, device: &str, shares: UnmaskShares) -> Result<bool, String> {
        let id = self.participant(device, shares.session, SecurePhase::Unmask)?;
        if shares.from != id {
            return Err(format!("unmasking shares from participant {}, this device is {id}", shares.from));
        }
        self.server.receive_unmask(shares).map_err(|e| e.to_string())?;
        self.unmasked.insert(id);
        Ok(self.unmasked.len() == self.uploaded.len())
    }

    /// Unmasks the sums (CPU work: run it off the async loop). Fails, revealing nothing, with
    /// fewer than the threshold of helpers or a secret that cannot be rebuilt.
    pub fn finish(self) -> Result<Aggregate, SecAggError> {
        self.server.finish()
    }

    /// Participants not in `answered`, by device name.
    fn missing(&self, answered: &BTreeSet<u32>) -> Vec<String> {
        self.names.iter().filter(|(id, _)| !answered.contains(id)).map(|(_, d)| d.clone()).collect()
    }

    /// Ends the round here: every held request is refused and every device counts as failed.
    fn discard(&mut self, reason: String) -> Closed {
        for (_, reply) in std::mem::take(&mut self.held) {
            let _ = reply.send(CoordinatorMessage::Reject(Reject {
                round: self.round,
                reason: format!("secure round discarded: {reason}"),
            }));
        }
        self.discarded = Some(reason.clone());
        Closed { dropped: self.ids.keys().cloned().collect(), discarded: Some(reason) }
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
        let (_, tasks) = SecureRound::start(1, &participants, &section(), layout, None).unwrap();
        assert!(tasks.values().all(|t| t.max_samples == 1), "equal weights by default");
        let by_samples =
            SecureAggregationSection { weighting: crate::config::secure::SecureWeighting::Samples, ..section() };
        let (_, tasks) = SecureRound::start(1, &participants, &by_samples, layout, None).unwrap();
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
    fn a_phase_refuses_other_sessions_strangers_and_out_of_order_messages() {
        let layout = Layout { shared: 2, per_slot: 3, max_rank: 4 };
        let participants = vec![("a".to_string(), 2), ("b".to_string(), 4), ("c".to_string(), 4)];
        let (mut round, tasks) = SecureRound::start(1, &participants, &section(), layout, None).unwrap();
        assert_eq!(tasks.len(), 3);
        let task = &tasks["a"];
        let advert = |from: u32, session: u64| SignedKeys {
            advert: AdvertiseKeys { session, from, encryption_key: [1; 32], mask_key: [2; 32] },
            rank: 2,
            signature: Vec::new(),
        };
        let (reply, _answer) = oneshot::channel();
        let (reason, reply) =
            round.keys("a", advert(task.participant, task.session ^ 1), Vec::new(), reply).unwrap_err();
        assert!(reason.contains("another secure round"), "{reason}");
        let (reason, reply) = round.keys("mallory", advert(9, task.session), Vec::new(), reply).unwrap_err();
        assert!(reason.contains("not in round"), "{reason}");
        let (reason, reply) =
            round.keys("a", advert(tasks["b"].participant, task.session), Vec::new(), reply).unwrap_err();
        assert!(reason.contains("this device is"), "{reason}");
        assert_eq!(round.keys("a", advert(task.participant, task.session), Vec::new(), reply).ok(), Some(false));
        let shares = SecureShares { session: task.session, shares: Vec::new() };
        let (reply, _answer) = oneshot::channel();
        let (reason, _) = round.shares("a", shares, reply).unwrap_err();
        assert!(reason.contains("during the keys phase"), "{reason}");
        // One of three advertised: the threshold of 2 needs more, the round is discarded.
        let closed = round.close_keys();
        assert!(closed.discarded.is_some());
        assert_eq!(closed.dropped.len(), 3);
    }
}
