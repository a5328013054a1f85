//! From a request to its response: [`handle`] finds the request's route in
//! [`crate::routes::ROUTES`], checks its credential and the role the route needs (in one
//! place, so no handler can forget), and runs the handler. Each handler returns a value or an
//! [`ApiError`]; one place turns both into a response carrying the request id, and records
//! its metrics.

use std::{net::IpAddr, sync::Arc, time::Instant};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};

use crate::{
    accounts::{Credential, Session},
    app::App,
    audit::Event,
    connection::RequestBody,
    error::ApiError,
    handlers::{self, api_keys, audit, count, health, login, ping, status, tokens, users},
    http_util::Body,
    openapi,
    routes::{self, Op, Route},
};

/// Response header naming the authenticated user, for the proxy's access log; the proxy
/// removes it before the response reaches the client.
pub const USER_HEADER: &str = "x-gatehouse-user";

const REQUEST_ID: &str = "x-request-id";
const CORRELATION_ID: &str = "x-correlation-id";
const API_KEY: &str = "x-api-key";
/// The user a client certificate maps to, set by the proxy alone.
const CERT_USER: &str = "x-gatehouse-cert-user";

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
    let context = Context {
        request_id: request_id.to_str().unwrap_or_default(),
        correlation_id: correlation_id.to_str().unwrap_or_default(),
        client: handlers::client_address(&request),
    };
    let found = routes::find(request.method(), request.uri().path());
    let endpoint = found
        .as_ref()
        .map_or(routes::OTHER, |(route, _)| route.metric);
    // A credential's answers, and a login's (its token: RFC 6749, 5.1).
    let private = found
        .as_ref()
        .is_ok_and(|(route, _)| route.access.role().is_some() || route.op == Op::Login);
    let mut user = None;
    let result = match found {
        Ok((route, name)) => call(&app, route, name, request, &context, &mut user).await,
        Err(error) => Err(error),
    };
    let mut response = result
        .unwrap_or_else(|error| error.into_response(context.request_id, context.correlation_id));
    let seconds = started.elapsed().as_secs_f64();
    app.metrics
        .request(endpoint, response.status().as_u16(), seconds);
    let headers = response.headers_mut();
    headers.insert("x-backend-id", app.id_header.clone());
    headers.insert(REQUEST_ID, request_id);
    if let Some(user) = user {
        headers.insert(USER_HEADER, user);
    }
    // An answer for one caller: no shared cache may keep it, whatever credential header it
    // came with.
    if private {
        headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-store"),
        );
    }
    response
}

/// What every handler may need of the request beyond its body: its ids and client, for the
/// audit log.
pub struct Context<'r> {
    pub request_id: &'r str,
    pub correlation_id: &'r str,
    /// The client as the proxy saw it (`X-Real-IP`).
    pub client: Option<IpAddr>,
}

impl<'r> Context<'r> {
    /// An audit event of this request, done by `actor`.
    pub fn event(
        &'r self,
        event: &'r str,
        actor: Option<&'r str>,
        target: Option<&'r str>,
        outcome: &'r str,
    ) -> Event<'r> {
        Event {
            event,
            actor,
            client: self.client,
            request_id: Some(self.request_id),
            correlation_id: Some(self.correlation_id),
            target,
            outcome,
            detail: None,
        }
    }
}

async fn call(
    app: &App,
    route: &Route,
    name: Option<String>,
    request: Request<RequestBody>,
    context: &Context<'_>,
    user: &mut Option<HeaderValue>,
) -> Result<Response<Body>, ApiError> {
    let (session, visits) = match route.access.role() {
        None => (None, None),
        Some(needed) => {
            let (session, visits) = authenticate(app, &request, route.op, context).await?;
            *user = HeaderValue::from_str(&session.actor).ok();
            if !session.role.at_least(needed) {
                let mut event = context.event(
                    "permission.denied",
                    Some(&session.actor),
                    Some(route.path),
                    "denied",
                );
                event.detail = Some(needed.as_str());
                app.audit.record_refusal(event).await;
                return Err(ApiError::forbidden(format!(
                    "this needs the {} role; {} has the {} role",
                    needed.as_str(),
                    session.actor,
                    session.role.as_str()
                )));
            }
            (Some(session), visits)
        }
    };
    let name = name.as_deref().unwrap_or_default();
    let signed_in = || signed_in(&session);
    match route.op {
        Op::Ping => Ok(ping::ping()),
        Op::OpenApi => Ok(openapi::response(
            request.headers().get("x-forwarded-prefix"),
        )),
        Op::Health => Ok(health::health(app).await),
        Op::Login => login::login(app, request, context, user).await,
        Op::Logout => tokens::logout(app, signed_in()?, context).await,
        Op::Verify => Ok(tokens::verify(signed_in()?)),
        Op::Me => Ok(users::me(signed_in()?)),
        Op::Hello => Ok(count::hello(signed_in()?)),
        Op::Count => count::count(visits),
        Op::ResetCount => count::reset(app, signed_in()?, context).await,
        Op::ListUsers => users::list(app).await,
        Op::CreateUser => users::create(app, signed_in()?, request, context).await,
        Op::UpdateUser => users::update(app, signed_in()?, name, request, context).await,
        Op::DeleteUser => users::delete(app, signed_in()?, name, context).await,
        Op::ListKeys => api_keys::list(app).await,
        Op::CreateKey => api_keys::create(app, signed_in()?, request, context).await,
        Op::RevokeKey => api_keys::revoke(app, signed_in()?, name, context).await,
        Op::Audit => audit::list(app, request.uri().query()).await,
        Op::Status => Ok(status::status(app).await),
    }
}

/// The session of an operation the table protects; its absence would be a bug in the table.
fn signed_in(session: &Option<Session>) -> Result<&Session, ApiError> {
    session
        .as_ref()
        .ok_or_else(|| ApiError::internal("this operation needs a signed-in user"))
}

/// The caller's credential, checked: an `X-API-Key`, a bearer token, or (with neither) a
/// client certificate the proxy verified and mapped to a user (`X-Gatehouse-Cert-User`, which
/// the proxy always removes from what clients send). Two credentials at once are refused
/// rather than one picked.
///
/// `/api/count` is the busiest protected route, so its visit is counted in the same round
/// trip as the credential's check (only if it passes) and the count comes back with the
/// session. `HEAD` (whose answer has the headers `GET` would have) counts no visit: it reads
/// the count as it is.
async fn authenticate<B>(
    app: &App,
    request: &Request<B>,
    op: Op,
    context: &Context<'_>,
) -> Result<(Session, Option<i64>), ApiError> {
    let headers = request.headers();
    let head = request.method() == Method::HEAD;
    let count = op == Op::Count && !head;
    let read_count = op == Op::Count && head;
    let (session, visits) = if let Some(key) = headers.get(API_KEY) {
        if headers.contains_key(header::AUTHORIZATION) {
            return Err(ApiError::bad_request(
                "send one credential: an Authorization header or an X-API-Key, not both",
            ));
        }
        key_session(app, key, count, context).await?
    } else if headers.contains_key(header::AUTHORIZATION) {
        let token = bearer_token(request)?;
        let claims = app
            .tokens
            .verify(token)
            .map_err(|e| ApiError::invalid_token(format!("the bearer token is not valid: {e}")))?;
        if count {
            let (session, visits) = app.accounts.session_counting_visit(claims).await?;
            (session, Some(visits))
        } else {
            (app.accounts.session(claims).await?, None)
        }
    } else if let Some(user) = headers.get(CERT_USER).filter(|_| app.certificate_users) {
        let user = user.to_str().unwrap_or_default();
        app.accounts.certificate_session(user, count).await?
    } else {
        return Err(ApiError::invalid_token(
            "an `Authorization: Bearer <token>` or `X-API-Key` header is required",
        ));
    };
    let visits = match read_count {
        true => Some(app.accounts.visits().await?),
        false => visits,
    };
    Ok((session, visits))
}

/// An `X-API-Key`'s session; a refused or throttled key is an audit event.
async fn key_session(
    app: &App,
    key: &HeaderValue,
    count: bool,
    context: &Context<'_>,
) -> Result<(Session, Option<i64>), ApiError> {
    let key = key.to_str().unwrap_or_default().trim();
    match app
        .api_keys
        .check(&app.guard, key, context.client, count)
        .await
    {
        Ok(accepted) => Ok((
            Session {
                actor: format!("key:{}", accepted.name),
                role: accepted.role,
                generation: accepted.generation,
                credential: Credential::ApiKey {
                    id: accepted.id,
                    name: accepted.name,
                },
            },
            accepted.visits,
        )),
        Err(error) => {
            let event = match error.status {
                StatusCode::UNAUTHORIZED => {
                    Some(context.event("key.refused", None, None, "failure"))
                }
                StatusCode::TOO_MANY_REQUESTS => {
                    Some(context.event("guard.tripped", None, Some("api_key"), "denied"))
                }
                _ => None,
            };
            if let Some(event) = event {
                app.audit.record_refusal(event).await;
            }
            Err(error)
        }
    }
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
