//! The region's HTTP server: shared state, the router (UI + API), limits, and graceful shutdown.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::response::Redirect;
use axum::routing::get;
use axum::Router;
use tokio::sync::Mutex;
use tower::limit::GlobalConcurrencyLimitLayer;

use crate::config::RegionConfig;
use crate::images::Catalogue;
use crate::store::{RackRow, Store};

/// Where the region lives under its host, as in MAAS: `http://HOST:5240/MAAS/`.
pub const BASE_PATH: &str = "/MAAS";

/// Largest request body. Every request today is a small form or JSON document; image uploads
/// (a later issue) stream through their own route with their own limit.
pub const REQUEST_BODY_MAX_BYTES: usize = 64 * 1024;

/// Requests handled at once; more wait. Bounds memory and argon2 work (19 MiB per login).
pub const HTTP_REQUESTS_IN_FLIGHT_MAX: usize = 256;

/// Registration challenges outstanding at once; a flood of challenge requests cannot grow memory
/// beyond ~100 KiB.
pub const CHALLENGES_PENDING_MAX: usize = 1024;

/// How long a rack has to answer a challenge.
pub const CHALLENGE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug)]
pub struct PendingChallenge {
    pub rack_name: String,
    pub issued: Instant,
}

#[derive(Clone, Debug)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<RegionConfig>,
    pub data_dir: Arc<PathBuf>,
    pub challenges: Arc<Mutex<HashMap<String, PendingChallenge>>>,
    pub catalogue: Arc<Catalogue>,
    /// Bumped on every change racks must hear about (catalogue, sync requests, policies); the
    /// catalogue long-poll waits on it.
    pub changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// Set when the region begins to shut down: long-polls answer at once so shutdown need
    /// not wait for them.
    pub closing: Arc<std::sync::atomic::AtomicBool>,
    /// (rack id, generation) pairs already recorded as refused, so a stale rack's heartbeats
    /// add one event, not one every few seconds. At most one entry per rack and generation.
    stale_racks_reported: Arc<Mutex<HashSet<(String, i64)>>>,
}

impl AppState {
    pub fn new(store: Store, config: RegionConfig, data_dir: PathBuf, catalogue: Catalogue) -> AppState {
        AppState {
            store,
            catalogue: Arc::new(catalogue),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
            closing: Arc::default(),
            config: Arc::new(config),
            data_dir: Arc::new(data_dir),
            challenges: Arc::default(),
            stale_racks_reported: Arc::default(),
        }
    }

    /// Wakes every rack's catalogue long-poll.
    pub fn notify_change(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Records (once) that a rack registered under an older secret was refused.
    pub async fn note_stale_rack(&self, rack: &RackRow, generation: i64) {
        let first = self.stale_racks_reported.lock().await.insert((rack.id.clone(), generation));
        if first {
            let message =
                format!("rack {:?} refused: registered under an older secret; it must register again", rack.name);
            if let Err(e) = self.store.record_event("rack.refused", &rack.name, &message).await {
                tracing::error!(error = %crate::error::chain(&e), "cannot record event");
            }
        }
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .nest(&format!("{BASE_PATH}/api/v1"), crate::api::router())
        .merge(crate::ui::router())
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
    let closing = state.clone();
    let shutdown = async move {
        shutdown.await;
        closing.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        closing.notify_change();
    };
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
