//! The frame: how one message and its tensors are laid out on a stream.
//!
//! ```text
//! u32 LE   header length H            (≤ limits.max_header_bytes)
//! H bytes  bincode(FrameHeader<M>)    (decoded with a byte limit; no trailing bytes)
//! body     raw little-endian tensor bytes, in descriptor order
//! <FIN>    the stream ends exactly here: any extra byte is an error
//! ```
//!
//! Every length is checked against [`FrameLimits`] before anything is allocated, and the body length
//! must equal what the declared shapes and dtypes imply.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::tensor::{
    all_finite_bytes, bf16_tensor_from_le_bytes, f32_storage_mut, DType, DecodedTensors, FloatBits, TensorDesc,
    WireTensors,
};

/// Upper bound on any header, whatever the configuration says.
pub const HARD_MAX_HEADER_BYTES: u32 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FrameLimits {
    pub max_header_bytes: u32,
    pub max_tensors: u32,
    pub max_tensor_dims: u32,
    pub max_body_bytes: u64,
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits { max_header_bytes: 1 << 20, max_tensors: 4096, max_tensor_dims: 4, max_body_bytes: 1 << 30 }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct FrameHeader<M> {
    message: M,
    tensors: Vec<TensorDesc>,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream ended before the frame was complete")]
    Truncated,
    #[error("frame header of {got} bytes exceeds the limit of {limit}")]
    HeaderTooLarge { got: u32, limit: u32 },
    #[error("frame header is malformed: {0}")]
    BadHeader(String),
    #[error("frame header has {0} trailing bytes")]
    HeaderTrailingBytes(usize),
    #[error("frame declares {got} tensors, limit is {limit}")]
    TooManyTensors { got: usize, limit: u32 },
    #[error("tensor '{name}' has {dims} dimensions, limit is {limit}")]
    TooManyDims { name: String, dims: usize, limit: u32 },
    #[error("frame body of {got} bytes exceeds the limit of {limit}")]
    BodyTooLarge { got: u64, limit: u64 },
    #[error("declared tensor sizes overflow")]
    SizeOverflow,
    #[error("bytes after the end of the frame")]
    TrailingBytes,
    #[error("{0}")]
    Tensor(String),
    #[error("cannot encode frame: {0}")]
    Encode(String),
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ HARD_MAX_HEADER_BYTES as usize }>()
}

/// The length prefix and the encoded header of a frame.
fn encode_header<M: Serialize>(message: &M, tensors: &WireTensors) -> Result<Vec<u8>, FrameError> {
    encode_header_for(message, &tensors.descs)
}

fn encode_header_for<M: Serialize>(message: &M, descs: &[TensorDesc]) -> Result<Vec<u8>, FrameError> {
    let header = FrameHeader { message, tensors: descs.to_vec() };
    let mut out = vec![0u8; 4];
    bincode::serde::encode_into_std_write(&header, &mut out, bincode_config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let header_len = u32::try_from(out.len() - 4)
        .ok()
        .filter(|&l| l <= HARD_MAX_HEADER_BYTES)
        .ok_or_else(|| FrameError::Encode(format!("header of {} bytes is too large", out.len() - 4)))?;
    out[..4].copy_from_slice(&header_len.to_le_bytes());
    Ok(out)
}

/// Serialises a frame into one buffer (header + body).
pub fn encode_frame<M: Serialize>(message: &M, tensors: &WireTensors) -> Result<Vec<u8>, FrameError> {
    let mut out = encode_header(message, tensors)?;
    out.extend_from_slice(&tensors.body);
    Ok(out)
}

pub async fn write_frame<W, M>(writer: &mut W, message: &M, tensors: &WireTensors) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: Serialize,
{
    writer.write_all(&encode_header(message, tensors)?).await?;
    writer.write_all(&tensors.body).await?;
    Ok(())
}

/// Tensors encoded once and sent to many peers (a round's adapter slices): the body is
/// reference-counted, and [`write_frame_shared`] hands it to QUIC without copying it, so the
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

/// [`write_frame`] for a QUIC stream and a shared body: the header is written (copied, it is
/// small), the body is queued by reference.
pub async fn write_frame_shared<M: Serialize>(
    send: &mut quinn::SendStream,
    message: &M,
    tensors: &SharedTensors,
) -> Result<(), FrameError> {
    send.write_all(&encode_header_for(message, &tensors.descs)?).await.map_err(std::io::Error::from)?;
    send.write_chunk(tensors.body.clone()).await.map_err(std::io::Error::from)?;
    Ok(())
}

/// Reads one frame and checks that the stream ends right after it.
pub async fn read_frame<R, M>(reader: &mut R, limits: &FrameLimits) -> Result<(M, WireTensors), FrameError>
where
    R: AsyncRead + Unpin,
    M: DeserializeOwned,
{
    let (message, descs, body_len) = read_header(reader, limits).await?;
    let mut body = vec![0u8; body_len];
    read_exact(reader, &mut body).await?;
    let mut probe = [0u8; 1];
    if reader.read(&mut probe).await? != 0 {
        return Err(FrameError::TrailingBytes);
    }
    Ok((message, WireTensors { descs, body }))
}

/// Like [`read_frame`], but each f32 tensor's bytes are read straight into the storage of a new
/// tensor and checked finite while still in cache: no body buffer and no second copy. This is how
/// the coordinator receives updates.
pub async fn read_frame_decoded<R, M>(reader: &mut R, limits: &FrameLimits) -> Result<(M, DecodedTensors), FrameError>
where
    R: AsyncRead + Unpin,
    M: DeserializeOwned,
{
    let (message, descs, body_len) = read_header::<_, M>(reader, limits).await?;
    let mut decoded =
        DecodedTensors { tensors: Vec::with_capacity(descs.len()), all_finite: true, wire_bytes: body_len as u64 };
    for desc in descs {
        let tensor_error = |e: crate::tensor::TensorError| FrameError::Tensor(e.to_string());
        let shape = desc.shape_i64().map_err(tensor_error)?;
        let len = desc.byte_len().and_then(|l| usize::try_from(l).ok()).ok_or(FrameError::SizeOverflow)?;
        let tensor = match desc.dtype {
            DType::F32 => {
                let tensor = tch::Tensor::f_empty(shape.as_slice(), (tch::Kind::Float, tch::Device::Cpu))
                    .map_err(|e| FrameError::Tensor(format!("tensor '{}': libtorch: {e}", desc.name)))?;
                if len > 0 {
                    // SAFETY: a fresh, contiguous, non-empty f32 CPU tensor that nothing else
                    // references; it holds exactly `len` bytes (numel × 4 = the declared length).
                    let values = unsafe { f32_storage_mut(&tensor) };
                    for chunk in values.chunks_mut(16 << 10) {
                        // SAFETY: any bytes are a valid f32; the byte view covers the chunk exactly.
                        let bytes =
                            unsafe { std::slice::from_raw_parts_mut(chunk.as_mut_ptr() as *mut u8, chunk.len() * 4) };
                        read_exact(reader, bytes).await?;
                        if cfg!(target_endian = "big") {
                            for v in chunk.iter_mut() {
                                *v = f32::from_bits(u32::from_le(v.to_bits()));
                            }
                        }
                        decoded.all_finite &= all_finite_bytes(bytes, FloatBits::F32);
                    }
                }
                tensor
            }
            DType::BF16 => {
                let mut bytes = vec![0u8; len];
                read_exact(reader, &mut bytes).await?;
                let (tensor, finite) = bf16_tensor_from_le_bytes(&desc.name, &bytes, &shape).map_err(tensor_error)?;
                decoded.all_finite &= finite;
                tensor
            }
        };
        decoded.tensors.push((desc.name, tensor));
    }
    let mut probe = [0u8; 1];
    if reader.read(&mut probe).await? != 0 {
        return Err(FrameError::TrailingBytes);
    }
    Ok((message, decoded))
}

/// Reads the length prefix and the header: the message, the descriptors and the body length.
async fn read_header<R, M>(reader: &mut R, limits: &FrameLimits) -> Result<(M, Vec<TensorDesc>, usize), FrameError>
where
    R: AsyncRead + Unpin,
    M: DeserializeOwned,
{
    let mut len_bytes = [0u8; 4];
    read_exact(reader, &mut len_bytes).await?;
    let header_len = check_header_len(len_bytes, limits)?;
    let mut header_bytes = vec![0u8; header_len];
    read_exact(reader, &mut header_bytes).await?;
    parse_header(&header_bytes, limits)
}

/// Decodes one frame held whole in memory, with the same checks as [`read_frame`].
pub fn decode_frame<M: DeserializeOwned>(bytes: &[u8], limits: &FrameLimits) -> Result<(M, WireTensors), FrameError> {
    let len_bytes = bytes.get(..4).ok_or(FrameError::Truncated)?;
    let header_len = check_header_len([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]], limits)?;
    let header = bytes.get(4..4 + header_len).ok_or(FrameError::Truncated)?;
    let (message, descs, body_len) = parse_header(header, limits)?;
    let rest = &bytes[4 + header_len..];
    match rest.len().cmp(&body_len) {
        std::cmp::Ordering::Less => Err(FrameError::Truncated),
        std::cmp::Ordering::Greater => Err(FrameError::TrailingBytes),
        std::cmp::Ordering::Equal => Ok((message, WireTensors { descs, body: rest.to_vec() })),
    }
}

fn check_header_len(len_bytes: [u8; 4], limits: &FrameLimits) -> Result<usize, FrameError> {
    let header_len = u32::from_le_bytes(len_bytes);
    let header_limit = limits.max_header_bytes.min(HARD_MAX_HEADER_BYTES);
    if header_len > header_limit {
        return Err(FrameError::HeaderTooLarge { got: header_len, limit: header_limit });
    }
    Ok(header_len as usize)
}

/// The message, the descriptors and the body length they imply.
fn parse_header<M: DeserializeOwned>(
    header_bytes: &[u8],
    limits: &FrameLimits,
) -> Result<(M, Vec<TensorDesc>, usize), FrameError> {
    let (header, used): (FrameHeader<M>, usize) = bincode::serde::decode_from_slice(header_bytes, bincode_config())
        .map_err(|e| FrameError::BadHeader(e.to_string()))?;
    if used != header_bytes.len() {
        return Err(FrameError::HeaderTrailingBytes(header_bytes.len() - used));
    }
    let body_len = check_descriptors(&header.tensors, limits)?;
    let body_len = usize::try_from(body_len).map_err(|_| FrameError::SizeOverflow)?;
    Ok((header.message, header.tensors, body_len))
}

/// Validates the descriptors against the limits and returns the body length they imply.
pub fn check_descriptors(descs: &[TensorDesc], limits: &FrameLimits) -> Result<u64, FrameError> {
    if descs.len() > limits.max_tensors as usize {
        return Err(FrameError::TooManyTensors { got: descs.len(), limit: limits.max_tensors });
    }
    for desc in descs {
        if desc.shape.len() > limits.max_tensor_dims as usize {
            return Err(FrameError::TooManyDims {
                name: desc.name.clone(),
                dims: desc.shape.len(),
                limit: limits.max_tensor_dims,
            });
        }
    }
    let body_len = WireTensors::declared_body_len(descs).ok_or(FrameError::SizeOverflow)?;
    if body_len > limits.max_body_bytes {
        return Err(FrameError::BodyTooLarge { got: body_len, limit: limits.max_body_bytes });
    }
    usize::try_from(body_len).map_err(|_| FrameError::SizeOverflow)?;
    Ok(body_len)
}

async fn read_exact<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Ack, CoordinatorMessage};
    use crate::tensor::DType;

    fn sample() -> (CoordinatorMessage, WireTensors) {
        let msg = CoordinatorMessage::Ack(Ack { round: 7 });
        let tensors = WireTensors {
            descs: vec![TensorDesc { name: "t".into(), dtype: DType::F32, shape: vec![2, 2] }],
            body: (0u8..16).collect(),
        };
        (msg, tensors)
    }

    async fn read(bytes: &[u8], limits: &FrameLimits) -> Result<(CoordinatorMessage, WireTensors), FrameError> {
        let mut reader = bytes;
        read_frame(&mut reader, limits).await
    }

    #[tokio::test]
    async fn round_trip() {
        let (msg, tensors) = sample();
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg, &tensors).await.unwrap();
        assert_eq!(buf, encode_frame(&msg, &tensors).unwrap());
        let (got, got_tensors) = read(&buf, &FrameLimits::default()).await.unwrap();
        assert_eq!(got, msg);
        assert_eq!(got_tensors, tensors);
    }

    #[tokio::test]
    async fn every_truncation_is_an_error() {
        let (msg, tensors) = sample();
        let buf = encode_frame(&msg, &tensors).unwrap();
        for cut in 0..buf.len() {
            assert!(read(&buf[..cut], &FrameLimits::default()).await.is_err(), "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn trailing_bytes_are_rejected() {
        let (msg, tensors) = sample();
        let mut buf = encode_frame(&msg, &tensors).unwrap();
        buf.push(0);
        assert!(matches!(read(&buf, &FrameLimits::default()).await, Err(FrameError::TrailingBytes)));
    }

    #[tokio::test]
    async fn limits_are_checked_before_allocating() {
        let (msg, tensors) = sample();
        let buf = encode_frame(&msg, &tensors).unwrap();
        let tight = FrameLimits { max_body_bytes: 15, ..FrameLimits::default() };
        assert!(matches!(read(&buf, &tight).await, Err(FrameError::BodyTooLarge { .. })));
        let tiny_header = FrameLimits { max_header_bytes: 3, ..FrameLimits::default() };
        assert!(matches!(read(&buf, &tiny_header).await, Err(FrameError::HeaderTooLarge { .. })));
        // A header that claims a 4 TiB tensor is refused without allocating it.
        let huge = WireTensors {
            descs: vec![TensorDesc { name: "t".into(), dtype: DType::F32, shape: vec![1 << 40] }],
            body: vec![],
        };
        let buf = encode_frame(&msg, &huge).unwrap();
        assert!(matches!(read(&buf, &FrameLimits::default()).await, Err(FrameError::BodyTooLarge { .. })));
    }

    proptest::proptest! {
        /// Whatever bytes arrive, decoding ends in a value or an error, never a panic, and never
        /// allocates more than the limits allow (a huge allocation would abort the test).
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let limits = FrameLimits { max_body_bytes: 1 << 20, ..FrameLimits::default() };
            let _ = decode_frame::<crate::protocol::DeviceMessage>(&bytes, &limits);
            let _ = decode_frame::<CoordinatorMessage>(&bytes, &limits);
        }

        /// Corrupting any byte of a valid frame, or cutting it anywhere, gives an error or a frame,
        /// and the async reader agrees with the in-memory decoder.
        #[test]
        fn mutated_frames_never_panic(index in 0usize..64, value in proptest::prelude::any::<u8>(), cut in 0usize..80) {
            let (msg, tensors) = sample();
            let mut buf = encode_frame(&msg, &tensors).unwrap();
            let i = index % buf.len();
            buf[i] = value;
            buf.truncate(cut.min(buf.len()));
            let limits = FrameLimits::default();
            let in_memory = decode_frame::<CoordinatorMessage>(&buf, &limits);
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let streamed = runtime.block_on(read(&buf, &limits));
            proptest::prop_assert_eq!(in_memory.is_ok(), streamed.is_ok());
            if let (Ok(a), Ok(b)) = (in_memory, streamed) {
                proptest::prop_assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn the_in_memory_decoder_matches_the_stream_reader() {
        let (msg, tensors) = sample();
        let buf = encode_frame(&msg, &tensors).unwrap();
        let (got, got_tensors) = decode_frame::<CoordinatorMessage>(&buf, &FrameLimits::default()).unwrap();
        assert_eq!((got, got_tensors), (msg, tensors));
        let mut long = buf.clone();
        long.push(1);
        assert!(matches!(
            decode_frame::<CoordinatorMessage>(&long, &FrameLimits::default()),
            Err(FrameError::TrailingBytes)
        ));
        assert!(matches!(
            decode_frame::<CoordinatorMessage>(&buf[..buf.len() - 1], &FrameLimits::default()),
            Err(FrameError::Truncated)
        ));
    }

    #[tokio::test]
    async fn garbage_headers_are_errors_not_panics() {
        let mut buf = 13u32.to_le_bytes().to_vec();
        buf.extend_from_slice(&[0xff; 13]);
        assert!(read(&buf, &FrameLimits::default()).await.is_err());
    }
}
