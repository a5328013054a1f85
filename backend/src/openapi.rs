//! The OpenAPI 3.1 document of every endpoint the proxy can reach, served at
//! `GET /api/openapi.json` and built once at start-up.
//!
//! It is generated, not written: schemas come from the request and response types themselves
//! (`utoipa::ToSchema`), each operation from the `#[utoipa::path]` beside its handler, and
//! what every protected operation shares (the bearer requirement, `401`, `403`, `503`) from
//! the access levels in [`ROUTES`], the same table that enforces them. A test checks that the
//! document and the table list the same operations.

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        self, Content, HttpMethod, Ref, RefOr, ResponseBuilder,
        extensions::Extensions,
        header::HeaderBuilder,
        security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        },
    },
};

use crate::{
    handlers::{api_keys, audit, count, login, ping, status, tokens, users},
    http_util::Body,
    role::Role,
    routes::{Op, ROUTES, Route},
};

/// The security schemes' names in the document (and in Swagger UI's Authorize dialog): a
/// protected operation takes either.
const BEARER: &str = "bearer";
const API_KEY: &str = "api_key";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "gatehouse API",
        description = "The backends behind the gatehouse proxy: tokens, API keys, users and \
            roles, an audit log, a shared visit counter. Log in at `POST /auth/login`, then \
            send the token as `Authorization: Bearer <token>`, or send an API key as \
            `X-API-Key` (in Swagger UI: the Authorize button). Each protected operation names \
            the role it needs (`x-required-role`): a viewer reads; a maintainer also writes \
            what is not user management; an admin also manages users and keys and reads the \
            audit log."
    ),
    paths(
        ping::ping,
        document_path,
        login::login,
        tokens::logout,
        tokens::verify,
        users::me,
        count::hello,
        count::count,
        count::reset,
        users::list,
        users::create,
        users::update,
        users::delete,
        api_keys::list,
        api_keys::create,
        api_keys::revoke,
        audit::list,
        status::status,
    ),
    components(schemas(crate::error::ErrorBody)),
    modifiers(&FromRouteTable),
    tags(
        (name = "tokens", description = "Logging in and out, checking a token."),
        (name = "users", description = "The current user; managing users (admins only)."),
        (name = "keys", description = "API keys for programs (admins only)."),
        (name = "audit", description = "The audit log of security events (admins only)."),
        (name = "service", description = "Liveness, the visit counter, the group's status and \
            this document."),
    )
)]
struct ApiDoc;

/// The document as JSON, made once: it depends on nothing but the code.
pub fn document() -> &'static Bytes {
    static DOCUMENT: LazyLock<Bytes> = LazyLock::new(|| {
        // Made of maps with string keys and plain values: serializing it cannot fail, and a
        // test reads it back.
        Bytes::from(serde_json::to_vec(&ApiDoc::openapi()).unwrap_or_default())
    });
    &DOCUMENT
}

/// `GET /api/openapi.json`. `prefix`: the proxy's `X-Forwarded-Prefix`, the path it removed
/// before the request came here, which the document then names as its server, so that Swagger
/// UI's "Try it out" calls the API through that prefix.
pub fn response(prefix: Option<&HeaderValue>) -> Response<Body> {
    let body = match prefix.and_then(|p| served_under(p.as_bytes())) {
        Some(prefix) => with_server(document(), prefix),
        None => document().clone(),
    };
    let mut response = Response::new(Body::new(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A forwarded prefix as a server URL: a path of plain characters (`/flask`), no longer than
/// any route prefix needs to be; anything else is ignored rather than put into the document.
fn served_under(prefix: &[u8]) -> Option<&str> {
    let plain = |b: &u8| b.is_ascii_alphanumeric() || b"/-._~".contains(b);
    let ok = prefix.starts_with(b"/")
        && !prefix.ends_with(b"/")
        && prefix.len() <= 256
        && prefix.iter().all(plain)
        && !prefix.windows(2).any(|w| w == b"//");
    ok.then(|| std::str::from_utf8(prefix).ok()).flatten()
}

/// The document with `servers` naming `url`. The document is an object without `servers`
/// (a test checks), so the member goes in right after its opening brace: no parse and
/// re-serialization of the whole document per request.
fn with_server(document: &Bytes, url: &str) -> Bytes {
    let server = serde_json::json!([{ "url": url }]);
    let mut body = Vec::with_capacity(document.len() + url.len() + 32);
    body.extend_from_slice(b"{\"servers\":");
    body.extend_from_slice(server.to_string().as_bytes());
    match document.strip_prefix(b"{") {
        Some(rest) if rest.first() != Some(&b'}') => {
            body.push(b',');
            body.extend_from_slice(rest);
        }
        Some(rest) => body.extend_from_slice(rest),
        None => return document.clone(),
    }
    Bytes::from(body)
}

/// This document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "service",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document.",
        body = serde_json::Value))
)]
#[allow(dead_code)] // Only its documentation is used: [`response`] serves the bytes.
fn document_path() {}

/// Adds to each operation what its access level in [`ROUTES`] implies, and to each operation
/// with a JSON body the answers of [`crate::handlers::read_json`].
struct FromRouteTable;

impl Modify for FromRouteTable {
    fn modify(&self, doc: &mut openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("A token from `POST /auth/login`."))
                    .build(),
            ),
        );
        components.add_security_scheme(
            API_KEY,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "A key from `POST /api/keys` (admins), with the key's role.",
            ))),
        );
        for (name, _, description, header) in SHARED {
            let mut response = ResponseBuilder::new().description(*description).content(
                "application/json",
                Content::new(Some(Ref::from_schema_name("ErrorBody"))),
            );
            if let Some((header_name, about)) = header {
                let value = HeaderBuilder::new()
                    .schema(Some(openapi::ObjectBuilder::new().schema_type(
                        openapi::schema::SchemaType::Type(openapi::schema::Type::String),
                    )))
                    .description(Some(*about))
                    .build();
                response = response.header(*header_name, value);
            }
            components
                .responses
                .insert((*name).to_string(), response.build().into());
        }
        for route in ROUTES {
            let Some(operation) = operation_mut(doc, route) else {
                continue;
            };
            // Any route may carry a proxy rate limit (the shipped config gives one to all).
            let mut shared: Vec<&str> = vec!["TooManyRequests"];
            if operation.request_body.is_some() {
                shared.extend([
                    "BadRequest",
                    "RequestTimeout",
                    "PayloadTooLarge",
                    "UnsupportedMediaType",
                ]);
            }
            if let Some(role) = route.access.role() {
                operation.security = Some(vec![
                    SecurityRequirement::new(BEARER, Vec::<String>::new()),
                    SecurityRequirement::new(API_KEY, Vec::<String>::new()),
                ]);
                shared.extend(["Unauthorized", "StoreUnavailable", "BadRequest"]);
                let about = format!("Needs the `{}` role.", role.as_str());
                operation.description = Some(match operation.description.take() {
                    Some(text) => format!("{text}\n\n{about}"),
                    None => about,
                });
                let mut extensions = Extensions::default();
                extensions.insert("x-required-role".into(), role.as_str().into());
                operation.extensions = Some(extensions);
                if role != Role::Viewer {
                    shared.push("Forbidden");
                }
            }
            if route.op == Op::Login {
                shared.push("StoreUnavailable");
            }
            for name in shared {
                if let Some((_, status, _, _)) = SHARED.iter().find(|s| s.0 == name) {
                    operation
                        .responses
                        .responses
                        .entry(status.to_string())
                        .or_insert_with(|| RefOr::Ref(Ref::from_response_name(name)));
                }
            }
        }
        add_head_operations(doc);
    }
}

/// `HEAD` wherever `GET` is ([`crate::routes::find`]): the `GET` operation's parameters,
/// security and responses, without the response bodies.
fn add_head_operations(doc: &mut openapi::OpenApi) {
    let shared = doc
        .components
        .as_ref()
        .map(|c| c.responses.clone())
        .unwrap_or_default();
    for route in ROUTES.iter().filter(|r| r.method == http::Method::GET) {
        let Some(item) = doc.paths.paths.get_mut(route.path) else {
            continue;
        };
        let Some(mut head) = item.get.clone() else {
            continue;
        };
        head.operation_id = head.operation_id.map(|id| format!("{id}_head"));
        head.summary = head.summary.map(|s| format!("{s} Headers only (HEAD)."));
        for response in head.responses.responses.values_mut() {
            let inline = match response {
                RefOr::T(inline) => Some(inline.clone()),
                RefOr::Ref(reference) => reference
                    .ref_location
                    .rsplit('/')
                    .next()
                    .and_then(|name| shared.get(name))
                    .and_then(|r| match r {
                        RefOr::T(inline) => Some(inline.clone()),
                        RefOr::Ref(_) => None,
                    }),
            };
            if let Some(mut inline) = inline {
                inline.content.clear();
                *response = RefOr::T(inline);
            }
        }
        item.head = Some(head);
    }
}

/// Responses many operations share: name, status, description, a header it carries.
type Shared = (
    &'static str,
    u16,
    &'static str,
    Option<(&'static str, &'static str)>,
);

const SHARED: &[Shared] = &[
    (
        "BadRequest",
        400,
        "The body is not valid JSON or a field is wrong, or two credentials were sent at \
         once (a bearer token and an API key); the message names which.",
        None,
    ),
    (
        "Unauthorized",
        401,
        "No credential, or it is invalid, expired or revoked, or its user is disabled or gone.",
        Some(("WWW-Authenticate", "`Bearer`")),
    ),
    (
        "Forbidden",
        403,
        "The caller's role is below the one the operation needs; the message names it.",
        None,
    ),
    (
        "RequestTimeout",
        408,
        "The body did not arrive whole within the backend's `body_timeout_ms`; the \
         connection is closed.",
        None,
    ),
    (
        "PayloadTooLarge",
        413,
        "The body is larger than the backend's `max_body_bytes`.",
        None,
    ),
    (
        "UnsupportedMediaType",
        415,
        "The body is not `application/json`.",
        None,
    ),
    (
        "TooManyRequests",
        429,
        "Too many requests from this client: the proxy's rate limit (on login, also the \
         brute-force guard).",
        Some(("Retry-After", "Seconds to wait.")),
    ),
    (
        "StoreUnavailable",
        503,
        "Redis cannot be reached (or, on login, too many passwords are being checked): no \
         token is accepted unchecked and nothing is half-written, but a change whose answer \
         was lost may have been applied; retrying is safe.",
        Some(("Retry-After", "Seconds to wait.")),
    ),
];

fn operation_mut<'d>(
    doc: &'d mut openapi::OpenApi,
    route: &Route,
) -> Option<&'d mut openapi::path::Operation> {
    let item = doc.paths.paths.get_mut(route.path)?;
    match http_method(&route.method)? {
        HttpMethod::Get => item.get.as_mut(),
        HttpMethod::Post => item.post.as_mut(),
        HttpMethod::Put => item.put.as_mut(),
        HttpMethod::Delete => item.delete.as_mut(),
        _ => None,
    }
}

fn http_method(method: &http::Method) -> Option<HttpMethod> {
    Some(match *method {
        http::Method::GET => HttpMethod::Get,
        http::Method::POST => HttpMethod::Post,
        http::Method::PUT => HttpMethod::Put,
        http::Method::DELETE => HttpMethod::Delete,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde_json::Value;

    use crate::routes::Access;

    use super::*;

    fn doc() -> Value {
        serde_json::from_slice(document()).unwrap()
    }

    #[test]
    fn a_forwarded_prefix_becomes_the_server() {
        assert!(
            doc().get("servers").is_none(),
            "the document names no server of its own"
        );
        let doc: Value = serde_json::from_slice(&with_server(document(), "/flask")).unwrap();
        assert_eq!(doc["servers"], serde_json::json!([{ "url": "/flask" }]));
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(served_under(b"/flask/v2"), Some("/flask/v2"));
        for ignored in ["flask", "/flask/", "//evil.example", "/a\"b", "/a b", "/"] {
            assert_eq!(served_under(ignored.as_bytes()), None, "{ignored:?}");
        }
    }

    /// Every operation the router serves through the proxy is documented, and nothing else.
    #[test]
    fn document_and_route_table_list_the_same_operations() {
        let doc = doc();
        assert_eq!(doc["openapi"], "3.1.0");
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in ["get", "put", "post", "delete", "patch", "head", "options"] {
                if item.get(method).is_some() {
                    documented.insert((method.to_uppercase(), path.clone()));
                }
            }
        }
        let mut routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .filter(|r| r.op != Op::Health)
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        let heads: Vec<_> = routed
            .iter()
            .filter(|(method, _)| method == "GET")
            .map(|(_, path)| ("HEAD".to_string(), path.clone()))
            .collect();
        routed.extend(heads);
        assert_eq!(documented, routed);
    }

    /// `HEAD` is documented as its `GET`: the same statuses, headers and security, no body.
    #[test]
    fn head_operations_are_their_get_without_bodies() {
        let doc = doc();
        for route in ROUTES.iter().filter(|r| r.method == http::Method::GET) {
            if route.op == Op::Health {
                continue;
            }
            let get = &doc["paths"][route.path]["get"];
            let head = &doc["paths"][route.path]["head"];
            assert_eq!(head["security"], get["security"], "{}", route.path);
            let statuses = |op: &Value| -> Vec<String> {
                op["responses"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .cloned()
                    .collect()
            };
            assert_eq!(statuses(head), statuses(get), "{}", route.path);
            for (status, response) in head["responses"].as_object().unwrap() {
                assert!(response.get("content").is_none(), "{} {status}", route.path);
                assert!(
                    response["description"]
                        .as_str()
                        .is_some_and(|d| !d.is_empty())
                );
            }
            assert_ne!(head["operationId"], get["operationId"]);
        }
        // The headers a refusal carries are still documented.
        let unauthorized = &doc["paths"]["/api/count"]["head"]["responses"]["401"];
        assert!(
            unauthorized["headers"].get("WWW-Authenticate").is_some(),
            "{unauthorized}"
        );
    }

    /// The access level in the table and the document agree for every operation.
    #[test]
    fn protected_operations_say_so() {
        let doc = doc();
        for route in ROUTES.iter().filter(|r| r.op != Op::Health) {
            let operation = &doc["paths"][route.path][route.method.as_str().to_lowercase()];
            let responses = operation["responses"].as_object().unwrap();
            let secured = operation["security"][0].get(BEARER).is_some()
                && operation["security"][1].get(API_KEY).is_some();
            assert_eq!(secured, route.access != Access::Public, "{}", route.path);
            assert_eq!(
                operation["x-required-role"].as_str(),
                route.access.role().map(Role::as_str),
                "{}",
                route.path
            );
            assert_eq!(
                responses.contains_key("401"),
                route.access != Access::Public || route.op == Op::Login,
                "{}",
                route.path
            );
            assert_eq!(
                responses.contains_key("403"),
                route.access.role().is_some_and(|r| r != Role::Viewer),
                "{}",
                route.path
            );
            if route.access != Access::Public {
                assert!(responses.contains_key("503"), "{}", route.path);
            }
            assert!(responses.contains_key("429"), "{}", route.path);
            assert!(
                responses.keys().any(|s| s.starts_with('2')),
                "{} has no success response",
                route.path
            );
        }
        let scheme = &doc["components"]["securitySchemes"][BEARER];
        assert_eq!(scheme["type"], "http");
        assert_eq!(scheme["scheme"], "bearer");
    }

    /// Request bodies are closed (unknown fields are refused by serde and by the schema), and
    /// enums list exactly the roles the code knows.
    #[test]
    fn schemas_match_the_types() {
        let doc = doc();
        let schemas = &doc["components"]["schemas"];
        for closed in ["NewUser", "UserChange"] {
            assert_eq!(
                schemas[closed]["additionalProperties"], false,
                "{closed}: {}",
                schemas[closed]
            );
        }
        let roles: Vec<&str> = schemas["Role"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(roles, ["admin", "maintainer", "viewer"]);
        // Optional, but never null: the code refuses `null` too.
        let change = &schemas["UserChange"]["properties"];
        assert_eq!(change["active"]["type"], "boolean", "{change}");
        assert_eq!(change["password"]["type"], "string", "{change}");
        assert_eq!(
            change["role"]["$ref"], "#/components/schemas/Role",
            "{change}"
        );
        let required = |name: &str| -> BTreeSet<String> {
            schemas[name]["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            required("Claims"),
            ["exp", "gen", "iat", "jti", "nbf", "role", "sub"]
                .map(String::from)
                .into()
        );
        assert_eq!(
            required("NewUser"),
            ["password", "role", "username"].map(String::from).into()
        );
        assert!(required("ErrorBody").contains("request_id"));
    }
}
