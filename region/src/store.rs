//! The region's database: opening and migrating it, and every query the region runs.
//!
//! Queries go through sqlx's `Any` driver with `$N` placeholders and portable SQL, so PostgreSQL
//! can be added as a second migration directory and a URL, without touching a query.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use metalrack_api::images::{SyncPolicy, SyncPolicyKind, SyncReport};
use metalrack_api::{EventView, RackHealth};
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Row};

use crate::util::{now_ms, random_hex};

/// File name of the SQLite database inside the data dir.
pub const DATABASE_FILE: &str = "region.db";

/// Connections to SQLite: one writer at a time anyway, a few readers for the UI.
const POOL_CONNECTIONS_MAX: u32 = 8;

/// Events kept; older ones are deleted as new ones arrive. About 200 bytes each: ~20 MB.
pub const EVENTS_KEPT_MAX: i64 = 100_000;

/// Sessions one user may hold at once; logging in again past it ends the oldest.
pub const SESSIONS_PER_USER_MAX: i64 = 16;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data dir {path}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open database {path}")]
    Open { path: PathBuf, source: sqlx::Error },
    #[error("cannot migrate database schema")]
    Migrate { source: sqlx::migrate::MigrateError },
    #[error("database query failed: {what}")]
    Query { what: &'static str, source: sqlx::Error },
    #[error("a user named {username:?} already exists")]
    DuplicateUsername { username: String },
    #[error("no user named {username:?}")]
    NoSuchUser { username: String },
    #[error("stored data is damaged: {what}")]
    Corrupt { what: String },
}

pub(crate) fn query_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

fn migrator() -> Migrator {
    let migrations = vec![
        Migration::new(
            1,
            Cow::Borrowed("initial"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../migrations/sqlite/0001_initial.sql")),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("images"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../migrations/sqlite/0002_images.sql")),
            false,
        ),
        Migration::new(
            3,
            Cow::Borrowed("machines"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../migrations/sqlite/0003_machines.sql")),
            false,
        ),
    ];
    Migrator { migrations: Cow::Owned(migrations), ..Migrator::DEFAULT }
}

#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) pool: AnyPool,
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub username: String,
    pub email: String,
    pub password_hash: String,
    pub is_admin: bool,
}

#[derive(Debug, Clone)]
pub struct NewUser<'a> {
    pub username: &'a str,
    pub email: &'a str,
    pub password_hash: &'a str,
    pub is_admin: bool,
    pub ssh_keys: &'a [String],
}

#[derive(Debug, Clone)]
pub struct SecretState {
    pub generation: i64,
    pub fingerprint: String,
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
}

impl Store {
    /// Opens (creating if needed) the SQLite database in `data_dir` and brings its schema up to date.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|source| StoreError::CreateDir { path: data_dir.to_owned(), source })?;
        let path = data_dir.join(DATABASE_FILE);
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = AnyPoolOptions::new()
            .max_connections(POOL_CONNECTIONS_MAX)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    // WAL lets the UI read while a CLI command (createadmin, secret set) writes.
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA busy_timeout = 5000").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await
            .map_err(|source| StoreError::Open { path: path.clone(), source })?;
        migrator().run(&pool).await.map_err(|source| StoreError::Migrate { source })?;
        Ok(Store { pool })
    }

    /// Starts a write transaction. SQLite needs `BEGIN IMMEDIATE`: a deferred transaction that
    /// reads, then writes after another connection committed, fails with SQLITE_BUSY at once
    /// instead of waiting out the busy timeout.
    pub(crate) async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        self.pool.begin_with("BEGIN IMMEDIATE").await
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    // ---- users, keys, sessions ----

    /// Creates a user with its SSH keys and a first API key, all or nothing.
    pub async fn create_user(&self, new: &NewUser<'_>) -> Result<User, StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin create user"))?;
        let exists = sqlx::query("SELECT id FROM users WHERE username = $1")
            .bind(new.username)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("look up username"))?;
        if exists.is_some() {
            return Err(StoreError::DuplicateUsername { username: new.username.to_owned() });
        }
        let id = random_hex(8);
        sqlx::query(
            "INSERT INTO users (id, username, email, password_hash, is_admin, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&id)
        .bind(new.username)
        .bind(new.email)
        .bind(new.password_hash)
        .bind(i64::from(new.is_admin))
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(query_error("insert user"))?;
        for (position, key) in new.ssh_keys.iter().enumerate() {
            sqlx::query("INSERT INTO ssh_keys (user_id, position, public_key) VALUES ($1, $2, $3)")
                .bind(&id)
                .bind(position as i64)
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(query_error("insert ssh key"))?;
        }
        insert_api_key(&mut tx, &id).await?;
        tx.commit().await.map_err(query_error("commit create user"))?;
        Ok(User {
            id,
            username: new.username.to_owned(),
            email: new.email.to_owned(),
            password_hash: new.password_hash.to_owned(),
            is_admin: new.is_admin,
        })
    }

    pub async fn user_by_username(&self, username: &str) -> Result<Option<User>, StoreError> {
        sqlx::query("SELECT id, username, email, password_hash, is_admin FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("look up user by name"))?
            .map(|row| user_from_row(&row))
            .transpose()
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>, StoreError> {
        sqlx::query("SELECT id, username, email, password_hash, is_admin FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("look up user by id"))?
            .map(|row| user_from_row(&row))
            .transpose()
    }

    pub async fn count_users(&self) -> Result<i64, StoreError> {
        sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await
            .and_then(|row| row.try_get(0))
            .map_err(query_error("count users"))
    }

    pub async fn ssh_keys(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT public_key FROM ssh_keys WHERE user_id = $1 ORDER BY position")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("list ssh keys"))?;
        rows.iter().map(|row| row.try_get(0).map_err(query_error("read ssh key"))).collect()
    }

    /// The user's API keys as `ID.SECRET`, oldest first.
    pub async fn api_keys(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT id, key_secret FROM api_keys WHERE user_id = $1 ORDER BY created_at_ms, id")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("list api keys"))?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get(0).map_err(query_error("read api key"))?;
                let secret: String = row.try_get(1).map_err(query_error("read api key"))?;
                Ok(format!("{id}.{secret}"))
            })
            .collect()
    }

    pub async fn create_api_key(&self, user_id: &str) -> Result<String, StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin create api key"))?;
        let key = insert_api_key(&mut tx, user_id).await?;
        tx.commit().await.map_err(query_error("commit create api key"))?;
        Ok(key)
    }

    /// The secret half of API key `key_id` and its owner, for a constant-time comparison by the caller.
    pub async fn api_key(&self, key_id: &str) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query("SELECT key_secret, user_id FROM api_keys WHERE id = $1")
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("look up api key"))?;
        row.map(|row| {
            Ok((
                row.try_get(0).map_err(query_error("read api key"))?,
                row.try_get(1).map_err(query_error("read api key"))?,
            ))
        })
        .transpose()
    }

    /// Stores a new session, ending the user's oldest ones beyond [`SESSIONS_PER_USER_MAX`] and any expired ones.
    pub async fn create_session(&self, token_hash: &str, user_id: &str, lifetime_ms: i64) -> Result<(), StoreError> {
        let now = now_ms();
        let mut tx = self.begin_write().await.map_err(query_error("begin create session"))?;
        sqlx::query("DELETE FROM sessions WHERE expires_at_ms <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(query_error("delete expired sessions"))?;
        sqlx::query(
            "DELETE FROM sessions WHERE user_id = $1 AND token_hash NOT IN \
             (SELECT token_hash FROM sessions WHERE user_id = $1 ORDER BY created_at_ms DESC LIMIT $2)",
        )
        .bind(user_id)
        .bind(SESSIONS_PER_USER_MAX - 1)
        .execute(&mut *tx)
        .await
        .map_err(query_error("trim sessions"))?;
        sqlx::query("INSERT INTO sessions (token_hash, user_id, created_at_ms, expires_at_ms) VALUES ($1, $2, $3, $4)")
            .bind(token_hash)
            .bind(user_id)
            .bind(now)
            .bind(now + lifetime_ms)
            .execute(&mut *tx)
            .await
            .map_err(query_error("insert session"))?;
        tx.commit().await.map_err(query_error("commit create session"))
    }

    pub async fn session_user(&self, token_hash: &str) -> Result<Option<User>, StoreError> {
        sqlx::query(
            "SELECT u.id, u.username, u.email, u.password_hash, u.is_admin FROM sessions s JOIN users u ON u.id = s.user_id \
             WHERE s.token_hash = $1 AND s.expires_at_ms > $2",
        )
        .bind(token_hash)
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await
        .map_err(query_error("look up session"))?
        .map(|row| user_from_row(&row))
        .transpose()
    }

    pub async fn delete_session(&self, token_hash: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.pool)
            .await
            .map_err(query_error("delete session"))?;
        Ok(())
    }

    // ---- settings ----

    pub async fn setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT value FROM settings WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("read setting"))?;
        row.map(|row| row.try_get(0).map_err(query_error("read setting"))).transpose()
    }

    pub async fn set_setting(&self, name: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value")
            .bind(name)
            .bind(value)
            .execute(&self.pool)
            .await
            .map_err(query_error("write setting"))?;
        Ok(())
    }

    // ---- secret generation ----

    pub async fn secret_state(&self) -> Result<Option<SecretState>, StoreError> {
        let row = sqlx::query("SELECT generation, fingerprint FROM secret_state WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(query_error("read secret state"))?;
        row.map(|row| {
            Ok(SecretState {
                generation: row.try_get(0).map_err(query_error("read secret state"))?,
                fingerprint: row.try_get(1).map_err(query_error("read secret state"))?,
            })
        })
        .transpose()
    }

    /// Records `fingerprint` as the secret in force. Returns the generation and whether it changed.
    pub async fn adopt_secret(&self, fingerprint: &str) -> Result<(i64, bool), StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin adopt secret"))?;
        let row = sqlx::query("SELECT generation, fingerprint FROM secret_state WHERE id = 1")
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("read secret state"))?;
        let result = match row {
            None => {
                sqlx::query(
                    "INSERT INTO secret_state (id, generation, fingerprint, changed_at_ms) VALUES (1, 1, $1, $2)",
                )
                .bind(fingerprint)
                .bind(now_ms())
                .execute(&mut *tx)
                .await
                .map_err(query_error("insert secret state"))?;
                (1, false)
            }
            Some(row) => {
                let generation: i64 = row.try_get(0).map_err(query_error("read secret state"))?;
                let current: String = row.try_get(1).map_err(query_error("read secret state"))?;
                if current == fingerprint {
                    (generation, false)
                } else {
                    sqlx::query(
                        "UPDATE secret_state SET generation = $1, fingerprint = $2, changed_at_ms = $3 WHERE id = 1",
                    )
                    .bind(generation + 1)
                    .bind(fingerprint)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await
                    .map_err(query_error("update secret state"))?;
                    (generation + 1, true)
                }
            }
        };
        tx.commit().await.map_err(query_error("commit adopt secret"))?;
        Ok(result)
    }

    // ---- racks ----

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

    // ---- events ----

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

    /// The newest `limit` events, newest first.
    pub async fn events(&self, limit: i64) -> Result<Vec<EventView>, StoreError> {
        let rows = sqlx::query("SELECT id, at_ms, kind, actor, message FROM events ORDER BY id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await
            .map_err(query_error("list events"))?;
        rows.iter()
            .map(|row| {
                let get = query_error("read event");
                (|| {
                    Ok(EventView {
                        id: row.try_get(0)?,
                        at_ms: row.try_get(1)?,
                        kind: row.try_get(2)?,
                        actor: row.try_get(3)?,
                        message: row.try_get(4)?,
                    })
                })()
                .map_err(get)
            })
            .collect()
    }
}

async fn insert_api_key(tx: &mut sqlx::Transaction<'_, sqlx::Any>, user_id: &str) -> Result<String, StoreError> {
    let id = random_hex(6);
    let secret = random_hex(24);
    sqlx::query("INSERT INTO api_keys (id, user_id, key_secret, created_at_ms) VALUES ($1, $2, $3, $4)")
        .bind(&id)
        .bind(user_id)
        .bind(&secret)
        .bind(now_ms())
        .execute(&mut **tx)
        .await
        .map_err(query_error("insert api key"))?;
    Ok(format!("{id}.{secret}"))
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

fn user_from_row(row: &AnyRow) -> Result<User, StoreError> {
    let read = |source| StoreError::Query { what: "read user", source };
    Ok(User {
        id: row.try_get(0).map_err(read)?,
        username: row.try_get(1).map_err(read)?,
        email: row.try_get(2).map_err(read)?,
        password_hash: row.try_get(3).map_err(read)?,
        is_admin: row.try_get::<i64, _>(4).map_err(read)? != 0,
    })
}
