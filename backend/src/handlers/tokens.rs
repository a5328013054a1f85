//! A token once issued: `POST /auth/logout` revokes it everywhere, `GET /auth/verify` shows
//! its claims.

use http::{Response, StatusCode};

use crate::{
    accounts::Session,
    app::App,
    error::ApiError,
    http_util::{Body, json_response, no_content},
    token::Claims,
};

/// Revokes the token: from now on every backend of every replica refuses it with `401`.
#[utoipa::path(
    post,
    path = "/auth/logout",
    tag = "tokens",
    operation_id = "logout",
    responses((status = 204, description = "The token is revoked."))
)]
pub(crate) async fn logout(app: &App, session: &Session) -> Result<Response<Body>, ApiError> {
    app.accounts.revoke(&session.claims).await?;
    Ok(no_content())
}

/// The claims of a valid token.
#[utoipa::path(
    get,
    path = "/auth/verify",
    tag = "tokens",
    operation_id = "verify",
    responses((status = 200, description = "The token is valid; its claims.", body = Claims))
)]
pub(crate) fn verify(session: &Session) -> Response<Body> {
    json_response(StatusCode::OK, &session.claims)
}
