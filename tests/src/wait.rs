//! Waiting for a condition with a deadline, instead of sleeping and hoping: async for tests
//! and the benchmarks' tokio code, blocking for the benchmarks' threads.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};

/// A test's patience for anything that should happen within a few heartbeats.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// How often tests look again.
const TEST_POLL: Duration = Duration::from_millis(50);

/// Polls `condition` until it returns `Some`, or panics naming `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_for_or_show(what, deadline, condition, String::new).await
}

/// [`wait_for`], whose panic adds what `show` says (the daemons' logs, say), so a timeout in CI
/// says more than that it timed out.
pub async fn wait_for_or_show<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut condition: F,
    show: impl FnOnce() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let result = try_wait_for(what, deadline, TEST_POLL, || {
        let future = condition();
        async move { Ok(future.await) }
    })
    .await;
    result.unwrap_or_else(|e| panic!("{e:#}\n{}", show()))
}

/// Polls `check` every `poll` until it yields a value, fails, or `deadline` passes.
pub async fn try_wait_for<T, F, Fut>(what: &str, deadline: Duration, poll: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        ensure!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(poll).await;
    }
}

/// Blocking: calls `check` every `poll` until it is true, fails, or `deadline` passes.
pub fn wait_until(
    what: &str,
    deadline: Duration,
    poll: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    while !check()? {
        ensure!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(poll);
    }
    Ok(())
}
