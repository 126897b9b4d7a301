//! The coordinator's side of a session's phases as a sans-IO state machine, beside [`ServerRound`]
//! (which keeps the cryptographic state): events in (a device's keys, shares, masked input or
//! unmasking shares, the end of the uploads, a phase's deadline), actions out (answer or refuse a
//! device, start a deadline, drop devices, discard, ask the survivors to unmask, unmask). It holds
//! no channel and no clock: whoever drives it keeps each device's pending reply and sleeps for the
//! deadlines, so its tests run in virtual time, like the round engine's.
//!
//! The phases, each closed when every participant still in it has answered or at its deadline:
//!
//! 1. **keys**: each device sends fresh keys; its reply waits for the close, then carries its
//!    neighbours' keys and credentials ([`Reply::Peers`]).
//! 2. **shares**: each sends its secrets' shares, encrypted for each neighbour; at the close each
//!    gets the shares addressed to it ([`Reply::Shares`]).
//! 3. **upload**: the masked inputs, each answered at once. Either the driver ends the uploads
//!    ([`SessionEvent::UploadsClosed`], when the round engine aggregates) or, for a session that
//!    closes its own uploads, every upload in or the upload deadline does.
//! 4. **unmask**: every survivor is asked for its shares; when all have answered, or at the
//!    deadline, the sums may be unmasked ([`SessionAction::ReadyToUnmask`], then [`SessionMachine::finish`]).
//!
//! A device that misses the keys or shares phase is out of the session ([`SessionAction::Dropped`]).
//! With threshold or fewer devices left at a close, the session is discarded: every held reply is
//! refused, every device is dropped, and nothing is revealed.

use std::collections::{BTreeMap, BTreeSet};

use crate::messages::{AdvertiseKeys, EncryptedShare, MaskedInput, Peer, UnmaskRequest, UnmaskShares};
use crate::server::{Aggregate, ServerRound};
use crate::SecAggError;

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Keys,
    Shares,
    Upload,
    Unmask,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Keys => "keys",
            Phase::Shares => "shares",
            Phase::Upload => "upload",
            Phase::Unmask => "unmask",
        }
    }
}

/// What happens to a session. `C` is what a device's keys travel with to its neighbours (its
/// certificate and signature, for the coordinator); the machine only relays it.
#[derive(Debug)]
pub enum SessionEvent<C> {
    Keys {
        device: String,
        advert: AdvertiseKeys,
        rank: u32,
        credential: C,
    },
    Shares {
        device: String,
        session: u64,
        shares: Vec<EncryptedShare>,
    },
    Masked {
        device: String,
        input: MaskedInput,
    },
    /// The uploads are over (the round engine aggregates): the survivors are asked to unmask.
    UploadsClosed,
    Unmask {
        device: String,
        shares: UnmaskShares,
    },
    /// The deadline started for `Phase` passed.
    Deadline(Phase),
}

/// The answer to a device's request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply<C> {
    /// Its neighbours' keys, and their credentials in the same order.
    Peers { peers: Vec<Peer>, credentials: Vec<C> },
    /// The shares its neighbours encrypted for it.
    Shares(Vec<EncryptedShare>),
    /// Its masked input or its unmasking shares are in.
    Accepted,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionAction<C> {
    /// Answer the device's pending request.
    Reply { device: String, reply: Reply<C> },
    /// Refuse the device's pending request.
    Refuse { device: String, reason: String },
    /// Start the phase's deadline; when it passes, send [`SessionEvent::Deadline`].
    StartDeadline(Phase),
    /// The session entered the phase.
    Entered(Phase),
    /// Devices out of the session: they missed a phase, or the session was discarded.
    Dropped(Vec<String>),
    /// Nothing will be revealed, and why.
    Discarded(String),
    /// Send each survivor the request for its unmasking shares.
    AskToUnmask { request: UnmaskRequest, survivors: Vec<String> },
    /// Every survivor answered, or the deadline passed: call [`SessionMachine::finish`].
    ReadyToUnmask,
}

/// One session's phases, as the coordinator runs them.
pub struct SessionMachine<C> {
    /// How messages name the session ("round 3").
    label: String,
    session: u64,
    threshold: usize,
    phase: Phase,
    server: ServerRound,
    ids: BTreeMap<String, u32>,
    ranks: BTreeMap<u32, u32>,
    /// Whether every upload in, or the upload deadline, ends the uploads (instead of the driver).
    closes_own_uploads: bool,
    advertised: BTreeSet<u32>,
    shared: BTreeSet<u32>,
    uploaded: BTreeSet<u32>,
    unmasked: BTreeSet<u32>,
    /// Devices whose reply waits for the phase's close.
    held: Vec<u32>,
    credentials: BTreeMap<u32, C>,
    discarded: Option<String>,
    ready: bool,
}

impl<C: Clone> SessionMachine<C> {
    /// A session among `ids` (device → participant id) at `ranks` (participant id → rank), over
    /// `server`'s cryptographic state. Returns the machine and its first actions.
    pub fn new(
        label: String,
        server: ServerRound,
        ids: BTreeMap<String, u32>,
        closes_own_uploads: bool,
    ) -> (SessionMachine<C>, Vec<SessionAction<C>>) {
        let machine = SessionMachine {
            label,
            session: server.session(),
            threshold: server.parameters().threshold,
            phase: Phase::Keys,
            ranks: server.ranks().clone(),
            server,
            ids,
            closes_own_uploads,
            advertised: BTreeSet::new(),
            shared: BTreeSet::new(),
            uploaded: BTreeSet::new(),
            unmasked: BTreeSet::new(),
            held: Vec::new(),
            credentials: BTreeMap::new(),
            discarded: None,
            ready: false,
        };
        (machine, vec![SessionAction::Entered(Phase::Keys), SessionAction::StartDeadline(Phase::Keys)])
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn threshold(&self) -> usize {
        self.threshold
    }

    pub fn participants(&self) -> usize {
        self.ids.len()
    }

    pub fn discarded(&self) -> Option<&str> {
        self.discarded.as_deref()
    }

    /// Each participant id's device.
    pub fn names(&self) -> BTreeMap<u32, String> {
        self.ids.iter().map(|(device, &id)| (id, device.clone())).collect()
    }

    /// The ranks of the devices whose masked inputs are in.
    pub fn uploaded_ranks(&self) -> Vec<u32> {
        self.uploaded.iter().map(|id| self.ranks[id]).collect()
    }

    /// The highest rank whose slots enough uploaded devices hold to be revealed.
    pub fn revealable_rank(&self) -> u32 {
        self.server.revealable_rank()
    }

    /// Whether every device that shared its keys has uploaded.
    pub fn all_uploaded(&self) -> bool {
        self.phase == Phase::Upload && self.uploaded.len() == self.shared.len()
    }

    /// What to do about `event`.
    pub fn handle(&mut self, event: SessionEvent<C>) -> Vec<SessionAction<C>> {
        if self.ready {
            return match event {
                SessionEvent::Keys { device, .. }
                | SessionEvent::Shares { device, .. }
                | SessionEvent::Masked { device, .. }
                | SessionEvent::Unmask { device, .. } => {
                    vec![SessionAction::Refuse { device, reason: format!("{}'s sums are being unmasked", self.label) }]
                }
                SessionEvent::UploadsClosed | SessionEvent::Deadline(_) => Vec::new(),
            };
        }
        match event {
            SessionEvent::Keys { device, advert, rank, credential } => self.keys(device, advert, rank, credential),
            SessionEvent::Shares { device, session, shares } => self.shares(device, session, shares),
            SessionEvent::Masked { device, input } => self.masked(device, input),
            SessionEvent::UploadsClosed => self.close_uploads(),
            SessionEvent::Unmask { device, shares } => self.unmask(device, shares),
            SessionEvent::Deadline(phase) => self.deadline(phase),
        }
    }

    /// Unmasks the sums (CPU work: run it off the async loop). Fails, revealing nothing, with
    /// fewer than the threshold of helpers or a secret that cannot be rebuilt.
    pub fn finish(self) -> Result<Aggregate, SecAggError> {
        self.server.finish()
    }

    /// The participant id of `device`, if its message is for this session and phase.
    fn participant(&self, device: &str, session: u64, phase: Phase) -> Result<u32, String> {
        if session != self.session {
            return Err(format!("a message of another secure round (session {session:016x})"));
        }
        if let Some(reason) = &self.discarded {
            return Err(format!("{} was discarded: {reason}", self.label));
        }
        if self.phase != phase {
            return Err(format!("a {} message during the {} phase of {}", phase.name(), self.phase.name(), self.label));
        }
        self.ids.get(device).copied().ok_or_else(|| format!("'{device}' is not in {}", self.label))
    }

    fn keys(&mut self, device: String, advert: AdvertiseKeys, rank: u32, credential: C) -> Vec<SessionAction<C>> {
        let checked = self.participant(&device, advert.session, Phase::Keys).and_then(|id| {
            if advert.from != id {
                return Err(format!("keys for participant {}, this device is {id}", advert.from));
            }
            if self.ranks.get(&id) != Some(&rank) {
                return Err(format!("keys signed at rank {rank}, this device holds rank {:?}", self.ranks.get(&id)));
            }
            self.server.receive_keys(advert).map_err(|e| e.to_string()).map(|()| id)
        });
        match checked {
            Err(reason) => vec![SessionAction::Refuse { device, reason }],
            Ok(id) => {
                self.credentials.insert(id, credential);
                self.advertised.insert(id);
                self.held.push(id);
                if self.advertised.len() == self.ids.len() {
                    self.close_keys()
                } else {
                    Vec::new()
                }
            }
        }
    }

    fn shares(&mut self, device: String, session: u64, shares: Vec<EncryptedShare>) -> Vec<SessionAction<C>> {
        let checked = self
            .participant(&device, session, Phase::Shares)
            .and_then(|id| self.server.receive_shares(id, shares).map_err(|e| e.to_string()).map(|()| id));
        match checked {
            Err(reason) => vec![SessionAction::Refuse { device, reason }],
            Ok(id) => {
                self.shared.insert(id);
                self.held.push(id);
                if self.shared.len() == self.advertised.len() {
                    self.close_shares()
                } else {
                    Vec::new()
                }
            }
        }
    }

    /// Closes phase 1: each advertiser gets its neighbours' keys and credentials.
    fn close_keys(&mut self) -> Vec<SessionAction<C>> {
        let answered = self.advertised.clone();
        let credentials = std::mem::take(&mut self.credentials);
        self.close(&answered, "sent keys", Phase::Shares, |server, id| {
            let peers = server.peers_for(id);
            let credentials = peers.iter().filter_map(|p| credentials.get(&p.id).cloned()).collect();
            Reply::Peers { peers, credentials }
        })
    }

    /// Closes phase 2: each device that shared gets the shares addressed to it.
    fn close_shares(&mut self) -> Vec<SessionAction<C>> {
        let answered = self.shared.clone();
        self.close(&answered, "shared their keys", Phase::Upload, |server, id| {
            Reply::Shares(server.shares_for(id).to_vec())
        })
    }

    /// Closes the keys or shares phase: with the devices in `answered` (which `did` describes)
    /// too few for the threshold, the session is discarded; otherwise each held request gets
    /// `answer` and the session moves to `next`.
    fn close(
        &mut self,
        answered: &BTreeSet<u32>,
        did: &str,
        next: Phase,
        answer: impl Fn(&ServerRound, u32) -> Reply<C>,
    ) -> Vec<SessionAction<C>> {
        // Each device's secrets need `threshold` other holders.
        if answered.len() <= self.threshold {
            let reason = format!("{} device(s) {did}; the threshold {} needs more", answered.len(), self.threshold);
            return self.discard(reason);
        }
        let names = self.names();
        let mut actions: Vec<SessionAction<C>> = std::mem::take(&mut self.held)
            .into_iter()
            .map(|id| SessionAction::Reply { device: names[&id].clone(), reply: answer(&self.server, id) })
            .collect();
        let missing: Vec<String> =
            names.iter().filter(|(id, _)| !answered.contains(id)).map(|(_, d)| d.clone()).collect();
        self.phase = next;
        if !missing.is_empty() {
            actions.push(SessionAction::Dropped(missing));
        }
        actions.push(SessionAction::Entered(next));
        if next == Phase::Shares || self.closes_own_uploads {
            actions.push(SessionAction::StartDeadline(next));
        }
        actions
    }

    fn masked(&mut self, device: String, input: MaskedInput) -> Vec<SessionAction<C>> {
        let checked = self.participant(&device, input.session, Phase::Upload).and_then(|id| {
            if input.from != id {
                return Err(format!("a masked input for participant {}, this device is {id}", input.from));
            }
            self.server.receive_masked(input).map_err(|e| e.to_string()).map(|()| id)
        });
        match checked {
            Err(reason) => vec![SessionAction::Refuse { device, reason }],
            Ok(id) => {
                self.uploaded.insert(id);
                let mut actions = vec![SessionAction::Reply { device, reply: Reply::Accepted }];
                if self.closes_own_uploads && self.all_uploaded() {
                    actions.extend(self.close_uploads());
                }
                actions
            }
        }
    }

    /// Phase 4 begins: every survivor is asked for its unmasking shares.
    fn close_uploads(&mut self) -> Vec<SessionAction<C>> {
        if self.phase != Phase::Upload || self.discarded.is_some() {
            return Vec::new();
        }
        self.phase = Phase::Unmask;
        let request = self.server.unmask_request();
        let names = self.names();
        let survivors: Vec<String> = request.survivors.iter().filter_map(|id| names.get(id).cloned()).collect();
        if survivors.is_empty() {
            self.ready = true;
            return vec![SessionAction::Entered(Phase::Unmask), SessionAction::ReadyToUnmask];
        }
        vec![
            SessionAction::Entered(Phase::Unmask),
            SessionAction::AskToUnmask { request, survivors },
            SessionAction::StartDeadline(Phase::Unmask),
        ]
    }

    fn unmask(&mut self, device: String, shares: UnmaskShares) -> Vec<SessionAction<C>> {
        let checked = self.participant(&device, shares.session, Phase::Unmask).and_then(|id| {
            if shares.from != id {
                return Err(format!("unmasking shares from participant {}, this device is {id}", shares.from));
            }
            self.server.receive_unmask(shares).map_err(|e| e.to_string()).map(|()| id)
        });
        match checked {
            Err(reason) => vec![SessionAction::Refuse { device, reason }],
            Ok(id) => {
                self.unmasked.insert(id);
                let mut actions = vec![SessionAction::Reply { device, reply: Reply::Accepted }];
                if self.unmasked.len() == self.uploaded.len() {
                    self.ready = true;
                    actions.push(SessionAction::ReadyToUnmask);
                }
                actions
            }
        }
    }

    /// A deadline closes its phase if the session is still in it.
    fn deadline(&mut self, phase: Phase) -> Vec<SessionAction<C>> {
        if self.phase != phase || self.discarded.is_some() {
            return Vec::new();
        }
        match phase {
            Phase::Keys => self.close_keys(),
            Phase::Shares => self.close_shares(),
            Phase::Upload if self.closes_own_uploads => self.close_uploads(),
            Phase::Upload => Vec::new(),
            Phase::Unmask => {
                self.ready = true;
                vec![SessionAction::ReadyToUnmask]
            }
        }
    }

    /// Ends the session here: every held request is refused and every device is out.
    fn discard(&mut self, reason: String) -> Vec<SessionAction<C>> {
        let names = self.names();
        let mut actions: Vec<SessionAction<C>> = std::mem::take(&mut self.held)
            .into_iter()
            .map(|id| SessionAction::Refuse {
                device: names[&id].clone(),
                reason: format!("secure round discarded: {reason}"),
            })
            .collect();
        self.discarded = Some(reason.clone());
        actions.push(SessionAction::Dropped(self.ids.keys().cloned().collect()));
        actions.push(SessionAction::Discarded(reason));
        actions
    }
}

#[cfg(test)]
mod tests;
