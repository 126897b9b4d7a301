//! Secure aggregation for devices of different LoRA ranks: SecAgg+ (Bell et al., CCS 2020) with
//! masks agreed within rank tiers, so that the coordinator learns the per-slot sums and nothing
//! about any one device, while each device uploads only its own rank's values.
//!
//! This crate is the protocol's logic, without network or tensors: a device's side
//! ([`client::ClientRound`]) and the coordinator's ([`server::ServerRound`]), exchanging the plain
//! messages of [`messages`]. The primitives come from well-kept crates: X25519 key agreement
//! (`x25519-dalek`), HKDF-SHA256 (`hkdf`), ChaCha20 as the mask generator (`chacha20`),
//! ChaCha20-Poly1305 for the shares in transit (`chacha20poly1305`), Shamir secret sharing over
//! GF(256) (`blahaj`).
//!
//! **The layout.** A device's update is one vector in [`layout::Layout`]'s order: the head and the
//! device's weight first, then slot 0 (its coverage weight and every module's A row and B column of
//! that slot), slot 1, and so on. A device of rank r holds exactly the prefix up to its slot r − 1,
//! so the per-slot sums the slot-wise methods need are the coordinate sums over the devices that
//! hold each coordinate.
//!
//! **Masks within rank tiers.** Each pair of neighbours (u, v) agrees a key and masks the prefix
//! both hold (up to min(r_u, r_v) slots), u adding the mask and v subtracting it; each device also
//! adds a self mask over its own prefix. Every coordinate's masks therefore cancel in the sum over
//! the devices that hold it, and an upload is its own rank's length.
//!
//! **Rounds.** 1. Each participant advertises two fresh X25519 public keys (one to encrypt shares,
//! one to agree masks). 2. It Shamir-shares (threshold t) its mask key and its self-mask seed
//! among its neighbours in a random graph, each share encrypted for its recipient. 3. It uploads
//! its quantized, masked vector. 4. Once the uploads are in, each survivor reveals, for each
//! neighbour, the share of its self-mask seed (if that neighbour uploaded) or of its mask key (if
//! it dropped), never both. The coordinator rebuilds what it needs from t shares and removes the
//! masks. With fewer than t shares for any secret it needs, the round fails and reveals nothing.

pub mod client;
pub mod graph;
pub mod layout;
pub mod masks;
pub mod messages;
pub mod quantize;
pub mod server;
pub mod session;

#[cfg(test)]
mod tests;

/// Why a round of secure aggregation cannot go on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SecAggError {
    #[error("secure aggregation parameters: {0}")]
    Parameters(String),
    #[error("message for session {got}, this is session {expected}")]
    WrongSession { expected: u64, got: u64 },
    #[error("participant {0} is not in this session")]
    UnknownParticipant(u32),
    #[error("participant {from}: {message}")]
    BadMessage { from: u32, message: String },
    #[error("only {survivors} participant(s) can help unmask, fewer than the threshold {threshold}: the session is discarded and nothing is revealed")]
    TooFewSurvivors { survivors: usize, threshold: usize },
    #[error("only {survivors} masked input(s) are in; a sum is revealed only over at least {needed} (threshold + 1), so the session is discarded and nothing is revealed")]
    TooFewHolders { survivors: usize, needed: usize },
    #[error(
        "cannot recover participant {owner}'s {what}: {shares} share(s), threshold {threshold}; the session is discarded"
    )]
    Unrecoverable { owner: u32, what: &'static str, shares: usize, threshold: usize },
    #[error("out of order: {0}")]
    OutOfOrder(&'static str),
    #[error("the unmasked sums are inconsistent ({0}): a participant's masks or shares were not what it committed to; the session is discarded")]
    Inconsistent(String),
}

/// What a round is set up with; both sides must agree on it (the coordinator sends it).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Parameters {
    /// Shares needed to rebuild a secret (and survivors needed to finish a round).
    pub threshold: usize,
    /// Neighbours each participant shares its secrets with (the whole round when it is smaller).
    pub degree: usize,
    /// Each value is clipped to [−range, range] before quantization.
    pub range: f32,
    /// The most participants a round may have: the quantization scale keeps their sum in the ring.
    pub max_participants: usize,
}

impl Parameters {
    pub fn validate(&self) -> Result<(), SecAggError> {
        let bad = |m: String| Err(SecAggError::Parameters(m));
        if self.degree == 0 || self.degree > 254 {
            return bad(format!("the degree must be in 1..=254 (GF(256) shares), got {}", self.degree));
        }
        if self.threshold < 2 || self.threshold > self.degree {
            return bad(format!("the threshold must be in 2..=degree ({}), got {}", self.degree, self.threshold));
        }
        if !(self.range.is_finite() && self.range > 0.0) {
            return bad(format!("the range must be a positive number, got {}", self.range));
        }
        if self.max_participants < 2 {
            return bad(format!("max_participants must be at least 2, got {}", self.max_participants));
        }
        if self.max_participants as f64 * f64::from(self.range) >= f64::from(i32::MAX) {
            return bad(format!(
                "max_participants × range = {} reaches 2³¹ − 1: the quantization scale would fall below 1",
                self.max_participants as f64 * f64::from(self.range)
            ));
        }
        Ok(())
    }

    /// The fewest surviving holders a revealed coordinate must have: threshold + 1, so that even
    /// threshold − 1 devices colluding with the coordinator leave two honest holders in the sum.
    pub fn min_holders(&self) -> usize {
        self.threshold + 1
    }
}
