//! `imgtool push`: upload a file to the region's catalogue, sending only the chunks it lacks.
//! Over HTTPS only, trusting the region as `tls` says. Chunk (one pass over the file), send the manifest, send the missing chunks in batches read
//! straight from the file, commit. Interrupted pushes resume: run the same command again.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use metalrack_api::images::{ChunksStored, CommitResponse, UploadResponse};
use metalrack_api::{limits, paths, ErrorBody, API_PREFIX};

use metalrack_image_tools::chunker::{chunk_file, ChunkerConfig};
use metalrack_image_tools::frame::encode_frame;
use metalrack_image_tools::Hash;

/// Bytes of chunk frames per request, below the region's own limit: a failed request costs
/// little to resend and the client holds at most this much in memory.
pub const BATCH_BYTES_TARGET: u64 = 8 * 1024 * 1024;

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
    let file = File::open(args.file)?;
    let bar = super::progress_bar(Some(upload.missing_bytes));
    let mut batch = Vec::new();
    let mut bytes_sent = 0;
    let send = |batch: &mut Vec<u8>| -> anyhow::Result<()> {
        let response = client
            .post(format!("{api}{}", paths::upload_chunks(&upload.upload_id)))
            .header("authorization", &auth)
            .header("content-type", "application/octet-stream")
            .body(std::mem::take(batch))
            .send()
            .map_err(|e| unreachable(args.region_certificate, &base, e))?;
        let _: ChunksStored = check(response, "sending chunks")?.json()?;
        Ok(())
    };
    let mut data = Vec::new();
    for &index in &upload.missing {
        let (offset, len, hash) =
            *offsets.get(index as usize).context("the region named a chunk index out of range")?;
        if batch.len() as u64 + u64::from(len) + 36 > batch_limit && !batch.is_empty() {
            send(&mut batch)?;
        }
        data.resize(len as usize, 0);
        file.read_exact_at(&mut data, offset).with_context(|| format!("cannot read {}", args.file.display()))?;
        if Hash::of(&data) != hash {
            bail!("{} changed while pushing; push it again", args.file.display());
        }
        encode_frame(&hash, &data, &mut batch);
        bytes_sent += u64::from(len);
        bar.set_position(bytes_sent);
    }
    if !batch.is_empty() {
        send(&mut batch)?;
    }
    bar.finish_and_clear();
    let response = client
        .post(format!("{api}{}", paths::upload_commit(&upload.upload_id)))
        .header("authorization", &auth)
        .send()
        .map_err(|e| unreachable(args.region_certificate, &base, e))?;
    let commit: CommitResponse = check(response, "committing")?.json()?;
    Ok(PushSummary {
        commit,
        n_chunks: manifest.chunks.len() as u64,
        n_chunks_sent: upload.missing.len() as u64,
        bytes_sent,
        file_len,
        elapsed: started.elapsed(),
    })
}
