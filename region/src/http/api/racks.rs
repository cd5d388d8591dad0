//! Rack registration, heartbeats, the rack list, sync policies and "sync now".

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use metalrack_api::images::{RackSnapshot, SyncPolicy};
use metalrack_api::paths;
use metalrack_api::{
    ChallengeRequest, ChallengeResponse, HeartbeatRequest, HeartbeatResponse, RackView, RegisterRequest,
    RegisterResponse,
};

use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiUser, AuthedRack};
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::RACK_CHALLENGE, post(challenge))
        .route(paths::RACK_REGISTER, post(register))
        .route(paths::RACK_HEARTBEAT, post(heartbeat))
        .route(paths::RACKS, get(list_racks))
        .route(paths::RACK_SYNC, post(sync_rack))
        .route(paths::RACK_SYNC_POLICY, put(set_sync_policy))
        .route(paths::SYNC_ALL, post(sync_all))
        .route(
            paths::RACK_SNAPSHOT,
            put(put_snapshot).layer(DefaultBodyLimit::max(metalrack_api::limits::SNAPSHOT_BODY_BYTES_MAX)),
        )
}

async fn put_snapshot(
    State(state): State<AppState>,
    AuthedRack(rack): AuthedRack,
    ApiJson(snapshot): ApiJson<RackSnapshot>,
) -> Result<StatusCode, ApiError> {
    state.racks.put_snapshot(&rack, &snapshot).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn challenge(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(request): ApiJson<ChallengeRequest>,
) -> Result<Json<ChallengeResponse>, ApiError> {
    let nonce = state.racks.challenge(request.name, peer.ip()).await?;
    Ok(Json(ChallengeResponse { nonce, certificate_sha256: Some(state.racks.certificate_sha256_hex()) }))
}

async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    Ok(Json(state.racks.register(request, peer.ip()).await?))
}

async fn heartbeat(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    AuthedRack(rack): AuthedRack,
    ApiJson(request): ApiJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    Ok(Json(state.racks.heartbeat(&rack, &request, &peer.ip().to_string()).await?))
}

async fn list_racks(State(state): State<AppState>, _user: ApiUser) -> Result<Json<Vec<RackView>>, ApiError> {
    Ok(Json(state.racks.views().await?))
}

async fn sync_rack(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.racks.request_sync(&user, Some(&id)).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn sync_all(State(state): State<AppState>, ApiUser(user): ApiUser) -> Result<StatusCode, ApiError> {
    state.racks.request_sync(&user, None).await?;
    Ok(StatusCode::ACCEPTED)
}

async fn set_sync_policy(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(id): Path<String>,
    ApiJson(policy): ApiJson<SyncPolicy>,
) -> Result<StatusCode, ApiError> {
    state.racks.set_sync_policy(&user, &id, &policy).await?;
    Ok(StatusCode::NO_CONTENT)
}
