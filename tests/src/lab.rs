//! Running async code inside a lab's network namespace (the hardware crate's [`Lab`]): a tokio
//! runtime on a thread that joined the namespace, so every socket it opens (and every process it
//! starts without naming another namespace) is the lab's.

use std::future::Future;

use anyhow::{Context, Result};
use metalrack_hardware::{Lab, Namespace};

/// Runs `make()` to completion on a thread inside `lab`, on a current-thread runtime, or on
/// `worker_threads` workers (spawned from that thread, so they are inside too).
pub fn block_on_in<T, F, Fut>(lab: &Lab, worker_threads: Option<usize>, make: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    block_on_in_namespace(lab.namespace(), worker_threads, make)
}

/// [`block_on_in`] for any namespace (a site's region namespace has no bridge).
pub fn block_on_in_namespace<T, F, Fut>(lab: &Namespace, worker_threads: Option<usize>, make: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    lab.in_namespace(move || -> Result<T> {
        let mut builder = match worker_threads {
            Some(n) => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(n);
                builder
            }
            None => tokio::runtime::Builder::new_current_thread(),
        };
        let runtime = builder.enable_all().build().context("cannot start a tokio runtime")?;
        Ok(runtime.block_on(make()))
    })
    .with_context(|| format!("cannot run inside network namespace {}", lab.name()))?
}
