//! The JSON API under `/MAAS/api/v1/`: one module per domain, each a thin layer of handlers that
//! parse the request, call the domain, and answer. Anonymous calls are refused except the two
//! registration steps. The racks' routes run on the background runtime (`http::background`).

mod catalogue;
mod machines;
mod metrics;
pub mod openapi;
mod racks;
mod users;

use axum::Router;

use super::error::ApiError;
use super::AppState;

pub fn router(background: tokio::runtime::Handle) -> Router<AppState> {
    Router::new()
        .merge(racks::rack_router())
        .merge(catalogue::rack_router())
        .merge(machines::rack_router())
        // Only the routes above: `route_layer` wraps the routes the router has so far.
        .route_layer(axum::middleware::from_fn_with_state(background, super::background::run_in_background))
        .merge(racks::router())
        .merge(users::router())
        .merge(catalogue::router())
        .merge(machines::router())
        .merge(metrics::router())
        .route(metalrack_api::paths::OPENAPI, axum::routing::get(openapi::document))
        .fallback(|| async { ApiError::not_found("no such API endpoint") })
}
