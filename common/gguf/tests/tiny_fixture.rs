//! The tiny decoder the system tests run (`tests/fixtures/tiny-llama.gguf`) is exactly what
//! `flotilla_gguf::tiny::tiny_llama(7, Q4_1)` writes, so the committed file cannot drift from the
//! code. `FLOTILLA_WRITE_FIXTURES=1 cargo test -p flotilla-gguf --test tiny_fixture` rewrites it.

use std::path::PathBuf;

use flotilla_gguf::{tiny::tiny_llama, GgufFile, LlamaSpec, TensorType};

#[test]
fn the_committed_tiny_decoder_is_the_one_the_code_writes() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama.gguf");
    let bytes = tiny_llama(7, TensorType::Q4_1);
    if std::env::var_os("FLOTILLA_WRITE_FIXTURES").is_some() {
        std::fs::write(&path, &bytes).unwrap();
    }
    let committed = std::fs::read(&path).expect("tests/fixtures/tiny-llama.gguf");
    assert!(committed == bytes, "{} differs from tiny_llama(7, Q4_1); rewrite it (see the header)", path.display());
    let file = GgufFile::open(&path).unwrap();
    let spec = LlamaSpec::from_file(&file).unwrap();
    assert_eq!((spec.layers, spec.hidden, spec.heads, spec.kv_heads), (2, 64, 4, 2));
}
