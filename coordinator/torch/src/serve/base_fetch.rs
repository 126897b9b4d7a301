//! Serving a transformer checkpoint's files to devices that lack them, a piece per request
//! (`FetchBase` → `BaseChunk`). Only the files the Welcome named, by name and digest, are served;
//! a request for anything else, or from beyond the file's end, is refused with the reason.

use std::io::SeekFrom;

use anyhow::Context;
use flotilla_wire::framing::write_frame;
use flotilla_wire::protocol::{BaseChunk, CoordinatorMessage, FetchBase, Refusal, BASE_CHUNK_BYTES};
use flotilla_wire::tensor::WireTensors;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::model::base::ServedCheckpoint;

/// Answers one `FetchBase` on its stream, then finishes the stream.
pub(crate) async fn serve(
    send: &mut quinn::SendStream,
    request: &FetchBase,
    served: Option<&ServedCheckpoint>,
) -> anyhow::Result<()> {
    let refuse = |reason: String| CoordinatorMessage::Refusal(Refusal { reason });
    let file = served.and_then(|c| c.files.iter().find(|f| f.name == request.name).map(|f| (c, f)));
    let (checkpoint, file) = match file {
        Some((checkpoint, file)) if file.sha256 == request.sha256 && request.offset <= file.size => (checkpoint, file),
        Some((_, file)) if file.sha256 != request.sha256 => {
            let reason = format!(
                "{} is now sha256 {}, not {}; reconnect for the new base",
                file.name, file.sha256, request.sha256
            );
            return finish_with(send, &refuse(reason)).await;
        }
        Some((_, file)) => {
            let reason = format!("offset {} is past the end of {} ({} bytes)", request.offset, file.name, file.size);
            return finish_with(send, &refuse(reason)).await;
        }
        None => {
            let reason = format!("this coordinator serves no checkpoint file '{}'", request.name);
            return finish_with(send, &refuse(reason)).await;
        }
    };
    let path = checkpoint.dir.join(&file.name);
    let mut source = tokio::fs::File::open(&path).await.with_context(|| format!("cannot open {}", path.display()))?;
    source.seek(SeekFrom::Start(request.offset)).await?;
    let length = (request.length as usize).min(BASE_CHUNK_BYTES).min((file.size - request.offset) as usize);
    let mut bytes = vec![0u8; length];
    source.read_exact(&mut bytes).await.with_context(|| format!("cannot read {}", path.display()))?;
    metrics::counter!("fl_base_bytes_served_total").increment(length as u64);
    let chunk = BaseChunk { offset: request.offset, size: file.size, bytes };
    finish_with(send, &CoordinatorMessage::BaseChunk(chunk)).await
}

async fn finish_with(send: &mut quinn::SendStream, message: &CoordinatorMessage) -> anyhow::Result<()> {
    write_frame(send, message, &WireTensors::default()).await?;
    send.finish()?;
    Ok(())
}
