//! `GET /api/count`: the visit counter every backend process and replica shares; `DELETE
//! /api/count` (maintainers) sets it back to zero. And `GET /api/hello`.
//!
//! The busiest protected route, so its visit is counted in the same Redis round trip as its
//! token check ([`crate::accounts::Accounts::session_counting_visit`]), before this runs.

use http::{Response, StatusCode};
use serde::Serialize;

use crate::{
    accounts::Session,
    app::App,
    dispatch::Context,
    error::ApiError,
    http_util::{Body, json_response, no_content},
};

/// `{"visits":N}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Visits {
    /// Visits counted so far by every backend of every replica.
    #[schema(example = 42)]
    pub visits: i64,
}

/// Counts a visit in Redis, shared by every backend process and replica.
#[utoipa::path(
    get,
    path = "/api/count",
    tag = "service",
    operation_id = "count",
    responses((status = 200, description = "The count after this visit.", body = Visits))
)]
pub(crate) fn count(visits: Option<i64>) -> Result<Response<Body>, ApiError> {
    // Counted already, with the token check; the doc comment above is the OpenAPI summary, so
    // it says what a client sees.
    let visits = visits.ok_or_else(|| ApiError::internal("the visit was not counted"))?;
    Ok(json_response(StatusCode::OK, &Visits { visits }))
}

/// `{"message": "Hello, NAME!"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Hello {
    #[schema(example = "Hello, alice!")]
    pub message: String,
}

/// A greeting for the caller.
#[utoipa::path(
    get,
    path = "/api/hello",
    tag = "service",
    operation_id = "hello",
    responses((status = 200, description = "A greeting.", body = Hello))
)]
pub(crate) fn hello(session: &Session) -> Response<Body> {
    let message = format!("Hello, {}!", session.actor);
    json_response(StatusCode::OK, &Hello { message })
}

/// Sets the count back to zero, for every backend and replica.
#[utoipa::path(
    delete,
    path = "/api/count",
    tag = "service",
    operation_id = "reset_count",
    responses((status = 204, description = "The count is zero."))
)]
pub(crate) async fn reset(
    app: &App,
    session: &Session,
    context: &Context<'_>,
) -> Result<Response<Body>, ApiError> {
    let before = app.accounts.reset_visits().await?.to_string();
    let mut event = context.event("count.reset", Some(&session.actor), None, "success");
    event.detail = Some(&before);
    app.audit.record(event).await;
    Ok(no_content())
}
