//! `GET /healthz`: the proxy's health check, on the backend socket only (not in the OpenAPI
//! document, and no route of the proxy reaches it).

use std::sync::atomic::Ordering;

use http::{Response, StatusCode};

use crate::{
    app::App,
    http_util::{Body, json_response},
};

/// `200` with whether Redis answers; `503` while draining.
pub(crate) async fn health(app: &App) -> Response<Body> {
    // About to stop (SIGUSR2): fail the check, so the proxy takes this backend out of
    // rotation before its socket closes.
    if app.draining.load(Ordering::Relaxed) {
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
