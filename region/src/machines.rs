//! Machines' boot decisions over HTTP (set by operators, served to racks with the catalogue)
//! and the boot events racks report.

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use metalrack_api::images::{validate_image_name, validate_image_token};
use metalrack_api::machines::{
    normalize_mac, BootAction, BootEvent, MachineBoot, MachineUpdate, BOOT_EVENTS_PER_REQUEST_MAX,
};
use sqlx::Row;

use crate::api::ApiJson;
use crate::auth::{ApiUser, AuthedRack};
use crate::error::ApiError;
use crate::server::AppState;
use crate::store::{query_error, Store, StoreError};
use crate::util::now_ms;

/// Longest hostname or kernel command line accepted.
const TEXT_LEN_MAX: usize = 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/machines", get(list_machines))
        .route("/machines/{mac}", put(put_machine))
        .route("/rack/events", post(rack_events))
}

impl Store {
    pub async fn machines(&self) -> Result<Vec<MachineBoot>, StoreError> {
        let rows = sqlx::query("SELECT mac, hostname, boot_json FROM machines ORDER BY mac")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("list machines"))?;
        rows.iter()
            .map(|row| {
                let read = query_error("read machine");
                let mac: String = row.try_get(0).map_err(read)?;
                let hostname: String = row.try_get(1).map_err(query_error("read machine"))?;
                let json: String = row.try_get(2).map_err(query_error("read machine"))?;
                let boot = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt { what: format!("boot decision of {mac}: {e}") })?;
                Ok(MachineBoot { mac, hostname, boot })
            })
            .collect()
    }

    pub async fn put_machine(&self, machine: &MachineBoot) -> Result<(), StoreError> {
        let json = serde_json::to_string(&machine.boot).expect("BootAction serializes");
        sqlx::query(
            "INSERT INTO machines (mac, hostname, boot_json, updated_at_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (mac) DO UPDATE SET hostname = excluded.hostname, boot_json = excluded.boot_json, \
             updated_at_ms = excluded.updated_at_ms",
        )
        .bind(&machine.mac)
        .bind(&machine.hostname)
        .bind(json)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(query_error("put machine"))?;
        Ok(())
    }
}

async fn list_machines(State(state): State<AppState>, _user: ApiUser) -> Result<Json<Vec<MachineBoot>>, ApiError> {
    Ok(Json(state.store.machines().await.map_err(ApiError::internal)?))
}

async fn put_machine(
    State(state): State<AppState>,
    ApiUser(user): ApiUser,
    UrlPath(mac): UrlPath<String>,
    ApiJson(update): ApiJson<MachineUpdate>,
) -> Result<StatusCode, ApiError> {
    if !user.is_admin {
        return Err(ApiError::forbidden("only administrators may change machines"));
    }
    let mac = normalize_mac(&mac).map_err(ApiError::bad_request)?;
    if update.hostname.len() > TEXT_LEN_MAX {
        return Err(ApiError::bad_request("hostname too long"));
    }
    if let BootAction::Image { image, arch, version, kernel_params } = &update.boot {
        validate_image_name(image).map_err(ApiError::bad_request)?;
        validate_image_token("arch", arch).map_err(ApiError::bad_request)?;
        validate_image_token("version", version).map_err(ApiError::bad_request)?;
        if kernel_params.len() > TEXT_LEN_MAX || kernel_params.chars().any(|c| c.is_control()) {
            return Err(ApiError::bad_request("kernel_params must be one line of at most 1024 characters"));
        }
    }
    let machine = MachineBoot { mac: mac.clone(), hostname: update.hostname, boot: update.boot };
    state.store.put_machine(&machine).await.map_err(ApiError::internal)?;
    let message = format!("machine {mac} boots {}", serde_json::to_string(&machine.boot).unwrap_or_default());
    state.store.record_event("machine.boot", &user.username, &message).await.map_err(ApiError::internal)?;
    state.notify_change();
    Ok(StatusCode::NO_CONTENT)
}

/// Boot events a rack queued (also while the region was away), recorded as region events.
async fn rack_events(
    State(state): State<AppState>,
    AuthedRack(rack): AuthedRack,
    ApiJson(events): ApiJson<Vec<BootEvent>>,
) -> Result<StatusCode, ApiError> {
    if events.len() > BOOT_EVENTS_PER_REQUEST_MAX {
        return Err(ApiError::bad_request(format!("at most {BOOT_EVENTS_PER_REQUEST_MAX} events per request")));
    }
    for event in &events {
        if !event.kind.starts_with("boot.") || event.message.len() > TEXT_LEN_MAX {
            return Err(ApiError::bad_request(format!("invalid boot event kind {:?}", event.kind)));
        }
    }
    for event in events {
        let actor = format!("{} via {}", event.mac, rack.name);
        state.store.record_event(&event.kind, &actor, &event.message).await.map_err(ApiError::internal)?;
    }
    Ok(StatusCode::NO_CONTENT)
}
