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
            let shape: Vec<i64> = desc
                .shape
                .iter()
                .map(|&d| i64::try_from(d).map_err(|_| invalid(format!("dimension {d} too large"))))
                .collect::<Result<_, _>>()?;
            let tensor = Tensor::f_from_data_size(bytes, &shape, desc.dtype.kind())
                .and_then(|t| t.f_to_kind(Kind::Float))
                .map_err(|source| TensorError::Torch { name: desc.name.clone(), source })?;
            out.push((desc.name.clone(), tensor));
        }
        if offset != self.body.len() {
            return Err(TensorError::Invalid {
                name: "<body>".into(),
                message: format!("{} bytes beyond the declared tensors", self.body.len() - offset),
            });
        }
        Ok(out)
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
