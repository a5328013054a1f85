//! From a request to its response: [`handle`] finds the request's route in
//! [`crate::routes::ROUTES`], checks its token when the route asks for one (in one place, so
//! no handler can forget), and runs the handler. Each handler returns a value or an
//! [`ApiError`]; one place turns both into a response carrying the request id, and records
//! its metrics.

use std::{sync::Arc, time::Instant};

use http::{HeaderValue, Method, Request, Response, header};

use crate::{
    accounts::Session,
    app::App,
    connection::RequestBody,
    error::ApiError,
    handlers::{count, health, login, ping, tokens, users},
    http_util::Body,
    openapi,
    role::Role,
    routes::{self, Access, Op, Route},
};

/// Response header naming the authenticated user, for the proxy's access log; the proxy
/// removes it before the response reaches the client.
pub const USER_HEADER: &str = "x-gatehouse-user";

const REQUEST_ID: &str = "x-request-id";
const CORRELATION_ID: &str = "x-correlation-id";

pub async fn handle(app: Arc<App>, request: Request<RequestBody>) -> Response<Body> {
    let started = Instant::now();
    // The proxy always sends an id; a backend reached directly makes one. Kept as the header
    // value, so the success path copies no string.
    let id_header = |name: &str| {
        request
            .headers()
            .get(name)
            .filter(|v| !v.is_empty() && v.len() <= 128 && v.to_str().is_ok())
            .cloned()
    };
    let request_id = id_header(REQUEST_ID).unwrap_or_else(new_request_id);
    // The proxy always sends one too: a trusted proxy's, or the request id.
    let correlation_id = id_header(CORRELATION_ID).unwrap_or_else(|| request_id.clone());
    let id = request_id.to_str().unwrap_or_default();
    let found = routes::find(request.method(), request.uri().path());
    let endpoint = found
        .as_ref()
        .map_or(routes::OTHER, |(route, _)| route.metric);
    let mut user = None;
    let result = match found {
        Ok((route, name)) => call(&app, route, name, request, id, &mut user).await,
        Err(error) => Err(error),
    };
    let mut response = result.unwrap_or_else(|error| {
        error.into_response(id, correlation_id.to_str().unwrap_or_default())
    });
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
        Op::Ping => Ok(ping::ping()),
        Op::OpenApi => Ok(openapi::response(
            request.headers().get("x-forwarded-prefix"),
        )),
        Op::Health => Ok(health::health(app).await),
        Op::Login => login::login(app, request, request_id, user).await,
        Op::Logout => tokens::logout(app, signed_in(&session)?).await,
        Op::Verify => Ok(tokens::verify(signed_in(&session)?)),
        Op::Me => Ok(users::me(signed_in(&session)?)),
        Op::Count => count::count(visits),
        Op::ListUsers => users::list(app).await,
        Op::CreateUser => users::create(app, signed_in(&session)?, request).await,
        Op::UpdateUser => users::update(app, signed_in(&session)?, name, request).await,
        Op::DeleteUser => users::delete(app, signed_in(&session)?, name).await,
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
/// trip (only if the token passes) and the count comes back with the session. `HEAD` (whose
/// answer has the headers `GET` would have) counts no visit: it reads the count as it is.
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
    if op == Op::Count && request.method() == Method::HEAD {
        let session = app.accounts.session(claims).await?;
        return Ok((session, Some(app.accounts.visits().await?)));
    }
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

fn new_request_id() -> HeaderValue {
    let mut buffer = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown"))
}
