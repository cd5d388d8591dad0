//! The region's background work: the racks' requests and the region's timers, run on a runtime
//! of their own whose threads (and their SQLite connections' threads) have a lower priority
//! than the admin's requests.
//!
//! Why: during a deploy storm the racks send the region a steady trickle of work (boot events,
//! power results, catalogue long-poll answers) that nobody waits on by the millisecond, while an
//! operator waits on every page of the UI. On one runtime the two took turns: a page that
//! arrived while a rack's request was being answered waited for it, and so the page's p99 grew
//! by about one rack request. With the rack's work on lower-priority threads, the kernel gives
//! the admin's requests the larger share of a busy core, and the rack's work takes what the
//! admin's leaves.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::runtime::{Handle, Runtime};
use tokio::task::JoinHandle;

use super::error::ApiError;

/// How much nicer the background threads are than the process (nice 0 → 10). At 10 steps a
/// busy admin thread gets ~90% of a shared core (weights 1024 against 110), while the racks'
/// work still runs whenever the admin's leaves the core idle, which is nearly always: it is
/// never starved outright, as `SCHED_IDLE` could starve it under a busy UI. Relative, so a
/// region an operator started under `nice` keeps the same order.
///
/// The weight decides shares, not wake-ups: Linux's scheduler (EEVDF) lets a background thread
/// finish its slice (1.4 ms on two cores) before a woken admin thread runs. Giving the admin's
/// threads a shorter slice removed that wait in isolation but made the deploy-storm benchmark
/// worse and cost CPU, so it is not done (`docs/PERFORMANCE.md`, "The admin's threads with a
/// shorter scheduler slice").
pub const BACKGROUND_NICE_STEPS: i32 = 10;

/// The nice value at most (the kernel's lowest priority).
const NICE_MAX: i32 = 19;

/// The background runtime; dropping it stops its tasks without waiting for them.
#[derive(Debug)]
pub struct Background {
    runtime: Option<Runtime>,
}

impl Background {
    /// Starts the runtime, as many worker threads as the process may use cores (like the main
    /// runtime), each [`BACKGROUND_NICE_STEPS`] nicer than the calling thread and marked to use
    /// the store's background pool, as are the runtime's blocking threads.
    pub fn start() -> std::io::Result<Background> {
        let threads = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        // `None`: the calling thread (Linux keeps a nice value per thread).
        let nice = (rustix::process::getpriority_process(None)? + BACKGROUND_NICE_STEPS).min(NICE_MAX);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("regiond-background")
            .on_thread_start(move || {
                if let Err(e) = rustix::process::setpriority_process(None, nice) {
                    tracing::warn!(error = %e, nice, "cannot lower a background thread's priority");
                }
                crate::db::mark_background_thread();
            })
            .enable_all()
            .build()?;
        Ok(Background { runtime: Some(runtime) })
    }

    pub fn handle(&self) -> Handle {
        self.runtime.as_ref().expect("the runtime lives until drop").handle().clone()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Dropping a runtime blocks on its threads, which an async caller must not do.
            runtime.shutdown_background();
        }
    }
}

/// Middleware: runs the rest of the request (its extractors and its handler) on the background
/// runtime. The connection itself (TLS, HTTP parsing) stays where it was accepted. A request
/// whose client goes away stops its background task too (a long-poll is not left waiting).
pub async fn run_in_background(State(background): State<Handle>, request: Request, next: Next) -> Response {
    let mut task = AbortOnDrop(background.spawn(next.run(request)));
    match (&mut task).await {
        Ok(response) => response,
        Err(e) if e.is_panic() => {
            tracing::error!("a background request's handler panicked");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
        // Cancelled: the runtime is shutting down.
        Err(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the region is shutting down").into_response(),
    }
}

/// A spawned task that is aborted when whoever awaits it goes away.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt;

    use super::*;
    use crate::db::Store;

    /// The nice value of each of this process's SQLite connection threads (sqlx names them
    /// `sqlx-sqlite-worker-N`, which the kernel cuts to 15 bytes).
    fn sqlite_thread_nices() -> Vec<i32> {
        let mut nices = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            if !stat[open + 1..close].starts_with("sqlx-sqlite") {
                continue;
            }
            // Fields after the name start at the third (state); the nice value is the 19th.
            let nice = stat[close + 1..].split_whitespace().nth(19 - 3).unwrap().parse().unwrap();
            nices.push(nice);
        }
        nices
    }

    /// Runs a query, then says the handler thread's nice value and which pool it used.
    async fn report(axum::extract::State(store): axum::extract::State<Store>) -> String {
        let one: i64 = sqlx::query_scalar("SELECT 1").fetch_one(store.pool()).await.unwrap();
        assert_eq!(one, 1);
        format!("{} {}", rustix::process::getpriority_process(None).unwrap(), crate::db::on_background_thread())
    }

    async fn get_text(app: &Router, path: &str) -> String {
        let response = app.clone().oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// A route behind the middleware runs its handler on a background thread, nicer than the
    /// admin's, and its query on a SQLite thread that the background thread opened and that is
    /// just as nice; a route without it runs at the process's priority on the foreground pool.
    /// (Had the two shared a pool, the racks' queries would run at the admin's priority.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_racks_routes_and_their_queries_run_at_the_background_priority() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let background = Background::start().unwrap();
        let app = Router::new()
            .route("/rack", get(report))
            .route_layer(axum::middleware::from_fn_with_state(background.handle(), run_in_background))
            .route("/admin", get(report))
            .with_state(store.clone());
        let base = rustix::process::getpriority_process(None).unwrap();
        let nicer = (base + BACKGROUND_NICE_STEPS).min(NICE_MAX);
        assert!(nicer > base, "the test runs at the lowest priority already ({base})");
        assert_eq!(get_text(&app, "/admin").await, format!("{base} false"));
        assert!(!sqlite_thread_nices().contains(&nicer), "no background connection before a rack's request");
        assert_eq!(get_text(&app, "/rack").await, format!("{nicer} true"));
        let nices = sqlite_thread_nices();
        assert!(nices.contains(&nicer), "the rack's query ran on a connection thread at {nicer}: {nices:?}");
        assert!(nices.contains(&base), "the admin's connections stay at {base}: {nices:?}");
        store.close().await;
    }

    /// A request whose client goes away (a long-poll's rack disconnects) stops its task on the
    /// background runtime too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_dropped_by_its_client_stops_its_background_task() {
        let background = Background::start().unwrap();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        let slots = std::sync::Arc::new(std::sync::Mutex::new(Some((started_tx, dropped_tx))));
        let app = Router::new()
            .route(
                "/poll",
                get(move || {
                    let (started, dropped) = slots.lock().unwrap().take().unwrap();
                    async move {
                        // Sends on drop: when the task is aborted.
                        let _dropped = DropSignal(Some(dropped));
                        started.send(()).unwrap();
                        std::future::pending::<()>().await;
                    }
                }),
            )
            .route_layer(axum::middleware::from_fn_with_state(background.handle(), run_in_background));
        let request =
            tokio::spawn(async move { app.oneshot(Request::get("/poll").body(Body::empty()).unwrap()).await });
        tokio::time::timeout(std::time::Duration::from_secs(10), started_rx).await.unwrap().unwrap();
        request.abort();
        tokio::time::timeout(std::time::Duration::from_secs(10), dropped_rx)
            .await
            .expect("the background task was not stopped")
            .unwrap();
    }

    struct DropSignal(Option<tokio::sync::oneshot::Sender<()>>);

    impl Drop for DropSignal {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }
}
