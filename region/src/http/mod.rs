//! The region's HTTP layer: the state handlers share, the router (UI + API), request limits, and
//! graceful shutdown. Handlers are thin: they parse, call a domain module, and answer.

pub mod api;
pub mod error;
pub mod extract;
pub mod ui;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::response::Redirect;
use axum::routing::get;
use axum::Router;
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::catalogue::{Catalogue, CatalogueOpenError};
use crate::racks::Racks;
use crate::state::Shared;

pub use metalrack_api::paths::BASE_PATH;

/// Largest request body. Every request but image uploads is a small form or JSON document;
/// uploads stream through their own routes with their own limits.
pub const REQUEST_BODY_MAX_BYTES: usize = metalrack_api::limits::REQUEST_BODY_MAX_BYTES;

/// Requests handled at once; more wait. Bounds memory and argon2 work (19 MiB per login).
pub const HTTP_REQUESTS_IN_FLIGHT_MAX: usize = 256;

/// What handlers share: the domains. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub shared: Shared,
    pub racks: Arc<Racks>,
    pub catalogue: Arc<Catalogue>,
}

impl AppState {
    pub fn new(shared: Shared) -> Result<AppState, CatalogueOpenError> {
        Ok(AppState {
            racks: Arc::new(Racks::new(shared.clone())),
            catalogue: Arc::new(Catalogue::open(shared.clone())?),
            shared,
        })
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .nest(&format!("{BASE_PATH}{}", metalrack_api::API_PREFIX), api::router())
        .merge(ui::router())
        .route("/", get(|| async { Redirect::permanent(&format!("{BASE_PATH}/")) }))
        .layer(DefaultBodyLimit::max(REQUEST_BODY_MAX_BYTES))
        .layer(axum::middleware::from_fn(close_if_body_unread))
        .layer(GlobalConcurrencyLimitLayer::new(HTTP_REQUESTS_IN_FLIGHT_MAX))
        .with_state(state)
}

/// Answers `Connection: close` when the request's body was not read to its end (refused as too
/// large, or an error before or in the middle of it). hyper then closes the connection, since
/// the unread rest would be taken for the next request; without the header a client that reused
/// the connection raced the close (seen in CI: `IncompleteMessage` on the request after a 413).
async fn close_if_body_unread(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::body::{Body, HttpBody};
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    let (parts, body) = request.into_parts();
    let read = Arc::new(AtomicBool::new(body.is_end_stream()));
    let body = if read.load(Ordering::Relaxed) {
        body
    } else {
        // Polled only once the body has ended without error.
        let end = read.clone();
        let marker = futures_util::stream::poll_fn(move |_| {
            end.store(true, Ordering::Relaxed);
            std::task::Poll::Ready(None)
        });
        Body::from_stream(body.into_data_stream().chain(marker))
    };
    let mut response = next.run(axum::extract::Request::from_parts(parts, body)).await;
    if !read.load(Ordering::Relaxed) {
        response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    response
}

/// Serves until `shutdown` completes. Prints the bound address on stdout first, so a caller that
/// asked for port 0 learns the real one.
pub async fn serve(
    state: AppState,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "regiond: listening on http://{local}{BASE_PATH}/")?;
        out.flush()?;
    }
    tracing::info!(%local, "region serving");
    let shared = state.shared.clone();
    let shutdown = async move {
        shutdown.await;
        shared.begin_closing();
    };
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
