//! `GET /MAAS/api/v1/metrics`: the region's Prometheus metrics. It authenticates like the rest
//! of the API (an API key as a bearer token, which Prometheus sends with `authorization:
//! credentials_file`), over HTTPS only like every API call: the counts name no secret, but they
//! describe the site's fleet, and every endpoint authenticates unless it must be public.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metalrack_api::machines::MachineState;
use metalrack_api::{paths, ErrorBody};

use crate::http::error::ApiError;
use crate::http::extract::ApiUser;
use crate::http::limits::{HTTP_REQUESTS_IN_FLIGHT_MAX, LONG_POLLS_MAX};
use crate::http::AppState;
use crate::metrics::StateLabel;

pub fn router() -> Router<AppState> {
    Router::new().route(paths::METRICS, get(scrape))
}

/// The region's metrics in the OpenMetrics text format (`metalrack_region_*`): requests by
/// route, method and status with latency histograms, racks and machines by state, deploys in
/// progress and waiting, heartbeats, boot events received, stored and dropped, long-polls held,
/// database connections.
#[utoipa::path(get, path = paths::METRICS, tag = "monitoring", security(("api_key" = [])), responses((status = 200, description = "OpenMetrics text", content_type = "application/openmetrics-text"), (status = 401, body = ErrorBody)))]
pub async fn scrape(State(state): State<AppState>, _user: ApiUser) -> Result<impl IntoResponse, ApiError> {
    let metrics = &state.shared.metrics;
    let _one_scrape_at_a_time = metrics.scrape.lock().await;
    for (rack_state, n) in state.racks.state_counts().await? {
        metrics.racks.get_or_create(&StateLabel { state: crate::racks::state_word(rack_state) }).set(n);
    }
    let store = &state.shared.store;
    let counts = store.machine_state_counts().await?;
    let count = |machine_state: MachineState| {
        counts.iter().find(|(word, _)| word == machine_state.as_str()).map_or(0, |(_, n)| *n)
    };
    for machine_state in MachineState::ALL {
        metrics.machines.get_or_create(&StateLabel { state: machine_state.as_str() }).set(count(machine_state));
    }
    metrics.deploys_in_progress.set(count(MachineState::Deploying));
    metrics.deploys_waiting.set(count(MachineState::Allocated));
    metrics.events_trimmed.set(store.events_trimmed().await?);
    let (open, idle) = store.pool_connections();
    metrics.db_connections.get_or_create(&StateLabel { state: "idle" }).set(idle as i64);
    metrics.db_connections.get_or_create(&StateLabel { state: "in_use" }).set(i64::from(open) - idle as i64);
    // The store counts; the counter catches up under the scrape lock.
    let closed = &metrics.db_connections_closed_in_transaction;
    closed.inc_by(store.connections_closed_in_transaction().saturating_sub(closed.get()));
    let in_flight = &state.in_flight;
    metrics.http_requests_in_flight.set((HTTP_REQUESTS_IN_FLIGHT_MAX - in_flight.handlers_free()) as i64);
    metrics.long_polls_held.set((LONG_POLLS_MAX - in_flight.long_polls_free()) as i64);
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode()))
}
