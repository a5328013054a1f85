//! The proxy's request phases, in the order Pingora runs them:
//!
//! 1. `early_request_filter`: take or make the request id; note TLS and the client address.
//! 2. `request_filter`, the edge checks in a fixed order: the proxy's own `/healthz`; plain
//!    HTTP redirected to HTTPS; the path guard (traversal -> 403); the route lookup (none ->
//!    404); the route's access rules (rate limit -> 429, allow/deny -> 403, basic auth ->
//!    401); static routes are then answered here from files.
//! 3. `upstream_peer`: pick a backend socket (round robin, healthy, not failed already).
//! 4. `fail_to_connect`, `error_while_proxy`: a failed backend is skipped on the retry.
//! 5. `upstream_request_filter`: forwarding headers and the request id for the backend.
//! 6. `response_filter`: request id, HSTS, compression of large backend responses.
//! 7. `fail_to_proxy`: errors become JSON bodies with the right status.

use std::net::{IpAddr, Ipv4Addr};

use async_trait::async_trait;
use pingora::{
    Error, ErrorSource, ErrorType, Result,
    http::{RequestHeader, ResponseHeader},
    modules::http::compression::ResponseCompression,
    protocols::l4::socket::SocketAddr,
    upstreams::peer::HttpPeer,
};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::{
    access::{Decision, client_ip, ip_list::IpList},
    drain::InFlight,
    https_redirect::HttpsRedirect,
    request_id,
    respond::{self, Stamp},
    routes::{RouteTable, Served},
    statics::{encoding::compressible, path},
    upstream::Pool,
};

/// What HTTPS changes in how requests are answered.
pub struct TlsBehaviour {
    /// `Some`: plain-HTTP requests are redirected to HTTPS.
    pub redirect: Option<HttpsRedirect>,
    /// `Strict-Transport-Security` for HTTPS responses; `None` sends none.
    pub hsts: Option<String>,
}

/// gzip/brotli level for backend responses: a good ratio at a small CPU cost.
const COMPRESSION_LEVEL: u32 = 5;

pub struct Gateway {
    routes: RouteTable,
    pool: Pool,
    tls: TlsBehaviour,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` are believed.
    trusted_proxies: IpList,
    /// Backend responses at least this large are compressed for clients that accept it.
    compress_min_bytes: u64,
}

impl Gateway {
    pub fn new(
        routes: RouteTable,
        pool: Pool,
        tls: TlsBehaviour,
        trusted_proxies: IpList,
        compress_min_bytes: u64,
    ) -> Self {
        Self {
            routes,
            pool,
            tls,
            trusted_proxies,
            compress_min_bytes,
        }
    }

    fn stamp<'a>(&'a self, ctx: &'a RequestCtx) -> Stamp<'a> {
        Stamp {
            request_id: &ctx.request_id,
            hsts: self.tls.hsts.as_deref().filter(|_| ctx.tls),
        }
    }

    /// The proxy's own liveness, with how many clients each rate limit tracks.
    async fn health(&self, session: &mut Session, ctx: &RequestCtx) -> Result<()> {
        let keys: serde_json::Map<String, serde_json::Value> = self
            .routes
            .rate_limit_keys()
            .map(|(name, n)| (name.to_string(), n.into()))
            .collect();
        let body = serde_json::json!({"status": "ok", "rate_limit_keys": keys}).to_string();
        let mut header = ResponseHeader::build(200, Some(4))?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("cache-control", "no-store")?;
        respond::send(session, &self.stamp(ctx), header, bytes::Bytes::from(body)).await
    }

    /// Answers the request when the route's access rules refuse it; `Ok(true)` if answered.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        decision: Decision,
    ) -> Result<bool> {
        let stamp = self.stamp(ctx);
        match decision {
            Decision::Pass { .. } => return Ok(false),
            Decision::RateLimited { retry_after, limit } => {
                let (retry, limit) = (retry_after.to_string(), limit.to_string());
                let headers = [
                    ("retry-after", retry.as_str()),
                    ("ratelimit-limit", limit.as_str()),
                    ("ratelimit-remaining", "0"),
                    ("ratelimit-reset", retry.as_str()),
                ];
                let message = format!("too many requests; try again in {retry_after} s");
                respond::error_for_client_with(
                    session,
                    &stamp,
                    429,
                    "rate_limited",
                    &message,
                    &headers,
                )
                .await?;
            }
            Decision::Forbidden => {
                let message = "your address may not use this site";
                respond::error_for_client(session, &stamp, 403, "forbidden", message).await?;
            }
            Decision::Unauthorized { challenge } => {
                let headers = [("www-authenticate", challenge.as_str())];
                let message = "this site needs a user name and password";
                respond::error_for_client_with(
                    session,
                    &stamp,
                    401,
                    "unauthorized",
                    message,
                    &headers,
                )
                .await?;
            }
            Decision::TooManyFailures { retry_after } => {
                let retry = retry_after.to_string();
                let headers = [("retry-after", retry.as_str())];
                let message = format!("too many failed sign-ins; try again in {retry_after} s");
                respond::error_for_client_with(
                    session,
                    &stamp,
                    429,
                    "too_many_failures",
                    &message,
                    &headers,
                )
                .await?;
            }
        }
        Ok(true)
    }
}

/// Per-request state.
pub struct RequestCtx {
    _in_flight: InFlight,
    request_id: String,
    /// Whether this request came over TLS.
    tls: bool,
    /// The client, after trusted proxies are accounted for.
    client: IpAddr,
    /// Index of the matched route in the table.
    route: Option<usize>,
    /// The basic-auth user, once verified.
    user: Option<String>,
    /// Backends that failed this request; allocated only when one fails.
    failed: Vec<SocketAddr>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _in_flight: InFlight::enter(),
            request_id: String::new(),
            tls: false,
            client: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            route: None,
            user: None,
            failed: Vec::new(),
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let headers = &session.req_header().headers;
        ctx.request_id = headers
            .get("x-request-id")
            .and_then(|v| request_id::accept(v.as_bytes()))
            .map_or_else(request_id::generate, str::to_owned);
        if let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        {
            ctx.client =
                client_ip::client_ip(peer, &session.req_header().headers, &self.trusted_proxies);
        }
        ctx.tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        // Pingora's compression module reads `Accept-Encoding` between this phase and
        // `request_filter`, and only when it is on: on here, decided per route below.
        set_compression(session, COMPRESSION_LEVEL);
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Off for everything the proxy answers itself: static files are compressed once per
        // version by `statics`, never per request.
        set_compression(session, 0);
        let stamp = self.stamp(ctx);
        let raw_path = session.req_header().uri.path();

        // The proxy's own liveness, on every listener, never redirected.
        if raw_path == "/healthz" {
            self.health(session, ctx).await?;
            return Ok(true);
        }

        if !ctx.tls
            && let Some(redirect) = &self.tls.redirect
        {
            let request = session.req_header();
            let path_and_query = request.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let host = request.headers.get("host").map(|h| h.as_bytes());
            // 308 keeps the method and body; 301 is what every client follows for GET.
            let status = if matches!(request.method, http::Method::GET | http::Method::HEAD) {
                301
            } else {
                308
            };
            match redirect.location(host, path_and_query) {
                Some(location) => respond::redirect(session, &stamp, status, &location).await?,
                None => {
                    let message = "the Host header is missing or not a valid host name";
                    respond::json_error(session, &stamp, 400, "bad_host", message).await?
                }
            }
            return Ok(true);
        }

        let decoded = match path::check(raw_path) {
            Ok(decoded) => decoded.into_owned(),
            Err(path::Unsafe::Traversal) => {
                let message = "the path leaves its directory";
                respond::error_for_client(session, &stamp, 403, "forbidden", message).await?;
                return Ok(true);
            }
            Err(path::Unsafe::Encoding) => {
                let message = "the path is not valid UTF-8 once decoded";
                respond::json_error(session, &stamp, 400, "bad_request", message).await?;
                return Ok(true);
            }
        };

        // `/open` for the static route `/open/`: checked first, as `/` would take it otherwise.
        if self.routes.is_static_without_slash(&decoded) {
            let uri = &session.req_header().uri;
            let location = match uri.query() {
                Some(query) => format!("{}/?{query}", uri.path()),
                None => format!("{}/", uri.path()),
            };
            respond::redirect(session, &stamp, 301, &location).await?;
            return Ok(true);
        }
        let Some((index, (prefix, served, access))) = self
            .routes
            .lookup(&decoded)
            .and_then(|i| Some((i, self.routes.get(i)?)))
        else {
            let message = format!("no route for {decoded}");
            respond::json_error(session, &stamp, 404, "not_found", &message).await?;
            return Ok(true);
        };
        ctx.route = Some(index);

        let authorization = session
            .req_header()
            .headers
            .get("authorization")
            .map(|v| v.as_bytes());
        match access.check(ctx.client, authorization).await {
            Decision::Pass { user } => ctx.user = user,
            refused => return self.refuse(session, ctx, refused).await,
        }

        match served {
            Served::Static(site) => {
                site.serve(session, &self.stamp(ctx), prefix, &decoded)
                    .await?;
                Ok(true)
            }
            Served::Backends => {
                // `response_filter` turns it off again for small or binary responses.
                set_compression(session, COMPRESSION_LEVEL);
                Ok(false)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        match ctx.route.and_then(|i| self.routes.get(i)) {
            Some((_, Served::Backends, _)) => self.pool.select(&ctx.failed).ok_or_else(|| {
                Error::explain(ErrorType::HTTPStatus(503), "no backend is available")
            }),
            _ => Error::e_explain(
                ErrorType::InternalError,
                "no backend route chosen before upstream_peer",
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
        // A trusted proxy's chain is extended with the hop we saw; anyone else's is replaced,
        // so a backend never sees an address the edge did not vouch for.
        if let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip().to_canonical())
        {
            let chain = match client_ip::forwarded_chain(&upstream.headers) {
                Some(chain) if self.trusted_proxies.contains(peer) => format!("{chain}, {peer}"),
                _ => peer.to_string(),
            };
            upstream.insert_header("x-forwarded-for", chain)?;
            upstream.insert_header("x-real-ip", ctx.client.to_string())?;
        }
        upstream.insert_header("x-forwarded-proto", if ctx.tls { "https" } else { "http" })?;
        upstream.insert_header("x-request-id", &ctx.request_id)?;
        // Basic-auth credentials are the edge's business unless the route says otherwise.
        let keep = ctx
            .route
            .and_then(|i| self.routes.get(i))
            .is_none_or(|(_, _, a)| a.passes_authorization());
        if !keep {
            upstream.remove_header("authorization");
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        self.stamp(ctx).apply(response)?;
        // Large text responses (a big JSON listing) are compressed by Pingora's module, which
        // also negotiates `Accept-Encoding`; small ones are not worth it.
        let headers = &response.headers;
        let large = headers
            .get("content-length")
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<u64>().ok())
            .is_none_or(|len| len >= self.compress_min_bytes);
        let text = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(compressible);
        if !(large && text) {
            set_compression(session, 0);
        }
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (status, code, message) = classify(e);
        // Once a response has started, a second one would corrupt it: the connection is cut
        // instead (`can_reuse_downstream: false`), and the client sees a truncated body.
        let not_started = session.as_ref().response_written().is_none();
        if status != 0
            && not_started
            && let Err(write_error) =
                respond::json_error(session, &self.stamp(ctx), status, code, message).await
        {
            tracing::debug!(error = %write_error, "could not send the error response");
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }
}

fn set_compression(session: &mut Session, level: u32) {
    if let Some(compression) = session
        .downstream_modules_ctx
        .get_mut::<ResponseCompression>()
    {
        compression.adjust_level(level);
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
