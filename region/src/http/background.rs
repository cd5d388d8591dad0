//! The region's background work: the racks' requests and the region's timers, run on a runtime
//! of their own whose threads (and their SQLite connections' threads) have a lower priority
//! than the admin's requests; and the admin's threads' short scheduler slice.
//!
//! Why: during a deploy storm the racks send the region a steady trickle of work (boot events,
//! power results, catalogue long-poll answers) that nobody waits on by the millisecond, while an
//! operator waits on every page of the UI. On one runtime the two took turns: a page that
//! arrived while a rack's request was being answered waited for it, and so the page's p99 grew
//! by about one rack request. With the rack's work on lower-priority threads, the kernel runs
//! the admin's request first, and the rack's work takes what the admin's leaves.
//!
//! A lower priority alone decides shares, not wake-ups: Linux's scheduler (EEVDF, 6.6 and
//! later) lets a running thread finish its slice (the base slice, 0.75 ms × (1 + log2 CPUs):
//! 1.4 ms on two cores) before a woken thread of any weight takes the core ("run to parity").
//! A page that arrived during a rack's burst of work waited up to that slice at each of its
//! wake-ups (the request, each query's answer from its SQLite thread). Since 6.12 a thread may
//! ask for a shorter slice, and a woken thread with a shorter slice than the running one
//! preempts it at once; so the admin's threads ask for the shortest ([`ADMIN_SLICE_NS`]) and
//! the background's keep the default.

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
/// never starved outright, as `SCHED_IDLE` could starve it under a busy UI. (The weight decides
/// shares only; winning each wake-up is the short slice's doing, [`ADMIN_SLICE_NS`].)
/// Relative, so a region an operator started under `nice` keeps the same order.
pub const BACKGROUND_NICE_STEPS: i32 = 10;

/// The nice value at most (the kernel's lowest priority).
const NICE_MAX: i32 = 19;

/// The scheduler slice the admin's threads ask for: the kernel's shortest (0.1 ms). A woken
/// admin thread then preempts a background thread (whose slice is the default, 1.4 ms on two
/// cores) at once instead of after its slice; the cost is more frequent switches between admin
/// threads when they alone fill a core, which at 0.1 ms is still a small share of it.
pub const ADMIN_SLICE_NS: u64 = 100_000;

/// Builds the main runtime, the one that accepts connections and runs the admin's requests:
/// first gives the calling thread [`ADMIN_SLICE_NS`], which every thread it starts inherits
/// (the runtime's workers and blocking threads, and the SQLite threads they open), and says
/// once if the kernel does not honour it (before 6.12 it ignores the request) or refuses it.
pub fn main_runtime() -> std::io::Result<Runtime> {
    // Not fatal: without it the region works, its pages wait longer during the racks' work.
    match set_slice(ADMIN_SLICE_NS).and_then(|()| slice_of(None)) {
        Ok(slice) if slice == ADMIN_SLICE_NS => {}
        Ok(_) => tracing::warn!(
            slice_ns = ADMIN_SLICE_NS,
            "the kernel ignores a thread's requested scheduler slice (Linux 6.12 or later honours it): \
             the admin's requests may wait for the racks' work up to a default slice at each wake-up"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot ask for a shorter scheduler slice for the admin's threads"),
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

/// The scheduler slice of thread `tid` (`None`: the calling thread), in nanoseconds: the one it
/// asked for, else the default.
pub fn slice_of(tid: Option<rustix::process::Pid>) -> std::io::Result<u64> {
    Ok(sched_attr(tid)?.sched_runtime)
}

/// The scheduler attributes of thread `tid` (`None`: the calling thread).
fn sched_attr(tid: Option<rustix::process::Pid>) -> std::io::Result<libc::sched_attr> {
    let size = std::mem::size_of::<libc::sched_attr>();
    let mut attr = libc::sched_attr {
        size: size as u32,
        sched_policy: 0,
        sched_flags: 0,
        sched_nice: 0,
        sched_priority: 0,
        sched_runtime: 0,
        sched_deadline: 0,
        sched_period: 0,
    };
    let tid = tid.map_or(0, |tid| tid.as_raw_nonzero().get());
    // SAFETY: `sched_getattr` writes at most `size` bytes into `attr`, which has that size and
    // lives across the call; no other memory is touched.
    #[allow(unsafe_code)]
    let result = unsafe { libc::syscall(libc::SYS_sched_getattr, tid, &mut attr as *mut libc::sched_attr, size, 0) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr)
}

/// Sets the calling thread's scheduler slice (0: the default), keeping its policy and nice
/// value (`sched_setattr` sets all three, so they are read first).
fn set_slice(slice_ns: u64) -> std::io::Result<()> {
    let mut attr = sched_attr(None)?;
    attr.sched_runtime = slice_ns;
    attr.sched_flags = 0;
    // SAFETY: `sched_setattr` reads `attr.size` bytes of `attr`, a live, initialised struct of
    // that size; it writes nothing.
    #[allow(unsafe_code)]
    let result = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const libc::sched_attr, 0) };
    if result != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The background runtime; dropping it stops its tasks without waiting for them.
#[derive(Debug)]
pub struct Background {
    runtime: Option<Runtime>,
}

impl Background {
    /// Starts the runtime, as many worker threads as the process may use cores (like the main
    /// runtime), each [`BACKGROUND_NICE_STEPS`] nicer than the calling thread, with the
    /// default scheduler slice (not the admin's short one it would inherit), and marked to use
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
                if let Err(e) = set_slice(0) {
                    tracing::warn!(error = %e, "cannot give a background thread the default scheduler slice");
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

    /// Each of this process's SQLite connection threads (sqlx names them
    /// `sqlx-sqlite-worker-N`, which the kernel cuts to 15 bytes): its nice value and scheduler
    /// slice.
    fn sqlite_threads() -> Vec<(i32, u64)> {
        let mut threads = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            if !stat[open + 1..close].starts_with("sqlx-sqlite") {
                continue;
            }
            // Fields after the name start at the third (state); the nice value is the 19th.
            let nice = stat[close + 1..].split_whitespace().nth(19 - 3).unwrap().parse().unwrap();
            let tid = task.file_name().to_str().unwrap().parse().unwrap();
            let Ok(slice) = slice_of(rustix::process::Pid::from_raw(tid)) else { continue };
            threads.push((nice, slice));
        }
        threads
    }

    /// Runs a query, then says the handler thread's nice value, which pool it used, and its
    /// scheduler slice.
    async fn report(axum::extract::State(store): axum::extract::State<Store>) -> String {
        let one: i64 = sqlx::query_scalar("SELECT 1").fetch_one(store.pool()).await.unwrap();
        assert_eq!(one, 1);
        format!(
            "{} {} {}",
            rustix::process::getpriority_process(None).unwrap(),
            crate::db::on_background_thread(),
            slice_of(None).unwrap()
        )
    }

    async fn get_text(app: &Router, path: &str) -> String {
        let response = app.clone().oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let body = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
        String::from_utf8(body.to_vec()).unwrap()
    }

    /// A route behind the middleware runs its handler on a background thread, nicer than the
    /// admin's and with the default slice, and its query on a SQLite thread that the background
    /// thread opened and that is just as nice; a route without it runs at the process's
    /// priority, with the admin's short slice, on the foreground pool, whose SQLite threads
    /// have that slice too. (Had the two shared a pool, the racks' queries would run at the
    /// admin's priority.) On the main runtime, as `regiond serve` runs.
    #[test]
    fn the_racks_routes_and_their_queries_run_at_the_background_priority() {
        main_runtime().unwrap().block_on(async {
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
            assert_eq!(slice_of(None).unwrap(), ADMIN_SLICE_NS, "this kernel ignores a requested slice (before 6.12)");
            assert_eq!(get_text(&app, "/admin").await, format!("{base} false {ADMIN_SLICE_NS}"));
            let threads = sqlite_threads();
            assert!(
                !threads.iter().any(|&(nice, _)| nice == nicer),
                "no background connection before a rack's request"
            );
            let rack = get_text(&app, "/rack").await;
            let default_slice: u64 = rack.strip_prefix(&format!("{nicer} true ")).expect(&rack).parse().unwrap();
            assert_ne!(default_slice, ADMIN_SLICE_NS, "the background thread kept the admin's slice");
            let threads = sqlite_threads();
            assert!(
                threads.contains(&(nicer, default_slice)),
                "the rack's query ran on a connection thread at nice {nicer} with the default slice: {threads:?}"
            );
            assert!(
                threads.contains(&(base, ADMIN_SLICE_NS)),
                "the admin's connections stay at nice {base} with the admin's slice: {threads:?}"
            );
            store.close().await;
        });
    }

    /// A background thread busy in bursts longer than the default slice, and an admin thread
    /// on the same core that sleeps and wakes: the admin thread runs within a fraction of a
    /// millisecond of each wake-up instead of waiting for the background thread's slice to end.
    /// (With the background's lower priority alone, nine in ten wake-ups came within 1.5 ms,
    /// the one in ten that landed in a burst late by up to the 1.4 ms slice.)
    #[test]
    fn a_woken_admin_thread_does_not_wait_out_a_background_threads_slice() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::{Duration, Instant};

        // Gives this thread the admin's slice, as the main runtime's threads have.
        let _runtime = main_runtime().unwrap();
        let background = Background::start().unwrap();
        let mut one_core = rustix::thread::CpuSet::new();
        one_core.set(rustix::thread::sched_getcpu());
        rustix::thread::sched_setaffinity(None, &one_core).unwrap();
        let busy = std::sync::Arc::new(AtomicBool::new(true));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let burner = background.handle().spawn_blocking({
            let busy = busy.clone();
            move || {
                rustix::thread::sched_setaffinity(None, &one_core).unwrap();
                started_tx.send(()).unwrap();
                while busy.load(Ordering::Relaxed) {
                    let burst = Instant::now();
                    while burst.elapsed() < Duration::from_millis(2) {
                        std::hint::spin_loop();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        });
        started_rx.recv_timeout(Duration::from_secs(10)).expect("the background thread did not start");
        // 400 wake-ups 0.5–2.5 ms apart (a fixed spread, so they fall at every phase of the
        // bursts), each followed by 0.1 ms of work, like a request's.
        let mut late: Vec<Duration> = (0..400u64)
            .map(|n| {
                let nap = Duration::from_micros(500 + n * 7919 % 2000);
                let asleep = Instant::now();
                std::thread::sleep(nap);
                let lateness = asleep.elapsed().saturating_sub(nap);
                let work = Instant::now();
                while work.elapsed() < Duration::from_micros(100) {
                    std::hint::spin_loop();
                }
                lateness
            })
            .collect();
        busy.store(false, Ordering::Relaxed);
        drop(burner);
        late.sort();
        let p90 = late[late.len() * 9 / 10];
        assert!(p90 < Duration::from_micros(700), "90% of the admin thread's wake-ups came within {p90:?}");
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
