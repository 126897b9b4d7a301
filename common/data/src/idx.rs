//! The IDX format (MNIST, Fashion-MNIST): `00 00 <type> <ndims>`, `ndims` big-endian u32 sizes,
//! then the data. Files may be gzip-compressed. Only unsigned bytes (type 0x08) are read.
//!
//! Untrusted files: the declared sizes are bounded before anything is allocated, and the data must
//! be exactly as long as they say (a truncated or over-long file is an error naming the file).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;

use crate::DataError;

/// Largest IDX payload accepted (1 GiB): bounds what a corrupt header can make us allocate.
const MAX_IDX_BYTES: u64 = 1 << 30;
pub const UNSIGNED_BYTE: u8 = 0x08;

/// Which half of an MNIST-style directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn prefix(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// The default location of Debian's `dataset-fashion-mnist` package.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// An IDX array of unsigned bytes: its dimensions and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

fn err(path: &Path, message: impl Into<String>) -> DataError {
    DataError { path: path.to_path_buf(), message: message.into() }
}

/// Reads an IDX file (plain or `.gz`) with `expected_dims` dimensions.
pub fn read_idx(path: &Path, expected_dims: usize) -> Result<IdxArray, DataError> {
    let file = File::open(path).map_err(|e| err(path, e.to_string()))?;
    let is_gzip = path.extension().is_some_and(|e| e == "gz");
    let reader: Box<dyn Read> =
        if is_gzip { Box::new(GzDecoder::new(BufReader::new(file))) } else { Box::new(BufReader::new(file)) };
    read_idx_from(reader, path, expected_dims)
}

fn read_idx_from(mut reader: impl Read, path: &Path, expected_dims: usize) -> Result<IdxArray, DataError> {
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            err(path, "file is truncated")
        } else {
            err(path, format!("cannot read: {e}"))
        }
    };
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic).map_err(io)?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(err(path, "not an IDX file (bad magic number)"));
    }
    if magic[2] != UNSIGNED_BYTE {
        return Err(err(path, format!("unsupported IDX element type 0x{:02x} (only unsigned bytes)", magic[2])));
    }
    let ndims = magic[3] as usize;
    if ndims != expected_dims {
        return Err(err(path, format!("has {ndims} dimensions, expected {expected_dims}")));
    }
    let mut dims = Vec::with_capacity(ndims);
    let mut total: u64 = 1;
    for _ in 0..ndims {
        let mut size = [0u8; 4];
        reader.read_exact(&mut size).map_err(io)?;
        let d = u32::from_be_bytes(size);
        total = total.saturating_mul(u64::from(d));
        dims.push(d as usize);
    }
    if total > MAX_IDX_BYTES {
        return Err(err(path, format!("declares {total} bytes of data, more than the {MAX_IDX_BYTES} accepted")));
    }
    let mut data = vec![0u8; total as usize];
    reader.read_exact(&mut data).map_err(io)?;
    let mut probe = [0u8; 1];
    match reader.read(&mut probe) {
        Ok(0) => {}
        Ok(_) => return Err(err(path, format!("has bytes beyond the {total} its header declares"))),
        Err(e) => return Err(io(e)),
    }
    Ok(IdxArray { dims, data })
}

/// `<prefix>-<kind>-ubyte`, gzip-compressed or plain, whichever exists (the gzip name is reported
/// when neither does).
pub fn idx_path(dir: &Path, split: Split, kind: &str) -> PathBuf {
    let plain = dir.join(format!("{}-{kind}-ubyte", split.prefix()));
    let gz = dir.join(format!("{}-{kind}-ubyte.gz", split.prefix()));
    if !gz.exists() && plain.exists() {
        plain
    } else {
        gz
    }
}

/// `array` in the IDX format (unsigned bytes).
pub fn encode_idx(array: &IdxArray) -> Vec<u8> {
    let mut out = vec![0, 0, UNSIGNED_BYTE, array.dims.len() as u8];
    for &d in &array.dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(&array.data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        encode_idx(&IdxArray { dims: dims.iter().map(|&d| d as usize).collect(), data: data.to_vec() })
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn what_is_encoded_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a-ubyte");
        let array = IdxArray { dims: vec![2, 3], data: (0..6).collect() };
        std::fs::write(&path, encode_idx(&array)).unwrap();
        assert_eq!(read_idx(&path, 2).unwrap(), array);
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file() {
        let check = |bytes: Vec<u8>, dims: usize, mentions: &str| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x-ubyte");
            std::fs::write(&path, bytes).unwrap();
            let e = read_idx(&path, dims).unwrap_err().to_string();
            assert!(e.contains("x-ubyte") && e.contains(mentions), "{e}");
        };
        check(idx_bytes(&[2, 2, 2], &[0; 7]), 3, "truncated");
        check(idx_bytes(&[2], &[0; 3]), 1, "beyond");
        check(vec![1, 2, 3, 4], 1, "magic");
        check(vec![0, 0, 0x0d, 1, 0, 0, 0, 1], 1, "element type");
        check(idx_bytes(&[2, 2], &[0; 4]), 3, "dimensions");
        check(idx_bytes(&[u32::MAX, u32::MAX, 2], &[]), 3, "more than");
        check(vec![0, 0], 1, "truncated");
        // A gzip file whose stream is cut short.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("y-ubyte.gz");
        let full = gzip(&idx_bytes(&[100], &[1; 100]));
        std::fs::write(&path, &full[..full.len() / 2]).unwrap();
        assert!(read_idx(&path, 1).unwrap_err().to_string().contains("y-ubyte.gz"));
    }
}
