//! The backend's own Prometheus series, labelled with its id so the proxy can merge every
//! backend's scrape into one. Every per-request series is resolved once at start-up: a
//! request finds its endpoint's among a handful and bumps atomics.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::{error::StartError, routes};

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// How a login ended, as the `outcome` label names it.
#[derive(Debug, Clone, Copy)]
pub enum Login {
    Success,
    /// Wrong user name or password, or a disabled user.
    Refused,
    /// Refused unheard by the brute-force guard (429).
    Throttled,
    /// Malformed request, Redis unavailable, or the token could not be signed.
    Error,
}

const LOGINS: [&str; 4] = ["success", "refused", "throttled", "error"];

/// Which limit of the login guard refused an attempt, as the `limit` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardLimit {
    /// Failures for one user name from one client address.
    UserPerIp,
    /// Failures from one client address, whatever the names.
    Ip,
    /// Failures for one user name from every address not known for it.
    UserAllIps,
}

const GUARD_LIMITS: [&str; 3] = ["user_per_ip", "ip", "user_all_ips"];

/// How an `X-API-Key` check ended, as the `outcome` label names it.
#[derive(Debug, Clone, Copy)]
pub enum KeyCheck {
    Accepted,
    /// No such key, or revoked.
    Refused,
    /// Refused unheard by the brute-force guard (429).
    Throttled,
}

const KEY_CHECKS: [&str; 3] = ["accepted", "refused", "throttled"];

/// A backend connection limit that acted, as the `limit` label names it.
#[derive(Debug, Clone, Copy)]
pub enum ConnectionLimit {
    /// A request's header did not arrive within the header deadline: the connection is cut.
    HeaderTimeout,
    /// No request for the idle deadline: the connection is closed.
    IdleTimeout,
    /// Every connection slot was taken: a new connection waited in the listen queue.
    MaxConnections,
    /// A request body did not arrive whole within the body deadline: `408`, and the
    /// connection is closed.
    BodyTimeout,
}

const CONNECTION_LIMITS: [&str; 4] = [
    "header_timeout",
    "idle_timeout",
    "max_connections",
    "body_timeout",
];

/// One endpoint's series, by the `endpoint` label of [`routes::ROUTES`].
struct Endpoint {
    label: &'static str,
    requests: [IntCounter; CLASSES.len()],
    latency: Histogram,
}

pub struct Metrics {
    registry: Registry,
    /// Ends with [`routes::OTHER`].
    endpoints: Vec<Endpoint>,
    redis_errors: IntCounter,
    redis_up: IntGauge,
    logins: [IntCounter; LOGINS.len()],
    generations: IntCounter,
    data_losses: IntCounter,
    tokens_over_cap: IntCounter,
    login_throttled: [IntCounter; GUARD_LIMITS.len()],
    connection_limits: [IntCounter; CONNECTION_LIMITS.len()],
    connections_open: IntGauge,
    key_checks: [IntCounter; KEY_CHECKS.len()],
    /// Audit events written to Redis, and those that could not be (to the file as well).
    audit_events: IntCounter,
    audit_failures: IntCounter,
    audit_suppressed: IntCounter,
}

impl Metrics {
    pub fn new(backend_id: &str) -> Result<Self, StartError> {
        let labels = [("backend".to_string(), backend_id.to_string())].into();
        let registry = Registry::new_custom(None, Some(labels))?;

        let requests = IntCounterVec::new(
            Opts::new(
                "gatehouse_backend_http_requests_total",
                "Requests a backend answered, by endpoint and status class.",
            ),
            &["endpoint", "status"],
        )?;
        let latency = prometheus::HistogramVec::new(
            HistogramOpts::new(
                "gatehouse_backend_http_request_duration_seconds",
                "Time a backend took to answer, by endpoint.",
            )
            .buckets(BUCKETS.to_vec()),
            &["endpoint"],
        )?;
        let logins = IntCounterVec::new(
            Opts::new(
                "gatehouse_backend_logins_total",
                "Logins by outcome: success, refused (wrong credentials), throttled or error.",
            ),
            &["outcome"],
        )?;
        let login_throttled = IntCounterVec::new(
            Opts::new(
                "gatehouse_backend_login_throttled_total",
                "Logins refused by the brute-force guard, by the limit that was reached: \
                 user_per_ip, ip or user_all_ips.",
            ),
            &["limit"],
        )?;
        let connection_limits = IntCounterVec::new(
            Opts::new(
                "gatehouse_backend_connection_limits_total",
                "Times a connection limit acted: header_timeout and idle_timeout (connection \
                 closed), body_timeout (408, connection closed), max_connections (a new \
                 connection waited for a slot).",
            ),
            &["limit"],
        )?;
        let connections_open = IntGauge::new(
            "gatehouse_backend_connections_open",
            "Connections this backend holds open.",
        )?;
        let redis_errors = IntCounter::new(
            "gatehouse_backend_redis_errors_total",
            "Redis calls that failed or missed their deadline.",
        )?;
        let redis_up = IntGauge::new(
            "gatehouse_backend_redis_up",
            "1 when this backend's last Redis call succeeded.",
        )?;
        let generations = IntCounter::new(
            "gatehouse_backend_redis_generations_total",
            "Generation markers this backend made in Redis, seeding the users if Redis had none: \
             a first start, or Redis lost its data.",
        )?;
        let data_losses = IntCounter::new(
            "gatehouse_backend_redis_data_losses_total",
            "Times this backend found Redis's generation marker gone or replaced: Redis lost \
             its data, and every earlier token is refused.",
        )?;
        let tokens_over_cap = IntCounter::new(
            "gatehouse_backend_tokens_over_cap_total",
            "Tokens revoked because their user logged in past backend.max_tokens_per_user.",
        )?;
        let key_checks = IntCounterVec::new(
            Opts::new(
                "gatehouse_backend_api_key_checks_total",
                "X-API-Key checks by outcome: accepted, refused (no such key, or revoked) or \
                 throttled (by the login guard).",
            ),
            &["outcome"],
        )?;
        let audit_events = IntCounter::new(
            "gatehouse_backend_audit_events_total",
            "Audit events this backend recorded.",
        )?;
        let audit_failures = IntCounter::new(
            "gatehouse_backend_audit_failures_total",
            "Audit events this backend could not write to the Redis stream or to the audit \
             file (each is still in the other, and in the application log).",
        )?;
        let audit_suppressed = IntCounter::new(
            "gatehouse_backend_audit_suppressed_total",
            "Refusals (a throttled login, a bad API key, a denied permission) not written to the \
             audit log: a repeat from the same client within 10 s, or past 100 in 10 s.",
        )?;
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(audit_suppressed.clone()),
            Box::new(key_checks.clone()),
            Box::new(audit_events.clone()),
            Box::new(audit_failures.clone()),
            Box::new(latency.clone()),
            Box::new(logins.clone()),
            Box::new(login_throttled.clone()),
            Box::new(connection_limits.clone()),
            Box::new(connections_open.clone()),
            Box::new(redis_errors.clone()),
            Box::new(redis_up.clone()),
            Box::new(generations.clone()),
            Box::new(data_losses.clone()),
            Box::new(tokens_over_cap.clone()),
        ] {
            registry.register(collector)?;
        }
        redis_up.set(1);
        Ok(Self {
            registry,
            endpoints: routes::metric_labels()
                .into_iter()
                .map(|label| Endpoint {
                    label,
                    requests: CLASSES.map(|class| requests.with_label_values(&[label, class])),
                    latency: latency.with_label_values(&[label]),
                })
                .collect(),
            redis_errors,
            redis_up,
            logins: LOGINS.map(|o| logins.with_label_values(&[o])),
            generations,
            data_losses,
            tokens_over_cap,
            login_throttled: GUARD_LIMITS.map(|l| login_throttled.with_label_values(&[l])),
            connection_limits: CONNECTION_LIMITS.map(|l| connection_limits.with_label_values(&[l])),
            connections_open,
            key_checks: KEY_CHECKS.map(|o| key_checks.with_label_values(&[o])),
            audit_events,
            audit_failures,
            audit_suppressed,
        })
    }

    pub fn key_check(&self, outcome: KeyCheck) {
        self.key_checks[outcome as usize].inc();
    }

    pub fn audit_event(&self) {
        self.audit_events.inc();
    }

    pub fn audit_failure(&self) {
        self.audit_failures.inc();
    }

    pub fn audit_suppressed(&self) {
        self.audit_suppressed.inc();
    }

    /// A request answered: `endpoint` is its route's label, [`routes::OTHER`] for none.
    pub fn request(&self, endpoint: &str, status: u16, seconds: f64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        // A handful of labels: a scan is as quick as a lookup. The last one is `other`.
        let Some(series) = self
            .endpoints
            .iter()
            .find(|e| e.label == endpoint)
            .or(self.endpoints.last())
        else {
            return;
        };
        series.requests[class].inc();
        series.latency.observe(seconds);
    }

    pub fn login(&self, outcome: Login) {
        self.logins[outcome as usize].inc();
    }

    pub fn login_throttled(&self, limit: GuardLimit) {
        self.login_throttled[limit as usize].inc();
    }

    pub fn connection_limit(&self, limit: ConnectionLimit) {
        self.connection_limits[limit as usize].inc();
    }

    /// `delta`: +1 when a connection is accepted, -1 when it ends.
    pub fn connections_open(&self, delta: i64) {
        self.connections_open.add(delta);
    }

    pub fn redis(&self, ok: bool) {
        if !ok {
            self.redis_errors.inc();
        }
        self.redis_up.set(i64::from(ok));
    }

    pub fn generation_started(&self) {
        self.generations.inc();
    }

    pub fn redis_data_lost(&self) {
        self.data_losses.inc();
    }

    pub fn tokens_over_cap(&self, revoked: u64) {
        self.tokens_over_cap.inc_by(revoked);
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        // Encoding into a Vec cannot fail on I/O; a malformed family would be our bug.
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "cannot encode metrics");
        }
        out
    }
}

/// Seconds: from a cached ping (tens of microseconds) to an argon2 login (tens of ms) and a
/// Redis call at its deadline.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_the_backend_label_and_move() {
        let metrics = Metrics::new("b7").unwrap();
        metrics.request("count", 503, 0.002);
        metrics.request("users", 403, 0.001);
        metrics.login(Login::Refused);
        metrics.login(Login::Throttled);
        metrics.redis(false);
        metrics.generation_started();
        metrics.redis_data_lost();
        metrics.tokens_over_cap(2);
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(text.contains(
            r#"gatehouse_backend_http_requests_total{endpoint="count",status="5xx",backend="b7"} 1"#
        ));
        assert!(text.contains(
            r#"gatehouse_backend_http_requests_total{endpoint="users",status="4xx",backend="b7"} 1"#
        ));
        assert!(text.contains(
            r#"gatehouse_backend_http_requests_total{endpoint="healthz",status="2xx",backend="b7"} 0"#
        ));
        for outcome in ["refused", "throttled"] {
            assert!(text.contains(&format!(
                r#"gatehouse_backend_logins_total{{outcome="{outcome}",backend="b7"}} 1"#
            )));
        }
        assert!(text.contains(r#"gatehouse_backend_redis_errors_total{backend="b7"} 1"#));
        assert!(text.contains(r#"gatehouse_backend_redis_up{backend="b7"} 0"#));
        for (series, value) in [
            ("gatehouse_backend_redis_generations_total", 1),
            ("gatehouse_backend_redis_data_losses_total", 1),
            ("gatehouse_backend_tokens_over_cap_total", 2),
        ] {
            let line = format!(r#"{series}{{backend="b7"}} {value}"#);
            assert!(text.contains(&line), "{line}");
        }
    }

    #[test]
    fn guard_and_connection_limits_are_counted_by_limit() {
        let metrics = Metrics::new("b2").unwrap();
        metrics.login_throttled(GuardLimit::UserAllIps);
        metrics.connection_limit(ConnectionLimit::HeaderTimeout);
        metrics.connection_limit(ConnectionLimit::MaxConnections);
        metrics.connection_limit(ConnectionLimit::BodyTimeout);
        metrics.connections_open(1);
        metrics.connections_open(1);
        metrics.connections_open(-1);
        let text = String::from_utf8(metrics.render()).unwrap();
        for series in [
            r#"gatehouse_backend_login_throttled_total{limit="user_all_ips",backend="b2"} 1"#,
            r#"gatehouse_backend_login_throttled_total{limit="user_per_ip",backend="b2"} 0"#,
            r#"gatehouse_backend_connection_limits_total{limit="header_timeout",backend="b2"} 1"#,
            r#"gatehouse_backend_connection_limits_total{limit="idle_timeout",backend="b2"} 0"#,
            r#"gatehouse_backend_connection_limits_total{limit="max_connections",backend="b2"} 1"#,
            r#"gatehouse_backend_connection_limits_total{limit="body_timeout",backend="b2"} 1"#,
            r#"gatehouse_backend_connections_open{backend="b2"} 1"#,
        ] {
            assert!(text.contains(series), "{series} in\n{text}");
        }
    }
}
