//! The coordinator's side of one round: it relays keys and encrypted shares, collects the masked
//! inputs, and removes the masks from their sum with the shares the survivors reveal.

use std::collections::{BTreeMap, BTreeSet};

use blahaj::{Share, Sharks};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::client::{KEY_SHARE, PAIR_MASK, SELF_MASK, SELF_SEED_SHARE};
use crate::layout::Layout;
use crate::masks;
use crate::messages::{share_hash, AdvertiseKeys, EncryptedShare, MaskedInput, Peer, UnmaskRequest, UnmaskShares};
use crate::quantize::Quantizer;
use crate::{graph, Parameters, SecAggError};

/// The per-coordinate sums of a round, and who made them.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The dequantized sum of every revealed coordinate over the survivors that hold it: the
    /// first `layout.len(revealed_rank)` coordinates. Slots held by fewer than
    /// [`Parameters::min_holders`] survivors are never unmasked.
    pub sums: Vec<f64>,
    /// The slots revealed are 0..revealed_rank.
    pub revealed_rank: u32,
    pub survivors: Vec<u32>,
    /// Participants that shared their keys but did not upload; their masks were removed.
    pub dropped: Vec<u32>,
    /// The largest error quantization can have put in one sum.
    pub error_bound: f64,
}

pub struct ServerRound {
    parameters: Parameters,
    session: u64,
    layout: Layout,
    ranks: BTreeMap<u32, u32>,
    graph: BTreeMap<u32, Vec<u32>>,
    adverts: BTreeMap<u32, AdvertiseKeys>,
    /// Phase 2: shares by recipient, and the commitments by (owner, holder).
    routed: BTreeMap<u32, Vec<EncryptedShare>>,
    commitments: BTreeMap<(u32, u32), ([u8; 32], [u8; 32])>,
    shared: BTreeSet<u32>,
    inputs: BTreeMap<u32, Vec<u32>>,
    unmasking: BTreeMap<u32, UnmaskShares>,
}

impl ServerRound {
    /// A round among `participants` (id → rank), their graph drawn from `graph_seed`.
    pub fn new(
        parameters: Parameters,
        session: u64,
        layout: Layout,
        participants: BTreeMap<u32, u32>,
        graph_seed: u64,
    ) -> Result<ServerRound, SecAggError> {
        parameters.validate()?;
        if participants.len() > parameters.max_participants {
            return Err(SecAggError::Parameters(format!(
                "{} participants, more than the {} the quantization is scaled for",
                participants.len(),
                parameters.max_participants
            )));
        }
        let ids: Vec<u32> = participants.keys().copied().collect();
        let graph = graph::neighbours(&ids, parameters.degree, graph_seed);
        Ok(ServerRound {
            parameters,
            session,
            layout,
            ranks: participants,
            graph,
            adverts: BTreeMap::new(),
            routed: BTreeMap::new(),
            commitments: BTreeMap::new(),
            shared: BTreeSet::new(),
            inputs: BTreeMap::new(),
            unmasking: BTreeMap::new(),
        })
    }

    fn check(&self, session: u64, from: u32) -> Result<(), SecAggError> {
        if session != self.session {
            return Err(SecAggError::WrongSession { expected: self.session, got: session });
        }
        if !self.ranks.contains_key(&from) {
            return Err(SecAggError::UnknownParticipant(from));
        }
        Ok(())
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn parameters(&self) -> Parameters {
        self.parameters
    }

    /// Each participant id's rank.
    pub fn ranks(&self) -> &BTreeMap<u32, u32> {
        &self.ranks
    }

    pub fn neighbours(&self, id: u32) -> &[u32] {
        self.graph.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Phase 1: a participant's keys.
    pub fn receive_keys(&mut self, advert: AdvertiseKeys) -> Result<(), SecAggError> {
        self.check(advert.session, advert.from)?;
        if self.adverts.contains_key(&advert.from) {
            return Err(SecAggError::BadMessage { from: advert.from, message: "advertised its keys twice".into() });
        }
        self.adverts.insert(advert.from, advert);
        Ok(())
    }

    /// Phase 2: the neighbours of `id` that advertised keys, to share with.
    pub fn peers_for(&self, id: u32) -> Vec<Peer> {
        self.neighbours(id)
            .iter()
            .filter_map(|n| self.adverts.get(n))
            .map(|a| Peer {
                id: a.from,
                rank: self.ranks[&a.from],
                encryption_key: a.encryption_key,
                mask_key: a.mask_key,
            })
            .collect()
    }

    /// Phase 2: `from`'s encrypted shares, one for each of its peers, to route.
    pub fn receive_shares(&mut self, from: u32, shares: Vec<EncryptedShare>) -> Result<(), SecAggError> {
        self.check(self.session, from)?;
        let bad = |message: String| SecAggError::BadMessage { from, message };
        if !self.adverts.contains_key(&from) || self.shared.contains(&from) {
            return Err(bad("shares from a participant that did not advertise keys, or shared twice".into()));
        }
        let expected: BTreeSet<u32> = self.peers_for(from).iter().map(|p| p.id).collect();
        let got: BTreeSet<u32> = shares.iter().map(|s| s.to).collect();
        if got != expected || shares.len() != expected.len() {
            return Err(bad(format!(
                "{} share(s), expected one for each of its {} peers",
                shares.len(),
                expected.len()
            )));
        }
        if let Some(share) = shares.iter().find(|s| s.session != self.session || s.from != from) {
            return Err(bad(format!("a share for session {} from {}", share.session, share.from)));
        }
        for share in shares {
            self.commitments.insert((from, share.to), (share.self_mask_share_hash, share.key_share_hash));
            self.routed.entry(share.to).or_default().push(share);
        }
        self.shared.insert(from);
        Ok(())
    }

    /// Phase 2, relaying: the shares addressed to `to`.
    pub fn shares_for(&self, to: u32) -> &[EncryptedShare] {
        self.routed.get(&to).map_or(&[], Vec::as_slice)
    }

    /// Phase 3: a participant's masked input, as long as its rank's prefix.
    pub fn receive_masked(&mut self, input: MaskedInput) -> Result<(), SecAggError> {
        self.check(input.session, input.from)?;
        let from = input.from;
        if !self.shared.contains(&from) || self.inputs.contains_key(&from) {
            return Err(SecAggError::BadMessage {
                from,
                message: "an input before sharing its keys, or a second one".into(),
            });
        }
        let len = self.layout.len(self.ranks[&from]);
        if input.values.len() != len {
            return Err(SecAggError::BadMessage {
                from,
                message: format!("{} values, a rank-{} input has {len}", input.values.len(), self.ranks[&from]),
            });
        }
        self.inputs.insert(from, input.values);
        Ok(())
    }

    /// Phase 4: who uploaded (the survivors) and who shared but did not (dropped).
    pub fn unmask_request(&self) -> UnmaskRequest {
        UnmaskRequest {
            session: self.session,
            survivors: self.inputs.keys().copied().collect(),
            dropped: self.shared.iter().copied().filter(|id| !self.inputs.contains_key(id)).collect(),
        }
    }

    /// Phase 4: a survivor's revealed shares.
    pub fn receive_unmask(&mut self, shares: UnmaskShares) -> Result<(), SecAggError> {
        self.check(shares.session, shares.from)?;
        if !self.inputs.contains_key(&shares.from) || self.unmasking.contains_key(&shares.from) {
            return Err(SecAggError::BadMessage {
                from: shares.from,
                message: "unmasking shares from a non-survivor, or twice".into(),
            });
        }
        self.unmasking.insert(shares.from, shares);
        Ok(())
    }

    /// Rebuilds `owner`'s secret from the revealed shares that match their commitments.
    fn recover(
        &self,
        owner: u32,
        what: &'static str,
        tag: &[u8],
        pick: impl Fn(&UnmaskShares) -> &[(u32, Vec<u8>)],
    ) -> Result<[u8; 32], SecAggError> {
        let threshold = self.parameters.threshold;
        let mut valid = Vec::new();
        for (holder, reply) in &self.unmasking {
            let Some((_, bytes)) = pick(reply).iter().find(|(o, _)| *o == owner) else { continue };
            let Some(&(seed_hash, key_hash)) = self.commitments.get(&(owner, *holder)) else { continue };
            let committed = if tag == SELF_SEED_SHARE { seed_hash } else { key_hash };
            if share_hash(self.session, owner, *holder, tag, bytes) != committed {
                continue; // a garbage share: left out, the others may still reach the threshold
            }
            if let Ok(share) = Share::try_from(bytes.as_slice()) {
                valid.push(share);
            }
        }
        let shares = valid.len();
        let unrecoverable = || SecAggError::Unrecoverable { owner, what, shares, threshold };
        if shares < threshold {
            return Err(unrecoverable());
        }
        let secret = Sharks(threshold as u8).recover(valid.iter()).map_err(|_| unrecoverable())?;
        secret.try_into().map_err(|_| unrecoverable())
    }

    /// The rank up to which the survivors' sums may be revealed: each slot below it is held by
    /// at least [`Parameters::min_holders`] survivors.
    pub fn revealable_rank(&self) -> u32 {
        let survivors = self.inputs.keys().map(|id| self.ranks[id]);
        self.layout.revealable_rank(survivors, self.parameters.min_holders())
    }

    /// Removes every mask and returns the per-coordinate sums of the coordinates at least
    /// [`Parameters::min_holders`] survivors hold (the rest are never unmasked); discards the
    /// round (revealing nothing) when fewer than the threshold helped, fewer than `min_holders`
    /// uploaded, or a needed secret cannot be rebuilt.
    pub fn finish(self) -> Result<Aggregate, SecAggError> {
        let threshold = self.parameters.threshold;
        if self.inputs.len() < threshold || self.unmasking.len() < threshold {
            return Err(SecAggError::TooFewSurvivors {
                survivors: self.unmasking.len().min(self.inputs.len()),
                threshold,
            });
        }
        let needed = self.parameters.min_holders();
        if self.inputs.len() < needed {
            return Err(SecAggError::TooFewHolders { survivors: self.inputs.len(), needed });
        }
        let revealed_rank = self.revealable_rank();
        let request = self.unmask_request();
        // Masks and inputs past this length are left out: those coordinates are never unmasked.
        let mut total = vec![0u32; self.layout.len(revealed_rank)];
        for values in self.inputs.values() {
            masks::add(&mut total, values);
        }
        for &survivor in &request.survivors {
            let seed = self.recover(survivor, "self-mask seed", SELF_SEED_SHARE, |r| &r.self_mask_shares)?;
            let key = masks::derive_key(&seed, SELF_MASK, self.session, survivor, survivor);
            let len = self.layout.len(self.ranks[&survivor]).min(total.len());
            masks::subtract(&mut total, &masks::expand(&key, len));
        }
        for &gone in &request.dropped {
            let secret = StaticSecret::from(self.recover(gone, "mask key", KEY_SHARE, |r| &r.key_shares)?);
            for survivor in request.survivors.iter().filter(|s| self.neighbours(gone).contains(s)) {
                let public = PublicKey::from(self.adverts[survivor].mask_key);
                let shared = secret.diffie_hellman(&public);
                let (low, high) = (gone.min(*survivor), gone.max(*survivor));
                let key = masks::derive_key(shared.as_bytes(), PAIR_MASK, self.session, low, high);
                let rank = self.ranks[&gone].min(self.ranks[survivor]);
                let mask = masks::expand(&key, self.layout.len(rank).min(total.len()));
                // The survivor added the mask if its id is the lower one, subtracted it otherwise.
                if *survivor < gone {
                    masks::subtract(&mut total, &mask);
                } else {
                    masks::add(&mut total, &mask);
                }
            }
        }
        let quantizer = Quantizer::new(&self.parameters);
        let aggregate = Aggregate {
            sums: total.iter().map(|&s| quantizer.dequantize(s)).collect(),
            revealed_rank,
            error_bound: quantizer.sum_error_bound(request.survivors.len()),
            survivors: request.survivors,
            dropped: request.dropped,
        };
        self.check_sums(&aggregate)?;
        Ok(aggregate)
    }

    /// What honest inputs guarantee of the sums: each within its holders · range, the round's
    /// weight in (0, survivors], each slot's coverage weight in [0, its holders] and never above the
    /// round's. A mask that did not cancel (a participant that shared inconsistent secrets, or
    /// masked with other keys than it committed to) leaves uniform noise over the whole ring,
    /// which fails this almost surely: the round is discarded rather than made the global.
    fn check_sums(&self, aggregate: &Aggregate) -> Result<(), SecAggError> {
        let ranks: Vec<u32> = aggregate.survivors.iter().map(|id| self.ranks[id]).collect();
        let holders = |slot: usize| ranks.iter().filter(|&&r| r as usize > slot).count() as f64;
        let slack = aggregate.error_bound + 1e-9;
        let range = f64::from(self.parameters.range);
        let layout = self.layout;
        let sums = &aggregate.sums;
        let out_of = |index: usize, limit: f64| {
            SecAggError::Inconsistent(format!("coordinate {index} sums to {:.4e}, beyond ±{limit:.4e}", sums[index]))
        };
        let all = ranks.len() as f64;
        for (index, &sum) in sums.iter().enumerate() {
            let limit = match index.checked_sub(layout.shared) {
                None => all * range,
                Some(offset) => holders(offset / layout.per_slot.max(1)) * range,
            };
            if !sum.is_finite() || sum.abs() > limit + slack {
                return Err(out_of(index, limit));
            }
        }
        let weight = sums[layout.shared - 1];
        if weight <= 0.0 || weight > all + slack {
            return Err(SecAggError::Inconsistent(format!(
                "the session's weight is {weight:.4e} over {all} survivors"
            )));
        }
        for slot in 0..aggregate.revealed_rank as usize {
            let coverage = sums[layout.shared + slot * layout.per_slot];
            if coverage < -slack || coverage > holders(slot).min(weight) + slack {
                return Err(SecAggError::Inconsistent(format!(
                    "slot {slot}'s coverage weight is {coverage:.4e}, with {} holders and a session weight of \
                     {weight:.4e}",
                    holders(slot)
                )));
            }
        }
        Ok(())
    }
}
