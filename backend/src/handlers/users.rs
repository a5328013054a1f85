//! The users: `GET /api/me` for any user, and the management of users, for admins only (the
//! route table sees to that): list, create, change and delete. Each change is logged with the
//! admin who made it, never with a password.

use http::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::read_json;
use crate::{
    accounts::{Session, User},
    app::App,
    connection::RequestBody,
    dispatch::Context,
    error::ApiError,
    http_util::{Body, json_response, no_content},
    role::Role,
};

/// `POST /api/users`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "alice")]
    pub username: String,
    #[schema(min_length = 8, max_length = 256, format = Password, example = "correct horse battery")]
    pub password: String,
    pub role: Role,
    /// Default `true`.
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// `PUT /api/users/{name}`: the fields to change, at least one. Any change ends the user's
/// tokens: a new role, password or state takes effect at once.
///
/// A field is absent or has a value: `null` is refused, as the schema says, rather than read
/// as "unchanged".
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct UserChange {
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false)]
    pub role: Option<Role>,
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, min_length = 8, max_length = 256, format = Password)]
    pub password: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false)]
    pub active: Option<bool>,
}

fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    value: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(value).map(Some)
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
            username: session.actor.clone(),
            role: session.role,
            // `session` exists only for an active user.
            active: true,
        },
    )
}

/// `GET /api/users`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct UserList {
    /// Sorted by name.
    pub users: Vec<User>,
}

/// Lists every user.
#[utoipa::path(
    get,
    path = "/api/users",
    tag = "users",
    operation_id = "list_users",
    responses((status = 200, description = "Every user.", body = UserList))
)]
pub(crate) async fn list(app: &App) -> Result<Response<Body>, ApiError> {
    let users = app.accounts.list().await?;
    Ok(json_response(StatusCode::OK, &UserList { users }))
}

/// Creates a user.
#[utoipa::path(
    post,
    path = "/api/users",
    tag = "users",
    operation_id = "create_user",
    request_body = NewUser,
    responses(
        (status = 201, description = "Created.", body = User),
        (status = 409, description = "A user with this name exists.",
            body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn create(
    app: &App,
    admin: &Session,
    request: Request<RequestBody>,
    context: &Context<'_>,
) -> Result<Response<Body>, ApiError> {
    let NewUser {
        username,
        password,
        role,
        active,
    } = read_json(app, request).await?;
    let new = User {
        username,
        role,
        active,
    };
    let user = app
        .accounts
        .create(new, password, &admin.generation)
        .await?;
    tracing::info!(admin = %admin.actor, user = %user.username, role = user.role.as_str(),
        "user created");
    let mut event = context.event(
        "user.created",
        Some(&admin.actor),
        Some(&user.username),
        "success",
    );
    event.detail = Some(user.role.as_str());
    app.audit.record(event).await;
    Ok(json_response(StatusCode::CREATED, &user))
}

/// Changes a user's role, password or state. Any change revokes the user's tokens.
#[utoipa::path(
    put,
    path = "/api/users/{name}",
    tag = "users",
    operation_id = "update_user",
    params(("name" = String, Path, description = "The user name.", example = "alice",
        pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    request_body = UserChange,
    responses(
        (status = 200, description = "The user as changed.", body = User),
        (status = 404, description = "No such user.", body = crate::error::ErrorBody),
        (status = 409, description = "The change would leave no active admin.",
            body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn update(
    app: &App,
    admin: &Session,
    name: &str,
    request: Request<RequestBody>,
    context: &Context<'_>,
) -> Result<Response<Body>, ApiError> {
    let UserChange {
        role,
        password,
        active,
    } = read_json(app, request).await?;
    let fields: Vec<&str> = [
        role.map(|_| "role"),
        password.as_ref().map(|_| "password"),
        active.map(|_| "active"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let user = app
        .accounts
        .update(name, role, password, active, &admin.generation)
        .await?;
    tracing::info!(admin = %admin.actor, user = %user.username, changed = ?fields,
        "user changed");
    // Disabling is its own event, so it can be searched for; either way the user's tokens
    // were revoked.
    let kind = if active == Some(false) {
        "user.disabled"
    } else {
        "user.changed"
    };
    let changed = fields.join(",");
    let actor = Some(admin.actor.as_str());
    let mut event = context.event(kind, actor, Some(name), "success");
    event.detail = Some(&changed);
    app.audit.record(event).await;
    let event = context.event("tokens.revoked", actor, Some(name), "success");
    app.audit.record(event).await;
    Ok(json_response(StatusCode::OK, &user))
}

/// Deletes a user and revokes its tokens.
#[utoipa::path(
    delete,
    path = "/api/users/{name}",
    tag = "users",
    operation_id = "delete_user",
    params(("name" = String, Path, description = "The user name.", example = "alice",
        pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 404, description = "No such user.", body = crate::error::ErrorBody),
        (status = 409, description = "The user is the last active admin.",
            body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn delete(
    app: &App,
    admin: &Session,
    name: &str,
    context: &Context<'_>,
) -> Result<Response<Body>, ApiError> {
    app.accounts.delete(name, &admin.generation).await?;
    tracing::info!(admin = %admin.actor, user = name, "user deleted");
    let actor = Some(admin.actor.as_str());
    app.audit
        .record(context.event("user.deleted", actor, Some(name), "success"))
        .await;
    app.audit
        .record(context.event("tokens.revoked", actor, Some(name), "success"))
        .await;
    Ok(no_content())
}
