//! One sync run: fetch the manifests and the chunks the rack lacks (verified, batched, several
//! requests in flight, optionally rate-capped), build each new file from chunks of files the rack
//! already has (copy_file_range) and fetched ones, verify it whole, publish the snapshot.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use metalrack_api::images::{CatalogueFile, RackCatalogue, SyncFigures};
use metalrack_image_tools::frame::FrameDecoder;
use metalrack_image_tools::manifest::{Manifest, CHUNK_LEN_MAX};
use metalrack_image_tools::store::{ChunkStore, StoreError as ChunkStoreError};
use metalrack_image_tools::Hash;
use tokio::sync::Mutex;

use super::layout::{Layout, LayoutError, SnapshotMeta};
use crate::region_client::{RegionClient, RegionError};

/// Requests for chunks in flight at once: enough to hide a round trip on a LAN, few enough
/// that a rack does not hog the region (each holds at most one batch of memory).
pub const FETCHES_IN_FLIGHT: usize = 4;

/// Target bytes per chunk request (the region caps the count at 1024 hashes).
pub const FETCH_BATCH_BYTES: u64 = 8 * 1024 * 1024;
const FETCH_BATCH_CHUNKS_MAX: usize = 1024;

/// A chunk that arrives damaged this many times in one run fails the sync (the region's copy is
/// probably bad; the operator has to look).
pub const CHUNK_ATTEMPTS_MAX: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
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
    #[error("chunk {hash} arrived damaged {attempts} times")]
    ChunkDamaged { hash: Hash, attempts: u32 },
    #[error("chunk store")]
    Chunks {
        #[from]
        source: ChunkStoreError,
    },
    #[error("snapshot store")]
    Layout {
        #[from]
        source: LayoutError,
    },
    #[error("cannot {what} {path}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("file {file_hash} does not verify after assembly")]
    Verify { file_hash: String, source: metalrack_image_tools::verify::VerifyError },
    #[error("a background task failed: {0}")]
    Task(String),
}

/// What a run ended with.
#[derive(Debug)]
pub enum RunOutcome {
    Published {
        meta: SnapshotMeta,
        figures: SyncFigures,
    },
    /// `may_continue` said stop (the sync window closed). Fetched chunks are kept.
    Paused,
}

/// Reports bytes fetched so far out of the bytes to fetch.
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Caps the fetch rate: each caller reserves its bytes and sleeps until they fit.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_s: u64,
    next_free: Mutex<tokio::time::Instant>,
}

impl RateLimiter {
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

pub struct SyncRun<'a> {
    pub layout: &'a Layout,
    pub client: &'a RegionClient,
    pub authorization: &'a str,
    pub limiter: Option<&'a RateLimiter>,
    pub progress: ProgressFn,
    pub may_continue: &'a (dyn Fn() -> bool + Send + Sync),
}

/// Where a chunk can be copied from: a complete local file and an offset in it.
#[derive(Debug, Clone)]
struct ChunkSource {
    file: Arc<PathBuf>,
    offset: u64,
}

impl SyncRun<'_> {
    pub async fn run(&self, target: &RackCatalogue) -> Result<RunOutcome, SyncError> {
        let started = Instant::now();
        // Fetched chunks are verified again when files are built, so they need no flush each:
        // a chunk torn by a crash is found then, removed, and fetched again.
        let incoming = ChunkStore::open_volatile(&self.layout.incoming_dir())?;
        // Manifests of every target file, fetched once and verified by their id.
        let mut manifests: HashMap<String, Manifest> = HashMap::new();
        for file in &target.files {
            if !manifests.contains_key(&file.manifest_id) {
                let manifest = self.manifest(file).await?;
                manifests.insert(file.manifest_id.clone(), manifest);
            }
        }
        let mut index = self.local_chunk_index(target, &manifests)?;
        let needed: Vec<&CatalogueFile> = {
            let mut seen = HashSet::new();
            target
                .files
                .iter()
                .filter(|f| !self.layout.file_path(&f.file_hash).exists() && seen.insert(f.file_hash.as_str()))
                .collect()
        };
        // Chunks neither in a local file nor already fetched by an earlier (interrupted) run.
        let mut missing: Vec<(Hash, u32)> = Vec::new();
        let mut seen = HashSet::new();
        for file in &needed {
            for chunk in &manifests[&file.manifest_id].chunks {
                if seen.insert(chunk.hash) && !index.contains_key(&chunk.hash) && !incoming.contains(&chunk.hash) {
                    missing.push((chunk.hash, chunk.len));
                }
            }
        }
        let bytes_total: u64 = missing.iter().map(|(_, len)| u64::from(*len)).sum();
        let mut figures = SyncFigures::default();
        (self.progress)(0, bytes_total);
        if !self.fetch_all(&incoming, missing, bytes_total, &mut figures).await? {
            return Ok(RunOutcome::Paused);
        }
        for file in needed {
            let manifest = manifests[&file.manifest_id].clone();
            let reused = self.assemble(file, manifest, &index, &incoming).await?;
            figures.bytes_reused += reused;
            let path = Arc::new(self.layout.file_path(&file.file_hash));
            for (offset, chunk) in manifests[&file.manifest_id].chunk_offsets() {
                index.entry(chunk.hash).or_insert_with(|| ChunkSource { file: path.clone(), offset });
            }
        }
        let layout = self.layout.clone();
        let revision = target.revision;
        let files = target.files.clone();
        let meta = tokio::task::spawn_blocking(move || -> Result<SnapshotMeta, SyncError> {
            let meta = layout.publish(revision, &files)?;
            layout.collect_garbage(&meta)?;
            Ok(meta)
        })
        .await
        .map_err(|e| SyncError::Task(e.to_string()))??;
        figures.duration_ms = started.elapsed().as_millis() as u64;
        figures.finished_at_ms = crate::status::now_ms();
        Ok(RunOutcome::Published { meta, figures })
    }

    async fn manifest(&self, file: &CatalogueFile) -> Result<Manifest, SyncError> {
        let invalid = |reason: String| SyncError::Manifest { manifest_id: file.manifest_id.clone(), reason };
        let path = self.layout.manifest_path(&file.manifest_id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(_) => {
                let bytes = self.client.manifest(self.authorization, &file.manifest_id).await?;
                if Hash::of(&bytes).to_hex() != file.manifest_id {
                    return Err(invalid("its content does not match its id".into()));
                }
                metalrack_api::private_file::write_private_file(&path, &bytes).map_err(|source| SyncError::Io {
                    what: "write",
                    path: path.clone(),
                    source,
                })?;
                bytes
            }
        };
        let manifest = Manifest::parse(&bytes).map_err(|e| invalid(e.to_string()))?;
        if manifest.file_hash.to_hex() != file.file_hash || manifest.file_len != file.file_len {
            return Err(invalid("it describes another file than the catalogue says".into()));
        }
        Ok(manifest)
    }

    /// Every chunk of every complete local file we have a manifest for.
    fn local_chunk_index(
        &self,
        target: &RackCatalogue,
        manifests: &HashMap<String, Manifest>,
    ) -> Result<HashMap<Hash, ChunkSource>, SyncError> {
        let mut index = HashMap::new();
        let mut add = |file_hash: &str, manifest: &Manifest| {
            let path = Arc::new(self.layout.file_path(file_hash));
            if path.exists() {
                for (offset, chunk) in manifest.chunk_offsets() {
                    index.entry(chunk.hash).or_insert_with(|| ChunkSource { file: path.clone(), offset });
                }
            }
        };
        if let Some(current) = self.layout.current()? {
            for file in &current.files {
                if let Ok(bytes) = std::fs::read(self.layout.manifest_path(&file.manifest_id)) {
                    if let Ok(manifest) = Manifest::parse(&bytes) {
                        add(&file.file_hash, &manifest);
                    }
                }
            }
        }
        for file in &target.files {
            add(&file.file_hash, &manifests[&file.manifest_id]);
        }
        Ok(index)
    }

    /// Fetches `missing` into `incoming`. Returns false when paused by `may_continue`.
    async fn fetch_all(
        &self,
        incoming: &ChunkStore,
        mut missing: Vec<(Hash, u32)>,
        bytes_total: u64,
        figures: &mut SyncFigures,
    ) -> Result<bool, SyncError> {
        let mut attempts: HashMap<Hash, u32> = HashMap::new();
        let mut bytes_done = 0u64;
        while !missing.is_empty() {
            let mut batches: Vec<Vec<(Hash, u32)>> = Vec::new();
            let mut batch_bytes = 0;
            for chunk in missing.drain(..) {
                if batches.is_empty()
                    || batch_bytes >= FETCH_BATCH_BYTES
                    || batches.last().unwrap().len() >= FETCH_BATCH_CHUNKS_MAX
                {
                    batches.push(Vec::new());
                    batch_bytes = 0;
                }
                batch_bytes += u64::from(chunk.1);
                batches.last_mut().unwrap().push(chunk);
            }
            let mut results =
                futures_util::stream::iter(batches.into_iter().map(|batch| self.fetch_batch(incoming, batch)))
                    .buffer_unordered(FETCHES_IN_FLIGHT);
            while let Some(result) = results.next().await {
                let batch = result?;
                figures.chunks_fetched += batch.stored;
                figures.bytes_fetched += batch.bytes;
                bytes_done += batch.bytes;
                (self.progress)(bytes_done, bytes_total);
                for (hash, len) in batch.damaged {
                    let n = attempts.entry(hash).or_insert(0);
                    *n += 1;
                    figures.chunks_refetched += 1;
                    if *n >= CHUNK_ATTEMPTS_MAX {
                        return Err(SyncError::ChunkDamaged { hash, attempts: *n });
                    }
                    tracing::warn!(chunk = %hash, "chunk arrived damaged; fetching it again");
                    missing.push((hash, len));
                }
                if !(self.may_continue)() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    async fn fetch_batch(&self, incoming: &ChunkStore, batch: Vec<(Hash, u32)>) -> Result<FetchedBatch, SyncError> {
        let hashes: Vec<[u8; 32]> = batch.iter().map(|(h, _)| h.0).collect();
        let response = self.client.chunks(self.authorization, &hashes).await?;
        let mut stream = response.bytes_stream();
        let mut decoder = FrameDecoder::new(CHUNK_LEN_MAX);
        let mut expected = batch.into_iter();
        let mut out = FetchedBatch::default();
        loop {
            while let Some((hash, data)) =
                decoder.next_frame().map_err(|e| SyncError::Protocol { reason: e.to_string() })?
            {
                let Some((want, len)) = expected.next() else {
                    return Err(SyncError::Protocol { reason: "more chunks than asked for".into() });
                };
                if hash != want {
                    return Err(SyncError::Protocol { reason: format!("got chunk {hash}, expected {want}") });
                }
                if let Some(limiter) = self.limiter {
                    limiter.take(data.len() as u64).await;
                }
                let store = incoming.clone();
                let n_bytes = data.len() as u64;
                // `put` hashes the data: a damaged chunk is never written anywhere.
                match tokio::task::spawn_blocking(move || store.put(&hash, &data))
                    .await
                    .map_err(|e| SyncError::Task(e.to_string()))?
                {
                    Ok(_) => {
                        out.stored += 1;
                        out.bytes += n_bytes;
                    }
                    Err(ChunkStoreError::HashMismatch { .. }) => out.damaged.push((hash, len)),
                    Err(e) => return Err(e.into()),
                }
            }
            match stream.next().await {
                Some(piece) => decoder.push(&piece.map_err(|source| SyncError::Stream { source })?),
                None => break,
            }
        }
        decoder.finish().map_err(|e| SyncError::Protocol { reason: e.to_string() })?;
        if let Some((missing, _)) = expected.next() {
            return Err(SyncError::Protocol { reason: format!("the stream ended before chunk {missing}") });
        }
        Ok(out)
    }

    /// Builds one file as `.HASH.partial`, verifies it whole, then renames it into place.
    /// Returns the bytes copied from local files.
    async fn assemble(
        &self,
        file: &CatalogueFile,
        manifest: Manifest,
        index: &HashMap<Hash, ChunkSource>,
        incoming: &ChunkStore,
    ) -> Result<u64, SyncError> {
        let partial = self.layout.partial_path(&file.file_hash);
        let target = self.layout.file_path(&file.file_hash);
        let sources: Vec<Option<ChunkSource>> = manifest.chunks.iter().map(|c| index.get(&c.hash).cloned()).collect();
        let incoming = incoming.clone();
        let file_hash = file.file_hash.clone();
        tokio::task::spawn_blocking(move || {
            assemble_file(&partial, &target, &file_hash, &manifest, &sources, &incoming)
        })
        .await
        .map_err(|e| SyncError::Task(e.to_string()))?
    }
}

#[derive(Debug, Default)]
struct FetchedBatch {
    stored: u64,
    bytes: u64,
    damaged: Vec<(Hash, u32)>,
}

fn assemble_file(
    partial: &Path,
    target: &Path,
    file_hash: &str,
    manifest: &Manifest,
    sources: &[Option<ChunkSource>],
    incoming: &ChunkStore,
) -> Result<u64, SyncError> {
    let io = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| SyncError::Io { what, path, source }
    };
    let out = File::create(partial).map_err(io("create", partial))?;
    out.set_len(manifest.file_len).map_err(io("size", partial))?;
    let mut open_sources: HashMap<Arc<PathBuf>, File> = HashMap::new();
    let mut reused = 0u64;
    // A run of consecutive chunks that sit consecutively in one source file: one copy call.
    let mut run: Option<(Arc<PathBuf>, u64, u64, u64)> = None; // (source, source offset, out offset, len)
    let mut flush = |run: &mut Option<(Arc<PathBuf>, u64, u64, u64)>,
                     open_sources: &mut HashMap<Arc<PathBuf>, File>|
     -> Result<(), SyncError> {
        if let Some((source, source_offset, out_offset, len)) = run.take() {
            if !open_sources.contains_key(&source) {
                let f = File::open(source.as_path()).map_err(io("open", source.as_path()))?;
                open_sources.insert(source.clone(), f);
            }
            copy_range(&open_sources[&source], source_offset, &out, out_offset, len)
                .map_err(io("copy into", partial))?;
            reused += len;
        }
        Ok(())
    };
    for ((out_offset, chunk), source) in manifest.chunk_offsets().zip(sources) {
        let len = u64::from(chunk.len);
        match source {
            Some(src) => {
                let extends = matches!(&run, Some((file, s, o, l)) if Arc::ptr_eq(file, &src.file) && s + l == src.offset && o + l == out_offset);
                if extends {
                    if let Some(r) = run.as_mut() {
                        r.3 += len;
                    }
                } else {
                    flush(&mut run, &mut open_sources)?;
                    run = Some((src.file.clone(), src.offset, out_offset, len));
                }
            }
            None => {
                flush(&mut run, &mut open_sources)?;
                let data = match incoming.get(&chunk.hash) {
                    Ok(data) => data,
                    Err(e @ ChunkStoreError::HashMismatch { .. }) => {
                        incoming.remove(&chunk.hash)?;
                        return Err(e.into());
                    }
                    Err(e) => return Err(e.into()),
                };
                out.write_all_at(&data, out_offset).map_err(io("write", partial))?;
            }
        }
    }
    flush(&mut run, &mut open_sources)?;
    out.sync_all().map_err(io("sync", partial))?;
    drop(out);
    metalrack_image_tools::verify::verify_file(partial, manifest, |_| {})
        .map_err(|source| SyncError::Verify { file_hash: file_hash.to_owned(), source })?;
    std::fs::rename(partial, target).map_err(io("rename", partial))?;
    Ok(reused)
}

/// Copies `len` bytes between files in the kernel (reflink-capable filesystems share extents).
fn copy_range(src: &File, mut src_offset: u64, dst: &File, mut dst_offset: u64, mut len: u64) -> std::io::Result<()> {
    while len > 0 {
        let mut off_in = src_offset as i64;
        let mut off_out = dst_offset as i64;
        let n = nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), len as usize)
            .map_err(std::io::Error::from)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source file shorter than its manifest",
            ));
        }
        src_offset += n as u64;
        dst_offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}
