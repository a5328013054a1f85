//! A credential once checked: `POST /auth/logout` revokes a token everywhere, `GET
//! /auth/verify` shows who the caller is.

use http::{Response, StatusCode};
use serde::Serialize;

use crate::{
    accounts::{Credential, Session},
    app::App,
    dispatch::Context,
    error::ApiError,
    http_util::{Body, json_response, no_content},
    role::Role,
    token::Claims,
};

/// Revokes the token: from now on every backend of every replica refuses it with `401`.
/// Only a token can be logged out: an API key is revoked with `DELETE /api/keys/{id}`.
#[utoipa::path(
    post,
    path = "/auth/logout",
    tag = "tokens",
    operation_id = "logout",
    responses(
        (status = 204, description = "The token is revoked."),
        (status = 400, description = "The credential is not a token.",
            body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn logout(
    app: &App,
    session: &Session,
    context: &Context<'_>,
) -> Result<Response<Body>, ApiError> {
    let Credential::Token(claims) = &session.credential else {
        return Err(ApiError::bad_request(
            "logout ends a token; an API key is revoked with DELETE /api/keys/{id}, and a \
             client certificate is not signed out",
        ));
    };
    app.accounts.revoke(claims).await?;
    let actor = Some(session.actor.as_str());
    app.audit
        .record(context.event("logout", actor, actor, "success"))
        .await;
    Ok(no_content())
}

/// Who a valid credential belongs to: a token's claims, or for an API key or a client
/// certificate, its name (`key:NAME` for a key), role and kind.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Verified<'a> {
    Token(&'a Claims),
    Other(Identity<'a>),
}

/// A caller signed in without a token.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Identity<'a> {
    #[schema(example = "key:deploy-bot")]
    pub sub: &'a str,
    pub role: Role,
    /// `api_key` or `client_certificate`.
    #[schema(example = "api_key")]
    pub via: &'static str,
}

/// Who the credential belongs to.
#[utoipa::path(
    get,
    path = "/auth/verify",
    tag = "tokens",
    operation_id = "verify",
    responses((status = 200, description = "The credential is valid: a token's claims, or an \
        API key's or client certificate's identity.", body = Verified))
)]
pub(crate) fn verify(session: &Session) -> Response<Body> {
    let verified = match &session.credential {
        Credential::Token(claims) => Verified::Token(claims),
        Credential::ApiKey { .. } => Verified::Other(Identity {
            sub: &session.actor,
            role: session.role,
            via: "api_key",
        }),
        Credential::Certificate => Verified::Other(Identity {
            sub: &session.actor,
            role: session.role,
            via: "client_certificate",
        }),
    };
    json_response(StatusCode::OK, &verified)
}
