//! The proxy's request phases, in the order Pingora runs them:
//!
//! 1. `early_request_filter`: take or make the request id.
//! 2. `request_filter`: find the route; unknown paths end here with a JSON 404.
//! 3. `upstream_peer`: pick a backend socket (round robin, healthy, not failed already).
//! 4. `fail_to_connect`, `error_while_proxy`: a failed backend is skipped on the retry.
//! 5. `upstream_request_filter`: forwarding headers and the request id for the backend.
//! 6. `response_filter`: the request id back to the client.
//! 7. `fail_to_proxy`: errors become JSON bodies with the right status.

use async_trait::async_trait;
use pingora::{
    Error, ErrorSource, ErrorType, Result,
    http::{RequestHeader, ResponseHeader},
    protocols::l4::socket::SocketAddr,
    upstreams::peer::HttpPeer,
};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::{
    drain::InFlight,
    request_id, respond,
    routes::{RouteTable, Target},
    upstream::Pool,
};

pub struct Gateway {
    routes: RouteTable,
    pool: Pool,
}

impl Gateway {
    pub fn new(routes: RouteTable, pool: Pool) -> Self {
        Self { routes, pool }
    }
}

/// Per-request state.
pub struct RequestCtx {
    _in_flight: InFlight,
    request_id: String,
    target: Option<Target>,
    /// Backends that refused this request's connection; allocated only when one fails.
    failed: Vec<SocketAddr>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _in_flight: InFlight::enter(),
            request_id: String::new(),
            target: None,
            failed: Vec::new(),
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.request_id = session
            .req_header()
            .headers
            .get("x-request-id")
            .and_then(|v| request_id::accept(v.as_bytes()))
            .map_or_else(request_id::generate, str::to_owned);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let path = session.req_header().uri.path();
        match self.routes.lookup(path) {
            Some(route) => {
                ctx.target = Some(route.target);
                Ok(false)
            }
            None => {
                let message = format!("no route for {path}");
                respond::json_error(session, 404, "not_found", &message, &ctx.request_id).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        match ctx.target {
            Some(Target::Backends) => self.pool.select(&ctx.failed).ok_or_else(|| {
                Error::explain(ErrorType::HTTPStatus(503), "no backend is available")
            }),
            None => Error::e_explain(
                ErrorType::InternalError,
                "no route chosen before upstream_peer",
            ),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the backend, so any method may go to another one.
        ctx.failed.push(peer._address.clone());
        e.set_retry(true);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer: {peer}"));
        // Like nginx's `proxy_next_upstream error`: an idempotent request whose response has not
        // started goes to the next backend, whether or not the connection was fresh. Never a
        // POST, never after bytes reached the client, never when the client is what failed, and
        // never on a timeout (a hung backend must answer 504 once, not once per backend).
        let timed_out = matches!(
            e.etype(),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
        );
        let retry = *e.esource() == ErrorSource::Upstream
            && session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && session.as_ref().response_written().is_none()
            && !timed_out;
        if retry {
            ctx.failed.push(peer._address.clone());
        }
        e.set_retry(retry);
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // Until trusted proxies are configured, the socket peer is the only client address we
        // believe, so client-sent forwarding headers are replaced, not extended.
        if let Some(ip) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical())
        {
            let ip = ip.to_string();
            upstream.insert_header("x-forwarded-for", &ip)?;
            upstream.insert_header("x-real-ip", ip)?;
        }
        upstream.insert_header("x-forwarded-proto", "http")?;
        upstream.insert_header("x-request-id", &ctx.request_id)?;
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        response.insert_header("x-request-id", &ctx.request_id)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (status, code, message) = classify(e);
        if status != 0
            && let Err(write_error) =
                respond::json_error(session, status, code, message, &ctx.request_id).await
        {
            tracing::debug!(error = %write_error, "could not send the error response");
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }
}

/// Maps a failure to the status, code and message the client sees. Status 0: the client is
/// gone, nothing to send.
fn classify(e: &Error) -> (u16, &'static str, &'static str) {
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (_, HTTPStatus(503)) => (503, "unavailable", "no backend is available"),
        (_, HTTPStatus(code)) if (400..500).contains(code) => {
            (*code, "bad_request", "the request is malformed")
        }
        (_, HTTPStatus(code)) => (*code, "upstream_error", "the request failed"),
        (ErrorSource::Upstream, ConnectTimedout | ReadTimedout | WriteTimedout) => {
            (504, "gateway_timeout", "the backend did not answer in time")
        }
        (ErrorSource::Upstream, _) => (502, "bad_gateway", "the backend failed to answer"),
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => (0, "", ""),
        (ErrorSource::Downstream, ReadTimedout) => (
            408,
            "request_timeout",
            "the request was not received in time",
        ),
        (ErrorSource::Downstream, _) => (400, "bad_request", "the request is malformed"),
        _ => (500, "internal", "the proxy failed to handle the request"),
    }
}
