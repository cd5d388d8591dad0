//! The JSON API under `/MAAS/api/v1/`: rack registration and heartbeats, and what users and tools
//! read (racks, events, account). Anonymous calls are refused except the two registration steps.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{ConnectInfo, FromRequest, Query, Request, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use metalrack_api::{
    validate_rack_name, verify_registration_proof, AccountView, ChallengeRequest, ChallengeResponse, EventView,
    HeartbeatRequest, HeartbeatResponse, RackState, RackView, RegisterRequest, RegisterResponse, NONCE_LEN_BYTES,
};
use serde::Deserialize;

use crate::auth::{ApiUser, AuthedRack};
use crate::error::ApiError;
use crate::server::{AppState, PendingChallenge, CHALLENGES_PENDING_MAX, CHALLENGE_LIFETIME};
use crate::store::RackRow;
use crate::util::{now_ms, random_hex, sha256_hex};

/// Most events one API call returns.
pub const EVENTS_PAGE_MAX: i64 = 1000;

/// Name of the setting holding the cluster's name, and its value until someone sets it.
pub const CLUSTER_NAME_SETTING: &str = "cluster_name";
pub const CLUSTER_NAME_DEFAULT: &str = "metalrack";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/racks/challenge", post(challenge))
        .route("/racks/register", post(register))
        .route("/racks/heartbeat", post(heartbeat))
        .route("/racks", get(list_racks))
        .route("/events", get(list_events))
        .route("/account", get(account))
        .merge(crate::images::router())
        .merge(crate::machines::router())
        .fallback(|| async { ApiError::not_found("no such API endpoint") })
}

/// `Json` whose rejections (bad JSON, wrong content type, too large) are JSON errors too.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => {
                let status = match &rejection {
                    JsonRejection::BytesRejection(_) => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => rejection.status(),
                };
                Err(ApiError::new(status, rejection.body_text()))
            }
        }
    }
}

async fn challenge(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<ChallengeRequest>,
) -> Result<Json<ChallengeResponse>, ApiError> {
    validate_rack_name(&request.name).map_err(ApiError::bad_request)?;
    let nonce = random_hex(NONCE_LEN_BYTES);
    let mut challenges = state.challenges.lock().await;
    challenges.retain(|_, c| c.issued.elapsed() < CHALLENGE_LIFETIME);
    if challenges.len() >= CHALLENGES_PENDING_MAX {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many registrations in progress; try again in a minute",
        ));
    }
    challenges.insert(nonce.clone(), PendingChallenge { rack_name: request.name, issued: Instant::now() });
    Ok(Json(ChallengeResponse { nonce }))
}

async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    validate_rack_name(&request.name).map_err(ApiError::bad_request)?;
    // A nonce is good for one attempt, right or wrong: a guesser needs a new challenge each time.
    let pending = state.challenges.lock().await.remove(&request.nonce);
    let pending = match pending {
        Some(p) if p.issued.elapsed() < CHALLENGE_LIFETIME && p.rack_name == request.name => p,
        _ => return Err(ApiError::bad_request("unknown or expired challenge nonce: ask for a new challenge")),
    };
    let nonce = hex::decode(&request.nonce).map_err(|_| ApiError::bad_request("nonce is not hex"))?;
    let proof = hex::decode(&request.proof).map_err(|_| ApiError::bad_request("proof is not hex"))?;
    let (secret, generation) =
        crate::secret::reconcile(&state.data_dir, &state.store, "region").await.map_err(ApiError::internal)?;
    if !verify_registration_proof(&secret, &nonce, &pending.rack_name, &proof) {
        let message = format!("rack {:?} from {} refused: wrong secret", request.name, peer.ip());
        tracing::warn!(rack = %request.name, peer = %peer.ip(), "registration refused: wrong secret");
        state.store.record_event("rack.refused", &request.name, &message).await.map_err(ApiError::internal)?;
        return Err(ApiError::forbidden(
            "wrong secret: the proof does not match this region's shared secret (see 'regiond secret show' on the region)",
        ));
    }
    let credential = random_hex(32);
    let (rack_id, replaced) = state
        .store
        .register_rack(&request.name, &sha256_hex(credential.as_bytes()), generation)
        .await
        .map_err(ApiError::internal)?;
    let verb = if replaced { "registered again (replacing its old registration)" } else { "registered" };
    tracing::info!(rack = %request.name, %rack_id, peer = %peer.ip(), replaced, "rack registered");
    state
        .store
        .record_event("rack.registered", &request.name, &format!("rack {:?} {verb} from {}", request.name, peer.ip()))
        .await
        .map_err(ApiError::internal)?;
    let cluster_name = cluster_name(&state).await?;
    Ok(Json(RegisterResponse { rack_id, credential, cluster_name }))
}

async fn heartbeat(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    AuthedRack(rack): AuthedRack,
    ApiJson(request): ApiJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let was_offline = rack_state(&state, &rack, current_generation(&state).await?, now_ms()) != RackState::Online;
    state
        .store
        .record_heartbeat(&rack.id, &request.health, request.sync.as_ref(), &peer.ip().to_string())
        .await
        .map_err(ApiError::internal)?;
    if was_offline {
        state
            .store
            .record_event(
                "rack.online",
                &rack.name,
                &format!("rack {:?} is online (version {})", rack.name, request.health.version),
            )
            .await
            .map_err(ApiError::internal)?;
    }
    Ok(Json(HeartbeatResponse { heartbeat_interval_ms: state.config.rack_heartbeat_interval_ms }))
}

async fn list_racks(State(state): State<AppState>, _user: ApiUser) -> Result<Json<Vec<RackView>>, ApiError> {
    Ok(Json(rack_views(&state).await?))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    limit: Option<i64>,
}

async fn list_events(
    State(state): State<AppState>,
    _user: ApiUser,
    Query(query): Query<EventsQuery>,
) -> Result<Json<Vec<EventView>>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=EVENTS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit must be between 1 and {EVENTS_PAGE_MAX}")));
    }
    Ok(Json(state.store.events(limit).await.map_err(ApiError::internal)?))
}

async fn account(State(state): State<AppState>, ApiUser(user): ApiUser) -> Result<Json<AccountView>, ApiError> {
    let ssh_keys = state.store.ssh_keys(&user.id).await.map_err(ApiError::internal)?;
    Ok(Json(AccountView { username: user.username, email: user.email, is_admin: user.is_admin, ssh_keys }))
}

pub async fn current_generation(state: &AppState) -> Result<i64, ApiError> {
    Ok(state.store.secret_state().await.map_err(ApiError::internal)?.map(|s| s.generation).unwrap_or(0))
}

pub async fn cluster_name(state: &AppState) -> Result<String, ApiError> {
    Ok(state
        .store
        .setting(CLUSTER_NAME_SETTING)
        .await
        .map_err(ApiError::internal)?
        .unwrap_or_else(|| CLUSTER_NAME_DEFAULT.into()))
}

/// A rack's state now: online while heartbeats arrive, offline after `rack_offline_after_ms` of
/// silence, and needing re-registration once the secret it registered under is gone.
pub fn rack_state(state: &AppState, rack: &RackRow, generation: i64, now: i64) -> RackState {
    if rack.secret_generation != generation {
        return RackState::NeedsReregistration;
    }
    match rack.last_seen_ms {
        Some(seen) if now - seen < state.config.rack_offline_after_ms as i64 => RackState::Online,
        _ => RackState::Offline,
    }
}

pub async fn rack_views(state: &AppState) -> Result<Vec<RackView>, ApiError> {
    let generation = current_generation(state).await?;
    let now = now_ms();
    let racks = state.store.racks().await.map_err(ApiError::internal)?;
    Ok(racks
        .into_iter()
        .map(|rack| RackView {
            state: rack_state(state, &rack, generation, now),
            id: rack.id,
            name: rack.name,
            registered_at_ms: rack.registered_at_ms,
            last_seen_ms: rack.last_seen_ms,
            health: rack.health,
            remote_address: rack.remote_address,
            sync_policy: rack.sync_policy,
            sync: rack.sync_report,
        })
        .collect())
}
