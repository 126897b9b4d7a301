//! The reader against files the writer makes, and against every kind of broken file.

use flotilla_gguf::{quantize, write_gguf, GgufError, GgufFile, Metadata, TensorToWrite, TensorType, Value};
use proptest::prelude::*;

fn sample_values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 % 257) as f32 - 128.0) / 64.0).collect()
}

fn sample_file() -> Vec<u8> {
    let metadata = Metadata {
        entries: vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.block_count".into(), Value::U32(2)),
            ("llama.rope.freq_base".into(), Value::F32(10000.0)),
            ("tokenizer.ggml.tokens".into(), Value::Array(vec![Value::String("a".into()), Value::String("é".into())])),
            ("tokenizer.ggml.token_type".into(), Value::Array(vec![Value::I32(1), Value::I32(3)])),
            ("flag".into(), Value::Bool(true)),
        ],
    };
    let tensors = [TensorType::F32, TensorType::F16, TensorType::Q4_0, TensorType::Q4_1, TensorType::Q8_0]
        .into_iter()
        .map(|kind| TensorToWrite {
            name: format!("t.{}", kind.name()),
            dims: vec![64, 3],
            kind,
            bytes: quantize(kind, &sample_values(192)),
        })
        .collect::<Vec<_>>();
    write_gguf(&metadata, &tensors)
}

fn open(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(Box::new(bytes))
}

#[test]
fn a_written_file_reads_back_with_its_metadata_and_tensors() {
    let file = open(sample_file()).expect("valid file");
    assert_eq!(file.version(), 3);
    let metadata = file.metadata();
    assert_eq!(metadata.str("general.architecture").unwrap(), "llama");
    assert_eq!(metadata.u64("llama.block_count").unwrap(), 2);
    assert_eq!(metadata.f64("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(metadata.strings("tokenizer.ggml.tokens").unwrap(), ["a", "é"]);
    assert_eq!(metadata.integers("tokenizer.ggml.token_type").unwrap(), [1, 3]);
    assert_eq!(file.tensors().len(), 5);
    let exact = file.tensor_f32("t.F32").unwrap();
    assert_eq!(exact.shape, [3, 64]);
    assert_eq!(exact.values, sample_values(192));
    for (name, tolerance) in [("t.F16", 1e-3), ("t.Q8_0", 0.02), ("t.Q4_1", 0.2), ("t.Q4_0", 0.3)] {
        let tensor = file.tensor_f32(name).unwrap();
        let worst = tensor.values.iter().zip(sample_values(192)).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= tolerance, "{name}: worst error {worst}");
    }
}

#[test]
fn typed_lookups_name_the_key_and_what_was_expected() {
    let file = open(sample_file()).unwrap();
    let error = file.metadata().u64("general.architecture").unwrap_err().to_string();
    assert!(error.contains("general.architecture") && error.contains("integer"), "{error}");
    let error = file.metadata().u64("llama.context_length").unwrap_err().to_string();
    assert!(error.contains("llama.context_length"), "{error}");
    let error = file.tensor_f32("output.weight").unwrap_err().to_string();
    assert!(error.contains("output.weight"), "{error}");
}

#[test]
fn a_wrong_magic_is_named() {
    let mut bytes = sample_file();
    bytes[..4].copy_from_slice(b"GGML");
    assert!(matches!(open(bytes), Err(GgufError::BadMagic { .. })));
}

#[test]
fn truncated_tensor_data_is_refused_at_open_naming_the_tensor() {
    let mut bytes = sample_file();
    bytes.truncate(bytes.len() - 40);
    let error = open(bytes).err().expect("refused").to_string();
    assert!(error.contains("t.Q8_0") && error.contains("ends early"), "{error}");
}

#[test]
fn an_unknown_quantization_type_is_refused_when_read_by_name() {
    let metadata = Metadata::default();
    let tensor = TensorToWrite { name: "w".into(), dims: vec![32], kind: TensorType::F32, bytes: vec![0; 128] };
    let mut bytes = write_gguf(&metadata, &[tensor]);
    // The type code follows the name (8 + 1 bytes), the rank (4) and one dimension (8).
    let at = 24 + 9 + 4 + 8;
    bytes[at..at + 4].copy_from_slice(&12u32.to_le_bytes()); // Q4_K
    let file = open(bytes).expect("the header itself is fine");
    let error = file.tensor_f32("w").unwrap_err().to_string();
    assert!(error.contains("\"w\"") && error.contains("quantization type 12"), "{error}");
}

#[test]
fn a_shape_that_does_not_fill_whole_blocks_is_refused() {
    let tensor = TensorToWrite { name: "w".into(), dims: vec![33], kind: TensorType::Q8_0, bytes: vec![0; 68] };
    let error = open(write_gguf(&Metadata::default(), &[tensor])).err().expect("refused").to_string();
    assert!(error.contains("\"w\"") && error.contains("whole Q8_0 blocks"), "{error}");
}

#[test]
fn huge_counts_are_refused_before_anything_is_allocated() {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.extend_from_slice(&1u64.to_le_bytes());
    bytes.push(b'k');
    bytes.extend_from_slice(&9u32.to_le_bytes()); // array
    bytes.extend_from_slice(&8u32.to_le_bytes()); // of strings
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let error = open(bytes).err().expect("refused").to_string();
    assert!(error.contains("limit"), "{error}");

    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(open(bytes), Err(GgufError::OverLimit { .. })));
}

#[test]
fn an_unsupported_version_is_named() {
    let mut bytes = sample_file();
    bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(open(bytes), Err(GgufError::UnsupportedVersion(1))));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_prefix_of_a_valid_file_is_an_error_or_a_file_never_a_panic(cut in 0usize..2000) {
        let bytes = sample_file();
        let cut = cut.min(bytes.len());
        let _ = open(bytes[..cut].to_vec());
    }

    #[test]
    fn flipped_bytes_never_panic(positions in proptest::collection::vec((0usize..1200, any::<u8>()), 1..8)) {
        let mut bytes = sample_file();
        for (at, value) in positions {
            let at = at % bytes.len();
            bytes[at] = value;
        }
        if let Ok(file) = open(bytes) {
            for info in file.tensors().to_vec() {
                let _ = file.tensor_f32(&info.name);
            }
        }
    }
}
