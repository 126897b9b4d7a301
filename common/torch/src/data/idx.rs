//! MNIST-style directories as tensors: the IDX files themselves are read by `flotilla_data::idx`.

use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

use tch::{Kind, Tensor};

use flotilla_data::idx::idx_path;
pub use flotilla_data::idx::{read_idx, IdxArray, Split, DEBIAN_FASHION_MNIST};

use super::{DataError, Dataset};

fn err(path: &Path, message: impl Into<String>) -> DataError {
    DataError { path: path.to_path_buf(), message: message.into() }
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

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        flotilla_data::idx::encode_idx(&IdxArray {
            dims: dims.iter().map(|&d| d as usize).collect(),
            data: data.to_vec(),
        })
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
