//! The image catalogue: streaming uploads from `imgtool push` (manifest, missing chunks,
//! commit), listing and deleting versions with garbage collection, each rack's sync status per
//! version, and what racks sync through (the catalogue long-poll, manifests, chunk streams).
//!
//! The rules: a chunk is stored only once its hash is checked and it belongs to the upload's
//! manifest; a version joins the catalogue only when every chunk is present and durable and
//! together they hash to the manifest's file hash; a deleted version's chunks go once nothing
//! references them.

pub mod store;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use metalrack_api::images::{
    validate_image_name, validate_image_token, validate_kind, ChunksStored, CommitResponse, DeleteVersionResponse,
    FileView, ImageView, RackCatalogue, RackSyncView, SyncPhase, UploadResponse, VersionSyncStatus, VersionView,
};
use metalrack_image_tools::delta::{self, DeltaError};
use metalrack_image_tools::frame::{self, FrameDecoder, FrameError};
use metalrack_image_tools::manifest::{self, Manifest, ManifestError, CHUNK_LEN_MAX};
use metalrack_image_tools::store::{ChunkStore, StoreError as ChunkStoreError};
use metalrack_image_tools::Hash;
use tokio::sync::Mutex;

use crate::db::StoreError;
use crate::racks::RackRow;
use crate::state::Shared;
use crate::users::User;
use crate::util::write_private_file;
use store::{CommitOutcome, UploadRow};

/// Largest manifest accepted: 64 MiB is ~1.8 M chunks, a 116 GiB file at the 64 KiB average.
pub const MANIFEST_BYTES_MAX: usize = metalrack_api::limits::MANIFEST_BYTES_MAX;

/// Chunks a rack may ask for in one request.
pub const CHUNK_FETCH_MAX: usize = metalrack_api::limits::CHUNK_FETCH_MAX;

/// Longest a rack's catalogue long-poll is held open.
pub const LONG_POLL_MAX: Duration = metalrack_api::limits::CATALOGUE_POLL_HOLD_MAX;

/// A client that sends nothing for this long while uploading chunks is cut off.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest chunk request body: [`CHUNK_FETCH_MAX`] wants naming every base they may.
pub const CHUNK_REQUEST_BYTES_MAX: usize = CHUNK_FETCH_MAX * (delta::WANT_HEADER_LEN + 32 * delta::BASES_MAX);

/// Chunk sets kept in memory: one per upload that may be in progress (each ~50 bytes per chunk:
/// ~8 MiB for a 10 GiB image). An abandoned upload's set is evicted when room is needed.
pub const UPLOAD_SETS_CACHED_MAX: usize = store::UPLOADS_PENDING_MAX as usize;

/// Chunk frames buffered between the disk reader and the socket per chunk request: bounds
/// memory to ~4 chunks per rack download however slow the rack reads.
const SERVE_QUEUE_FRAMES: usize = 4;

/// Received chunk bytes handed to one blocking store task: ~16 average chunks, so the cost of
/// a task (a thread hand-off) is spread over many chunks, while the network side goes on
/// decoding the next group.
const STORE_GROUP_BYTES: usize = 1024 * 1024;

/// Store tasks of one chunk batch running at once. Two overlap hashing, decompressing and
/// writing with receiving on a two-core region; with several batches in flight (imgtool sends
/// [`UPLOAD_CONNECTIONS`](metalrack_api::limits) at once) the blocking pool caps the total. Memory per
/// batch: this many groups plus the one being filled, each [`STORE_GROUP_BYTES`] plus at most
/// one chunk (`CHUNK_LEN_MAX`).
const STORE_GROUPS_IN_FLIGHT: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error("only administrators may change the catalogue")]
    NotAdmin,
    #[error("{reason}")]
    InvalidImage { reason: String },
    #[error("invalid manifest")]
    InvalidManifest { source: ManifestError },
    #[error("{name} {arch} version {version} already has a different {kind}; push it as a new --version")]
    VersionConflict { name: String, arch: String, version: String, kind: String },
    #[error("cannot write manifest {path}")]
    WriteManifest { path: PathBuf, source: std::io::Error },
    #[error("cannot read manifest {manifest_id}")]
    ReadManifest { manifest_id: String, source: std::io::Error },
    #[error("stored manifest {manifest_id} is damaged")]
    ManifestDamaged { manifest_id: String, source: ManifestError },
    #[error("too many uploads in progress; retry later")]
    UploadsFull,
    #[error("no upload {upload_id:?} in progress (it was committed or expired); push again")]
    NoSuchUpload { upload_id: String },
    #[error("no data for {} s; send the batch again", BODY_IDLE_TIMEOUT.as_secs())]
    BodyIdle,
    #[error("upload interrupted: {reason}")]
    UploadInterrupted { reason: String },
    #[error("a chunk batch is at most {limit} bytes; send fewer chunks per request")]
    BatchTooLarge { limit: u64 },
    #[error("malformed chunk frame")]
    MalformedFrame { source: FrameError },
    #[error("the batch ends inside a chunk frame")]
    BatchTruncated { source: FrameError },
    #[error("chunk {hash} is not in this upload's manifest")]
    ChunkNotInManifest { hash: Hash },
    #[error("chunk {expected} was damaged in transit (its content hashes to {actual}); send it again")]
    ChunkDamagedInTransit { expected: Hash, actual: Hash },
    #[error("chunk {hash}'s payload does not decode to its {len} bytes; send it again")]
    ChunkPayloadInvalid { hash: Hash, len: u32, source: DeltaError },
    #[error("cannot store chunk {hash}")]
    StoreChunk { hash: Hash, source: ChunkStoreError },
    #[error("{n_missing} chunks are still missing; push again to send them")]
    ChunksMissing { n_missing: usize },
    #[error("chunk {hash} was damaged on disk and removed; push again")]
    ChunkDamagedOnDisk { hash: Hash },
    #[error("the chunks make a file hashing to {actual}, not the manifest's {expected}")]
    FileHashMismatch { actual: Hash, expected: Hash },
    #[error("cannot check the version's chunks")]
    CheckChunks { source: ChunkStoreError },
    #[error("this version already has a different file of that kind; push it as a new --version")]
    FileConflict,
    #[error("no version {version:?} of image {image_id:?}")]
    NoSuchVersion { image_id: String, version: String },
    #[error("the version was deleted but its chunks were not collected")]
    CollectGarbage { step: &'static str, source: std::io::Error },
    #[error("the version was deleted but its chunks were not collected")]
    CollectChunks { source: ChunkStoreError },
    #[error("{text:?} is not a 64-character hex hash")]
    InvalidHash { text: String },
    #[error("invalid chunk request")]
    InvalidWants { source: DeltaError },
    #[error("ask for 1 to {CHUNK_FETCH_MAX} chunks")]
    NoWants,
    #[error("no manifest {manifest_id}")]
    NoSuchManifest { manifest_id: String },
    #[error("no chunk {hash}")]
    NoSuchChunk { hash: Hash },
    #[error("cannot encode a manifest delta")]
    EncodeDelta { source: DeltaError },
    #[error("rack gone")]
    RackGone,
    #[error("region shutting down")]
    ShuttingDown,
    #[error("a catalogue task stopped before it finished")]
    Task { source: tokio::task::JoinError },
    #[error("cannot list the rack's machines")]
    Machines { source: Box<crate::machines::MachinesError> },
    #[error("cannot {step}")]
    Store { step: &'static str, source: StoreError },
}

fn store_error(step: &'static str) -> impl FnOnce(StoreError) -> CatalogueError {
    move |source| CatalogueError::Store { step, source }
}

fn task_error(source: tokio::task::JoinError) -> CatalogueError {
    CatalogueError::Task { source }
}

fn require_admin(user: &User) -> Result<(), CatalogueError> {
    if user.is_admin {
        Ok(())
    } else {
        Err(CatalogueError::NotAdmin)
    }
}

pub fn parse_hash(text: &str) -> Result<Hash, CatalogueError> {
    Hash::from_hex(text).map_err(|_| CatalogueError::InvalidHash { text: text.to_owned() })
}

/// What an upload is for: one file of one image version.
#[derive(Debug, Clone)]
pub struct UploadTarget {
    pub name: String,
    pub arch: String,
    pub kind: String,
    pub version: String,
}

/// A manifest as a rack asked for it.
#[derive(Debug)]
pub enum ManifestPayload {
    /// The manifest itself.
    Raw(Vec<u8>),
    /// A delta payload against the base the rack named.
    Delta(Vec<u8>),
}

/// The catalogue's on-disk parts and in-memory caches, shared by all requests.
#[derive(Debug)]
pub struct Catalogue {
    shared: Shared,
    chunks: ChunkStore,
    manifests_dir: PathBuf,
    /// Chunk sets of active uploads, so each batch does not re-read the manifest: a cache of at
    /// most [`UPLOAD_SETS_CACHED_MAX`] entries (an entry dropped is read again from its
    /// manifest, and forgets which compressed copies it wrote); an upload's entry goes when it
    /// commits or conflicts.
    upload_sets: Mutex<HashMap<String, Arc<UploadChunks>>>,
    /// Serializes garbage collection against itself.
    gc: Mutex<()>,
    /// Test fault hook: corrupt this many chunk frames served to racks (env
    /// `METALRACK_FAULT_CORRUPT_CHUNKS`), to prove racks detect and refetch damaged chunks.
    corrupt_chunks_left: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogueOpenError {
    #[error("cannot open chunk store")]
    Chunks { source: ChunkStoreError },
    #[error("cannot create manifest dir {path}")]
    Manifests { path: PathBuf, source: std::io::Error },
}

/// An image and some of its versions, newest first ([`Catalogue::images_with_file`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageVersions {
    pub name: String,
    pub arch: String,
    pub versions: Vec<String>,
}

impl Catalogue {
    pub fn open(shared: Shared) -> Result<Catalogue, CatalogueOpenError> {
        let data_dir: &Path = shared.data_dir();
        // Chunks are flushed in bulk (one syncfs) before a version commits, not one by one.
        let chunks = ChunkStore::open_volatile(&data_dir.join("chunks"))
            .map_err(|source| CatalogueOpenError::Chunks { source })?;
        let manifests_dir = data_dir.join("manifests");
        std::fs::create_dir_all(&manifests_dir)
            .map_err(|source| CatalogueOpenError::Manifests { path: manifests_dir.clone(), source })?;
        let corrupt = std::env::var("METALRACK_FAULT_CORRUPT_CHUNKS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        if corrupt > 0 {
            tracing::warn!(corrupt, "fault hook on: corrupting chunks served to racks");
        }
        Ok(Catalogue {
            shared,
            chunks,
            manifests_dir,
            upload_sets: Mutex::default(),
            gc: Mutex::default(),
            corrupt_chunks_left: corrupt.into(),
        })
    }

    fn manifest_path(&self, manifest_id: &str) -> PathBuf {
        self.manifests_dir.join(manifest_id)
    }

    async fn load_manifest(&self, manifest_id: &str) -> Result<Manifest, CatalogueError> {
        let bytes = tokio::fs::read(self.manifest_path(manifest_id))
            .await
            .map_err(|source| CatalogueError::ReadManifest { manifest_id: manifest_id.to_owned(), source })?;
        Manifest::parse(&bytes)
            .map_err(|source| CatalogueError::ManifestDamaged { manifest_id: manifest_id.to_owned(), source })
    }

    /// Step 1 of a push: the manifest. Answers which chunks the region lacks.
    pub async fn start_upload(
        &self,
        actor: &User,
        target: &UploadTarget,
        manifest_bytes: Bytes,
    ) -> Result<UploadResponse, CatalogueError> {
        require_admin(actor)?;
        let invalid = |reason| CatalogueError::InvalidImage { reason };
        validate_image_name(&target.name).map_err(invalid)?;
        validate_image_token("arch", &target.arch).map_err(invalid)?;
        validate_image_token("version", &target.version).map_err(invalid)?;
        validate_kind(&target.kind).map_err(invalid)?;
        let manifest = Manifest::parse(&manifest_bytes).map_err(|source| CatalogueError::InvalidManifest { source })?;
        let file_hash = manifest.file_hash.to_hex();
        let store = &self.shared.store;
        let existing = store
            .committed_file_hash(&target.name, &target.arch, &target.version, &target.kind)
            .await
            .map_err(store_error("look up the committed file"))?;
        if existing.is_some_and(|existing| existing != file_hash) {
            return Err(CatalogueError::VersionConflict {
                name: target.name.clone(),
                arch: target.arch.clone(),
                version: target.version.clone(),
                kind: target.kind.clone(),
            });
        }
        let manifest_id = Hash::of(&manifest_bytes).to_hex();
        let path = self.manifest_path(&manifest_id);
        if !path.exists() {
            let bytes = manifest_bytes.clone();
            let target = path.clone();
            tokio::task::spawn_blocking(move || write_private_file(&target, &bytes))
                .await
                .map_err(task_error)?
                .map_err(|source| CatalogueError::WriteManifest { path, source })?;
        }
        let upload_id = store
            .create_upload(&target.name, &target.arch, &target.kind, &target.version, &manifest_id)
            .await
            .map_err(store_error("start the upload"))?
            .ok_or(CatalogueError::UploadsFull)?;
        let chunks = self.chunks.clone();
        let (missing, missing_bytes) = tokio::task::spawn_blocking(move || {
            let mut seen = HashSet::new();
            let mut missing = Vec::new();
            let mut missing_bytes = 0u64;
            for (index, chunk) in manifest.chunks.iter().enumerate() {
                if seen.insert(chunk.hash) && !chunks.contains(&chunk.hash) {
                    missing.push(index as u32);
                    missing_bytes += u64::from(chunk.len);
                }
            }
            (missing, missing_bytes)
        })
        .await
        .map_err(task_error)?;
        tracing::info!(upload = %upload_id, image = %target.name, kind = %target.kind, n_missing = missing.len(), "upload started");
        Ok(UploadResponse {
            upload_id,
            manifest_id,
            n_chunks: manifest_bytes.len().saturating_sub(manifest::HEADER_LEN) as u64 / manifest::ENTRY_LEN as u64,
            missing,
            missing_bytes,
            batch_bytes_max: self.shared.config.upload_batch_bytes_max,
            chunk_payloads: true,
        })
    }

    async fn upload_row(&self, upload_id: &str) -> Result<UploadRow, CatalogueError> {
        self.shared
            .store
            .upload(upload_id)
            .await
            .map_err(store_error("look up the upload"))?
            .ok_or_else(|| CatalogueError::NoSuchUpload { upload_id: upload_id.to_owned() })
    }

    async fn upload_set(&self, upload: &UploadRow) -> Result<Arc<UploadChunks>, CatalogueError> {
        if let Some(set) = self.upload_sets.lock().await.get(&upload.id) {
            return Ok(set.clone());
        }
        let manifest = self.load_manifest(&upload.manifest_id).await?;
        let set = Arc::new(UploadChunks {
            lens: manifest.chunks.iter().map(|c| (c.hash, c.len)).collect(),
            copies_written: std::sync::Mutex::default(),
        });
        let mut sets = self.upload_sets.lock().await;
        if sets.len() >= UPLOAD_SETS_CACHED_MAX {
            // Uploads abandoned without a commit would otherwise stay here for good; evicting
            // any entry is safe, it is read again from its manifest when its upload goes on.
            if let Some(evicted) = sets.keys().next().cloned() {
                sets.remove(&evicted);
            }
        }
        sets.insert(upload.id.clone(), set.clone());
        Ok(set)
    }

    /// Step 2: chunks, as a stream of frames. Each is checked against the manifest and its hash
    /// before it is stored; the body is never held whole in memory. With `payloads` each frame
    /// carries a payload (the chunk raw, or compressed by the client: decoded here and checked
    /// like a raw chunk, and then kept as the chunk's compressed copy); without it, the chunk.
    /// Frames are stored in groups by blocking tasks while the next ones arrive
    /// ([`STORE_GROUP_BYTES`], [`STORE_GROUPS_IN_FLIGHT`]).
    pub async fn upload_chunks<S, E>(
        &self,
        actor: &User,
        upload_id: &str,
        payloads: bool,
        mut body: S,
    ) -> Result<ChunksStored, CatalogueError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        require_admin(actor)?;
        let upload = self.upload_row(upload_id).await?;
        let wanted = self.upload_set(&upload).await?;
        let limit = self.shared.config.upload_batch_bytes_max;
        let mut decoder = FrameDecoder::new(CHUNK_LEN_MAX + u32::from(payloads));
        let mut received = 0u64;
        let mut totals = ChunksStored { stored: 0, already_present: 0 };
        let mut tasks = tokio::task::JoinSet::new();
        let mut group = StoreGroup::default();
        let mut body_done = false;
        while !body_done {
            let next =
                tokio::time::timeout(BODY_IDLE_TIMEOUT, body.next()).await.map_err(|_| CatalogueError::BodyIdle)?;
            match next {
                Some(piece) => {
                    let piece = piece.map_err(|e| CatalogueError::UploadInterrupted { reason: e.to_string() })?;
                    received += piece.len() as u64;
                    if received > limit {
                        return Err(CatalogueError::BatchTooLarge { limit });
                    }
                    decoder.push(&piece);
                }
                None => body_done = true,
            }
            while let Some((hash, data)) =
                decoder.next_frame().map_err(|source| CatalogueError::MalformedFrame { source })?
            {
                let Some(&len) = wanted.lens.get(&hash) else {
                    return Err(CatalogueError::ChunkNotInManifest { hash });
                };
                group.bytes += data.len();
                group.frames.push((hash, len, data));
                if group.bytes >= STORE_GROUP_BYTES {
                    while tasks.len() >= STORE_GROUPS_IN_FLIGHT {
                        add_stored(&mut totals, tasks.join_next().await)?;
                    }
                    let (chunks, wanted, group) = (self.chunks.clone(), wanted.clone(), std::mem::take(&mut group));
                    tasks.spawn_blocking(move || store_group(&chunks, &wanted, payloads, group));
                }
            }
        }
        if !group.frames.is_empty() {
            let (chunks, wanted) = (self.chunks.clone(), wanted.clone());
            tasks.spawn_blocking(move || store_group(&chunks, &wanted, payloads, group));
        }
        while !tasks.is_empty() {
            add_stored(&mut totals, tasks.join_next().await)?;
        }
        decoder.finish().map_err(|source| CatalogueError::BatchTruncated { source })?;
        Ok(totals)
    }

    /// Step 3: every chunk present and the whole file hashing right, the version joins the
    /// catalogue.
    pub async fn commit_upload(&self, actor: &User, upload_id: &str) -> Result<CommitResponse, CatalogueError> {
        require_admin(actor)?;
        let upload = self.upload_row(upload_id).await?;
        let manifest = self.load_manifest(&upload.manifest_id).await?;
        let chunks = self.chunks.clone();
        let checked = manifest.clone();
        // Copies this upload wrote were checked as they arrived; an evicted set (a long or
        // abandoned upload) has forgotten them, and then every copy is checked.
        let copies_checked = match self.upload_sets.lock().await.get(&upload.id) {
            Some(set) => set.copies_written.lock().map(|copies| copies.clone()).unwrap_or_default(),
            None => HashSet::new(),
        };
        tokio::task::spawn_blocking(move || check_version_chunks(&chunks, &checked, &copies_checked))
            .await
            .map_err(task_error)??;
        let file_hash = manifest.file_hash.to_hex();
        let outcome = self
            .shared
            .store
            .commit_upload(&upload, &file_hash, manifest.file_len, manifest.chunks.len() as u64)
            .await
            .map_err(store_error("commit the upload"))?;
        // Committed or refused, the upload is over (the store deleted its row): release its set.
        self.upload_sets.lock().await.remove(&upload.id);
        if let CommitOutcome::Conflict { .. } = outcome {
            return Err(CatalogueError::FileConflict);
        }
        let message = format!(
            "{} {} version {}: {} committed ({} bytes, {} chunks)",
            upload.image_name,
            upload.arch,
            upload.version,
            upload.kind,
            manifest.file_len,
            manifest.chunks.len()
        );
        self.shared
            .store
            .record_event("image.committed", &actor.username, &message)
            .await
            .map_err(store_error("record the commit"))?;
        self.shared.notify_change();
        Ok(CommitResponse {
            image: upload.image_name,
            arch: upload.arch,
            version: upload.version,
            kind: upload.kind,
            file_hash,
        })
    }

    /// The images with a version holding a file of `kind`, each with those versions newest
    /// first: what a deploy can name. Reads the catalogue alone, not every rack's sync state as
    /// [`Catalogue::image_views`] does (a machine's page lists these; with 1,000 racks the
    /// views would read every rack's files for each page).
    pub async fn images_with_file(&self, kind: &str) -> Result<Vec<ImageVersions>, CatalogueError> {
        let images = self.shared.store.images().await.map_err(store_error("list images"))?;
        Ok(images
            .into_iter()
            .filter_map(|image| {
                // The store lists versions newest first.
                let versions: Vec<String> = image
                    .versions
                    .into_iter()
                    .filter(|v| v.files.iter().any(|f| f.kind == kind))
                    .map(|v| v.version)
                    .collect();
                (!versions.is_empty()).then_some(ImageVersions { name: image.name, arch: image.arch, versions })
            })
            .collect())
    }

    /// Every image with its versions and each rack's sync status for each version.
    pub async fn image_views(&self) -> Result<Vec<ImageView>, CatalogueError> {
        let images = self.shared.store.images().await.map_err(store_error("list images"))?;
        let racks = self.shared.store.racks().await.map_err(store_error("list racks"))?;
        let held = self.shared.store.rack_catalogue_files().await.map_err(store_error("list racks' files"))?;
        let nothing = HashSet::new();
        Ok(images
            .into_iter()
            .map(|image| ImageView {
                id: image.id,
                name: image.name,
                arch: image.arch,
                versions: image
                    .versions
                    .into_iter()
                    .map(|version| {
                        let files: Vec<FileView> = version
                            .files
                            .iter()
                            .map(|f| FileView {
                                kind: f.kind.clone(),
                                file_hash: f.file_hash.clone(),
                                file_len: f.file_len as u64,
                                n_chunks: f.n_chunks as u64,
                            })
                            .collect();
                        let racks = racks
                            .iter()
                            .map(|rack| version_sync_view(rack, held.get(&rack.id).unwrap_or(&nothing), &files))
                            .collect();
                        VersionView {
                            version: version.version,
                            created_at_ms: version.created_at_ms,
                            size_bytes: files.iter().map(|f| f.file_len).sum(),
                            n_chunks: files.iter().map(|f| f.n_chunks).sum(),
                            files,
                            racks,
                        }
                    })
                    .collect(),
            })
            .collect())
    }

    /// Deletes a version, then removes the manifests and chunks nothing references any more.
    pub async fn delete_version(
        &self,
        actor: &User,
        image_id: &str,
        version: &str,
    ) -> Result<DeleteVersionResponse, CatalogueError> {
        require_admin(actor)?;
        let _gc = self.gc.lock().await;
        let store = &self.shared.store;
        if !store.delete_version(image_id, version).await.map_err(store_error("delete the version"))? {
            return Err(CatalogueError::NoSuchVersion { image_id: image_id.to_owned(), version: version.to_owned() });
        }
        self.shared.notify_change();
        let referenced = store.referenced_manifest_ids().await.map_err(store_error("list referenced manifests"))?;
        let manifests_dir = self.manifests_dir.clone();
        let chunks = self.chunks.clone();
        let result = tokio::task::spawn_blocking(move || collect_garbage(&manifests_dir, &chunks, &referenced))
            .await
            .map_err(task_error)??;
        let message = format!(
            "version {version} of image {image_id} deleted: {} chunks, {} bytes reclaimed",
            result.chunks_removed, result.reclaimed_bytes
        );
        store
            .record_event("image.deleted", &actor.username, &message)
            .await
            .map_err(store_error("record the deletion"))?;
        Ok(result)
    }

    /// The catalogue for a rack, held open (long-poll) until something changes or `wait`
    /// passes (at most [`LONG_POLL_MAX`]). `after` is the revision the rack has seen and
    /// `requested` the sync request counter it has handled: either differing answers at once.
    pub async fn rack_catalogue(
        &self,
        rack_id: &str,
        after: i64,
        requested: i64,
        changes_seen: Option<u64>,
        wait: Duration,
    ) -> Result<RackCatalogue, CatalogueError> {
        let deadline = tokio::time::Instant::now() + wait.min(LONG_POLL_MAX);
        // Subscribe before reading, so a change between the read and the wait is not missed.
        let mut changes = self.shared.watch_changes();
        let changes_now = changes.borrow_and_update().for_rack(rack_id);
        let store = &self.shared.store;
        let revision = store.catalogue_revision().await.map_err(store_error("read the catalogue revision"))?;
        let rack =
            store.rack(rack_id).await.map_err(store_error("look up the rack"))?.ok_or(CatalogueError::RackGone)?;
        // A change made after the rack's last answer was read (a machine deployed while the rack
        // was between polls) moved the count: answer at once. Racks that send no count (older
        // ones) wait as before.
        let changed = revision != after
            || rack.sync_requested != requested
            || changes_seen.is_some_and(|seen| seen != changes_now);
        if !changed && !self.shared.is_closing() {
            loop {
                tokio::select! {
                    result = changes.changed() => {
                        if result.is_err() {
                            return Err(CatalogueError::ShuttingDown);
                        }
                        // Another rack's machines changed: this poll stays held, at no cost
                        // beyond the wake.
                        if changes.borrow_and_update().for_rack(rack_id) != changes_now || self.shared.is_closing() {
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
        // Any change ends the wait, a policy change alone too: the rack needs the new policy.
        self.rack_catalogue_now(rack_id).await
    }

    async fn rack_catalogue_now(&self, rack_id: &str) -> Result<RackCatalogue, CatalogueError> {
        // Read before the state it covers: a change after this read shows at the next poll.
        let changes_seen = self.shared.watch_changes().borrow().for_rack(rack_id);
        let store = &self.shared.store;
        let rack =
            store.rack(rack_id).await.map_err(store_error("look up the rack"))?.ok_or(CatalogueError::RackGone)?;
        let deploy_env = crate::machines::deploy_env(&self.shared)
            .await
            .map_err(|source| CatalogueError::Machines { source: Box::new(source) })?;
        Ok(RackCatalogue {
            revision: store.catalogue_revision().await.map_err(store_error("read the catalogue revision"))?,
            sync_requested: rack.sync_requested,
            policy: rack.sync_policy,
            files: store.catalogue_files().await.map_err(store_error("list the catalogue"))?,
            machines: crate::machines::rack_boots(&self.shared, rack_id, deploy_env.as_ref())
                .await
                .map_err(|source| CatalogueError::Machines { source: Box::new(source) })?,
            deploy_env,
            changes_seen,
            // The rack row was read before the machines: they are at least this new.
            boot_generation: rack.boot_generation,
        })
    }

    /// A manifest for a rack: raw, or (when the rack names a manifest it has, usually the
    /// previous version of the same file) a delta payload against it, which for a small change
    /// is a few hundred bytes instead of 36 bytes per chunk.
    pub async fn rack_manifest(
        &self,
        manifest_id: &str,
        base: Option<&str>,
    ) -> Result<ManifestPayload, CatalogueError> {
        parse_hash(manifest_id)?;
        let bytes = match tokio::fs::read(self.manifest_path(manifest_id)).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CatalogueError::NoSuchManifest { manifest_id: manifest_id.to_owned() })
            }
            Err(source) => return Err(CatalogueError::ReadManifest { manifest_id: manifest_id.to_owned(), source }),
        };
        let Some(base_id) = base else {
            return Ok(ManifestPayload::Raw(bytes));
        };
        parse_hash(base_id)?;
        // A base the region no longer has costs nothing: the payload is then the manifest, raw.
        let base = tokio::fs::read(self.manifest_path(base_id)).await.unwrap_or_default();
        let payload = tokio::task::spawn_blocking(move || {
            let mut payload = Vec::with_capacity(bytes.len() + 1);
            delta::encode_payload(&bytes, &base, &mut payload).map(|_| payload)
        })
        .await
        .map_err(task_error)?
        .map_err(|source| CatalogueError::EncodeDelta { source })?;
        Ok(ManifestPayload::Delta(payload))
    }

    /// Chunks for a rack: `body` lists wants (a chunk hash and up to four chunks the rack has
    /// where that chunk goes, see `metalrack_image_tools::delta`); the stream carries one frame
    /// per want, in order, with the chunk raw, as a zstd delta against those bases, or as its
    /// compressed copy (see `chunk_payload`). At most
    /// [`SERVE_QUEUE_FRAMES`] frames wait for a slow rack.
    pub fn rack_chunks(
        self: &Arc<Self>,
        body: &[u8],
    ) -> Result<impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static, CatalogueError> {
        let wants =
            delta::Want::parse_all(body, CHUNK_FETCH_MAX).map_err(|source| CatalogueError::InvalidWants { source })?;
        if wants.is_empty() {
            return Err(CatalogueError::NoWants);
        }
        if let Some(missing) = wants.iter().find(|w| !self.chunks.contains(&w.hash)) {
            return Err(CatalogueError::NoSuchChunk { hash: missing.hash });
        }
        let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(SERVE_QUEUE_FRAMES);
        let catalogue = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut prefix = Vec::new();
            for want in wants {
                let item = catalogue.chunk_payload(&want, &mut prefix).map(Bytes::from);
                let failed = item.is_err();
                if sender.blocking_send(item).is_err() || failed {
                    break; // the rack hung up, or the read failed and the stream ends in an error
                }
            }
        });
        Ok(futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        }))
    }
}

/// What an upload may send: each chunk of its manifest with its length, and which compressed
/// copies it wrote in this process (checked as they were written, so its commit need not
/// decode them again).
#[derive(Debug)]
struct UploadChunks {
    lens: HashMap<Hash, u32>,
    copies_written: std::sync::Mutex<HashSet<Hash>>,
}

/// Frames received and not yet stored: (hash, length in the manifest, frame data).
#[derive(Debug, Default)]
struct StoreGroup {
    frames: Vec<(Hash, u32, Vec<u8>)>,
    bytes: usize,
}

fn add_stored(
    totals: &mut ChunksStored,
    joined: Option<Result<Result<ChunksStored, CatalogueError>, tokio::task::JoinError>>,
) -> Result<(), CatalogueError> {
    if let Some(joined) = joined {
        let stored = joined.map_err(task_error)??;
        totals.stored += stored.stored;
        totals.already_present += stored.already_present;
    }
    Ok(())
}

/// Checks and stores one group of received frames (see `Catalogue::upload_chunks`).
fn store_group(
    chunks: &ChunkStore,
    upload: &UploadChunks,
    payloads: bool,
    group: StoreGroup,
) -> Result<ChunksStored, CatalogueError> {
    let mut totals = ChunksStored { stored: 0, already_present: 0 };
    for (hash, len, data) in group.frames {
        let newly_stored = if payloads {
            let invalid = |source| CatalogueError::ChunkPayloadInvalid { hash, len, source };
            let (&tag, body) = data.split_first().ok_or(invalid(DeltaError::EmptyPayload))?;
            if tag == delta::PayloadTag::Raw as u8 {
                // The client found it not worth compressing: it stays raw, no second try here.
                store_checked(chunks, &hash, body)?
            } else if tag == delta::PayloadTag::Delta as u8 {
                // Never trusted: decoded (to at most the manifest's length), hashed like any
                // chunk, and the copy kept only if it decoded to exactly the chunk.
                let chunk = delta::decompress_chunk(body, len as usize).map_err(invalid)?;
                let newly_stored = store_checked(chunks, &hash, &chunk)?;
                if newly_stored && body.len() <= delta::compressed_len_max(chunk.len()) {
                    put_copy(chunks, upload, &hash, body)?;
                }
                newly_stored
            } else {
                return Err(invalid(DeltaError::UnknownTag { tag }));
            }
        } else {
            let newly_stored = store_checked(chunks, &hash, &data)?;
            // An older client's raw chunk: the region decides whether it is worth a copy. A chunk
            // zstd cannot handle (it always can) just goes raw.
            if newly_stored {
                if let Ok(Some(compressed)) = delta::compress_chunk(&data) {
                    put_copy(chunks, upload, &hash, &compressed)?;
                }
            }
            newly_stored
        };
        if newly_stored {
            totals.stored += 1;
        } else {
            totals.already_present += 1;
        }
    }
    Ok(totals)
}

/// Stores a received chunk after checking its hash.
fn store_checked(chunks: &ChunkStore, hash: &Hash, data: &[u8]) -> Result<bool, CatalogueError> {
    chunks.put(hash, data).map_err(|source| match source {
        ChunkStoreError::HashMismatch { expected, actual } => {
            CatalogueError::ChunkDamagedInTransit { expected, actual }
        }
        source => CatalogueError::StoreChunk { hash: *hash, source },
    })
}

/// Keeps a compressed copy known to decode to its chunk, and remembers that this upload wrote it.
fn put_copy(chunks: &ChunkStore, upload: &UploadChunks, hash: &Hash, compressed: &[u8]) -> Result<(), CatalogueError> {
    chunks.put_compressed(hash, compressed).map_err(|source| CatalogueError::StoreChunk { hash: *hash, source })?;
    if let Ok(mut copies) = upload.copies_written.lock() {
        copies.insert(*hash);
    }
    Ok(())
}

/// Stores a chunk and, when it is new and compresses well, its compressed copy (the region's
/// own decision, as for raw uploads): compression is decided once, so serving a chunk to any
/// number of racks costs no compression.
#[cfg(test)]
fn store_chunk(chunks: &ChunkStore, hash: &Hash, data: &[u8]) -> Result<bool, ChunkStoreError> {
    let newly_stored = chunks.put(hash, data)?;
    if newly_stored {
        if let Ok(Some(compressed)) = delta::compress_chunk(data) {
            chunks.put_compressed(hash, &compressed)?;
        }
    }
    Ok(newly_stored)
}

/// Every chunk of a version present and intact, made durable, and together hashing to the
/// manifest's file hash; every compressed copy not in `copies_checked` decoding to its chunk.
///
/// The flush (`syncfs`) runs on its own thread while the chunks are read and checked: the
/// check reads what the page cache holds, which is what the flush writes, and the version
/// joins the catalogue only after both have finished (the caller commits on `Ok` alone). If
/// the check removed a damaged compressed copy, the store is flushed once more, so that
/// removal is durable too.
fn check_version_chunks(
    chunks: &ChunkStore,
    manifest: &Manifest,
    copies_checked: &HashSet<Hash>,
) -> Result<(), CatalogueError> {
    let n_missing = manifest.chunks.iter().filter(|c| !chunks.contains(&c.hash)).count();
    if n_missing > 0 {
        return Err(CatalogueError::ChunksMissing { n_missing });
    }
    let check_error = |source| CatalogueError::CheckChunks { source };
    let (checked, flushed) = std::thread::scope(|scope| {
        let flush = scope.spawn(|| chunks.sync());
        let checked = verify_version_chunks(chunks, manifest, copies_checked);
        (checked, flush.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
    });
    let copies_removed = checked?;
    flushed.map_err(check_error)?;
    if copies_removed > 0 {
        chunks.sync().map_err(check_error)?;
    }
    Ok(())
}

/// The reading half of [`check_version_chunks`]; returns how many damaged compressed copies it
/// removed.
///
/// Each chunk is read once, into the file hash: when that matches, every chunk is what its
/// hash names (a damaged one would change the file hash), so chunks are hashed one by one only
/// when it does not, to find and remove the damaged ones (torn by a crash before they were
/// flushed) so the next push sends them again.
fn verify_version_chunks(
    chunks: &ChunkStore,
    manifest: &Manifest,
    copies_checked: &HashSet<Hash>,
) -> Result<usize, CatalogueError> {
    let check_error = |source| CatalogueError::CheckChunks { source };
    let mut copies_removed = 0;
    let mut hasher = blake3::Hasher::new();
    let mut copies_seen = HashSet::new();
    for chunk in &manifest.chunks {
        let path = chunks.path(&chunk.hash);
        let data = std::fs::read(&path)
            .map_err(|source| check_error(ChunkStoreError::Io { what: "read a chunk", path, source }))?;
        hasher.update(&data);
        if copies_checked.contains(&chunk.hash) || !copies_seen.insert(chunk.hash) {
            continue;
        }
        // A compressed copy torn by a crash (the store is volatile until the sync below) would
        // reach every rack damaged, again and again: one that does not decode to the chunk
        // goes, and the chunk is served raw.
        if let Some(compressed) = chunks.get_compressed(&chunk.hash).map_err(check_error)? {
            if delta::decompress_chunk(&compressed, data.len()).ok().as_deref() != Some(&data[..]) {
                let path = chunks.compressed_path(&chunk.hash);
                tracing::warn!(chunk = %chunk.hash, "compressed copy damaged; removed, the chunk goes raw");
                std::fs::remove_file(&path).map_err(|source| {
                    check_error(ChunkStoreError::Io { what: "remove a damaged compressed chunk", path, source })
                })?;
                copies_removed += 1;
            }
        }
    }
    let actual = Hash(*hasher.finalize().as_bytes());
    if actual != manifest.file_hash {
        for chunk in &manifest.chunks {
            match chunks.get(&chunk.hash) {
                Ok(_) => {}
                Err(ChunkStoreError::HashMismatch { .. }) => {
                    chunks.remove(&chunk.hash).map_err(check_error)?;
                    return Err(CatalogueError::ChunkDamagedOnDisk { hash: chunk.hash });
                }
                Err(source) => return Err(check_error(source)),
            }
        }
        return Err(CatalogueError::FileHashMismatch { actual, expected: manifest.file_hash });
    }
    Ok(copies_removed)
}

/// Removes manifests not in `referenced` and chunks no referenced manifest lists.
fn collect_garbage(
    manifests_dir: &Path,
    chunks: &ChunkStore,
    referenced: &HashSet<String>,
) -> Result<DeleteVersionResponse, CatalogueError> {
    let gc = |step| move |source| CatalogueError::CollectGarbage { step, source };
    let mut keep = HashSet::new();
    let mut unreferenced = Vec::new();
    for entry in std::fs::read_dir(manifests_dir).map_err(gc("list manifests"))? {
        let entry = entry.map_err(gc("list manifests"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if referenced.contains(&name) {
            let bytes = std::fs::read(entry.path()).map_err(gc("read a manifest"))?;
            let manifest = Manifest::parse(&bytes)
                .map_err(|source| CatalogueError::ManifestDamaged { manifest_id: name.clone(), source })?;
            keep.extend(manifest.chunks.iter().map(|c| c.hash));
        } else {
            unreferenced.push(entry.path());
        }
    }
    let mut response = DeleteVersionResponse { chunks_removed: 0, reclaimed_bytes: 0 };
    let chunk_error = |source| CatalogueError::CollectChunks { source };
    for hash in chunks.hashes().map_err(chunk_error)? {
        if !keep.contains(&hash) {
            response.reclaimed_bytes += chunks.remove(&hash).map_err(chunk_error)?;
            response.chunks_removed += 1;
        }
    }
    for path in unreferenced {
        let _ = std::fs::remove_file(path);
    }
    Ok(response)
}

/// Where a rack stands with one version: synced when every file is in its snapshot (`held`, the
/// catalogue files of the snapshot it sent, which must be the one it reports serving).
fn version_sync_view(rack: &RackRow, held: &HashSet<String>, files: &[FileView]) -> RackSyncView {
    let mut view = RackSyncView {
        rack_id: rack.id.clone(),
        rack_name: rack.name.clone(),
        status: VersionSyncStatus::Behind,
        percent: None,
        bytes_to_go: None,
        reason: None,
    };
    let Some(report) = &rack.sync_report else { return view };
    let snapshot_known = report.snapshot_id.is_some() && report.snapshot_id == rack.snapshot_id;
    if snapshot_known && files.iter().all(|f| held.contains(&f.file_hash)) {
        view.status = VersionSyncStatus::Synced;
    } else {
        match report.phase {
            SyncPhase::Syncing | SyncPhase::Paused => {
                view.status = VersionSyncStatus::Syncing;
                let total = report.bytes_total.max(1);
                view.percent = Some((report.bytes_done as f64 * 100.0 / total as f64).min(100.0));
                view.bytes_to_go = Some(report.bytes_total.saturating_sub(report.bytes_done));
                if report.phase == SyncPhase::Paused {
                    view.reason = Some(report.message.clone());
                }
            }
            SyncPhase::Failed => {
                view.status = VersionSyncStatus::Failed;
                view.reason = Some(report.message.clone());
            }
            SyncPhase::Idle | SyncPhase::Waiting => {
                if !report.message.is_empty() {
                    view.reason = Some(report.message.clone());
                }
            }
        }
    }
    view
}

impl Catalogue {
    /// The frame answering one want: the chunk's compressed copy (a plain zstd frame, sent
    /// as a delta that needs no base) or a delta against the want's bases when the region has
    /// them all, whichever is smaller, and the chunk raw when neither is smaller than it.
    /// `prefix` is scratch space.
    fn chunk_payload(&self, want: &delta::Want, prefix: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        let compressed = self.chunks.get_compressed(&want.hash).map_err(std::io::Error::other)?;
        if let (Some(compressed), true) = (&compressed, want.bases.is_empty()) {
            // A first sync of a chunk that compresses: no delta to try, the copy is the answer.
            let mut frame = Vec::with_capacity(frame::HEADER_LEN + 1 + compressed.len());
            frame.resize(frame::HEADER_LEN, 0);
            frame.push(delta::PayloadTag::Delta as u8);
            frame.extend_from_slice(compressed);
            return self.finish_frame(want, frame);
        }
        // The frame is built in place: header, raw tag, then the chunk read straight after them,
        // so a raw chunk (every incompressible chunk of a first sync) costs no copy beyond the read.
        let data_start = frame::HEADER_LEN + 1;
        let mut frame = vec![0u8; data_start];
        frame[frame::HEADER_LEN] = delta::PayloadTag::Raw as u8;
        std::fs::File::open(self.chunks.path(&want.hash))?.read_to_end(&mut frame)?;
        prefix.clear();
        for base in &want.bases {
            // A base the region no longer has (its version was deleted) or bases over the limit:
            // the chunk goes raw, which the rack takes just as well.
            let Ok(base_data) = std::fs::read(self.chunks.path(base)) else {
                prefix.clear();
                break;
            };
            if (prefix.len() + base_data.len()) as u64 > delta::BASE_BYTES_MAX {
                prefix.clear();
                break;
            }
            prefix.extend_from_slice(&base_data);
        }
        let delta = delta::encode_delta(&frame[data_start..], prefix).map_err(std::io::Error::other)?;
        // The compressed copy decodes against the bases too (it never refers to them).
        let smaller = match (delta, compressed) {
            (Some(delta), Some(compressed)) => Some(if compressed.len() < delta.len() { compressed } else { delta }),
            (delta, compressed) => delta.or(compressed),
        };
        if let Some(encoded) = smaller {
            frame.truncate(frame::HEADER_LEN);
            frame.push(delta::PayloadTag::Delta as u8);
            frame.extend_from_slice(&encoded);
        }
        self.finish_frame(want, frame)
    }

    /// Fills in the header of `frame` (header space, then the payload) answering `want`.
    fn finish_frame(&self, want: &delta::Want, mut frame: Vec<u8>) -> std::io::Result<Vec<u8>> {
        if self.take_corruption() {
            // Damage the last byte: inside the chunk for raw payloads, inside the zstd frame for
            // deltas; either way the rack's hash check must catch it.
            if let Some(last) = frame.last_mut() {
                *last ^= 0xff;
            }
        }
        let payload_len = u32::try_from(frame.len() - frame::HEADER_LEN).map_err(std::io::Error::other)?;
        let mut header = frame::FrameHeader::new_unchecked(&mut frame[..frame::HEADER_LEN]);
        header.set_hash(&want.hash);
        header.set_data_len(payload_len);
        Ok(frame)
    }
}

impl Catalogue {
    fn take_corruption(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.corrupt_chunks_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RegionConfig;
    use crate::db::Store;
    use metalrack_image_tools::manifest::ChunkRef;
    use metalrack_image_tools::testdata::random_bytes;

    async fn catalogue(dir: &Path) -> Catalogue {
        let store = Store::open(dir).await.unwrap();
        Catalogue::open(Shared::new(store, RegionConfig::default(), dir.to_owned())).unwrap()
    }

    /// Writes a one-chunk manifest and returns an upload row naming it.
    fn upload_of(catalogue: &Catalogue, n: u32) -> UploadRow {
        let data = n.to_le_bytes();
        let manifest = Manifest {
            file_len: data.len() as u64,
            file_hash: Hash::of(&data),
            chunks: vec![ChunkRef { hash: Hash::of(&data), len: data.len() as u32 }],
        };
        let bytes = manifest.to_bytes();
        let manifest_id = Hash::of(&bytes).to_hex();
        std::fs::write(catalogue.manifest_path(&manifest_id), bytes).unwrap();
        UploadRow {
            id: format!("upload{n}"),
            image_name: "test/image".into(),
            arch: "amd64".into(),
            kind: "kernel".into(),
            version: n.to_string(),
            manifest_id,
        }
    }

    #[tokio::test]
    async fn images_with_a_file_of_a_kind_list_only_those_versions_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let catalogue = catalogue(dir.path()).await;
        let store = &catalogue.shared.store;
        // (image, version, kind, created_at_ms)
        let files = [
            ("test/image", "1", "kernel", 1_000),
            ("test/image", "1", "root-disk", 1_000),
            ("test/image", "2", "kernel", 2_000),
            ("test/image", "3", "root-disk", 3_000),
            ("other/image", "1", "kernel", 1_000),
        ];
        for (n, (image, version, kind, _)) in files.iter().enumerate() {
            let mut upload = upload_of(&catalogue, n as u32);
            upload.image_name = image.to_string();
            upload.version = version.to_string();
            upload.kind = kind.to_string();
            let outcome = store.commit_upload(&upload, &Hash::of(&[n as u8]).to_hex(), 4, 1).await.unwrap();
            assert!(matches!(outcome, CommitOutcome::Committed), "{outcome:?}");
        }
        // Creation times set apart, so "newest first" does not hang on the clock's resolution.
        for (_, version, _, at) in files {
            sqlx::query("UPDATE image_versions SET created_at_ms = $1 WHERE version = $2")
                .bind(at)
                .bind(version)
                .execute(store.pool())
                .await
                .unwrap();
        }
        let listed = catalogue.images_with_file("root-disk").await.unwrap();
        let expected =
            ImageVersions { name: "test/image".into(), arch: "amd64".into(), versions: vec!["3".into(), "1".into()] };
        assert_eq!(listed, vec![expected]);
        assert_eq!(catalogue.images_with_file("kernel").await.unwrap().len(), 2);
        assert!(catalogue.images_with_file("initrd").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_upload_chunk_set_cache_is_bounded_and_reloads_what_it_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let catalogue = catalogue(dir.path()).await;
        let uploads: Vec<_> = (0..UPLOAD_SETS_CACHED_MAX as u32 * 2).map(|n| upload_of(&catalogue, n)).collect();
        for upload in &uploads {
            let set = catalogue.upload_set(upload).await.unwrap();
            assert_eq!(set.lens.len(), 1);
            assert!(catalogue.upload_sets.lock().await.len() <= UPLOAD_SETS_CACHED_MAX);
        }
        // Every upload, evicted or not, still gets its set.
        for upload in &uploads {
            let set = catalogue.upload_set(upload).await.unwrap();
            let data = upload.version.parse::<u32>().unwrap().to_le_bytes();
            assert!(set.lens.contains_key(&Hash::of(&data)));
        }
    }

    /// Text-like bytes (words in a pseudo-random order): compress well, never repeat whole.
    fn text(seed: u64, len: usize) -> Vec<u8> {
        let words: [&[u8]; 5] = [b"lib ", b"kernel ", b"0000 ", b"/etc/", b"\n"];
        let mut state = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(words[(state % 5) as usize]);
        }
        out.truncate(len);
        out
    }

    /// The payload (tag and body) of `chunk_payload`'s frame.
    fn payload_of(catalogue: &Catalogue, want: &delta::Want) -> Vec<u8> {
        let frame = catalogue.chunk_payload(want, &mut Vec::new()).unwrap();
        frame[frame::HEADER_LEN..].to_vec()
    }

    #[tokio::test]
    async fn chunks_that_compress_are_served_compressed_and_others_raw() {
        let dir = tempfile::tempdir().unwrap();
        let catalogue = catalogue(dir.path()).await;
        let chunks = &catalogue.chunks;
        let (compressible, random) = (text(1, 60_000), random_bytes(60_000, 2));
        let (text_hash, random_hash) = (Hash::of(&compressible), Hash::of(&random));
        assert!(store_chunk(chunks, &text_hash, &compressible).unwrap());
        assert!(store_chunk(chunks, &random_hash, &random).unwrap());
        assert!(chunks.get_compressed(&random_hash).unwrap().is_none(), "incompressible: no copy");

        // First sync: the compressed copy, decoding with no bases.
        let first = payload_of(&catalogue, &delta::Want { hash: text_hash, bases: vec![] });
        assert_eq!(first[0], delta::PayloadTag::Delta as u8);
        assert!(first.len() < compressible.len() / 2, "{} bytes", first.len());
        assert_eq!(delta::decode_payload(first, &[], compressible.len()).unwrap().to_vec(), compressible);
        let raw = payload_of(&catalogue, &delta::Want { hash: random_hash, bases: vec![] });
        assert_eq!(raw, [&[delta::PayloadTag::Raw as u8][..], &random].concat());

        // A base that shares nothing: no delta pays, the compressed copy goes.
        let with_base = payload_of(&catalogue, &delta::Want { hash: text_hash, bases: vec![random_hash] });
        assert_eq!(with_base[0], delta::PayloadTag::Delta as u8);
        assert_eq!(delta::decode_payload(with_base, &random, compressible.len()).unwrap().to_vec(), compressible);
        // A base almost equal: the delta is smaller than the compressed copy, and it goes.
        // (Half noise, so the copy cannot be tiny; a one-byte edit.)
        let half = [text(4, 30_000), random_bytes(30_000, 5)].concat();
        let half_hash = Hash::of(&half);
        store_chunk(chunks, &half_hash, &half).unwrap();
        let mut edited = half.clone();
        edited[45_000] ^= 1;
        let edited_hash = Hash::of(&edited);
        store_chunk(chunks, &edited_hash, &edited).unwrap();
        let copy_len = chunks.get_compressed(&edited_hash).unwrap().unwrap().len();
        let delta_payload = payload_of(&catalogue, &delta::Want { hash: edited_hash, bases: vec![half_hash] });
        assert!(delta_payload.len() < copy_len / 4, "{} vs {copy_len}", delta_payload.len());
        assert_eq!(delta::decode_payload(delta_payload, &half, edited.len()).unwrap().to_vec(), edited);

        // A chunk stored before compressed copies existed is served raw, as before.
        std::fs::remove_file(chunks.compressed_path(&text_hash)).unwrap();
        let old = payload_of(&catalogue, &delta::Want { hash: text_hash, bases: vec![] });
        assert_eq!(old, [&[delta::PayloadTag::Raw as u8][..], &compressible].concat());
    }

    fn admin() -> User {
        User {
            id: "admin".into(),
            username: "admin".into(),
            email: "admin@example.com".into(),
            password_hash: String::new(),
            is_admin: true,
        }
    }

    /// Starts an upload of the file made of `pieces` (one chunk each); returns its id.
    async fn start(catalogue: &Catalogue, pieces: &[Vec<u8>], version: &str) -> String {
        let manifest = Manifest {
            file_len: pieces.iter().map(|p| p.len() as u64).sum(),
            file_hash: Hash::of(&pieces.concat()),
            chunks: pieces.iter().map(|p| ChunkRef { hash: Hash::of(p), len: p.len() as u32 }).collect(),
        };
        let target = UploadTarget {
            name: "test/image".into(),
            arch: "amd64".into(),
            kind: "root-disk".into(),
            version: version.into(),
        };
        let response = catalogue.start_upload(&admin(), &target, manifest.to_bytes().into()).await.unwrap();
        assert!(response.chunk_payloads);
        response.upload_id
    }

    /// A frame whose data is `tag` then `body`, under `hash`.
    fn payload_frame(hash: &Hash, tag: delta::PayloadTag, body: &[u8], out: &mut Vec<u8>) {
        frame::encode_frame(hash, &[&[tag as u8][..], body].concat(), out);
    }

    async fn send(
        catalogue: &Catalogue,
        upload_id: &str,
        payloads: bool,
        body: Vec<u8>,
    ) -> Result<ChunksStored, CatalogueError> {
        // In pieces of odd sizes, as the network delivers them.
        let pieces: Vec<Result<Bytes, std::io::Error>> =
            body.chunks(7_919).map(|piece| Ok(Bytes::copy_from_slice(piece))).collect();
        catalogue.upload_chunks(&admin(), upload_id, payloads, futures_util::stream::iter(pieces)).await
    }

    #[tokio::test]
    async fn a_compressed_payload_that_decodes_to_other_bytes_is_refused_and_nothing_stored() {
        let dir = tempfile::tempdir().unwrap();
        let catalogue = catalogue(dir.path()).await;
        let (wanted, other) = (text(10, 60_000), text(20, 60_000));
        let upload_id = start(&catalogue, std::slice::from_ref(&wanted), "1").await;
        // A valid zstd frame of the right length, of the wrong bytes.
        let lie = delta::compress_chunk(&other).unwrap().unwrap();
        let mut body = Vec::new();
        payload_frame(&Hash::of(&wanted), delta::PayloadTag::Delta, &lie, &mut body);
        let error = send(&catalogue, &upload_id, true, body).await.unwrap_err();
        assert!(matches!(error, CatalogueError::ChunkDamagedInTransit { .. }), "{error:?}");
        // A frame that is not zstd at all, and one claiming more bytes than the manifest says.
        let mut body = Vec::new();
        payload_frame(&Hash::of(&wanted), delta::PayloadTag::Delta, b"not zstd", &mut body);
        let error = send(&catalogue, &upload_id, true, body).await.unwrap_err();
        assert!(matches!(error, CatalogueError::ChunkPayloadInvalid { .. }), "{error:?}");
        let longer = delta::compress_chunk(&[wanted.clone(), wanted.clone()].concat()).unwrap().unwrap();
        let mut body = Vec::new();
        payload_frame(&Hash::of(&wanted), delta::PayloadTag::Delta, &longer, &mut body);
        let error = send(&catalogue, &upload_id, true, body).await.unwrap_err();
        assert!(matches!(error, CatalogueError::ChunkPayloadInvalid { .. }), "{error:?}");
        assert!(catalogue.chunks.hashes().unwrap().is_empty(), "nothing stored");
        assert!(!catalogue.chunks.compressed_path(&Hash::of(&wanted)).exists());

        // The honest payload is taken, and kept as the chunk's compressed copy.
        let honest = delta::compress_chunk(&wanted).unwrap().unwrap();
        let mut body = Vec::new();
        payload_frame(&Hash::of(&wanted), delta::PayloadTag::Delta, &honest, &mut body);
        let stored = send(&catalogue, &upload_id, true, body).await.unwrap();
        assert_eq!((stored.stored, stored.already_present), (1, 0));
        assert_eq!(catalogue.chunks.get(&Hash::of(&wanted)).unwrap(), wanted);
        assert_eq!(catalogue.chunks.get_compressed(&Hash::of(&wanted)).unwrap().unwrap(), honest);
        catalogue.commit_upload(&admin(), &upload_id).await.unwrap();
    }

    #[tokio::test]
    async fn raw_frames_of_older_clients_are_stored_and_compressed_by_the_region() {
        let dir = tempfile::tempdir().unwrap();
        let catalogue = catalogue(dir.path()).await;
        let pieces = [text(12, 70_000), random_bytes(70_000, 13)];
        let upload_id = start(&catalogue, &pieces, "1").await;
        let mut body = Vec::new();
        for piece in &pieces {
            frame::encode_frame(&Hash::of(piece), piece, &mut body);
        }
        let stored = send(&catalogue, &upload_id, false, body).await.unwrap();
        assert_eq!((stored.stored, stored.already_present), (2, 0));
        assert!(catalogue.chunks.get_compressed(&Hash::of(&pieces[0])).unwrap().is_some(), "text gets a copy");
        assert!(catalogue.chunks.get_compressed(&Hash::of(&pieces[1])).unwrap().is_none(), "noise does not");
        // A raw frame that lies about its hash: refused.
        let upload_id = start(&catalogue, &[text(14, 1000)], "2").await;
        let mut body = Vec::new();
        frame::encode_frame(&Hash::of(&text(14, 1000)), &text(30, 1000), &mut body);
        let error = send(&catalogue, &upload_id, false, body).await.unwrap_err();
        assert!(matches!(error, CatalogueError::ChunkDamagedInTransit { .. }), "{error:?}");
    }

    #[tokio::test]
    async fn concurrent_batches_store_every_chunk_once() {
        let dir = tempfile::tempdir().unwrap();
        let catalogue = Arc::new(catalogue(dir.path()).await);
        // More than a store group per batch, so groups run side by side too.
        let pieces: Vec<Vec<u8>> =
            (0..64).map(|i| if i % 2 == 0 { text(100 + i, 50_000) } else { random_bytes(50_000, 100 + i) }).collect();
        let upload_id = start(&catalogue, &pieces, "1").await;
        let mut body = Vec::new();
        for piece in &pieces {
            let tag = delta::PayloadTag::Raw;
            match delta::compress_chunk(piece).unwrap() {
                Some(compressed) => payload_frame(&Hash::of(piece), delta::PayloadTag::Delta, &compressed, &mut body),
                None => payload_frame(&Hash::of(piece), tag, piece, &mut body),
            }
        }
        // Four batches in flight carrying the same chunks: each is stored once, by one of them.
        let sends: Vec<_> = (0..4)
            .map(|_| {
                let (catalogue, upload_id, body) = (catalogue.clone(), upload_id.clone(), body.clone());
                tokio::spawn(async move { send(&catalogue, &upload_id, true, body).await.unwrap() })
            })
            .collect();
        let mut stored = 0;
        for sent in sends {
            let sent = sent.await.unwrap();
            assert_eq!(sent.stored + sent.already_present, 64);
            stored += sent.stored;
        }
        assert_eq!(stored, 64);
        let mut hashes: Vec<Hash> = pieces.iter().map(|p| Hash::of(p)).collect();
        hashes.sort_unstable();
        assert_eq!(catalogue.chunks.hashes().unwrap(), hashes);
        let copies = pieces.iter().filter(|p| catalogue.chunks.compressed_path(&Hash::of(p)).exists()).count();
        assert_eq!(copies, 32, "every text chunk has its copy, no noise chunk");
        assert!(std::fs::read_dir(dir.path().join("chunks/tmp")).unwrap().next().is_none(), "no temp files left");
        catalogue.commit_upload(&admin(), &upload_id).await.unwrap();
    }

    #[test]
    fn a_torn_chunk_is_found_and_removed_when_the_file_hash_does_not_match() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = ChunkStore::open_volatile(dir.path()).unwrap();
        let pieces = [text(20, 5_000), random_bytes(5_000, 21)];
        for piece in &pieces {
            chunks.put(&Hash::of(piece), piece).unwrap();
        }
        let manifest = Manifest {
            file_len: 10_000,
            file_hash: Hash::of(&pieces.concat()),
            chunks: pieces.iter().map(|p| ChunkRef { hash: Hash::of(p), len: p.len() as u32 }).collect(),
        };
        check_version_chunks(&chunks, &manifest, &HashSet::new()).unwrap();
        // Torn by a crash before the flush: same name, other bytes of the same length.
        std::fs::write(chunks.path(&Hash::of(&pieces[1])), random_bytes(5_000, 22)).unwrap();
        let error = check_version_chunks(&chunks, &manifest, &HashSet::new()).unwrap_err();
        assert!(matches!(error, CatalogueError::ChunkDamagedOnDisk { hash } if hash == Hash::of(&pieces[1])));
        assert!(!chunks.contains(&Hash::of(&pieces[1])), "removed, so the next push sends it");
        assert!(chunks.contains(&Hash::of(&pieces[0])));
    }

    #[test]
    fn a_damaged_compressed_copy_is_removed_when_a_version_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = ChunkStore::open_volatile(dir.path()).unwrap();
        let data = text(3, 50_000);
        let hash = Hash::of(&data);
        store_chunk(&chunks, &hash, &data).unwrap();
        let path = chunks.compressed_path(&hash);
        let mut copy = std::fs::read(&path).unwrap();
        let middle = copy.len() / 2;
        copy[middle] ^= 0x55;
        std::fs::write(&path, copy).unwrap();
        let manifest = Manifest {
            file_len: data.len() as u64,
            file_hash: Hash::of(&data),
            chunks: vec![ChunkRef { hash, len: data.len() as u32 }],
        };
        check_version_chunks(&chunks, &manifest, &HashSet::new()).unwrap();
        assert!(!path.exists(), "the damaged copy is gone");
        assert_eq!(chunks.get(&hash).unwrap(), data, "the chunk stays");
    }
}
