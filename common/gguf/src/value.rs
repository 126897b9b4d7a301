//! Metadata values as GGUF types them, and typed access that says what it expected.

use crate::error::{GgufError, Result};

/// One metadata value. Arrays keep their element type so that an empty array is still typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// GGUF's value type codes.
pub(crate) mod code {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl Value {
    /// An integer of any width that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(items) => Some(items),
            _ => None,
        }
    }

    pub(crate) fn type_code(&self) -> u32 {
        match self {
            Value::U8(_) => code::U8,
            Value::I8(_) => code::I8,
            Value::U16(_) => code::U16,
            Value::I16(_) => code::I16,
            Value::U32(_) => code::U32,
            Value::I32(_) => code::I32,
            Value::F32(_) => code::F32,
            Value::Bool(_) => code::BOOL,
            Value::String(_) => code::STRING,
            Value::Array(_) => code::ARRAY,
            Value::U64(_) => code::U64,
            Value::I64(_) => code::I64,
            Value::F64(_) => code::F64,
        }
    }
}

/// The metadata of one file, in file order, with lookups that fail with the key's name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    pub entries: Vec<(String, Value)>,
}

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| GgufError::MissingMetadata(key.to_string()))
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        let value = self.require(key)?;
        value.as_u64().ok_or_else(|| wrong(key, "a non-negative integer", value))
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        let value = self.require(key)?;
        value.as_f64().ok_or_else(|| wrong(key, "a number", value))
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        let value = self.require(key)?;
        value.as_str().ok_or_else(|| wrong(key, "a string", value))
    }

    /// An array of strings (a tokenizer's tokens or merges).
    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let value = self.require(key)?;
        let items = value.as_array().ok_or_else(|| wrong(key, "an array of strings", value))?;
        items.iter().map(|item| item.as_str().ok_or_else(|| wrong(key, "an array of strings", value))).collect()
    }

    /// An array of integers (a tokenizer's token types).
    pub fn integers(&self, key: &str) -> Result<Vec<i64>> {
        let value = self.require(key)?;
        let items = value.as_array().ok_or_else(|| wrong(key, "an array of integers", value))?;
        items
            .iter()
            .map(|item| match *item {
                Value::I32(v) => Ok(v.into()),
                Value::I64(v) => Ok(v),
                _ => item
                    .as_u64()
                    .and_then(|v| i64::try_from(v).ok())
                    .ok_or_else(|| wrong(key, "an array of integers", value)),
            })
            .collect()
    }
}

fn wrong(key: &str, expected: &str, found: &Value) -> GgufError {
    let found = match found {
        Value::Array(items) => format!("an array of {} item(s)", items.len()),
        Value::String(_) => "a string".to_string(),
        other => format!("{other:?}"),
    };
    GgufError::BadMetadata { key: key.to_string(), problem: format!("expected {expected}, found {found}") }
}
