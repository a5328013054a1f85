//! Requests to a route with a response cache ([`crate::cache`]): answered from memory when
//! they can be, otherwise fetched from the backends on the fast path ([`crate::forward`]),
//! with every failover decision made here so that a kept response can stand in when every
//! backend fails.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Method, StatusCode, header};
use pingora::{Error, Result, http::ResponseHeader, protocols::http::HttpTask};
use pingora_proxy::Session;

use super::{Gateway, RequestCtx, content_length};
use crate::{
    cache::{self, Entry, Filling, Freshness, Key, Lifetimes, RoutePolicy, Status, Store, Turn},
    forward::{self, Exchange, Failed},
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

/// What a fetch keeps of the backend's answer.
struct Keep<'a> {
    key: Key,
    policy: &'a RoutePolicy,
    /// The request carried credentials: only a `public` answer is kept.
    credentials: bool,
    /// An answer that may not be kept, for what it says of itself, is noted so that the
    /// key's next misses do not queue ([`Store::pass`]).
    pass_on_refusal: bool,
    /// Held by the request that fetches for the others waiting; let go as soon as the
    /// answer is kept or not, never held while a slow client reads it.
    filling: Option<Filling<'a>>,
}

impl Gateway {
    /// A `GET` or `HEAD` without a body on a cache route. `Ok(false)`: Pingora's path is to
    /// take it after all (a pool behind TLS, which the config does not allow to cache).
    pub(super) async fn cached(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        policy: &RoutePolicy,
    ) -> Result<bool> {
        let Some(key) = cache_key(session, ctx) else {
            // No host or target the key can be sure of: the backend alone answers.
            ctx.cache_status = Some(Status::Bypass);
            return self.forward(session, ctx).await;
        };
        let request = session.req_header();
        let head = request.method == Method::HEAD;
        let headers = &request.headers;
        // Credentials the backend will see: basic auth the edge checks and keeps to itself
        // cannot change the backend's answer.
        let passes_authorization = ctx
            .route
            .as_ref()
            .is_none_or(|r| r.access.passes_authorization());
        let credentials = carries_credentials(headers, passes_authorization, ctx);
        // A range or a conditional request may be answered from the cache, but its own
        // answer (`206`, `304`) is not a response to keep, nor one to wait for.
        let partial = PARTIAL.iter().any(|name| headers.contains_key(name));
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
                        // Only a plain `GET` asks for what is to be kept.
                        if !head && !partial {
                            self.refresh(session, ctx, &store, found.key.clone(), policy)?;
                        }
                        return self.serve_kept(session, ctx, entry, Status::Stale).await;
                    }
                    Freshness::OnError | Freshness::Gone => {}
                }
            }
            let stale = usable.filter(|e| e.serves_on_error());
            let keep = |filling| Keep {
                key: found.key.clone(),
                policy,
                credentials,
                pass_on_refusal: !(credentials || partial),
                filling,
            };
            // A request that is not to wait for another's answer: one whose answer would not
            // be kept for it (credentials, `HEAD`, a range), a key whose answers could not be
            // kept of late, and a request that has waited once already.
            if credentials || head || partial || found.pass || waited {
                let status = if credentials {
                    Status::Bypass
                } else {
                    Status::Miss
                };
                ctx.cache_status = Some(status);
                let keep = (!head).then(|| keep(None));
                return self.fetch(session, ctx, keep, stale).await;
            }
            match store.fill(&found.key) {
                Some(Turn::Lead(filling)) => {
                    ctx.cache_status = Some(Status::Miss);
                    let keep = keep(Some(filling));
                    return self.fetch(session, ctx, Some(keep), stale).await;
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
    /// and keeps it as `keep` says if its headers allow. `stale`: a kept response that
    /// answers if every backend fails.
    async fn fetch(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        keep: Option<Keep<'_>>,
        stale: Option<Arc<Entry>>,
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
            return match keep {
                Some(keep) => {
                    self.keep_and_relay(session, ctx, exchange, &member, keep)
                        .await
                }
                None => self.relay(session, ctx, exchange, &member).await,
            };
        }
    }

    /// Relays the backend's answer and keeps it if it may be kept: read whole first when its
    /// length is known to be within `cache.max_object_bytes` (the waiting requests are
    /// answered from it at once), otherwise copied as it is relayed.
    async fn keep_and_relay(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        mut exchange: Exchange,
        member: &Member,
        keep: Keep<'_>,
    ) -> Result<bool> {
        let status = exchange.response.status;
        let now = std::time::SystemTime::now();
        let kept_headers = exchange.response.headers.clone();
        let lifetimes =
            cache::policy::lifetimes(status, &kept_headers, keep.policy, keep.credentials, now);
        let Some(lifetimes) = lifetimes else {
            // An error is the backend's trouble or the request's, not the resource's answer.
            if keep.pass_on_refusal && (status.is_success() || status.is_redirection()) {
                self.cache.pass(keep.key);
            }
            return self.relay(session, ctx, exchange, member).await;
        };
        let limit = self.cache.settings.max_object_bytes;
        let declared = content_length(&kept_headers);
        if declared.is_some_and(|len| len <= limit) || exchange.body_done() {
            let body = exchange
                .read_whole(limit)
                .await
                .inspect_err(|e| self.failed_midway(ctx, e))?;
            if let Some(body) = body {
                let request_headers = &session.req_header().headers;
                self.keep(
                    keep.key,
                    request_headers,
                    status,
                    kept_headers,
                    body,
                    lifetimes,
                );
            }
            drop(keep.filling);
            return self.relay(session, ctx, exchange, member).await;
        }
        if declared.is_some() {
            // Too large to keep, whoever asks.
            if keep.pass_on_refusal {
                self.cache.pass(keep.key);
            }
            drop(keep.filling);
            return self.relay(session, ctx, exchange, member).await;
        }
        // A length found only at the end (chunked, a stream of events): the requests waiting
        // go to the backends themselves rather than wait on this client's reading.
        drop(keep.filling);
        let request_headers = session.req_header().headers.clone();
        self.prepare_response(session, &mut exchange.response.headers, ctx)?;
        let body = exchange
            .relay_keeping(session, member, Some(limit))
            .await
            .inspect_err(|e| self.failed_midway(ctx, e))?;
        if let Some(body) = body {
            self.keep(
                keep.key,
                &request_headers,
                status,
                kept_headers,
                body,
                lifetimes,
            );
        }
        Ok(true)
    }

    fn keep(
        &self,
        key: Key,
        request: &HeaderMap,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        lifetimes: Lifetimes,
    ) {
        let headers = cache::kept_headers(status, headers, body.len());
        self.cache
            .insert(key, request, Entry::new(status, headers, body, lifetimes));
    }

    /// Starts one background request that refreshes `key` (`stale-while-revalidate`),
    /// unless one is already under way or [`Store::refreshes`] are all taken. It goes to the
    /// pool the request would, with the request's headers, and is held to the backends'
    /// deadlines and connection caps.
    fn refresh(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        store: &Arc<Store>,
        key: Key,
        policy: &RoutePolicy,
    ) -> Result<()> {
        // Every request in the window would start one; all but the first have nothing to do.
        if store.filling(&key) {
            return Ok(());
        }
        let Ok(permit) = Arc::clone(&store.refreshes).try_acquire_owned() else {
            return Ok(());
        };
        let pool: Arc<Pool> = match ctx.route.as_ref().map(|r| &r.served) {
            Some(crate::routes::Served::Pool(pool)) => Arc::clone(pool),
            _ => Arc::clone(&self.pool),
        };
        let request = self.upstream_request(session, ctx)?;
        let request_headers = session.req_header().headers.clone();
        // With credentials (a `public` entry's), the answer is kept only if `public` too.
        let credentials = carries_credentials(&request_headers, true, ctx);
        let (store, policy, hash_key) = (Arc::clone(store), policy.clone(), ctx.hash_key);
        tokio::spawn(async move {
            let _permit = permit;
            let Some(Turn::Lead(_filling)) = store.fill(&key) else {
                return;
            };
            let Ok(chosen) = pool.select(&[], hash_key).await else {
                return;
            };
            let member = chosen.member;
            match fetch_whole(&member, request, &pool, &store, &policy, credentials).await {
                Ok(Some((status, headers, body, lifetimes))) => {
                    let headers = cache::kept_headers(status, headers, body.len());
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

    /// On a cache route, a request that may have changed its resource (`POST`, `PUT`,
    /// `DELETE`...) and succeeded: what is kept for its URL is forgotten (RFC 9111 4.4).
    pub(super) fn invalidate_after(&self, session: &Session, ctx: &RequestCtx, status: u16) {
        let method = &session.req_header().method;
        if !method.is_safe()
            && status < 400
            && let Some(key) = cache_key(session, ctx)
        {
            self.cache.invalidate(&key);
        }
    }
}

/// The key of the request's response, or `None` when the request names no valid host, or
/// a target that is not a path.
fn cache_key(session: &Session, ctx: &RequestCtx) -> Option<Key> {
    let request = session.req_header();
    // The host as the backend gets it (with its port), once it is known to be one.
    header_rules::request_host(request)?;
    let host = std::str::from_utf8(header_rules::raw_request_host(request)?).ok()?;
    let target = origin_form(request.raw_path())?;
    Some(Key::new(ctx.tls, host, target, &request.headers))
}

/// A target in origin form (`/path?query`), also when it came in absolute form
/// (`http://host/path?query`), whose host the key has already.
fn origin_form(target: &[u8]) -> Option<&[u8]> {
    if target.starts_with(b"/") {
        return Some(target);
    }
    let authority = forward::absolute_form_authority(target)?;
    let start = target.windows(3).position(|w| w == b"://")? + 3 + authority.len();
    match &target[start..] {
        [] => Some(b"/"),
        rest if rest.starts_with(b"/") => Some(rest),
        _ => None,
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
) -> Result<Option<(StatusCode, HeaderMap, Bytes, Lifetimes)>> {
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

/// Whether the backend may answer this request for someone in particular: a cookie, an
/// `Authorization` the backend gets (`passes_authorization`: basic auth the edge checks and
/// keeps to itself cannot change the answer), the API's `X-API-Key`, or a client certificate
/// (the backend may answer as the user it names). Such a request gets, and leaves, only what
/// the response said any client may have.
fn carries_credentials(
    headers: &http::HeaderMap,
    passes_authorization: bool,
    ctx: &RequestCtx,
) -> bool {
    headers.contains_key(header::COOKIE)
        || (headers.contains_key(header::AUTHORIZATION) && passes_authorization)
        || headers.contains_key(X_API_KEY)
        || ctx.client_cert.is_some()
}

const X_API_KEY: &str = "x-api-key";

#[cfg(test)]
mod tests {
    use super::origin_form;

    #[test]
    fn targets_are_keyed_in_origin_form() {
        let form =
            |t: &str| origin_form(t.as_bytes()).map(|f| String::from_utf8_lossy(f).into_owned());
        assert_eq!(form("/a?b").as_deref(), Some("/a?b"));
        assert_eq!(form("http://h.example/a?b").as_deref(), Some("/a?b"));
        assert_eq!(form("HTTPS://h.example:8443").as_deref(), Some("/"));
        assert_eq!(form("http://h.example?x"), None);
        assert_eq!(form("*"), None);
    }
}
