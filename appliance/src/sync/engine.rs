//! One sync run, the plan: fetch the manifests the rack lacks, open (or resume) each new file,
//! copy the chunks local files already have, fetch the rest in batches (several requests in
//! flight, optionally rate-capped, damaged chunks fetched again), verify each file whole and
//! publish the snapshot. Fetching is in `fetch`, crash-safe file building in `partial`, the
//! store in `crate::snapshot`.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use metalrack_api::images::{CatalogueFile, RackCatalogue, SyncFigures};
use metalrack_image_tools::delta;
use metalrack_image_tools::manifest::Manifest;
use metalrack_image_tools::Hash;

use super::bases::{self, BaseRef, OldFile};
use super::fetch::{self, ChunkSink, FetchError, RateLimiter, Source, Wanted};
use super::partial::{ChunkSource, PartialError, PartialFile};
use crate::snapshot::{SnapshotError, SnapshotMeta, SnapshotStore};

/// Requests for chunks in flight at once: enough to hide a round trip on a LAN, few enough
/// that a rack does not hog the region (each holds at most one batch of memory).
pub const FETCHES_IN_FLIGHT: usize = 4;

// Each fetch in flight may be reading blocks back at once; a file keeps a buffer for each.
const _: () = assert!(super::partial::READ_BUFFERS_KEPT >= FETCHES_IN_FLIGHT);

/// Target bytes per chunk request...
pub const FETCH_BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// ...and at most this many chunks: the region refuses requests for more than
/// `CHUNK_FETCH_MAX`.
const FETCH_BATCH_CHUNKS_MAX: usize = 1024;
const _: () = assert!(FETCH_BATCH_CHUNKS_MAX <= metalrack_api::limits::CHUNK_FETCH_MAX);

/// A chunk that arrives damaged this many times in one run fails the sync (the region's copy is
/// probably bad; the operator has to look).
pub const CHUNK_ATTEMPTS_MAX: u32 = 5;

/// Where each missing chunk goes: (build slot, offset, chunk index) for every place it occurs.
type Places = HashMap<Hash, Vec<(usize, u64, u32)>>;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("manifest {manifest_id} is invalid: {reason}")]
    Manifest { manifest_id: String, reason: String },
    #[error("cannot save manifest {path}")]
    SaveManifest { path: PathBuf, source: std::io::Error },
    #[error("chunk {hash} arrived damaged {attempts} times")]
    ChunkDamaged { hash: Hash, attempts: u32 },
    #[error(transparent)]
    Partial(#[from] PartialError),
    #[error("snapshot store")]
    Snapshot {
        #[from]
        source: SnapshotError,
    },
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
    /// `may_continue` said stop (the sync window closed, or the rack is stopping). Fetched
    /// chunks are kept.
    Paused,
}

/// Reports bytes fetched so far out of the bytes to fetch.
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

pub struct SyncRun<'a> {
    pub store: &'a SnapshotStore,
    pub source: Source<'a>,
    pub limiter: Option<&'a RateLimiter>,
    pub progress: ProgressFn,
    pub may_continue: &'a (dyn Fn() -> bool + Send + Sync),
}

/// The files being built and where each fetched chunk goes in them.
struct Placement {
    builds: Vec<Arc<PartialFile>>,
    places: Arc<Places>,
}

impl ChunkSink for Placement {
    type Error = SyncError;

    /// Writes verified chunks at every place they occur, on the blocking pool, and logs them.
    async fn write(&self, verified: Vec<(Hash, delta::Chunk)>) -> Result<(), SyncError> {
        if verified.is_empty() {
            return Ok(());
        }
        let builds = self.builds.clone();
        let places = self.places.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
            for (hash, data) in &verified {
                for &(slot, offset, index) in &places[hash] {
                    builds[slot].write_chunk(index, offset, data)?;
                }
            }
            for build in &builds {
                build.flush_progress()?;
                build.hash_ready_blocks()?;
            }
            Ok(())
        })
        .await
        .map_err(|e| SyncError::Task(e.to_string()))?
    }
}

impl SyncRun<'_> {
    pub async fn run(&self, target: &RackCatalogue) -> Result<RunOutcome, SyncError> {
        let started = Instant::now();
        let mut figures = SyncFigures::default();
        // Complete local files of the current snapshot: sources of chunks and delta bases.
        let have: Vec<CatalogueFile> = match self.store.current()? {
            Some(current) => {
                current.files.into_iter().filter(|f| self.store.file_path(&f.file_hash).exists()).collect()
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
                let bytes = std::fs::read(self.store.manifest_path(&f.manifest_id)).ok()?;
                Some((f.manifest_id.as_str(), Manifest::parse(&bytes).ok()?))
            })
            .collect();
        let index = Arc::new(self.local_chunk_index(target, &manifests, &have, &have_manifests));
        let needed: Vec<&CatalogueFile> = {
            let mut seen = HashSet::new();
            target
                .files
                .iter()
                .filter(|f| !self.store.file_path(&f.file_hash).exists() && seen.insert(f.file_hash.as_str()))
                .collect()
        };
        // Open (or resume) each new file, copy what local files have, and list what to fetch.
        let mut builds = Vec::new();
        for file in &needed {
            let manifest = manifests[&file.manifest_id].clone();
            let store = self.store.clone();
            let file_hash = file.file_hash.clone();
            let index = index.clone();
            let build = tokio::task::spawn_blocking(move || PartialFile::open(&store, &file_hash, manifest, &index))
                .await
                .map_err(|e| SyncError::Task(e.to_string()))??;
            builds.push(Arc::new(build));
        }
        figures.bytes_reused = builds.iter().map(|b| b.reused).sum();
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
        let placement = Placement { builds, places: Arc::new(places) };
        if !self.fetch_all(&placement, missing, bytes_total, &mut figures).await? {
            for build in &placement.builds {
                build.flush_progress()?;
            }
            return Ok(RunOutcome::Paused);
        }
        for build in placement.builds {
            let build = Arc::try_unwrap(build).map_err(|_| SyncError::Task("a file build is still shared".into()))?;
            tokio::task::spawn_blocking(move || build.finish()).await.map_err(|e| SyncError::Task(e.to_string()))??;
        }
        let store = self.store.clone();
        let revision = target.revision;
        let files = target.files.clone();
        let meta = tokio::task::spawn_blocking(move || -> Result<SnapshotMeta, SyncError> {
            let meta = store.publish(revision, &files)?;
            store.collect_garbage(&meta)?;
            Ok(meta)
        })
        .await
        .map_err(|e| SyncError::Task(e.to_string()))??;
        figures.duration_ms = started.elapsed().as_millis() as u64;
        figures.finished_at_ms = crate::status::now_ms();
        Ok(RunOutcome::Published { meta, figures })
    }

    /// The manifest of `file`, from disk or from the region (as a delta against `base`, a
    /// manifest the rack has, when the region can), checked against the catalogue.
    async fn manifest(
        &self,
        file: &CatalogueFile,
        base: Option<&str>,
        figures: &mut SyncFigures,
    ) -> Result<Manifest, SyncError> {
        let invalid = |reason: String| SyncError::Manifest { manifest_id: file.manifest_id.clone(), reason };
        let path = self.store.manifest_path(&file.manifest_id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(_) => {
                let base = base.and_then(|id| Some((id, std::fs::read(self.store.manifest_path(id)).ok()?)));
                let (bytes, received) =
                    fetch::manifest(self.source, file, base.as_ref().map(|(id, b)| (*id, b.as_slice()))).await?;
                figures.bytes_received += received;
                metalrack_image_tools::private_file::write_private_file(&path, &bytes)
                    .map_err(|source| SyncError::SaveManifest { path: path.clone(), source })?;
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
                let old = OldFile::new(self.store.file_path(&old.file_hash), old_manifest);
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
            let path = Arc::new(self.store.file_path(file_hash));
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

    /// Fetches `missing` and writes each chunk where it belongs; a damaged chunk is asked for
    /// again, whole, up to [`CHUNK_ATTEMPTS_MAX`] times. Returns false when paused by
    /// `may_continue`.
    async fn fetch_all(
        &self,
        placement: &Placement,
        mut missing: Vec<Wanted>,
        bytes_total: u64,
        figures: &mut SyncFigures,
    ) -> Result<bool, SyncError> {
        let mut attempts: HashMap<Hash, u32> = HashMap::new();
        let mut bytes_done = 0u64;
        while !missing.is_empty() {
            let batches = into_batches(std::mem::take(&mut missing));
            let mut results = futures_util::stream::iter(
                batches
                    .into_iter()
                    .map(|batch| fetch::batch(self.source, self.limiter, self.may_continue, placement, batch)),
            )
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
}

/// Splits the chunks to fetch into requests of about [`FETCH_BATCH_BYTES`], at most
/// [`FETCH_BATCH_CHUNKS_MAX`] chunks each, in order.
fn into_batches(missing: Vec<Wanted>) -> Vec<Vec<Wanted>> {
    let mut batches: Vec<Vec<Wanted>> = Vec::new();
    let mut batch_bytes = 0;
    for chunk in missing {
        let full = batches.last().is_none_or(|b| batch_bytes >= FETCH_BATCH_BYTES || b.len() >= FETCH_BATCH_CHUNKS_MAX);
        if full {
            batches.push(Vec::new());
            batch_bytes = 0;
        }
        batch_bytes += u64::from(chunk.len);
        batches.last_mut().expect("pushed above").push(chunk);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(len: u32) -> Wanted {
        Wanted { hash: Hash([0; 32]), len, bases: Vec::new() }
    }

    #[test]
    fn batches_are_capped_by_bytes_and_by_count() {
        // 1 MiB chunks: eight fill a batch, the ninth starts the next.
        let big: Vec<Wanted> = (0..20).map(|_| wanted(1024 * 1024)).collect();
        let lens: Vec<usize> = into_batches(big).iter().map(Vec::len).collect();
        assert_eq!(lens, vec![8, 8, 4]);
        // Tiny chunks: the count cap applies first.
        let tiny: Vec<Wanted> = (0..2500).map(|_| wanted(16)).collect();
        let lens: Vec<usize> = into_batches(tiny).iter().map(Vec::len).collect();
        assert_eq!(lens, vec![FETCH_BATCH_CHUNKS_MAX, FETCH_BATCH_CHUNKS_MAX, 452]);
        assert!(into_batches(Vec::new()).is_empty());
    }
}
