//! The cluster's own settings: its name (shown in the header and to racks) and whether the
//! first-login welcome page was seen.

use crate::db::StoreError;
use crate::state::{Shared, CLUSTER_NAME_SETTING};
use crate::users::User;

/// Longest cluster name.
pub const CLUSTER_NAME_LEN_MAX: usize = 64;

/// Setting that records the welcome page was seen (saved or skipped).
const WELCOME_DONE_SETTING: &str = "welcome_done";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("A cluster name has 1 to {CLUSTER_NAME_LEN_MAX} printable characters.")]
    InvalidName,
    #[error("Only administrators may rename the cluster.")]
    NotAdmin,
    #[error("cannot {step}")]
    Store { step: &'static str, source: StoreError },
}

fn store_error(step: &'static str) -> impl FnOnce(StoreError) -> ClusterError {
    move |source| ClusterError::Store { step, source }
}

/// Renames the cluster (surrounding space trimmed).
pub async fn rename(shared: &Shared, actor: &User, name: &str) -> Result<(), ClusterError> {
    if !actor.is_admin {
        return Err(ClusterError::NotAdmin);
    }
    let name = name.trim();
    if name.is_empty() || name.chars().count() > CLUSTER_NAME_LEN_MAX || name.chars().any(char::is_control) {
        return Err(ClusterError::InvalidName);
    }
    shared.store.set_setting(CLUSTER_NAME_SETTING, name).await.map_err(store_error("store the cluster name"))?;
    shared
        .store
        .record_event("cluster.renamed", &actor.username, &format!("cluster named {name:?}"))
        .await
        .map_err(store_error("record the new name"))
}

pub async fn welcome_done(shared: &Shared) -> Result<bool, ClusterError> {
    Ok(shared.store.setting(WELCOME_DONE_SETTING).await.map_err(store_error("read the welcome setting"))?.is_some())
}

pub async fn mark_welcome_done(shared: &Shared) -> Result<(), ClusterError> {
    shared.store.set_setting(WELCOME_DONE_SETTING, "1").await.map_err(store_error("store the welcome setting"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RegionConfig;
    use crate::db::Store;

    fn user(is_admin: bool) -> User {
        User {
            id: "u1".into(),
            username: "op".into(),
            email: "op@example.com".into(),
            password_hash: String::new(),
            is_admin,
        }
    }

    #[tokio::test]
    async fn only_administrators_rename_the_cluster_and_names_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let shared = Shared::new(store, RegionConfig::default(), dir.path().to_owned());
        assert!(matches!(rename(&shared, &user(false), "mine").await, Err(ClusterError::NotAdmin)));
        assert_eq!(shared.cluster_name().await.unwrap(), crate::state::CLUSTER_NAME_DEFAULT);
        assert!(matches!(rename(&shared, &user(true), "  ").await, Err(ClusterError::InvalidName)));
        let too_long = "x".repeat(CLUSTER_NAME_LEN_MAX + 1);
        assert!(matches!(rename(&shared, &user(true), &too_long).await, Err(ClusterError::InvalidName)));
        rename(&shared, &user(true), " lab one ").await.unwrap();
        assert_eq!(shared.cluster_name().await.unwrap(), "lab one");
    }
}
