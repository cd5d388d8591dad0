//! Image uploads from `imgtool push`, the image list, version deletion, and the three calls
//! racks sync through (catalogue long-poll, manifests, chunks).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use metalrack_api::images::{
    ChunksStored, CommitResponse, DeleteVersionResponse, ImageView, RackCatalogue, UploadResponse, MANIFEST_DELTA_TYPE,
};
use metalrack_api::{paths, ErrorBody};
use serde::Deserialize;

use crate::catalogue::{ManifestPayload, UploadTarget, CHUNK_REQUEST_BYTES_MAX, MANIFEST_BYTES_MAX};
use crate::http::error::ApiError;
use crate::http::extract::{ApiUser, AuthedRack};
use crate::http::AppState;

/// The admin's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::UPLOADS, post(start_upload).layer(DefaultBodyLimit::max(MANIFEST_BYTES_MAX)))
        .route(paths::UPLOAD_CHUNKS, post(upload_chunks))
        .route(paths::UPLOAD_COMMIT, post(commit_upload))
        .route(paths::IMAGES, get(list_images))
        .route(paths::IMAGE_VERSION, delete(delete_version))
}

/// The routes racks call (the catalogue long-poll and its manifests and chunks).
pub fn rack_router() -> Router<AppState> {
    Router::new()
        .route(paths::RACK_CATALOGUE, get(rack_catalogue))
        .route(paths::RACK_MANIFEST, get(rack_manifest))
        .route(paths::RACK_CHUNKS, post(rack_chunks).layer(DefaultBodyLimit::max(CHUNK_REQUEST_BYTES_MAX)))
}

#[derive(Debug, Deserialize)]
struct UploadQuery {
    name: String,
    arch: String,
    kind: String,
    version: String,
}

/// Step 1 of a push: the manifest. Answers which chunks the region lacks.
#[utoipa::path(post, path = paths::UPLOADS, tag = "images", security(("api_key" = [])), params(("name" = String, Query), ("arch" = String, Query), ("kind" = String, Query), ("version" = String, Query)), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the file's manifest (image-tools wire format)"), responses((status = 200, body = UploadResponse), (status = 422, body = ErrorBody)))]
async fn start_upload(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Query(query): Query<UploadQuery>,
    body: Bytes,
) -> Result<Json<UploadResponse>, ApiError> {
    let target = UploadTarget { name: query.name, arch: query.arch, kind: query.kind, version: query.version };
    Ok(Json(state.catalogue.start_upload(&user, &target, body).await?))
}

#[derive(Debug, Deserialize)]
struct UploadChunksQuery {
    /// `payloads=true`: each frame carries a payload (tag byte, then the chunk raw or as a
    /// plain zstd frame); absent (older clients): each frame is the chunk.
    #[serde(default)]
    payloads: bool,
}

/// Step 2: chunks, as a stream of frames, never held whole in memory.
#[utoipa::path(post, path = paths::UPLOAD_CHUNKS, tag = "images", security(("api_key" = [])), params(("id" = String, Path, description = "upload id"), ("payloads" = Option<bool>, Query, description = "frames carry payloads (a tag byte, then the chunk raw or zstd-compressed), as `UploadResponse.chunk_payloads` offers")), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "chunk frames"), responses((status = 200, body = ChunksStored), (status = 422, body = ErrorBody)))]
async fn upload_chunks(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
    Query(query): Query<UploadChunksQuery>,
    body: Body,
) -> Result<Json<ChunksStored>, ApiError> {
    Ok(Json(state.catalogue.upload_chunks(&user, &id, query.payloads, body.into_data_stream()).await?))
}

/// Step 3: the version joins the catalogue.
#[utoipa::path(post, path = paths::UPLOAD_COMMIT, tag = "images", security(("api_key" = [])), params(("id" = String, Path, description = "upload id")), responses((status = 200, body = CommitResponse), (status = 409, body = ErrorBody)))]
async fn commit_upload(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
) -> Result<Json<CommitResponse>, ApiError> {
    Ok(Json(state.catalogue.commit_upload(&user, &id).await?))
}

/// Every image with its versions, files and where each rack's sync of it stands.
#[utoipa::path(get, path = paths::IMAGES, tag = "images", security(("api_key" = [])), responses((status = 200, body = Vec<ImageView>)))]
async fn list_images(State(state): State<AppState>, _user: ApiUser) -> Result<Json<Vec<ImageView>>, ApiError> {
    Ok(Json(state.catalogue.image_views().await?))
}

/// Removes an image version from the catalogue (racks drop it at their next sync).
#[utoipa::path(delete, path = paths::IMAGE_VERSION, tag = "images", security(("api_key" = [])), params(("image_id" = String, Path), ("version" = String, Path)), responses((status = 200, body = DeleteVersionResponse), (status = 404, body = ErrorBody)))]
async fn delete_version(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path((image_id, version)): Path<(String, String)>,
) -> Result<Json<DeleteVersionResponse>, ApiError> {
    Ok(Json(state.catalogue.delete_version(&user, &image_id, &version).await?))
}

#[derive(Debug, Deserialize)]
struct CatalogueQuery {
    /// The revision the rack has seen; the call returns at once if the region's differs.
    #[serde(default = "minus_one")]
    after: i64,
    /// The sync request counter the rack has handled.
    #[serde(default)]
    requested: i64,
    /// The region's change count of the rack's last answer (`RackCatalogue::changes_seen`).
    #[serde(default)]
    changes: Option<u64>,
    /// How long to hold the call open waiting for a change.
    #[serde(default)]
    wait_ms: u64,
}

fn minus_one() -> i64 {
    -1
}

/// The catalogue for a rack, held open (long-poll) until something changes or `wait_ms` passes.
#[utoipa::path(get, path = paths::RACK_CATALOGUE, tag = "rack protocol", security(("rack" = [])), params(("after" = Option<i64>, Query), ("requested" = Option<i64>, Query), ("changes" = Option<u64>, Query), ("wait_ms" = Option<u64>, Query)), responses((status = 200, body = RackCatalogue)))]
async fn rack_catalogue(
    State(state): State<AppState>,
    AuthedRack(rack): AuthedRack,
    Query(query): Query<CatalogueQuery>,
) -> Result<Json<RackCatalogue>, ApiError> {
    let wait = Duration::from_millis(query.wait_ms);
    Ok(Json(state.catalogue.rack_catalogue(&rack.id, query.after, query.requested, query.changes, wait).await?))
}

#[derive(Debug, Deserialize)]
struct ManifestQuery {
    /// A manifest the rack already has: the answer is then a delta payload against it.
    base: Option<String>,
}

/// A manifest, raw or as a delta against `base`.
#[utoipa::path(get, path = paths::RACK_MANIFEST, tag = "rack protocol", security(("rack" = [])), params(("id" = String, Path), ("base" = Option<String>, Query)), responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
async fn rack_manifest(
    State(state): State<AppState>,
    _rack: AuthedRack,
    Path(id): Path<String>,
    Query(query): Query<ManifestQuery>,
) -> Result<Response, ApiError> {
    Ok(match state.catalogue.rack_manifest(&id, query.base.as_deref()).await? {
        ManifestPayload::Raw(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        ManifestPayload::Delta(bytes) => ([(header::CONTENT_TYPE, MANIFEST_DELTA_TYPE)], bytes).into_response(),
    })
}

/// Chunks for a rack, streamed one frame per want.
#[utoipa::path(post, path = paths::RACK_CHUNKS, tag = "rack protocol", security(("rack" = [])), request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "wants"), responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>, description = "one frame per want")))]
async fn rack_chunks(State(state): State<AppState>, _rack: AuthedRack, body: Bytes) -> Result<Response, ApiError> {
    let stream = state.catalogue.rack_chunks(&body)?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], Body::from_stream(stream)).into_response())
}
