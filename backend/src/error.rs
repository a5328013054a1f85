//! The backend's error types; the policy they follow is at the top of [`crate`].
//!
//! - [`ApiError`]: a request's failure: an HTTP status, a stable machine-readable code and a
//!   message for people. Every failure leaves the backend as `{"error","message","request_id","correlation_id"}`.
//! - [`Unavailable`]: a Redis call failed or missed its deadline; a request answers `503`.
//! - [`StartError`]: the backend cannot be built from the settings it was given.
//! - [`UsersError`]: the users file is unusable; the message names the file and line.
//! - [`HashError`]: argon2id could not hash a password.

use http::{HeaderValue, Response, StatusCode, header};

use serde::Serialize;

use crate::http_util::{Body, json_response};

/// The body of every error response (the proxy's own errors have the same shape).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    /// A stable code for programs, e.g. `invalid_token`, `forbidden`, `conflict`.
    #[schema(example = "invalid_token")]
    pub error: &'a str,
    /// For people; names the offending field when a body is refused.
    #[schema(example = "the bearer token is not valid: ExpiredSignature")]
    pub message: &'a str,
    /// The request's `X-Request-ID`, to find it in the logs.
    pub request_id: &'a str,
    /// The `X-Correlation-ID` that ties this request to others of the same transaction: a
    /// trusted proxy's in front of the edge, or the request id.
    pub correlation_id: &'a str,
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra headers the status calls for (`WWW-Authenticate`, `Retry-After`, `Allow`).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(self, name: header::HeaderName, value: &'static str) -> Self {
        self.with_header_value(name, HeaderValue::from_static(value))
    }

    pub fn with_header_value(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// A missing or unacceptable bearer token. RFC 6750 asks for the challenge header.
    pub fn invalid_token(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_token", message)
            .with_header(header::WWW_AUTHENTICATE, "Bearer")
    }

    /// A valid token whose user may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// Our own fault; the details go to the log, not to the client.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    /// Redis is unreachable: say so and when to come back, never guess an answer. Every
    /// endpoint that checks a token needs Redis (live tokens, the user's state), so they all
    /// fail closed with this.
    pub fn store_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the shared store (Redis) is unavailable; try again shortly",
        )
        .with_header(header::RETRY_AFTER, "1")
    }

    /// Too many passwords being checked at once on this backend.
    pub fn busy() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many sign-ins are being checked; try again shortly",
        )
        .with_header(header::RETRY_AFTER, "1")
    }

    pub fn into_response(self, request_id: &str, correlation_id: &str) -> Response<Body> {
        let body = ErrorBody {
            error: self.code,
            message: &self.message,
            request_id,
            correlation_id,
        };
        let mut response = json_response(self.status, &body);
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// A Redis call failed or missed its deadline. It carries nothing: the store logs the cause
/// once per outage, and every request it fails answers the same `503`.
#[derive(Debug)]
pub struct Unavailable;

impl From<Unavailable> for ApiError {
    fn from(_: Unavailable) -> Self {
        ApiError::store_unavailable()
    }
}

/// Why [`crate::App::new`] (or one of the parts it is built from) refused its settings. The
/// caller names the setting at fault and stops; nothing here is logged.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the JWT secret is {bytes} bytes; at least {min} are required")]
    ShortSecret { bytes: usize, min: usize },
    #[error("invalid Redis URL: {0}")]
    RedisUrl(redis::RedisError),
    #[error("cannot set up the Redis connection: {0}")]
    RedisSetup(redis::RedisError),
    #[error("backend id {0:?} is not a valid header value")]
    Id(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Hash(#[from] HashError),
    #[error("cannot open the audit file {}: {error}", path.display())]
    AuditFile {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
}

/// The users file cannot be used: the message starts with the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsersError(pub String);

impl From<HashError> for UsersError {
    fn from(error: HashError) -> Self {
        UsersError(error.to_string())
    }
}

/// argon2id refused to hash: only a broken parameter set or a failed random source does.
#[derive(Debug, thiserror::Error)]
#[error("cannot hash password: {0}")]
pub struct HashError(pub(crate) argon2::password_hash::Error);
