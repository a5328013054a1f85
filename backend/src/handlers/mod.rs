//! The handlers, one file per group of endpoints, each with its own request and response
//! types and its `#[utoipa::path]` (the OpenAPI operation). [`crate::routes`] says who may call
//! each; [`crate::dispatch`] has checked that before a handler runs.
//!
//! - [`ping`], [`health`]: liveness for clients, and the proxy's health check.
//! - [`login`]: a user name and password exchanged for a token, behind the brute-force guard.
//! - [`tokens`]: logout and `/auth/verify`.
//! - [`users`]: `/api/me`, and the admin-only user management.
//! - [`count`]: the shared visit counter, and a hello.
//! - [`api_keys`]: API keys, for admins.
//! - [`audit`]: the audit log, for admins.
//! - [`status`]: the group's health, for admins.

pub mod api_keys;
pub mod audit;
pub mod count;
pub mod health;
pub mod login;
pub mod ping;
pub mod status;
pub mod tokens;
pub mod users;

use std::net::IpAddr;

use http::{StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde::de::DeserializeOwned;

use crate::{app::App, connection::RequestBody, error::ApiError, metrics::ConnectionLimit};

/// Reads a JSON body of at most `app.max_body_bytes`, insisting on `Content-Type:
/// application/json`, within `app.body_timeout` (like nginx's `client_body_timeout`, but for
/// the whole body: the proxy streams a body as it comes, and its own deadline and its read
/// deadline on the backend each restart with every chunk, so a body sent a byte at a time
/// would otherwise hold a backend connection for as long as the client likes).
pub async fn read_json<T: DeserializeOwned>(
    app: &App,
    request: http::Request<RequestBody>,
) -> Result<T, ApiError> {
    let max_bytes = app.max_body_bytes;
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = content_type.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the request body must be JSON (Content-Type: application/json)",
        ));
    }
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {max_bytes} bytes"),
        )
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > max_bytes as u64) {
        return Err(too_large());
    }
    let reading = Limited::new(request.into_body(), max_bytes).collect();
    let Ok(read) = tokio::time::timeout(app.body_timeout, reading).await else {
        app.metrics.connection_limit(ConnectionLimit::BodyTimeout);
        return Err(body_timeout(app.body_timeout));
    };
    let bytes = read
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            }
        })?
        .to_bytes();
    // The path names the field at fault (`role: unknown variant ...`), which serde_json's own
    // message does not.
    let mut json = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut json).map_err(|e| {
        let path = e.path().to_string();
        match path.as_str() {
            "." => ApiError::bad_request(format!("invalid JSON body: {}", e.inner())),
            _ => ApiError::bad_request(format!("{path}: {}", e.inner())),
        }
    })?;
    json.end()
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// `408`, and the connection closed after it: the rest of the body may still be coming, and
/// nothing after it on this connection could be read as a request.
fn body_timeout(limit: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "request_timeout",
        format!(
            "the request body did not arrive within {} ms",
            limit.as_millis()
        ),
    )
    .with_header(header::CONNECTION, "close")
}

/// The client as the proxy saw it: the proxy replaces any `X-Real-IP` a client sends, and
/// only the proxy reaches the backend's socket.
pub(crate) fn client_address<B>(request: &http::Request<B>) -> Option<IpAddr> {
    request
        .headers()
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}
