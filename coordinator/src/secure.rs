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
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::report::SecureRoundRecord;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregationSection {
    /// Shares needed to rebuild a device's secret, and the fewest devices a round can finish
    /// with. Unset: a majority of each device's neighbours (⌊d/2⌋ + 1, at least 2).
    #[serde(default)]
    pub threshold: Option<usize>,
    /// Neighbours each device shares its secrets with (every other device when the round is
    /// smaller).
    #[serde(default = "default_degree")]
    pub degree: usize,
    /// Every weighted value is clipped to [−range, range] before quantization.
    #[serde(default = "default_range")]
    pub range: f32,
    /// The most devices a round may have: the quantization scale keeps their sum in the ring.
    #[serde(default = "default_max_participants")]
    pub max_participants: usize,
    /// A device weighs its update by min(samples, max_samples) / max_samples (with
    /// `weighting = "samples"`).
    #[serde(default = "default_max_samples")]
    pub max_samples: u64,
    /// `equal` (the default): every device's update weighs the same, so the weight sums reveal
    /// only how many devices took part; `samples`: by capped sample count, which the coordinator
    /// can recover for each device by differencing the sums of rounds with different members.
    #[serde(default)]
    pub weighting: SecureWeighting,
    /// How long the keys, shares and unmask phases each wait for late devices.
    #[serde(default = "default_phase_secs")]
    pub phase_secs: u32,
}

/// How a device weighs its update under secure aggregation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecureWeighting {
    #[default]
    Equal,
    Samples,
}

impl SecureWeighting {
    /// The sample cap devices are sent: 1 weighs every device (at least one sample) as 1.
    pub fn cap(self, max_samples: u64) -> u64 {
        match self {
            SecureWeighting::Equal => 1,
            SecureWeighting::Samples => max_samples,
        }
    }
}

fn default_degree() -> usize {
    16
}
fn default_range() -> f32 {
    8.0
}
fn default_max_participants() -> usize {
    1000
}
fn default_max_samples() -> u64 {
    1000
}
fn default_phase_secs() -> u32 {
    60
}

impl SecureAggregationSection {
    /// The settings, and that the rest of the configuration can run under secure aggregation.
    pub fn validate(&self, rest: &RestOfConfig) -> anyhow::Result<()> {
        let method = rest.method;
        if let Some(why) = flotilla_torch::aggregate::secure::why_not_secure(method) {
            anyhow::bail!(
                "[aggregation] method = \"{method}\"{} cannot run under [secure_aggregation]: {why}; set method to \
                 fold-and-fill, rbla, zero-pad or fedavg",
                method.default_note()
            );
        }
        anyhow::ensure!(
            !rest.central_privacy,
            "[privacy] mode = \"central\" cannot run under [secure_aggregation]: the coordinator would need each \
             clipped update in the clear; use mode = \"distributed\" (docs/privacy.md)"
        );
        anyhow::ensure!(
            !rest.record_updates,
            "[aggregation] record_updates cannot run under [secure_aggregation]: the coordinator never holds one \
             device's update"
        );
        anyhow::ensure!(
            !rest.shrink_to_round_rank,
            "[aggregation] ablation_shrink_to_round_rank cannot run under [secure_aggregation]"
        );
        anyhow::ensure!(self.phase_secs >= 1, "secure_aggregation.phase_secs must be at least 1");
        anyhow::ensure!(self.max_samples >= 1, "secure_aggregation.max_samples must be at least 1");
        let parameters = self.parameters_for(self.max_participants.max(3))?;
        parameters.validate().map_err(|e| anyhow::anyhow!("[secure_aggregation]: {e}"))?;
        self.parameters_for(rest.min_devices).map_err(|e| {
            anyhow::anyhow!("{e}; [round] min_devices = {} lets a round start that small", rest.min_devices)
        })?;
        Ok(())
    }

    /// Distributed privacy: `range` must hold a device's clipped change (at most C) plus six
    /// standard deviations of the largest noise share any device adds (σC/√m for the fewest
    /// contributors m a revealed sum can need), or the noise would be clipped and the sums would no
    /// longer be the Gaussian mechanism the accountant assumes.
    pub fn check_noise_range(&self, privacy: &crate::privacy::PrivacySection) -> anyhow::Result<()> {
        let smallest = self.round_size().min;
        let holders = self.parameters_for(smallest)?.min_holders();
        let contributors = privacy.contributors_needed(holders);
        let share = privacy.noise_multiplier * privacy.clip_norm / (contributors as f64).sqrt();
        let needed = 6.0 * share + privacy.clip_norm;
        anyhow::ensure!(
            f64::from(self.range) >= needed,
            "[secure_aggregation] range = {} would clip the distributed noise: a revealed sum may have as few as \
             {contributors} contributors (a round of {smallest}, {holders} holders, max_dropout {}), each adding noise \
             of standard deviation σC/√{contributors} = {share:.3} to a change of norm at most C = {}; set range to at \
             least 6·{share:.3} + {} = {needed:.2}",
            self.range,
            privacy.max_dropout,
            privacy.clip_norm,
            privacy.clip_norm
        );
        Ok(())
    }

    /// The sizes a secure round can have: from the smallest whose degree reaches the threshold to
    /// `max_participants`. The engine never sends a task for a round outside them.
    pub fn round_size(&self) -> flotilla_engine::RoundSize {
        let max = self.max_participants.max(1);
        let min = (1..=max).find(|&n| self.parameters_for(n).is_ok()).unwrap_or(max + 1);
        flotilla_engine::RoundSize { min, max }
    }

    /// The round's parameters for `participants` devices. Their degree is the number of
    /// neighbours each device really has: `degree` rounded up to even (the graph is circulant), or
    /// every other device in a smaller round. The threshold must be above half of it, so that a
    /// coordinator that lied could not rebuild both of a device's secrets from two halves.
    pub fn parameters_for(&self, participants: usize) -> anyhow::Result<Parameters> {
        let neighbours = (self.degree.div_ceil(2) * 2).min(participants.saturating_sub(1));
        let threshold = self.threshold.unwrap_or((neighbours / 2 + 1).max(2));
        anyhow::ensure!(
            threshold <= neighbours,
            "in a round of {participants} device(s) each has {neighbours} neighbour(s), fewer than the secure \
             aggregation threshold {threshold}: it needs rounds of at least {} devices",
            threshold + 1
        );
        anyhow::ensure!(
            2 * threshold > neighbours,
            "in a round of {participants} devices each has {neighbours} neighbours, and a threshold of {threshold} is \
             not above half of them (a coordinator that lied could rebuild both of a device's secrets); set \
             [secure_aggregation] threshold to at least {}",
            neighbours / 2 + 1
        );
        Ok(Parameters { threshold, degree: neighbours, range: self.range, max_participants: self.max_participants })
    }
}

/// What of the rest of the configuration secure aggregation depends on.
pub struct RestOfConfig {
    pub method: flotilla_merge::method::Method,
    pub central_privacy: bool,
    pub record_updates: bool,
    pub shrink_to_round_rank: bool,
    pub min_devices: usize,
}

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
        privacy: Option<&crate::privacy::PrivacySection>,
    ) -> anyhow::Result<(SecureRound, BTreeMap<String, SecureTask>)> {
        use rand::Rng;
        let mut rng = rand::rng();
        let session: u64 = rng.random();
        let parameters = section.parameters_for(participants.len())?;
        let mut sorted: Vec<&(String, u32)> = participants.iter().collect();
        sorted.sort();
        let ids: BTreeMap<String, u32> =
            sorted.iter().enumerate().map(|(i, (device, _))| (device.clone(), i as u32 + 1)).collect();
        let ranks: BTreeMap<u32, u32> = sorted.iter().map(|(device, rank)| (ids[device], *rank)).collect();
        // Distributed privacy: the contributors each sum needs ([head, slot 0, …]) and each device's
        // share of the noise σ·C on it.
        let covering: Vec<usize> = std::iter::once(ranks.len())
            .chain((0..layout.max_rank).map(|slot| ranks.values().filter(|&&r| r > slot).count()))
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
        let server = ServerRound::new(parameters, session, layout, ranks.clone(), rng.random())
            .map_err(|e| anyhow::anyhow!("round {round}: secure aggregation cannot start: {e}"))?;
        let tasks = ids
            .iter()
            .map(|(device, &participant)| {
                let task = SecureTask {
                    session,
                    participant,
                    parameters,
                    layout,
                    max_samples: section.weighting.cap(section.max_samples),
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
        let checked = self.participant(device, advert.round, SecurePhase::Keys).and_then(|id| {
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
        let id = self.participant(device, input.round, SecurePhase::Upload)?;
        if input.from != id {
            return Err(format!("a masked input for participant {}, this device is {id}", input.from));
        }
        self.server.receive_masked(input).map_err(|e| e.to_string())?;
        self.uploaded.insert(id);
        Ok(())
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
        let id = self.participant(device, shares.round, SecurePhase::Unmask)?;
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
        let by_samples = SecureAggregationSection { weighting: SecureWeighting::Samples, ..section() };
        let (_, tasks) = SecureRound::start(1, &participants, &by_samples, layout, None).unwrap();
        assert!(tasks.values().all(|t| t.max_samples == 1000));
        let privacy: crate::privacy::PrivacySection = toml::from_str(
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
            advert: AdvertiseKeys { round: session, from, encryption_key: [1; 32], mask_key: [2; 32] },
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
