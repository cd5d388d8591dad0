//! API errors: what the client is told (a status and a JSON reason) versus what goes to the log.
//! Every domain error becomes an [`ApiError`] here, so each status is decided in one place.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use metalrack_api::{ErrorBody, CODE_REREGISTER};
use metalrack_image_tools::error_chain;

use crate::catalogue::CatalogueError;
use crate::db::StoreError;
use crate::machines::MachinesError;
use crate::racks::RacksError;
use crate::secret::SecretFileError;
use crate::users::UsersError;

/// Seconds a client is asked to wait when the database was busy.
const BUSY_RETRY_AFTER_S: u32 = 1;

/// An error answered to an API client as `{"error": "...", "code": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
    /// Sent as `Retry-After` (seconds) when the failure was momentary.
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, body: ErrorBody { error: message.into(), code: None }, retry_after_s: None }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// A domain error with the status the caller chose. A server-side failure (5xx) is logged
    /// with its whole chain and the client learns only the failing step, never the causes
    /// (paths, SQL errors).
    fn from_domain(status: StatusCode, error: &(dyn std::error::Error + 'static)) -> ApiError {
        if status == StatusCode::INTERNAL_SERVER_ERROR && database_busy(error) {
            // Contention, not a fault: the client should try again, and the log need not shout.
            tracing::debug!(error = %error_chain(error), "database busy");
            let mut api = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the region is busy; try again");
            api.retry_after_s = Some(BUSY_RETRY_AFTER_S);
            return api;
        }
        if status.is_server_error() {
            tracing::error!(error = %error_chain(error), "request failed");
        }
        let mut message = error.to_string();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            message.push_str("; see the region's log");
        }
        ApiError::new(status, message)
    }

    /// The rack's credential is no longer valid: it must run `rackd register` again.
    fn reregister(error: &RacksError) -> ApiError {
        let mut api = ApiError::from_domain(StatusCode::UNAUTHORIZED, error);
        api.body.code = Some(CODE_REREGISTER.to_owned());
        api
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// Whether `error` or one of its sources is the database being busy.
fn database_busy(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.downcast_ref::<StoreError>().is_some_and(StoreError::is_busy) {
            return true;
        }
        next = e.source();
    }
    false
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> ApiError {
        ApiError::from_domain(StatusCode::INTERNAL_SERVER_ERROR, &error)
    }
}

impl From<SecretFileError> for ApiError {
    fn from(error: SecretFileError) -> ApiError {
        ApiError::from_domain(StatusCode::INTERNAL_SERVER_ERROR, &error)
    }
}

impl From<UsersError> for ApiError {
    fn from(error: UsersError) -> ApiError {
        use UsersError::*;
        let status = match &error {
            UsernameLength | UsernameCharacter { .. } | Email { .. } | SshKey { .. } | Password(_) => {
                StatusCode::BAD_REQUEST
            }
            DuplicateUsername { .. } => StatusCode::CONFLICT,
            NoSuchUser { .. } => StatusCode::NOT_FOUND,
            ApiKeyMissing | ApiKeyInvalid => StatusCode::UNAUTHORIZED,
            VerifyTask { .. } | Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::from_domain(status, &error)
    }
}

impl From<RacksError> for ApiError {
    fn from(error: RacksError) -> ApiError {
        use RacksError::*;
        let status = match &error {
            InvalidName { .. }
            | UnknownChallenge
            | NotHex { .. }
            | InvalidPolicy { .. }
            | SnapshotTooLarge { .. }
            | SnapshotHash { .. }
            | ProofVersion { .. }
            | InvalidLimit => StatusCode::BAD_REQUEST,
            ChallengesFull | ChallengesFullForSource => StatusCode::SERVICE_UNAVAILABLE,
            WrongSecret | NotAdmin { .. } => StatusCode::FORBIDDEN,
            CredentialMissing => StatusCode::UNAUTHORIZED,
            CredentialUnknown | SecretChanged => return ApiError::reregister(&error),
            NoSuchRack => StatusCode::NOT_FOUND,
            Secret { .. } | Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::from_domain(status, &error)
    }
}

impl From<MachinesError> for ApiError {
    fn from(error: MachinesError) -> ApiError {
        use MachinesError::*;
        let status = match &error {
            NotAdmin => StatusCode::FORBIDDEN,
            InvalidMac { .. }
            | HostnameTooLong
            | InvalidHostname { .. }
            | InvalidImage { .. }
            | InvalidPower { .. }
            | InvalidKernelParams
            | InvalidReason
            | InvalidLimit
            | InvalidState { .. }
            | TooManyEvents
            | InvalidEvent { .. }
            | EventFieldTooLong { .. }
            | EventIdOutOfRange { .. }
            | RackRequired => StatusCode::BAD_REQUEST,
            NoSuchMachine { .. } | NoSuchRack { .. } => StatusCode::NOT_FOUND,
            MacTaken { .. }
            | NoRack { .. }
            | NoPowerDriver { .. }
            | NoDeployEnv
            | NoDeployableImage { .. }
            | Illegal { .. } => StatusCode::CONFLICT,
            Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::from_domain(status, &error)
    }
}

impl From<CatalogueError> for ApiError {
    fn from(error: CatalogueError) -> ApiError {
        use CatalogueError::*;
        let status = match &error {
            NotAdmin => StatusCode::FORBIDDEN,
            InvalidImage { .. }
            | InvalidManifest { .. }
            | UploadInterrupted { .. }
            | MalformedFrame { .. }
            | BatchTruncated { .. }
            | ChunkNotInManifest { .. }
            | ChunkDamagedInTransit { .. }
            | ChunkPayloadInvalid { .. }
            | InvalidHash { .. }
            | InvalidWants { .. }
            | NoWants => StatusCode::BAD_REQUEST,
            VersionConflict { .. }
            | ChunksMissing { .. }
            | ChunkDamagedOnDisk { .. }
            | FileHashMismatch { .. }
            | FileConflict => StatusCode::CONFLICT,
            NoSuchUpload { .. } | NoSuchVersion { .. } | NoSuchManifest { .. } | NoSuchChunk { .. } | RackGone => {
                StatusCode::NOT_FOUND
            }
            BodyIdle => StatusCode::REQUEST_TIMEOUT,
            BatchTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UploadsFull | ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            WriteManifest { .. }
            | ReadManifest { .. }
            | ManifestDamaged { .. }
            | StoreChunk { .. }
            | CheckChunks { .. }
            | CollectGarbage { .. }
            | CollectChunks { .. }
            | EncodeDelta { .. }
            | Task { .. }
            | Machines { .. }
            | Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        // A client error whose cause is the client's own input says what was wrong with it.
        let mut api = ApiError::from_domain(status, &error);
        if status.is_client_error() {
            if let Some(source) = std::error::Error::source(&error) {
                api.body.error = format!("{}: {source}", api.body.error);
            }
        }
        api
    }
}
