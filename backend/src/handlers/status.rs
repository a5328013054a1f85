//! `GET /api/status`, for admins: the group's health as the proxy's admin listener sees it
//! (backends in rotation, requests answered so far) and Redis as this backend sees it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{
    app::App,
    http_util::{Body, json_response},
};
use http::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

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

/// `GET /status` on the admin listener (hyper's client, one connection), its answer read up
/// to [`MAX_ANSWER`], all within [`ADMIN_DEADLINE`].
async fn admin_status(app: &App) -> Option<AdminStatus> {
    use http_body_util::{BodyExt, Empty, Limited};
    let address = app.admin_address?;
    let ask = async {
        let stream = TcpStream::connect(address).await.ok()?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(connection);
        let request = http::Request::get("/status")
            .header(http::header::HOST, "admin")
            .body(Empty::<bytes::Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        if response.status() != StatusCode::OK {
            return None;
        }
        let body = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .ok()?
            .to_bytes();
        serde_json::from_slice(&body).ok()
    };
    tokio::time::timeout(ADMIN_DEADLINE, ask)
        .await
        .ok()
        .flatten()
}
