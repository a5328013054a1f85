//! `POST /auth/login`: a user name and password exchanged for a token, behind the brute-force
//! guard ([`crate::guard`]).

use http::{HeaderValue, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::read_json;
use crate::{
    app::App,
    connection::RequestBody,
    dispatch::Context,
    error::ApiError,
    http_util::{Body, json_response},
    metrics::Login,
    users::valid_name,
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
    context: &Context<'_>,
    user_header: &mut Option<HeaderValue>,
) -> Result<Response<Body>, ApiError> {
    let request_id = context.request_id;
    let client = context.client;
    // The name tried, for the audit log: only a name a user could have.
    let mut tried = None;
    let result = async {
        let LoginRequest { username, password } = read_json(app, request).await?;
        tried = valid_name(&username).then(|| username.clone());
        app.guard.charge(&username, client).await?;
        let refused = || {
            // Only a name a user could have: client bytes (or a password typed into the name
            // field) never reach the log.
            let user = if valid_name(&username) {
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
        let Some(revoked) = app.accounts.open_session(&user, &mut claims).await? else {
            return Err(refused());
        };
        if revoked > 0 {
            let target = Some(username.as_str());
            let detail = format!("{revoked} oldest past backend.max_tokens_per_user");
            let mut event = context.event("tokens.revoked", target, target, "success");
            event.detail = Some(&detail);
            app.audit.record(event).await;
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
    let outcome = match &result {
        Ok(_) => Login::Success,
        Err(e) if e.status == StatusCode::UNAUTHORIZED => Login::Refused,
        Err(e) if e.status == StatusCode::TOO_MANY_REQUESTS => Login::Throttled,
        Err(_) => Login::Error,
    };
    app.metrics.login(outcome);
    let tried = tried.as_deref();
    match outcome {
        Login::Success => {
            let event = context.event("login.succeeded", tried, tried, "success");
            app.audit.record(event).await;
        }
        Login::Refused => {
            let event = context.event(
                "login.failed",
                None,
                Some(tried.unwrap_or("<invalid>")),
                "failure",
            );
            app.audit.record(event).await;
        }
        Login::Throttled => {
            let event = context.event(
                "login.throttled",
                None,
                Some(tried.unwrap_or("<invalid>")),
                "denied",
            );
            app.audit.record_refusal(event).await;
        }
        Login::Error => {}
    }
    result
}
