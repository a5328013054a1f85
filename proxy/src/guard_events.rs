//! Guards of the edge that refused a request (a route's rate limit, the basic-auth guard), as
//! audit events. The edge holds no Redis credentials: it hands each event to a backend, over
//! the backend's admin socket (`POST /audit`), and the backend writes it to the audit file and
//! the shared stream with its own events.
//!
//! Called on the request's path, so it is cheap and never waits: one event per guard, client
//! and route in [`WINDOW`], at most [`MAX_PER_WINDOW`] in all (a flood costs one lock and a
//! map lookup a request), each sent by a task of its own. A backend that cannot be reached
//! loses the event, as the metrics still count the refusal.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{LazyLock, Mutex},
    time::{Duration, Instant},
};

use crate::upstream::Pool;

pub const WINDOW: Duration = Duration::from_secs(10);
pub const MAX_PER_WINDOW: u32 = 100;

/// A guard that refused a request.
pub struct Tripped<'a> {
    /// `rate_limit` or `basic_auth_guard`.
    pub guard: &'static str,
    /// The client, after trusted proxies.
    pub client: IpAddr,
    /// The route's prefix.
    pub route: &'a str,
    pub request_id: &'a str,
    pub correlation_id: &'a str,
}

struct Sent {
    since: Instant,
    count: u32,
    last: HashMap<(&'static str, IpAddr, String), Instant>,
}

static SENT: LazyLock<Mutex<Sent>> = LazyLock::new(|| {
    Mutex::new(Sent {
        since: Instant::now(),
        count: 0,
        last: HashMap::new(),
    })
});

/// Hands `event` to a backend in `pool` (one in rotation with an admin socket), unless the
/// same was sent within [`WINDOW`] or the window's budget is spent.
pub(crate) fn tripped(pool: &Pool, event: &Tripped<'_>) {
    if !admit(event) {
        return;
    }
    let Some(socket) = pool.admin_socket() else {
        return;
    };
    let body = serde_json::json!({
        "guard": event.guard,
        "client": event.client,
        "route": event.route,
        "request_id": event.request_id,
        "correlation_id": event.correlation_id,
    })
    .to_string();
    tokio::spawn(async move {
        let sent =
            crate::admin::unix_request(&socket, "POST", "/audit", Some(body.as_bytes())).await;
        if !matches!(sent, Some((204, _))) {
            tracing::debug!("a tripped guard's audit event did not reach a backend");
        }
    });
}

fn admit(event: &Tripped<'_>) -> bool {
    let key = (event.guard, event.client, event.route.to_string());
    let mut sent = SENT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let now = Instant::now();
    if now.duration_since(sent.since) >= WINDOW {
        sent.since = now;
        sent.count = 0;
        sent.last.retain(|_, at| now.duration_since(*at) < WINDOW);
    }
    let repeated = sent
        .last
        .get(&key)
        .is_some_and(|at| now.duration_since(*at) < WINDOW);
    if repeated || sent.count >= MAX_PER_WINDOW {
        return false;
    }
    sent.count += 1;
    sent.last.insert(key, now);
    true
}
