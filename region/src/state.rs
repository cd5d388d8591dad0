//! What every domain shares: the database, the config, the data dir, and the change feed that
//! racks' catalogue long-polls wait on.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::RegionConfig;
use crate::db::{Store, StoreError};

/// Name of the setting holding the cluster's name, and its value until someone sets it.
pub const CLUSTER_NAME_SETTING: &str = "cluster_name";
pub const CLUSTER_NAME_DEFAULT: &str = "metalrack";

/// Cheap to clone: every field is shared.
#[derive(Clone, Debug)]
pub struct Shared {
    pub store: Store,
    pub config: Arc<RegionConfig>,
    data_dir: Arc<PathBuf>,
    /// Bumped on every change racks must hear about (catalogue, machines, sync requests,
    /// policies).
    changes: Arc<watch::Sender<u64>>,
    /// Set when the region begins to shut down: long-polls answer at once so shutdown need not
    /// wait for them.
    closing: Arc<AtomicBool>,
}

impl Shared {
    pub fn new(store: Store, config: RegionConfig, data_dir: PathBuf) -> Shared {
        Shared {
            store,
            config: Arc::new(config),
            data_dir: Arc::new(data_dir),
            changes: Arc::new(watch::channel(0).0),
            closing: Arc::default(),
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Wakes every rack's catalogue long-poll.
    pub fn notify_change(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that sees every [`Shared::notify_change`] after this call.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Tells long-polls to answer now: the region is stopping.
    pub fn begin_closing(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.notify_change();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Records an event; a failure to record it is logged, not returned, for the callers whose
    /// own work already succeeded and must not be reported as failed because of the log.
    pub async fn record_event_or_log(&self, kind: &str, actor: &str, message: &str) {
        if let Err(e) = self.store.record_event(kind, actor, message).await {
            tracing::error!(error = %metalrack_image_tools::error_chain(&e), kind, "cannot record event");
        }
    }

    pub async fn cluster_name(&self) -> Result<String, StoreError> {
        Ok(self.store.setting(CLUSTER_NAME_SETTING).await?.unwrap_or_else(|| CLUSTER_NAME_DEFAULT.into()))
    }
}
