//! User management, for admins only (the route table sees to that): list, create, change and
//! delete users. Each change is logged with the admin who made it, never with a password.

use crate::connection::RequestBody;
use http::{Request, Response, StatusCode};
use serde::Serialize;

use crate::{
    App,
    accounts::{NewUser, Session, User, UserChange},
    error::ApiError,
    http_util::{Body, json_response, no_content, read_json},
};

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
) -> Result<Response<Body>, ApiError> {
    let new: NewUser = read_json(app, request).await?;
    let user = app.accounts.create(new, &admin.claims.generation).await?;
    tracing::info!(admin = %admin.claims.sub, user = %user.username, role = user.role.as_str(),
        "user created");
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
) -> Result<Response<Body>, ApiError> {
    let change: UserChange = read_json(app, request).await?;
    let fields: Vec<&str> = [
        change.role.map(|_| "role"),
        change.password.as_ref().map(|_| "password"),
        change.active.map(|_| "active"),
    ]
    .into_iter()
    .flatten()
    .collect();
    let user = app
        .accounts
        .update(name, change, &admin.claims.generation)
        .await?;
    tracing::info!(admin = %admin.claims.sub, user = %user.username, changed = ?fields,
        "user changed");
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
) -> Result<Response<Body>, ApiError> {
    app.accounts.delete(name, &admin.claims.generation).await?;
    tracing::info!(admin = %admin.claims.sub, user = name, "user deleted");
    Ok(no_content())
}
