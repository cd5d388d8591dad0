//! The machines' queries: each machine's boot decision by MAC, and the boot events racks report.

use metalrack_api::machines::{BootEvent, MachineBoot};
use sqlx::Row;

use crate::db::events::EVENTS_KEPT_MAX;
use crate::db::{query_error, Store, StoreError};
use crate::util::now_ms;

impl Store {
    pub async fn machines(&self) -> Result<Vec<MachineBoot>, StoreError> {
        let rows = sqlx::query("SELECT mac, hostname, boot_json FROM machines ORDER BY mac")
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("list machines"))?;
        rows.iter()
            .map(|row| {
                let read = query_error("read machine");
                let mac: String = row.try_get(0).map_err(read)?;
                let hostname: String = row.try_get(1).map_err(query_error("read machine"))?;
                let json: String = row.try_get(2).map_err(query_error("read machine"))?;
                let boot = serde_json::from_str(&json)
                    .map_err(|e| StoreError::Corrupt { what: format!("boot decision of {mac}: {e}") })?;
                Ok(MachineBoot { mac, hostname, boot })
            })
            .collect()
    }

    pub async fn put_machine(&self, machine: &MachineBoot) -> Result<(), StoreError> {
        let json = serde_json::to_string(&machine.boot).expect("BootAction serializes");
        sqlx::query(
            "INSERT INTO machines (mac, hostname, boot_json, updated_at_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (mac) DO UPDATE SET hostname = excluded.hostname, boot_json = excluded.boot_json, \
             updated_at_ms = excluded.updated_at_ms",
        )
        .bind(&machine.mac)
        .bind(&machine.hostname)
        .bind(json)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(query_error("put machine"))?;
        Ok(())
    }

    /// Appends a rack's boot events to the event log in one transaction, skipping any this rack
    /// sent before (by `(queue_id, seq)`; 0 and 0 are never skipped), and trims the log to
    /// [`EVENTS_KEPT_MAX`] once. Returns how many were new. `seq` must fit an i64 (checked by the
    /// caller: the wire's bound).
    pub async fn record_boot_events(
        &self,
        rack_id: &str,
        rack_name: &str,
        events: &[BootEvent],
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin record boot events"))?;
        let now = now_ms();
        let mut stored = 0;
        for event in events {
            let has_id = event.queue_id != 0 || event.seq != 0;
            let id = |value: u64| has_id.then(|| i64::try_from(value).expect("checked against the wire bound"));
            let result = sqlx::query(
                "INSERT INTO events (at_ms, kind, actor, message, rack_id, rack_queue_id, rack_seq) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (rack_id, rack_queue_id, rack_seq) DO NOTHING",
            )
            .bind(now)
            .bind(&event.kind)
            .bind(format!("{} via {rack_name}", event.mac))
            .bind(&event.message)
            .bind(has_id.then_some(rack_id))
            .bind(id(event.queue_id))
            .bind(id(event.seq))
            .execute(&mut *tx)
            .await
            .map_err(query_error("insert boot event"))?;
            stored += result.rows_affected();
        }
        sqlx::query("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - $1")
            .bind(EVENTS_KEPT_MAX)
            .execute(&mut *tx)
            .await
            .map_err(query_error("trim events"))?;
        tx.commit().await.map_err(query_error("commit boot events"))?;
        Ok(stored)
    }
}
