//! What a request came over (TLS or clear HTTP, told apart per connection by the listener) and
//! what the region answers in clear: only the rack registration challenge, which racks must reach
//! before they know the certificate and which carries nothing secret. The UI is redirected to
//! HTTPS; rack calls are refused with the code that makes a rack register again; every other API
//! call, and any request carrying `Authorization`, is refused with a message naming the https://
//! URL. So no API key, rack credential, session cookie or boot decision is answered in clear.
//!
//! The API is refused rather than redirected: a client that follows a redirect sends its key
//! again, and the call would succeed, so the operator would never learn that the key crossed the
//! network in clear (and the script would keep sending it so). A refusal fails loudly and says
//! to replace the key.

use std::convert::Infallible;

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use metalrack_api::{paths, CODE_REREGISTER};

use super::error::ApiError;
use super::BASE_PATH;

/// The connection a request arrived on; the listener puts it in every request's extensions.
/// A request without one (never from the listener) counts as clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tls,
    Clear,
}

impl<S: Send + Sync> FromRequestParts<S> for Transport {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Transport, Infallible> {
        Ok(parts.extensions.get::<Transport>().copied().unwrap_or(Transport::Clear))
    }
}

/// Every API path only racks call, except the challenge, starts with this or is
/// [`paths::RACK_REGISTER`] or [`paths::RACK_HEARTBEAT`] (checked by a test below).
const RACK_ONLY_PREFIX: &str = "/rack/";

/// What a request over clear HTTP may do (see the module doc); TLS requests pass untouched.
pub async fn clear_http_policy(transport: Transport, request: Request, next: Next) -> Response {
    if transport == Transport::Tls {
        return next.run(request).await;
    }
    let api = format!("{BASE_PATH}{}", metalrack_api::API_PREFIX);
    let carries_key = request.headers().contains_key(header::AUTHORIZATION);
    match request.uri().path().strip_prefix(&api) {
        Some(paths::RACK_CHALLENGE) => next.run(request).await,
        Some(path) if is_rack_call(path) => rack_call_in_clear().into_response(),
        Some(_) => api_call_in_clear(&request, carries_key).into_response(),
        None if carries_key => api_call_in_clear(&request, carries_key).into_response(),
        None => redirect_to_https(&request),
    }
}

/// The API (or anything sent with a key) over clear HTTP: refused, saying where to go and, when
/// a key came along, that it must be replaced since anyone on the path may have read it.
fn api_call_in_clear(request: &Request, carries_key: bool) -> ApiError {
    let mut message = match https_url(request) {
        Some(url) => format!("this region serves its API over HTTPS only: use {url}"),
        None => "this region serves its API over HTTPS only: use https://".to_owned(),
    };
    if carries_key {
        // The path only: the key itself must not reach the log.
        tracing::warn!(path = %request.uri().path(), "refused an API key sent over clear HTTP; it should be replaced");
        message.push_str(
            " (the key this request carried crossed the network in clear: make a new one with 'regiond apikey \
             --username U --new' and use that one from now on)",
        );
    }
    ApiError::new(StatusCode::FORBIDDEN, message)
}

/// The request's URL with `https`, from its Host header; `None` without one.
fn https_url(request: &Request) -> Option<String> {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok())?;
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    Some(format!("https://{host}{path}"))
}

fn is_rack_call(api_path: &str) -> bool {
    api_path == paths::RACK_REGISTER || api_path == paths::RACK_HEARTBEAT || api_path.starts_with(RACK_ONLY_PREFIX)
}

/// A rack that calls in clear is older than this region or registered before it served TLS:
/// it must register again (which pins the certificate), so it gets the code that tells it so.
fn rack_call_in_clear() -> ApiError {
    let mut error = ApiError::new(
        StatusCode::FORBIDDEN,
        "rack calls must use HTTPS: this rackd is older than the region or registered before the region served \
         TLS; upgrade rackd and run 'rackd register' again",
    );
    error.body.code = Some(CODE_REREGISTER.to_owned());
    error
}

/// The same URL with `https`: the port serves both, so the Host header's port is right as it is.
/// 308 keeps the method and body of a form sent to an `http://` URL.
fn redirect_to_https(request: &Request) -> Response {
    match https_url(request) {
        Some(url) => Redirect::permanent(&url).into_response(),
        None => (StatusCode::BAD_REQUEST, "this region serves its UI over HTTPS only: use https://").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rack_only_path_is_refused_in_clear_and_the_challenge_is_not() {
        for path in [
            paths::RACK_REGISTER,
            paths::RACK_HEARTBEAT,
            paths::RACK_CATALOGUE,
            paths::RACK_CHUNKS,
            paths::RACK_EVENTS,
            &paths::rack_manifest("m1"),
        ] {
            assert!(is_rack_call(path), "{path}");
        }
        for path in [paths::RACK_CHALLENGE, paths::RACKS, paths::IMAGES, &paths::machine("52-54-00-aa-bb-01")] {
            assert!(!is_rack_call(path), "{path}");
        }
    }

    #[test]
    fn an_api_call_in_clear_is_refused_with_the_https_url_and_a_key_is_called_burnt() {
        let request = |authorization: bool| {
            let mut builder = Request::builder().uri("/MAAS/api/v1/images?x=1").header(header::HOST, "region:5240");
            if authorization {
                builder = builder.header(header::AUTHORIZATION, "Bearer k");
            }
            builder.body(axum::body::Body::empty()).unwrap()
        };
        let anonymous = api_call_in_clear(&request(false), false);
        assert_eq!(anonymous.status, StatusCode::FORBIDDEN);
        assert!(anonymous.body.error.contains("use https://region:5240/MAAS/api/v1/images?x=1"), "{anonymous:?}");
        assert!(!anonymous.body.error.contains("apikey"), "{anonymous:?}");
        let keyed = api_call_in_clear(&request(true), true);
        assert!(keyed.body.error.contains("crossed the network in clear"), "{keyed:?}");
        assert!(!keyed.body.error.contains("Bearer k"), "{keyed:?}");
    }
}
