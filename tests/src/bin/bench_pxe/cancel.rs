//! Cancellation: Ctrl-C and SIGTERM set a flag that every wait, load loop and measurement
//! checks, so the run unwinds through its locals and stops everything it started.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, ensure, Result};

/// Set by Ctrl-C or SIGTERM; every wait and every measurement checks it and returns an error,
/// so the run unwinds through its locals and cleans up.
pub static CANCELLED: AtomicBool = AtomicBool::new(false);

/// Turns Ctrl-C and SIGTERM into [`CANCELLED`] (instead of dying with everything still running).
pub fn watch_signals() {
    std::thread::spawn(|| {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async {
            let Ok(mut terminate) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            eprintln!("bench_pxe: interrupted; stopping everything it started");
            CANCELLED.store(true, Ordering::SeqCst);
        });
    });
}

pub fn check_cancelled() -> Result<()> {
    ensure!(!CANCELLED.load(Ordering::SeqCst), "interrupted");
    Ok(())
}

/// `future`, or an error as soon as the run is cancelled.
pub async fn cancellable<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        result = future => result,
        _ = async {
            while !CANCELLED.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        } => Err(anyhow!("interrupted")),
    }
}

/// Sleeps `duration` in short steps, returning early with an error if the run is cancelled.
pub fn sleep_checked(duration: Duration) -> Result<()> {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        check_cancelled()?;
        std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(Instant::now())));
    }
    check_cancelled()
}

/// Calls `check` every 100 ms until it is true, fails, the run is cancelled, or `deadline`
/// passes.
pub fn wait_until(what: &str, deadline: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    metalrack_tests::wait::wait_until(what, deadline, Duration::from_millis(100), || {
        check_cancelled()?;
        check()
    })
}
