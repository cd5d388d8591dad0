//! The racks' queries: registrations, heartbeats with health and sync reports, sync policies
//! and "sync now" requests.

use metalrack_api::images::{SyncPolicy, SyncPolicyKind, SyncReport};
use metalrack_api::RackHealth;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{query_error, Store, StoreError};
use crate::util::{now_ms, random_hex};

#[derive(Debug, Clone)]
pub struct RackRow {
    pub id: String,
    pub name: String,
    pub credential_hash: String,
    pub secret_generation: i64,
    pub registered_at_ms: i64,
    pub last_seen_ms: Option<i64>,
    pub health: Option<RackHealth>,
    pub remote_address: Option<String>,
    pub sync_policy: SyncPolicy,
    pub sync_requested: i64,
    pub sync_report: Option<SyncReport>,
}

impl Store {
    /// Registers a rack under `name`, replacing an earlier registration of that name (same id,
    /// new credential). Returns the rack id and whether it replaced one.
    pub async fn register_rack(
        &self,
        name: &str,
        credential_hash: &str,
        generation: i64,
    ) -> Result<(String, bool), StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin register rack"))?;
        let existing = sqlx::query("SELECT id FROM racks WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("look up rack"))?;
        let now = now_ms();
        let result = match existing {
            Some(row) => {
                let id: String = row.try_get(0).map_err(query_error("read rack id"))?;
                sqlx::query(
                    "UPDATE racks SET credential_hash = $1, secret_generation = $2, registered_at_ms = $3, last_seen_ms = NULL WHERE id = $4",
                )
                .bind(credential_hash)
                .bind(generation)
                .bind(now)
                .bind(&id)
                .execute(&mut *tx)
                .await
                .map_err(query_error("update rack"))?;
                (id, true)
            }
            None => {
                let id = random_hex(8);
                sqlx::query(
                    "INSERT INTO racks (id, name, credential_hash, secret_generation, registered_at_ms) VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&id)
                .bind(name)
                .bind(credential_hash)
                .bind(generation)
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(query_error("insert rack"))?;
                (id, false)
            }
        };
        tx.commit().await.map_err(query_error("commit register rack"))?;
        Ok(result)
    }

    pub async fn rack(&self, id: &str) -> Result<Option<RackRow>, StoreError> {
        let row = sqlx::query(&format!("{RACK_COLUMNS} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("look up rack"))?;
        row.map(|row| rack_from_row(&row)).transpose()
    }

    pub async fn racks(&self) -> Result<Vec<RackRow>, StoreError> {
        let rows = sqlx::query(&format!("{RACK_COLUMNS} ORDER BY name"))
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("list racks"))?;
        rows.iter().map(rack_from_row).collect()
    }

    pub async fn record_heartbeat(
        &self,
        id: &str,
        health: &RackHealth,
        sync: Option<&SyncReport>,
        remote_address: &str,
    ) -> Result<(), StoreError> {
        let health_json = serde_json::to_string(health).expect("RackHealth serializes");
        let sync_json = sync.map(|s| serde_json::to_string(s).expect("SyncReport serializes"));
        sqlx::query(
            "UPDATE racks SET last_seen_ms = $1, health_json = $2, remote_address = $3, \
             sync_report_json = COALESCE($4, sync_report_json) WHERE id = $5",
        )
        .bind(now_ms())
        .bind(health_json)
        .bind(remote_address)
        .bind(sync_json)
        .bind(id)
        .execute(&self.pool)
        .await
        .map_err(query_error("record heartbeat"))?;
        Ok(())
    }

    pub async fn set_sync_policy(&self, rack_id: &str, policy: &SyncPolicy) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE racks SET sync_policy = $1, sync_delay_ms = $2, sync_window_start = $3, sync_window_end = $4, \
             sync_bandwidth_bytes_per_s = $5 WHERE id = $6",
        )
        .bind(policy_name(policy.policy))
        .bind(policy.delay_ms as i64)
        .bind(&policy.window_start)
        .bind(&policy.window_end)
        .bind(policy.bandwidth_bytes_per_s as i64)
        .bind(rack_id)
        .execute(&self.pool)
        .await
        .map_err(query_error("set sync policy"))?
        .rows_affected();
        Ok(updated > 0)
    }

    /// "Sync now" for one rack or (with `None`) all. Returns how many racks were asked.
    pub async fn request_sync(&self, rack_id: Option<&str>) -> Result<u64, StoreError> {
        let result = match rack_id {
            Some(id) => {
                sqlx::query("UPDATE racks SET sync_requested = sync_requested + 1 WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool)
                    .await
            }
            None => sqlx::query("UPDATE racks SET sync_requested = sync_requested + 1").execute(&self.pool).await,
        };
        Ok(result.map_err(query_error("request sync"))?.rows_affected())
    }
}

fn policy_name(kind: SyncPolicyKind) -> &'static str {
    match kind {
        SyncPolicyKind::Auto => "auto",
        SyncPolicyKind::Window => "window",
        SyncPolicyKind::Manual => "manual",
    }
}

const RACK_COLUMNS: &str = "SELECT id, name, credential_hash, secret_generation, registered_at_ms, last_seen_ms, \
     health_json, remote_address, sync_policy, sync_delay_ms, sync_window_start, sync_window_end, \
     sync_bandwidth_bytes_per_s, sync_requested, sync_report_json FROM racks";

fn json_column<T: serde::de::DeserializeOwned>(
    row: &AnyRow,
    index: usize,
    what: &str,
) -> Result<Option<T>, StoreError> {
    let json: Option<String> = row.try_get(index).map_err(|source| StoreError::Query { what: "read rack", source })?;
    json.map(|json| serde_json::from_str(&json).map_err(|e| StoreError::Corrupt { what: format!("{what}: {e}") }))
        .transpose()
}

fn rack_from_row(row: &AnyRow) -> Result<RackRow, StoreError> {
    let read = |source| StoreError::Query { what: "read rack", source };
    let policy: String = row.try_get(8).map_err(read)?;
    let policy = match policy.as_str() {
        "auto" => SyncPolicyKind::Auto,
        "window" => SyncPolicyKind::Window,
        "manual" => SyncPolicyKind::Manual,
        other => return Err(StoreError::Corrupt { what: format!("rack sync policy {other:?}") }),
    };
    Ok(RackRow {
        id: row.try_get(0).map_err(read)?,
        name: row.try_get(1).map_err(read)?,
        credential_hash: row.try_get(2).map_err(read)?,
        secret_generation: row.try_get(3).map_err(read)?,
        registered_at_ms: row.try_get(4).map_err(read)?,
        last_seen_ms: row.try_get(5).map_err(read)?,
        health: json_column(row, 6, "rack health")?,
        remote_address: row.try_get(7).map_err(read)?,
        sync_policy: SyncPolicy {
            policy,
            delay_ms: row.try_get::<i64, _>(9).map_err(read)?.max(0) as u64,
            window_start: row.try_get(10).map_err(read)?,
            window_end: row.try_get(11).map_err(read)?,
            bandwidth_bytes_per_s: row.try_get::<i64, _>(12).map_err(read)?.max(0) as u64,
        },
        sync_requested: row.try_get(13).map_err(read)?,
        sync_report: json_column(row, 14, "rack sync report")?,
    })
}
