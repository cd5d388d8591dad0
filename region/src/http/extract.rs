//! Request extractors: the JSON body whose rejections are JSON errors, and the three kinds of
//! caller (a UI session, an API key, a rack credential). They carry credentials to the users
//! and racks domains, which decide.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use axum_extra::extract::CookieJar;
use metalrack_image_tools::error_chain;

use super::error::ApiError;
use super::{AppState, BASE_PATH};
use crate::racks::RackRow;
use crate::users::User;

/// Name of the UI's session cookie.
pub const SESSION_COOKIE: &str = "metalrack_session";

/// `Json` whose rejections (bad JSON, wrong content type, too large) are JSON errors too.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => {
                let status = match &rejection {
                    JsonRejection::BytesRejection(_) => StatusCode::PAYLOAD_TOO_LARGE,
                    _ => rejection.status(),
                };
                Err(ApiError::new(status, rejection.body_text()))
            }
        }
    }
}

fn authorization(parts: &Parts) -> Option<&str> {
    parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

/// The user behind a UI request's session cookie; pages that need one redirect to the login page.
#[derive(Debug, Clone)]
pub struct SessionUser(pub User);

impl FromRequestParts<AppState> for SessionUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let jar = CookieJar::from_headers(&parts.headers);
        let login = || Redirect::to(&format!("{BASE_PATH}/login")).into_response();
        let Some(cookie) = jar.get(SESSION_COOKIE) else {
            return Err(login());
        };
        match crate::users::session_user(&state.shared, cookie.value()).await {
            Ok(Some(user)) => Ok(SessionUser(user)),
            Ok(None) => Err(login()),
            Err(e) => {
                tracing::error!(error = %error_chain(&e), "session lookup failed");
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
        Ok(ApiUser(crate::users::authenticate_api_key(&state.shared, authorization(parts)).await?))
    }
}

/// The rack behind a request's `Authorization: Rack RACK_ID:CREDENTIAL` header, checked against
/// the secret generation in force.
#[derive(Debug, Clone)]
pub struct AuthedRack(pub RackRow);

impl FromRequestParts<AppState> for AuthedRack {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(AuthedRack(state.racks.authenticate(authorization(parts)).await?))
    }
}
