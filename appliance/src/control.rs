//! The rack's local control socket (`DATA_DIR/control.sock`, mode 0600): how `rackd sync` asks
//! the running `rackd serve` to sync and follows its progress. HTTP/1.1 over a Unix socket.

use std::path::{Path, PathBuf};

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio_util::sync::CancellationToken;

use crate::sync::{LocalStatus, SyncHandle};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach 'rackd serve' at {path}; is it running with this data dir?")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("the control socket conversation failed")]
    Http { source: hyper::Error },
    #[error("'rackd serve' answered {status}")]
    Status { status: hyper::StatusCode },
    #[error("'rackd serve' sent an unreadable answer")]
    Decode { source: serde_json::Error },
    #[error("cannot listen on {path}")]
    Listen { path: PathBuf, source: std::io::Error },
    #[error("the control socket {path} failed")]
    Serve { path: PathBuf, source: std::io::Error },
}

/// The control socket, bound.
#[derive(Debug)]
pub struct ControlSocket {
    listener: tokio::net::UnixListener,
    path: PathBuf,
}

/// Binds the control socket at `path`, replacing a stale one a previous run left.
pub fn bind(path: PathBuf) -> Result<ControlSocket, ControlError> {
    let _ = std::fs::remove_file(&path);
    let listener =
        tokio::net::UnixListener::bind(&path).map_err(|source| ControlError::Listen { path: path.clone(), source })?;
    Ok(ControlSocket { listener, path })
}

/// Serves the control socket until `shutdown`, then lets the requests in flight finish and
/// removes the socket file.
pub async fn serve(socket: ControlSocket, handle: SyncHandle, shutdown: CancellationToken) -> Result<(), ControlError> {
    let ControlSocket { listener, path } = socket;
    let app = Router::new().route("/sync", post(trigger)).route("/status", get(status)).with_state(handle);
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    let _ = std::fs::remove_file(&path);
    served.map_err(|source| ControlError::Serve { path, source })
}

async fn trigger(State(handle): State<SyncHandle>) -> Json<LocalStatus> {
    let status = handle.status.borrow().clone();
    handle.trigger.notify_one();
    Json(status)
}

async fn status(State(handle): State<SyncHandle>) -> Json<LocalStatus> {
    Json(handle.status.borrow().clone())
}

/// Client side, for `rackd sync`.
pub async fn call(socket: &Path, method: hyper::Method, path: &str) -> Result<LocalStatus, ControlError> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ControlError::Connect { path: socket.to_owned(), source })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|source| ControlError::Http { source })?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "rackd")
        .body(Full::new(Bytes::new()))
        .expect("a valid request");
    let response = sender.send_request(request).await.map_err(|source| ControlError::Http { source })?;
    let status = response.status();
    if !status.is_success() {
        return Err(ControlError::Status { status });
    }
    let body = response.into_body().collect().await.map_err(|source| ControlError::Http { source })?.to_bytes();
    serde_json::from_slice(&body).map_err(|source| ControlError::Decode { source })
}
