//! `imgtool push`: upload a file to the region's catalogue, sending only the chunks it lacks.
//! Over HTTPS only, trusting the region as `tls` says. Chunk (one pass over the file), send the
//! manifest, send the missing chunks in batches read straight from the file, several batches in
//! flight ([`UPLOAD_CONNECTIONS`]), each chunk that compresses compressed here on the client's
//! cores when the region takes payload frames (it decodes and hashes each one before storing
//! it), then commit. Interrupted pushes resume: run the same command again.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use metalrack_api::images::{ChunksStored, CommitResponse, UploadResponse, UPLOAD_PAYLOADS_QUERY};
use metalrack_api::{limits, paths, ErrorBody, API_PREFIX};

use metalrack_image_tools::chunker::{chunk_file, ChunkerConfig};
use metalrack_image_tools::delta::{self, PayloadTag};
use metalrack_image_tools::frame::{self, FrameHeader};
use metalrack_image_tools::Hash;

/// Bytes of chunk frames per request, below the region's own limit: a failed request costs
/// little to resend.
pub const BATCH_BYTES_TARGET: u64 = 8 * 1024 * 1024;

/// Batches in flight at once, each built and sent by its own thread over its own connection:
/// one builds (reads, checks, compresses) while others are on the wire or being stored by the
/// region. Three keep two cores busy on both sides; more only add memory. The client holds at
/// most this many batches: 3 × [`BATCH_BYTES_TARGET`] = 24 MiB.
pub const UPLOAD_CONNECTIONS: usize = 3;

#[derive(Debug)]
pub struct PushArgs<'a> {
    pub file: &'a Path,
    pub name: &'a str,
    pub arch: &'a str,
    pub kind: &'a str,
    pub version: &'a str,
    pub url: &'a str,
    pub api_key: &'a str,
    pub region_certificate: &'a crate::tls::RegionCertificate,
    pub config: ChunkerConfig,
}

#[derive(Debug)]
pub struct PushSummary {
    pub commit: CommitResponse,
    pub n_chunks: u64,
    pub n_chunks_sent: u64,
    pub bytes_sent: u64,
    pub file_len: u64,
    pub elapsed: Duration,
    /// Where `elapsed` went: chunking the file, sending the manifest and the missing chunks, and
    /// the region's commit (its whole-file check and flush).
    pub phases: PushPhases,
}

#[derive(Debug, Clone, Copy)]
pub struct PushPhases {
    pub chunking: Duration,
    pub sending: Duration,
    pub commit: Duration,
}

/// Splits the missing chunks (indices into `offsets`) into runs whose frames fit `batch_limit`
/// bytes (a chunk larger than that goes alone).
fn plan_batches(missing: &[u32], offsets: &[(u64, u32, Hash)], batch_limit: u64) -> anyhow::Result<Vec<Range<usize>>> {
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (position, &index) in missing.iter().enumerate() {
        let (_, len, _) = offsets.get(index as usize).context("the region named a chunk index out of range")?;
        // A frame: header, a payload tag, then at most the chunk.
        let frame_len = (frame::HEADER_LEN + 1) as u64 + u64::from(*len);
        if bytes + frame_len > batch_limit && position > start {
            batches.push(start..position);
            (start, bytes) = (position, 0);
        }
        bytes += frame_len;
    }
    if start < missing.len() {
        batches.push(start..missing.len());
    }
    Ok(batches)
}

/// Builds the bodies of chunk batches from the file.
struct BatchSender<'a> {
    file: &'a File,
    path: &'a Path,
    offsets: &'a [(u64, u32, Hash)],
    /// The region takes payload frames: chunks that compress go compressed.
    payloads: bool,
}

impl BatchSender<'_> {
    /// The body for the chunks `indices`, and the chunk bytes it carries. Each chunk is read
    /// straight into the body and hashed there (a file changed since it was chunked fails here,
    /// not at the region); one that compresses ([`delta::compress_chunk`], which costs random
    /// data only a look at samples) is replaced in place by its zstd frame.
    fn build(&self, indices: &[u32]) -> anyhow::Result<(Vec<u8>, u64)> {
        let tag_len = usize::from(self.payloads);
        let capacity: usize =
            indices.iter().map(|&i| frame::HEADER_LEN + tag_len + self.offsets[i as usize].1 as usize).sum();
        let mut body = Vec::with_capacity(capacity);
        let mut chunk_bytes = 0;
        for &index in indices {
            let (offset, len, hash) = self.offsets[index as usize];
            let start = body.len();
            let data_start = start + frame::HEADER_LEN + tag_len;
            body.resize(data_start + len as usize, 0);
            self.file
                .read_exact_at(&mut body[data_start..], offset)
                .with_context(|| format!("cannot read {}", self.path.display()))?;
            if Hash::of(&body[data_start..]) != hash {
                bail!("{} changed while pushing; push it again", self.path.display());
            }
            if self.payloads {
                body[start + frame::HEADER_LEN] = PayloadTag::Raw as u8;
                if let Some(compressed) = delta::compress_chunk(&body[data_start..])? {
                    body.truncate(data_start);
                    body[start + frame::HEADER_LEN] = PayloadTag::Delta as u8;
                    body.extend_from_slice(&compressed);
                }
            }
            let data_len = u32::try_from(body.len() - start - frame::HEADER_LEN).expect("chunks are under 4 GiB");
            let mut header = FrameHeader::new_unchecked(&mut body[start..start + frame::HEADER_LEN]);
            header.set_hash(&hash);
            header.set_data_len(data_len);
            chunk_bytes += u64::from(len);
        }
        Ok((body, chunk_bytes))
    }
}

fn check(response: reqwest::blocking::Response, what: &str) -> anyhow::Result<reqwest::blocking::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().unwrap_or_default();
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => bail!("{what}: the region refused ({status}): {}", body.error),
        Err(_) => bail!("{what}: the region answered {status}; check --url (it ends in /MAAS)"),
    }
}

/// A failed request: what was wrong with the region's certificate if that was it, else that the
/// region cannot be reached (with reqwest's reason).
fn unreachable(region_certificate: &crate::tls::RegionCertificate, base: &str, error: reqwest::Error) -> anyhow::Error {
    match region_certificate.refusal(&error) {
        Some(refusal) => anyhow::anyhow!("{base}: {refusal}"),
        None => anyhow::Error::new(error).context(format!("cannot reach the region at {base}")),
    }
}

pub fn push(args: &PushArgs<'_>) -> anyhow::Result<PushSummary> {
    let started = Instant::now();
    let file_len = std::fs::metadata(args.file).with_context(|| format!("cannot read {}", args.file.display()))?.len();
    // Before chunking, which may take minutes: a wrong URL or certificate fails at once.
    let base = crate::tls::https_base(args.url)?;
    let tls = args.region_certificate.client_config()?;
    let bar = super::progress_bar(Some(file_len));
    let manifest = chunk_file(args.file, args.config, |done| bar.set_position(done))?;
    bar.finish_and_clear();
    let chunked = Instant::now();
    let api = format!("{base}{API_PREFIX}");
    let client = reqwest::blocking::Client::builder()
        .use_preconfigured_tls(tls)
        // A redirect could lead the API key to another host; the region never redirects the API.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(600))
        .user_agent(concat!("imgtool/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let auth = format!("Bearer {}", args.api_key);
    let manifest_bytes = manifest.to_bytes();
    if manifest_bytes.len() > limits::MANIFEST_BYTES_MAX {
        bail!(
            "{} makes a manifest of {} bytes; the region takes at most {} (a file of about 116 GiB)",
            args.file.display(),
            manifest_bytes.len(),
            limits::MANIFEST_BYTES_MAX
        );
    }
    let response = client
        .post(format!("{api}{}", paths::UPLOADS))
        .query(&[("name", args.name), ("arch", args.arch), ("kind", args.kind), ("version", args.version)])
        .header("authorization", &auth)
        .header("content-type", "application/octet-stream")
        .body(manifest_bytes)
        .send()
        .map_err(|e| unreachable(args.region_certificate, &base, e))?;
    let upload: UploadResponse = check(response, "sending the manifest")?.json()?;
    let batch_limit = BATCH_BYTES_TARGET.min(upload.batch_bytes_max);
    let offsets: Vec<(u64, u32, Hash)> = manifest.chunk_offsets().map(|(o, c)| (o, c.len, c.hash)).collect();
    let batches = plan_batches(&upload.missing, &offsets, batch_limit)?;
    let file = File::open(args.file)?;
    let bar = super::progress_bar(Some(upload.missing_bytes));
    let chunks_url = match upload.chunk_payloads {
        true => format!("{api}{}?{UPLOAD_PAYLOADS_QUERY}", paths::upload_chunks(&upload.upload_id)),
        false => format!("{api}{}", paths::upload_chunks(&upload.upload_id)),
    };
    let send = |batch: Vec<u8>| -> anyhow::Result<()> {
        let response = client
            .post(&chunks_url)
            .header("authorization", &auth)
            .header("content-type", "application/octet-stream")
            .body(batch)
            .send()
            .map_err(|e| unreachable(args.region_certificate, &base, e))?;
        let _: ChunksStored = check(response, "sending chunks")?.json()?;
        Ok(())
    };
    let sender = BatchSender { file: &file, path: args.file, offsets: &offsets, payloads: upload.chunk_payloads };
    let next_batch = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let bytes_sent = AtomicU64::new(0);
    let first_error = std::sync::Mutex::new(None);
    // UPLOAD_CONNECTIONS workers, each reading, checking, compressing and sending whole batches
    // in turn: while one waits on the network or the region, the others use the cores.
    std::thread::scope(|scope| {
        for _ in 0..UPLOAD_CONNECTIONS.min(batches.len()) {
            scope.spawn(|| {
                while !failed.load(Ordering::Relaxed) {
                    let index = next_batch.fetch_add(1, Ordering::Relaxed);
                    let Some(batch) = batches.get(index) else { break };
                    let result = sender.build(&upload.missing[batch.clone()]).and_then(|(body, chunk_bytes)| {
                        send(body)?;
                        Ok(chunk_bytes)
                    });
                    match result {
                        Ok(chunk_bytes) => {
                            bar.set_position(bytes_sent.fetch_add(chunk_bytes, Ordering::Relaxed) + chunk_bytes)
                        }
                        Err(error) => {
                            failed.store(true, Ordering::Relaxed);
                            first_error.lock().expect("no worker panics holding it").get_or_insert(error);
                        }
                    }
                }
            });
        }
    });
    if let Some(error) = first_error.into_inner().expect("no worker panicked holding it") {
        return Err(error);
    }
    let bytes_sent = bytes_sent.into_inner();
    bar.finish_and_clear();
    let sent = Instant::now();
    let response = client
        .post(format!("{api}{}", paths::upload_commit(&upload.upload_id)))
        .header("authorization", &auth)
        .send()
        .map_err(|e| unreachable(args.region_certificate, &base, e))?;
    let commit: CommitResponse = check(response, "committing")?.json()?;
    let committed = Instant::now();
    Ok(PushSummary {
        commit,
        n_chunks: manifest.chunks.len() as u64,
        n_chunks_sent: upload.missing.len() as u64,
        bytes_sent,
        file_len,
        elapsed: committed - started,
        phases: PushPhases { chunking: chunked - started, sending: sent - chunked, commit: committed - sent },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stay_within_the_limit_and_cover_every_missing_chunk_once() {
        let lens = [100u32, 5_000, 70_000, 3, 65_536, 200_000, 1, 9_999];
        let offsets: Vec<(u64, u32, Hash)> = lens.iter().map(|&len| (0, len, Hash([0; 32]))).collect();
        let missing: Vec<u32> = vec![0, 1, 2, 4, 5, 6, 7];
        let limit = 100_000;
        let batches = plan_batches(&missing, &offsets, limit).unwrap();
        let covered: Vec<u32> = batches.iter().flat_map(|b| missing[b.clone()].iter().copied()).collect();
        assert_eq!(covered, missing);
        for batch in &batches {
            let bytes: u64 = missing[batch.clone()]
                .iter()
                .map(|&i| (frame::HEADER_LEN + 1) as u64 + u64::from(lens[i as usize]))
                .sum();
            // Only a chunk larger than the limit goes alone over it.
            assert!(bytes <= limit || batch.len() == 1, "{batch:?}: {bytes}");
        }
        assert!(plan_batches(&[8], &offsets, limit).is_err(), "an index out of range is refused");
        assert!(plan_batches(&[], &offsets, limit).unwrap().is_empty());
    }
}
