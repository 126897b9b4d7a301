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

use crate::tensor::{TensorDesc, WireTensors};

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
    let header = FrameHeader { message, tensors: tensors.descs.clone() };
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

/// Reads one frame and checks that the stream ends right after it.
pub async fn read_frame<R, M>(reader: &mut R, limits: &FrameLimits) -> Result<(M, WireTensors), FrameError>
where
    R: AsyncRead + Unpin,
    M: DeserializeOwned,
{
    let mut len_bytes = [0u8; 4];
    read_exact(reader, &mut len_bytes).await?;
    let header_len = u32::from_le_bytes(len_bytes);
    let header_limit = limits.max_header_bytes.min(HARD_MAX_HEADER_BYTES);
    if header_len > header_limit {
        return Err(FrameError::HeaderTooLarge { got: header_len, limit: header_limit });
    }
    let mut header_bytes = vec![0u8; header_len as usize];
    read_exact(reader, &mut header_bytes).await?;
    let (header, used): (FrameHeader<M>, usize) = bincode::serde::decode_from_slice(&header_bytes, bincode_config())
        .map_err(|e| FrameError::BadHeader(e.to_string()))?;
    if used != header_bytes.len() {
        return Err(FrameError::HeaderTrailingBytes(header_bytes.len() - used));
    }
    let body_len = check_descriptors(&header.tensors, limits)?;
    let mut body = vec![0u8; body_len as usize];
    read_exact(reader, &mut body).await?;
    let mut probe = [0u8; 1];
    if reader.read(&mut probe).await? != 0 {
        return Err(FrameError::TrailingBytes);
    }
    Ok((header.message, WireTensors { descs: header.tensors, body }))
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

    #[tokio::test]
    async fn garbage_headers_are_errors_not_panics() {
        let mut buf = 13u32.to_le_bytes().to_vec();
        buf.extend_from_slice(&[0xff; 13]);
        assert!(read(&buf, &FrameLimits::default()).await.is_err());
    }
}
