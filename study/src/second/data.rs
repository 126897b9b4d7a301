//! The study's data, written where the coordinator and the simulator read it: a text task's
//! training texts split into device data and validation (JSONL), and Fashion-MNIST rotated by 90°
//! (IDX).

use std::io::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use flotilla_data::idx::{encode_idx, read_idx, IdxArray, DEBIAN_FASHION_MNIST};
use flotilla_data::text::{load_text, TextExample, TextSplit};

use super::{Task, TaskKind, PUBLIC_IMAGES, VALIDATION_PERCENT};

pub(super) fn bucket(key: &str) -> u64 {
    // FNV-1a of a salted key: independent of the data set's own test split.
    flotilla_data::hash::fnv1a(format!("validation/{key}").as_bytes())
}

fn write_jsonl(path: &Path, examples: &[&TextExample], labels: &[&str]) -> Result<()> {
    let mut sorted = examples.to_vec();
    // Hash order: the first `eval_samples` of an evaluation file are a seeded sample of it.
    sorted.sort_by_key(|e| bucket(&e.key).rotate_left(17));
    let tmp = path.with_extension("jsonl.tmp");
    let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for example in sorted {
        let line = serde_json::json!({ "text": example.text, "label": labels[example.label] });
        writeln!(file, "{line}")?;
    }
    file.flush()?;
    drop(file);
    flotilla_files::commit(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Text: `<work>/data/<task>/{tune,final}`, each with `train.jsonl` (the devices' texts, the same
/// in both) and `test.jsonl` (the validation split, or the data set's test split).
fn prepare_texts(task: &Task, source: &str, labels: &[&str], work: &Path) -> Result<()> {
    let dir = work.join("data").join(task.key);
    if dir.join("tune/test.jsonl").is_file() && dir.join("final/test.jsonl").is_file() {
        return Ok(());
    }
    let source = flotilla_data::cache::root().join(source);
    let owned: Vec<String> = labels.iter().map(|l| l.to_string()).collect();
    let missing = || format!("cannot read {} (run: bash deploy/fetch-text-assets.sh)", source.display());
    let train = load_text(&source, &owned, TextSplit::Train).with_context(missing)?;
    let test = load_text(&source, &owned, TextSplit::Test).with_context(missing)?;
    let (validation, devices): (Vec<&TextExample>, Vec<&TextExample>) =
        train.examples.iter().partition(|e| bucket(&e.key) % 100 < VALIDATION_PERCENT);
    for phase in ["tune", "final"] {
        std::fs::create_dir_all(dir.join(phase))?;
        write_jsonl(&dir.join(phase).join("train.jsonl"), &devices, labels)?;
    }
    write_jsonl(&dir.join("tune/test.jsonl"), &validation, labels)?;
    write_jsonl(&dir.join("final/test.jsonl"), &test.examples.iter().collect::<Vec<_>>(), labels)?;
    eprintln!(
        "{}: {} device texts, {} validation, {} test",
        task.key,
        devices.len(),
        validation.len(),
        test.examples.len()
    );
    Ok(())
}

/// The image rotated by 90° clockwise: output pixel (r, c) is input pixel (size − 1 − c, r).
pub fn rotate90(image: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size * size];
    for r in 0..size {
        for c in 0..size {
            out[r * size + c] = image[(size - 1 - c) * size + r];
        }
    }
    out
}

fn write_idx(path: &Path, array: &IdxArray) -> Result<()> {
    let bytes = encode_idx(array);
    flotilla_files::write_atomically(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}

/// Images: `<work>/data/<task>/`, an IDX directory whose training images are rotated, and whose
/// test images are upright for the first 5,000 (the public data the base is pretrained on) and
/// rotated after (validation 5,000–7,499, test 7,500–9,999).
fn prepare_rotated(task: &Task, work: &Path) -> Result<()> {
    let dir = work.join("data").join(task.key);
    if dir.join("t10k-labels-idx1-ubyte").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    let source = Path::new(DEBIAN_FASHION_MNIST);
    for (prefix, upright) in [("train", 0usize), ("t10k", PUBLIC_IMAGES)] {
        let images = read_idx(&source.join(format!("{prefix}-images-idx3-ubyte.gz")), 3)
            .with_context(|| format!("Fashion-MNIST in {} (Debian's dataset-fashion-mnist)", source.display()))?;
        let labels = read_idx(&source.join(format!("{prefix}-labels-idx1-ubyte.gz")), 1)?;
        let (n, size) = (images.dims[0], images.dims[1]);
        anyhow::ensure!(images.dims[2] == size, "{prefix} images are not square");
        let mut data = Vec::with_capacity(images.data.len());
        for (i, image) in images.data.chunks_exact(size * size).enumerate().take(n) {
            if i < upright {
                data.extend_from_slice(image);
            } else {
                data.extend(rotate90(image, size));
            }
        }
        write_idx(&dir.join(format!("{prefix}-images-idx3-ubyte")), &IdxArray { dims: images.dims.clone(), data })?;
        write_idx(&dir.join(format!("{prefix}-labels-idx1-ubyte")), &labels)?;
    }
    eprintln!("{}: rotated Fashion-MNIST written to {}", task.key, dir.display());
    Ok(())
}

pub fn prepare_data(task: &Task, work: &Path) -> Result<()> {
    match &task.kind {
        TaskKind::Text { source, labels, .. } | TaskKind::Headlines { source, labels, .. } => {
            prepare_texts(task, source, labels, work)
        }
        TaskKind::RotatedImages => prepare_rotated(task, work),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_validation_split_is_stable_and_about_its_share() {
        let keys: Vec<String> = (0..4000).map(|i| format!("business/{i:03}.txt")).collect();
        let held = keys.iter().filter(|k| bucket(k) % 100 < VALIDATION_PERCENT).count();
        assert!((480..720).contains(&held), "{held} of 4000");
        assert_eq!(bucket("a"), bucket("a"));
    }

    #[test]
    fn rotation_by_90_degrees_turns_rows_into_columns() {
        // 3 × 3: 0 1 2 / 3 4 5 / 6 7 8 → clockwise: 6 3 0 / 7 4 1 / 8 5 2.
        let image: Vec<u8> = (0..9).collect();
        assert_eq!(rotate90(&image, 3), vec![6, 3, 0, 7, 4, 1, 8, 5, 2]);
        let four = (0..4).fold(image.clone(), |img, _| rotate90(&img, 3));
        assert_eq!(four, image);
    }
}
