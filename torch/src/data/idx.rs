//! The IDX format (MNIST, Fashion-MNIST): `00 00 <type> <ndims>`, `ndims` big-endian u32 sizes,
//! then the data. Files may be gzip-compressed. Only unsigned bytes (type 0x08) are read.
//!
//! Untrusted files: the declared sizes are bounded before anything is allocated, and the data must
//! be exactly as long as they say (a truncated or over-long file is an error naming the file).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use tch::{Kind, Tensor};

use super::{DataError, Dataset};

/// Largest IDX payload accepted (1 GiB): bounds what a corrupt header can make us allocate.
const MAX_IDX_BYTES: u64 = 1 << 30;
const UNSIGNED_BYTE: u8 = 0x08;

/// Which half of an MNIST-style directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    fn prefix(self) -> &'static str {
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
fn idx_path(dir: &Path, split: Split, kind: &str) -> PathBuf {
    let plain = dir.join(format!("{}-{kind}-ubyte", split.prefix()));
    let gz = dir.join(format!("{}-{kind}-ubyte.gz", split.prefix()));
    if !gz.exists() && plain.exists() {
        plain
    } else {
        gz
    }
}

/// Images and labels of one split of an MNIST-style directory: features `N × (rows·cols)` scaled to
/// [0, 1], labels in `0..classes`.
pub fn load_split(dir: &Path, split: Split, classes: usize) -> Result<Dataset, DataError> {
    let images_path = idx_path(dir, split, "images-idx3");
    let labels_path = idx_path(dir, split, "labels-idx1");
    let images = read_idx(&images_path, 3)?;
    let labels = read_idx(&labels_path, 1)?;
    let (n, rows, cols) = (images.dims[0], images.dims[1], images.dims[2]);
    if labels.dims[0] != n {
        return Err(err(
            &labels_path,
            format!("has {} labels but {} has {n} images", labels.dims[0], images_path.display()),
        ));
    }
    if let Some(bad) = labels.data.iter().find(|&&l| l as usize >= classes) {
        return Err(err(&labels_path, format!("label {bad} is outside 0..{classes}")));
    }
    let pixels: Vec<f32> = images.data.iter().map(|&p| f32::from(p) / 255.0).collect();
    let features = Tensor::from_slice(&pixels).reshape([n as i64, (rows * cols) as i64]);
    let labels = Tensor::from_slice(&labels.data).to_kind(Kind::Int64);
    Ok(Dataset::new(features, labels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, UNSIGNED_BYTE, dims.len() as u8];
        for d in dims {
            out.extend_from_slice(&d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    fn write_split(dir: &Path, n: u32, labels: &[u8], gz: bool) {
        let images = idx_bytes(&[n, 2, 2], &(0..n * 4).map(|i| (i % 256) as u8).collect::<Vec<_>>());
        let labels = idx_bytes(&[labels.len() as u32], labels);
        let (images, labels, ext) = if gz { (gzip(&images), gzip(&labels), ".gz") } else { (images, labels, "") };
        std::fs::write(dir.join(format!("train-images-idx3-ubyte{ext}")), images).unwrap();
        std::fs::write(dir.join(format!("train-labels-idx1-ubyte{ext}")), labels).unwrap();
    }

    #[test]
    fn plain_and_gzip_files_load_the_same() {
        for gz in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            write_split(dir.path(), 3, &[0, 2, 1], gz);
            let data = load_split(dir.path(), Split::Train, 3).unwrap();
            assert_eq!(data.features.size(), vec![3, 4]);
            assert_eq!(Vec::<i64>::try_from(&data.labels).unwrap(), vec![0, 2, 1]);
            assert!((data.features.double_value(&[0, 1]) - 1.0 / 255.0).abs() < 1e-7);
        }
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

    #[test]
    fn mismatched_counts_and_bad_labels_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_split(dir.path(), 3, &[0, 1], false);
        assert!(load_split(dir.path(), Split::Train, 3).unwrap_err().to_string().contains("2 labels"));
        write_split(dir.path(), 2, &[0, 7], false);
        assert!(load_split(dir.path(), Split::Train, 3).unwrap_err().to_string().contains("label 7"));
        let missing = load_split(&dir.path().join("nope"), Split::Test, 3).unwrap_err().to_string();
        assert!(missing.contains("t10k-images-idx3-ubyte.gz"), "{missing}");
    }
}

/// The real Fashion-MNIST files. `bash deploy/test.sh` installs Debian's dataset-fashion-mnist
/// when it is missing; elsewhere point FLOTILLA_FASHION_MNIST at any copy.
#[cfg(test)]
mod real_data {
    use super::*;

    #[test]
    fn fashion_mnist_loads_with_the_published_shapes() {
        let dir = std::env::var_os("FLOTILLA_FASHION_MNIST")
            .map(PathBuf::from)
            .unwrap_or_else(|| DEBIAN_FASHION_MNIST.into());
        assert!(
            dir.join("train-images-idx3-ubyte.gz").exists() || dir.join("train-images-idx3-ubyte").exists(),
            "Fashion-MNIST not found in {}: install Debian's dataset-fashion-mnist (bash deploy/test.sh does) \
             or set FLOTILLA_FASHION_MNIST",
            dir.display()
        );
        let train = load_split(&dir, Split::Train, 10).unwrap();
        let test = load_split(&dir, Split::Test, 10).unwrap();
        assert_eq!(train.features.size(), vec![60_000, 784]);
        assert_eq!(test.features.size(), vec![10_000, 784]);
        // The published set is balanced: 6,000 training and 1,000 test images per class.
        let counts = Vec::<i64>::try_from(train.labels.bincount(None::<Tensor>, 10)).unwrap();
        assert!(counts.iter().all(|&c| c == 6000), "{counts:?}");
        let counts = Vec::<i64>::try_from(test.labels.bincount(None::<Tensor>, 10)).unwrap();
        assert!(counts.iter().all(|&c| c == 1000), "{counts:?}");
        let max = train.features.max().double_value(&[]);
        assert!(max <= 1.0 && max > 0.99);
    }
}
