//! The backend's endpoints. [`ROUTES`] lists every one with who may call it; [`handle`] finds
//! the request's route, checks its token when the route asks for one (in one place, so no
//! handler can forget), and runs the handler. Each handler returns a value or an
//! [`ApiError`]; one place turns both into a response carrying the request id.
//!
//! The OpenAPI document is built from the same table (see [`crate::openapi`]), and a test
//! checks that the two list the same operations.

use std::{sync::Arc, time::Instant};

use crate::connection::RequestBody;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde::Serialize;

use crate::{
    App,
    accounts::{Role, Session},
    error::ApiError,
    http_util::{Body, json_response, static_json},
    login,
    metrics::Endpoint,
    openapi, user_admin,
};

/// Response header naming the authenticated user, for the proxy's access log; the proxy
/// removes it before the response reaches the client.
pub const USER_HEADER: &str = "x-gatehouse-user";

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    /// A valid bearer token: signed by us, not expired, not revoked, of an active user.
    User,
    /// As `User`, and the user is an admin now.
    Admin,
}

/// What answers an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Ping,
    OpenApi,
    Login,
    Logout,
    Verify,
    Me,
    Count,
    ListUsers,
    CreateUser,
    UpdateUser,
    DeleteUser,
    Health,
}

impl Op {
    fn metric(self) -> Endpoint {
        match self {
            Op::Ping => Endpoint::Ping,
            Op::OpenApi => Endpoint::OpenApi,
            Op::Login => Endpoint::Login,
            Op::Logout => Endpoint::Logout,
            Op::Verify => Endpoint::Verify,
            Op::Me => Endpoint::Me,
            Op::Count => Endpoint::Count,
            Op::ListUsers | Op::CreateUser | Op::UpdateUser | Op::DeleteUser => Endpoint::Users,
            Op::Health => Endpoint::Health,
        }
    }
}

pub struct Route {
    pub method: Method,
    /// `{name}` stands for one path segment.
    pub path: &'static str,
    pub access: Access,
    pub op: Op,
}

const fn route(method: Method, path: &'static str, access: Access, op: Op) -> Route {
    Route {
        method,
        path,
        access,
        op,
    }
}

/// Every endpoint. All but `/healthz` (the proxy's health check, on the backend socket only)
/// are reachable through the proxy and in the OpenAPI document.
pub const ROUTES: &[Route] = &[
    route(Method::GET, "/api/ping", Access::Public, Op::Ping),
    route(
        Method::GET,
        "/api/openapi.json",
        Access::Public,
        Op::OpenApi,
    ),
    route(Method::POST, "/auth/login", Access::Public, Op::Login),
    route(Method::POST, "/auth/logout", Access::User, Op::Logout),
    route(Method::GET, "/auth/verify", Access::User, Op::Verify),
    route(Method::GET, "/api/me", Access::User, Op::Me),
    route(Method::GET, "/api/count", Access::User, Op::Count),
    route(Method::GET, "/api/users", Access::Admin, Op::ListUsers),
    route(Method::POST, "/api/users", Access::Admin, Op::CreateUser),
    route(
        Method::PUT,
        "/api/users/{name}",
        Access::Admin,
        Op::UpdateUser,
    ),
    route(
        Method::DELETE,
        "/api/users/{name}",
        Access::Admin,
        Op::DeleteUser,
    ),
    route(Method::GET, "/healthz", Access::Public, Op::Health),
];

pub async fn handle(app: Arc<App>, request: Request<RequestBody>) -> Response<Body> {
    let started = Instant::now();
    // The proxy always sends an id; a backend reached directly makes one. Kept as the header
    // value, so the success path copies no string.
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(new_request_id);
    let id = request_id.to_str().unwrap_or_default();
    let found = find(request.method(), request.uri().path());
    let endpoint = found
        .as_ref()
        .map_or(Endpoint::Other, |(route, _)| route.op.metric());
    let mut user = None;
    let result = match found {
        Ok((route, name)) => call(&app, route, name, request, id, &mut user).await,
        Err(error) => Err(error),
    };
    let mut response = result.unwrap_or_else(|error| error.into_response(id));
    let seconds = started.elapsed().as_secs_f64();
    app.metrics
        .request(endpoint, response.status().as_u16(), seconds);
    let headers = response.headers_mut();
    headers.insert("x-backend-id", app.id_header.clone());
    headers.insert(REQUEST_ID, request_id);
    if let Some(user) = user {
        headers.insert(USER_HEADER, user);
    }
    response
}

/// The route for `method` and `path`, with the `{name}` segment if it has one; `404` when no
/// route has the path, `405` with `Allow` when none has it with this method.
fn find(method: &Method, path: &str) -> Result<(&'static Route, Option<String>), ApiError> {
    let mut allowed: Vec<&str> = Vec::new();
    for route in ROUTES {
        let Some(name) = matches(route.path, path) else {
            continue;
        };
        if route.method == method {
            return Ok((route, name.map(str::to_owned)));
        }
        allowed.push(route.method.as_str());
    }
    if allowed.is_empty() {
        return Err(ApiError::not_found(format!("no endpoint at {path}")));
    }
    let allow =
        HeaderValue::from_str(&allowed.join(", ")).unwrap_or(HeaderValue::from_static("GET"));
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed here",
    )
    .with_header_value(header::ALLOW, allow))
}

/// `Some(None)` for a plain match, `Some(Some(segment))` for a `{name}` template.
fn matches<'p>(template: &str, path: &'p str) -> Option<Option<&'p str>> {
    match template.strip_suffix("{name}") {
        None => (template == path).then_some(None),
        Some(prefix) => path
            .strip_prefix(prefix)
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .map(Some),
    }
}

async fn call(
    app: &App,
    route: &Route,
    name: Option<String>,
    request: Request<RequestBody>,
    request_id: &str,
    user: &mut Option<HeaderValue>,
) -> Result<Response<Body>, ApiError> {
    let (session, visits) = match route.access {
        Access::Public => (None, None),
        Access::User | Access::Admin => {
            let (session, visits) = authenticate(app, &request, route.op).await?;
            *user = HeaderValue::from_str(&session.claims.sub).ok();
            if route.access == Access::Admin && session.role != Role::Admin {
                return Err(ApiError::forbidden("only an admin may manage users"));
            }
            (Some(session), visits)
        }
    };
    let name = name.as_deref().unwrap_or_default();
    match route.op {
        Op::Ping => Ok(ping()),
        Op::OpenApi => Ok(openapi::response(&app.openapi)),
        Op::Health => Ok(health(app).await),
        Op::Login => login::login(app, request, request_id, user).await,
        Op::Logout => login::logout(app, signed_in(&session)?).await,
        Op::Verify => Ok(login::verify(signed_in(&session)?)),
        Op::Me => Ok(login::me(signed_in(&session)?)),
        Op::Count => count(visits),
        Op::ListUsers => user_admin::list(app).await,
        Op::CreateUser => user_admin::create(app, signed_in(&session)?, request).await,
        Op::UpdateUser => user_admin::update(app, signed_in(&session)?, name, request).await,
        Op::DeleteUser => user_admin::delete(app, signed_in(&session)?, name).await,
    }
}

/// The session of an operation the table protects; its absence would be a bug in the table.
fn signed_in(session: &Option<Session>) -> Result<&Session, ApiError> {
    session
        .as_ref()
        .ok_or_else(|| ApiError::internal("this operation needs a signed-in user"))
}

/// The bearer token's checks, cheapest first: the header, the signature and claims (no I/O),
/// then the generation, the user's live tokens and the user's state in Redis (one round trip;
/// `503` when Redis is down, since a revoked token cannot be told from a good one then).
///
/// `/api/count` is the busiest protected route, so its visit is counted in that same round
/// trip (only if the token passes) and the count comes back with the session.
async fn authenticate<B>(
    app: &App,
    request: &Request<B>,
    op: Op,
) -> Result<(Session, Option<i64>), ApiError> {
    let token = bearer_token(request)?;
    let claims = app
        .tokens
        .verify(token)
        .map_err(|e| ApiError::invalid_token(format!("the bearer token is not valid: {e}")))?;
    if op == Op::Count {
        let (session, visits) = app.accounts.session_counting_visit(claims).await?;
        return Ok((session, Some(visits)));
    }
    Ok((app.accounts.session(claims).await?, None))
}

fn bearer_token<B>(request: &Request<B>) -> Result<&str, ApiError> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| {
            ApiError::invalid_token("an `Authorization: Bearer <token>` header is required")
        })?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::invalid_token("the Authorization header is not ASCII"))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(ApiError::invalid_token(
            "the Authorization header must be `Bearer <token>`",
        )),
    }
}

const REQUEST_ID: &str = "x-request-id";

fn new_request_id() -> HeaderValue {
    let mut buffer = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown"))
}

/// `{"status":"ok"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Status {
    #[schema(example = "ok")]
    pub status: &'static str,
}

/// Written out once: the ping path serializes nothing. A test checks it against [`Status`].
const PING_BODY: &[u8] = br#"{"status":"ok"}"#;

/// Liveness: answers without touching Redis.
#[utoipa::path(
    get,
    path = "/api/ping",
    tag = "service",
    operation_id = "ping",
    responses((status = 200, description = "The backend is up.", body = Status))
)]
pub(crate) fn ping() -> Response<Body> {
    static_json(StatusCode::OK, PING_BODY)
}

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
    // Counted already, in the same round trip as the token check (see `authenticate`); the
    // doc comment above is the OpenAPI summary, so it says what a client sees.
    let visits = visits.ok_or_else(|| ApiError::internal("the visit was not counted"))?;
    Ok(json_response(StatusCode::OK, &Visits { visits }))
}

async fn health(app: &App) -> Response<Body> {
    // About to stop (SIGUSR2): fail the check, so the proxy takes this backend out of
    // rotation before its socket closes.
    if app.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({"status": "draining", "backend": app.id}),
        );
    }
    let redis = if app.store.ping().await { "up" } else { "down" };
    json_response(
        StatusCode::OK,
        &serde_json::json!({"status": "ok", "backend": app.id, "redis": redis}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_methods_find_their_route() {
        let op = |method: Method, path: &str| find(&method, path).map(|(r, n)| (r.op, n));
        assert_eq!(op(Method::GET, "/api/ping").unwrap(), (Op::Ping, None));
        assert_eq!(
            op(Method::PUT, "/api/users/alice").unwrap(),
            (Op::UpdateUser, Some("alice".into()))
        );
        assert_eq!(
            op(Method::DELETE, "/api/users/bob").unwrap().0,
            Op::DeleteUser
        );
        for missing in ["/api/users/", "/api/users/a/b", "/api/ping/", "/nothing"] {
            let error = op(Method::GET, missing).unwrap_err();
            assert_eq!(error.status, StatusCode::NOT_FOUND, "{missing}");
        }
        let error = op(Method::PATCH, "/api/users/alice").unwrap_err();
        assert_eq!(error.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(error.headers[0].1, "PUT, DELETE");
        let error = op(Method::DELETE, "/api/users").unwrap_err();
        assert_eq!(error.headers[0].1, "GET, POST");
    }

    #[test]
    fn only_ping_health_openapi_and_login_are_public() {
        for route in ROUTES {
            let public = matches!(route.op, Op::Ping | Op::Health | Op::OpenApi | Op::Login);
            assert_eq!(route.access == Access::Public, public, "{}", route.path);
            if route.path.starts_with("/api/users") {
                assert_eq!(route.access, Access::Admin, "{}", route.path);
            }
        }
    }

    #[test]
    fn ping_body_is_the_documented_status() {
        let body = serde_json::to_vec(&Status { status: "ok" }).unwrap();
        assert_eq!(body, PING_BODY);
    }
}
