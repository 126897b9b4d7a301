//! Feeds arbitrary bytes to the GGUF reader as a model file: opening it must give a file or an
//! error, never panic and never allocate beyond its limits, and every tensor of a file it accepts
//! must dequantize or be refused by name. This crate does not link libtorch.
#![no_main]

use flotilla_gguf::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(file) = GgufFile::from_bytes(Box::new(bytes.to_vec())) {
        let names: Vec<String> = file.tensors().iter().map(|t| t.name.clone()).collect();
        for name in names {
            let _ = file.tensor_f32(&name);
        }
    }
});
