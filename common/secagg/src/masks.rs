//! The masks: keys derived with HKDF-SHA256 from an X25519 shared secret or a seed, for one round
//! and one purpose, and expanded with ChaCha20 into 32-bit words.

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;
use hkdf::Hkdf;
use sha2::Sha256;

const SALT: &[u8] = b"flotilla-secagg v1";

/// A 32-byte key for `purpose` in `round` between participants `a` and `b` (order does not
/// matter for masks; the caller passes (from, to) for directed uses).
pub fn derive_key(secret: &[u8; 32], purpose: &[u8], session: u64, a: u32, b: u32) -> [u8; 32] {
    let mut info = Vec::with_capacity(purpose.len() + 16);
    info.extend_from_slice(purpose);
    info.extend_from_slice(&session.to_be_bytes());
    info.extend_from_slice(&a.to_be_bytes());
    info.extend_from_slice(&b.to_be_bytes());
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(SALT), secret).expand(&info, &mut key).expect("32 bytes is a valid HKDF-SHA256 length");
    key
}

/// The first `len` words of the ChaCha20 keystream of `key` (a key is used for one mask only, so
/// the nonce is fixed).
pub fn expand(key: &[u8; 32], len: usize) -> Vec<u32> {
    let mut bytes = vec![0u8; len * 4];
    let mut cipher = ChaCha20::new(key.into(), &[0u8; 12].into());
    cipher.apply_keystream(&mut bytes);
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// `values[i] += mask[i]` (mod 2³²) over the mask's length.
pub fn add(values: &mut [u32], mask: &[u32]) {
    for (v, m) in values.iter_mut().zip(mask) {
        *v = v.wrapping_add(*m);
    }
}

/// `values[i] −= mask[i]` (mod 2³²) over the mask's length.
pub fn subtract(values: &mut [u32], mask: &[u32]) {
    for (v, m) in values.iter_mut().zip(mask) {
        *v = v.wrapping_sub(*m);
    }
}
