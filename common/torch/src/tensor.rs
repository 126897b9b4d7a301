//! Wire tensors (`flotilla_wire::tensor`) to and from libtorch tensors, and [`TorchSink`], through
//! which the streaming frame decoder writes an update's bytes straight into tensor storage.

use flotilla_wire::framing::{Decoded, TensorSink};
use flotilla_wire::tensor::{all_finite_bytes, DType, DescError, FloatBits, TensorDesc, WireTensors};
use tch::{Kind, Tensor};

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

impl From<DescError> for TensorError {
    fn from(e: DescError) -> TensorError {
        TensorError::Invalid { name: e.name, message: e.message }
    }
}

/// Tensors decoded straight off the wire into f32 CPU tensors, in descriptor order.
pub type DecodedTensors = Decoded<(String, Tensor)>;

/// The libtorch kind of a wire dtype.
pub fn kind_of(dtype: DType) -> Kind {
    match dtype {
        DType::F32 => Kind::Float,
        DType::BF16 => Kind::BFloat16,
    }
}

/// A copy of `t` with its own storage, through libtorch's fallible calls (tch's `copy` panics on
/// failure; everything an update reaches uses this instead).
pub fn try_copy(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut out = t.f_empty_like()?;
    out.f_copy_(t)?;
    Ok(out)
}

/// The storage of a contiguous f32 CPU tensor as a mutable slice.
///
/// # Safety
/// `t` must be a contiguous f32 tensor on the CPU with at least one element, it must outlive the
/// slice, and no other slice or libtorch operation may use the same storage while the slice lives.
// tch hands out a tensor's storage through `&self` (`data_ptr`); exclusivity is the caller's promise.
#[allow(clippy::mut_from_ref)]
pub(crate) unsafe fn f32_storage_mut(t: &Tensor) -> &mut [f32] {
    // SAFETY: the caller promises a live, contiguous, non-empty f32 CPU tensor used by nothing else;
    // its storage holds exactly `numel` f32 values.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel()) }
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

/// Packs tch tensors (any float kind, any device) as `dtype`.
pub fn wire_from_tensors<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
    dtype: DType,
) -> Result<WireTensors, TensorError> {
    let mut wire = WireTensors::default();
    for (name, tensor) in tensors {
        let host = tensor
            .f_to_device(tch::Device::Cpu)
            .and_then(|t| t.f_to_kind(kind_of(dtype)))
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

/// Unpacks into f32 tch tensors on the CPU, and whether every value is finite (checked while
/// copying). bf16 is built from bytes and widened.
pub fn tensors_from_wire(wire: &WireTensors) -> Result<(Vec<(String, Tensor)>, bool), TensorError> {
    let mut all_finite = true;
    let mut out = Vec::with_capacity(wire.descs.len());
    for (desc, bytes) in wire.split()? {
        let shape = desc.shape_i64()?;
        let (tensor, finite) = match desc.dtype {
            DType::F32 => f32_tensor_from_le_bytes(&desc.name, bytes, &shape)?,
            DType::BF16 => bf16_tensor_from_le_bytes(&desc.name, bytes, &shape)?,
        };
        all_finite &= finite;
        out.push((desc.name.clone(), tensor));
    }
    Ok((out, all_finite))
}

/// The sink through which the coordinator receives updates: an f32 tensor's bytes are read
/// straight into the storage of a new CPU tensor; a bf16 tensor is read into a buffer and widened.
/// With `allowed`, a frame naming another tensor, or a shape beyond a name's, is refused from its
/// header, before any of its body is read or allocated.
#[derive(Debug, Default)]
pub struct TorchSink {
    pub allowed: Option<std::sync::Arc<AllowedTensors>>,
}

/// The tensors an update may carry: each name with its largest shape (the global adapter's).
pub type AllowedTensors = std::collections::BTreeMap<String, Vec<u64>>;

/// Why the descriptors are not what `allowed` admits, if they are not.
pub fn check_allowed(allowed: &AllowedTensors, descs: &[TensorDesc]) -> Result<(), String> {
    for desc in descs {
        let largest = allowed
            .get(&desc.name)
            .ok_or_else(|| format!("tensor '{}' is not part of the global adapter", desc.name))?;
        let fits = desc.shape.len() == largest.len() && desc.shape.iter().zip(largest).all(|(got, most)| got <= most);
        if !fits {
            return Err(format!(
                "tensor '{}' has shape {:?}, beyond the global adapter's {largest:?}",
                desc.name, desc.shape
            ));
        }
    }
    Ok(())
}

/// A tensor whose bytes are arriving.
pub enum PendingTensor {
    F32(Tensor),
    Bf16(Vec<u8>),
}

impl TensorSink for TorchSink {
    type Pending = PendingTensor;
    type Tensor = (String, Tensor);

    fn admit(&mut self, descs: &[TensorDesc], _body_len: usize) -> Result<(), String> {
        self.allowed.as_deref().map_or(Ok(()), |allowed| check_allowed(allowed, descs))
    }

    fn allocate(&mut self, desc: &TensorDesc, len: usize) -> Result<PendingTensor, String> {
        match desc.dtype {
            DType::F32 => {
                let shape = desc.shape_i64().map_err(|e| e.to_string())?;
                let tensor = Tensor::f_empty(shape.as_slice(), (Kind::Float, tch::Device::Cpu))
                    .map_err(|e| format!("tensor '{}': libtorch: {e}", desc.name))?;
                if tensor.numel() * 4 != len {
                    return Err(format!("tensor '{}': {len} bytes for {} f32 values", desc.name, tensor.numel()));
                }
                Ok(PendingTensor::F32(tensor))
            }
            DType::BF16 => Ok(PendingTensor::Bf16(vec![0u8; len])),
        }
    }

    fn bytes_mut<'a>(&'a mut self, pending: &'a mut PendingTensor) -> &'a mut [u8] {
        match pending {
            PendingTensor::F32(tensor) if tensor.numel() == 0 => &mut [],
            PendingTensor::F32(tensor) => {
                // SAFETY: a fresh, contiguous, non-empty f32 CPU tensor (made in `allocate`) that
                // nothing else references; the byte view covers its storage exactly, and any bytes
                // are a valid f32.
                let values = unsafe { f32_storage_mut(tensor) };
                // SAFETY: the same storage viewed as its bytes (4 per f32, u8 has no alignment).
                unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr() as *mut u8, values.len() * 4) }
            }
            PendingTensor::Bf16(bytes) => bytes,
        }
    }

    fn finish(&mut self, desc: TensorDesc, pending: PendingTensor) -> Result<(String, Tensor), String> {
        let tensor = match pending {
            PendingTensor::F32(tensor) => {
                if cfg!(target_endian = "big") && tensor.numel() > 0 {
                    // SAFETY: as in `bytes_mut`; the slice is the only view while it lives.
                    for v in unsafe { f32_storage_mut(&tensor) } {
                        *v = f32::from_bits(u32::from_le(v.to_bits()));
                    }
                }
                tensor
            }
            PendingTensor::Bf16(bytes) => {
                let shape = desc.shape_i64().map_err(|e| e.to_string())?;
                bf16_tensor_from_le_bytes(&desc.name, &bytes, &shape).map_err(|e| e.to_string())?.0
            }
        };
        Ok((desc.name, tensor))
    }
}

/// Reads one frame, each f32 tensor's bytes straight into the storage of a new tensor and checked
/// finite while still in cache: no body buffer and no second copy. This is how the coordinator
/// receives updates.
pub async fn read_frame_decoded<R, M>(
    reader: &mut R,
    limits: &flotilla_wire::framing::FrameLimits,
    allowed: Option<std::sync::Arc<AllowedTensors>>,
) -> Result<(M, DecodedTensors), flotilla_wire::framing::FrameError>
where
    R: tokio::io::AsyncRead + Unpin,
    M: serde::de::DeserializeOwned,
{
    flotilla_wire::framing::read_frame_into(reader, limits, &mut TorchSink { allowed }).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_wire::framing::{decode_frame, decode_frame_into, encode_frame, FrameLimits};
    use flotilla_wire::protocol::{Ack, CoordinatorMessage};

    #[test]
    fn f32_and_bf16_round_trip() {
        let t = Tensor::from_slice(&[1.0f32, -2.5, 3.25, 0.5]).reshape([2, 2]);
        for dtype in [DType::F32, DType::BF16] {
            let wire = wire_from_tensors([("x", &t)], dtype).unwrap();
            assert_eq!(wire.body.len(), 4 * dtype.size_bytes());
            let (back, finite) = tensors_from_wire(&wire).unwrap();
            assert!(finite);
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
        let t = &tensors_from_wire(&wire).unwrap().0[0].1;
        assert_eq!(t.double_value(&[0]), 1.0);
    }

    #[test]
    fn short_or_long_bodies_are_rejected() {
        let desc = TensorDesc { name: "x".into(), dtype: DType::F32, shape: vec![2] };
        assert!(tensors_from_wire(&WireTensors { descs: vec![desc.clone()], body: vec![0; 7] }).is_err());
        assert!(tensors_from_wire(&WireTensors { descs: vec![desc], body: vec![0; 9] }).is_err());
    }

    #[test]
    fn the_torch_sink_decodes_what_the_plain_buffer_sink_decodes() {
        let a = Tensor::from_slice(&[1.0f32, -2.0, 3.5, f32::MAX, 0.0, -0.0]).reshape([2, 3]);
        let b = Tensor::from_slice(&[0.5f32, 4.0]);
        let mut wire = wire_from_tensors([("a", &a)], DType::F32).unwrap();
        let bf = wire_from_tensors([("b", &b)], DType::BF16).unwrap();
        wire.descs.extend(bf.descs);
        wire.body.extend(bf.body);
        let empty = TensorDesc { name: "empty".into(), dtype: DType::F32, shape: vec![0, 3] };
        wire.descs.push(empty);
        let frame = encode_frame(&CoordinatorMessage::Ack(Ack { round: 3 }), &wire).unwrap();
        let limits = FrameLimits::default();
        let (_, plain) = decode_frame::<CoordinatorMessage>(&frame, &limits).unwrap();
        let (expected, _) = tensors_from_wire(&plain).unwrap();
        let (_, decoded, _) =
            decode_frame_into::<CoordinatorMessage, _>(&frame, &limits, TorchSink::default()).unwrap();
        assert!(decoded.all_finite);
        assert_eq!(decoded.wire_bytes, plain.body.len() as u64);
        assert_eq!(decoded.tensors.len(), expected.len());
        for ((name, got), (want_name, want)) in decoded.tensors.iter().zip(&expected) {
            assert_eq!(name, want_name);
            assert!(got.equal(want), "{name}");
        }
    }

    #[test]
    fn a_sink_with_allowed_tensors_refuses_strangers_and_larger_shapes_from_the_header() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]);
        let frame = |name: &str, tensor: &Tensor| {
            encode_frame(
                &CoordinatorMessage::Ack(Ack { round: 1 }),
                &wire_from_tensors([(name, tensor)], DType::F32).unwrap(),
            )
            .unwrap()
        };
        let allowed = std::sync::Arc::new(AllowedTensors::from([("a".to_string(), vec![2, 2])]));
        let sink = || TorchSink { allowed: Some(allowed.clone()) };
        let limits = FrameLimits::default();
        assert!(decode_frame_into::<CoordinatorMessage, _>(&frame("a", &t), &limits, sink()).is_ok());
        let smaller = Tensor::from_slice(&[1.0f32, 2.0]).reshape([1, 2]);
        assert!(decode_frame_into::<CoordinatorMessage, _>(&frame("a", &smaller), &limits, sink()).is_ok());
        let error = decode_frame_into::<CoordinatorMessage, _>(&frame("b", &t), &limits, sink()).unwrap_err();
        assert!(error.to_string().contains("not part of the global adapter"), "{error}");
        let larger = Tensor::zeros([3, 2], (Kind::Float, tch::Device::Cpu));
        let error = decode_frame_into::<CoordinatorMessage, _>(&frame("a", &larger), &limits, sink()).unwrap_err();
        assert!(error.to_string().contains("beyond the global adapter's [2, 2]"), "{error}");
    }
}
