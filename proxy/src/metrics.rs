//! The proxy's Prometheus series.
//!
//! Everything a request touches is resolved once, when the route table is built: a
//! request finds its counters by index and bumps atomics, with no label lookup, lock or
//! allocation. Series that only move on failures (upstream errors) are looked up by label
//! when they move. Gauges that describe state (backend health, open connections) are read
//! when scraped.

use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, core::Collector,
};

use crate::{encoding::Encoding, error::BuildError};

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const ENCODINGS: [&str; 4] = ["identity", "gzip", "br", "zstd"];

/// The `route` label of requests no route took (the proxy's `/healthz`, redirects, 404s).
pub const NO_ROUTE: &str = "none";

/// Seconds, from a static file served from memory to a backend at its read timeout.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0,
];

/// Which of a route's access rules refused a request, as its counters tell them apart.
#[derive(Debug, Clone, Copy)]
pub enum AccessRefusal {
    RateLimited,
    Denied,
    AuthFailed,
}

/// Why the edge cut a client connection or stream short.
#[derive(Debug, Clone, Copy)]
pub enum Cut {
    /// The client already held `limits.max_connections_per_client` connections.
    PerClientLimit,
    TlsHandshakeTimeout,
    TlsHandshakeError,
    /// An HTTP/2 connection that sent no request by the header deadline, a wrong preface, or
    /// closed before its first request.
    H2Opening,
    /// A response made no progress for `limits.send_timeout`.
    SendTimeout,
}

impl Cut {
    const ALL: [Cut; 5] = [
        Cut::PerClientLimit,
        Cut::TlsHandshakeTimeout,
        Cut::TlsHandshakeError,
        Cut::H2Opening,
        Cut::SendTimeout,
    ];

    fn label(self) -> &'static str {
        match self {
            Cut::PerClientLimit => "per_client_limit",
            Cut::TlsHandshakeTimeout => "tls_handshake_timeout",
            Cut::TlsHandshakeError => "tls_handshake_error",
            Cut::H2Opening => "h2_opening",
            Cut::SendTimeout => "send_timeout",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    /// By [`Cut`], in the order of [`Cut::ALL`].
    cuts: [IntCounter; 5],
    /// Requests that waited for a backend connection slot until the queue deadline (503).
    pub upstream_queue_timeouts: IntCounter,
    /// Requests refused because their client had its share of backend requests in flight.
    pub upstream_client_limits: IntCounter,
    upstream_errors: IntCounterVec,
    pub backend_up: IntGaugeVec,
    /// Clients each rate limit policy tracks, set when scraped.
    pub rate_limit_keys: IntGaugeVec,
    /// Rate-limit evictions and the basic-auth guard's actions.
    pub access: crate::access::AccessCounters,
    pub open_connections: IntGauge,
    /// Connections upgraded (WebSockets) since start, and open now.
    pub upgrades: IntCounter,
    pub upgrades_open: IntGauge,
    pub tls_connections: IntCounter,
    pub tls_handshakes: IntCounter,
    pub access_log_dropped: IntCounter,
    /// Accepts held back because `max_connections` were open.
    pub connection_waits: IntCounter,
    reloads: IntCounterVec,
    requests: IntCounterVec,
    latency: HistogramVec,
    refusals: [IntCounterVec; 3],
    statics: IntCounterVec,
    cache: IntCounterVec,
    cache_hit_bytes: IntCounterVec,
    /// The response cache's size, set when scraped.
    pub cache_bytes: IntGauge,
    pub cache_entries: IntGauge,
}

/// One route's series, resolved up front.
pub struct RouteSeries {
    requests: [[IntCounter; 5]; 8],
    latency: Histogram,
    refusals: [IntCounter; 3],
    /// By encoding, then hit (0) or miss (1); only static routes count here.
    statics: [[IntCounter; 2]; 4],
    /// Made at the route's first request to its cache: routes without one show none.
    cache: std::sync::OnceLock<CacheSeries>,
    /// What [`Self::cache`] is made from.
    cache_families: (IntCounterVec, IntCounterVec, Arc<str>),
}

struct CacheSeries {
    /// By [`crate::cache::Status`], in the order of its `ALL`.
    results: [IntCounter; 4],
    hit_bytes: IntCounter,
}

impl Metrics {
    pub fn new() -> Result<Self, BuildError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let requests = counter(
            "gatehouse_http_requests_total",
            "Requests answered, by route, method and status class.",
            &["route", "method", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "gatehouse_http_request_duration_seconds",
                "Time from the request's arrival to the end of its response, by route.",
            )
            .buckets(BUCKETS.to_vec()),
            &["route"],
        )?;
        let refusals = [
            counter(
                "gatehouse_rate_limited_total",
                "Requests refused by a rate limit (429), by route.",
                &["route"],
            )?,
            counter(
                "gatehouse_denied_total",
                "Requests refused by an allow/deny list (403), by route.",
                &["route"],
            )?,
            counter(
                "gatehouse_auth_failures_total",
                "Basic-auth requests refused: missing or wrong credentials (401), or too many failures (429).",
                &["route"],
            )?,
        ];
        let statics = counter(
            "gatehouse_static_responses_total",
            "Static file responses, by route, content encoding and whether the file was in memory.",
            &["route", "encoding", "cache"],
        )?;
        let cache = counter(
            "gatehouse_cache_requests_total",
            "Requests to routes with a response cache, by route and result: hit, miss, stale (served expired: while refreshing, or because every backend failed), bypass (not looked up).",
            &["route", "result"],
        )?;
        let cache_hit_bytes = counter(
            "gatehouse_cache_hit_bytes_total",
            "Body bytes served from the response cache (hit and stale), by route.",
            &["route"],
        )?;
        let cache_bytes = IntGauge::new(
            "gatehouse_cache_bytes",
            "Memory the response cache holds: bodies, headers, keys (at most cache.max_bytes).",
        )?;
        let cache_entries =
            IntGauge::new("gatehouse_cache_entries", "Entries in the response cache.")?;
        let upstream_errors = counter(
            "gatehouse_upstream_errors_total",
            "Failures talking to a backend, by backend and kind (connect, timeout, error).",
            &["backend", "kind"],
        )?;
        let backend_up = IntGaugeVec::new(
            Opts::new(
                "gatehouse_backend_up",
                "1 while the backend passes its health checks.",
            ),
            &["backend"],
        )?;
        let rate_limit_keys = IntGaugeVec::new(
            Opts::new(
                "gatehouse_rate_limit_keys",
                "Clients a rate limit policy is tracking.",
            ),
            &["policy"],
        )?;
        let open_connections = IntGauge::new(
            "gatehouse_open_connections",
            "Client connections open on the public listeners.",
        )?;
        let upgrades = IntCounter::new(
            "gatehouse_upgraded_connections_total",
            "Client connections a backend upgraded (101 Switching Protocols: WebSockets).",
        )?;
        let upgrades_open = IntGauge::new(
            "gatehouse_upgraded_connections_open",
            "Upgraded connections open now; each holds a backend connection slot.",
        )?;
        let tls_connections = IntCounter::new(
            "gatehouse_tls_connections_total",
            "Connections accepted on the HTTPS listener (handshakes begun).",
        )?;
        let tls_handshakes = IntCounter::new(
            "gatehouse_tls_handshakes_total",
            "TLS handshakes completed. Begun minus completed is the failures (and the few in progress).",
        )?;
        let access_log_dropped = IntCounter::new(
            "gatehouse_access_log_dropped_total",
            "Access log lines dropped because the writer fell behind.",
        )?;
        let connection_waits = IntCounter::new(
            "gatehouse_connection_limit_waits_total",
            "Times the listeners stopped accepting because limits.max_connections client connections were open; new ones waited in the kernel's backlog.",
        )?;
        let reloads = counter(
            "gatehouse_proxy_reloads_total",
            "The proxy's configuration reloads (SIGHUP) by result: ok, or failed (the old configuration kept serving).",
            &["result"],
        )?;
        let cuts_vec = counter(
            "gatehouse_connection_cuts_total",
            "Client connections or streams the edge cut short, by reason: per_client_limit (refused at accept), tls_handshake_timeout, tls_handshake_error, h2_opening (no request by the header deadline, a wrong preface, or gone first), send_timeout (a response made no progress).",
            &["reason"],
        )?;
        let cuts = Cut::ALL.map(|cut| cuts_vec.with_label_values(&[cut.label()]));
        let upstream_queue_timeouts = IntCounter::new(
            "gatehouse_upstream_queue_timeouts_total",
            "Requests answered 503 because every backend had upstream.max_connections requests in flight until upstream.queue_timeout passed.",
        )?;
        let upstream_client_limits = IntCounter::new(
            "gatehouse_upstream_client_limits_total",
            "Requests answered 429 because their client already had limits.max_upstream_requests_per_client requests in flight to the backends.",
        )?;
        let collectors: [Box<dyn Collector>; 24] = [
            Box::new(cache.clone()),
            Box::new(cache_hit_bytes.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(cache_entries.clone()),
            Box::new(upgrades.clone()),
            Box::new(upgrades_open.clone()),
            Box::new(cuts_vec),
            Box::new(upstream_queue_timeouts.clone()),
            Box::new(upstream_client_limits.clone()),
            Box::new(connection_waits.clone()),
            Box::new(rate_limit_keys.clone()),
            Box::new(reloads.clone()),
            Box::new(requests.clone()),
            Box::new(latency.clone()),
            Box::new(refusals[0].clone()),
            Box::new(refusals[1].clone()),
            Box::new(refusals[2].clone()),
            Box::new(statics.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(backend_up.clone()),
            Box::new(open_connections.clone()),
            Box::new(tls_connections.clone()),
            Box::new(tls_handshakes.clone()),
            Box::new(access_log_dropped.clone()),
        ];
        for collector in collectors {
            registry.register(collector)?;
        }
        let access = crate::access::AccessCounters::new()?;
        access.register(&registry)?;
        Ok(Self {
            registry,
            cuts,
            upstream_queue_timeouts,
            upstream_client_limits,
            upstream_errors,
            backend_up,
            rate_limit_keys,
            access,
            open_connections,
            upgrades,
            upgrades_open,
            tls_connections,
            tls_handshakes,
            access_log_dropped,
            connection_waits,
            reloads,
            requests,
            latency,
            refusals,
            statics,
            cache,
            cache_hit_bytes,
            cache_bytes,
            cache_entries,
        })
    }

    pub fn cut(&self, cut: Cut) {
        self.cuts[cut as usize].inc();
    }

    /// The series of one route, labelled `route`.
    pub fn route(&self, route: &str) -> RouteSeries {
        RouteSeries {
            requests: METHODS.map(|method| {
                CLASSES.map(|class| self.requests.with_label_values(&[route, method, class]))
            }),
            latency: self.latency.with_label_values(&[route]),
            refusals: [0, 1, 2].map(|i| self.refusals[i].with_label_values(&[route])),
            statics: ENCODINGS.map(|encoding| {
                ["hit", "miss"]
                    .map(|cache| self.statics.with_label_values(&[route, encoding, cache]))
            }),
            cache: std::sync::OnceLock::new(),
            cache_families: (
                self.cache.clone(),
                self.cache_hit_bytes.clone(),
                Arc::from(route),
            ),
        }
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.with_label_values(&[result]).inc();
    }

    pub fn upstream_error(&self, backend: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[backend, kind])
            .inc();
    }
}

impl RouteSeries {
    pub fn request(&self, method: &http::Method, status: u16, seconds: f64) {
        self.request_of(Some(method), status, seconds);
    }

    /// [`Self::request`] for requests refused before their method was known, too.
    pub fn request_of(&self, method: Option<&http::Method>, status: u16, seconds: f64) {
        let method = match method {
            Some(&http::Method::GET) => 0,
            Some(&http::Method::HEAD) => 1,
            Some(&http::Method::POST) => 2,
            Some(&http::Method::PUT) => 3,
            Some(&http::Method::DELETE) => 4,
            Some(&http::Method::PATCH) => 5,
            Some(&http::Method::OPTIONS) => 6,
            _ => 7,
        };
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[method][class].inc();
        self.latency.observe(seconds);
    }

    pub fn refused(&self, why: AccessRefusal) {
        self.refusals[why as usize].inc();
    }

    pub fn static_response(&self, encoding: Encoding, hit: bool) {
        self.statics[encoding.index()][usize::from(!hit)].inc();
    }

    /// A request to a cache route; `body_bytes` served from the cache.
    pub fn cached(&self, status: crate::cache::Status, body_bytes: usize) {
        let series = self.cache.get_or_init(|| {
            let (results, hit_bytes, route) = &self.cache_families;
            CacheSeries {
                results: crate::cache::Status::ALL
                    .map(|status| results.with_label_values(&[route, status.label()])),
                hit_bytes: hit_bytes.with_label_values(&[route]),
            }
        });
        series.results[status as usize].inc();
        if body_bytes > 0 {
            series.hit_bytes.inc_by(body_bytes as u64);
        }
    }
}

/// Client connections in the ESTABLISHED state whose local port is one of `ports`, from the
/// kernel's socket tables: exact, and free for the request path.
pub fn established_connections(ports: &[u16]) -> i64 {
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .map(|text| {
            text.lines()
                .skip(1)
                .filter(|line| {
                    let mut fields = line.split_whitespace();
                    let local = fields.nth(1);
                    let state = fields.nth(1);
                    let port = local
                        .and_then(|l| l.rsplit_once(':'))
                        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
                    state == Some("01") && port.is_some_and(|p| ports.contains(&p))
                })
                .count() as i64
        })
        .sum()
}

impl Metrics {
    /// Every request answered so far, over every route, method and status: for the admin
    /// listener's `/status`, which a console turns into requests per second.
    pub fn requests_total(&self) -> u64 {
        use prometheus::core::Collector;
        self.requests
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .map(|metric| metric.get_counter().get_value() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_series_move_under_their_labels() {
        let metrics = Metrics::new().unwrap();
        let api = metrics.route("/api/");
        api.request(&http::Method::POST, 201, 0.01);
        api.request(&http::Method::from_bytes(b"PURGE").unwrap(), 404, 0.01);
        api.refused(AccessRefusal::Denied);
        api.static_response(Encoding::Gzip, false);
        metrics.upstream_error("b2", "connect");
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &metrics.registry.gather(),
            &mut text,
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            r#"gatehouse_http_requests_total{method="POST",route="/api/",status="2xx"} 1"#,
            r#"gatehouse_http_requests_total{method="other",route="/api/",status="4xx"} 1"#,
            r#"gatehouse_denied_total{route="/api/"} 1"#,
            r#"gatehouse_static_responses_total{cache="miss",encoding="gzip",route="/api/"} 1"#,
            r#"gatehouse_upstream_errors_total{backend="b2",kind="connect"} 1"#,
            r#"gatehouse_http_request_duration_seconds_count{route="/api/"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line}");
        }
    }

    #[test]
    fn counts_established_sockets_on_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(established_connections(&[port]), 0);
        let _client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _server = listener.accept().unwrap();
        assert_eq!(established_connections(&[port]), 1);
    }
}
