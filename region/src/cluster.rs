//! The cluster's own settings: its name (shown in the header and to racks) and whether the
//! first-login welcome page was seen.

use crate::db::StoreError;
use crate::state::{Shared, CLUSTER_NAME_SETTING};

/// Longest cluster name.
pub const CLUSTER_NAME_LEN_MAX: usize = 64;

/// Setting that records the welcome page was seen (saved or skipped).
const WELCOME_DONE_SETTING: &str = "welcome_done";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("A cluster name has 1 to {CLUSTER_NAME_LEN_MAX} printable characters.")]
    InvalidName,
    #[error("cannot {step}")]
    Store { step: &'static str, source: StoreError },
}

fn store_error(step: &'static str) -> impl FnOnce(StoreError) -> ClusterError {
    move |source| ClusterError::Store { step, source }
}

/// Renames the cluster (surrounding space trimmed).
pub async fn rename(shared: &Shared, actor: &str, name: &str) -> Result<(), ClusterError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > CLUSTER_NAME_LEN_MAX || name.chars().any(char::is_control) {
        return Err(ClusterError::InvalidName);
    }
    shared.store.set_setting(CLUSTER_NAME_SETTING, name).await.map_err(store_error("store the cluster name"))?;
    shared
        .store
        .record_event("cluster.renamed", actor, &format!("cluster named {name:?}"))
        .await
        .map_err(store_error("record the new name"))
}

pub async fn welcome_done(shared: &Shared) -> Result<bool, ClusterError> {
    Ok(shared.store.setting(WELCOME_DONE_SETTING).await.map_err(store_error("read the welcome setting"))?.is_some())
}

pub async fn mark_welcome_done(shared: &Shared) -> Result<(), ClusterError> {
    shared.store.set_setting(WELCOME_DONE_SETTING, "1").await.map_err(store_error("store the welcome setting"))
}
