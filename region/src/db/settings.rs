//! Named settings (the cluster's name, whether the welcome page was seen): one text value each.

use sqlx::Row;

use super::{query_error, Store, StoreError};

impl Store {
    pub async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("read setting"))?;
        row.map(|row| row.try_get(0).map_err(query_error("read setting"))).transpose()
    }

    pub async fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        self.write_one(
            sqlx::query(
                "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            )
            .bind(name)
            .bind(value),
        )
        .await
            .map_err(query_error("write setting"))?;
        Ok(())
    }
}
