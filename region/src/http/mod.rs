//! The region's HTTP layer: the state handlers share, the router (UI + API), request limits,
//! what is served in clear beside TLS, and graceful shutdown. Handlers are thin: they parse, call
//! a domain module, and answer.

pub mod api;
pub mod background;
pub mod error;
pub mod extract;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod transport;
pub mod ui;

pub use server::serve;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::response::Redirect;
use axum::routing::get;
use axum::Router;

use crate::catalogue::{Catalogue, CatalogueOpenError};
use crate::racks::Racks;
use crate::state::Shared;
use crate::users::throttle::LoginThrottle;

pub use metalrack_api::paths::BASE_PATH;

/// What handlers share: the domains. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub shared: Shared,
    pub racks: Arc<Racks>,
    pub catalogue: Arc<Catalogue>,
    pub login_throttle: Arc<LoginThrottle>,
    in_flight: Arc<limits::InFlight>,
}

impl AppState {
    /// The handlers' state; `certificate_sha256` is the fingerprint of the certificate the
    /// listener serves (see [`crate::tls`]), which registration hands to racks.
    pub fn new(shared: Shared, certificate_sha256: [u8; 32]) -> Result<AppState, CatalogueOpenError> {
        Ok(AppState {
            racks: Arc::new(Racks::new(shared.clone(), certificate_sha256)),
            catalogue: Arc::new(Catalogue::open(shared.clone())?),
            login_throttle: Arc::new(LoginThrottle::new(
                std::thread::available_parallelism()
                    .map(usize::from)
                    .unwrap_or(1)
                    .min(crate::users::throttle::LOGIN_VERIFICATIONS_MAX),
            )),
            in_flight: Arc::default(),
            shared,
        })
    }
}

/// The region's routes; the racks' run on `background` (see [`background`]).
pub fn router(state: AppState, background: tokio::runtime::Handle) -> Router {
    Router::new()
        .nest(&format!("{BASE_PATH}{}", metalrack_api::API_PREFIX), api::router(background))
        .merge(ui::router())
        .route("/", get(|| async { Redirect::permanent(&format!("{BASE_PATH}/")) }))
        .layer(DefaultBodyLimit::max(limits::REQUEST_BODY_MAX_BYTES))
        // Outermost last: a request's body is read (small ones whole, within a timeout) before
        // it takes one of the handlers' slots.
        .layer(axum::middleware::from_fn_with_state(state.in_flight.clone(), limits::limit_in_flight))
        .layer(axum::middleware::from_fn(limits::read_small_body))
        // Before any body is read: a clear request that must use TLS is answered at once.
        .layer(axum::middleware::from_fn(transport::clear_http_policy))
        .layer(axum::middleware::from_fn(extract::security_headers))
        .layer(axum::middleware::from_fn(limits::close_if_body_unread))
        // Outermost: a request refused by any layer above is counted too. Router::layer wraps
        // each route after routing, so the matched template is known.
        .layer(axum::middleware::from_fn_with_state(state.shared.metrics.clone(), metrics::count_request))
        .with_state(state)
}
