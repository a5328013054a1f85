//! The route table: every endpoint with who may call it, what answers it and the `endpoint`
//! label its metrics carry, and the lookup of a request's route. [`crate::dispatch`] enforces
//! the access levels (in one place, so no handler can forget), [`crate::openapi`] documents
//! them, and [`crate::metrics`] makes one series per label, all from this table.
//!
//! An endpoint is added with a row here, an [`Op`] and its arm in [`crate::dispatch`], its
//! handler in [`crate::handlers`], and the handler's `#[utoipa::path]` in the document's list
//! (a test checks that the document and this table agree).

use http::{HeaderValue, Method, StatusCode, header};

use crate::{error::ApiError, role::Role};

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Public,
    /// A caller with a valid credential (a bearer token of an active user, an API key, or a
    /// client certificate the proxy mapped to an active user) whose role now is at least this.
    Role(Role),
}

impl Access {
    /// The role an endpoint needs; `None` for a public one.
    pub fn role(self) -> Option<Role> {
        match self {
            Access::Public => None,
            Access::Role(role) => Some(role),
        }
    }
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
    ResetCount,
    Hello,
    ListUsers,
    CreateUser,
    UpdateUser,
    DeleteUser,
    ListKeys,
    CreateKey,
    RevokeKey,
    Audit,
    Status,
    Health,
}

pub struct Route {
    pub method: Method,
    /// A last segment in braces (`{name}`, `{id}`) stands for one path segment.
    pub path: &'static str,
    pub access: Access,
    pub op: Op,
    /// The `endpoint` label of its metrics: a fixed set, so the four user-management
    /// operations share `users`.
    pub metric: &'static str,
}

const fn route(
    method: Method,
    path: &'static str,
    access: Access,
    op: Op,
    metric: &'static str,
) -> Route {
    Route {
        method,
        path,
        access,
        op,
        metric,
    }
}

use Access::Public;
const VIEWER: Access = Access::Role(Role::Viewer);
const MAINTAINER: Access = Access::Role(Role::Maintainer);
const ADMIN: Access = Access::Role(Role::Admin);

/// Every endpoint, and the permissions by role: a viewer reads; a maintainer also writes what
/// is not user management; an admin also manages users and API keys and reads the audit log.
/// All but `/healthz` (the proxy's health check, on the backend socket only) are reachable
/// through the proxy and in the OpenAPI document.
#[rustfmt::skip]
pub const ROUTES: &[Route] = &[
    route(Method::GET,    "/api/ping",         Public,     Op::Ping,       "ping"),
    route(Method::GET,    "/api/openapi.json", Public,     Op::OpenApi,    "openapi"),
    route(Method::POST,   "/auth/login",       Public,     Op::Login,      "login"),
    route(Method::POST,   "/auth/logout",      VIEWER,     Op::Logout,     "logout"),
    route(Method::GET,    "/auth/verify",      VIEWER,     Op::Verify,     "verify"),
    route(Method::GET,    "/api/me",           VIEWER,     Op::Me,         "me"),
    route(Method::GET,    "/api/hello",        VIEWER,     Op::Hello,      "hello"),
    route(Method::GET,    "/api/count",        VIEWER,     Op::Count,      "count"),
    route(Method::DELETE, "/api/count",        MAINTAINER, Op::ResetCount, "count"),
    route(Method::GET,    "/api/users",        ADMIN,      Op::ListUsers,  "users"),
    route(Method::POST,   "/api/users",        ADMIN,      Op::CreateUser, "users"),
    route(Method::PUT,    "/api/users/{name}", ADMIN,      Op::UpdateUser, "users"),
    route(Method::DELETE, "/api/users/{name}", ADMIN,      Op::DeleteUser, "users"),
    route(Method::GET,    "/api/keys",         ADMIN,      Op::ListKeys,   "keys"),
    route(Method::POST,   "/api/keys",         ADMIN,      Op::CreateKey,  "keys"),
    route(Method::DELETE, "/api/keys/{id}",    ADMIN,      Op::RevokeKey,  "keys"),
    route(Method::GET,    "/api/audit",        ADMIN,      Op::Audit,      "audit"),
    route(Method::GET,    "/api/status",       ADMIN,      Op::Status,     "status"),
    route(Method::GET,    "/healthz",          Public,     Op::Health,     "healthz"),
];

/// The `endpoint` label of a request no route takes.
pub const OTHER: &str = "other";

/// Every `endpoint` label, once each, in table order, then [`OTHER`].
pub fn metric_labels() -> Vec<&'static str> {
    let mut labels: Vec<&'static str> = Vec::new();
    for route in ROUTES {
        if !labels.contains(&route.metric) {
            labels.push(route.metric);
        }
    }
    labels.push(OTHER);
    labels
}

/// The route for `method` and `path`, with the `{name}` segment if it has one; `404` when no
/// route has the path, `405` with `Allow` when none has it with this method. `HEAD` takes the
/// `GET` route (RFC 9110, 9.3.2): the same answer, whose body hyper leaves out.
pub fn find(method: &Method, path: &str) -> Result<(&'static Route, Option<String>), ApiError> {
    let mut allowed: Vec<&str> = Vec::new();
    for route in ROUTES {
        let Some(name) = matches(route.path, path) else {
            continue;
        };
        if route.method == method || (route.method == Method::GET && method == Method::HEAD) {
            return Ok((route, name.map(str::to_owned)));
        }
        allowed.push(route.method.as_str());
        if route.method == Method::GET {
            allowed.push(Method::HEAD.as_str());
        }
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

/// `Some(None)` for a plain match, `Some(Some(segment))` for a template ending in `{...}`.
fn matches<'p>(template: &str, path: &'p str) -> Option<Option<&'p str>> {
    match template.strip_suffix('}').and_then(|t| t.rsplit_once('{')) {
        None => (template == path).then_some(None),
        Some((prefix, _)) => path
            .strip_prefix(prefix)
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .map(Some),
    }
}

/// The template with its `{...}` segment replaced by `segment`, for tests.
#[cfg(test)]
pub(crate) fn fill(template: &str, segment: &str) -> String {
    match template.strip_suffix('}').and_then(|t| t.rsplit_once('{')) {
        Some((prefix, _)) => format!("{prefix}{segment}"),
        None => template.to_string(),
    }
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
        assert_eq!(error.headers[0].1, "GET, HEAD, POST");
        assert_eq!(
            op(Method::DELETE, "/api/keys/k1").unwrap(),
            (Op::RevokeKey, Some("k1".into()))
        );
        let error = op(Method::POST, "/api/count").unwrap_err();
        assert_eq!(error.headers[0].1, "GET, HEAD, DELETE");
        let error = op(Method::POST, "/api/ping").unwrap_err();
        assert_eq!(error.headers[0].1, "GET, HEAD");
    }

    #[test]
    fn head_is_served_wherever_get_is_and_nowhere_else() {
        for route in ROUTES {
            let head = find(&Method::HEAD, &fill(route.path, "alice"));
            if route.method == Method::GET {
                assert_eq!(
                    head.map(|(r, _)| r.op).ok(),
                    Some(route.op),
                    "{}",
                    route.path
                );
            } else if !ROUTES
                .iter()
                .any(|r| r.path == route.path && r.method == Method::GET)
            {
                let error = head.map(|_| ()).unwrap_err();
                assert_eq!(
                    error.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{}",
                    route.path
                );
            }
        }
    }

    #[test]
    fn only_ping_health_openapi_and_login_are_public() {
        for route in ROUTES {
            let public = matches!(route.op, Op::Ping | Op::Health | Op::OpenApi | Op::Login);
            assert_eq!(route.access == Access::Public, public, "{}", route.path);
        }
    }

    /// Viewers read; writes need a maintainer; users, keys, the audit log and the group's
    /// status need an admin.
    #[test]
    fn writes_and_management_need_their_roles() {
        for route in ROUTES.iter().filter(|r| r.access != Access::Public) {
            let admin_only = ["/api/users", "/api/keys", "/api/audit", "/api/status"]
                .iter()
                .any(|p| route.path.starts_with(p));
            let write = route.method != Method::GET && !route.path.starts_with("/auth/");
            let needed = if admin_only {
                Role::Admin
            } else if write {
                Role::Maintainer
            } else {
                Role::Viewer
            };
            assert_eq!(
                route.access,
                Access::Role(needed),
                "{} {}",
                route.method,
                route.path
            );
        }
    }

    #[test]
    fn each_label_is_listed_once() {
        assert_eq!(
            metric_labels(),
            [
                "ping", "openapi", "login", "logout", "verify", "me", "hello", "count", "users",
                "keys", "audit", "status", "healthz", "other"
            ]
        );
    }
}
