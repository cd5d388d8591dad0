//! The image catalogue over HTTP: streaming uploads from `imgtool push` (manifest, missing
//! chunks, commit), listing and deleting versions with garbage collection, sync requests and
//! policies, and the three calls racks sync through (catalogue long-poll, manifests, chunks).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use metalrack_api::images::{
    validate_image_name, validate_image_token, validate_kind, ChunksStored, CommitResponse, DeleteVersionResponse,
    FileView, ImageView, RackCatalogue, RackSyncView, SyncPhase, SyncPolicy, VersionSyncStatus, VersionView,
    MANIFEST_DELTA_TYPE,
};
use metalrack_image_tools::delta;
use metalrack_image_tools::frame::{self, FrameDecoder};
use metalrack_image_tools::manifest::{Manifest, CHUNK_LEN_MAX};
use metalrack_image_tools::store::{ChunkStore, StoreError as ChunkStoreError};
use metalrack_image_tools::Hash;
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::api::ApiJson;
use crate::auth::{ApiUser, AuthedRack};
use crate::catalogue_store::{CommitOutcome, UploadRow};
use crate::error::ApiError;
use crate::server::AppState;
use crate::store::RackRow;
use crate::util::write_private_file;

/// Largest manifest accepted: 64 MiB is ~1.8 M chunks, a 116 GiB file at the 64 KiB average.
pub const MANIFEST_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Chunks a rack may ask for in one request (32 bytes of hash each): ~64 MiB of response at
/// the average chunk size, enough to keep a link busy with a few requests in flight.
pub const CHUNK_FETCH_MAX: usize = 1024;

/// Longest a rack's catalogue long-poll is held open.
pub const LONG_POLL_MAX: Duration = Duration::from_secs(60);

/// A client that sends nothing for this long while uploading chunks is cut off.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Chunk frames buffered between the disk reader and the socket per chunk request: bounds
/// memory to ~4 chunks per rack download however slow the rack reads.
const SERVE_QUEUE_FRAMES: usize = 4;

/// The catalogue's on-disk parts and in-memory caches, shared by all requests.
#[derive(Debug)]
pub struct Catalogue {
    pub chunks: ChunkStore,
    pub manifests_dir: PathBuf,
    /// Chunk sets of active uploads, so each batch does not re-read the manifest. At most one
    /// entry per pending upload (`UPLOADS_PENDING_MAX`).
    upload_sets: Mutex<HashMap<String, Arc<HashSet<Hash>>>>,
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

impl Catalogue {
    pub fn open(data_dir: &Path) -> Result<Catalogue, CatalogueOpenError> {
        let chunks =
            // Chunks are flushed in bulk (one syncfs) before a version commits, not one by one.
            ChunkStore::open_volatile(&data_dir.join("chunks")).map_err(|source| CatalogueOpenError::Chunks { source })?;
        let manifests_dir = data_dir.join("manifests");
        std::fs::create_dir_all(&manifests_dir)
            .map_err(|source| CatalogueOpenError::Manifests { path: manifests_dir.clone(), source })?;
        let corrupt = std::env::var("METALRACK_FAULT_CORRUPT_CHUNKS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        if corrupt > 0 {
            tracing::warn!(corrupt, "fault hook on: corrupting chunks served to racks");
        }
        Ok(Catalogue {
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

    async fn load_manifest(&self, manifest_id: &str) -> Result<Manifest, ApiError> {
        let path = self.manifest_path(manifest_id);
        let bytes = tokio::fs::read(&path).await.map_err(ApiError::internal)?;
        Manifest::parse(&bytes).map_err(ApiError::internal)
    }
}

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/uploads", post(start_upload).layer(DefaultBodyLimit::max(MANIFEST_BYTES_MAX)))
        .route("/uploads/{id}/chunks", post(upload_chunks))
        .route("/uploads/{id}/commit", post(commit_upload))
        .route("/images", get(list_images))
        .route("/images/{image_id}/versions/{version}", delete(delete_version))
        .route("/racks/{id}/sync", post(sync_rack))
        .route("/racks/{id}/sync-policy", put(set_sync_policy))
        .route("/sync", post(sync_all))
        .route("/rack/catalogue", get(rack_catalogue))
        .route("/rack/manifests/{id}", get(rack_manifest))
        .route("/rack/chunks", post(rack_chunks).layer(DefaultBodyLimit::max(CHUNK_REQUEST_BYTES_MAX)))
}

fn require_admin(user: &crate::store::User) -> Result<(), ApiError> {
    if user.is_admin {
        Ok(())
    } else {
        Err(ApiError::forbidden("only administrators may change the catalogue"))
    }
}

fn parse_hash(text: &str) -> Result<Hash, ApiError> {
    Hash::from_hex(text).map_err(|_| ApiError::bad_request(format!("{text:?} is not a 64-character hex hash")))
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    name: String,
    arch: String,
    kind: String,
    version: String,
}

/// Step 1 of a push: the manifest. Answers which chunks the region lacks.
async fn start_upload(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Query(query): Query<UploadQuery>,
    body: Bytes,
) -> Result<Json<metalrack_api::images::UploadResponse>, ApiError> {
    require_admin(&user)?;
    validate_image_name(&query.name).map_err(ApiError::bad_request)?;
    validate_image_token("arch", &query.arch).map_err(ApiError::bad_request)?;
    validate_image_token("version", &query.version).map_err(ApiError::bad_request)?;
    validate_kind(&query.kind).map_err(ApiError::bad_request)?;
    let manifest = Manifest::parse(&body).map_err(|e| ApiError::bad_request(format!("invalid manifest: {e}")))?;
    let file_hash = manifest.file_hash.to_hex();
    if let Some(existing) = state
        .store
        .committed_file_hash(&query.name, &query.arch, &query.version, &query.kind)
        .await
        .map_err(ApiError::internal)?
    {
        if existing != file_hash {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "{} {} version {} already has a different {}; push it as a new --version",
                    query.name, query.arch, query.version, query.kind
                ),
            ));
        }
    }
    let manifest_id = Hash::of(&body).to_hex();
    let path = state.catalogue.manifest_path(&manifest_id);
    if !path.exists() {
        let bytes = body.clone();
        let target = path.clone();
        tokio::task::spawn_blocking(move || write_private_file(&target, &bytes))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?;
    }
    let upload_id = state
        .store
        .create_upload(&query.name, &query.arch, &query.kind, &query.version, &manifest_id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many uploads in progress; retry later"))?;
    let chunks = state.catalogue.chunks.clone();
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
    .map_err(ApiError::internal)?;
    tracing::info!(upload = %upload_id, image = %query.name, kind = %query.kind, n_missing = missing.len(), "upload started");
    Ok(Json(metalrack_api::images::UploadResponse {
        upload_id,
        manifest_id,
        n_chunks: body.len().saturating_sub(metalrack_image_tools::manifest::HEADER_LEN) as u64
            / metalrack_image_tools::manifest::ENTRY_LEN as u64,
        missing,
        missing_bytes,
        batch_bytes_max: state.config.upload_batch_bytes_max,
    }))
}

async fn upload_row(state: &AppState, id: &str) -> Result<UploadRow, ApiError> {
    state.store.upload(id).await.map_err(ApiError::internal)?.ok_or_else(|| {
        ApiError::not_found(format!("no upload {id:?} in progress (it was committed or expired); push again"))
    })
}

async fn upload_set(state: &AppState, upload: &UploadRow) -> Result<Arc<HashSet<Hash>>, ApiError> {
    if let Some(set) = state.catalogue.upload_sets.lock().await.get(&upload.id) {
        return Ok(set.clone());
    }
    let manifest = state.catalogue.load_manifest(&upload.manifest_id).await?;
    let set: Arc<HashSet<Hash>> = Arc::new(manifest.chunks.iter().map(|c| c.hash).collect());
    state.catalogue.upload_sets.lock().await.insert(upload.id.clone(), set.clone());
    Ok(set)
}

/// Step 2: chunks, as a stream of frames. Each is checked against the manifest and its hash
/// before it is stored; the body is never held whole in memory.
async fn upload_chunks(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    UrlPath(id): UrlPath<String>,
    body: Body,
) -> Result<Json<ChunksStored>, ApiError> {
    require_admin(&user)?;
    let upload = upload_row(&state, &id).await?;
    let wanted = upload_set(&state, &upload).await?;
    let limit = state.config.upload_batch_bytes_max;
    let mut decoder = FrameDecoder::new(CHUNK_LEN_MAX);
    let mut stream = body.into_data_stream();
    let (mut received, mut stored, mut already_present) = (0u64, 0u64, 0u64);
    loop {
        let next = tokio::time::timeout(BODY_IDLE_TIMEOUT, stream.next())
            .await
            .map_err(|_| ApiError::new(StatusCode::REQUEST_TIMEOUT, "no data for 60 s; send the batch again"))?;
        let Some(piece) = next else { break };
        let piece = piece.map_err(|e| ApiError::bad_request(format!("upload interrupted: {e}")))?;
        received += piece.len() as u64;
        if received > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("a chunk batch is at most {limit} bytes; send fewer chunks per request"),
            ));
        }
        decoder.push(&piece);
        while let Some((hash, data)) =
            decoder.next_frame().map_err(|e| ApiError::bad_request(format!("malformed chunk frame: {e}")))?
        {
            if !wanted.contains(&hash) {
                return Err(ApiError::bad_request(format!("chunk {hash} is not in this upload's manifest")));
            }
            let chunks = state.catalogue.chunks.clone();
            let new =
                tokio::task::spawn_blocking(move || chunks.put(&hash, &data)).await.map_err(ApiError::internal)?;
            match new {
                Ok(true) => stored += 1,
                Ok(false) => already_present += 1,
                Err(ChunkStoreError::HashMismatch { expected, actual }) => {
                    return Err(ApiError::bad_request(format!(
                        "chunk {expected} was damaged in transit (its content hashes to {actual}); send it again"
                    )))
                }
                Err(e) => return Err(ApiError::internal(e)),
            }
        }
    }
    decoder.finish().map_err(|e| ApiError::bad_request(format!("the batch ends inside a chunk frame: {e}")))?;
    Ok(Json(ChunksStored { stored, already_present }))
}

/// Step 3: every chunk present and the whole file hashing right, the version joins the catalogue.
async fn commit_upload(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<CommitResponse>, ApiError> {
    require_admin(&user)?;
    let upload = upload_row(&state, &id).await?;
    let manifest = state.catalogue.load_manifest(&upload.manifest_id).await?;
    let chunks = state.catalogue.chunks.clone();
    let expected = manifest.file_hash;
    let checked = tokio::task::spawn_blocking(move || -> Result<Result<(), String>, ChunkStoreError> {
        let missing = manifest.chunks.iter().filter(|c| !chunks.contains(&c.hash)).count();
        if missing > 0 {
            return Ok(Err(format!("{missing} chunks are still missing; push again to send them")));
        }
        let mut hasher = blake3::Hasher::new();
        for chunk in &manifest.chunks {
            match chunks.get(&chunk.hash) {
                Ok(data) => hasher.update(&data),
                // Torn by a crash before it was flushed: drop it so the next push sends it again.
                Err(ChunkStoreError::HashMismatch { .. }) => {
                    chunks.remove(&chunk.hash)?;
                    return Ok(Err(format!("chunk {} was damaged on disk and removed; push again", chunk.hash)));
                }
                Err(e) => return Err(e),
            };
        }
        // Make every chunk of the version durable before the catalogue points at it.
        chunks.sync()?;
        let actual = Hash(*hasher.finalize().as_bytes());
        if actual != expected {
            return Ok(Err(format!("the chunks make a file hashing to {actual}, not the manifest's {expected}")));
        }
        Ok(Ok(()))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    checked.map_err(|reason| ApiError::new(StatusCode::CONFLICT, reason))?;
    let manifest = state.catalogue.load_manifest(&upload.manifest_id).await?;
    let file_hash = manifest.file_hash.to_hex();
    match state
        .store
        .commit_upload(&upload, &file_hash, manifest.file_len, manifest.chunks.len() as u64)
        .await
        .map_err(ApiError::internal)?
    {
        CommitOutcome::Committed => {}
        CommitOutcome::Conflict { .. } => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "this version already has a different file of that kind; push it as a new --version",
            ))
        }
    }
    state.catalogue.upload_sets.lock().await.remove(&upload.id);
    let message = format!(
        "{} {} version {}: {} committed ({} bytes, {} chunks)",
        upload.image_name,
        upload.arch,
        upload.version,
        upload.kind,
        manifest.file_len,
        manifest.chunks.len()
    );
    state.store.record_event("image.committed", &user.username, &message).await.map_err(ApiError::internal)?;
    state.notify_change();
    Ok(Json(CommitResponse {
        image: upload.image_name,
        arch: upload.arch,
        version: upload.version,
        kind: upload.kind,
        file_hash,
    }))
}

/// Every image with its versions and each rack's sync status for each version.
pub async fn image_views(state: &AppState) -> Result<Vec<ImageView>, ApiError> {
    let images = state.store.images().await.map_err(ApiError::internal)?;
    let racks = state.store.racks().await.map_err(ApiError::internal)?;
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
                    let racks = racks.iter().map(|rack| version_sync_view(rack, &files)).collect();
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

/// Where a rack stands with one version: synced when every file is in its snapshot.
fn version_sync_view(rack: &RackRow, files: &[FileView]) -> RackSyncView {
    let mut view = RackSyncView {
        rack_id: rack.id.clone(),
        rack_name: rack.name.clone(),
        status: VersionSyncStatus::Behind,
        percent: None,
        bytes_to_go: None,
        reason: None,
    };
    let Some(report) = &rack.sync_report else { return view };
    if files.iter().all(|f| report.file_hashes.contains(&f.file_hash)) {
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

async fn list_images(State(state): State<AppState>, _user: ApiUser) -> Result<Json<Vec<ImageView>>, ApiError> {
    Ok(Json(image_views(&state).await?))
}

async fn delete_version(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    UrlPath((image_id, version)): UrlPath<(String, String)>,
) -> Result<Json<DeleteVersionResponse>, ApiError> {
    require_admin(&user)?;
    Ok(Json(delete_version_and_collect(&state, &user.username, &image_id, &version).await?))
}

/// Deletes a version, then removes the manifests and chunks nothing references any more.
pub async fn delete_version_and_collect(
    state: &AppState,
    actor: &str,
    image_id: &str,
    version: &str,
) -> Result<DeleteVersionResponse, ApiError> {
    let _gc = state.catalogue.gc.lock().await;
    if !state.store.delete_version(image_id, version).await.map_err(ApiError::internal)? {
        return Err(ApiError::not_found(format!("no version {version:?} of image {image_id:?}")));
    }
    state.notify_change();
    let referenced = state.store.referenced_manifest_ids().await.map_err(ApiError::internal)?;
    let manifests_dir = state.catalogue.manifests_dir.clone();
    let chunks = state.catalogue.chunks.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<DeleteVersionResponse, String> {
        let mut keep = HashSet::new();
        let mut unreferenced = Vec::new();
        for entry in std::fs::read_dir(&manifests_dir).map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if referenced.contains(&name) {
                let bytes = std::fs::read(entry.path()).map_err(|e| e.to_string())?;
                let manifest = Manifest::parse(&bytes).map_err(|e| format!("manifest {name}: {e}"))?;
                keep.extend(manifest.chunks.iter().map(|c| c.hash));
            } else {
                unreferenced.push(entry.path());
            }
        }
        let mut response = DeleteVersionResponse { chunks_removed: 0, reclaimed_bytes: 0 };
        for hash in chunks.hashes().map_err(|e| e.to_string())? {
            if !keep.contains(&hash) {
                response.reclaimed_bytes += chunks.remove(&hash).map_err(|e| e.to_string())?;
                response.chunks_removed += 1;
            }
        }
        for path in unreferenced {
            let _ = std::fs::remove_file(path);
        }
        Ok(response)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(|reason| {
        tracing::error!(%reason, "garbage collection failed");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the version was deleted but its chunks were not collected")
    })?;
    let message = format!(
        "version {version} of image {image_id} deleted: {} chunks, {} bytes reclaimed",
        result.chunks_removed, result.reclaimed_bytes
    );
    state.store.record_event("image.deleted", actor, &message).await.map_err(ApiError::internal)?;
    Ok(result)
}

async fn sync_rack(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    require_admin(&user)?;
    request_sync(&state, &user.username, Some(&id)).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn sync_all(State(state): State<AppState>, ApiUser(user): ApiUser) -> Result<StatusCode, ApiError> {
    require_admin(&user)?;
    request_sync(&state, &user.username, None).await?;
    Ok(StatusCode::ACCEPTED)
}

pub async fn request_sync(state: &AppState, actor: &str, rack_id: Option<&str>) -> Result<(), ApiError> {
    let n = state.store.request_sync(rack_id).await.map_err(ApiError::internal)?;
    if rack_id.is_some() && n == 0 {
        return Err(ApiError::not_found("no such rack"));
    }
    let whom = rack_id.map(|id| format!("rack {id}")).unwrap_or_else(|| format!("all {n} racks"));
    state
        .store
        .record_event("sync.requested", actor, &format!("sync now requested for {whom}"))
        .await
        .map_err(ApiError::internal)?;
    state.notify_change();
    Ok(())
}

async fn set_sync_policy(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    UrlPath(id): UrlPath<String>,
    ApiJson(policy): ApiJson<SyncPolicy>,
) -> Result<StatusCode, ApiError> {
    require_admin(&user)?;
    store_sync_policy(&state, &user.username, &id, &policy).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn store_sync_policy(
    state: &AppState,
    actor: &str,
    rack_id: &str,
    policy: &SyncPolicy,
) -> Result<(), ApiError> {
    policy.validate().map_err(ApiError::bad_request)?;
    if !state.store.set_sync_policy(rack_id, policy).await.map_err(ApiError::internal)? {
        return Err(ApiError::not_found("no such rack"));
    }
    let message = format!("sync policy of rack {rack_id} set to {}", serde_json::to_string(policy).unwrap_or_default());
    state.store.record_event("sync.policy", actor, &message).await.map_err(ApiError::internal)?;
    state.notify_change();
    Ok(())
}

#[derive(Debug, Deserialize)]
struct CatalogueQuery {
    /// The revision the rack has seen; the call returns at once if the region's differs.
    #[serde(default = "minus_one")]
    after: i64,
    /// The sync request counter the rack has handled.
    #[serde(default)]
    requested: i64,
    /// How long to hold the call open waiting for a change.
    #[serde(default)]
    wait_ms: u64,
}

fn minus_one() -> i64 {
    -1
}

/// The catalogue for a rack, held open (long-poll) until something changes or `wait_ms` passes.
async fn rack_catalogue(
    State(state): State<AppState>,
    AuthedRack(rack): AuthedRack,
    Query(query): Query<CatalogueQuery>,
) -> Result<Json<RackCatalogue>, ApiError> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(query.wait_ms).min(LONG_POLL_MAX);
    // Subscribe before reading, so a change between the read and the wait is not missed.
    let mut changes = state.changes.subscribe();
    loop {
        let revision = state.store.catalogue_revision().await.map_err(ApiError::internal)?;
        let rack = state
            .store
            .rack(&rack.id)
            .await
            .map_err(ApiError::internal)?
            .ok_or_else(|| ApiError::not_found("rack gone"))?;
        let changed = revision != query.after || rack.sync_requested != query.requested;
        let timed_out =
            tokio::time::Instant::now() >= deadline || state.closing.load(std::sync::atomic::Ordering::SeqCst);
        if changed || timed_out {
            let files = state.store.catalogue_files().await.map_err(ApiError::internal)?;
            let machines = state.store.machines().await.map_err(ApiError::internal)?;
            return Ok(Json(RackCatalogue {
                revision,
                sync_requested: rack.sync_requested,
                policy: rack.sync_policy,
                files,
                machines,
            }));
        }
        tokio::select! {
            result = changes.changed() => {
                if result.is_err() {
                    return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "region shutting down"));
                }
                // A policy change alone also ends the wait: the rack needs the new policy.
                let files = state.store.catalogue_files().await.map_err(ApiError::internal)?;
                let rack = state.store.rack(&rack.id).await.map_err(ApiError::internal)?.ok_or_else(|| ApiError::not_found("rack gone"))?;
                return Ok(Json(RackCatalogue {
                    revision: state.store.catalogue_revision().await.map_err(ApiError::internal)?,
                    sync_requested: rack.sync_requested,
                    policy: rack.sync_policy,
                    files,
                    machines: state.store.machines().await.map_err(ApiError::internal)?,
                }));
            }
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

#[derive(Debug, Deserialize)]
struct ManifestQuery {
    /// A manifest the rack already has (usually the previous version of the same file): the
    /// answer is then a delta payload against it, which for a small change is a few hundred
    /// bytes instead of 36 bytes per chunk.
    base: Option<String>,
}

async fn rack_manifest(
    State(state): State<AppState>,
    _rack: AuthedRack,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<ManifestQuery>,
) -> Result<Response, ApiError> {
    parse_hash(&id)?;
    let bytes = match tokio::fs::read(state.catalogue.manifest_path(&id)).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::not_found(format!("no manifest {id}")))
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let Some(base_id) = query.base else {
        return Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response());
    };
    parse_hash(&base_id)?;
    // A base the region no longer has costs nothing: the payload is then the manifest, raw.
    let base = tokio::fs::read(state.catalogue.manifest_path(&base_id)).await.unwrap_or_default();
    let payload = tokio::task::spawn_blocking(move || {
        let mut payload = Vec::with_capacity(bytes.len() + 1);
        delta::encode_payload(&bytes, &base, &mut payload).map(|_| payload)
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok(([(header::CONTENT_TYPE, MANIFEST_DELTA_TYPE)], payload).into_response())
}

/// Largest chunk request body: [`CHUNK_FETCH_MAX`] wants naming every base they may.
const CHUNK_REQUEST_BYTES_MAX: usize = CHUNK_FETCH_MAX * (delta::WANT_HEADER_LEN + 32 * delta::BASES_MAX);

/// Chunks for a rack: the body lists wants (a chunk hash and up to four chunks the rack has
/// where that chunk goes, see `metalrack_image_tools::delta`); the answer streams one frame per
/// want, in order, carrying the chunk raw or as a zstd delta against those bases.
async fn rack_chunks(State(state): State<AppState>, _rack: AuthedRack, body: Bytes) -> Result<Response, ApiError> {
    let wants = delta::Want::parse_all(&body, CHUNK_FETCH_MAX).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if wants.is_empty() {
        return Err(ApiError::bad_request(format!("ask for 1 to {CHUNK_FETCH_MAX} chunks")));
    }
    if let Some(missing) = wants.iter().find(|w| !state.catalogue.chunks.contains(&w.hash)) {
        return Err(ApiError::not_found(format!("no chunk {}", missing.hash)));
    }
    let (sender, receiver) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(SERVE_QUEUE_FRAMES);
    let catalogue = state.catalogue.clone();
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
    let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    });
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], Body::from_stream(stream)).into_response())
}

impl Catalogue {
    /// The frame answering one want: the chunk as a delta against the want's bases when the
    /// region has them all and that is smaller, raw otherwise. `prefix` is scratch space.
    fn chunk_payload(&self, want: &delta::Want, prefix: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
        use std::io::Read;
        // The frame is built in place: header, raw tag, then the chunk read straight after them,
        // so a raw chunk (every chunk of a first sync) costs no copy beyond the read.
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
        if let Some(delta) = delta::encode_delta(&frame[data_start..], prefix).map_err(std::io::Error::other)? {
            frame.truncate(frame::HEADER_LEN);
            frame.push(delta::PayloadTag::Delta as u8);
            frame.extend_from_slice(&delta);
        }
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
