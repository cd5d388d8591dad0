//! Fetching from the region: manifests (whole or as a delta against one the rack has) and chunk
//! batches — the request of wants, the stream of frames, each payload decoded (raw or a delta
//! against local bases; a chunk's compressed copy is such a delta that uses none of them) and
//! checked against its hash before it is handed on. The chunk is stored raw. What arrives
//! damaged is reported, never written. The engine decides what to fetch and where it goes.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use metalrack_api::images::CatalogueFile;
use metalrack_image_tools::delta::{self, Want};
use metalrack_image_tools::frame::{self, FrameDecoder};
use metalrack_image_tools::manifest::{self, CHUNK_LEN_MAX};
use metalrack_image_tools::Hash;
use tokio::sync::Mutex;

use super::bases::BaseRef;
use crate::region_client::{RegionClient, RegionError};

/// Verified chunk bytes gathered before they are handed to the sink (written and logged in one
/// blocking call): memory stays at one piece per request, and a crash loses at most this much.
const WRITE_PIECE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot talk to the region")]
    Region {
        #[from]
        source: RegionError,
    },
    #[error("the chunk stream from the region broke off")]
    Stream { source: reqwest::Error },
    #[error("the region's chunk stream is malformed: {reason}")]
    Protocol { reason: String },
    #[error("manifest {manifest_id} from the region is invalid: {reason}")]
    Manifest { manifest_id: String, reason: String },
}

/// The region and the rack's credential for it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub client: &'a RegionClient,
    pub authorization: &'a str,
}

/// A chunk to fetch, with the local chunks (if any) the region may send it as a delta against.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub hash: Hash,
    pub len: u32,
    pub bases: Vec<BaseRef>,
}

/// Where verified chunks go (the engine writes them into their files).
pub trait ChunkSink: Sync {
    type Error: From<FetchError> + Send;
    fn write(&self, verified: Vec<(Hash, delta::Chunk)>) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// What one batch brought.
#[derive(Debug, Default)]
pub struct FetchedBatch {
    /// Chunks verified and handed to the sink, and their bytes.
    pub stored: u64,
    pub bytes: u64,
    /// Frame bytes received and request bytes sent.
    pub received: u64,
    pub sent: u64,
    /// Wants whose chunk arrived damaged (did not decode or did not hash right).
    pub damaged: Vec<Wanted>,
    /// `may_continue` said stop before the batch was done; what was verified is kept.
    pub paused: bool,
}

/// Caps the fetch rate: each caller reserves its bytes and sleeps until they fit.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_s: u64,
    next_free: Mutex<tokio::time::Instant>,
}

impl RateLimiter {
    /// None for 0 (no cap).
    pub fn new(bytes_per_s: u64) -> Option<RateLimiter> {
        (bytes_per_s > 0).then(|| RateLimiter { bytes_per_s, next_free: Mutex::new(tokio::time::Instant::now()) })
    }

    async fn take(&self, n_bytes: u64) {
        let cost = Duration::from_secs_f64(n_bytes as f64 / self.bytes_per_s as f64);
        let until = {
            let mut next = self.next_free.lock().await;
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + cost;
            *next
        };
        tokio::time::sleep_until(until).await;
    }
}

/// The bytes of `file`'s manifest from the region, checked against its id. With `base` (the id
/// and bytes of a manifest the rack has), the region may send a delta against it. Returns the
/// manifest's bytes and the bytes received.
pub async fn manifest(
    source: Source<'_>,
    file: &CatalogueFile,
    base: Option<(&str, &[u8])>,
) -> Result<(Vec<u8>, u64), FetchError> {
    let invalid = |reason: String| FetchError::Manifest { manifest_id: file.manifest_id.clone(), reason };
    let (received, is_delta) =
        source.client.manifest(source.authorization, &file.manifest_id, base.map(|(id, _)| id)).await?;
    let received_len = received.len() as u64;
    let bytes = if is_delta {
        let len = usize::try_from(file.n_chunks)
            .ok()
            .and_then(|n| n.checked_mul(manifest::ENTRY_LEN))
            .and_then(|n| n.checked_add(manifest::HEADER_LEN))
            .ok_or_else(|| invalid("the catalogue's chunk count is out of range".into()))?;
        delta::decode_payload(received, base.map(|(_, bytes)| bytes).unwrap_or_default(), len)
            .map_err(|e| invalid(format!("its delta does not decode: {e}")))?
            .to_vec()
    } else {
        received
    };
    if Hash::of(&bytes).to_hex() != file.manifest_id {
        return Err(invalid("its content does not match its id".into()));
    }
    Ok((bytes, received_len))
}

/// Asks the region for `batch` and hands each verified chunk to `sink`.
pub async fn batch<S: ChunkSink>(
    source: Source<'_>,
    limiter: Option<&RateLimiter>,
    may_continue: &(dyn Fn() -> bool + Send + Sync),
    sink: &S,
    batch: Vec<Wanted>,
) -> Result<FetchedBatch, S::Error> {
    let mut body = Vec::with_capacity(batch.iter().map(|w| delta::WANT_HEADER_LEN + 32 * w.bases.len()).sum());
    for wanted in &batch {
        Want { hash: wanted.hash, bases: wanted.bases.iter().map(|b| b.hash).collect() }.emit(&mut body);
    }
    let sent = body.len() as u64;
    let response = source.client.chunks(source.authorization, body).await.map_err(FetchError::from)?;
    let stream = response.bytes_stream().map(|piece| piece.map_err(|source| FetchError::Stream { source }));
    let mut out = receive(stream, limiter, may_continue, sink, batch).await?;
    out.sent = sent;
    Ok(out)
}

/// Reads the answer to `batch`: one frame per want, in order.
async fn receive<S: ChunkSink>(
    stream: impl Stream<Item = Result<bytes::Bytes, FetchError>>,
    limiter: Option<&RateLimiter>,
    may_continue: &(dyn Fn() -> bool + Send + Sync),
    sink: &S,
    batch: Vec<Wanted>,
) -> Result<FetchedBatch, S::Error> {
    let protocol = |reason: String| S::Error::from(FetchError::Protocol { reason });
    let mut out = FetchedBatch::default();
    let mut stream = std::pin::pin!(stream);
    // A payload is a tag byte and at most the chunk.
    let mut decoder = FrameDecoder::new(CHUNK_LEN_MAX + 1);
    let mut expected = batch.into_iter();
    let mut bases = BaseReader::default();
    let mut verified: Vec<(Hash, delta::Chunk)> = Vec::new();
    let mut verified_bytes = 0usize;
    'stream: loop {
        while let Some((hash, payload)) = decoder.next_frame().map_err(|e| protocol(e.to_string()))? {
            let Some(wanted) = expected.next() else {
                return Err(protocol("more chunks than asked for".into()));
            };
            if hash != wanted.hash {
                return Err(protocol(format!("got chunk {hash}, expected {}", wanted.hash)));
            }
            let payload_len = payload.len() as u64;
            out.received += payload_len + frame::HEADER_LEN as u64;
            if let Some(limiter) = limiter {
                limiter.take(payload_len).await;
            }
            // The window may close in the middle of a batch (a capped one can take long): stop
            // at this chunk; what is verified so far is handed on below and kept.
            if !may_continue() {
                out.paused = true;
                break 'stream;
            }
            // A chunk whose delta does not decode, or decodes to other bytes, is damaged: it is
            // never written anywhere.
            let data = bases
                .prefix(&wanted.bases)
                .and_then(|prefix| delta::decode_payload(payload, prefix, wanted.len as usize).ok());
            match data {
                Some(data) if Hash::of(&data) == hash => {
                    out.stored += 1;
                    out.bytes += data.len() as u64;
                    verified_bytes += data.len();
                    verified.push((hash, data));
                }
                _ => out.damaged.push(wanted),
            }
            if verified_bytes >= WRITE_PIECE_BYTES {
                sink.write(std::mem::take(&mut verified)).await?;
                verified_bytes = 0;
            }
        }
        match stream.next().await {
            Some(piece) => decoder.push(&piece?),
            None => break,
        }
    }
    if !out.paused {
        decoder.finish().map_err(|e| protocol(e.to_string()))?;
        if let Some(missing) = expected.next() {
            return Err(protocol(format!("the stream ended before chunk {}", missing.hash)));
        }
    }
    sink.write(verified).await?;
    Ok(out)
}

/// Reads delta bases back from local files, keeping the files of one request open.
#[derive(Default)]
struct BaseReader {
    files: HashMap<Arc<PathBuf>, File>,
    prefix: Vec<u8>,
}

impl BaseReader {
    /// The bases' bytes, concatenated in order; None if a file cannot be read (the chunk then
    /// fails to decode, counts as damaged, and is fetched again without bases).
    fn prefix(&mut self, bases: &[BaseRef]) -> Option<&[u8]> {
        self.prefix.clear();
        for base in bases {
            if !self.files.contains_key(&base.file) {
                self.files.insert(base.file.clone(), File::open(base.file.as_path()).ok()?);
            }
            let start = self.prefix.len();
            self.prefix.resize(start + base.len as usize, 0);
            self.files[&base.file].read_exact_at(&mut self.prefix[start..], base.offset).ok()?;
        }
        Some(&self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects what it is handed.
    #[derive(Default)]
    struct Collect(std::sync::Mutex<Vec<(Hash, Vec<u8>)>>);

    impl ChunkSink for Collect {
        type Error = FetchError;
        async fn write(&self, verified: Vec<(Hash, delta::Chunk)>) -> Result<(), FetchError> {
            self.0.lock().unwrap().extend(verified.into_iter().map(|(h, c)| (h, c.to_vec())));
            Ok(())
        }
    }

    fn raw_frame(hash: &Hash, data: &[u8], out: &mut Vec<u8>) {
        let mut payload = Vec::new();
        delta::encode_payload(data, &[], &mut payload).unwrap();
        frame::encode_frame(hash, &payload, out);
    }

    fn wanted(data: &[u8]) -> Wanted {
        Wanted { hash: Hash::of(data), len: data.len() as u32, bases: Vec::new() }
    }

    /// The answer split in small pieces, as a network delivers it.
    fn pieces(bytes: Vec<u8>) -> impl Stream<Item = Result<bytes::Bytes, FetchError>> {
        let pieces: Vec<_> = bytes.chunks(7).map(|p| Ok(bytes::Bytes::copy_from_slice(p))).collect();
        futures_util::stream::iter(pieces)
    }

    #[tokio::test]
    async fn good_chunks_are_handed_on_and_a_damaged_one_is_reported_not_written() {
        let (a, b) = (vec![1u8; 100], vec![2u8; 50]);
        let mut answer = Vec::new();
        raw_frame(&Hash::of(&a), &a, &mut answer);
        raw_frame(&Hash::of(&b), &[3u8; 50], &mut answer); // b's hash, other bytes
        let sink = Collect::default();
        let out = receive(pieces(answer), None, &|| true, &sink, vec![wanted(&a), wanted(&b)]).await.unwrap();
        assert_eq!((out.stored, out.bytes, out.paused), (1, 100, false));
        assert_eq!(out.damaged.iter().map(|w| w.hash).collect::<Vec<_>>(), vec![Hash::of(&b)]);
        assert_eq!(*sink.0.lock().unwrap(), vec![(Hash::of(&a), a)]);
    }

    #[tokio::test]
    async fn chunks_out_of_order_or_missing_are_a_protocol_error() {
        let (a, b) = (vec![1u8; 10], vec![2u8; 10]);
        let mut swapped = Vec::new();
        raw_frame(&Hash::of(&b), &b, &mut swapped);
        raw_frame(&Hash::of(&a), &a, &mut swapped);
        let err = receive(pieces(swapped), None, &|| true, &Collect::default(), vec![wanted(&a), wanted(&b)])
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::Protocol { .. }), "{err}");
        let mut short = Vec::new();
        raw_frame(&Hash::of(&a), &a, &mut short);
        let err = receive(pieces(short), None, &|| true, &Collect::default(), vec![wanted(&a), wanted(&b)])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ended before"), "{err}");
    }

    #[tokio::test]
    async fn a_pause_keeps_what_was_verified() {
        let (a, b) = (vec![1u8; 10], vec![2u8; 10]);
        let mut answer = Vec::new();
        raw_frame(&Hash::of(&a), &a, &mut answer);
        raw_frame(&Hash::of(&b), &b, &mut answer);
        let asked = std::sync::atomic::AtomicUsize::new(0);
        // The window closes after the first chunk.
        let may_continue = || asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
        let sink = Collect::default();
        let out = receive(pieces(answer), None, &may_continue, &sink, vec![wanted(&a), wanted(&b)]).await.unwrap();
        assert!(out.paused);
        assert_eq!(*sink.0.lock().unwrap(), vec![(Hash::of(&a), a)]);
    }
}
