//! Machines: their lifecycle and power for users (admins change, everyone reads), the bare boot
//! decision by MAC, and the rack's side: boot events and reports, power requests and results.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use metalrack_api::machines::{
    BootEvent, BrokenRequest, DeployRequest, MachineCreate, MachineEdit, MachinePage, MachineUpdate, MachineView,
    PowerCommandRequest, ReleaseRequest,
};
use metalrack_api::power::{PowerRequest, PowerResult};
use metalrack_api::{paths, ErrorBody, EventView};
use serde::Deserialize;

use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiUser, AuthedRack};
use crate::http::AppState;
use crate::machines;

/// The admin's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::MACHINES, get(list_machines).post(add_machine))
        .route(paths::MACHINE, get(get_machine).put(put_machine).patch(edit_machine).delete(delete_machine))
        .route(paths::MACHINE_COMMISSION, post(commission))
        .route(paths::MACHINE_DEPLOY, post(deploy))
        .route(paths::MACHINE_RELEASE, post(release))
        .route(paths::MACHINE_POWER, post(power))
        .route(paths::MACHINE_MARK_BROKEN, post(mark_broken))
        .route(paths::MACHINE_MARK_FIXED, post(mark_fixed))
        .route(paths::MACHINE_ABORT, post(abort))
        .route(paths::MACHINE_EVENTS, get(machine_events))
}

/// The routes racks call (boot events, power requests and their results).
pub fn rack_router() -> Router<AppState> {
    Router::new()
        .route(paths::RACK_EVENTS, post(rack_events))
        .route(paths::RACK_POWER, get(rack_power).post(rack_power_result))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    offset: u64,
    #[serde(default)]
    limit: Option<u32>,
}

/// Machines, a page at a time, optionally in one state.
#[utoipa::path(get, path = paths::MACHINES, tag = "machines", security(("api_key" = [])), params(("state" = Option<String>, Query), ("offset" = Option<u64>, Query), ("limit" = Option<u32>, Query, description = "at most 1000; default 100")), responses((status = 200, body = MachinePage), (status = 400, body = ErrorBody)))]
async fn list_machines(
    State(state): State<AppState>,
    _user: ApiUser,
    Query(query): Query<ListQuery>,
) -> Result<Json<MachinePage>, ApiError> {
    Ok(Json(machines::list(&state.shared, query.state.as_deref(), query.offset, query.limit).await?))
}

/// Adds a machine by its boot MAC and power settings (as New).
#[utoipa::path(post, path = paths::MACHINES, tag = "machines", security(("api_key" = [])), request_body = MachineCreate, responses((status = 201, body = MachineView), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
async fn add_machine(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    ApiJson(create): ApiJson<MachineCreate>,
) -> Result<(StatusCode, Json<MachineView>), ApiError> {
    Ok((StatusCode::CREATED, Json(machines::add(&state.shared, &user, create).await?)))
}

#[utoipa::path(get, path = paths::MACHINE, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), responses((status = 200, body = MachineView), (status = 404, body = ErrorBody)))]
async fn get_machine(
    State(state): State<AppState>,
    _user: ApiUser,
    Path(key): Path<String>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(machines::get(&state.shared, &key).await?))
}

/// Sets a bare boot decision by MAC (no lifecycle: an image to network-boot, or local).
#[utoipa::path(put, path = paths::MACHINE, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), request_body = MachineUpdate, responses((status = 204, description = "set"), (status = 422, body = ErrorBody)))]
async fn put_machine(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(mac): Path<String>,
    ApiJson(update): ApiJson<MachineUpdate>,
) -> Result<StatusCode, ApiError> {
    machines::put(&state.shared, &user, &mac, update).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(patch, path = paths::MACHINE, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), request_body = MachineEdit, responses((status = 200, body = MachineView), (status = 422, body = ErrorBody)))]
async fn edit_machine(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(key): Path<String>,
    ApiJson(edit): ApiJson<MachineEdit>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(machines::edit(&state.shared, &user, &key, edit).await?))
}

#[utoipa::path(delete, path = paths::MACHINE, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), responses((status = 204, description = "deleted"), (status = 409, body = ErrorBody)))]
async fn delete_machine(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    machines::delete(&state.shared, &user, &key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Powers the machine on into the deploy environment, which reports its hardware; then Ready.
#[utoipa::path(post, path = paths::MACHINE_COMMISSION, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), responses((status = 200, body = MachineView), (status = 409, body = ErrorBody)))]
async fn commission(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(key): Path<String>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(machines::commission(&state.shared, &user, &key).await?))
}

/// Allocates the machine and deploys an image to its disk (queued per rack).
#[utoipa::path(post, path = paths::MACHINE_DEPLOY, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), request_body = DeployRequest, responses((status = 200, body = MachineView), (status = 409, body = ErrorBody)))]
async fn deploy(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<DeployRequest>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(machines::deploy(&state.shared, &user, &key, request).await?))
}

/// Optionally erases the disk, powers off, Ready.
#[utoipa::path(post, path = paths::MACHINE_RELEASE, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), request_body = ReleaseRequest, responses((status = 200, body = MachineView), (status = 409, body = ErrorBody)))]
async fn release(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<ReleaseRequest>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(machines::release(&state.shared, &user, &key, request).await?))
}

#[utoipa::path(post, path = paths::MACHINE_POWER, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), request_body = PowerCommandRequest, responses((status = 200, body = MachineView), (status = 409, body = ErrorBody)))]
async fn power(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<PowerCommandRequest>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(machines::power(&state.shared, &user, &key, request.action).await?))
}

#[utoipa::path(post, path = paths::MACHINE_MARK_BROKEN, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), request_body = BrokenRequest, responses((status = 200, body = MachineView), (status = 409, body = ErrorBody)))]
async fn mark_broken(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(key): Path<String>,
    ApiJson(request): ApiJson<BrokenRequest>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(machines::mark_broken(&state.shared, &user, &key, request).await?))
}

#[utoipa::path(post, path = paths::MACHINE_MARK_FIXED, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), responses((status = 200, body = MachineView), (status = 409, body = ErrorBody)))]
async fn mark_fixed(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(key): Path<String>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(machines::mark_fixed(&state.shared, &user, &key).await?))
}

/// Stops a commission, deploy or release in progress.
#[utoipa::path(post, path = paths::MACHINE_ABORT, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), responses((status = 200, body = MachineView), (status = 409, body = ErrorBody)))]
async fn abort(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(key): Path<String>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(machines::abort(&state.shared, &user, &key).await?))
}

/// The machine's events, newest first.
#[utoipa::path(get, path = paths::MACHINE_EVENTS, tag = "machines", security(("api_key" = [])), params(("machine" = String, Path, description = "machine id or MAC")), responses((status = 200, body = Vec<EventView>), (status = 404, body = ErrorBody)))]
async fn machine_events(
    State(state): State<AppState>,
    _user: ApiUser,
    Path(key): Path<String>,
) -> Result<Json<Vec<EventView>>, ApiError> {
    Ok(Json(machines::events(&state.shared, &key).await?))
}

/// Boot events and machine reports a rack queued (deduplicated by queue id and sequence).
#[utoipa::path(post, path = paths::RACK_EVENTS, tag = "rack protocol", security(("rack" = [])), request_body = Vec<BootEvent>, responses((status = 204, description = "stored"), (status = 422, body = ErrorBody)))]
async fn rack_events(
    State(state): State<AppState>,
    AuthedRack(rack): AuthedRack,
    ApiJson(events): ApiJson<Vec<BootEvent>>,
) -> Result<StatusCode, ApiError> {
    machines::record_boot_events(&state.shared, &rack.id, &rack.name, events).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PowerPollQuery {
    #[serde(default)]
    wait_ms: u64,
}

/// This rack's power requests (long-poll).
#[utoipa::path(get, path = paths::RACK_POWER, tag = "rack protocol", security(("rack" = [])), params(("wait_ms" = Option<u64>, Query)), responses((status = 200, body = Vec<PowerRequest>)))]
async fn rack_power(
    State(state): State<AppState>,
    AuthedRack(rack): AuthedRack,
    Query(query): Query<PowerPollQuery>,
) -> Result<Json<Vec<PowerRequest>>, ApiError> {
    let wait = Duration::from_millis(query.wait_ms);
    Ok(Json(machines::rack_power_requests(&state.shared, &rack.id, wait).await?))
}

/// What came of a power request.
#[utoipa::path(post, path = paths::RACK_POWER, tag = "rack protocol", security(("rack" = [])), request_body = PowerResult, responses((status = 204, description = "stored")))]
async fn rack_power_result(
    State(state): State<AppState>,
    AuthedRack(rack): AuthedRack,
    ApiJson(result): ApiJson<PowerResult>,
) -> Result<StatusCode, ApiError> {
    machines::power_result(&state.shared, &rack.id, &rack.name, result).await?;
    Ok(StatusCode::NO_CONTENT)
}
