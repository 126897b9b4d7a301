//! Writes GGUF files: the test suites' tiny decoders, and fixtures for the reader's own tests.

use crate::tensor::TensorType;
use crate::value::{Metadata, Value};

/// One tensor to write: its name, ggml-order dims, type, and its bytes in that type
/// ([`crate::quantize`] makes them from f32).
pub struct TensorToWrite {
    pub name: String,
    pub dims: Vec<u64>,
    pub kind: TensorType,
    pub bytes: Vec<u8>,
}

const ALIGNMENT: usize = 32;

/// The whole file (version 3, alignment 32).
pub fn write_gguf(metadata: &Metadata, tensors: &[TensorToWrite]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.entries.len() as u64).to_le_bytes());
    for (key, value) in &metadata.entries {
        write_string(&mut out, key);
        out.extend_from_slice(&value.type_code().to_le_bytes());
        write_value(&mut out, value);
    }
    let mut offset = 0usize;
    for tensor in tensors {
        write_string(&mut out, &tensor.name);
        out.extend_from_slice(&(tensor.dims.len() as u32).to_le_bytes());
        for dim in &tensor.dims {
            out.extend_from_slice(&dim.to_le_bytes());
        }
        out.extend_from_slice(&tensor.kind.code().to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + tensor.bytes.len()).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    pad(&mut out);
    for tensor in tensors {
        out.extend_from_slice(&tensor.bytes);
        pad(&mut out);
    }
    out
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
}

fn write_string(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn write_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(u8::from(*v)),
        Value::String(s) => write_string(out, s),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Array(items) => {
            // An empty array is written as an array of u8 (it has no item to take the type from).
            let item_type = items.first().map_or(0, Value::type_code);
            out.extend_from_slice(&item_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, item);
            }
        }
    }
}
