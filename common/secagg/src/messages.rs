//! What the participants and the coordinator exchange in a round (the coordinator relays every
//! message between participants; it never sees a share in the clear).

use serde::{Deserialize, Serialize};

/// Phase 1, participant → coordinator: this round's fresh public keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    pub session: u64,
    pub from: u32,
    /// X25519 public key the shares sent to this participant are encrypted under.
    pub encryption_key: [u8; 32],
    /// X25519 public key its pairwise masks are agreed with.
    pub mask_key: [u8; 32],
}

/// Phase 2, coordinator → participant: a neighbour's keys and rank.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    pub id: u32,
    pub rank: u32,
    pub encryption_key: [u8; 32],
    pub mask_key: [u8; 32],
}

/// Phase 2, participant → coordinator → its neighbour `to`: `from`'s shares of its self-mask seed
/// and of its mask key, encrypted for `to`. The hashes commit `from` to each share, so that a
/// share revealed in phase 4 can be checked by the coordinator without decrypting anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncryptedShare {
    pub session: u64,
    pub from: u32,
    pub to: u32,
    pub ciphertext: Vec<u8>,
    pub self_mask_share_hash: [u8; 32],
    pub key_share_hash: [u8; 32],
}

/// Phase 3, participant → coordinator: its quantized values plus its masks, as long as its rank's
/// prefix of the layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskedInput {
    pub session: u64,
    pub from: u32,
    /// Travels as little-endian bytes: random ring elements would grow under a varint encoding.
    #[serde(with = "le_words")]
    pub values: Vec<u32>,
}

/// `Vec<u32>` as one byte string of little-endian words.
mod le_words {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[u32], serializer: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
        deserializer.deserialize_byte_buf(WordsVisitor)
    }

    struct WordsVisitor;

    fn words<E: Error>(bytes: &[u8]) -> Result<Vec<u32>, E> {
        if !bytes.len().is_multiple_of(4) {
            return Err(E::custom(format!("{} bytes are not whole 32-bit words", bytes.len())));
        }
        Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    impl<'de> Visitor<'de> for WordsVisitor {
        type Value = Vec<u32>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("little-endian 32-bit words as bytes")
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Vec<u32>, E> {
            words(bytes)
        }

        fn visit_byte_buf<E: Error>(self, bytes: Vec<u8>) -> Result<Vec<u32>, E> {
            words(&bytes)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u32>, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                bytes.push(b);
            }
            words(&bytes)
        }
    }
}

/// Phase 4, coordinator → survivors: who uploaded and who dropped after sharing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    pub session: u64,
    pub survivors: Vec<u32>,
    pub dropped: Vec<u32>,
}

/// Phase 4, survivor → coordinator: for each neighbour that uploaded, its share of that
/// neighbour's self-mask seed; for each that dropped, its share of that neighbour's mask key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnmaskShares {
    pub session: u64,
    pub from: u32,
    pub self_mask_shares: Vec<(u32, Vec<u8>)>,
    pub key_shares: Vec<(u32, Vec<u8>)>,
}

/// The commitment to one share: SHA-256 of a domain tag, the round, owner and holder, and the share.
pub fn share_hash(session: u64, owner: u32, holder: u32, what: &[u8], share: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(b"flotilla-secagg share");
    hasher.update(what);
    hasher.update(session.to_be_bytes());
    hasher.update(owner.to_be_bytes());
    hasher.update(holder.to_be_bytes());
    hasher.update(share);
    hasher.finalize().into()
}
