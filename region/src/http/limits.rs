//! What a request may cost before a handler sees it: its body read whole (small bodies) within
//! an idle timeout and outside the handler limit, requests in flight bounded (catalogue
//! long-polls apart, with their own bound), and `Connection: close` when a body is left unread.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use metalrack_api::{paths, API_PREFIX};
use tokio::sync::Semaphore;

use super::error::ApiError;
use super::BASE_PATH;

/// Largest request body. Every request but image uploads is a small form or JSON document;
/// uploads stream through their own routes with their own limits.
pub const REQUEST_BODY_MAX_BYTES: usize = metalrack_api::limits::REQUEST_BODY_MAX_BYTES;

/// A small body that sends nothing for this long is refused (408): a trickle cannot hold a
/// connection's request open. Any real client sends 64 KiB in far less.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Requests handled at once; more wait. Bounds memory and work in handlers. A request counts
/// only once its body is in (see [`read_small_body`]), so slow senders cannot hold these.
pub const HTTP_REQUESTS_IN_FLIGHT_MAX: usize = 256;

/// Long-polls (racks' catalogue and power polls) held at once: two per rack, each held up to 60 s. They wait on a
/// change, not on work, so they do not count against [`HTTP_REQUESTS_IN_FLIGHT_MAX`]; past this
/// bound a poll is answered 503 and the rack polls again after its backoff. 4,096 covers a
/// site of 1,000 racks (2,000 polls) with room for racks re-registering under new names.
pub const LONG_POLLS_MAX: usize = 4096;

/// Seconds a client refused for load is asked to wait.
const RETRY_AFTER_S: &str = "1";

/// The two bounds, shared by every request.
#[derive(Debug)]
pub struct InFlight {
    handlers: Semaphore,
    long_polls: Semaphore,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight { handlers: Semaphore::new(HTTP_REQUESTS_IN_FLIGHT_MAX), long_polls: Semaphore::new(LONG_POLLS_MAX) }
    }
}

impl InFlight {
    /// Handler slots free now.
    pub fn handlers_free(&self) -> usize {
        self.handlers.available_permits()
    }

    /// Long-poll slots free now.
    pub fn long_polls_free(&self) -> usize {
        self.long_polls.available_permits()
    }
}

fn api_path(path: &str) -> String {
    format!("{BASE_PATH}{API_PREFIX}{path}")
}

/// Routes whose bodies are streamed or larger than [`REQUEST_BODY_MAX_BYTES`] with their own
/// limits, read by their handlers after the caller is authenticated.
fn streams_its_body(path: &str) -> bool {
    path.starts_with(&api_path(paths::UPLOADS))
        || path == api_path(paths::RACK_CHUNKS)
        || path == api_path(paths::RACK_SNAPSHOT)
}

/// Reads a small body whole before the request goes on: at most [`REQUEST_BODY_MAX_BYTES`]
/// (413) and no pause over [`BODY_IDLE_TIMEOUT`] (408). Streaming routes pass as they are.
pub async fn read_small_body(request: Request, next: Next) -> Response {
    if streams_its_body(request.uri().path()) || request.body().is_end_stream() {
        return next.run(request).await;
    }
    let (parts, mut body) = request.into_parts();
    let mut bytes = Vec::new();
    loop {
        let frame = match tokio::time::timeout(BODY_IDLE_TIMEOUT, body.frame()).await {
            Err(_) => {
                let message = format!("no request data for {} s", BODY_IDLE_TIMEOUT.as_secs());
                return ApiError::new(StatusCode::REQUEST_TIMEOUT, message).into_response();
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return ApiError::bad_request(format!("request body interrupted: {e}")).into_response(),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > REQUEST_BODY_MAX_BYTES {
                let message = format!("a request body is at most {REQUEST_BODY_MAX_BYTES} bytes");
                return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
            }
            bytes.extend_from_slice(&data);
        }
    }
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}

/// Holds a permit of the right bound while the request is handled.
pub async fn limit_in_flight(State(in_flight): State<Arc<InFlight>>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let long_poll = path == api_path(paths::RACK_CATALOGUE)
        || (path == api_path(paths::RACK_POWER) && request.method() == axum::http::Method::GET);
    if long_poll {
        let Ok(_permit) = in_flight.long_polls.try_acquire() else {
            let mut response =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "too many long-polls; poll again").into_response();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
            return response;
        };
        return next.run(request).await;
    }
    let Ok(_permit) = in_flight.handlers.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    next.run(request).await
}

/// Answers `Connection: close` when the request's body was not read to its end (refused as too
/// large, or an error before or in the middle of it). hyper then closes the connection, since
/// the unread rest would be taken for the next request; without the header a client that reused
/// the connection raced the close (seen in CI: `IncompleteMessage` on the request after a 413).
pub async fn close_if_body_unread(request: Request, next: Next) -> Response {
    use futures_util::StreamExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    let (parts, body) = request.into_parts();
    let read = Arc::new(AtomicBool::new(body.is_end_stream()));
    let body = if read.load(Ordering::Relaxed) {
        body
    } else {
        // Polled only once the body has ended without error.
        let end = read.clone();
        let marker = futures_util::stream::poll_fn(move |_| {
            end.store(true, Ordering::Relaxed);
            std::task::Poll::Ready(None)
        });
        Body::from_stream(body.into_data_stream().chain(marker))
    };
    let mut response = next.run(axum::extract::Request::from_parts(parts, body)).await;
    if !read.load(Ordering::Relaxed) {
        response.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    response
}
