//! `GET /api/audit`, for admins: the audit log's newest events, a page at a time.

use http::{Response, StatusCode};
use serde::Serialize;

use crate::{
    app::App,
    audit::{MAX_PAGE, valid_stream_id},
    error::ApiError,
    http_util::{Body, json_response},
};

const DEFAULT_PAGE: usize = 50;

/// A page of events, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AuditPage {
    /// Each with `id`, `time` (RFC 3339, UTC), `event`, `actor`, `client`, `request_id`,
    /// `correlation_id`, `target`, `outcome`, `detail` and `source` (the process that wrote
    /// it).
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<serde_json::Value>,
    /// Pass as `before` for the next (older) page; `null` when this one is the last.
    pub next_before: Option<String>,
}

/// The audit log, newest first.
#[utoipa::path(
    get,
    path = "/api/audit",
    tag = "audit",
    operation_id = "audit",
    params(
        ("limit" = Option<usize>, Query, description = "Events per page, 1 to 500; default 50.",
            minimum = 1, maximum = 500),
        ("before" = Option<String>, Query, description = "Only events older than this id \
            (the `next_before` of the page before).", pattern = "^[0-9]{1,19}-[0-9]{1,19}$"),
    ),
    responses(
        (status = 200, description = "A page of events.", body = AuditPage),
        (status = 400, description = "A bad `limit` or `before`.", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn list(app: &App, query: Option<&str>) -> Result<Response<Body>, ApiError> {
    let mut limit = DEFAULT_PAGE;
    let mut before = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match name.as_ref() {
            "limit" => {
                limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("limit: must be 1 to {MAX_PAGE}"))
                    })?;
            }
            "before" => {
                if !valid_stream_id(&value) {
                    return Err(ApiError::bad_request(
                        "before: must be an event id (`next_before` of a page)",
                    ));
                }
                before = Some(value.into_owned());
            }
            _ => {}
        }
    }
    let (events, next_before) = app.audit.page(limit, before.as_deref()).await?;
    Ok(json_response(
        StatusCode::OK,
        &AuditPage {
            events,
            next_before,
        },
    ))
}
