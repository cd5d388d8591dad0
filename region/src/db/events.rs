//! The event log: what happened, who or what did it, kept up to [`EVENTS_KEPT_MAX`] rows.

use metalrack_api::EventView;
use sqlx::Row;

use super::{query_error, Store, StoreError};
use crate::util::now_ms;

/// Events kept; older ones are deleted as new ones arrive. About 200 bytes each: ~20 MB.
pub const EVENTS_KEPT_MAX: i64 = 100_000;

impl Store {
    /// Appends an event and drops the oldest beyond [`EVENTS_KEPT_MAX`].
    pub async fn record_event(&self, kind: &str, actor: &str, message: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin record event"))?;
        sqlx::query("INSERT INTO events (at_ms, kind, actor, message) VALUES ($1, $2, $3, $4)")
            .bind(now_ms())
            .bind(kind)
            .bind(actor)
            .bind(message)
            .execute(&mut *tx)
            .await
            .map_err(query_error("insert event"))?;
        sqlx::query("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - $1")
            .bind(EVENTS_KEPT_MAX)
            .execute(&mut *tx)
            .await
            .map_err(query_error("trim events"))?;
        tx.commit().await.map_err(query_error("commit record event"))
    }

    /// Events deleted to keep the log bounded, since the database began: ids only grow and the
    /// oldest go first, so it is the ids below the oldest kept (one index lookup).
    pub async fn events_trimmed(&self) -> Result<i64, StoreError> {
        let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(id) FROM events")
            .fetch_one(self.pool())
            .await
            .map_err(query_error("find the oldest event"))?;
        Ok(oldest.map_or(0, |id| id - 1))
    }

    /// The newest `limit` events, newest first.
    pub async fn events(&self, limit: i64) -> Result<Vec<EventView>, StoreError> {
        let rows = sqlx::query("SELECT id, at_ms, kind, actor, message FROM events ORDER BY id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("list events"))?;
        rows.iter().map(read_event).collect()
    }
}

/// An event from a row of `SELECT id, at_ms, kind, actor, message FROM events ...`.
pub fn read_event(row: &sqlx::any::AnyRow) -> Result<EventView, StoreError> {
    (|| {
        Ok(EventView {
            id: row.try_get(0)?,
            at_ms: row.try_get(1)?,
            kind: row.try_get(2)?,
            actor: row.try_get(3)?,
            message: row.try_get(4)?,
        })
    })()
    .map_err(query_error("read event"))
}
