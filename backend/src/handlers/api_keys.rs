//! API keys, for admins: make one (shown once), list them, revoke one
//! ([`crate::api_keys`] keeps them).

use http::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::read_json;
use crate::{
    accounts::Session,
    api_keys::{KeyInfo, NewKey},
    app::App,
    connection::RequestBody,
    dispatch::Context,
    error::ApiError,
    http_util::{Body, json_response, no_content},
    role::Role,
};

/// `POST /api/keys`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// Unique among the keys; the access log shows requests made with it as `key:NAME`.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "deploy-bot")]
    pub name: String,
    /// What the key may do, as for a user.
    pub role: Role,
}

/// `GET /api/keys`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct KeyList {
    /// Oldest first.
    pub keys: Vec<KeyInfo>,
}

/// Makes an API key. The answer holds the key, this once: only its hash is kept.
#[utoipa::path(
    post,
    path = "/api/keys",
    tag = "keys",
    operation_id = "create_key",
    request_body = KeyRequest,
    responses(
        (status = 201, description = "Made; send the key as `X-API-Key`.", body = NewKey),
        (status = 409, description = "A key with this name exists, or there are too many.",
            body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn create(
    app: &App,
    admin: &Session,
    request: Request<RequestBody>,
    context: &Context<'_>,
) -> Result<Response<Body>, ApiError> {
    let KeyRequest { name, role } = read_json(app, request).await?;
    let key = app
        .api_keys
        .create(&name, role, &admin.generation, &admin.actor)
        .await?;
    tracing::info!(admin = %admin.actor, key = %key.name, id = %key.id, role = role.as_str(),
        "API key created");
    let target = format!("key:{}", key.name);
    let mut event = context.event("key.created", Some(&admin.actor), Some(&target), "success");
    event.detail = Some(role.as_str());
    app.audit.record(event).await;
    Ok(json_response(StatusCode::CREATED, &key))
}

/// Lists the API keys, never the keys themselves.
#[utoipa::path(
    get,
    path = "/api/keys",
    tag = "keys",
    operation_id = "list_keys",
    responses((status = 200, description = "Every key.", body = KeyList))
)]
pub(crate) async fn list(app: &App) -> Result<Response<Body>, ApiError> {
    let keys = app.api_keys.list().await?;
    Ok(json_response(StatusCode::OK, &KeyList { keys }))
}

/// Revokes an API key: every backend of every replica refuses it from the next request.
#[utoipa::path(
    delete,
    path = "/api/keys/{id}",
    tag = "keys",
    operation_id = "revoke_key",
    params(("id" = String, Path, description = "The key's id.", example = "3f9a0c2e7b1d4e58",
        pattern = "^[0-9a-f]{16}$")),
    responses(
        (status = 204, description = "Revoked."),
        (status = 404, description = "No such key.", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn revoke(
    app: &App,
    admin: &Session,
    id: &str,
    context: &Context<'_>,
) -> Result<Response<Body>, ApiError> {
    let name = app.api_keys.revoke(id).await?;
    let name = if name.is_empty() { id } else { &name };
    tracing::info!(admin = %admin.actor, key = %name, id, "API key revoked");
    let target = format!("key:{name}");
    app.audit
        .record(context.event("key.revoked", Some(&admin.actor), Some(&target), "success"))
        .await;
    Ok(no_content())
}
