//! A request's end: counted in its route's series and written to its route's access log.
//!
//! Every route has an [`Observer`], and so do the requests no route took (the proxy's own
//! `/healthz`, redirects, 404s, and the requests [`crate::connection`] refuses before Pingora
//! reads them). [`Observer::finished`] is the one place an access-log [`Record`] is made, and
//! decides what of the request the log may keep.

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use crate::{
    access_log::{AccessLog, LogTarget, Record},
    metrics::{Metrics, RouteSeries},
};

/// Where one route's finished requests go. Resolved when the route table is built, so a
/// request's end costs atomics and, when logged, one record for the writer.
pub struct Observer {
    /// The `route` label and log field: the route's prefix, or [`crate::metrics::NO_ROUTE`].
    name: Arc<str>,
    /// `None` when metrics are off.
    series: Option<RouteSeries>,
    /// The access log and this route's target in it; `None`: not logged.
    log: Option<(Arc<AccessLog>, usize)>,
}

/// What is known of a request once it is over.
pub struct Finished<'a> {
    /// From its arrival to the end of its response.
    pub elapsed: Duration,
    pub request_id: String,
    /// `None`: the request id.
    pub correlation_id: Option<String>,
    pub client: IpAddr,
    /// `None`: refused before its method could be read.
    pub method: Option<&'a http::Method>,
    /// Without the query, which may carry a token.
    pub path: &'a str,
    pub http2: bool,
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: usize,
    /// The backend that answered, and the time from choosing it to its response header.
    pub upstream: Option<&'a Arc<str>>,
    pub upstream_duration: Option<Duration>,
    /// The basic-auth user, or the subject a backend named.
    pub user: Option<String>,
    /// The request's headers, when they were parsed: the log keeps the user agent and the
    /// referer.
    pub headers: Option<&'a http::HeaderMap>,
    /// What a route's response cache did.
    pub cache: Option<crate::cache::Status>,
}

impl Observer {
    /// `target`: where this route is logged, one of the `log`'s targets.
    pub fn new(
        name: &str,
        metrics: Option<&Metrics>,
        log: Option<&Arc<AccessLog>>,
        target: Option<&LogTarget>,
    ) -> Self {
        let log = log.zip(target).and_then(|(log, target)| {
            let index = log.target_index(target)?;
            Some((log.clone(), index))
        });
        Observer {
            name: Arc::from(name),
            series: metrics.map(|m| m.route(name)),
            log,
        }
    }

    pub fn series(&self) -> Option<&RouteSeries> {
        self.series.as_ref()
    }

    /// Counts the request and logs it.
    pub fn finished(&self, request: Finished<'_>) {
        if let Some(series) = &self.series {
            series.request_of(
                request.method,
                request.status,
                request.elapsed.as_secs_f64(),
            );
        }
        let Some((log, target)) = &self.log else {
            return;
        };
        let headers = request.headers;
        log.log(Record {
            target: *target,
            time: SystemTime::now() - request.elapsed,
            request_id: request.request_id,
            correlation_id: request.correlation_id,
            client: request.client,
            method: request.method.cloned().unwrap_or(http::Method::CONNECT),
            path: request.path.to_owned(),
            http2: request.http2,
            route: self.name.clone(),
            status: request.status,
            bytes: request.bytes,
            duration: request.elapsed,
            upstream: request.upstream.cloned(),
            upstream_duration: request.upstream_duration,
            user: request.user,
            user_agent: header_value(headers, "user-agent").map(str::to_owned),
            // Without its query or fragment, which may carry a token.
            referer: header_value(headers, "referer")
                .and_then(|r| r.split(['?', '#']).next())
                .map(str::to_owned),
            cache: request.cache.map(crate::cache::Status::label),
        });
    }
}

/// A header as the log keeps it: text only, at most 512 bytes.
fn header_value<'a>(headers: Option<&'a http::HeaderMap>, name: &str) -> Option<&'a str> {
    headers?
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.get(..512).unwrap_or(v))
}
