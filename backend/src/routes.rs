//! The backend's endpoints, routed by `match (method, path)`. Each handler returns a value or
//! an [`ApiError`]; one place turns both into a response carrying the request id.

use std::{sync::Arc, time::Instant};

use http::{Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::json;

use crate::{
    App,
    error::ApiError,
    http_util::{Body, json_response, read_json, static_json},
    metrics::{Endpoint, Login as LoginOutcome},
};

/// Response header naming the token's subject, for the proxy's access log; the proxy
/// removes it before the response reaches the client.
pub const USER_HEADER: &str = "x-gatehouse-user";

pub async fn handle(app: Arc<App>, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let endpoint = endpoint(request.uri().path());
    // The proxy always sends an id; a backend reached directly makes one. Kept as the header
    // value, so the success path copies no string.
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.to_str().is_ok())
        .cloned()
        .unwrap_or_else(new_request_id);
    let id = request_id.to_str().unwrap_or_default();
    let mut response = match route(&app, request, id).await {
        Ok(response) => response,
        Err(error) => error.into_response(id),
    };
    let seconds = started.elapsed().as_secs_f64();
    app.metrics
        .request(endpoint, response.status().as_u16(), seconds);
    let headers = response.headers_mut();
    headers.insert("x-backend-id", app.id_header.clone());
    headers.insert(REQUEST_ID, request_id);
    response
}

const REQUEST_ID: &str = "x-request-id";

fn new_request_id() -> header::HeaderValue {
    let mut buffer = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buffer);
    header::HeaderValue::from_str(id).unwrap_or(header::HeaderValue::from_static("unknown"))
}

fn endpoint(path: &str) -> Endpoint {
    match path {
        "/api/ping" => Endpoint::Ping,
        "/auth/login" => Endpoint::Login,
        "/api/count" => Endpoint::Count,
        "/healthz" => Endpoint::Health,
        _ => Endpoint::Other,
    }
}

async fn route(
    app: &App,
    request: Request<Incoming>,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    let method = request.method().clone();
    match (&method, request.uri().path()) {
        (&Method::GET, "/api/ping") => Ok(static_json(StatusCode::OK, br#"{"status":"ok"}"#)),
        (&Method::GET, "/healthz") => health(app).await,
        (&Method::POST, "/auth/login") => {
            let result = login(app, request, request_id).await;
            app.metrics.login(match &result {
                Ok(_) => LoginOutcome::Success,
                Err(e) if e.status == StatusCode::UNAUTHORIZED => LoginOutcome::Refused,
                Err(_) => LoginOutcome::Error,
            });
            result
        }
        (&Method::GET, "/api/count") => count(app, &request).await,
        (_, "/api/ping" | "/healthz" | "/api/count") => Err(method_not_allowed("GET")),
        (_, "/auth/login") => Err(method_not_allowed("POST")),
        (_, path) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint at {path}"),
        )),
    }
}

async fn health(app: &App) -> Result<Response<Body>, ApiError> {
    if app.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this backend is about to stop",
        ));
    }
    let redis = if app.store.ping().await { "up" } else { "down" };
    Ok(json_response(
        StatusCode::OK,
        &json!({"status": "ok", "backend": app.id, "redis": redis}),
    ))
}

#[derive(Deserialize)]
struct Login {
    username: String,
    password: String,
}

async fn login(
    app: &App,
    request: Request<Incoming>,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    let Login { username, password } = read_json(request, app.max_body_bytes).await?;
    let users = app.users.clone();
    let name = username.clone();
    // argon2id takes tens of milliseconds of CPU by design; keep it off the I/O threads.
    let valid = tokio::task::spawn_blocking(move || users.verify(&name, &password))
        .await
        .unwrap_or(false);
    if !valid {
        tracing::info!(user = %username, request_id, "login refused");
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
            "wrong user name or password",
        ));
    }
    let token = app.tokens.issue(&username).map_err(|e| {
        tracing::error!(error = %e, request_id, "cannot sign a token");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "cannot issue a token",
        )
    })?;
    Ok(json_response(
        StatusCode::OK,
        &json!({
            "token": token,
            "token_type": "Bearer",
            "expires_in": app.tokens.ttl_seconds(),
        }),
    ))
}

async fn count(app: &App, request: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let token = bearer_token(request)?;
    let claims = app
        .tokens
        .verify(token)
        .map_err(|e| ApiError::invalid_token(format!("the bearer token is not valid: {e}")))?;
    let visits = app
        .store
        .count_visit()
        .await
        .map_err(|_| ApiError::store_unavailable())?;
    let mut response = json_response(StatusCode::OK, &json!({"visits": visits}));
    if let Ok(user) = header::HeaderValue::from_str(&claims.sub) {
        response.headers_mut().insert(USER_HEADER, user);
    }
    Ok(response)
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

fn method_not_allowed(allow: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed here",
    )
    .with_header(header::ALLOW, allow)
}
