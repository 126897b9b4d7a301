//! A GGUF file opened for reading: the parsed header over the file's mapped bytes.

use std::path::Path;

use crate::dequant::dequantize_into;
use crate::error::{GgufError, Result};
use crate::parse::{parse_header, Header};
use crate::tensor::TensorInfo;
use crate::value::Metadata;

pub struct GgufFile {
    header: Header,
    bytes: Box<dyn AsRef<[u8]> + Send + Sync>,
}

/// A tensor read as f32, with its row-major (PyTorch) shape.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseTensor {
    pub shape: Vec<i64>,
    pub values: Vec<f32>,
}

impl GgufFile {
    /// Maps the file and parses its header. The file must not change while it is open (the model
    /// cache is written once, by digest).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |source| GgufError::Io { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and the cache never rewrites a file in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::from_bytes(Box::new(map))
    }

    pub fn from_bytes(bytes: Box<dyn AsRef<[u8]> + Send + Sync>) -> Result<GgufFile> {
        let header = parse_header((*bytes).as_ref())?;
        Ok(GgufFile { header, bytes })
    }

    pub fn version(&self) -> u32 {
        self.header.version
    }

    pub fn metadata(&self) -> &Metadata {
        &self.header.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Result<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name).ok_or_else(|| GgufError::MissingTensor(name.to_string()))
    }

    /// The tensor's bytes as stored (placement was checked when the file was opened).
    pub fn tensor_bytes(&self, name: &str) -> Result<(&TensorInfo, &[u8])> {
        let info = self.tensor_info(name)?;
        let len = info.byte_len()?;
        let start = (self.header.data_start + info.offset) as usize;
        Ok((info, &(*self.bytes).as_ref()[start..start + len as usize]))
    }

    /// The tensor dequantized to f32.
    pub fn tensor_f32(&self, name: &str) -> Result<DenseTensor> {
        let (info, bytes) = self.tensor_bytes(name)?;
        let mut values = vec![0f32; info.element_count() as usize];
        dequantize_into(info.kind()?, bytes, &mut values);
        Ok(DenseTensor { shape: info.shape(), values })
    }
}
