//! Requests to a route with a response cache ([`crate::cache`]): answered from memory when
//! they can be, otherwise fetched from the backends on the fast path ([`crate::forward`]),
//! with every failover decision made here so that a kept response can stand in when every
//! backend fails.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, header};
use pingora::{Error, Result, http::ResponseHeader, protocols::http::HttpTask};
use pingora_proxy::Session;

use super::{Gateway, RequestCtx, host_without_port};
use crate::{
    cache::{self, Entry, Freshness, Key, RoutePolicy, Status, Store, Turn},
    forward::{self, Failed},
    header_rules,
    upstream::{Member, Pool},
};

static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Request headers that ask for part of a response, or for one only if it changed.
static PARTIAL: [HeaderName; 6] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
];

/// Failed attempts on one request beyond one per backend: connections the backend closed
/// while idle, which are no fault of its own.
const MAX_STALE_RETRIES: usize = 2;

impl Gateway {
    /// A `GET` or `HEAD` without a body on a cache route. `Ok(false)`: Pingora's path is to
    /// take it after all (a pool behind TLS, which the config does not allow to cache).
    pub(super) async fn cached(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        policy: &RoutePolicy,
    ) -> Result<bool> {
        let request = session.req_header();
        let head = request.method == Method::HEAD;
        let headers = &request.headers;
        // Credentials the backend will see: basic auth the edge checks and keeps to itself
        // cannot change the backend's answer.
        let passes_authorization = ctx
            .route
            .as_ref()
            .is_none_or(|r| r.access.passes_authorization());
        let credentials = headers.contains_key(header::COOKIE)
            || (headers.contains_key(header::AUTHORIZATION) && passes_authorization);
        // A range or a conditional request may be answered from the cache, but its own
        // answer (`206`, `304`) is not a response to keep, nor one to wait for.
        let partial = PARTIAL.iter().any(|name| headers.contains_key(name));
        let host = header_rules::request_host(request);
        let host = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .map_or("", host_without_port);
        let key = Key::new(ctx.tls, host, request.raw_path());
        let store = Arc::clone(&self.cache);
        let mut waited = false;
        loop {
            let found = store.lookup(key.clone(), &session.req_header().headers);
            // Credentials get only what the response said any client may have.
            let usable = found.entry.filter(|e| !credentials || e.public());
            if let Some(entry) = &usable {
                match entry.freshness() {
                    Freshness::Fresh => {
                        return self.serve_kept(session, ctx, entry, Status::Hit).await;
                    }
                    Freshness::Revalidate => {
                        self.refresh(session, ctx, &store, found.key.clone(), policy, credentials)?;
                        return self.serve_kept(session, ctx, entry, Status::Stale).await;
                    }
                    Freshness::OnError | Freshness::Gone => {}
                }
            }
            let stale = usable.filter(|e| e.serves_on_error());
            // A request that is not to wait for another's answer: one whose answer would not
            // be kept for it (credentials, `HEAD`), a key whose answers could not be kept of
            // late, and a request that has waited once already.
            if credentials || head || partial || found.pass || waited {
                let status = if credentials {
                    Status::Bypass
                } else {
                    Status::Miss
                };
                ctx.cache_status = Some(status);
                let keep = (!head).then_some((found.key, policy));
                let pass_on_refusal = !(credentials || partial);
                return self
                    .fetch(session, ctx, keep, stale, credentials, pass_on_refusal)
                    .await;
            }
            match store.fill(&found.key) {
                Some(Turn::Lead(filling)) => {
                    ctx.cache_status = Some(Status::Miss);
                    let answered = self
                        .fetch(session, ctx, Some((found.key, policy)), stale, false, true)
                        .await;
                    drop(filling);
                    return answered;
                }
                Some(Turn::Wait(mut done)) => {
                    let lock_timeout = store.settings.lock_timeout;
                    // Ends when the other request does; an error is that too.
                    let _ = tokio::time::timeout(lock_timeout, done.changed()).await;
                    waited = true;
                }
                None => waited = true,
            }
        }
    }

    /// Answers with a kept response.
    async fn serve_kept(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        entry: &Entry,
        status: Status,
    ) -> Result<bool> {
        ctx.cache_status = Some(status);
        let mut headers = entry.headers.clone();
        headers.insert(header::AGE, http::HeaderValue::from(entry.age().as_secs()));
        self.prepare_response(session, &mut headers, ctx)?;
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = entry.status;
        parts.headers = headers;
        let header = Box::new(ResponseHeader::from(parts));
        let head = session.req_header().method == Method::HEAD;
        let body = (!head && !entry.body.is_empty()).then(|| entry.body.clone());
        ctx.cache_served = body.as_ref().map_or(0, Bytes::len);
        let mut tasks = vec![HttpTask::Header(header, body.is_none())];
        if let Some(body) = body {
            tasks.push(HttpTask::Body(Some(body), true));
        }
        session
            .write_response_tasks(tasks)
            .await
            .map_err(|e| e.into_down())?;
        Ok(true)
    }

    /// Fetches the response from the backends, trying each in turn as Pingora's path would,
    /// and keeps it under `keep`'s key if its headers allow. `stale`: a kept response that
    /// answers if every backend fails. `pass_on_refusal`: a response that may not be kept
    /// says so for every request of its key (see [`Store::pass`]).
    async fn fetch(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        keep: Option<(Key, &RoutePolicy)>,
        stale: Option<Arc<Entry>>,
        credentials: bool,
        pass_on_refusal: bool,
    ) -> Result<bool> {
        let mut stale_retries = 0;
        let mut last_error: Option<Box<Error>> = None;
        loop {
            let chosen = match self.choose(ctx).await {
                Ok(chosen) => chosen,
                Err(e) => {
                    if let Some(entry) = &stale {
                        return self.serve_kept(session, ctx, entry, Status::Stale).await;
                    }
                    // Every backend failed: the last failure is the answer (502), not "none
                    // available" (503).
                    return Err(last_error.unwrap_or(e));
                }
            };
            let Some((member, answer)) = self.exchange(session, ctx, chosen).await? else {
                return Ok(false);
            };
            let mut exchange = match answer {
                Ok(exchange) => exchange,
                Err(failed) => {
                    let e = match failed {
                        Failed::Stale(e) if stale_retries < MAX_STALE_RETRIES => {
                            stale_retries += 1;
                            last_error = Some(e);
                            continue;
                        }
                        Failed::Stale(e) => e,
                        Failed::Connect(e) => {
                            self.upstream_error(ctx, "connect");
                            e
                        }
                        Failed::Backend(e) if forward::is_timeout(&e) => {
                            // A hung backend answers 504 once, not once per backend.
                            self.upstream_error(ctx, "timeout");
                            if let Some(entry) = &stale {
                                return self.serve_kept(session, ctx, entry, Status::Stale).await;
                            }
                            return Err(e.into_up());
                        }
                        Failed::Backend(e) => {
                            self.upstream_error(ctx, "error");
                            e
                        }
                    };
                    ctx.failed.push(member.peer._address.clone());
                    last_error = Some(e.into_up());
                    continue;
                }
            };
            let status = exchange.response.status;
            if let Some(entry) = &stale
                && matches!(status.as_u16(), 500 | 502 | 503 | 504)
            {
                // The backend's error is dropped with its connection: the kept response
                // stands in for it (`stale-if-error`).
                ctx.slot = None;
                return self.serve_kept(session, ctx, entry, Status::Stale).await;
            }
            exchange.chunk_if_close_delimited(session.req_header())?;
            let lifetimes = keep.as_ref().and_then(|(_, policy)| {
                cache::policy::lifetimes(
                    status,
                    &exchange.response.headers,
                    policy,
                    credentials,
                    std::time::SystemTime::now(),
                )
            });
            match (keep, lifetimes) {
                (Some((key, _)), Some(lifetimes)) => {
                    let limit = self.cache.settings.max_object_bytes;
                    let kept_headers = exchange.response.headers.clone();
                    let body = exchange
                        .read_whole(limit)
                        .await
                        .inspect_err(|e| self.failed_midway(ctx, e))?;
                    if let Some(body) = body {
                        let headers = cache::kept_headers(kept_headers, body.len());
                        let entry = Entry::new(status, headers, body, lifetimes);
                        self.cache.insert(key, &session.req_header().headers, entry);
                    }
                }
                // Not kept, for what the response said: the next misses go side by side.
                (Some((key, _)), None) if pass_on_refusal => self.cache.pass(key),
                _ => {}
            }
            return self.relay(session, ctx, exchange, &member).await;
        }
    }

    /// Starts one background request that refreshes `key` (`stale-while-revalidate`),
    /// unless one is already under way. It goes to the pool the request would, with the
    /// request's headers, and is held to the backends' deadlines and connection caps. With
    /// the request's `credentials`, its answer is kept only if `public`, as on a miss.
    fn refresh(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        store: &Arc<Store>,
        key: Key,
        policy: &RoutePolicy,
        credentials: bool,
    ) -> Result<()> {
        // Every request in the window would start one; all but the first have nothing to do.
        if store.filling(&key) {
            return Ok(());
        }
        let pool: Arc<Pool> = match ctx.route.as_ref().map(|r| &r.served) {
            Some(crate::routes::Served::Pool(pool)) => Arc::clone(pool),
            _ => Arc::clone(&self.pool),
        };
        let request = self.upstream_request(session, ctx)?;
        let request_headers = session.req_header().headers.clone();
        let (store, policy, hash_key) = (Arc::clone(store), policy.clone(), ctx.hash_key);
        tokio::spawn(async move {
            let Some(Turn::Lead(_filling)) = store.fill(&key) else {
                return;
            };
            let Ok(chosen) = pool.select(&[], hash_key).await else {
                return;
            };
            let member = chosen.member;
            match fetch_whole(&member, request, &pool, &store, &policy, credentials).await {
                Ok(Some((status, headers, body, lifetimes))) => {
                    let headers = cache::kept_headers(headers, body.len());
                    let entry = Entry::new(status, headers, body, lifetimes);
                    store.insert(key, &request_headers, entry);
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(backend = %member.id, %error, "cache refresh failed");
                }
            }
        });
        Ok(())
    }
}

/// A whole response for the cache, if it may be kept: fetched on `member`, whose connection
/// is given back when it is read.
async fn fetch_whole(
    member: &Member,
    request: pingora::http::RequestHeader,
    pool: &Pool,
    store: &Store,
    policy: &RoutePolicy,
    credentials: bool,
) -> Result<Option<(http::StatusCode, HeaderMap, Bytes, cache::Lifetimes)>> {
    let mut exchange = match forward::send(member, request, pool.deadlines()).await {
        Ok(exchange) => exchange,
        Err(Failed::Stale(e) | Failed::Connect(e) | Failed::Backend(e)) => return Err(e),
    };
    let status = exchange.response.status;
    let now = std::time::SystemTime::now();
    let Some(lifetimes) =
        cache::policy::lifetimes(status, &exchange.response.headers, policy, credentials, now)
    else {
        return Ok(None);
    };
    let headers = exchange.response.headers.clone();
    let Some(body) = exchange.read_whole(store.settings.max_object_bytes).await? else {
        return Ok(None);
    };
    exchange.release(member).await;
    Ok(Some((status, headers, body, lifetimes)))
}

/// `X-Cache` on a cache route's response: what the cache did, or `BYPASS` for a request it
/// did not look up.
pub(super) fn mark(headers: &mut impl header_rules::HeaderEdit, status: Status) -> Result<()> {
    headers.put(&X_CACHE, status.header())
}
