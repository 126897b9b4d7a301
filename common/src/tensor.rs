//! Tensors as they travel: a small descriptor (name, dtype, shape) plus raw little-endian bytes.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

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

    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::BF16 => Kind::BFloat16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

impl TensorDesc {
    /// Bytes this tensor occupies on the wire, or `None` on overflow.
    pub fn byte_len(&self) -> Option<u64> {
        self.shape.iter().try_fold(self.dtype.size_bytes() as u64, |acc, &d| acc.checked_mul(d))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("tensor '{name}': {message}")]
    Invalid { name: String, message: String },
    #[error("tensor '{name}': libtorch: {source}")]
    Torch {
        name: String,
        #[source]
        source: tch::TchError,
    },
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

/// The storage of a contiguous f32 CPU tensor as a mutable slice.
///
/// # Safety
/// `t` must be a contiguous f32 tensor on the CPU with at least one element, it must outlive the
/// slice, and no other slice or libtorch operation may use the same storage while the slice lives.
// tch hands out a tensor's storage through `&self` (`data_ptr`); exclusivity is the caller's promise.
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn f32_storage_mut(t: &Tensor) -> &mut [f32] {
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel())
}

/// A new f32 CPU tensor of `shape` holding the little-endian f32 values in `bytes`, built in one
/// pass (no zero-fill, no second copy) that also tells whether every value is finite.
pub fn f32_tensor_from_le_bytes(name: &str, bytes: &[u8], shape: &[i64]) -> Result<(Tensor, bool), TensorError> {
    let torch = |source| TensorError::Torch { name: name.to_string(), source };
    let tensor = Tensor::f_empty(shape, (Kind::Float, tch::Device::Cpu)).map_err(torch)?;
    let n = tensor.numel();
    if bytes.len() != n * 4 {
        return Err(TensorError::Invalid {
            name: name.to_string(),
            message: format!("{} bytes for {n} f32 values", bytes.len()),
        });
    }
    if n == 0 {
        return Ok((tensor, true));
    }
    // SAFETY: a fresh, contiguous, non-empty f32 CPU tensor that nothing else references yet.
    let dst = unsafe { f32_storage_mut(&tensor) };
    // Copy a cache-sized chunk, then check the (still cached) values: a NaN or infinity has all
    // exponent bits set. The OR-fold has no early exit, so it vectorises.
    const CHUNK: usize = 16 << 10;
    let mut non_finite = 0u32;
    for (d, src) in dst.chunks_mut(CHUNK).zip(bytes.chunks(CHUNK * 4)) {
        if cfg!(target_endian = "little") {
            // SAFETY: `d` has exactly `src.len()` bytes (4 per f32, lengths checked above); any
            // bit pattern is a valid f32.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), d.as_mut_ptr() as *mut u8, src.len()) };
        } else {
            for (v, c) in d.iter_mut().zip(src.chunks_exact(4)) {
                *v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        non_finite |= d.iter().fold(0u32, |acc, v| acc | u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000));
    }
    Ok((tensor, non_finite == 0))
}

/// An f32 CPU tensor widened from little-endian bf16 bytes (built from bytes, never through
/// `half::bf16`, which tch maps to f16), and whether every value is finite.
pub fn bf16_tensor_from_le_bytes(name: &str, bytes: &[u8], shape: &[i64]) -> Result<(Tensor, bool), TensorError> {
    let finite = all_finite_bytes(bytes, FloatBits::BF16);
    let tensor = Tensor::f_from_data_size(bytes, shape, Kind::BFloat16)
        .and_then(|t| t.f_to_kind(Kind::Float))
        .map_err(|source| TensorError::Torch { name: name.to_string(), source })?;
    Ok((tensor, finite))
}

impl TensorDesc {
    /// The shape as libtorch wants it.
    pub fn shape_i64(&self) -> Result<Vec<i64>, TensorError> {
        self.shape
            .iter()
            .map(|&d| {
                i64::try_from(d).map_err(|_| TensorError::Invalid {
                    name: self.name.clone(),
                    message: format!("dimension {d} too large"),
                })
            })
            .collect()
    }
}

/// Tensors decoded straight off the wire into f32 CPU tensors, in descriptor order.
#[derive(Debug, Default)]
pub struct DecodedTensors {
    pub tensors: Vec<(String, Tensor)>,
    /// Whether every value was finite (checked while the bytes arrived).
    pub all_finite: bool,
    /// Bytes the tensors took on the wire.
    pub wire_bytes: u64,
}

/// A list of tensors that share one contiguous byte buffer, in descriptor order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WireTensors {
    pub descs: Vec<TensorDesc>,
    pub body: Vec<u8>,
}

impl WireTensors {
    /// Packs tch tensors (any float kind, any device) as `dtype`.
    pub fn from_tensors<'a>(
        tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
        dtype: DType,
    ) -> Result<WireTensors, TensorError> {
        let mut wire = WireTensors::default();
        for (name, tensor) in tensors {
            let host = tensor
                .f_to_device(tch::Device::Cpu)
                .and_then(|t| t.f_to_kind(dtype.kind()))
                .and_then(|t| t.f_contiguous())
                .map_err(|source| TensorError::Torch { name: name.to_string(), source })?;
            let numel = host.numel();
            let start = wire.body.len();
            wire.body.resize(start + numel * dtype.size_bytes(), 0);
            host.f_copy_data_u8(&mut wire.body[start..], numel)
                .map_err(|source| TensorError::Torch { name: name.to_string(), source })?;
            wire.descs.push(TensorDesc {
                name: name.to_string(),
                dtype,
                shape: host.size().iter().map(|&d| d as u64).collect(),
            });
        }
        Ok(wire)
    }

    /// Total body length the descriptors imply, or `None` on overflow.
    pub fn declared_body_len(descs: &[TensorDesc]) -> Option<u64> {
        descs.iter().try_fold(0u64, |acc, d| acc.checked_add(d.byte_len()?))
    }

    /// Unpacks into f32 tch tensors on the CPU. bf16 is built from bytes (never through `half::bf16`,
    /// which tch maps to f16) and widened.
    pub fn to_tensors(&self) -> Result<Vec<(String, Tensor)>, TensorError> {
        Ok(self.to_tensors_checked()?.0)
    }

    /// Like [`WireTensors::to_tensors`], and whether every value is finite (checked while copying).
    pub fn to_tensors_checked(&self) -> Result<(Vec<(String, Tensor)>, bool), TensorError> {
        let mut all_finite = true;
        let mut offset = 0usize;
        let mut out = Vec::with_capacity(self.descs.len());
        for desc in &self.descs {
            let invalid = |message: String| TensorError::Invalid { name: desc.name.clone(), message };
            let len = desc
                .byte_len()
                .and_then(|l| usize::try_from(l).ok())
                .ok_or_else(|| invalid("size overflows".into()))?;
            let bytes = self
                .body
                .get(offset..offset + len)
                .ok_or_else(|| invalid("body shorter than the declared shapes".into()))?;
            offset += len;
            let shape = desc.shape_i64()?;
            let tensor = match desc.dtype {
                DType::F32 => {
                    let (tensor, finite) = f32_tensor_from_le_bytes(&desc.name, bytes, &shape)?;
                    all_finite &= finite;
                    tensor
                }
                DType::BF16 => {
                    let (tensor, finite) = bf16_tensor_from_le_bytes(&desc.name, bytes, &shape)?;
                    all_finite &= finite;
                    tensor
                }
            };
            out.push((desc.name.clone(), tensor));
        }
        if offset != self.body.len() {
            return Err(TensorError::Invalid {
                name: "<body>".into(),
                message: format!("{} bytes beyond the declared tensors", self.body.len() - offset),
            });
        }
        Ok((out, all_finite))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_and_bf16_round_trip() {
        let t = Tensor::from_slice(&[1.0f32, -2.5, 3.25, 0.5]).reshape([2, 2]);
        for dtype in [DType::F32, DType::BF16] {
            let wire = WireTensors::from_tensors([("x", &t)], dtype).unwrap();
            assert_eq!(wire.body.len(), 4 * dtype.size_bytes());
            let back = wire.to_tensors().unwrap();
            assert_eq!(back[0].0, "x");
            assert_eq!(back[0].1.size(), vec![2, 2]);
            // These values are exact in bf16.
            assert!(back[0].1.allclose(&t, 0.0, 0.0, false), "{dtype:?}");
        }
    }

    #[test]
    fn f32_decoding_copies_exactly_and_flags_non_finite_values() {
        let values: Vec<f32> = (0..40_000).map(|i| i as f32 * 0.25 - 7.0).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let (t, finite) = f32_tensor_from_le_bytes("x", &bytes, &[200, 200]).unwrap();
        assert!(finite);
        assert_eq!(Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(), values);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = values.clone();
            v[39_999] = bad; // in the last chunk
            let bytes: Vec<u8> = v.iter().flat_map(|v| v.to_le_bytes()).collect();
            assert!(!f32_tensor_from_le_bytes("x", &bytes, &[200, 200]).unwrap().1, "{bad}");
        }
        assert!(f32_tensor_from_le_bytes("x", &bytes[..8], &[3]).is_err());
        let (empty, finite) = f32_tensor_from_le_bytes("e", &[], &[0, 5]).unwrap();
        assert!(finite && empty.numel() == 0);
    }

    #[test]
    fn bf16_bytes_are_bf16_not_f16() {
        // bf16 for 1.0 is 0x3F80; as f16 those bytes would be 1.875.
        let wire = WireTensors {
            descs: vec![TensorDesc { name: "one".into(), dtype: DType::BF16, shape: vec![1] }],
            body: vec![0x80, 0x3F],
        };
        let t = &wire.to_tensors().unwrap()[0].1;
        assert_eq!(t.double_value(&[0]), 1.0);
    }

    #[test]
    fn short_or_long_bodies_are_rejected() {
        let desc = TensorDesc { name: "x".into(), dtype: DType::F32, shape: vec![2] };
        let short = WireTensors { descs: vec![desc.clone()], body: vec![0; 7] };
        assert!(short.to_tensors().is_err());
        let long = WireTensors { descs: vec![desc], body: vec![0; 9] };
        assert!(long.to_tensors().is_err());
    }

    #[test]
    fn overflowing_shapes_are_detected() {
        let desc = TensorDesc { name: "x".into(), dtype: DType::F32, shape: vec![u64::MAX, 2] };
        assert_eq!(desc.byte_len(), None);
        assert_eq!(WireTensors::declared_body_len(&[desc]), None);
    }
}
