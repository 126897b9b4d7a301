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

use std::ops::Range;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::tensor::{all_finite_bytes, TensorDesc, WireTensors};

/// Upper bound on any header, whatever the configuration says.
pub const HARD_MAX_HEADER_BYTES: u32 = 4 << 20;

/// Bytes read and checked at a time while a tensor streams in: small enough that the finiteness
/// check reads them while they are still in cache.
const READ_CHUNK: usize = 64 << 10;

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

/// The length prefix and the encoded header of a frame whose tensors `descs` describe.
pub fn encode_header<M: Serialize>(message: &M, descs: &[TensorDesc]) -> Result<Vec<u8>, FrameError> {
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
    let mut out = encode_header(message, &tensors.descs)?;
    out.extend_from_slice(&tensors.body);
    Ok(out)
}

pub async fn write_frame<W, M>(writer: &mut W, message: &M, tensors: &WireTensors) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: Serialize,
{
    writer.write_all(&encode_header(message, &tensors.descs)?).await?;
    writer.write_all(&tensors.body).await?;
    Ok(())
}

/// Where a frame's tensors go as their bytes arrive. The decoder asks the sink for each tensor's
/// storage, reads the tensor's little-endian bytes from the stream straight into it (checking them
/// finite while they are still in cache), then lets the sink finish it: no body buffer and no
/// second copy. The torch side's sink writes into libtorch tensor storage (how the coordinator
/// receives updates); [`BodySink`] collects one plain buffer (how tests and the fuzzer drive the
/// same decoder).
pub trait TensorSink {
    /// A tensor whose bytes are being read.
    type Pending;
    /// What a finished tensor becomes.
    type Tensor;
    /// The frame's tensors as its header declares them (`body_len` bytes in all), before any byte
    /// of the body is read or any storage allocated: a sink that knows what it may receive refuses
    /// the rest here.
    fn admit(&mut self, descs: &[TensorDesc], body_len: usize) -> Result<(), String> {
        let _ = (descs, body_len);
        Ok(())
    }
    /// Storage for the tensor `desc`, `len` bytes (`desc.byte_len()`, within the frame limits).
    fn allocate(&mut self, desc: &TensorDesc, len: usize) -> Result<Self::Pending, String>;
    /// The bytes of `pending` to fill: exactly the `len` given to [`TensorSink::allocate`].
    fn bytes_mut<'a>(&'a mut self, pending: &'a mut Self::Pending) -> &'a mut [u8];
    /// The finished tensor, its bytes filled as they were on the wire (little-endian).
    fn finish(&mut self, desc: TensorDesc, pending: Self::Pending) -> Result<Self::Tensor, String>;
}

/// The tensors of one frame as a sink made them, in descriptor order.
#[derive(Debug, Default)]
pub struct Decoded<T> {
    pub tensors: Vec<T>,
    /// Whether every value was finite (checked while the bytes arrived).
    pub all_finite: bool,
    /// Bytes the tensors took on the wire.
    pub wire_bytes: u64,
    /// Bytes of the whole frame: its length prefix, header and tensors (what the message cost the
    /// sender's uplink).
    pub frame_bytes: u64,
}

/// A sink that lays every tensor's bytes end to end in one buffer: [`WireTensors`].
#[derive(Debug, Default)]
pub struct BodySink {
    body: Vec<u8>,
    /// Bytes of `body` handed out so far.
    filled: usize,
}

impl TensorSink for BodySink {
    type Pending = Range<usize>;
    type Tensor = TensorDesc;

    fn admit(&mut self, _descs: &[TensorDesc], body_len: usize) -> Result<(), String> {
        // Zeroed storage comes from the allocator's zero pages: memory is committed as the bytes
        // arrive, not when a header declares them.
        self.body = vec![0u8; body_len];
        self.filled = 0;
        Ok(())
    }

    fn allocate(&mut self, _desc: &TensorDesc, len: usize) -> Result<Range<usize>, String> {
        let start = self.filled;
        let end =
            start.checked_add(len).filter(|&end| end <= self.body.len()).ok_or("a tensor past the declared body")?;
        self.filled = end;
        Ok(start..end)
    }

    fn bytes_mut<'a>(&'a mut self, pending: &'a mut Range<usize>) -> &'a mut [u8] {
        &mut self.body[pending.clone()]
    }

    fn finish(&mut self, desc: TensorDesc, _pending: Range<usize>) -> Result<TensorDesc, String> {
        Ok(desc)
    }
}

/// Reads one frame and checks that the stream ends right after it.
pub async fn read_frame<R, M>(reader: &mut R, limits: &FrameLimits) -> Result<(M, WireTensors), FrameError>
where
    R: AsyncRead + Unpin,
    M: DeserializeOwned,
{
    let mut sink = BodySink::default();
    let (message, decoded) = read_frame_into(reader, limits, &mut sink).await?;
    Ok((message, WireTensors { descs: decoded.tensors, body: sink.body }))
}

/// The streaming decoder: reads one frame, each tensor's bytes straight into the storage `sink`
/// hands out, and checks that the stream ends right after it. Every length is checked against
/// `limits` before the sink is asked for anything.
pub async fn read_frame_into<R, M, S>(
    reader: &mut R,
    limits: &FrameLimits,
    sink: &mut S,
) -> Result<(M, Decoded<S::Tensor>), FrameError>
where
    R: AsyncRead + Unpin,
    M: DeserializeOwned,
    S: TensorSink,
{
    let (message, descs, body_len, header_len) = read_header::<_, M>(reader, limits).await?;
    sink.admit(&descs, body_len).map_err(FrameError::Tensor)?;
    let mut decoded = Decoded {
        tensors: Vec::with_capacity(descs.len()),
        all_finite: true,
        wire_bytes: body_len as u64,
        frame_bytes: (4 + header_len + body_len) as u64,
    };
    for desc in descs {
        let len = desc.byte_len().and_then(|l| usize::try_from(l).ok()).ok_or(FrameError::SizeOverflow)?;
        let bits = desc.dtype.float_bits();
        let mut pending = sink.allocate(&desc, len).map_err(FrameError::Tensor)?;
        let bytes = sink.bytes_mut(&mut pending);
        if bytes.len() != len {
            return Err(FrameError::Tensor(format!(
                "tensor '{}': the sink gave {} bytes for {len}",
                desc.name,
                bytes.len()
            )));
        }
        for chunk in bytes.chunks_mut(READ_CHUNK) {
            read_exact(reader, chunk).await?;
            decoded.all_finite &= all_finite_bytes(chunk, bits);
        }
        decoded.tensors.push(sink.finish(desc, pending).map_err(FrameError::Tensor)?);
    }
    let mut probe = [0u8; 1];
    if reader.read(&mut probe).await? != 0 {
        return Err(FrameError::TrailingBytes);
    }
    Ok((message, decoded))
}

/// Decodes one frame held whole in memory: the streaming decoder ([`read_frame_into`]) run over
/// the bytes, so the fuzzer and the property tests exercise exactly the code that reads streams.
pub fn decode_frame<M: DeserializeOwned>(bytes: &[u8], limits: &FrameLimits) -> Result<(M, WireTensors), FrameError> {
    decode_frame_into(bytes, limits, BodySink::default())
        .map(|(message, decoded, sink)| (message, WireTensors { descs: decoded.tensors, body: sink.body }))
}

/// [`decode_frame`] with any sink; returns the sink too.
pub fn decode_frame_into<M: DeserializeOwned, S: TensorSink>(
    bytes: &[u8],
    limits: &FrameLimits,
    mut sink: S,
) -> Result<(M, Decoded<S::Tensor>, S), FrameError> {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let mut reader = bytes;
    let result = {
        let future = std::pin::pin!(read_frame_into(&mut reader, limits, &mut sink));
        // Reading from a slice never waits, so one poll completes the future.
        match future.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                Err(FrameError::Io(std::io::Error::other("in-memory decoding unexpectedly waited for input")))
            }
        }
    };
    result.map(|(message, decoded)| (message, decoded, sink))
}

/// Reads the length prefix and the header: the message, the descriptors, the body length and the
/// header's length.
async fn read_header<R, M>(
    reader: &mut R,
    limits: &FrameLimits,
) -> Result<(M, Vec<TensorDesc>, usize, usize), FrameError>
where
    R: AsyncRead + Unpin,
    M: DeserializeOwned,
{
    let mut len_bytes = [0u8; 4];
    read_exact(reader, &mut len_bytes).await?;
    let header_len = check_header_len(len_bytes, limits)?;
    let mut header_bytes = vec![0u8; header_len];
    read_exact(reader, &mut header_bytes).await?;
    let (message, descs, body_len) = parse_header(&header_bytes, limits)?;
    Ok((message, descs, body_len, header_len))
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
        // The decoder says what the frame cost, so nobody re-encodes a message to count it.
        let (_, decoded, _) =
            decode_frame_into::<CoordinatorMessage, _>(&buf, &FrameLimits::default(), BodySink::default()).unwrap();
        assert_eq!(decoded.frame_bytes, buf.len() as u64);
        assert_eq!(decoded.wire_bytes, tensors.body.len() as u64);
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
        /// and a stream that delivers the bytes a few at a time, sometimes making the reader wait,
        /// decodes to exactly what the whole buffer decodes to.
        #[test]
        fn mutated_frames_never_panic(
            index in 0usize..64,
            value in proptest::prelude::any::<u8>(),
            cut in 0usize..80,
            step in 1usize..9,
        ) {
            let (msg, tensors) = sample();
            let mut buf = encode_frame(&msg, &tensors).unwrap();
            let i = index % buf.len();
            buf[i] = value;
            buf.truncate(cut.min(buf.len()));
            let limits = FrameLimits::default();
            let in_memory = decode_frame::<CoordinatorMessage>(&buf, &limits);
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let streamed = runtime.block_on(async {
                let mut reader = Trickle { bytes: &buf, step, wait: false };
                read_frame::<_, CoordinatorMessage>(&mut reader, &limits).await
            });
            proptest::prop_assert_eq!(in_memory.is_ok(), streamed.is_ok());
            if let (Ok(a), Ok(b)) = (in_memory, streamed) {
                proptest::prop_assert_eq!(a, b);
            }
        }
    }

    /// A stream that hands out at most `step` bytes per read and makes every other read wait.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
        wait: bool,
    }

    impl tokio::io::AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.wait = !self.wait;
            if self.wait {
                cx.waker().wake_by_ref();
                return std::task::Poll::Pending;
            }
            let n = self.step.min(self.bytes.len()).min(buf.remaining());
            buf.put_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A sink that records what the decoder asked of it.
    #[derive(Default)]
    struct RecordingSink {
        allocated: Vec<(String, usize)>,
        body: BodySink,
    }

    impl TensorSink for RecordingSink {
        type Pending = Range<usize>;
        type Tensor = TensorDesc;
        fn admit(&mut self, descs: &[TensorDesc], body_len: usize) -> Result<(), String> {
            self.body.admit(descs, body_len)
        }
        fn allocate(&mut self, desc: &TensorDesc, len: usize) -> Result<Range<usize>, String> {
            self.allocated.push((desc.name.clone(), len));
            if desc.name == "refused" {
                return Err("this sink refuses tensors named 'refused'".into());
            }
            self.body.allocate(desc, len)
        }
        fn bytes_mut<'a>(&'a mut self, pending: &'a mut Range<usize>) -> &'a mut [u8] {
            self.body.bytes_mut(pending)
        }
        fn finish(&mut self, desc: TensorDesc, pending: Range<usize>) -> Result<TensorDesc, String> {
            self.body.finish(desc, pending)
        }
    }

    #[test]
    fn the_decoder_asks_the_sink_for_exactly_the_declared_tensors_and_checks_finiteness() {
        let msg = CoordinatorMessage::Ack(Ack { round: 1 });
        let mut body: Vec<u8> = [1.0f32, 2.0, f32::NAN].iter().flat_map(|v| v.to_le_bytes()).collect();
        body.extend_from_slice(&[0x80, 0x3F]);
        let tensors = WireTensors {
            descs: vec![
                TensorDesc { name: "a".into(), dtype: DType::F32, shape: vec![3] },
                TensorDesc { name: "b".into(), dtype: DType::BF16, shape: vec![1, 1] },
            ],
            body,
        };
        let frame = encode_frame(&msg, &tensors).unwrap();
        let (_, decoded, sink) =
            decode_frame_into::<CoordinatorMessage, _>(&frame, &FrameLimits::default(), RecordingSink::default())
                .unwrap();
        assert_eq!(sink.allocated, vec![("a".to_string(), 12), ("b".to_string(), 2)]);
        assert!(!decoded.all_finite, "the NaN is seen while streaming");
        assert_eq!(decoded.wire_bytes, 14);
        assert_eq!(decoded.tensors, tensors.descs);
        // A sink's refusal is an error of the frame, not a panic.
        let refused = WireTensors {
            descs: vec![TensorDesc { name: "refused".into(), dtype: DType::F32, shape: vec![1] }],
            body: vec![0; 4],
        };
        let frame = encode_frame(&msg, &refused).unwrap();
        let result =
            decode_frame_into::<CoordinatorMessage, _>(&frame, &FrameLimits::default(), RecordingSink::default());
        assert!(matches!(result, Err(FrameError::Tensor(_))));
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
