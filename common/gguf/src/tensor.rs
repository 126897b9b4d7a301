//! Tensor descriptions: the quantization types Flotilla reads and how many bytes each takes.

use crate::error::{GgufError, Result};

/// The ggml tensor types Flotilla reads. Others are refused by name when their data is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl TensorType {
    pub fn from_code(code: u32) -> Option<TensorType> {
        match code {
            0 => Some(TensorType::F32),
            1 => Some(TensorType::F16),
            2 => Some(TensorType::Q4_0),
            3 => Some(TensorType::Q4_1),
            8 => Some(TensorType::Q8_0),
            _ => None,
        }
    }

    pub fn code(self) -> u32 {
        match self {
            TensorType::F32 => 0,
            TensorType::F16 => 1,
            TensorType::Q4_0 => 2,
            TensorType::Q4_1 => 3,
            TensorType::Q8_0 => 8,
        }
    }

    /// (weights per block, bytes per block).
    pub fn block(self) -> (u64, u64) {
        match self {
            TensorType::F32 => (1, 4),
            TensorType::F16 => (1, 2),
            TensorType::Q4_0 => (32, 18),
            TensorType::Q4_1 => (32, 20),
            TensorType::Q8_0 => (32, 34),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TensorType::F32 => "F32",
            TensorType::F16 => "F16",
            TensorType::Q4_0 => "Q4_0",
            TensorType::Q4_1 => "Q4_1",
            TensorType::Q8_0 => "Q8_0",
        }
    }
}

/// One tensor as the file describes it. `dims` is in ggml order (the fastest-varying first), so a
/// PyTorch `[out, in]` weight has `dims == [in, out]`; [`TensorInfo::shape`] gives the PyTorch order.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    /// The raw type code; [`TensorInfo::kind`] says whether Flotilla reads it.
    pub type_code: u32,
    /// Offset of the tensor's bytes from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn element_count(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Row-major (PyTorch) shape: the ggml dims reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }

    pub fn kind(&self) -> Result<TensorType> {
        TensorType::from_code(self.type_code)
            .ok_or_else(|| GgufError::UnsupportedTensorType { name: self.name.clone(), kind: self.type_code })
    }

    /// Bytes of data, for a type Flotilla reads; the element count must fill whole blocks.
    pub fn byte_len(&self) -> Result<u64> {
        let kind = self.kind()?;
        let (per_block, block_bytes) = kind.block();
        let count = self.element_count();
        let row = self.dims.first().copied().unwrap_or(0);
        if !row.is_multiple_of(per_block) {
            return Err(GgufError::BadTensor {
                name: self.name.clone(),
                problem: format!("rows of {row} elements do not fill whole {} blocks of {per_block}", kind.name()),
            });
        }
        Ok(count / per_block * block_bytes)
    }
}
