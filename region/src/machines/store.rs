//! The machines' queries: each machine's boot decision by MAC.

use metalrack_api::machines::MachineBoot;
use sqlx::Row;

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
}
