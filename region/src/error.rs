//! API errors: what the client is told (a status and a JSON reason) versus what goes to the log.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use metalrack_api::{ErrorBody, CODE_REREGISTER};

/// An error answered to an API client as `{"error": "...", "code": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, body: ErrorBody { error: message.into(), code: None } }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// The rack's credential is no longer valid: it must run `rackd register` again.
    pub fn reregister(message: impl Into<String>) -> ApiError {
        let mut error = ApiError::unauthorized(message);
        error.body.code = Some(CODE_REREGISTER.to_owned());
        error
    }

    /// An internal failure: the details go to the log, the client learns only that it happened.
    pub fn internal(error: impl std::error::Error) -> ApiError {
        tracing::error!(error = %chain(&error), "internal error");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error; see the region's log")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

pub use metalrack_image_tools::error_chain as chain;
