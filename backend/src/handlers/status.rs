//! `GET /api/status`, for admins: the group's health as the proxy's admin listener sees it
//! (backends in rotation, requests answered so far) and Redis as this backend sees it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    app::App,
    http_util::{Body, json_response},
};

/// How long the admin listener may take; the answer says `null` past it.
const ADMIN_DEADLINE: Duration = Duration::from_secs(2);
/// The most of the admin listener's answer read.
const MAX_ANSWER: usize = 64 * 1024;

/// The group's health now.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupStatus {
    /// `null` when the admin listener is off or did not answer.
    pub backends: Option<Backends>,
    /// `up` or `down`: whether this backend's Redis answers.
    #[schema(example = "up")]
    pub redis: &'static str,
    /// Requests the proxy answered since it started; two polls give requests per second.
    /// `null` as for `backends`.
    pub requests_total: Option<u64>,
    /// When this was read (Unix milliseconds).
    pub time_ms: u64,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct Backends {
    /// Backends the proxy's health checks have in rotation.
    pub in_rotation: u64,
    pub total: u64,
}

/// What the admin listener's `/status` says.
#[derive(Deserialize)]
struct AdminStatus {
    backends: Backends,
    requests_total: u64,
}

/// The group's health: backends in rotation, Redis, requests answered so far.
#[utoipa::path(
    get,
    path = "/api/status",
    tag = "service",
    operation_id = "status",
    responses((status = 200, description = "The group's health.", body = GroupStatus))
)]
pub(crate) async fn status(app: &App) -> Response<Body> {
    let (redis_up, admin) = tokio::join!(app.store.ping(), admin_status(app));
    let time_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let (backends, requests_total) = match admin {
        Some(admin) => (Some(admin.backends), Some(admin.requests_total)),
        None => (None, None),
    };
    json_response(
        StatusCode::OK,
        &GroupStatus {
            backends,
            redis: if redis_up { "up" } else { "down" },
            requests_total,
            time_ms,
        },
    )
}

/// `GET /status` on the admin listener, within [`ADMIN_DEADLINE`]. The answer is read up to
/// its `Content-Length`: the listener keeps the connection open after it.
async fn admin_status(app: &App) -> Option<AdminStatus> {
    let address = app.admin_address?;
    let ask = async {
        let mut stream = TcpStream::connect(address).await.ok()?;
        stream
            .write_all(b"GET /status HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::with_capacity(512);
        let mut chunk = [0u8; 4096];
        loop {
            let read = stream.read(&mut chunk).await.ok()?;
            if read == 0 || answer.len() + read > MAX_ANSWER {
                return None;
            }
            answer.extend_from_slice(&chunk[..read]);
            let Some(end) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = std::str::from_utf8(&answer[..end]).ok()?;
            if !head.starts_with("HTTP/1.1 200") {
                return None;
            }
            let length: usize = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())
                    .flatten()
            })?;
            let body = &answer[end + 4..];
            if body.len() >= length {
                return serde_json::from_slice(&body[..length]).ok();
            }
        }
    };
    tokio::time::timeout(ADMIN_DEADLINE, ask)
        .await
        .ok()
        .flatten()
}
