//! Machines' boot decisions, and the boot events racks report.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use metalrack_api::machines::{BootEvent, MachineBoot, MachineUpdate};
use metalrack_api::paths;

use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ApiUser, AuthedRack};
use crate::http::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(paths::MACHINES, get(list_machines))
        .route(paths::MACHINE, put(put_machine))
        .route(paths::RACK_EVENTS, post(rack_events))
}

async fn list_machines(State(state): State<AppState>, _user: ApiUser) -> Result<Json<Vec<MachineBoot>>, ApiError> {
    Ok(Json(crate::machines::list(&state.shared).await?))
}

async fn put_machine(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    Path(mac): Path<String>,
    ApiJson(update): ApiJson<MachineUpdate>,
) -> Result<StatusCode, ApiError> {
    crate::machines::put(&state.shared, &user, &mac, update).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rack_events(
    State(state): State<AppState>,
    AuthedRack(rack): AuthedRack,
    ApiJson(events): ApiJson<Vec<BootEvent>>,
) -> Result<StatusCode, ApiError> {
    crate::machines::record_boot_events(&state.shared, &rack.id, &rack.name, events).await?;
    Ok(StatusCode::NO_CONTENT)
}
