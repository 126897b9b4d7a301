//! A participant's side of one round. Every key is fresh for the round and dropped with it.

use std::collections::{BTreeMap, BTreeSet};

use blahaj::{Share, Sharks};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use rand_core::{OsRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::layout::Layout;
use crate::masks;
use crate::messages::{share_hash, AdvertiseKeys, EncryptedShare, MaskedInput, Peer, UnmaskRequest, UnmaskShares};
use crate::quantize::Quantizer;
use crate::{Parameters, SecAggError};

pub(crate) const SELF_MASK: &[u8] = b"self mask";
pub(crate) const PAIR_MASK: &[u8] = b"pair mask";
const SHARE_KEY: &[u8] = b"share encryption";
pub(crate) const SELF_SEED_SHARE: &[u8] = b"self-mask seed";
pub(crate) const KEY_SHARE: &[u8] = b"mask key";

/// A neighbour's shares of its secrets, held for phase 4.
struct HeldShares {
    self_seed: Vec<u8>,
    mask_key: Vec<u8>,
}

pub struct ClientRound {
    parameters: Parameters,
    session: u64,
    id: u32,
    rank: u32,
    layout: Layout,
    encryption_secret: StaticSecret,
    /// The mask secret key's bytes: shared, so the coordinator can rebuild this participant's
    /// pairwise masks if it drops after sharing.
    mask_secret: [u8; 32],
    self_seed: [u8; 32],
    peers: BTreeMap<u32, Peer>,
    /// Shares received from neighbours, by owner.
    held: BTreeMap<u32, HeldShares>,
    shared: bool,
    uploaded: bool,
}

fn aead_data(session: u64, from: u32, to: u32) -> Vec<u8> {
    let mut data = b"flotilla-secagg share".to_vec();
    data.extend_from_slice(&session.to_be_bytes());
    data.extend_from_slice(&from.to_be_bytes());
    data.extend_from_slice(&to.to_be_bytes());
    data
}

impl ClientRound {
    /// Phase 1: fresh keys for `round`; the advertisement goes to the coordinator.
    pub fn new(
        parameters: Parameters,
        session: u64,
        id: u32,
        rank: u32,
        layout: Layout,
    ) -> Result<(ClientRound, AdvertiseKeys), SecAggError> {
        parameters.validate()?;
        let encryption_secret = StaticSecret::random_from_rng(OsRng);
        let mut mask_secret = [0u8; 32];
        let mut self_seed = [0u8; 32];
        OsRng.fill_bytes(&mut mask_secret);
        OsRng.fill_bytes(&mut self_seed);
        let advert = AdvertiseKeys {
            session,
            from: id,
            encryption_key: PublicKey::from(&encryption_secret).to_bytes(),
            mask_key: PublicKey::from(&StaticSecret::from(mask_secret)).to_bytes(),
        };
        let client = ClientRound {
            parameters,
            session,
            id,
            rank,
            layout,
            encryption_secret,
            mask_secret,
            self_seed,
            peers: BTreeMap::new(),
            held: BTreeMap::new(),
            shared: false,
            uploaded: false,
        };
        Ok((client, advert))
    }

    fn share_cipher(&self, peer: &Peer, from: u32, to: u32) -> ChaCha20Poly1305 {
        let shared = self.encryption_secret.diffie_hellman(&PublicKey::from(peer.encryption_key));
        let key = masks::derive_key(shared.as_bytes(), SHARE_KEY, self.session, from, to);
        ChaCha20Poly1305::new(&key.into())
    }

    /// Phase 2: splits the self-mask seed and the mask key among `peers` (the neighbours the
    /// coordinator lists), one encrypted share each.
    pub fn share_keys(&mut self, peers: &[Peer]) -> Result<Vec<EncryptedShare>, SecAggError> {
        if self.shared {
            return Err(SecAggError::OutOfOrder("the keys were already shared this session"));
        }
        let threshold = self.parameters.threshold;
        let distinct: BTreeSet<u32> = peers.iter().map(|p| p.id).collect();
        if distinct.len() != peers.len() || distinct.contains(&self.id) {
            return Err(SecAggError::BadMessage {
                from: u32::MAX,
                message: "the neighbour list repeats a participant or names this one".into(),
            });
        }
        if peers.len() < threshold {
            return Err(SecAggError::TooFewSurvivors { survivors: peers.len(), threshold });
        }
        // A threshold of half the holders or fewer would let a coordinator that lies rebuild both
        // of this participant's secrets from two disjoint halves.
        if 2 * threshold <= peers.len() {
            return Err(SecAggError::Parameters(format!(
                "threshold {threshold} is not above half of the {} neighbours listed",
                peers.len()
            )));
        }
        // The graph rounds an odd degree up to even (`graph::neighbours`), so a participant may have
        // degree + 1 neighbours, never more.
        let most = self.parameters.degree.max(threshold) + 1;
        if peers.len() > most {
            return Err(SecAggError::BadMessage {
                from: u32::MAX,
                message: format!("{} neighbours listed, more than the {most} the graph gives", peers.len()),
            });
        }
        // A low-order public key would make the agreed secret a constant anyone knows.
        let mask_secret = StaticSecret::from(self.mask_secret);
        for peer in peers {
            let contributory =
                self.encryption_secret.diffie_hellman(&PublicKey::from(peer.encryption_key)).was_contributory()
                    && mask_secret.diffie_hellman(&PublicKey::from(peer.mask_key)).was_contributory();
            if !contributory {
                return Err(SecAggError::BadMessage {
                    from: peer.id,
                    message: "a public key of low order (the agreed secret would be known to anyone)".into(),
                });
            }
        }
        let sharks = Sharks(threshold as u8);
        let seed_shares: Vec<Share> = sharks.dealer(&self.self_seed).take(peers.len()).collect();
        let key_shares: Vec<Share> = sharks.dealer(&self.mask_secret).take(peers.len()).collect();
        let mut out = Vec::with_capacity(peers.len());
        for ((peer, seed_share), key_share) in peers.iter().zip(&seed_shares).zip(&key_shares) {
            let seed_bytes = Vec::from(seed_share);
            let key_bytes = Vec::from(key_share);
            let mut plaintext = Vec::with_capacity(4 + seed_bytes.len() + key_bytes.len());
            plaintext.extend_from_slice(&(seed_bytes.len() as u32).to_be_bytes());
            plaintext.extend_from_slice(&seed_bytes);
            plaintext.extend_from_slice(&key_bytes);
            let cipher = self.share_cipher(peer, self.id, peer.id);
            let aad = aead_data(self.session, self.id, peer.id);
            let ciphertext = cipher
                .encrypt(&[0u8; 12].into(), Payload { msg: &plaintext, aad: &aad })
                .map_err(|_| SecAggError::Parameters("share encryption failed".into()))?;
            out.push(EncryptedShare {
                session: self.session,
                from: self.id,
                to: peer.id,
                ciphertext,
                self_mask_share_hash: share_hash(self.session, self.id, peer.id, SELF_SEED_SHARE, &seed_bytes),
                key_share_hash: share_hash(self.session, self.id, peer.id, KEY_SHARE, &key_bytes),
            });
            self.peers.insert(peer.id, peer.clone());
        }
        self.shared = true;
        Ok(out)
    }

    /// Phase 2, receiving: decrypts and keeps the shares neighbours sent this participant. A share
    /// that is not for this round and participant, not from a neighbour, or does not decrypt is
    /// refused, naming its sender; the others are kept.
    pub fn receive_shares(&mut self, shares: &[EncryptedShare]) -> Vec<SecAggError> {
        let mut errors = Vec::new();
        for share in shares {
            match self.open_share(share) {
                Ok(held) => {
                    self.held.insert(share.from, held);
                }
                Err(message) => errors.push(SecAggError::BadMessage { from: share.from, message }),
            }
        }
        errors
    }

    fn open_share(&self, share: &EncryptedShare) -> Result<HeldShares, String> {
        if share.session != self.session || share.to != self.id {
            return Err(format!("a share for session {} and participant {}", share.session, share.to));
        }
        let peer = self.peers.get(&share.from).ok_or("a share from a participant that is not a neighbour")?;
        let cipher = self.share_cipher(peer, share.from, self.id);
        let aad = aead_data(self.session, share.from, self.id);
        let plaintext = cipher
            .decrypt(&[0u8; 12].into(), Payload { msg: &share.ciphertext, aad: &aad })
            .map_err(|_| "a share that does not decrypt".to_string())?;
        let (length, rest) = plaintext.split_at_checked(4).ok_or("a share too short")?;
        let length = u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize;
        let (self_seed, mask_key) = rest.split_at_checked(length).ok_or("a share with a bad length")?;
        if share_hash(self.session, share.from, self.id, SELF_SEED_SHARE, self_seed) != share.self_mask_share_hash
            || share_hash(self.session, share.from, self.id, KEY_SHARE, mask_key) != share.key_share_hash
        {
            return Err("a share that does not match its commitment".into());
        }
        Ok(HeldShares { self_seed: self_seed.to_vec(), mask_key: mask_key.to_vec() })
    }

    /// How many of `values` the quantization's range (±R) will clip.
    pub fn clipped(&self, values: &[f32]) -> usize {
        Quantizer::new(&self.parameters).clipped(values)
    }

    /// Phase 3: `values` (this rank's prefix of the layout) quantized, plus the self mask and a
    /// pairwise mask with each neighbour whose shares arrived (each pair masks the prefix both hold).
    pub fn masked_input(&mut self, values: &[f32]) -> Result<MaskedInput, SecAggError> {
        if !self.shared || self.uploaded {
            return Err(SecAggError::OutOfOrder("the masked input comes once, after sharing the keys"));
        }
        let len = self.layout.len(self.rank);
        if values.len() != len {
            return Err(SecAggError::Parameters(format!(
                "a rank-{} input has {len} values in this layout, got {}",
                self.rank,
                values.len()
            )));
        }
        if let Some(at) = values.iter().position(|v| !v.is_finite()) {
            return Err(SecAggError::Parameters(format!(
                "value {at} of the input is {}: a non-finite update is not uploaded",
                values[at]
            )));
        }
        let quantizer = Quantizer::new(&self.parameters);
        let mut masked: Vec<u32> = values.iter().map(|&v| quantizer.quantize(v)).collect();
        let self_key = masks::derive_key(&self.self_seed, SELF_MASK, self.session, self.id, self.id);
        masks::add(&mut masked, &masks::expand(&self_key, len));
        let mask_secret = StaticSecret::from(self.mask_secret);
        for owner in self.held.keys() {
            let peer = &self.peers[owner];
            let shared = mask_secret.diffie_hellman(&PublicKey::from(peer.mask_key));
            let (low, high) = (self.id.min(peer.id), self.id.max(peer.id));
            let key = masks::derive_key(shared.as_bytes(), PAIR_MASK, self.session, low, high);
            let mask = masks::expand(&key, self.layout.len(self.rank.min(peer.rank)));
            if self.id < peer.id {
                masks::add(&mut masked, &mask);
            } else {
                masks::subtract(&mut masked, &mask);
            }
        }
        self.uploaded = true;
        Ok(MaskedInput { session: self.session, from: self.id, values: masked })
    }

    /// Phase 4: for each neighbour whose shares this participant holds, the share of its self-mask
    /// seed if it survived or of its mask key if it dropped; never both for one neighbour, and
    /// nothing when fewer than the threshold of its neighbours survived. It consumes the round: a
    /// second request, even a different one, gets nothing.
    pub fn unmask(self, request: &UnmaskRequest) -> Result<UnmaskShares, SecAggError> {
        if request.session != self.session {
            return Err(SecAggError::WrongSession { expected: self.session, got: request.session });
        }
        if !self.uploaded {
            return Err(SecAggError::OutOfOrder("unmasking comes after the masked input"));
        }
        let survivors: BTreeSet<u32> = request.survivors.iter().copied().collect();
        let dropped: BTreeSet<u32> = request.dropped.iter().copied().collect();
        if survivors.intersection(&dropped).next().is_some() {
            return Err(SecAggError::BadMessage {
                from: u32::MAX,
                message: "the coordinator lists a participant as both survived and dropped".into(),
            });
        }
        if !survivors.contains(&self.id) {
            return Err(SecAggError::BadMessage {
                from: u32::MAX,
                message: "this participant is not listed as a survivor".into(),
            });
        }
        // Its own secrets are rebuilt from its neighbours' shares: fewer than the threshold of them
        // surviving and the round cannot finish, whatever the total.
        let surviving_neighbours = self.peers.keys().filter(|p| survivors.contains(p)).count();
        if survivors.len() < self.parameters.threshold || surviving_neighbours < self.parameters.threshold {
            return Err(SecAggError::TooFewSurvivors {
                survivors: surviving_neighbours.min(survivors.len()),
                threshold: self.parameters.threshold,
            });
        }
        let mut reply =
            UnmaskShares { session: self.session, from: self.id, self_mask_shares: Vec::new(), key_shares: Vec::new() };
        for (owner, held) in self.held {
            if survivors.contains(&owner) {
                reply.self_mask_shares.push((owner, held.self_seed));
            } else if dropped.contains(&owner) {
                reply.key_shares.push((owner, held.mask_key));
            }
        }
        Ok(reply)
    }
}
