//! One sync run: fetch the manifests and the chunks the rack lacks (verified, batched, several
//! requests in flight, optionally rate-capped), build each new file from chunks of files the rack
//! already has (copy_file_range) and fetched ones, verify it whole, publish the snapshot.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use metalrack_api::images::{CatalogueFile, RackCatalogue, SyncFigures};
use metalrack_image_tools::delta::{self, Want};
use metalrack_image_tools::frame::{self, FrameDecoder};
use metalrack_image_tools::manifest::{self, Manifest, CHUNK_LEN_MAX};
use metalrack_image_tools::store::StoreError as ChunkStoreError;
use metalrack_image_tools::Hash;
use tokio::sync::Mutex;

use super::bases::{self, BaseRef, OldFile};
use super::layout::{Layout, LayoutError, SnapshotMeta};
use crate::region_client::{RegionClient, RegionError};

/// Requests for chunks in flight at once: enough to hide a round trip on a LAN, few enough
/// that a rack does not hog the region (each holds at most one batch of memory).
pub const FETCHES_IN_FLIGHT: usize = 4;

/// Target bytes per chunk request (the region caps the count at 1024 hashes).
pub const FETCH_BATCH_BYTES: u64 = 8 * 1024 * 1024;
const FETCH_BATCH_CHUNKS_MAX: usize = 1024;

/// Where each missing chunk goes: (build slot, offset, chunk index) for every place it occurs.
type Places = HashMap<Hash, Vec<(usize, u64, u32)>>;

/// A chunk to fetch, with the local chunks (if any) the region may send it as a delta against.
#[derive(Debug, Clone)]
struct Wanted {
    hash: Hash,
    len: u32,
    bases: Vec<BaseRef>,
}

/// Verified chunk bytes gathered before they are written out (and logged) in one blocking call.
const WRITE_PIECE_BYTES: usize = 1024 * 1024;

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
        let mut figures = SyncFigures::default();
        // Complete local files of the current snapshot: sources of chunks and delta bases.
        let have: Vec<CatalogueFile> = match self.layout.current()? {
            Some(current) => {
                current.files.into_iter().filter(|f| self.layout.file_path(&f.file_hash).exists()).collect()
            }
            None => Vec::new(),
        };
        // Manifests of every target file, fetched once and verified by their id.
        let mut manifests: HashMap<String, Manifest> = HashMap::new();
        for file in &target.files {
            if !manifests.contains_key(&file.manifest_id) {
                let base = bases::predecessor(file, &have).map(|f| f.manifest_id.as_str());
                let manifest = self.manifest(file, base, &mut figures).await?;
                manifests.insert(file.manifest_id.clone(), manifest);
            }
        }
        // Manifests of the local files, read once: chunk sources and delta bases come from them.
        let have_manifests: HashMap<&str, Manifest> = have
            .iter()
            .filter_map(|f| {
                let bytes = std::fs::read(self.layout.manifest_path(&f.manifest_id)).ok()?;
                Some((f.manifest_id.as_str(), Manifest::parse(&bytes).ok()?))
            })
            .collect();
        let index = Arc::new(self.local_chunk_index(target, &manifests, &have, &have_manifests));
        let needed: Vec<&CatalogueFile> = {
            let mut seen = HashSet::new();
            target
                .files
                .iter()
                .filter(|f| !self.layout.file_path(&f.file_hash).exists() && seen.insert(f.file_hash.as_str()))
                .collect()
        };
        // Open (or resume) each new file, copy what local files have, and list what to fetch.
        let mut builds = Vec::new();
        for file in &needed {
            let manifest = manifests[&file.manifest_id].clone();
            let layout = self.layout.clone();
            let file_hash = file.file_hash.clone();
            let index = index.clone();
            let build = tokio::task::spawn_blocking(move || Build::open(&layout, &file_hash, manifest, &index))
                .await
                .map_err(|e| SyncError::Task(e.to_string()))??;
            builds.push(Arc::new(build));
        }
        figures.bytes_reused = builds.iter().map(|b| b.reused).sum();
        // Where each missing chunk goes: (build, offset, chunk index) for every place it occurs.
        let mut places: Places = HashMap::new();
        let mut missing: Vec<Wanted> = Vec::new();
        for (slot, build) in builds.iter().enumerate() {
            let mut found = self.delta_bases(needed[slot], &build.manifest, &build.missing, &have, &have_manifests);
            for &(index, offset) in &build.missing {
                let chunk = build.manifest.chunks[index];
                let entry = places.entry(chunk.hash).or_default();
                if entry.is_empty() {
                    let bases = found.remove(&index).unwrap_or_default();
                    missing.push(Wanted { hash: chunk.hash, len: chunk.len, bases });
                }
                entry.push((slot, offset, index as u32));
            }
        }
        let bytes_total: u64 = missing.iter().map(|w| u64::from(w.len)).sum();
        (self.progress)(0, bytes_total);
        let places = Arc::new(places);
        if !self.fetch_all(&builds, &places, missing, bytes_total, &mut figures).await? {
            for build in &builds {
                build.flush_progress()?;
            }
            return Ok(RunOutcome::Paused);
        }
        drop(places);
        for build in builds {
            let build = Arc::try_unwrap(build).map_err(|_| SyncError::Task("a file build is still shared".into()))?;
            tokio::task::spawn_blocking(move || build.finish()).await.map_err(|e| SyncError::Task(e.to_string()))??;
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

    /// The manifest of `file`, from disk or from the region (as a delta against `base`, a
    /// manifest the rack has, when the region can), checked against its id.
    async fn manifest(
        &self,
        file: &CatalogueFile,
        base: Option<&str>,
        figures: &mut SyncFigures,
    ) -> Result<Manifest, SyncError> {
        let invalid = |reason: String| SyncError::Manifest { manifest_id: file.manifest_id.clone(), reason };
        let path = self.layout.manifest_path(&file.manifest_id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(_) => {
                let base_bytes = base.and_then(|id| std::fs::read(self.layout.manifest_path(id)).ok());
                let base = base.filter(|_| base_bytes.is_some());
                let (received, is_delta) = self.client.manifest(self.authorization, &file.manifest_id, base).await?;
                figures.bytes_received += received.len() as u64;
                let bytes = if is_delta {
                    let len = usize::try_from(file.n_chunks)
                        .ok()
                        .and_then(|n| n.checked_mul(manifest::ENTRY_LEN))
                        .and_then(|n| n.checked_add(manifest::HEADER_LEN))
                        .ok_or_else(|| invalid("the catalogue's chunk count is out of range".into()))?;
                    delta::decode_payload(received, base_bytes.as_deref().unwrap_or_default(), len)
                        .map_err(|e| invalid(format!("its delta does not decode: {e}")))?
                        .to_vec()
                } else {
                    received
                };
                if Hash::of(&bytes).to_hex() != file.manifest_id {
                    return Err(invalid("its content does not match its id".into()));
                }
                metalrack_image_tools::private_file::write_private_file(&path, &bytes)
                    .map_err(|source| SyncError::Io { what: "write", path: path.clone(), source })?;
                bytes
            }
        };
        let manifest = Manifest::parse(&bytes).map_err(|e| invalid(e.to_string()))?;
        if manifest.file_hash.to_hex() != file.file_hash || manifest.file_len != file.file_len {
            return Err(invalid("it describes another file than the catalogue says".into()));
        }
        Ok(manifest)
    }

    /// Delta bases for the chunks of `file` still to fetch, from the local file it most likely
    /// replaces. None when there is no such file or its manifest is unreadable.
    fn delta_bases(
        &self,
        file: &CatalogueFile,
        manifest: &Manifest,
        missing: &[(usize, u64)],
        have: &[CatalogueFile],
        have_manifests: &HashMap<&str, Manifest>,
    ) -> HashMap<usize, Vec<BaseRef>> {
        let old =
            bases::predecessor(file, have).and_then(|old| Some((old, have_manifests.get(old.manifest_id.as_str())?)));
        match old {
            Some((old, old_manifest)) => {
                let old = OldFile::new(self.layout.file_path(&old.file_hash), old_manifest);
                bases::bases_for(manifest, &old, missing)
            }
            None => HashMap::new(),
        }
    }

    /// Every chunk of every complete local file (the current snapshot's and the target's own).
    fn local_chunk_index(
        &self,
        target: &RackCatalogue,
        manifests: &HashMap<String, Manifest>,
        have: &[CatalogueFile],
        have_manifests: &HashMap<&str, Manifest>,
    ) -> HashMap<Hash, ChunkSource> {
        let mut index = HashMap::new();
        let mut add = |file_hash: &str, manifest: &Manifest| {
            let path = Arc::new(self.layout.file_path(file_hash));
            if path.exists() {
                for (offset, chunk) in manifest.chunk_offsets() {
                    index.entry(chunk.hash).or_insert_with(|| ChunkSource { file: path.clone(), offset });
                }
            }
        };
        for file in have {
            if let Some(manifest) = have_manifests.get(file.manifest_id.as_str()) {
                add(&file.file_hash, manifest);
            }
        }
        for file in &target.files {
            add(&file.file_hash, &manifests[&file.manifest_id]);
        }
        index
    }

    /// Fetches `missing` and writes each chunk where it belongs. Returns false when paused by
    /// `may_continue`.
    async fn fetch_all(
        &self,
        builds: &[Arc<Build>],
        places: &Arc<Places>,
        mut missing: Vec<Wanted>,
        bytes_total: u64,
        figures: &mut SyncFigures,
    ) -> Result<bool, SyncError> {
        let mut attempts: HashMap<Hash, u32> = HashMap::new();
        let mut bytes_done = 0u64;
        while !missing.is_empty() {
            let mut batches: Vec<Vec<Wanted>> = Vec::new();
            let mut batch_bytes = 0;
            for chunk in missing.drain(..) {
                let full = batches
                    .last()
                    .is_none_or(|b| batch_bytes >= FETCH_BATCH_BYTES || b.len() >= FETCH_BATCH_CHUNKS_MAX);
                if full {
                    batches.push(Vec::new());
                    batch_bytes = 0;
                }
                batch_bytes += u64::from(chunk.len);
                batches.last_mut().expect("pushed above").push(chunk);
            }
            let mut results =
                futures_util::stream::iter(batches.into_iter().map(|batch| self.fetch_batch(builds, places, batch)))
                    .buffer_unordered(FETCHES_IN_FLIGHT);
            while let Some(result) = results.next().await {
                let batch = result?;
                figures.chunks_fetched += batch.stored;
                figures.bytes_fetched += batch.bytes;
                figures.bytes_received += batch.received;
                figures.bytes_sent += batch.sent;
                bytes_done += batch.bytes;
                (self.progress)(bytes_done, bytes_total);
                for wanted in batch.damaged {
                    let n = attempts.entry(wanted.hash).or_insert(0);
                    *n += 1;
                    figures.chunks_refetched += 1;
                    if *n >= CHUNK_ATTEMPTS_MAX {
                        return Err(SyncError::ChunkDamaged { hash: wanted.hash, attempts: *n });
                    }
                    tracing::warn!(chunk = %wanted.hash, "chunk arrived damaged; fetching it again, whole");
                    // Whole this time: if a base was the trouble, the raw chunk does not need it.
                    missing.push(Wanted { bases: Vec::new(), ..wanted });
                }
                if batch.paused || !(self.may_continue)() {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    async fn fetch_batch(
        &self,
        builds: &[Arc<Build>],
        places: &Arc<Places>,
        batch: Vec<Wanted>,
    ) -> Result<FetchedBatch, SyncError> {
        let mut body = Vec::with_capacity(batch.iter().map(|w| delta::WANT_HEADER_LEN + 32 * w.bases.len()).sum());
        for wanted in &batch {
            Want { hash: wanted.hash, bases: wanted.bases.iter().map(|b| b.hash).collect() }.emit(&mut body);
        }
        let mut out = FetchedBatch { sent: body.len() as u64, ..FetchedBatch::default() };
        let response = self.client.chunks(self.authorization, body).await?;
        let mut stream = response.bytes_stream();
        // A payload is a tag byte and at most the chunk.
        let mut decoder = FrameDecoder::new(CHUNK_LEN_MAX + 1);
        let mut expected = batch.into_iter();
        let mut bases = BaseReader::default();
        let mut verified: Vec<(Hash, delta::Chunk)> = Vec::new();
        let mut verified_bytes = 0usize;
        'stream: loop {
            while let Some((hash, payload)) =
                decoder.next_frame().map_err(|e| SyncError::Protocol { reason: e.to_string() })?
            {
                let Some(wanted) = expected.next() else {
                    return Err(SyncError::Protocol { reason: "more chunks than asked for".into() });
                };
                if hash != wanted.hash {
                    return Err(SyncError::Protocol { reason: format!("got chunk {hash}, expected {}", wanted.hash) });
                }
                let payload_len = payload.len() as u64;
                out.received += payload_len + frame::HEADER_LEN as u64;
                if let Some(limiter) = self.limiter {
                    limiter.take(payload_len).await;
                }
                // The window may close in the middle of a batch (a capped one can take long):
                // stop at this chunk; what is verified so far is written below and kept.
                if !(self.may_continue)() {
                    out.paused = true;
                    break 'stream;
                }
                // A chunk whose delta does not decode, or decodes to other bytes, is damaged:
                // it is never written anywhere.
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
                // Write as we go: memory stays at one piece per request, and a crash loses
                // at most this much.
                if verified_bytes >= WRITE_PIECE_BYTES {
                    write_verified(builds, places, std::mem::take(&mut verified)).await?;
                    verified_bytes = 0;
                }
            }
            match stream.next().await {
                Some(piece) => decoder.push(&piece.map_err(|source| SyncError::Stream { source })?),
                None => break,
            }
        }
        if out.paused {
            write_verified(builds, places, verified).await?;
            return Ok(out);
        }
        decoder.finish().map_err(|e| SyncError::Protocol { reason: e.to_string() })?;
        if let Some(missing) = expected.next() {
            return Err(SyncError::Protocol { reason: format!("the stream ended before chunk {}", missing.hash) });
        }
        write_verified(builds, places, verified).await?;
        Ok(out)
    }
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

/// Writes verified chunks at every place they occur, on the blocking pool, and logs them.
async fn write_verified(
    builds: &[Arc<Build>],
    places: &Arc<Places>,
    verified: Vec<(Hash, delta::Chunk)>,
) -> Result<(), SyncError> {
    if verified.is_empty() {
        return Ok(());
    }
    let builds: Vec<Arc<Build>> = builds.to_vec();
    let places = places.clone();
    tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        for (hash, data) in &verified {
            for &(slot, offset, index) in &places[hash] {
                builds[slot].write_chunk(index, offset, data)?;
            }
        }
        for build in &builds {
            build.flush_progress()?;
        }
        Ok(())
    })
    .await
    .map_err(|e| SyncError::Task(e.to_string()))?
}

#[derive(Debug, Default)]
struct FetchedBatch {
    stored: u64,
    bytes: u64,
    /// Frame bytes received and request bytes sent.
    received: u64,
    sent: u64,
    damaged: Vec<Wanted>,
    /// The window closed before the batch was done.
    paused: bool,
}

/// One file being built as `.HASH.partial`, with a progress log `.HASH.progress` listing the
/// indices of the chunks written. The log is only a hint: on resume every listed chunk is read
/// back and hashed before it is trusted, so neither file needs a flush until the whole file is
/// verified, and a crash at any point costs at most the chunks not yet listed.
struct Build {
    file_hash: String,
    partial: PathBuf,
    target: PathBuf,
    progress_path: PathBuf,
    file: File,
    /// Indices written since the last flush of the log.
    progress: std::sync::Mutex<Vec<u8>>,
    progress_file: std::sync::Mutex<File>,
    manifest: Manifest,
    /// (chunk index, offset) of the chunks still to fetch.
    missing: Vec<(usize, u64)>,
    /// Bytes copied from local files.
    reused: u64,
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SyncError {
    let path = path.to_owned();
    move |source| SyncError::Io { what, path, source }
}

/// A run of consecutive chunks found consecutively in one source file: (source, source offset,
/// out offset, length). One `copy_file_range` per run.
type CopyRun = (Arc<PathBuf>, u64, u64, u64);

impl Build {
    /// Opens or resumes the partial file: keeps the chunks a previous run wrote (checked),
    /// copies the chunks local files have, and lists the rest to fetch.
    fn open(
        layout: &Layout,
        file_hash: &str,
        manifest: Manifest,
        index: &HashMap<Hash, ChunkSource>,
    ) -> Result<Build, SyncError> {
        let partial = layout.partial_path(file_hash);
        let progress_path = layout.progress_path(file_hash);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(io_error("open", &partial))?;
        file.set_len(manifest.file_len).map_err(io_error("size", &partial))?;
        let offsets: Vec<u64> = manifest.chunk_offsets().map(|(offset, _)| offset).collect();
        let mut done = vec![false; manifest.chunks.len()];
        if let Ok(log) = std::fs::read(&progress_path) {
            let mut buf = Vec::new();
            for entry in log.chunks_exact(4) {
                let i = u32::from_le_bytes(entry.try_into().expect("4 bytes")) as usize;
                if i >= done.len() || done[i] {
                    continue;
                }
                let chunk = manifest.chunks[i];
                buf.resize(chunk.len as usize, 0);
                if file.read_exact_at(&mut buf, offsets[i]).is_ok() && Hash::of(&buf) == chunk.hash {
                    done[i] = true;
                }
            }
        }
        let mut log: Vec<u8> =
            done.iter().enumerate().filter(|(_, d)| **d).flat_map(|(i, _)| (i as u32).to_le_bytes()).collect();
        let mut open_sources: HashMap<Arc<PathBuf>, File> = HashMap::new();
        let mut reused = 0u64;
        let mut missing = Vec::new();
        let mut run: Option<CopyRun> = None;
        let mut flush = |run: &mut Option<CopyRun>| -> Result<(), SyncError> {
            if let Some((source, source_offset, out_offset, len)) = run.take() {
                if !open_sources.contains_key(&source) {
                    let f = File::open(source.as_path()).map_err(io_error("open", source.as_path()))?;
                    open_sources.insert(source.clone(), f);
                }
                copy_range(&open_sources[&source], source_offset, &file, out_offset, len)
                    .map_err(io_error("copy into", &partial))?;
                reused += len;
            }
            Ok(())
        };
        for (i, chunk) in manifest.chunks.iter().enumerate() {
            let (out_offset, len) = (offsets[i], u64::from(chunk.len));
            if done[i] {
                flush(&mut run)?;
                continue;
            }
            match index.get(&chunk.hash) {
                Some(src) => {
                    let extends = matches!(&run, Some((f, s, o, l))
                        if Arc::ptr_eq(f, &src.file) && s + l == src.offset && o + l == out_offset);
                    if extends {
                        if let Some(r) = run.as_mut() {
                            r.3 += len;
                        }
                    } else {
                        flush(&mut run)?;
                        run = Some((src.file.clone(), src.offset, out_offset, len));
                    }
                    log.extend_from_slice(&(i as u32).to_le_bytes());
                }
                None => {
                    flush(&mut run)?;
                    missing.push((i, out_offset));
                }
            }
        }
        flush(&mut run)?;
        let mut progress_file = File::create(&progress_path).map_err(io_error("create", &progress_path))?;
        progress_file.write_all(&log).map_err(io_error("write", &progress_path))?;
        Ok(Build {
            file_hash: file_hash.to_owned(),
            target: layout.file_path(file_hash),
            partial,
            progress_path,
            file,
            progress: std::sync::Mutex::new(Vec::new()),
            progress_file: std::sync::Mutex::new(progress_file),
            manifest,
            missing,
            reused,
        })
    }

    /// Writes a verified chunk at its place and notes it for the progress log.
    fn write_chunk(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), SyncError> {
        self.file.write_all_at(data, offset).map_err(io_error("write", &self.partial))?;
        self.progress.lock().expect("lock").extend_from_slice(&index.to_le_bytes());
        Ok(())
    }

    fn flush_progress(&self) -> Result<(), SyncError> {
        let pending = std::mem::take(&mut *self.progress.lock().expect("lock"));
        if !pending.is_empty() {
            let mut log = self.progress_file.lock().expect("lock");
            log.write_all(&pending).map_err(io_error("write", &self.progress_path))?;
        }
        Ok(())
    }

    /// Flushes the file, verifies it whole against its manifest, and renames it into place.
    fn finish(self) -> Result<(), SyncError> {
        self.file.sync_all().map_err(io_error("sync", &self.partial))?;
        if let Err(source) = metalrack_image_tools::verify::verify_file(&self.partial, &self.manifest, |_| {}) {
            // Start this file over: what is on disk is not what was verified on arrival.
            let _ = std::fs::remove_file(&self.progress_path);
            let _ = std::fs::remove_file(&self.partial);
            return Err(SyncError::Verify { file_hash: self.file_hash, source });
        }
        std::fs::rename(&self.partial, &self.target).map_err(io_error("rename", &self.partial))?;
        let _ = std::fs::remove_file(&self.progress_path);
        Ok(())
    }
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
