//! The one error type of the backend: an HTTP status, a stable machine-readable code and a
//! message for people. Every failure leaves the backend as `{"error","message","request_id"}`.

use http::{HeaderValue, Response, StatusCode, header};

use crate::http_util::{Body, json_response};

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

    pub fn with_header(mut self, name: header::HeaderName, value: &'static str) -> Self {
        self.headers.push((name, HeaderValue::from_static(value)));
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

    /// Redis is unreachable: say so and when to come back, never guess an answer.
    pub fn store_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the visit counter is unavailable; try again shortly",
        )
        .with_header(header::RETRY_AFTER, "1")
    }

    pub fn into_response(self, request_id: &str) -> Response<Body> {
        let body = serde_json::json!({
            "error": self.code,
            "message": self.message,
            "request_id": request_id,
        });
        let mut response = json_response(self.status, &body);
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}
