//! `GET /api/count`: the visit counter every backend process and replica shares.
//!
//! The busiest protected route, so its visit is counted in the same Redis round trip as its
//! token check ([`crate::accounts::Accounts::session_counting_visit`]), before this runs.

use http::{Response, StatusCode};
use serde::Serialize;

use crate::{
    error::ApiError,
    http_util::{Body, json_response},
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
