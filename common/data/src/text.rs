//! Labelled texts from disk, in one of three layouts:
//!
//! - a directory of class folders, `<dir>/<label>/*.txt`, one text per file (BBC News as shipped);
//! - a CSV file with a header naming `text` and `label` columns, or a JSONL file of
//!   `{"text": ..., "label": ...}` objects;
//! - a directory holding `train.csv` / `train.jsonl` and `test.csv` / `test.jsonl`: the split's file.
//!
//! Without a train/test pair, an example is held out for testing when the FNV-1a hash of its key
//! (`<label>/<file>` or `<file name>:<line>`) falls in the lowest 20 of 100 buckets: a split that
//! every device and the coordinator compute alike, and that does not depend on file order.
//!
//! A label outside the configured ones, an empty text or an unreadable file is an error naming the
//! file (and line). A file that is not valid UTF-8 is decoded lossily and reported in `lossy_files`.

use std::path::{Path, PathBuf};

use crate::DataError;

/// Percent of the examples held out for testing when the data has no split of its own.
pub const TEST_PERCENT: u64 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextSplit {
    Train,
    Test,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextExample {
    /// Identifies the example in the data set (`business/001.txt`, `reviews.csv:17`).
    pub key: String,
    pub text: String,
    /// Index into the configured labels.
    pub label: usize,
}

#[derive(Debug, Default)]
pub struct TextCorpus {
    pub examples: Vec<TextExample>,
    /// Files that were not valid UTF-8 and were decoded with replacement characters.
    pub lossy_files: Vec<PathBuf>,
}

impl TextCorpus {
    pub fn texts(&self) -> Vec<&str> {
        self.examples.iter().map(|e| e.text.as_str()).collect()
    }

    pub fn labels(&self) -> Vec<i64> {
        self.examples.iter().map(|e| e.label as i64).collect()
    }
}

fn fail(path: &Path, message: impl Into<String>) -> DataError {
    DataError { path: path.to_path_buf(), message: message.into() }
}

/// The `split` of the labelled texts at `path`, in a stable order (by key).
pub fn load_text(path: &Path, labels: &[String], split: TextSplit) -> Result<TextCorpus, DataError> {
    let corpus = if path.is_file() {
        hash_split(read_table(path, labels)?, split)
    } else if path.is_dir() {
        let name = match split {
            TextSplit::Train => "train",
            TextSplit::Test => "test",
        };
        let split_file = ["csv", "jsonl"].iter().map(|ext| path.join(format!("{name}.{ext}"))).find(|p| p.is_file());
        let has_split_files =
            ["train.csv", "train.jsonl", "test.csv", "test.jsonl"].iter().any(|f| path.join(f).is_file());
        match split_file {
            Some(file) => read_table(&file, labels)?,
            None if has_split_files => return Err(fail(path, format!("has no {name}.csv or {name}.jsonl"))),
            None => hash_split(read_class_folders(path, labels)?, split),
        }
    } else {
        return Err(fail(path, "no such file or directory"));
    };
    if corpus.examples.is_empty() {
        return Err(fail(path, "holds no examples for this split"));
    }
    Ok(corpus)
}

/// Whether `key` is held out for testing.
pub fn is_test_key(key: &str) -> bool {
    crate::hash::fnv1a(key.as_bytes()) % 100 < TEST_PERCENT
}

fn hash_split(mut corpus: TextCorpus, split: TextSplit) -> TextCorpus {
    corpus.examples.retain(|e| is_test_key(&e.key) == (split == TextSplit::Test));
    corpus
}

fn label_index(labels: &[String], label: &str, path: &Path, place: &str) -> Result<usize, DataError> {
    labels.iter().position(|l| l == label).ok_or_else(|| {
        fail(path, format!("{place}label '{label}' is not one of the configured labels ({})", labels.join(", ")))
    })
}

fn read_class_folders(dir: &Path, labels: &[String]) -> Result<TextCorpus, DataError> {
    let mut corpus = TextCorpus::default();
    let entries = std::fs::read_dir(dir).map_err(|e| fail(dir, e.to_string()))?;
    let mut folders: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    folders.sort();
    if folders.is_empty() {
        return Err(fail(dir, "is neither a directory of class folders nor holds train/test files"));
    }
    for folder in folders {
        let label_name = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let label = label_index(labels, &label_name, &folder, "folder ")?;
        let mut files: Vec<PathBuf> = std::fs::read_dir(&folder)
            .map_err(|e| fail(&folder, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        for file in files {
            let bytes = std::fs::read(&file).map_err(|e| fail(&file, e.to_string()))?;
            let text = match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => {
                    corpus.lossy_files.push(file.clone());
                    String::from_utf8_lossy(e.as_bytes()).into_owned()
                }
            };
            let text = text.trim().to_string();
            if text.is_empty() {
                return Err(fail(&file, "the text is empty"));
            }
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            corpus.examples.push(TextExample { key: format!("{label_name}/{name}"), text, label });
        }
    }
    Ok(corpus)
}

fn read_table(path: &Path, labels: &[String]) -> Result<TextCorpus, DataError> {
    let bytes = std::fs::read(path).map_err(|e| fail(path, e.to_string()))?;
    let mut corpus = TextCorpus::default();
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            corpus.lossy_files.push(path.to_path_buf());
            String::from_utf8_lossy(e.as_bytes()).into_owned()
        }
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let rows = match path.extension().and_then(|e| e.to_str()) {
        Some("csv") => csv_rows(path, &text)?,
        Some("jsonl") => jsonl_rows(path, &text)?,
        _ => return Err(fail(path, "expected a .csv or .jsonl file")),
    };
    for (line, text, label) in rows {
        let label = label_index(labels, label.trim(), path, &format!("line {line}: "))?;
        let text = text.trim().to_string();
        if text.is_empty() {
            return Err(fail(path, format!("line {line}: the text is empty")));
        }
        corpus.examples.push(TextExample { key: format!("{name}:{line}"), text, label });
    }
    Ok(corpus)
}

/// `(line, text, label)` of every record of a CSV file with `text` and `label` columns.
fn csv_rows(path: &Path, text: &str) -> Result<Vec<(u64, String, String)>, DataError> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| fail(path, format!("unreadable CSV header: {e}")))?.clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim() == name)
            .ok_or_else(|| fail(path, format!("the CSV header has no '{name}' column (it needs 'text' and 'label')")))
    };
    let (text_column, label_column) = (column("text")?, column("label")?);
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| fail(path, format!("unreadable CSV record: {e}")))?;
        let line = record.position().map_or(0, |p| p.line());
        let field = |i: usize| record.get(i).unwrap_or_default().to_string();
        rows.push((line, field(text_column), field(label_column)));
    }
    Ok(rows)
}

/// `(line, text, label)` of every non-blank line of a JSONL file.
fn jsonl_rows(path: &Path, text: &str) -> Result<Vec<(u64, String, String)>, DataError> {
    #[derive(serde::Deserialize)]
    struct Row {
        text: String,
        label: serde_json::Value,
    }
    let mut rows = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_number = index as u64 + 1;
        let row: Row = serde_json::from_str(line)
            .map_err(|e| fail(path, format!("line {line_number}: expected {{\"text\": ..., \"label\": ...}}: {e}")))?;
        let label = match row.label {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        rows.push((line_number, row.text, label));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        vec!["neg".into(), "pos".into()]
    }

    #[test]
    fn every_layout_reads_and_the_hash_split_is_disjoint_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let folders = dir.path().join("folders");
        for (label, n) in [("neg", 30), ("pos", 30)] {
            std::fs::create_dir_all(folders.join(label)).unwrap();
            for i in 0..n {
                std::fs::write(folders.join(label).join(format!("{i:03}.txt")), format!("{label} text {i}\n")).unwrap();
            }
        }
        std::fs::write(folders.join("neg").join("bad.txt"), b"caf\xe9 latte").unwrap();
        let train = load_text(&folders, &labels(), TextSplit::Train).unwrap();
        let test = load_text(&folders, &labels(), TextSplit::Test).unwrap();
        assert_eq!(train.examples.len() + test.examples.len(), 61);
        assert!(!test.examples.is_empty() && test.examples.len() < 25);
        assert!(train.examples.iter().all(|e| !test.examples.iter().any(|t| t.key == e.key)));
        assert_eq!(train.lossy_files, [folders.join("neg").join("bad.txt")], "the non-UTF-8 file is reported");

        let csv = dir.path().join("reviews.csv");
        std::fs::write(&csv, "id,text,label\n1,\"good, really\",pos\n2,bad,neg\n3,fine,pos\n").unwrap();
        let all: Vec<String> = [TextSplit::Train, TextSplit::Test]
            .iter()
            .filter_map(|s| load_text(&csv, &labels(), *s).ok())
            .flat_map(|c| c.examples.into_iter().map(|e| e.text))
            .collect();
        assert_eq!(all.len(), 3);
        assert!(all.contains(&"good, really".to_string()));

        let split = dir.path().join("split");
        std::fs::create_dir_all(&split).unwrap();
        std::fs::write(
            split.join("train.jsonl"),
            "{\"text\": \"a\", \"label\": \"pos\"}\n\n{\"text\": \"b\", \"label\": \"neg\"}\n",
        )
        .unwrap();
        std::fs::write(split.join("test.jsonl"), "{\"text\": \"c\", \"label\": \"pos\"}\n").unwrap();
        let train = load_text(&split, &labels(), TextSplit::Train).unwrap();
        assert_eq!(train.labels(), [1, 0]);
        assert_eq!(load_text(&split, &labels(), TextSplit::Test).unwrap().texts(), ["c"]);
    }

    #[test]
    fn bad_texts_and_labels_are_errors_naming_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("d.csv");
        std::fs::write(&csv, "text,label\nhello,pos\nhi,maybe\n").unwrap();
        let err = read_table(&csv, &labels()).unwrap_err().to_string();
        assert!(err.contains("d.csv") && err.contains("line 3") && err.contains("'maybe'"), "{err}");
        std::fs::write(&csv, "text,label\n  ,pos\n").unwrap();
        assert!(read_table(&csv, &labels()).unwrap_err().to_string().contains("the text is empty"));
        std::fs::write(&csv, "body,label\nx,pos\n").unwrap();
        assert!(read_table(&csv, &labels()).unwrap_err().to_string().contains("no 'text' column"));
        let jsonl = dir.path().join("d.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"x\"}\n").unwrap();
        assert!(read_table(&jsonl, &labels()).unwrap_err().to_string().contains("line 1"));
        let folders = dir.path().join("f");
        std::fs::create_dir_all(folders.join("other")).unwrap();
        let err = load_text(&folders, &labels(), TextSplit::Train).unwrap_err().to_string();
        assert!(err.contains("folder label 'other'"), "{err}");
        assert!(load_text(&dir.path().join("none"), &labels(), TextSplit::Train).is_err());
    }
}
