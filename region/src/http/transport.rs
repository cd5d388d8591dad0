//! What a request came over (TLS or clear HTTP, told apart per connection by the listener) and
//! what the region answers in clear: the rack registration challenge, which racks must reach
//! before they know the certificate, and the JSON API for bearer-key tools (`imgtool` and curl
//! with an `http://` URL, until they pin the certificate too). The UI is redirected to HTTPS, and
//! rack calls are refused, so no rack credential, session cookie or boot decision crosses in clear.

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
    match request.uri().path().strip_prefix(&api) {
        Some(paths::RACK_CHALLENGE) => next.run(request).await,
        Some(path) if is_rack_call(path) => rack_call_in_clear().into_response(),
        Some(_) => next.run(request).await,
        None => redirect_to_https(&request),
    }
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
    let Some(host) = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return (StatusCode::BAD_REQUEST, "this region serves its UI over HTTPS only: use https://").into_response();
    };
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    Redirect::permanent(&format!("https://{host}{path}")).into_response()
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
}
