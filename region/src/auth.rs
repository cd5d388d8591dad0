//! Credentials: password hashing (argon2id), session and rack tokens, and the extractors that
//! authenticate UI sessions, API keys and racks on each request.

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::CookieJar;

use crate::error::ApiError;
use crate::server::AppState;
use crate::store::{RackRow, User};
use crate::util::{constant_time_eq, sha256_hex};

/// Name of the UI's session cookie.
pub const SESSION_COOKIE: &str = "metalrack_session";

/// A password shorter than this is refused by `createadmin`.
pub const PASSWORD_LEN_MIN: usize = 8;

/// Longest password accepted: argon2 hashes any length, but a bound keeps a login request cheap.
pub const PASSWORD_LEN_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("a password has at least {PASSWORD_LEN_MIN} characters")]
    TooShort,
    #[error("a password has at most {PASSWORD_LEN_MAX} characters")]
    TooLong,
    #[error("cannot hash password: {0}")]
    Hash(argon2::password_hash::Error),
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

/// Checks a password against a stored PHC hash (argon2's comparison is constant-time).
pub fn verify_password(password_hash: &str, password: &str) -> bool {
    if password.len() > PASSWORD_LEN_MAX {
        return false;
    }
    match PasswordHash::new(password_hash) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// The user behind a UI request's session cookie; pages that need one redirect to the login page.
#[derive(Debug, Clone)]
pub struct SessionUser(pub User);

impl FromRequestParts<AppState> for SessionUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let jar = CookieJar::from_headers(&parts.headers);
        let login = || Redirect::to(&format!("{}/login", crate::server::BASE_PATH)).into_response();
        let Some(cookie) = jar.get(SESSION_COOKIE) else {
            return Err(login());
        };
        match state.store.session_user(&sha256_hex(cookie.value().as_bytes())).await {
            Ok(Some(user)) => Ok(SessionUser(user)),
            Ok(None) => Err(login()),
            Err(e) => {
                tracing::error!(error = %crate::error::chain(&e), "session lookup failed");
                Err(StatusCode::INTERNAL_SERVER_ERROR.into_response())
            }
        }
    }
}

/// The user behind an API request's `Authorization: Bearer KEY_ID.KEY_SECRET` header.
#[derive(Debug, Clone)]
pub struct ApiUser(pub User);

impl FromRequestParts<AppState> for ApiUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let missing = || ApiError::unauthorized("this endpoint needs an API key: send 'Authorization: Bearer API_KEY'");
        let value = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(missing)?;
        let key = value.strip_prefix("Bearer ").ok_or_else(missing)?;
        let invalid = || ApiError::unauthorized("invalid API key");
        let (key_id, key_secret) = key.split_once('.').ok_or_else(invalid)?;
        let (stored_secret, user_id) =
            state.store.api_key(key_id).await.map_err(ApiError::internal)?.ok_or_else(invalid)?;
        if !constant_time_eq(stored_secret.as_bytes(), key_secret.as_bytes()) {
            return Err(invalid());
        }
        let user = state.store.user_by_id(&user_id).await.map_err(ApiError::internal)?.ok_or_else(invalid)?;
        Ok(ApiUser(user))
    }
}

/// The rack behind a request's `Authorization: Rack RACK_ID:CREDENTIAL` header, checked against
/// the secret generation in force.
#[derive(Debug, Clone)]
pub struct AuthedRack(pub RackRow);

impl FromRequestParts<AppState> for AuthedRack {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let missing = || {
            ApiError::unauthorized("this endpoint needs a rack credential: send 'Authorization: Rack ID:CREDENTIAL'")
        };
        let value = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(missing)?;
        let (rack_id, credential) = value.strip_prefix("Rack ").and_then(|v| v.split_once(':')).ok_or_else(missing)?;
        let unknown = || {
            ApiError::reregister(
                "this rack's credential is not known to the region (it was replaced or removed): register again",
            )
        };
        let rack = state.store.rack(rack_id).await.map_err(ApiError::internal)?.ok_or_else(unknown)?;
        if !constant_time_eq(rack.credential_hash.as_bytes(), sha256_hex(credential.as_bytes()).as_bytes()) {
            return Err(unknown());
        }
        let generation =
            state.store.secret_state().await.map_err(ApiError::internal)?.map(|s| s.generation).unwrap_or(0);
        if rack.secret_generation != generation {
            state.note_stale_rack(&rack, generation).await;
            return Err(ApiError::reregister(
                "secret changed: the region's shared secret changed since this rack registered; register again with \
                 'rackd register --url URL --secret NEW_SECRET'",
            ));
        }
        Ok(AuthedRack(rack))
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
    fn same_password_gets_different_salts() {
        assert_ne!(hash_password("password1").unwrap(), hash_password("password1").unwrap());
    }

    #[test]
    fn password_length_bounds() {
        assert!(matches!(hash_password("short"), Err(PasswordError::TooShort)));
        assert!(matches!(hash_password(&"x".repeat(PASSWORD_LEN_MAX + 1)), Err(PasswordError::TooLong)));
    }
}
