//! The network side's file helpers: the sha256 by which checkpoint files travel, and (re-exported
//! from `flotilla_files`, their one home) atomic, durable file replacement.

use std::fs;
use std::io;
use std::path::Path;

pub use flotilla_files::{commit, temporary_beside, write_atomically};

/// The sha256 of a file in lower-case hex (what `sha256sum` prints): the digest by which a base
/// checkpoint's files travel (`protocol::CheckpointFile`).
pub fn sha256_file(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut file = fs::File::open(path)?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        context.update(&buffer[..n]);
    }
    Ok(context.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect())
}
