//! `GET /api/ping`: liveness, without touching Redis.

use http::{Response, StatusCode};
use serde::Serialize;

use crate::http_util::{Body, static_json};

/// `{"status":"ok"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Status {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Written out once: the ping path serializes nothing. A test checks it against [`Status`].
const PING_BODY: &[u8] = br#"{"status":"ok"}"#;

/// Liveness: answers without touching Redis.
#[utoipa::path(
    get,
    path = "/api/ping",
    tag = "service",
    operation_id = "ping",
    responses((status = 200, description = "The backend is up.", body = Status))
)]
pub(crate) fn ping() -> Response<Body> {
    static_json(StatusCode::OK, PING_BODY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_body_is_the_documented_status() {
        let body = serde_json::to_vec(&Status { status: "ok" }).unwrap();
        assert_eq!(body, PING_BODY);
    }
}
