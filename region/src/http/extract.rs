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

/// The form field that carries a session's CSRF token.
pub const CSRF_FIELD: &str = "csrf";

/// The CSRF token of a session: derived from its secret token, so the region keeps nothing more
/// and a page from another origin, which cannot read the cookie, cannot know it.
pub fn csrf_token(session_token: &str) -> String {
    crate::util::sha256_hex(format!("metalrack csrf v1\n{session_token}").as_bytes())
}

/// The user behind a UI request's session cookie, and the CSRF token its forms carry; pages that
/// need one redirect to the login page.
#[derive(Debug, Clone)]
pub struct SessionUser {
    pub user: User,
    pub csrf: String,
}

impl FromRequestParts<AppState> for SessionUser {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let jar = CookieJar::from_headers(&parts.headers);
        let login = || Redirect::to(&format!("{BASE_PATH}/login")).into_response();
        let Some(cookie) = jar.get(SESSION_COOKIE) else {
            return Err(login());
        };
        match crate::users::session_user(&state.shared, cookie.value()).await {
            Ok(Some(user)) => Ok(SessionUser { user, csrf: csrf_token(cookie.value()) }),
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
        // Every authenticated rack request passes here, so here the invariant is checked that
        // the racks' routes run on the background runtime (`http::background`): a rack route
        // added to an admin router instead of a `rack_router` fails every test that uses it.
        debug_assert!(
            crate::db::on_background_thread(),
            "a rack's request ran at the admin's priority: its route belongs in a rack_router ({})",
            parts.uri.path()
        );
        Ok(AuthedRack(state.racks.authenticate(authorization(parts)).await?))
    }
}

/// Refuses a UI form post that another site could have made: its `Origin`, when the browser
/// sends one (they all do for a POST), must be this region's, and every form but the login form
/// must carry the session's CSRF token. The body was already read whole by
/// `limits::read_small_body`, so parsing it here costs a copy of at most 64 KiB.
pub async fn check_csrf(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let forbidden =
        |reason: &str| (StatusCode::FORBIDDEN, format!("{reason}: reload the page and try again")).into_response();
    let headers = request.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin_host = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, host)| host);
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if origin_host.is_none() || origin_host != host {
            return forbidden("the form was sent from another site");
        }
    }
    if request.uri().path() == format!("{BASE_PATH}/login") {
        return next.run(request).await;
    }
    let expected = CookieJar::from_headers(headers).get(SESSION_COOKIE).map(|c| csrf_token(c.value()));
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, super::limits::REQUEST_BODY_MAX_BYTES).await else {
        return forbidden("the form could not be read");
    };
    let sent = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
        .ok()
        .and_then(|fields| fields.into_iter().find(|(name, _)| name == CSRF_FIELD).map(|(_, value)| value));
    match (expected, sent) {
        (Some(expected), Some(sent)) if crate::util::constant_time_eq(expected.as_bytes(), sent.as_bytes()) => {
            next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
        }
        // No session: the handler's own extractor sends the browser to the login page.
        (None, _) => next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await,
        _ => forbidden("the form's security token is missing or out of date"),
    }
}

/// Headers every answer gets: no framing, no sniffing, scripts and forms only from this origin,
/// and nothing kept in caches unless the route said otherwise (pages show API keys and the
/// secret).
pub async fn security_headers(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::HeaderValue;
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"),
    );
    headers.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    response
}
