//! A token's life: log in (guarded against brute force), check it, see who it belongs to, and
//! log out (which revokes it everywhere).

use std::net::IpAddr;

use crate::connection::RequestBody;
use http::{HeaderValue, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::{
    App,
    accounts::{Session, User},
    error::ApiError,
    http_util::{Body, json_response, no_content, read_json},
    token::Claims,
};

/// `POST /auth/login`.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct LoginRequest {
    #[schema(example = "admin")]
    pub username: String,
    #[schema(format = Password, example = "password")]
    pub password: String,
}

/// A new token.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenResponse {
    /// An HS256 JWT; send it as `Authorization: Bearer <token>`.
    pub token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the token expires.
    #[schema(example = 3600)]
    pub expires_in: u64,
}

/// Exchanges a user name and password for a token.
///
/// Repeated failures for one user name from one client, from one client for any names, or
/// for one user name from many clients are refused with `429` for a while (`Retry-After`);
/// failures from other clients do not lock a user out of an address it has logged in from.
#[utoipa::path(
    post,
    path = "/auth/login",
    tag = "tokens",
    operation_id = "login",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Logged in.", body = TokenResponse),
        (status = 401, description = "Wrong user name or password, or the user is disabled.",
            body = crate::error::ErrorBody),
        (status = 429, description = "Too many failed logins for this user or from this client.",
            body = crate::error::ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait."))),
    )
)]
pub(crate) async fn login(
    app: &App,
    request: Request<RequestBody>,
    request_id: &str,
    user_header: &mut Option<HeaderValue>,
) -> Result<Response<Body>, ApiError> {
    let client = client_address(&request);
    let result = async {
        let LoginRequest { username, password } = read_json(app, request).await?;
        app.guard.charge(&username, client).await?;
        let refused = || {
            // Only a name a user could have: client bytes (or a password typed into the name
            // field) never reach the log.
            let user = if crate::users::valid_name(&username) {
                username.as_str()
            } else {
                "<invalid>"
            };
            tracing::info!(user, request_id, "login refused");
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "wrong user name or password",
            )
        };
        let checked = match app.accounts.check_password(&username, password).await {
            Ok(checked) => checked,
            Err(error) => {
                // No verdict reached the client, so the attempt is not a failure. (If Redis is
                // what failed, this fails too, and the charge lapses with its window.)
                let _ = app.guard.refund(&username, client).await;
                return Err(error);
            }
        };
        let Some(user) = checked else {
            return Err(refused());
        };
        app.guard.success(&username, client).await?;
        let mut claims = app.tokens.claims(&username, user.role);
        // The user may have been changed or disabled while its password was being checked.
        if !app.accounts.open_session(&user, &mut claims).await? {
            return Err(refused());
        }
        let token = app.tokens.sign(&claims).map_err(|e| {
            tracing::error!(error = %e, request_id, "cannot sign a token");
            ApiError::internal("cannot issue a token")
        })?;
        *user_header = HeaderValue::from_str(&username).ok();
        Ok(json_response(
            StatusCode::OK,
            &TokenResponse {
                token,
                token_type: "Bearer",
                expires_in: app.tokens.ttl_seconds(),
            },
        ))
    }
    .await;
    app.metrics.login(match &result {
        Ok(_) => crate::metrics::Login::Success,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => crate::metrics::Login::Refused,
        Err(e) if e.status == StatusCode::TOO_MANY_REQUESTS => crate::metrics::Login::Throttled,
        Err(_) => crate::metrics::Login::Error,
    });
    result
}

/// The client as the proxy saw it: the proxy replaces any `X-Real-IP` a client sends, and
/// only the proxy reaches the backend's socket.
fn client_address<B>(request: &Request<B>) -> Option<IpAddr> {
    request
        .headers()
        .get("x-real-ip")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

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

/// The user the token belongs to, as it is now.
#[utoipa::path(
    get,
    path = "/api/me",
    tag = "users",
    operation_id = "me",
    responses((status = 200, description = "The current user.", body = User))
)]
pub(crate) fn me(session: &Session) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &User {
            username: session.claims.sub.clone(),
            role: session.role,
            // `session` exists only for an active user.
            active: true,
        },
    )
}
