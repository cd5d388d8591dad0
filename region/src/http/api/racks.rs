//! Rack registration, heartbeats, the rack list, sync policies and "sync now".

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use metalrack_api::images::{RackSnapshot, SyncPolicy};
use metalrack_api::paths;
use metalrack_api::{
    ChallengeRequest, ChallengeResponse, ErrorBody, HeartbeatRequest, HeartbeatResponse, RackPage, RegisterRequest,
    RegisterResponse,
};
use serde::Deserialize;

use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiUser, AuthedRack};
use crate::http::AppState;

/// The admin's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::RACKS, get(list_racks))
        .route(paths::RACK_SYNC, post(sync_rack))
        .route(paths::RACK_SYNC_POLICY, put(set_sync_policy))
        .route(paths::SYNC_ALL, post(sync_all))
}

/// The routes racks call (registration, heartbeats, snapshots).
pub fn rack_router() -> Router<AppState> {
    Router::new()
        .route(paths::RACK_CHALLENGE, post(challenge))
        .route(paths::RACK_REGISTER, post(register))
        .route(paths::RACK_HEARTBEAT, post(heartbeat))
        .route(
            paths::RACK_SNAPSHOT,
            put(put_snapshot).layer(DefaultBodyLimit::max(metalrack_api::limits::SNAPSHOT_BODY_BYTES_MAX)),
        )
}

#[utoipa::path(put, path = paths::RACK_SNAPSHOT, tag = "rack protocol", security(("rack" = [])), request_body = RackSnapshot, responses((status = 204, description = "stored"), (status = 401, body = ErrorBody)))]
async fn put_snapshot(
    State(state): State<AppState>,
    AuthedRack(rack): AuthedRack,
    ApiJson(snapshot): ApiJson<RackSnapshot>,
) -> Result<StatusCode, ApiError> {
    state.racks.put_snapshot(&rack, &snapshot).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Registration, step 1: a nonce for the rack to prove it knows the secret.
#[utoipa::path(post, path = paths::RACK_CHALLENGE, tag = "rack protocol", request_body = ChallengeRequest, responses((status = 200, body = ChallengeResponse), (status = 429, body = ErrorBody)))]
async fn challenge(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(request): ApiJson<ChallengeRequest>,
) -> Result<Json<ChallengeResponse>, ApiError> {
    let nonce = state.racks.challenge(request.name, peer.ip()).await?;
    Ok(Json(ChallengeResponse { nonce, certificate_sha256: Some(state.racks.certificate_sha256_hex()) }))
}

/// Registration, step 2: the HMAC proof; answers the rack's id and credential.
#[utoipa::path(post, path = paths::RACK_REGISTER, tag = "rack protocol", request_body = RegisterRequest, responses((status = 200, body = RegisterResponse), (status = 403, body = ErrorBody)))]
async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    Ok(Json(state.racks.register(request, peer.ip()).await?))
}

/// A rack's health and sync state, every few seconds.
#[utoipa::path(post, path = paths::RACK_HEARTBEAT, tag = "rack protocol", security(("rack" = [])), request_body = HeartbeatRequest, responses((status = 200, body = HeartbeatResponse), (status = 401, body = ErrorBody)))]
async fn heartbeat(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    AuthedRack(rack): AuthedRack,
    ApiJson(request): ApiJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    Ok(Json(state.racks.heartbeat(&rack, &request, &peer.ip().to_string()).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    limit: Option<u32>,
}

/// The rack controllers, a page at a time by name, with their state, health and sync.
#[utoipa::path(get, path = paths::RACKS, tag = "racks", security(("api_key" = [])), params(("offset" = Option<u64>, Query), ("limit" = Option<u32>, Query, description = "at most 1000; default 100")), responses((status = 200, body = RackPage), (status = 400, body = ErrorBody)))]
async fn list_racks(
    State(state): State<AppState>,
    _user: ApiUser,
    Query(query): Query<ListQuery>,
) -> Result<Json<RackPage>, ApiError> {
    Ok(Json(state.racks.page(query.offset, query.limit).await?))
}

/// "Sync now" for one rack.
#[utoipa::path(post, path = paths::RACK_SYNC, tag = "racks", security(("api_key" = [])), params(("id" = String, Path, description = "rack id")), responses((status = 202, description = "asked"), (status = 404, body = ErrorBody)))]
async fn sync_rack(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.racks.request_sync(&user, Some(&id)).await?;
    Ok(StatusCode::ACCEPTED)
}

/// "Sync now" for every rack.
#[utoipa::path(post, path = paths::SYNC_ALL, tag = "racks", security(("api_key" = [])), responses((status = 202, description = "asked")))]
async fn sync_all(State(state): State<AppState>, ApiUser(user): ApiUser) -> Result<StatusCode, ApiError> {
    state.racks.request_sync(&user, None).await?;
    Ok(StatusCode::ACCEPTED)
}

/// A rack's sync policy (auto, window, manual; bandwidth cap).
#[utoipa::path(put, path = paths::RACK_SYNC_POLICY, tag = "racks", security(("api_key" = [])), params(("id" = String, Path, description = "rack id")), request_body = SyncPolicy, responses((status = 204, description = "set"), (status = 422, body = ErrorBody)))]
async fn set_sync_policy(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
    ApiJson(policy): ApiJson<SyncPolicy>,
) -> Result<StatusCode, ApiError> {
    state.racks.set_sync_policy(&user, &id, &policy).await?;
    Ok(StatusCode::NO_CONTENT)
}
