//! Guards of the edge that refused a request (a rate limit, the basic-auth guard), handed to
//! whoever records them: the binary sets a sink at start that writes them to the audit log.
//! Without one they are only counted in the route's metrics. The sink is called on the
//! request's path, so it must be cheap and never wait (the audit's deduplication and budget
//! decide first, and the writing runs in a task of its own).

use std::{net::IpAddr, sync::OnceLock};

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

pub type Sink = Box<dyn Fn(&Tripped<'_>) + Send + Sync>;

static SINK: OnceLock<Sink> = OnceLock::new();

/// Sets where tripped guards go, once per process.
pub fn set_sink(sink: Sink) {
    let _ = SINK.set(sink);
}

pub(crate) fn tripped(event: &Tripped<'_>) {
    if let Some(sink) = SINK.get() {
        sink(event);
    }
}
