//! Users and sessions: password hashing (argon2id), creating administrators, logging in and out
//! of the UI, API keys. Who may do what is decided here; the HTTP extractors only carry the
//! credentials in.

pub mod store;
pub mod throttle;

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

use crate::db::StoreError;
use crate::state::{FailureKind, Shared};
use crate::util::{constant_time_eq, random_hex, sha256_hex};

use store::CreateUserOutcome;
pub use store::{NewUser, User};
use throttle::{LoginThrottle, ThrottleKey};

/// A password shorter than this is refused by `createadmin`.
pub const PASSWORD_LEN_MIN: usize = 8;

/// Longest password accepted: argon2 hashes any length, but a bound keeps a login request cheap.
pub const PASSWORD_LEN_MAX: usize = 1024;

/// Longest username (as MAAS, Django's default).
pub const USERNAME_LEN_MAX: usize = 150;

/// Bytes of randomness in a session token (its SHA-256 is what the database keeps).
const SESSION_TOKEN_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("a password has at least {PASSWORD_LEN_MIN} characters")]
    TooShort,
    #[error("a password has at most {PASSWORD_LEN_MAX} characters")]
    TooLong,
    #[error("cannot hash password: {0}")]
    Hash(argon2::password_hash::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error("a username has 1 to {USERNAME_LEN_MAX} characters")]
    UsernameLength,
    #[error("a username holds letters, digits and . @ + - _, not {character:?}")]
    UsernameCharacter { character: char },
    #[error("{email:?} is not an email address")]
    Email { email: String },
    #[error("{key:?} is not an SSH public key (expected e.g. 'ssh-ed25519 AAAA... comment')")]
    SshKey { key: String },
    #[error(transparent)]
    Password(#[from] PasswordError),
    #[error("a user named {username:?} already exists; nothing was changed")]
    DuplicateUsername { username: String },
    #[error("no user named {username:?}")]
    NoSuchUser { username: String },
    #[error("this endpoint needs an API key: send 'Authorization: Bearer API_KEY'")]
    ApiKeyMissing,
    #[error("invalid API key")]
    ApiKeyInvalid,
    #[error("the password check stopped before it finished")]
    VerifyTask { source: tokio::task::JoinError },
    #[error("cannot {step}")]
    Store { step: &'static str, source: StoreError },
}

fn store_error(step: &'static str) -> impl FnOnce(StoreError) -> UsersError {
    move |source| UsersError::Store { step, source }
}

/// Hashes a password with argon2id and a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, PasswordError> {
    if password.chars().count() < PASSWORD_LEN_MIN {
        return Err(PasswordError::TooShort);
    }
    if password.len() > PASSWORD_LEN_MAX {
        return Err(PasswordError::TooLong);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(PasswordError::Hash)
}

/// Checks a password against a stored PHC hash (the comparison is constant-time).
pub fn verify_password(password_hash: &str, password: &str) -> bool {
    verify_password_in(password_hash, password, &mut Vec::new())
}

/// [`verify_password`] with argon2's working memory in `memory` (resized to what the hash's
/// parameters ask), so a caller can reuse it from one verification to the next.
pub fn verify_password_in(password_hash: &str, password: &str, memory: &mut Vec<Block>) -> bool {
    if password.len() > PASSWORD_LEN_MAX {
        return false;
    }
    let Ok(parsed) = PasswordHash::new(password_hash) else { return false };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else { return false };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else { return false };
    let Ok(version) = parsed.version.map(Version::try_from).transpose() else { return false };
    let Ok(params) = Params::try_from(&parsed) else { return false };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else { return false };
    memory.resize(params.block_count(), Block::default());
    let mut output = vec![0u8; expected.len()];
    let argon2 = Argon2::new(algorithm, version.unwrap_or_default(), params);
    argon2.hash_password_into_with_memory(password.as_bytes(), salt, &mut output, &mut memory[..]).is_ok()
        && constant_time_eq(&output, expected.as_bytes())
}

/// A hash to check passwords of unknown users against, so a login for a missing user takes as
/// long as one with a wrong password and does not reveal which usernames exist.
fn dummy_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| hash_password(&random_hex(16)).expect("hashing a random password works"))
}

pub fn validate_username(username: &str) -> Result<(), UsersError> {
    if username.is_empty() || username.len() > USERNAME_LEN_MAX {
        return Err(UsersError::UsernameLength);
    }
    if let Some(character) =
        username.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '@' | '+' | '-' | '_')))
    {
        return Err(UsersError::UsernameCharacter { character });
    }
    Ok(())
}

pub fn validate_email(email: &str) -> Result<(), UsersError> {
    if !email.contains('@') || email.chars().any(char::is_whitespace) {
        return Err(UsersError::Email { email: email.to_owned() });
    }
    Ok(())
}

pub fn validate_ssh_key(key: &str) -> Result<(), UsersError> {
    const KEY_TYPES: [&str; 6] = [
        "ssh-rsa",
        "ssh-ed25519",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
    ];
    let mut parts = key.split_whitespace();
    let kind = parts.next().unwrap_or_default();
    if !KEY_TYPES.contains(&kind) || parts.next().is_none() {
        return Err(UsersError::SshKey { key: key.to_owned() });
    }
    Ok(())
}

/// Creates an administrator (already validated and hashed by the caller, which may have asked
/// on a terminal) and records it. A taken name changes nothing.
pub async fn create_admin(store: &crate::db::Store, new: &NewUser<'_>, actor: &str) -> Result<User, UsersError> {
    let user = match store.create_user(new).await.map_err(store_error("create the user"))? {
        CreateUserOutcome::Created(user) => user,
        CreateUserOutcome::DuplicateUsername => {
            return Err(UsersError::DuplicateUsername { username: new.username.to_owned() })
        }
    };
    store
        .record_event("user.created", actor, &format!("administrator {:?} created", new.username))
        .await
        .map_err(store_error("record the new user"))?;
    Ok(user)
}

pub async fn user_by_username(store: &crate::db::Store, username: &str) -> Result<User, UsersError> {
    store
        .user_by_username(username)
        .await
        .map_err(store_error("look up the user"))?
        .ok_or_else(|| UsersError::NoSuchUser { username: username.to_owned() })
}

/// The user an `Authorization` header's `Bearer KEY_ID.KEY_SECRET` names.
pub async fn authenticate_api_key(shared: &Shared, authorization: Option<&str>) -> Result<User, UsersError> {
    let key = authorization.and_then(|v| v.strip_prefix("Bearer ")).ok_or(UsersError::ApiKeyMissing)?;
    let (key_id, key_secret) = key.split_once('.').ok_or(UsersError::ApiKeyInvalid)?;
    let (stored_secret, user_id) = shared
        .store
        .api_key(key_id)
        .await
        .map_err(store_error("look up the API key"))?
        .ok_or(UsersError::ApiKeyInvalid)?;
    if !constant_time_eq(stored_secret.as_bytes(), key_secret.as_bytes()) {
        return Err(UsersError::ApiKeyInvalid);
    }
    shared
        .store
        .user_by_id(&user_id)
        .await
        .map_err(store_error("look up the key's user"))?
        .ok_or(UsersError::ApiKeyInvalid)
}

/// The user a UI session token belongs to, if the session is live.
pub async fn session_user(shared: &Shared, token: &str) -> Result<Option<User>, UsersError> {
    shared.store.session_user(&sha256_hex(token.as_bytes())).await.map_err(store_error("look up the session"))
}

/// A login's outcome: a new session token, refused (wrong name or password: which one is not
/// said), or not tried because of earlier failures.
#[derive(Debug)]
pub enum Login {
    Session { user: User, token: String },
    Refused,
    Throttled { retry_after: Duration },
}

/// Checks a password (in a blocking task, one per core at most: argon2 takes tens of
/// milliseconds and ~19 MiB) and opens a session. Fields a stranger sends are bounded before
/// they reach the database; failures are throttled per source and per username and summarised
/// in the event log.
pub async fn login(
    shared: &Shared,
    throttle: &LoginThrottle,
    username: &str,
    password: String,
    peer: IpAddr,
) -> Result<Login, UsersError> {
    let name_ok = !username.is_empty() && username.len() <= USERNAME_LEN_MAX;
    // Only a plausible username becomes a throttle key: a stranger cannot fill the table with
    // long names.
    let keys = if name_ok {
        vec![ThrottleKey::Source(peer), ThrottleKey::Username(username.to_owned())]
    } else {
        vec![ThrottleKey::Source(peer)]
    };
    if let Err(retry_after) = throttle.check(&keys, Instant::now()) {
        // Not checked, but still an attempt to guess: counted in the event log's summary.
        let shown: String = username.chars().take(USERNAME_LEN_MAX).collect();
        let message = format!("login for {shown:?} from {peer} refused: too many failures");
        shared.note_failure(FailureKind::Login, peer, &shown, &message).await;
        return Ok(Login::Throttled { retry_after });
    }
    let user = if name_ok && password.len() <= PASSWORD_LEN_MAX {
        let mut slot = throttle.verification().await;
        let user = shared.store.user_by_username(username).await.map_err(store_error("look up the user"))?;
        let hash = user.as_ref().map(|u| u.password_hash.clone()).unwrap_or_else(|| dummy_hash().to_owned());
        let mut memory = std::mem::take(&mut slot.memory);
        let (ok, memory) =
            tokio::task::spawn_blocking(move || (verify_password_in(&hash, &password, &mut memory), memory))
                .await
                .map_err(|source| UsersError::VerifyTask { source })?;
        slot.memory = memory;
        user.filter(|_| ok)
    } else {
        None
    };
    let Some(user) = user else {
        throttle.failed(&keys, Instant::now());
        let shown: String = username.chars().take(USERNAME_LEN_MAX).collect();
        tracing::warn!(username = %shown.escape_debug(), %peer, "login failed");
        let message = format!("failed login for {shown:?} from {peer}");
        shared.note_failure(FailureKind::Login, peer, &shown, &message).await;
        return Ok(Login::Refused);
    };
    throttle.succeeded(&keys);
    let token = random_hex(SESSION_TOKEN_BYTES);
    shared
        .store
        .create_session(&sha256_hex(token.as_bytes()), &user.id, shared.config.session_lifetime_ms as i64)
        .await
        .map_err(store_error("open the session"))?;
    shared
        .store
        .record_event("user.login", &user.username, &format!("{} logged in from {peer}", user.username))
        .await
        .map_err(store_error("record the login"))?;
    Ok(Login::Session { user, token })
}

pub async fn logout(shared: &Shared, token: &str) -> Result<(), UsersError> {
    shared.store.delete_session(&sha256_hex(token.as_bytes())).await.map_err(store_error("end the session"))
}

/// What a user's account page and `GET /account` show.
#[derive(Debug)]
pub struct Account {
    pub api_keys: Vec<String>,
    pub ssh_keys: Vec<String>,
}

pub async fn account(shared: &Shared, user: &User) -> Result<Account, UsersError> {
    Ok(Account {
        api_keys: shared.store.api_keys(&user.id).await.map_err(store_error("list API keys"))?,
        ssh_keys: shared.store.ssh_keys(&user.id).await.map_err(store_error("list SSH keys"))?,
    })
}

pub async fn count(shared: &Shared) -> Result<i64, UsersError> {
    shared.store.count_users().await.map_err(store_error("count users"))
}

/// A user's API keys, or (with `new`) a new one.
pub async fn api_keys(store: &crate::db::Store, username: &str, new: bool) -> Result<Vec<String>, UsersError> {
    let user = user_by_username(store, username).await?;
    if new {
        Ok(vec![store.create_api_key(&user.id).await.map_err(store_error("create an API key"))?])
    } else {
        store.api_keys(&user.id).await.map_err(store_error("list API keys"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_verifies_only_the_same_password() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(!hash.contains("correct horse"));
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horsf"));
        assert!(!verify_password("not a hash", "correct horse"));
    }

    #[test]
    fn reused_memory_verifies_as_fresh_memory_does() {
        let hash = hash_password("correct horse").unwrap();
        let mut memory = Vec::new();
        for (password, right) in
            [("correct horsf", false), ("correct horse", true), ("", false), ("correct horse", true)]
        {
            assert_eq!(verify_password_in(&hash, password, &mut memory), right, "{password:?}");
        }
        assert_eq!(memory.len(), Params::DEFAULT_M_COST as usize, "the hash's memory cost, in 1 KiB blocks");
    }

    #[test]
    fn same_password_gets_different_salts() {
        assert_ne!(hash_password("password1").unwrap(), hash_password("password1").unwrap());
    }

    #[test]
    fn usernames_emails_and_keys() {
        assert!(validate_username("admin").is_ok());
        assert!(matches!(validate_username("a b"), Err(UsersError::UsernameCharacter { character: ' ' })));
        assert!(matches!(validate_username(""), Err(UsersError::UsernameLength)));
        assert!(validate_email("op@example.com").is_ok());
        assert!(validate_email("op example.com").is_err());
        assert!(validate_ssh_key("ssh-ed25519 AAAAC3Nza op@host").is_ok());
        assert!(validate_ssh_key("hello").is_err());
    }

    #[test]
    fn password_length_bounds() {
        assert!(matches!(hash_password("short"), Err(PasswordError::TooShort)));
        assert!(matches!(hash_password(&"x".repeat(PASSWORD_LEN_MAX + 1)), Err(PasswordError::TooLong)));
    }
}
