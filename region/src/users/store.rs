//! The users' queries: users with their SSH keys, API keys, and UI sessions.

use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{query_error, Store, StoreError};
use crate::util::{now_ms, random_hex};

/// Sessions one user may hold at once; logging in again past it ends the oldest.
pub const SESSIONS_PER_USER_MAX: i64 = 16;

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

/// What creating a user did: a taken name is an answer, not a database failure.
#[derive(Debug)]
pub enum CreateUserOutcome {
    Created(User),
    DuplicateUsername,
}

impl Store {
    /// Creates a user with its SSH keys and a first API key, all or nothing.
    pub async fn create_user(&self, new: &NewUser<'_>) -> Result<CreateUserOutcome, StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin create user"))?;
        let exists = sqlx::query("SELECT id FROM users WHERE username = $1")
            .bind(new.username)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("look up username"))?;
        if exists.is_some() {
            return Ok(CreateUserOutcome::DuplicateUsername);
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
        Ok(CreateUserOutcome::Created(User {
            id,
            username: new.username.to_owned(),
            email: new.email.to_owned(),
            password_hash: new.password_hash.to_owned(),
            is_admin: new.is_admin,
        }))
    }

    pub async fn user_by_username(&self, username: &str) -> Result<Option<User>, StoreError> {
        sqlx::query("SELECT id, username, email, password_hash, is_admin FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("look up user by name"))?
            .map(|row| user_from_row(&row))
            .transpose()
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<User>, StoreError> {
        sqlx::query("SELECT id, username, email, password_hash, is_admin FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .map_err(query_error("look up user by id"))?
            .map(|row| user_from_row(&row))
            .transpose()
    }

    pub async fn count_users(&self) -> Result<i64, StoreError> {
        sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(self.pool())
            .await
            .and_then(|row| row.try_get(0))
            .map_err(query_error("count users"))
    }

    pub async fn ssh_keys(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT public_key FROM ssh_keys WHERE user_id = $1 ORDER BY position")
            .bind(user_id)
            .fetch_all(self.pool())
            .await
            .map_err(query_error("list ssh keys"))?;
        rows.iter().map(|row| row.try_get(0).map_err(query_error("read ssh key"))).collect()
    }

    /// The user's API keys as `ID.SECRET`, oldest first.
    pub async fn api_keys(&self, user_id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT id, key_secret FROM api_keys WHERE user_id = $1 ORDER BY created_at_ms, id")
            .bind(user_id)
            .fetch_all(self.pool())
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
            .fetch_optional(self.pool())
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
        .fetch_optional(self.pool())
        .await
        .map_err(query_error("look up session"))?
        .map(|row| user_from_row(&row))
        .transpose()
    }

    pub async fn delete_session(&self, token_hash: &str) -> Result<(), StoreError> {
        self.write_one(sqlx::query("DELETE FROM sessions WHERE token_hash = $1").bind(token_hash))
            .await
            .map_err(query_error("delete session"))?;
        Ok(())
    }
}

async fn insert_api_key(tx: &mut sqlx::AnyConnection, user_id: &str) -> Result<String, StoreError> {
    let id = random_hex(6);
    let secret = random_hex(24);
    sqlx::query("INSERT INTO api_keys (id, user_id, key_secret, created_at_ms) VALUES ($1, $2, $3, $4)")
        .bind(&id)
        .bind(user_id)
        .bind(&secret)
        .bind(now_ms())
        .execute(&mut *tx)
        .await
        .map_err(query_error("insert api key"))?;
    Ok(format!("{id}.{secret}"))
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
