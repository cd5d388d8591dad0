//! The region's shared secret: the `DATA_DIR/secret` file (mode 0600) and the generation counter
//! in the database that tells racks registered under an older secret to register again (its SQL
//! is at the end of this file).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use metalrack_api::{Secret, SecretError};
use rand::RngCore;

use sqlx::Row;

use crate::db::{query_error, Store, StoreError};
use crate::util::{now_ms, sha256_hex, write_private_file};

/// File name of the secret inside the data dir.
pub const SECRET_FILE: &str = "secret";

#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("cannot read secret file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("secret file {path} is not a valid secret")]
    Invalid { path: PathBuf, source: SecretError },
    #[error("cannot write secret file {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot record the secret in the database")]
    Store { source: StoreError },
}

pub fn secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SECRET_FILE)
}

pub fn generate() -> Secret {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    Secret::from_bytes(bytes)
}

/// Reads the secret file, or creates it with a fresh random secret when it does not exist.
/// A file an operator recreated by hand with a looser mode is tightened back to 0600.
pub fn load_or_create(data_dir: &Path) -> Result<Secret, SecretFileError> {
    let path = secret_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let secret =
                Secret::parse(&text).map_err(|source| SecretFileError::Invalid { path: path.clone(), source })?;
            if let Ok(meta) = std::fs::metadata(&path) {
                if meta.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "secret file was readable by others; setting mode 0600");
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                        .map_err(|source| SecretFileError::Write { path: path.clone(), source })?;
                }
            }
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret = generate();
            write(data_dir, &secret)?;
            tracing::info!(path = %path.display(), "created a new shared secret");
            Ok(secret)
        }
        Err(source) => Err(SecretFileError::Read { path, source }),
    }
}

pub fn write(data_dir: &Path, secret: &Secret) -> Result<(), SecretFileError> {
    let path = secret_path(data_dir);
    std::fs::create_dir_all(data_dir).map_err(|source| SecretFileError::Write { path: path.clone(), source })?;
    let text = format!("{}\n", secret.expose());
    write_private_file(&path, text.as_bytes()).map_err(|source| SecretFileError::Write { path, source })
}

/// A one-way fingerprint of the secret, stored in the database to notice a changed file.
pub fn fingerprint(secret: &Secret) -> String {
    sha256_hex(format!("metalrack secret fingerprint v1\n{}", secret.expose()).as_bytes())
}

/// Loads the secret file and makes it the one in force: when it differs from the last one seen,
/// the generation goes up (every rack must register again) and an event records it.
/// Returns the secret and its generation.
pub async fn reconcile(data_dir: &Path, store: &Store, actor: &str) -> Result<(Secret, i64), SecretFileError> {
    let secret = load_or_create(data_dir)?;
    let (generation, changed) =
        store.adopt_secret(&fingerprint(&secret)).await.map_err(|source| SecretFileError::Store { source })?;
    if changed {
        tracing::warn!(generation, "the shared secret changed; racks registered under the old one must register again");
        store
            .record_event(
                "secret.changed",
                actor,
                &format!("shared secret changed (generation {generation}); racks must register again"),
            )
            .await
            .map_err(|source| SecretFileError::Store { source })?;
    }
    Ok((secret, generation))
}

/// The secret for an administrator to read (the UI's "Add rack controller" shows it in the
/// register command); each showing is an event.
pub async fn show(shared: &crate::state::Shared, actor: &str) -> Result<Secret, SecretFileError> {
    let (secret, _) = reconcile(shared.data_dir(), &shared.store, actor).await?;
    let message = format!("{actor} opened 'Add rack controller' (shows the secret)");
    shared
        .store
        .record_event("secret.shown", actor, &message)
        .await
        .map_err(|source| SecretFileError::Store { source })?;
    Ok(secret)
}

/// The secret generation in force (0 before the region's first start). A rack credential is
/// valid only under the generation it was issued in.
pub async fn current_generation(store: &Store) -> Result<i64, StoreError> {
    Ok(store.secret_state().await?.map(|s| s.generation).unwrap_or(0))
}

// ---- the secret generation in the database ----

#[derive(Debug, Clone)]
pub struct SecretState {
    pub generation: i64,
    pub fingerprint: String,
}

impl Store {
    pub async fn secret_state(&self) -> Result<Option<SecretState>, StoreError> {
        let row = sqlx::query("SELECT generation, fingerprint FROM secret_state WHERE id = 1")
            .fetch_optional(self.pool())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_secret_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let second = load_or_create(dir.path()).unwrap();
        assert_eq!(first, second);
        let mode = std::fs::metadata(secret_path(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(first.expose().len(), 32);
    }

    #[test]
    fn hand_written_file_is_read_and_tightened() {
        let dir = tempfile::tempdir().unwrap();
        let path = secret_path(dir.path());
        std::fs::write(&path, "ABCDEF0123456789abcdef0123456789\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let secret = load_or_create(dir.path()).unwrap();
        assert_eq!(secret.expose(), "abcdef0123456789abcdef0123456789");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn invalid_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(secret_path(dir.path()), "not a secret").unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, SecretFileError::Invalid { .. }), "{err}");
        assert!(err.to_string().contains("secret"));
    }

    #[test]
    fn random_secrets_differ() {
        assert_ne!(generate(), generate());
    }
}
