//! The proxy's request phases, in the order Pingora runs them:
//!
//! 1. `early_request_filter`: take (from a trusted proxy) or make the request id; note TLS (and
//!    the connection's client certificate) and the client address.
//! 2. `request_filter`, the edge checks in a fixed order: the proxy's own `/healthz`; plain
//!    HTTP redirected to HTTPS; the path guard (traversal -> 403); the route lookup (none ->
//!    404); a CORS preflight answered (`preflight`); the client certificate a route requires
//!    (none -> 403, [`crate::client_cert`]); the route's access rules (rate limit ->
//!    429, allow/deny -> 403, basic auth -> 401); static routes are then answered here from
//!    files, and a simple `GET` or `HEAD` to the backends is forwarded here (`forward`, the
//!    fast path; see [`crate::forward`]).
//! 3. `upstream_peer` (everything else): pick a backend socket (round robin, healthy, not
//!    failed already).
//! 4. `fail_to_connect`, `error_while_proxy`: a failed backend is skipped on the retry.
//! 5. `upstream_request_filter`: forwarding headers, the client certificate's, the request id
//!    and the route's request header rules for the backend.
//! 6. `response_filter`: request id, HSTS, the route's response headers and CORS
//!    ([`respond::Stamp`]), compression of large backend responses.
//! 7. `fail_to_proxy`: errors become JSON bodies with the right status.
//! 8. `logging`: the request's metrics and access log line, once it is over.
//!
//! A route with a response cache answers its simple `GET` and `HEAD` requests in
//! `request_filter`, from memory or through the fast path ([`cached`]).

mod cached;

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use http::HeaderValue;
use pingora::{
    Error, ErrorSource, ErrorType, OrErr, Result,
    http::{RequestHeader, ResponseHeader},
    modules::http::compression::ResponseCompression,
    protocols::{l4::socket::SocketAddr, tls::SslDigest},
    upstreams::peer::HttpPeer,
};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use tokio::sync::OwnedSemaphorePermit;

use arc_swap::ArcSwap;

use crate::{
    access::{Decision, client_ip},
    acme::{Acme, challenges},
    client_cert::{self, ClientCert},
    client_shares::{ClientShares, Share},
    cors::Cors,
    drain::{Drain, InFlight},
    encoding::compressible,
    forward::{self, Failed},
    framing,
    header_rules::{
        self, HeaderEdit, Vars, X_CORRELATION_ID, X_FORWARDED_FOR, X_FORWARDED_PREFIX,
        X_FORWARDED_PROTO, X_REAL_IP, X_REQUEST_ID,
    },
    live::Live,
    metrics::{AccessRefusal, Cut},
    observe::Finished,
    path, request_id,
    respond::{self, RouteStamp, Stamp},
    rewrite::{PrefixRewrite, Unfit},
    routes::{LiveRoute, Served},
    upstream::{Chosen, Member, NoBackend, Pool},
};

/// gzip/brotli level for backend responses: a good ratio at a small CPU cost.
const COMPRESSION_LEVEL: u32 = 5;

/// Response header a backend uses to name the token's subject, for the access log; removed
/// before the response reaches the client.
static USER_HEADER: http::HeaderName = http::HeaderName::from_static("x-gatehouse-user");

pub struct Gateway {
    /// Everything a reload can change; each request keeps the version it started with.
    live: Arc<ArcSwap<Live>>,
    pool: Arc<Pool>,
    shares: Arc<ClientShares>,
    /// Each client's WebSockets (handshakes and open tunnels), held to their own cap: one
    /// lasts up to an hour, where a request lasts seconds.
    tunnels: Arc<ClientShares>,
    drain: Drain,
    /// Answers HTTP-01 challenges when certificates come from an ACME server.
    acme: Option<Arc<Acme>>,
    /// Backend responses kept for the routes with a cache.
    cache: Arc<crate::cache::Store>,
}

impl Gateway {
    pub fn new(
        live: Arc<ArcSwap<Live>>,
        pool: Arc<Pool>,
        drain: Drain,
        acme: Option<Arc<Acme>>,
        cache: Arc<crate::cache::Store>,
    ) -> Self {
        Self {
            live,
            pool,
            shares: Arc::default(),
            tunnels: Arc::default(),
            drain,
            acme,
            cache,
        }
    }

    fn stamp<'a>(&'a self, ctx: &'a RequestCtx) -> Stamp<'a> {
        Stamp {
            request_id: &ctx.request_id,
            correlation_id: ctx.correlation(),
            hsts: ctx.live.tls.hsts(ctx.site.as_deref()).filter(|_| ctx.tls),
            route: ctx.route.as_deref().map(|route| RouteStamp {
                headers: &route.headers,
                vars: ctx.vars(ctx.host.as_ref().map(HeaderValue::as_bytes)),
                allow_origin: ctx.allow_origin.as_ref(),
                site: match &route.served {
                    Served::Static(site) => Some(site),
                    Served::Backends | Served::Pool(_) | Served::Redirect(_) => None,
                },
            }),
        }
    }

    /// Answers a CORS preflight at the edge. It carries no credentials (the Fetch standard),
    /// so basic auth is not asked of it; the rate limit and address lists still hold.
    async fn preflight(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: &LiveRoute,
        cors: &Cors,
    ) -> Result<bool> {
        if let Some(refused) = route.access.check_address(ctx.client) {
            return self.refuse(session, ctx, refused).await;
        }
        match cors.preflight(session.req_header(), ctx.allow_origin.as_ref())? {
            Ok(answer) => {
                respond::send_head(session, &self.stamp(ctx), answer, None).await?;
            }
            Err(why) => {
                // A refused preflight names no origin: nothing in it allows anything.
                ctx.allow_origin = None;
                let stamp = self.stamp(ctx);
                respond::json_error(session, &stamp, 403, "cors_refused", &why).await?;
            }
        }
        Ok(true)
    }

    /// Answers a request a route's prefix rewrite cannot send on.
    async fn unfit(&self, session: &mut Session, ctx: &RequestCtx, unfit: Unfit) -> Result<bool> {
        let stamp = self.stamp(ctx);
        let (status, code, message) = match unfit {
            Unfit::Malformed => (
                400,
                "bad_request",
                "the target does not spell the route's prefix",
            ),
            Unfit::EmptySegment => (
                400,
                "bad_request",
                "the path has an empty segment after the route's prefix",
            ),
            Unfit::HealthCheck => (404, "not_found", "no route for this path"),
        };
        respond::json_error(session, &stamp, status, code, message).await?;
        Ok(true)
    }

    /// An HTTP-01 answer: the key authorization for `token`, or 404 if this proxy cannot
    /// give one (see [`Acme::http_answer`]).
    async fn acme_answer(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        acme: &Acme,
        token: &str,
    ) -> Result<()> {
        let stamp = self.stamp(ctx);
        let Some(answer) = acme.http_answer(token) else {
            let message = "no ACME challenge has this token";
            return respond::json_error(session, &stamp, 404, "not_found", message).await;
        };
        let mut header = ResponseHeader::build(200, Some(4))?;
        header.insert_header("content-type", "application/octet-stream")?;
        header.insert_header("cache-control", "no-store")?;
        respond::send(session, &stamp, header, bytes::Bytes::from(answer)).await
    }

    /// The proxy's own liveness (the admin listener has the details).
    async fn health(&self, session: &mut Session, ctx: &RequestCtx) -> Result<()> {
        let mut header = ResponseHeader::build(200, Some(4))?;
        header.insert_header("content-type", "application/json")?;
        header.insert_header("cache-control", "no-store")?;
        let body = bytes::Bytes::from_static(br#"{"status":"ok"}"#);
        respond::send(session, &self.stamp(ctx), header, body).await
    }

    /// Answers the request when the route's access rules refuse it; `Ok(true)` if answered.
    async fn refuse(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        decision: Decision,
    ) -> Result<bool> {
        let stamp = self.stamp(ctx);
        let refusal = match decision {
            Decision::Pass { .. } => None,
            Decision::RateLimited { .. } => Some(AccessRefusal::RateLimited),
            Decision::Forbidden => Some(AccessRefusal::Denied),
            Decision::Unauthorized { .. } | Decision::TooManyFailures { .. } => {
                Some(AccessRefusal::AuthFailed)
            }
        };
        let series = ctx.route.as_ref().and_then(|r| r.observer.series());
        if let (Some(series), Some(refusal)) = (series, refusal) {
            series.refused(refusal);
        }
        let guard = match decision {
            Decision::RateLimited { .. } => Some("rate_limit"),
            Decision::TooManyFailures { .. } => Some("basic_auth_guard"),
            _ => None,
        };
        if let (Some(guard), Some(route)) = (guard, &ctx.route) {
            let event = crate::guard_events::Tripped {
                guard,
                client: ctx.client,
                route: &route.prefix,
                request_id: &ctx.request_id,
                correlation_id: ctx.correlation(),
            };
            crate::guard_events::tripped(&self.pool, &event);
        }
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
    live: Arc<Live>,
    started: Instant,
    request_id: String,
    /// A trusted proxy's `X-Correlation-ID`; `None`: the request id is the correlation id.
    correlation_id: Option<String>,
    /// Whether this request came over TLS.
    tls: bool,
    /// The connection's TLS digest, kept only when it holds a verified client certificate
    /// ([`RequestCtx::client_cert`]).
    client_cert: Option<Arc<SslDigest>>,
    /// The client, after trusted proxies are accounted for.
    client: IpAddr,
    /// The matched route, from the same [`Live`].
    route: Option<Arc<LiveRoute>>,
    /// The basic-auth user, once verified.
    user: Option<String>,
    /// Backends that failed this request; allocated only when one fails.
    failed: Vec<SocketAddr>,
    /// The backend chosen last, and when.
    upstream: Option<(Arc<str>, Instant)>,
    /// From choosing the backend to its response header.
    upstream_time: Option<Duration>,
    /// Request body bytes received so far.
    body_bytes: u64,
    /// The chosen backend's slot (`upstream`), held until the request is over: Pingora
    /// keeps the backend connection until the client has the whole response.
    slot: Option<OwnedSemaphorePermit>,
    /// The client's share of requests in flight to the backends.
    share: Option<Share>,
    /// The request's host, kept only when the route's response rules name `$host`.
    host: Option<HeaderValue>,
    /// `Access-Control-Allow-Origin` for this request, on a CORS route.
    allow_origin: Option<HeaderValue>,
    /// Held while the connection is upgraded (a WebSocket): counts it open.
    upgraded: Option<Upgraded>,
    /// The client's share of WebSockets, held from the handshake to the tunnel's end.
    tunnel: Option<Share>,
    /// The target the backend gets, on a route that rewrites its prefix.
    upstream_target: Option<Vec<u8>>,
    /// What a named pool's hash policy ranks its servers by, for this request.
    hash_key: Option<u64>,
    /// The site the request's host names, where routes name hosts (`None`: the default).
    site: Option<String>,
    /// On a route with a cache: what it did for this request (`X-Cache`).
    cache_status: Option<crate::cache::Status>,
    /// Body bytes served from the cache.
    cache_served: usize,
    /// A failure answered in full with its JSON error (`fail_to_proxy`).
    failure_answered: bool,
}

/// An upgraded connection, counted in `gatehouse_upgraded_connections_open` until the
/// request ends.
struct Upgraded(prometheus::IntGauge);

impl Upgraded {
    fn new(metrics: Option<&crate::metrics::Metrics>) -> Option<Self> {
        let metrics = metrics?;
        metrics.upgrades.inc();
        metrics.upgrades_open.inc();
        Some(Self(metrics.upgrades_open.clone()))
    }
}

impl Drop for Upgraded {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl RequestCtx {
    fn correlation(&self) -> &str {
        self.correlation_id.as_deref().unwrap_or(&self.request_id)
    }

    /// The connection's verified client certificate.
    fn client_cert(&self) -> Option<&ClientCert> {
        self.client_cert.as_deref().and_then(ClientCert::of)
    }

    fn vars<'a>(&'a self, host: Option<&'a [u8]>) -> Vars<'a> {
        Vars {
            client: self.client,
            request_id: &self.request_id,
            tls: self.tls,
            host,
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _in_flight: self.drain.enter(),
            live: self.live.load_full(),
            started: Instant::now(),
            request_id: String::new(),
            correlation_id: None,
            tls: false,
            client_cert: None,
            client: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            route: None,
            user: None,
            failed: Vec::new(),
            upstream: None,
            upstream_time: None,
            body_bytes: 0,
            slot: None,
            share: None,
            host: None,
            allow_origin: None,
            upgraded: None,
            tunnel: None,
            upstream_target: None,
            hash_key: None,
            site: None,
            cache_status: None,
            cache_served: 0,
            failure_answered: false,
        }
    }

    async fn early_request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let headers = &session.req_header().headers;
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        // An id from a proxy we trust ties our logs to its own; anyone else's is replaced, so
        // a client cannot plant ids in our logs.
        let live = Arc::clone(&ctx.live);
        let trusted = peer.is_some_and(|p| live.trusted_proxies.contains(p.to_canonical()));
        ctx.request_id = headers
            .get("x-request-id")
            .filter(|_| trusted)
            .and_then(|v| request_id::accept(v.as_bytes()))
            .map_or_else(request_id::generate, str::to_owned);
        // The same for the id of a transaction that spans several requests and services.
        ctx.correlation_id = headers
            .get(&X_CORRELATION_ID)
            .filter(|_| trusted)
            .and_then(|v| request_id::accept(v.as_bytes()))
            .map(str::to_owned);
        if let Some(peer) = peer {
            ctx.client =
                client_ip::client_ip(peer, headers, &live.trusted_proxies, live.client_ip_header);
        }
        let ssl = session.digest().and_then(|d| d.ssl_digest.as_ref());
        ctx.tls = ssl.is_some();
        ctx.client_cert = ssl.filter(|d| ClientCert::of(d).is_some()).cloned();
        // HTTP/1 sessions got theirs as they were made (`connection`); an HTTP/2 stream's
        // covers its waits for flow-control credit too, so a client that opens a zero window
        // and never reads loses the stream.
        if session.is_http2() {
            session.set_write_timeout(Some(live.limits.send_timeout));
        }
        if self.drain.leaving() {
            session.set_keepalive(None);
        }
        Ok(())
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let live = Arc::clone(&ctx.live);
        // The site, by the host asked for, when routes name hosts: first, as its HSTS choice
        // goes on every answer. A host that cannot be read is refused (below) rather than
        // served by the default site: a backend behind it might read it as the protected
        // host it nearly names.
        let mut unreadable_host = false;
        if live.routes.has_hosts() {
            let request = session.req_header();
            let host = header_rules::request_host(request);
            let name = host.as_ref().and_then(|h| h.to_str().ok());
            ctx.site = live.routes.site(name.map(host_without_port));
            unreadable_host = host.is_none() && header_rules::raw_request_host(request).is_some();
        }
        let stamp = self.stamp(ctx);

        // HTTP/1 headers were checked, and the body's read timeout set, as they arrived
        // (`connection`).
        if session.is_http2()
            && let Some(reply) = framing::check_h2(session, &live.limits)
        {
            respond::json_error(session, &stamp, reply.status, reply.code, reply.message).await?;
            return Ok(true);
        }
        let raw_path = session.req_header().uri.path();

        // The proxy's own liveness, on every listener, never redirected.
        if raw_path == "/healthz" {
            self.health(session, ctx).await?;
            return Ok(true);
        }
        // Before the redirect to HTTPS, which an HTTP-01 check must not get, and before the
        // routes and their access rules: the ACME server is no client of theirs.
        if !ctx.tls
            && let Some(acme) = &self.acme
            && let Some(token) = raw_path.strip_prefix(challenges::HTTP_PATH)
        {
            let token = token.to_owned();
            self.acme_answer(session, ctx, acme, &token).await?;
            return Ok(true);
        }

        if unreadable_host {
            let message = "the Host header is not a valid host name";
            respond::json_error(session, &stamp, 400, "bad_host", message).await?;
            return Ok(true);
        }
        let site = ctx.site.as_deref();

        if !ctx.tls
            && let Some(redirect) = live.tls.redirect(site)
        {
            let request = session.req_header();
            let path_and_query = request.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let host = header_rules::raw_request_host(request);
            let status = redirect_status(&request.method);
            // A host routes name is its own site: redirected to itself, not to the server name.
            match redirect.location(host, path_and_query, site.is_some()) {
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
        if live.routes.is_static_without_slash(site, &decoded) {
            let uri = &session.req_header().uri;
            let location = match uri.query() {
                Some(query) => format!("{}/?{query}", uri.path()),
                None => format!("{}/", uri.path()),
            };
            respond::redirect(session, &stamp, 301, &location).await?;
            return Ok(true);
        }
        let Some(route) = live.routes.lookup(site, &decoded) else {
            let message = format!("no route for {decoded}");
            respond::json_error(session, &stamp, 404, "not_found", &message).await?;
            return Ok(true);
        };
        ctx.route = Some(Arc::clone(route));
        if route.headers.response.uses_host() {
            ctx.host = header_rules::request_host(session.req_header());
        }
        if let Some(cors) = &route.headers.cors {
            let request = session.req_header();
            ctx.allow_origin = cors.allow_origin(request);
            if Cors::is_preflight(request) {
                return self.preflight(session, ctx, route, cors).await;
            }
        }

        // A property of the connection, like its address: checked before the rules that
        // count or ask for a password.
        if route.requires_client_cert && ctx.client_cert.is_none() {
            if let Some(series) = route.observer.series() {
                series.refused(AccessRefusal::Denied);
            }
            let message = "this route needs a client certificate";
            respond::error_for_client(
                session,
                &self.stamp(ctx),
                403,
                "client_certificate_required",
                message,
            )
            .await?;
            return Ok(true);
        }

        let authorization = session
            .req_header()
            .headers
            .get("authorization")
            .map(|v| v.as_bytes());
        match route.access.check(ctx.client, authorization).await {
            Decision::Pass { user } => ctx.user = user,
            refused => return self.refuse(session, ctx, refused).await,
        }

        match &route.served {
            Served::Static(site) => {
                let series = route.observer.series();
                site.serve(session, &self.stamp(ctx), &route.prefix, &decoded, series)
                    .await?;
                Ok(true)
            }
            Served::Redirect(to) => {
                let request = session.req_header();
                let location = match to.upstream_target(request.raw_path()) {
                    Ok(target) => target,
                    Err(unfit) => return self.unfit(session, ctx, unfit).await,
                };
                // The rest of the target is as the client sent it, which HTTP limits to
                // ASCII; anything else is refused rather than sent back in a header.
                let Some(location) = std::str::from_utf8(&location).ok().filter(|l| l.is_ascii())
                else {
                    let message = "the target is not ASCII";
                    respond::json_error(session, &self.stamp(ctx), 400, "bad_request", message)
                        .await?;
                    return Ok(true);
                };
                let status = redirect_status(&request.method);
                respond::redirect(session, &self.stamp(ctx), status, location).await?;
                Ok(true)
            }
            served @ (Served::Backends | Served::Pool(_)) => {
                if let Some(rewrite) = &route.rewrite {
                    match rewrite.upstream_target(session.req_header().raw_path()) {
                        Ok(target) => ctx.upstream_target = Some(target),
                        Err(unfit) => return self.unfit(session, ctx, unfit).await,
                    }
                }
                let cap = live.limits.max_upstream_requests_per_client;
                let Some(share) = self.shares.enter(ctx.client, cap) else {
                    if let Some(metrics) = &live.metrics {
                        metrics.upstream_client_limits.inc();
                    }
                    let message = "too many of your requests are in flight; try again in 1 s";
                    let headers = [("retry-after", "1")];
                    respond::json_error_with(
                        session,
                        &self.stamp(ctx),
                        429,
                        "too_many_in_flight",
                        message,
                        &headers,
                    )
                    .await?;
                    return Ok(true);
                };
                ctx.share = Some(share);
                if is_websocket_handshake(session.req_header()) {
                    let cap = live.limits.max_upgraded_per_client;
                    let Some(tunnel) = self.tunnels.enter(ctx.client, cap) else {
                        let message = "too many of your WebSockets are open; close one first";
                        respond::json_error(
                            session,
                            &self.stamp(ctx),
                            429,
                            "too_many_upgraded",
                            message,
                        )
                        .await?;
                        return Ok(true);
                    };
                    ctx.tunnel = Some(tunnel);
                }
                let fast = match served {
                    Served::Pool(pool) => {
                        ctx.hash_key = pool.request_key(session, ctx.client);
                        pool.plain_http()
                    }
                    _ => true,
                };
                if fast && forward::eligible(session) {
                    if let Some(policy) = &route.cache {
                        return self.cached(session, ctx, policy).await;
                    }
                    return self.forward(session, ctx).await;
                }
                Ok(false)
            }
        }
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // An upgraded connection's bytes are the conversation, not a request body: bounded by
        // its idle deadline and the backend slot it holds, not by a size.
        if session.was_upgraded() {
            return Ok(());
        }
        // Chunked bodies announce no length: counted as they arrive.
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        if ctx.body_bytes > ctx.live.limits.max_body_bytes {
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                "the request body is over the limit",
            );
        }
        Ok(())
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(Served::Backends | Served::Pool(_)) = ctx.route.as_ref().map(|r| &r.served) else {
            return Error::e_explain(
                ErrorType::InternalError,
                "no backend route chosen before upstream_peer",
            );
        };
        // A retry gives back the failed backend's slot before it asks for another.
        ctx.slot = None;
        let chosen = self.choose(ctx).await?;
        ctx.slot = Some(chosen.slot);
        let mut peer = chosen.member.peer.clone();
        // A WebSocket handshake waits on its backend as long as the connection may idle once
        // upgraded: Pingora reads its timeouts from the peer when it connects, so they cannot
        // change at the 101. Any other `Upgrade` (which Pingora strips) keeps the pool's.
        if is_websocket_handshake(session.req_header()) {
            let idle = Some(ctx.live.limits.upgrade_idle_timeout);
            peer.options.read_timeout = idle;
            peer.options.write_timeout = idle;
        }
        Ok(Box::new(peer))
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
        self.upstream_error(ctx, "connect");
        e.set_retry(true);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
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
        // A kept-alive connection the server closed while it was idle is no fault of the
        // server's: the request is sent again without marking it failed (Pingora bounds the
        // retries), so a pool of one server does not answer 503 for it.
        let stale = client_reused
            && matches!(
                e.etype(),
                ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
            );
        if retry && !stale {
            ctx.failed.push(peer._address.clone());
        }
        if *e.esource() == ErrorSource::Upstream && !stale {
            self.upstream_error(ctx, if timed_out { "timeout" } else { "error" });
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
        // Through Pingora's own methods, which keep the client's header-name case.
        forwarding_headers(session, upstream, ctx)?;
        if let Some(target) = &ctx.upstream_target {
            upstream.set_raw_path(target)?;
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if response.status == http::StatusCode::SWITCHING_PROTOCOLS && session.is_upgrade_req() {
            // From here the client's reads wait for the conversation, not for a body.
            session.set_read_timeout(Some(ctx.live.limits.upgrade_idle_timeout));
            ctx.upgraded = Upgraded::new(ctx.live.metrics.as_deref());
        }
        // Only Pingora's path carries methods that change a resource.
        if ctx.route.as_ref().is_some_and(|r| r.cache.is_some()) {
            self.invalidate_after(session, ctx, response.status.as_u16());
        }
        self.prepare_response(session, response, ctx)
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
        // The connection is closed after this response: say so, or a keep-alive client would
        // send its next request into the closing connection.
        session.set_keepalive(None);
        // A 503 is the pool being down or full for now: say when to come back.
        let retry: &[(&'static str, &str)] = if status == 503 {
            &[("retry-after", "1")]
        } else {
            &[]
        };
        if status != 0 && not_started {
            match respond::json_error_with(session, &self.stamp(ctx), status, code, message, retry)
                .await
            {
                Ok(()) => ctx.failure_answered = true,
                Err(write_error) => {
                    tracing::debug!(error = %write_error, request_id = %ctx.request_id, "could not send the error response");
                }
            }
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// Pingora's own log lines about a request (a failed proxy attempt) carry its id, and
    /// never its query, which may carry a token (Pingora's own summary has it).
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        let request = session.req_header();
        format!(
            "{} {}, request_id: {}",
            request.method,
            request.uri.path(),
            ctx.request_id
        )
    }

    /// A client's own failures (gone, too slow to send or to read) and a full pool's 503s are
    /// in the access log and the metrics; a line each in the error log would let any client
    /// flood it, and most when the edge is busiest.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        *error.esource() == ErrorSource::Downstream
            || client_failed(error)
            || error.etype() == &ErrorType::HTTPStatus(503)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if e.is_some_and(sent_too_slowly)
            && let Some(metrics) = &ctx.live.metrics
        {
            metrics.cut(Cut::SendTimeout);
        }
        self.observe(session, ctx);
        // After the record: the wait is the client's, not the request's. What the request
        // holds (a backend slot, its client's shares) goes back first. Only after a whole
        // answer: a response cut short is reset anyway, and a client that failed is gone.
        if e.is_none() || ctx.failure_answered {
            ctx.slot = None;
            ctx.share = None;
            ctx.tunnel = None;
            respond::linger_h2(session).await;
        }
    }
}

impl Gateway {
    /// The pool the request's route sends it to.
    fn pool_of<'a>(&'a self, ctx: &'a RequestCtx) -> &'a crate::upstream::Pool {
        match ctx.route.as_ref().map(|r| &r.served) {
            Some(Served::Pool(pool)) => pool,
            _ => &self.pool,
        }
    }

    /// A backend for the request, and its slot; the request is now charged to it.
    async fn choose(&self, ctx: &mut RequestCtx) -> Result<Chosen> {
        let chosen = self
            .pool_of(ctx)
            .select(&ctx.failed, ctx.hash_key)
            .await
            .map_err(|why| {
                if why == NoBackend::Full
                    && let Some(metrics) = &ctx.live.metrics
                {
                    metrics.upstream_queue_timeouts.inc();
                }
                Error::explain(ErrorType::HTTPStatus(503), "no backend is available")
            })?;
        ctx.upstream = Some((chosen.member.id.clone(), Instant::now()));
        Ok(chosen)
    }

    /// The fast path ([`forward`]): `Ok(true)` once answered, `Ok(false)` when the request is
    /// to take Pingora's path after all (what failed is in `ctx.failed`, as after a failed
    /// attempt there).
    async fn forward(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let chosen = self.choose(ctx).await?;
        let Some((member, answer)) = self.exchange(session, ctx, chosen).await? else {
            // Behind TLS: Pingora's path, which picks again.
            return Ok(false);
        };
        let mut exchange = match answer {
            Ok(exchange) => exchange,
            Err(failed) => {
                match failed {
                    // The backend is not to blame: Pingora's path may pick it again.
                    Failed::Stale(e) => {
                        tracing::debug!(backend = %member.id, error = %e, "idle connection was closed; sent again");
                    }
                    Failed::Connect(e) => {
                        tracing::debug!(backend = %member.id, error = %e, "cannot connect; next backend");
                        ctx.failed.push(member.peer._address.clone());
                        self.upstream_error(ctx, "connect");
                    }
                    // A hung backend answers 504 once, not once per backend.
                    Failed::Backend(e) if forward::is_timeout(&e) => {
                        self.upstream_error(ctx, "timeout");
                        return Err(e.into_up());
                    }
                    Failed::Backend(_) => {
                        ctx.failed.push(member.peer._address.clone());
                        self.upstream_error(ctx, "error");
                    }
                }
                return Ok(false);
            }
        };
        exchange.chunk_if_close_delimited(session.req_header())?;
        self.relay(session, ctx, exchange, &member).await
    }

    /// The fast path's response, as the filters leave it, to the client.
    async fn relay(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut exchange: forward::Exchange,
        member: &Member,
    ) -> Result<bool> {
        self.prepare_response(session, &mut exchange.response.headers, ctx)?;
        exchange
            .relay(session, member)
            .await
            .inspect_err(|e| self.failed_midway(ctx, e))?;
        Ok(true)
    }

    /// Counts a failure reading a backend's response body.
    fn failed_midway(&self, ctx: &RequestCtx, e: &Error) {
        if *e.esource() == ErrorSource::Upstream {
            let kind = if forward::is_timeout(e) {
                "timeout"
            } else {
                "error"
            };
            self.upstream_error(ctx, kind);
        }
    }

    /// The fast path's exchange with `chosen`'s backend: the request sent and the response
    /// header read, under the backend's slot (given back if it failed). `None`: a backend
    /// behind TLS, which the fast path does not reach.
    async fn exchange(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        chosen: Chosen,
    ) -> Result<Option<(Arc<Member>, Result<forward::Exchange, Failed>)>> {
        let member = chosen.member;
        if member.dial.is_none() {
            return Ok(None);
        }
        ctx.slot = Some(chosen.slot);
        let request = self.upstream_request(session, ctx)?;
        let send = forward::send(&member, request, self.pool_of(ctx).deadlines());
        let answer = answer_or_client_gone(session, send).await?;
        if answer.is_err() {
            ctx.slot = None;
        }
        Ok(Some((member, answer)))
    }

    /// The request as the fast path sends it to a backend.
    fn upstream_request(&self, session: &Session, ctx: &RequestCtx) -> Result<RequestHeader> {
        let mut parts = forward::upstream_parts(session);
        forwarding_headers(session, &mut parts.headers, ctx)?;
        let target = ctx
            .upstream_target
            .as_deref()
            .unwrap_or(session.req_header().raw_path());
        forward::upstream_request(parts, target).map_err(|e| e.into_down())
    }

    /// The backend's response headers as the client gets them (both paths: Pingora's
    /// response header, or the fast path's plain map).
    fn prepare_response(
        &self,
        session: &mut Session,
        headers: &mut impl HeaderEdit,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.route.as_ref().is_some_and(|r| r.headers.cors.is_some()) {
            Cors::remove_backends(headers);
        }
        if let Some(rewrite) = ctx.route.as_ref().and_then(|r| r.rewrite.as_ref())
            && let Some(location) = headers.map().get(http::header::LOCATION)
        {
            let host = header_rules::request_host(session.req_header());
            if let Some(mapped) = rewrite.location(location, host.as_ref().map(|h| h.as_bytes())) {
                headers.put(&http::header::LOCATION, mapped)?;
            }
        }
        self.stamp(ctx).apply(headers)?;
        if ctx.route.as_ref().is_some_and(|r| r.cache.is_some()) {
            let status = *ctx.cache_status.get_or_insert(crate::cache::Status::Bypass);
            cached::mark(headers, status)?;
        }
        ctx.upstream_time = ctx.upstream.as_ref().map(|(_, at)| at.elapsed());
        if let Some(user) = headers.take(&USER_HEADER)
            && ctx.user.is_none()
        {
            ctx.user = user.to_str().ok().map(str::to_owned);
        }
        // Large text responses (a big JSON listing) are compressed by Pingora's module, which
        // also negotiates `Accept-Encoding`; small ones are not worth it. The module is off
        // until here (Pingora's default), so nothing else pays for reading `Accept-Encoding`:
        // static files are compressed once per version by `statics`, never per request.
        let headers = headers.map();
        let large = content_length(headers).is_none_or(|len| len >= ctx.live.compress_min_bytes);
        let text = headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(compressible);
        if large && text {
            compress(session);
        }
        Ok(())
    }
}

/// The forwarding headers, the request id and the host for the backend (both paths: Pingora's
/// request header, or the fast path's plain map).
fn forwarding_headers(
    session: &Session,
    upstream: &mut impl HeaderEdit,
    ctx: &RequestCtx,
) -> Result<()> {
    if let Some(host) = forward::authority_host(session.req_header()).map_err(|e| e.into_down())? {
        upstream.put(&http::header::HOST, host)?;
    }
    // A trusted proxy's chain is extended with the hop we saw; anyone else's is replaced,
    // so a backend never sees an address the edge did not vouch for.
    if let Some(peer) = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical())
    {
        let hop = ip_text(peer);
        // Without a trusted proxy in front, the client is the peer: written once.
        let client = if ctx.client == peer {
            hop.clone()
        } else {
            ip_text(ctx.client)
        };
        let chain = match client_ip::forwarded_chain(upstream.map()) {
            Some(chain) if ctx.live.trusted_proxies.contains(peer) => format!("{chain}, {hop}"),
            _ => hop,
        };
        upstream.put(&X_FORWARDED_FOR, made_value(chain)?)?;
        upstream.put(&X_REAL_IP, made_value(client)?)?;
    } else {
        // No address of our own to vouch for: pass on none of the client's.
        upstream.drop_all(&X_FORWARDED_FOR);
        upstream.drop_all(&X_REAL_IP);
    }
    let proto = HeaderValue::from_static(if ctx.tls { "https" } else { "http" });
    upstream.put(&X_FORWARDED_PROTO, proto)?;
    upstream.put(&X_REQUEST_ID, made_value(ctx.request_id.clone())?)?;
    upstream.put(&X_CORRELATION_ID, made_value(ctx.correlation().to_owned())?)?;
    // Basic-auth credentials are the edge's business unless the route says otherwise.
    let keep = ctx
        .route
        .as_ref()
        .is_none_or(|r| r.access.passes_authorization());
    if !keep {
        upstream.drop_all(&http::header::AUTHORIZATION);
    }
    // Only the edge says what prefix it removed.
    upstream.drop_all(&X_FORWARDED_PREFIX);
    if ctx.upstream_target.is_some() {
        let rewrite = ctx.route.as_ref().and_then(|r| r.rewrite.as_ref());
        if let Some(prefix) = rewrite.and_then(PrefixRewrite::forwarded_prefix) {
            upstream.put(&X_FORWARDED_PREFIX, prefix.clone())?;
        }
    }
    // Only the edge says who the client's certificate names, on every route: a backend
    // signs in as the user it names.
    client_cert::forward(upstream, ctx.client_cert(), &ctx.live.tls.client_users)?;
    if let Some(route) = &ctx.route
        && !route.headers.request.is_empty()
    {
        let host = header_rules::request_host(session.req_header());
        let vars = ctx.vars(host.as_ref().map(HeaderValue::as_bytes));
        route.headers.request.apply(upstream, &vars)?;
    }
    Ok(())
}

/// How long the fast path waits for a backend before it also watches the client: most
/// answers come sooner, and watching costs a read on the client's socket.
const WATCH_CLIENT_AFTER: Duration = Duration::from_millis(100);

/// The backend's answer to `send`, unless the client goes away first (Pingora's path notices
/// that too): a request nobody will read must not hold its backend slot and its client's share
/// until the backend's deadline.
async fn answer_or_client_gone<T>(
    session: &mut Session,
    send: impl std::future::Future<Output = T>,
) -> Result<T> {
    let mut send = std::pin::pin!(send);
    if let Ok(answer) =
        pingora_timeout::fast_timeout::fast_timeout(WATCH_CLIENT_AFTER, &mut send).await
    {
        return Ok(answer);
    }
    tokio::select! {
        answer = &mut send => Ok(answer),
        // No body is expected: whatever the client does now (closing, or sending more) ends
        // the request, as on Pingora's path.
        _ = session.downstream_session.read_body_or_idle(true) => Error::e_explain(
            ErrorType::ConnectionClosed,
            "the client went away while the backend was answering",
        )
        .map_err(|e| e.into_down()),
    }
}

/// A WebSocket opening handshake (RFC 6455, 4.1): an HTTP/1.1 `GET` asking to upgrade to
/// `websocket`, with its key.
fn is_websocket_handshake(request: &RequestHeader) -> bool {
    let headers = &request.headers;
    request.method == http::Method::GET
        && request.version == http::Version::HTTP_11
        && headers
            .get(http::header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && headers.contains_key(http::header::SEC_WEBSOCKET_KEY)
}

/// `host[:port]` (already checked, lower case) without its port, or the dot that may end a
/// fully qualified name (`shop.example.` is `shop.example`).
fn host_without_port(host: &str) -> &str {
    let name = match host.rsplit_once(':') {
        // `[v6]:port`, or `name:port`; a bare `[v6]` has no port.
        Some((name, port)) if !port.contains(']') => name,
        _ => host,
    };
    name.strip_suffix('.').unwrap_or(name)
}

/// A response's `Content-Length`, when it is a number.
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// A header value of text made here, taken over without a copy.
fn made_value(text: String) -> Result<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).or_err(
        ErrorType::InvalidHTTPHeader,
        "a header value made by the proxy",
    )
}

/// An address as text; IPv4 without `Display`'s padding machinery, which costs more than the
/// rest of the forwarding headers together.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut text = String::with_capacity(15);
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
    text
}

impl Gateway {
    fn upstream_error(&self, ctx: &RequestCtx, kind: &str) {
        if let (Some(metrics), Some((id, _))) = (&ctx.live.metrics, &ctx.upstream) {
            metrics.upstream_error(id, kind);
        }
    }

    /// The request's metrics and access log line.
    fn observe(&self, session: &Session, ctx: &mut RequestCtx) {
        // No response at all: the client went away first (nginx's 499).
        let status = session
            .as_ref()
            .response_written()
            .map_or(499, |r| r.status.as_u16());
        let request = session.req_header();
        let observer = match &ctx.route {
            Some(route) => &route.observer,
            None => &ctx.live.unrouted,
        };
        if let (Some(status), Some(series)) = (ctx.cache_status, observer.series()) {
            series.cached(status, ctx.cache_served);
        }
        observer.finished(Finished {
            elapsed: ctx.started.elapsed(),
            request_id: std::mem::take(&mut ctx.request_id),
            correlation_id: ctx.correlation_id.take(),
            client: ctx.client,
            method: Some(&request.method),
            path: request.uri.path(),
            http2: session.is_http2(),
            status,
            bytes: session.as_ref().body_bytes_sent(),
            upstream: ctx.upstream.as_ref().map(|(id, _)| id),
            upstream_duration: ctx.upstream_time,
            user: ctx.user.take(),
            headers: Some(&request.headers),
            cache: ctx.cache_status,
        });
    }
}

/// Turns Pingora's compression module on for this response, with the client's
/// `Accept-Encoding`.
fn compress(session: &mut Session) {
    if let Some(compression) = session
        .downstream_modules_ctx
        .get_mut::<ResponseCompression>()
    {
        compression.adjust_level(COMPRESSION_LEVEL);
        compression.request_filter(session.downstream_session.req_header());
    }
}

/// Whether the client stopped reading past the send deadline. Writes the proxy makes itself
/// (static files, refusals) fail with no source set, so anything not the backend's counts.
fn sent_too_slowly(e: &Error) -> bool {
    e.etype() == &ErrorType::WriteTimedout && *e.esource() != ErrorSource::Upstream
}

/// Whether the client's side of the connection failed (gone, too slow to send or to read).
/// Writes and reads the proxy makes itself (static files) fail with no source set, so
/// anything not the backend's counts.
fn client_failed(e: &Error) -> bool {
    use ErrorType::*;
    *e.esource() != ErrorSource::Upstream
        && matches!(
            e.etype(),
            ReadError | WriteError | ReadTimedout | WriteTimedout | ConnectionClosed
        )
}

/// Maps a failure to the status, code and message the client sees. Status 0: the client is
/// gone, nothing to send.
fn classify(e: &Error) -> (u16, &'static str, &'static str) {
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (_, HTTPStatus(503)) => (503, "unavailable", "no backend is available"),
        (_, HTTPStatus(413)) => (
            413,
            "payload_too_large",
            "the request body is larger than this server accepts",
        ),
        (_, HTTPStatus(code)) if (400..500).contains(code) => {
            (*code, "bad_request", "the request is malformed")
        }
        (_, HTTPStatus(code)) => (*code, "upstream_error", "the request failed"),
        (ErrorSource::Upstream, ConnectTimedout | ReadTimedout | WriteTimedout) => {
            (504, "gateway_timeout", "the backend did not answer in time")
        }
        (ErrorSource::Upstream, _) => (502, "bad_gateway", "the backend failed to answer"),
        // Gone, or stopped reading (the send deadline): nothing more can be sent to it.
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => (0, "", ""),
        (source, WriteTimedout) if *source != ErrorSource::Upstream => (0, "", ""),
        (ErrorSource::Downstream, ReadTimedout) => (
            408,
            "request_timeout",
            "the request was not received in time",
        ),
        (ErrorSource::Downstream, _) => (400, "bad_request", "the request is malformed"),
        _ => (500, "internal", "the proxy failed to handle the request"),
    }
}

/// 308 keeps the method and body; 301 is what every client follows for GET and HEAD.
fn redirect_status(method: &http::Method) -> u16 {
    if matches!(*method, http::Method::GET | http::Method::HEAD) {
        301
    } else {
        308
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "100.99.255.9",
            "255.255.255.255",
            "::1",
        ] {
            let ip: IpAddr = ip.parse().expect("address");
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }
}
