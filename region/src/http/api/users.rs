//! What a user reads about themselves and the region: their account and the event log.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use metalrack_api::paths;
use metalrack_api::{AccountView, ErrorBody, EventView};
use serde::Deserialize;

use crate::http::error::ApiError;
use crate::http::extract::ApiUser;
use crate::http::AppState;

/// Most events one API call returns.
pub const EVENTS_PAGE_MAX: i64 = 1000;

/// Events a call returns when it does not say.
const EVENTS_PAGE_DEFAULT: i64 = 100;

pub fn router() -> Router<AppState> {
    Router::new().route(paths::EVENTS, get(list_events)).route(paths::ACCOUNT, get(account))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    limit: Option<i64>,
}

/// The region's event log, newest first.
#[utoipa::path(get, path = paths::EVENTS, tag = "events", security(("api_key" = [])), params(("limit" = Option<i64>, Query, description = "at most 1000; default 100")), responses((status = 200, body = Vec<EventView>), (status = 400, body = ErrorBody)))]
async fn list_events(
    State(state): State<AppState>,
    _user: ApiUser,
    Query(query): Query<EventsQuery>,
) -> Result<Json<Vec<EventView>>, ApiError> {
    let limit = query.limit.unwrap_or(EVENTS_PAGE_DEFAULT);
    if !(1..=EVENTS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad_request(format!("limit must be between 1 and {EVENTS_PAGE_MAX}")));
    }
    Ok(Json(state.shared.store.events(limit).await?))
}

/// The calling user's account.
#[utoipa::path(get, path = paths::ACCOUNT, tag = "users", security(("api_key" = [])), responses((status = 200, body = AccountView), (status = 401, body = ErrorBody)))]
async fn account(State(state): State<AppState>, ApiUser(user): ApiUser) -> Result<Json<AccountView>, ApiError> {
    let account = crate::users::account(&state.shared, &user).await?;
    Ok(Json(AccountView {
        username: user.username,
        email: user.email,
        is_admin: user.is_admin,
        ssh_keys: account.ssh_keys,
    }))
}
