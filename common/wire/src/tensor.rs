//! Tensors as they travel: a small descriptor (name, dtype, shape) plus raw little-endian bytes.
//! Plain data: turning them into libtorch tensors is the torch side's job (`flotilla_torch::tensor`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    F32,
    BF16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 => 2,
        }
    }

    /// The float layout whose finiteness [`all_finite_bytes`] reads off the bits.
    pub fn float_bits(self) -> FloatBits {
        match self {
            DType::F32 => FloatBits::F32,
            DType::BF16 => FloatBits::BF16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

/// A descriptor that cannot be honoured (a dimension too large for the platform, a size overflow).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tensor '{name}': {message}")]
pub struct DescError {
    pub name: String,
    pub message: String,
}

impl TensorDesc {
    /// Bytes this tensor occupies on the wire, or `None` on overflow.
    pub fn byte_len(&self) -> Option<u64> {
        self.shape.iter().try_fold(self.dtype.size_bytes() as u64, |acc, &d| acc.checked_mul(d))
    }

    /// The shape as signed dimensions (what libtorch wants).
    pub fn shape_i64(&self) -> Result<Vec<i64>, DescError> {
        self.shape
            .iter()
            .map(|&d| {
                i64::try_from(d)
                    .map_err(|_| DescError { name: self.name.clone(), message: format!("dimension {d} too large") })
            })
            .collect()
    }
}

/// Floating-point layouts whose finiteness can be read off the bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatBits {
    F32,
    F16,
    BF16,
}

/// Whether every little-endian value in `bytes` is finite: a value is NaN or infinite exactly when
/// its exponent bits are all ones. One pass, no allocation.
pub fn all_finite_bytes(bytes: &[u8], bits: FloatBits) -> bool {
    match bits {
        FloatBits::F32 => bytes
            .chunks_exact(4)
            .fold(true, |ok, c| ok & (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7f80_0000 != 0x7f80_0000)),
        FloatBits::BF16 => {
            bytes.chunks_exact(2).fold(true, |ok, c| ok & (u16::from_le_bytes([c[0], c[1]]) & 0x7f80 != 0x7f80))
        }
        FloatBits::F16 => {
            bytes.chunks_exact(2).fold(true, |ok, c| ok & (u16::from_le_bytes([c[0], c[1]]) & 0x7c00 != 0x7c00))
        }
    }
}

/// A list of tensors that share one contiguous byte buffer, in descriptor order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WireTensors {
    pub descs: Vec<TensorDesc>,
    pub body: Vec<u8>,
}

impl WireTensors {
    /// Total body length the descriptors imply, or `None` on overflow.
    pub fn declared_body_len(descs: &[TensorDesc]) -> Option<u64> {
        descs.iter().try_fold(0u64, |acc, d| acc.checked_add(d.byte_len()?))
    }

    /// Each descriptor with its bytes, checking that the body holds exactly what they declare.
    pub fn split(&self) -> Result<Vec<(&TensorDesc, &[u8])>, DescError> {
        let mut offset = 0usize;
        let mut out = Vec::with_capacity(self.descs.len());
        for desc in &self.descs {
            let invalid = |message: &str| DescError { name: desc.name.clone(), message: message.to_string() };
            let len = desc.byte_len().and_then(|l| usize::try_from(l).ok()).ok_or_else(|| invalid("size overflows"))?;
            let end = offset.checked_add(len).ok_or_else(|| invalid("size overflows"))?;
            let bytes = self.body.get(offset..end).ok_or_else(|| invalid("body shorter than the declared shapes"))?;
            out.push((desc, bytes));
            offset = end;
        }
        if offset != self.body.len() {
            return Err(DescError {
                name: "<body>".into(),
                message: format!("{} bytes beyond the declared tensors", self.body.len() - offset),
            });
        }
        Ok(out)
    }
}

/// Tensors encoded once and sent to many peers (a round's adapter slices): the body is
/// reference-counted, and `framing::write_frame_shared` hands it to QUIC without copying it, so the
/// coordinator holds one copy per rank however many devices it is sending to at once.
#[derive(Debug, Clone, Default)]
pub struct SharedTensors {
    pub descs: Vec<TensorDesc>,
    pub body: bytes::Bytes,
}

impl From<WireTensors> for SharedTensors {
    fn from(wire: WireTensors) -> SharedTensors {
        SharedTensors { descs: wire.descs, body: bytes::Bytes::from(wire.body) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflowing_shapes_are_detected() {
        let desc = TensorDesc { name: "x".into(), dtype: DType::F32, shape: vec![u64::MAX, 2] };
        assert_eq!(desc.byte_len(), None);
        assert_eq!(WireTensors::declared_body_len(&[desc]), None);
    }

    #[test]
    fn short_or_long_bodies_are_rejected() {
        let desc = TensorDesc { name: "x".into(), dtype: DType::F32, shape: vec![2] };
        assert!(WireTensors { descs: vec![desc.clone()], body: vec![0; 7] }.split().is_err());
        assert!(WireTensors { descs: vec![desc.clone()], body: vec![0; 9] }.split().is_err());
        assert_eq!(WireTensors { descs: vec![desc], body: vec![0; 8] }.split().unwrap().len(), 1);
    }

    #[test]
    fn finiteness_is_read_off_the_exponent_bits() {
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert!(all_finite_bytes(&f32s(&[0.0, -1.5, f32::MAX]), FloatBits::F32));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(!all_finite_bytes(&f32s(&[1.0, bad]), FloatBits::F32));
        }
        assert!(all_finite_bytes(&[0x80, 0x3F], FloatBits::BF16));
        assert!(!all_finite_bytes(&[0x80, 0x7F], FloatBits::BF16));
        assert!(!all_finite_bytes(&[0x00, 0x7C], FloatBits::F16));
    }
}
