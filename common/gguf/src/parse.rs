//! The GGUF header, metadata and tensor infos, parsed from the file's bytes. Every count and
//! length is checked against the limits and against the bytes that remain before anything is
//! allocated, so a hostile file costs at most its own size.

use crate::error::{GgufError, Result};
use crate::tensor::TensorInfo;
use crate::value::{code, Metadata, Value};

pub const MAX_TENSORS: u64 = 1 << 16;
pub const MAX_METADATA_ENTRIES: u64 = 1 << 16;
pub const MAX_STRING_BYTES: u64 = 1 << 24;
pub const MAX_ARRAY_ITEMS: u64 = 1 << 24;
pub const MAX_DIMS: u32 = 4;
pub const MAX_ELEMENTS: u64 = 1 << 36;
/// Arrays of arrays are allowed this deep, no deeper.
const MAX_NESTING: u32 = 2;
const DEFAULT_ALIGNMENT: u64 = 32;

/// Everything before the tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    /// Where the data section starts, from the start of the file.
    pub data_start: u64,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let remaining = (self.bytes.len() - self.at) as u64;
        if n > remaining {
            return Err(GgufError::Truncated {
                what: what.to_string(),
                offset: self.at as u64,
                needed: n,
                len: self.bytes.len() as u64,
            });
        }
        let slice = &self.bytes[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(slice)
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.at) as u64
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N as u64, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        limit(&format!("the length of {what}"), len, MAX_STRING_BYTES)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| GgufError::NotUtf8(what.to_string()))
    }
}

fn limit(what: &str, value: u64, max: u64) -> Result<()> {
    if value > max {
        return Err(GgufError::OverLimit { what: what.to_string(), value, limit: max });
    }
    Ok(())
}

/// Parses the header of a whole GGUF file held in memory (or mapped).
pub fn parse_header(bytes: &[u8]) -> Result<Header> {
    let mut cursor = Cursor { bytes, at: 0 };
    let magic: [u8; 4] = cursor.array("the magic")?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic { found: magic });
    }
    let version = cursor.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::UnsupportedVersion(version));
    }
    let tensor_count = cursor.u64("the tensor count")?;
    limit("the tensor count", tensor_count, MAX_TENSORS)?;
    let entry_count = cursor.u64("the metadata count")?;
    limit("the metadata count", entry_count, MAX_METADATA_ENTRIES)?;

    let mut metadata = Metadata::default();
    for _ in 0..entry_count {
        let key = cursor.string("a metadata key")?;
        let kind = cursor.u32(&format!("the type of {key:?}"))?;
        let value = read_value(&mut cursor, kind, &key, 0)?;
        metadata.entries.push((key, value));
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(value) => match value.as_u64() {
            Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
            _ => {
                return Err(GgufError::BadMetadata {
                    key: "general.alignment".into(),
                    problem: format!("{value:?} is not a power of two up to 65536"),
                })
            }
        },
    };

    let mut tensors = Vec::with_capacity(tensor_count.min(cursor.remaining() / 24) as usize);
    for index in 0..tensor_count {
        tensors.push(read_tensor_info(&mut cursor, index)?);
    }
    let data_start = (cursor.at as u64).div_ceil(alignment) * alignment;
    let header = Header { version, metadata, tensors, data_start };
    check_tensor_placement(&header, bytes.len() as u64, alignment)?;
    Ok(header)
}

fn read_value(cursor: &mut Cursor, kind: u32, key: &str, depth: u32) -> Result<Value> {
    let what = |t: &str| format!("{t} of {key:?}");
    Ok(match kind {
        code::U8 => Value::U8(cursor.array::<1>(&what("the value"))?[0]),
        code::I8 => Value::I8(i8::from_le_bytes(cursor.array(&what("the value"))?)),
        code::U16 => Value::U16(u16::from_le_bytes(cursor.array(&what("the value"))?)),
        code::I16 => Value::I16(i16::from_le_bytes(cursor.array(&what("the value"))?)),
        code::U32 => Value::U32(cursor.u32(&what("the value"))?),
        code::I32 => Value::I32(i32::from_le_bytes(cursor.array(&what("the value"))?)),
        code::F32 => Value::F32(f32::from_le_bytes(cursor.array(&what("the value"))?)),
        code::BOOL => match cursor.array::<1>(&what("the value"))?[0] {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            other => return Err(GgufError::BadMetadata { key: key.into(), problem: format!("boolean byte {other}") }),
        },
        code::STRING => Value::String(cursor.string(&what("the string"))?),
        code::U64 => Value::U64(cursor.u64(&what("the value"))?),
        code::I64 => Value::I64(i64::from_le_bytes(cursor.array(&what("the value"))?)),
        code::F64 => Value::F64(f64::from_le_bytes(cursor.array(&what("the value"))?)),
        code::ARRAY => {
            if depth >= MAX_NESTING {
                return Err(GgufError::BadMetadata { key: key.into(), problem: "arrays nested too deep".into() });
            }
            let item_kind = cursor.u32(&what("the array's item type"))?;
            let len = cursor.u64(&what("the array's length"))?;
            limit(&what("the length"), len, MAX_ARRAY_ITEMS)?;
            // Every item takes at least one byte, so a length beyond the remaining bytes is a lie.
            let mut items = Vec::with_capacity(len.min(cursor.remaining()) as usize);
            for _ in 0..len {
                items.push(read_value(cursor, item_kind, key, depth + 1)?);
            }
            Value::Array(items)
        }
        other => return Err(GgufError::UnknownValueType(other)),
    })
}

fn read_tensor_info(cursor: &mut Cursor, index: u64) -> Result<TensorInfo> {
    let name = cursor.string(&format!("the name of tensor {index}"))?;
    let n_dims = cursor.u32(&format!("the rank of {name:?}"))?;
    if n_dims == 0 || n_dims > MAX_DIMS {
        return Err(GgufError::BadTensor { name, problem: format!("{n_dims} dimensions (1 to {MAX_DIMS} allowed)") });
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    let mut elements: u64 = 1;
    for _ in 0..n_dims {
        let dim = cursor.u64(&format!("a dimension of {name:?}"))?;
        elements = elements.checked_mul(dim).filter(|&e| e <= MAX_ELEMENTS).ok_or_else(|| GgufError::BadTensor {
            name: name.clone(),
            problem: format!("more than {MAX_ELEMENTS} elements"),
        })?;
        dims.push(dim);
    }
    if elements == 0 {
        return Err(GgufError::BadTensor { name, problem: "a dimension is 0".into() });
    }
    let type_code = cursor.u32(&format!("the type of {name:?}"))?;
    let offset = cursor.u64(&format!("the offset of {name:?}"))?;
    Ok(TensorInfo { name, dims, type_code, offset })
}

/// Each readable tensor lies inside the file, aligned, and no two tensors share a name.
fn check_tensor_placement(header: &Header, file_len: u64, alignment: u64) -> Result<()> {
    let mut names = std::collections::HashSet::new();
    for tensor in &header.tensors {
        let bad = |problem: String| GgufError::BadTensor { name: tensor.name.clone(), problem };
        if !names.insert(tensor.name.as_str()) {
            return Err(bad("the name appears twice".into()));
        }
        if tensor.offset % alignment != 0 {
            return Err(bad(format!("offset {} is not aligned to {alignment}", tensor.offset)));
        }
        if tensor.kind().is_err() {
            continue; // refused by name when its data is asked for
        }
        let len = tensor.byte_len()?;
        let end = header.data_start.checked_add(tensor.offset).and_then(|start| start.checked_add(len));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(GgufError::Truncated {
                    what: format!("the data of tensor {:?}", tensor.name),
                    offset: header.data_start.saturating_add(tensor.offset),
                    needed: len,
                    len: file_len,
                })
            }
        }
    }
    Ok(())
}
