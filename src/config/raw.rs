//! The file as written: one struct per table, with the defaults. `deny_unknown_fields` turns
//! typos into errors (a key that moved gets its own message first, see [`super::moved`]).
//! Nothing here is checked beyond its type; each section's own file does that.
//!
//! Durations are strings with a unit (`"30s"`, `"1500ms"`, `"30days"`); `"off"` is the one
//! spelling of "none of this".

use std::{collections::BTreeMap, fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The word that turns a feature off, wherever one can be.
pub const OFF: &str = "off";

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub proxy: RawProxy,
    pub limits: RawLimits,
    pub upstream: RawUpstream,
    pub access: RawAccess,
    pub tls: RawTls,
    /// Present: the HTTPS listener's certificates come from an ACME server.
    pub acme: Option<RawAcme>,
    #[serde(rename = "static")]
    pub statics: RawStatic,
    pub cache: RawCache,
    pub backend: RawBackend,
    pub audit: RawAudit,
    pub redis: RawRedis,
    pub paths: RawPaths,
    pub admin: RawAdmin,
    pub logging: RawLogging,
    /// Listing any policy replaces the built-in `default`.
    pub rate_limits: BTreeMap<String, RawRate>,
    /// Named pools of servers, by name; none by default.
    pub upstreams: BTreeMap<String, RawNamedPool>,
    pub routes: Vec<RawRoute>,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            proxy: RawProxy::default(),
            limits: RawLimits::default(),
            upstream: RawUpstream::default(),
            access: RawAccess::default(),
            tls: RawTls::default(),
            acme: None,
            statics: RawStatic::default(),
            cache: RawCache::default(),
            backend: RawBackend::default(),
            audit: RawAudit::default(),
            redis: RawRedis::default(),
            paths: RawPaths::default(),
            admin: RawAdmin::default(),
            logging: RawLogging::default(),
            rate_limits: default_rate_limits(),
            upstreams: BTreeMap::new(),
            routes: Vec::new(),
        }
    }
}

/// A duration written with its unit; bare numbers are refused, so `30` is never a guess
/// between seconds and milliseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Human(pub Duration);

impl<'de> Deserialize<'de> for Human {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Human;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration with a unit, like \"30s\" or \"1500ms\"")
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Human, E> {
                humantime::parse_duration(value).map(Human).map_err(|e| {
                    E::custom(format!(
                        "{value:?} is not a duration ({e}): write it with a unit, like \"30s\" \
                         or \"1500ms\""
                    ))
                })
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

impl Serialize for Human {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

fn secs(n: u64) -> Human {
    Human(Duration::from_secs(n))
}

fn millis(n: u64) -> Human {
    Human(Duration::from_millis(n))
}

/// The HTTP listener and the proxy process.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawProxy {
    pub listen: String,
    pub threads: usize,
    pub shutdown_grace: Human,
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            threads: 0,
            shutdown_grace: secs(10),
        }
    }
}

/// What one client and one request may take.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_timeout: Human,
    pub body_timeout: Human,
    pub send_timeout: Human,
    pub tls_handshake_timeout: Human,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub max_upstream_requests_per_client: usize,
    pub max_requests_per_connection: u32,
    pub upgrade_idle_timeout: Human,
    pub max_upgraded_per_client: usize,
    pub h2_max_streams: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_header_bytes: 32 << 10,
            max_headers: 100,
            header_timeout: secs(10),
            body_timeout: secs(30),
            send_timeout: secs(30),
            tls_handshake_timeout: secs(10),
            max_connections: 4096,
            max_connections_per_client: 256,
            max_upstream_requests_per_client: 128,
            max_requests_per_connection: 1000,
            upgrade_idle_timeout: secs(3600),
            max_upgraded_per_client: 16,
            h2_max_streams: 100,
        }
    }
}

/// How the proxy uses the backends: deadlines, the cap and queue, health checks.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub connect_timeout: Human,
    pub read_timeout: Human,
    pub max_connections: usize,
    pub queue_timeout: Human,
    pub health_check_interval: Human,
    pub socket_dir: Option<PathBuf>,
    pub socket_dir_max_backends: usize,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            connect_timeout: secs(1),
            read_timeout: secs(30),
            max_connections: 512,
            queue_timeout: secs(2),
            health_check_interval: secs(1),
            socket_dir: None,
            socket_dir_max_backends: 256,
        }
    }
}

/// One of `[[tls.certificates]]`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One of `[[tls.sites]]`: hosts that routes name, with their own redirect and HSTS.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTlsSite {
    pub hosts: Vec<String>,
    /// Default: `tls.redirect_http`.
    pub redirect_http: Option<bool>,
    /// A header value, or `"off"`. Default: `tls.hsts`.
    pub hsts: Option<String>,
}

/// `[upstreams.NAME]`: a pool of servers. Deadlines and the cap default to `[upstream]`'s.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawNamedPool {
    /// `host:port`, `[v6]:port` or `unix:PATH`.
    pub servers: Vec<String>,
    #[serde(default = "round_robin")]
    pub balance: String,
    pub hash_header: Option<String>,
    #[serde(default)]
    pub tls: bool,
    pub sni: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// A path to `GET`, or `off`.
    #[serde(default = "off")]
    pub health_check: String,
    #[serde(default = "two_seconds")]
    pub health_check_interval: Human,
    #[serde(default = "two_seconds")]
    pub health_check_timeout: Human,
    #[serde(default = "two")]
    pub health_check_rise: usize,
    #[serde(default = "three")]
    pub health_check_fall: usize,
    pub connect_timeout: Option<Human>,
    pub read_timeout: Option<Human>,
    #[serde(default = "four_seconds")]
    pub idle_timeout: Human,
    pub max_connections: Option<usize>,
    pub queue_timeout: Option<Human>,
    #[serde(default = "thirty_seconds")]
    pub resolve_interval: Human,
}

fn round_robin() -> String {
    "round_robin".into()
}
fn off() -> String {
    OFF.into()
}
fn two_seconds() -> Human {
    secs(2)
}
fn four_seconds() -> Human {
    secs(4)
}
fn thirty_seconds() -> Human {
    secs(30)
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}

/// Who the client is, and the defaults of every route's access rules.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAccess {
    pub trusted_proxies: Vec<String>,
    pub client_ip_header: String,
    pub default_rate_limit: String,
    pub rate_limit_max_keys: usize,
    pub auth_max_failures: u32,
    pub auth_max_failures_per_user: u32,
    pub auth_failure_window: Human,
    pub auth_guard_max_keys: usize,
}

impl Default for RawAccess {
    fn default() -> Self {
        Self {
            trusted_proxies: Vec::new(),
            client_ip_header: "x-forwarded-for".into(),
            default_rate_limit: "default".into(),
            rate_limit_max_keys: 100_000,
            auth_max_failures: 10,
            auth_max_failures_per_user: 100,
            auth_failure_window: secs(60),
            auth_guard_max_keys: 100_000,
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTls {
    /// An address, or `"off"`.
    pub listen: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub server_names: Vec<String>,
    /// More pairs, each chosen by the names in its certificate (SNI).
    pub certificates: Vec<RawCertificate>,
    /// A header value, or `"off"`.
    pub hsts: String,
    pub redirect_http: bool,
    /// The HTTPS port clients reach, when a port mapping makes it differ from `listen`'s.
    pub redirect_port: Option<u16>,
    pub sites: Vec<RawTlsSite>,
    /// A PEM bundle of the CAs whose client certificates are taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// `"required"` (the default with `client_ca`) or `"optional"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certs: Option<String>,
    pub client_users: Vec<RawClientUser>,
}

/// One of `[[tls.client_users]]`: the certificates that sign in as `user`, by one of their
/// names.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientUser {
    pub user: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cn: Option<String>,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8443".into(),
            cert: "certs/gatehouse.crt".into(),
            key: "certs/gatehouse.key".into(),
            server_names: Vec::new(),
            certificates: Vec::new(),
            hsts: "max-age=31536000".into(),
            redirect_http: true,
            redirect_port: None,
            sites: Vec::new(),
            client_ca: None,
            client_certs: None,
            client_users: Vec::new(),
        }
    }
}

/// `[acme]`: certificates from an ACME server (RFC 8555).
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAcme {
    pub directory: String,
    /// Email addresses (`mailto:` added when absent) for the CA's notices.
    pub contact: Vec<String>,
    /// A PEM root certificate to trust for the ACME server itself.
    pub trust: Option<PathBuf>,
    pub challenge: String,
    /// Default: `acme` under `paths.data_dir`.
    pub storage: Option<PathBuf>,
    pub renew_before: Human,
}

impl Default for RawAcme {
    fn default() -> Self {
        Self {
            directory: "https://acme-v02.api.letsencrypt.org/directory".into(),
            contact: Vec::new(),
            trust: None,
            challenge: "http-01".into(),
            storage: None,
            renew_before: Human(std::time::Duration::from_secs(30 * 24 * 3600)),
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStatic {
    pub cache_bytes: u64,
    pub max_cached_file_bytes: u64,
    pub min_compress_bytes: u64,
    pub check_interval: Human,
}

impl Default for RawStatic {
    fn default() -> Self {
        Self {
            cache_bytes: 64 << 20,
            max_cached_file_bytes: 1 << 20,
            min_compress_bytes: 256,
            check_interval: secs(1),
        }
    }
}

/// `[audit]`: the audit log's file and the cap on its Redis stream.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    pub file: String,
    pub max_events: u64,
}

impl Default for RawAudit {
    fn default() -> Self {
        Self {
            file: "off".into(),
            max_events: gatehouse_backend::audit::DEFAULT_MAX_EVENTS,
        }
    }
}

/// `[cache]`: the memory for every route's kept backend responses.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    pub max_bytes: u64,
    pub max_object_bytes: u64,
    pub lock_timeout: Human,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_object_bytes: 1 << 20,
            lock_timeout: secs(5),
        }
    }
}

/// A route's `[routes.cache]`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRouteCache {
    pub max_ttl: Human,
    pub default_ttl: Human,
    pub stale_while_revalidate: Human,
    pub stale_if_error: Human,
}

impl Default for RawRouteCache {
    fn default() -> Self {
        Self {
            max_ttl: secs(3600),
            default_ttl: secs(0),
            stale_while_revalidate: secs(0),
            stale_if_error: secs(0),
        }
    }
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawRate {
    pub per_second: f64,
    pub burst: u32,
}

fn default_rate_limits() -> BTreeMap<String, RawRate> {
    // nginx-like defaults: 20 requests a second per client, bursts of 40.
    [(
        "default".to_string(),
        RawRate {
            per_second: 20.0,
            burst: 40,
        },
    )]
    .into()
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawBackend {
    pub count: usize,
    pub users_file: PathBuf,
    pub token_ttl: Human,
    pub max_body_bytes: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_password_file: Option<PathBuf>,
    pub max_tokens_per_user: usize,
    pub login_max_failures_per_user_per_ip: u32,
    pub login_max_failures_per_ip: u32,
    pub login_max_failures_per_user_all_ips: u32,
    pub login_failure_window: Human,
    pub login_known_address_ttl: Human,
    pub header_timeout: Human,
    pub body_timeout: Human,
    pub idle_timeout: Human,
    pub max_connections: usize,
}

impl Default for RawBackend {
    fn default() -> Self {
        Self {
            count: 3,
            users_file: "users".into(),
            token_ttl: secs(3600),
            max_body_bytes: 16 * 1024,
            jwt_secret_file: None,
            admin_password_file: None,
            max_tokens_per_user: gatehouse_backend::accounts::DEFAULT_MAX_TOKENS_PER_USER,
            login_max_failures_per_user_per_ip: 5,
            login_max_failures_per_ip: 20,
            // NIST SP 800-63B: no more than 100 consecutive failures on one account.
            login_max_failures_per_user_all_ips: 100,
            login_failure_window: secs(300),
            login_known_address_ttl: secs(30 * 86_400),
            // nginx's client_header_timeout is 60 s; a backend's only client is the proxy,
            // which sends a whole header at once, so 10 s is generous (the proxy's own
            // limits.header_timeout).
            header_timeout: secs(10),
            // nginx's client_body_timeout is 60 s between reads; this is for the whole body,
            // a few KiB of JSON the proxy passes on as it comes.
            body_timeout: secs(10),
            // nginx's keepalive_timeout (75 s): longer than the proxy keeps an idle backend
            // connection (60 s), so the proxy is the one that closes it, never a request.
            idle_timeout: secs(75),
            // Like HAProxy's per-server maxconn; far below the usual 1024 soft limit once it
            // is raised to the hard one.
            max_connections: 1024,
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRedis {
    /// A Redis URL, or `"managed"`: `gatehouse run` starts its own.
    pub url: String,
    /// The password of an external Redis (`requirepass`), read from this file.
    pub password_file: Option<PathBuf>,
    pub server_binary: String,
    pub timeout: Human,
}

/// `redis.url` for a Redis the group starts and manages itself.
pub const MANAGED: &str = "managed";

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: MANAGED.into(),
            password_file: None,
            server_binary: "redis-server".into(),
            timeout: millis(1000),
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAdmin {
    /// An address, or `"off"`.
    pub listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9180".into(),
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLogging {
    pub format: String,
    /// A file, `"-"` for standard output, or `"off"`.
    pub access_log: String,
    pub access_log_format: String,
}

impl Default for RawLogging {
    fn default() -> Self {
        Self {
            format: "text".into(),
            access_log: "-".into(),
            access_log_format: "json".into(),
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPaths {
    pub runtime_dir: PathBuf,
    pub data_dir: PathBuf,
}

impl Default for RawPaths {
    fn default() -> Self {
        Self {
            runtime_dir: "var/run".into(),
            data_dir: "var/data".into(),
        }
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub prefix: String,
    /// Host names (`app.example.com`, `*.example.com`) the route is for; none: the default
    /// site, for every other host.
    #[serde(default)]
    pub hosts: Vec<String>,
    pub upstream: Option<String>,
    pub rewrite_prefix: Option<String>,
    pub static_dir: Option<PathBuf>,
    /// A path: requests are redirected there, the prefix replaced by it.
    pub redirect: Option<String>,
    pub cache_control: Option<String>,
    /// Status (`"404"`) to a file below `static_dir`.
    pub error_pages: Option<BTreeMap<String, PathBuf>>,
    pub fallback: Option<PathBuf>,
    pub rate_limit: Option<String>,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    pub htpasswd: Option<PathBuf>,
    pub realm: Option<String>,
    #[serde(default)]
    pub pass_authorization: bool,
    pub access_log: Option<String>,
    pub request_headers: Option<RawHeaderRules>,
    pub response_headers: Option<RawHeaderRules>,
    #[serde(default)]
    pub security_headers: bool,
    pub cors: Option<RawCors>,
    pub cache: Option<RawRouteCache>,
    /// `"required"`: requests without a verified client certificate are refused;
    /// `"optional"` (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<String>,
}

/// A route's `request_headers` or `response_headers`.
#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RawHeaderRules {
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

/// A route's `cors`.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    pub origins: Vec<String>,
    #[serde(default = "default_cors_methods")]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    pub max_age: Option<Human>,
    #[serde(default)]
    pub credentials: bool,
}

fn default_cors_methods() -> Vec<String> {
    ["GET", "HEAD", "POST"].map(String::from).to_vec()
}
