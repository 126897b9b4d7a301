//! FNV-1a, the stable 64-bit hash behind the text splits and the held-out samples: the same on
//! every machine and release, so a split or a sample never moves. Kept here (the wire crate has
//! its own copy for its fingerprints) so that the data crate, and the study harness on it, do not
//! pull in the network stack for five lines.

pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &b| (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_values() {
        assert_eq!(super::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
