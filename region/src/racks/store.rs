//! The racks' queries: registrations, heartbeats with health and sync reports, sync policies
//! and "sync now" requests.

use std::collections::{HashMap, HashSet};

use metalrack_api::images::{SyncPolicy, SyncPolicyKind, SyncReport};
use metalrack_api::RackHealth;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::heartbeats::{PendingHeartbeat, Put};
use crate::db::{query_error, Store, StoreError};
use crate::util::{now_ms, random_hex};

/// What a rack's state is decided by, besides the clock and the secret generation in force
/// (see `racks::state_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RackLiveness {
    pub secret_generation: i64,
    pub last_seen_ms: Option<i64>,
}

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
    /// The snapshot whose files `rack_snapshot_files` holds for this rack.
    pub snapshot_id: Option<String>,
    /// Raised with each change to this rack's machines' boot decisions (migration 0008).
    pub boot_generation: u64,
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
        // Registering again resets `last_seen_ms`: a heartbeat of the old registration must not
        // bring it back.
        self.heartbeats.lock().expect("heartbeat buffer lock").forget(&result.0);
        Ok(result)
    }

    pub async fn rack(&self, id: &str) -> Result<Option<RackRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {RACK_COLUMNS} FROM racks WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("look up rack"))?;
        Ok(row.map(|row| rack_from_row(&row)).transpose()?.map(|rack| self.with_pending_heartbeat(rack)))
    }

    /// Every rack's name by id: what a machine list shows beside each machine, without reading
    /// and parsing every rack's health, policy and sync report (1,000 racks' worth per page).
    pub async fn rack_names(&self) -> Result<HashMap<String, String>, StoreError> {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT id, name FROM racks")
            .fetch_all(self.pool())
            .await
            .map_err(query_error("list rack names"))?;
        Ok(rows.into_iter().collect())
    }

    /// Every rack's name by id, ordered by name: what the "add machine" form offers.
    pub async fn rack_names_by_name(&self) -> Result<Vec<(String, String)>, StoreError> {
        sqlx::query_as("SELECT id, name FROM racks ORDER BY name")
            .fetch_all(self.pool())
            .await
            .map_err(query_error("list rack names"))
    }

    /// One page of racks by name (unique, so the order is stable and `racks`' UNIQUE index
    /// serves it without sorting), each with its buffered heartbeat over the stored one and the
    /// files in its snapshot; and how many racks there are. Reads only the page's rows.
    pub async fn rack_page(&self, offset: u64, limit: u32) -> Result<(Vec<(RackRow, u64)>, u64), StoreError> {
        let rows = sqlx::query(&rack_page_query())
            .bind(i64::from(limit))
            .bind(i64::try_from(offset).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("list a page of racks"))?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM racks")
            .fetch_one(self.pool())
            .await
            .map_err(query_error("count racks"))?;
        let racks = rows
            .iter()
            .map(|row| {
                let files: i64 = row.try_get(RACK_COLUMNS_LEN).map_err(query_error("read rack snapshot count"))?;
                Ok((self.with_pending_heartbeat(rack_from_row(row)?), files.max(0) as u64))
            })
            .collect::<Result<_, StoreError>>()?;
        Ok((racks, total.max(0) as u64))
    }

    /// What decides each rack's state (id, secret generation, last seen), the buffered
    /// heartbeat's `last_seen_ms` over the stored one: for counting racks by state without
    /// reading and parsing their health, policies and sync reports.
    pub async fn rack_liveness(&self) -> Result<Vec<RackLiveness>, StoreError> {
        let rows: Vec<(String, i64, Option<i64>)> =
            sqlx::query_as("SELECT id, secret_generation, last_seen_ms FROM racks")
                .fetch_all(self.pool())
                .await
                .map_err(query_error("list racks' last heartbeats"))?;
        let buffer = self.heartbeats.lock().expect("heartbeat buffer lock");
        Ok(rows
            .into_iter()
            .map(|(id, secret_generation, stored)| {
                let last_seen_ms = buffer.get(&id).map(|h| h.seen_ms).or(stored);
                RackLiveness { secret_generation, last_seen_ms }
            })
            .collect())
    }

    /// Files in one rack's snapshot.
    pub async fn rack_snapshot_files_count(&self, rack_id: &str) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM rack_snapshot_files WHERE rack_id = $1")
            .bind(rack_id)
            .fetch_one(self.pool())
            .await
            .map_err(query_error("count the rack's snapshot files"))?;
        Ok(n.max(0) as u64)
    }

    /// Every rack, by name, with its buffered heartbeat over the stored one.
    pub async fn racks(&self) -> Result<Vec<RackRow>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {RACK_COLUMNS} FROM racks ORDER BY name"))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("list racks"))?;
        rows.iter().map(|row| Ok(self.with_pending_heartbeat(rack_from_row(row)?))).collect()
    }

    /// Writes a heartbeat at once, in its own transaction: a rack's first heartbeat after being
    /// offline (so it shows online everywhere at once), or one the full buffer cannot keep.
    pub async fn write_heartbeat(
        &self,
        id: &str,
        health: &RackHealth,
        sync: Option<&SyncReport>,
        remote_address: &str,
    ) -> Result<(), StoreError> {
        let heartbeat = PendingHeartbeat::new(now_ms(), health.clone(), sync.cloned(), remote_address.to_owned());
        update_heartbeat(self.pool(), id, &heartbeat).await?;
        // An older pending one must not overwrite it at the next flush.
        self.heartbeats.lock().expect("heartbeat buffer lock").forget(id);
        Ok(())
    }

    /// Keeps a heartbeat for the next [`Store::flush_heartbeats`]; `rack` and `racks` see it at
    /// once. Written through when the buffer is full (see [`crate::db::heartbeats::HEARTBEATS_PENDING_MAX`]).
    pub async fn buffer_heartbeat(
        &self,
        id: &str,
        health: &RackHealth,
        sync: Option<&SyncReport>,
        remote_address: &str,
    ) -> Result<(), StoreError> {
        let heartbeat = PendingHeartbeat::new(now_ms(), health.clone(), sync.cloned(), remote_address.to_owned());
        let put = self.heartbeats.lock().expect("heartbeat buffer lock").put(id, heartbeat);
        match put {
            Put::Buffered => Ok(()),
            Put::Full => self.write_heartbeat(id, health, sync, remote_address).await,
        }
    }

    /// Writes every buffered heartbeat in one transaction. Returns how many it wrote (0: no
    /// transaction was begun). On failure the heartbeats stay buffered for the next try (newer
    /// ones replacing them meanwhile).
    pub async fn flush_heartbeats(&self) -> Result<usize, StoreError> {
        let batch = self.heartbeats.lock().expect("heartbeat buffer lock").to_write();
        if batch.is_empty() {
            return Ok(0);
        }
        let mut tx = self.begin_write().await.map_err(query_error("begin heartbeat flush"))?;
        for (id, heartbeat) in &batch {
            update_heartbeat(&mut *tx, id, heartbeat).await?;
        }
        tx.commit().await.map_err(query_error("commit heartbeat flush"))?;
        self.heartbeats.lock().expect("heartbeat buffer lock").written(&batch);
        Ok(batch.len())
    }

    /// Heartbeats buffered now.
    pub fn heartbeats_pending(&self) -> usize {
        self.heartbeats.lock().expect("heartbeat buffer lock").len()
    }

    /// The rack's row with its buffered heartbeat, if any, over the stored one.
    fn with_pending_heartbeat(&self, mut rack: RackRow) -> RackRow {
        if let Some(h) = self.heartbeats.lock().expect("heartbeat buffer lock").get(&rack.id) {
            rack.last_seen_ms = Some(h.seen_ms);
            rack.health = Some(h.health.clone());
            rack.remote_address = Some(h.remote_address.clone());
            if h.sync.is_some() {
                rack.sync_report = h.sync.clone();
            }
        }
        rack
    }

    /// How many racks are in each state, by the rule of `racks::rack_state` in SQL: one grouped
    /// query, cheap enough for every metrics scrape. States with no rack are absent. Reads the
    /// stored rows only, so `last_seen_ms` may lag by one heartbeat flush interval: the config
    /// check keeps `offline_after_ms` longer than the heartbeat interval plus that (a rack's
    /// first heartbeat after being offline is written at once).
    pub async fn rack_state_counts(
        &self,
        generation: i64,
        now_ms: i64,
        offline_after_ms: u64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT CASE WHEN secret_generation <> $1 THEN 'needs_reregistration' \
             WHEN last_seen_ms IS NOT NULL AND last_seen_ms > $2 THEN 'online' ELSE 'offline' END AS rack_state, \
             COUNT(*) FROM racks GROUP BY rack_state",
        )
        .bind(generation)
        .bind(now_ms - offline_after_ms as i64)
        .fetch_all(self.pool())
        .await
        .map_err(query_error("count racks by state"))?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(query_error("read rack counts"))
    }

    pub async fn set_sync_policy(&self, rack_id: &str, policy: &SyncPolicy) -> Result<bool, StoreError> {
        let query = sqlx::query(
            "UPDATE racks SET sync_policy = $1, sync_delay_ms = $2, sync_window_start = $3, sync_window_end = $4, \
             sync_bandwidth_bytes_per_s = $5 WHERE id = $6",
        )
        .bind(policy_name(policy.policy))
        .bind(policy.delay_ms as i64)
        .bind(&policy.window_start)
        .bind(&policy.window_end)
        .bind(policy.bandwidth_bytes_per_s as i64)
        .bind(rack_id);
        let updated = self.write_one(query).await.map_err(query_error("set sync policy"))?.rows_affected();
        Ok(updated > 0)
    }

    /// "Sync now" for one rack or (with `None`) all. Returns how many racks were asked.
    pub async fn request_sync(&self, rack_id: Option<&str>) -> Result<u64, StoreError> {
        let query = match rack_id {
            Some(id) => sqlx::query("UPDATE racks SET sync_requested = sync_requested + 1 WHERE id = $1").bind(id),
            None => sqlx::query("UPDATE racks SET sync_requested = sync_requested + 1"),
        };
        let result = self.write_one(query).await;
        Ok(result.map_err(query_error("request sync"))?.rows_affected())
    }

    /// Replaces what the rack's snapshot holds.
    pub async fn put_rack_snapshot(
        &self,
        rack_id: &str,
        snapshot_id: &str,
        file_hashes: &[String],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin put rack snapshot"))?;
        sqlx::query("DELETE FROM rack_snapshot_files WHERE rack_id = $1")
            .bind(rack_id)
            .execute(&mut *tx)
            .await
            .map_err(query_error("clear rack snapshot"))?;
        for hash in file_hashes {
            sqlx::query("INSERT INTO rack_snapshot_files (rack_id, file_hash) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(rack_id)
                .bind(hash)
                .execute(&mut *tx)
                .await
                .map_err(query_error("insert rack snapshot file"))?;
        }
        sqlx::query("UPDATE racks SET snapshot_id = $1 WHERE id = $2")
            .bind(snapshot_id)
            .bind(rack_id)
            .execute(&mut *tx)
            .await
            .map_err(query_error("set rack snapshot id"))?;
        tx.commit().await.map_err(query_error("commit put rack snapshot"))
    }

    /// For each rack, which of the catalogue's files its snapshot holds (only those: a rack's
    /// snapshot may still hold files of deleted versions).
    pub async fn rack_catalogue_files(&self) -> Result<HashMap<String, HashSet<String>>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT s.rack_id, s.file_hash FROM rack_snapshot_files s \
             JOIN image_files f ON f.file_hash = s.file_hash",
        )
        .fetch_all(self.pool())
        .await
        .map_err(query_error("list rack snapshot files"))?;
        let mut held: HashMap<String, HashSet<String>> = HashMap::new();
        for row in &rows {
            let read = query_error("read rack snapshot file");
            let id: String = row.try_get(0).map_err(read)?;
            let hash: String = row.try_get(1).map_err(query_error("read rack snapshot file"))?;
            held.entry(id).or_default().insert(hash);
        }
        Ok(held)
    }
}

/// Stores one heartbeat in the rack's row (a sync report of `None` keeps the stored one). Never
/// moves `last_seen_ms` back: a flush that retried an old batch after a newer heartbeat was
/// written through leaves the newer one.
async fn update_heartbeat<'e, E: sqlx::Executor<'e, Database = sqlx::Any>>(
    executor: E,
    id: &str,
    heartbeat: &PendingHeartbeat,
) -> Result<(), StoreError> {
    let health_json = serde_json::to_string(&heartbeat.health).expect("RackHealth serializes");
    let sync_json = heartbeat.sync.as_ref().map(|s| serde_json::to_string(s).expect("SyncReport serializes"));
    sqlx::query(
        "UPDATE racks SET last_seen_ms = $1, health_json = $2, remote_address = $3, \
         sync_report_json = COALESCE($4, sync_report_json) \
         WHERE id = $5 AND (last_seen_ms IS NULL OR last_seen_ms <= $1)",
    )
    .bind(heartbeat.seen_ms)
    .bind(health_json)
    .bind(&heartbeat.remote_address)
    .bind(sync_json)
    .bind(id)
    .execute(executor)
    .await
    .map_err(query_error("record heartbeat"))?;
    Ok(())
}

fn policy_name(kind: SyncPolicyKind) -> &'static str {
    match kind {
        SyncPolicyKind::Auto => "auto",
        SyncPolicyKind::Window => "window",
        SyncPolicyKind::Manual => "manual",
    }
}

/// [`Store::rack_page`]'s query: `$1` the limit, `$2` the offset.
fn rack_page_query() -> String {
    format!(
        "SELECT {RACK_COLUMNS}, \
         (SELECT COUNT(*) FROM rack_snapshot_files f WHERE f.rack_id = racks.id) AS snapshot_files \
         FROM racks ORDER BY name LIMIT $1 OFFSET $2"
    )
}

/// The columns [`rack_from_row`] reads, in its order.
const RACK_COLUMNS: &str = "id, name, credential_hash, secret_generation, registered_at_ms, last_seen_ms, \
     health_json, remote_address, sync_policy, sync_delay_ms, sync_window_start, sync_window_end, \
     sync_bandwidth_bytes_per_s, sync_requested, sync_report_json, snapshot_id, boot_generation";

/// How many columns [`RACK_COLUMNS`] names: a query's own columns come after them.
const RACK_COLUMNS_LEN: usize = count_columns(RACK_COLUMNS);

const fn count_columns(list: &str) -> usize {
    let bytes = list.as_bytes();
    let (mut i, mut n) = (0, 1);
    while i < bytes.len() {
        if bytes[i] == b',' {
            n += 1;
        }
        i += 1;
    }
    n
}

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
        snapshot_id: row.try_get(15).map_err(read)?,
        boot_generation: row.try_get::<i64, _>(16).map_err(read)?.max(0) as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(version: &str) -> RackHealth {
        RackHealth { version: version.into(), ..RackHealth::default() }
    }

    /// A page holds only its racks, by name, with the total; a rack whose latest heartbeat is
    /// still buffered shows it (last seen, health), as `rack` and `racks` do; each rack's
    /// snapshot files are counted; the liveness rows read through the buffer too.
    #[tokio::test]
    async fn a_rack_page_is_its_racks_by_name_with_their_buffered_heartbeats_and_snapshot_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let mut ids = HashMap::new();
        for name in ["rack-e", "rack-a", "rack-d", "rack-b", "rack-c"] {
            ids.insert(name, store.register_rack(name, "hash", 1).await.unwrap().0);
        }
        store.write_heartbeat(&ids["rack-c"], &health("stored"), None, "10.0.0.3").await.unwrap();
        store.buffer_heartbeat(&ids["rack-c"], &health("buffered"), None, "10.0.0.33").await.unwrap();
        store.buffer_heartbeat(&ids["rack-e"], &health("buffered"), None, "10.0.0.5").await.unwrap();
        let hash = "ab".repeat(32);
        store.put_rack_snapshot(&ids["rack-d"], "snap1", &[hash.clone(), "cd".repeat(32)]).await.unwrap();
        assert_eq!(store.heartbeats_pending(), 2);

        let (page, total) = store.rack_page(2, 2).await.unwrap();
        assert_eq!(total, 5);
        let names: Vec<&str> = page.iter().map(|(r, _)| r.name.as_str()).collect();
        assert_eq!(names, ["rack-c", "rack-d"]);
        let (c, c_files) = &page[0];
        assert_eq!(c.health.as_ref().map(|h| h.version.as_str()), Some("buffered"), "the buffered heartbeat wins");
        assert_eq!(c.remote_address.as_deref(), Some("10.0.0.33"));
        assert!(c.last_seen_ms.is_some());
        assert_eq!((*c_files, page[1].1), (0, 2), "snapshot files counted per rack");
        assert_eq!(page[1].0.last_seen_ms, None, "rack-d never heartbeated");

        let (last, _) = store.rack_page(4, 100).await.unwrap();
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].0.health.as_ref().map(|h| h.version.as_str()), Some("buffered"), "rack-e: buffer only");
        let (beyond, total) = store.rack_page(5, 100).await.unwrap();
        assert!(beyond.is_empty());
        assert_eq!(total, 5, "the total on a page past the end too");

        let seen = store.rack_liveness().await.unwrap().iter().filter(|r| r.last_seen_ms.is_some()).count();
        assert_eq!(seen, 2, "rack-c stored and buffered, rack-e buffered only");

        let names = store.rack_names_by_name().await.unwrap();
        let names: Vec<&str> = names.iter().map(|(_, name)| name.as_str()).collect();
        assert_eq!(names, ["rack-a", "rack-b", "rack-c", "rack-d", "rack-e"]);
    }

    /// The page query walks `racks`' UNIQUE index on name: no sort of every rack per page, so
    /// no index migration is needed for the rack list (unlike machines' 0007).
    #[tokio::test]
    async fn the_rack_page_query_reads_the_name_index_without_sorting() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {}", rack_page_query()))
            .bind(100_i64)
            .bind(0_i64)
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get::<String, _>(3).unwrap())
            .collect();
        assert!(plan.iter().any(|step| step.contains("USING INDEX")), "{plan:?}");
        assert!(!plan.iter().any(|step| step.contains("TEMP B-TREE")), "{plan:?}");
    }
}
