//! Configuration in layers: the TOML file (and a few environment overrides) -> one validated
//! [`Config`] -> settings for the proxy, the backends and the supervisor. Nothing after this
//! module re-parses a string, and every error names the file, the line and the key.
//!
//! Relative paths in the file are relative to the file's own directory, so the group runs the
//! same from any working directory.

mod locate;

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use locate::Document;

/// Environment variables that override the file. Secrets and listen addresses are the
/// things a deployment changes without editing the file.
pub const ENV_LISTEN: &str = "GATEHOUSE_LISTEN";
pub const ENV_TLS_LISTEN: &str = "GATEHOUSE_TLS_LISTEN";
pub const ENV_REDIS_URL: &str = "GATEHOUSE_REDIS_URL";
pub const ENV_JWT_SECRET: &str = "GATEHOUSE_JWT_SECRET";
pub const ENV_JWT_SECRET_FILE: &str = "GATEHOUSE_JWT_SECRET_FILE";
pub const ENV_ADMIN_PASSWORD_FILE: &str = "GATEHOUSE_ADMIN_PASSWORD_FILE";
/// What the proxy's environment never holds: it signs and checks no token.
pub const SECRET_ENV: [&str; 3] = [ENV_JWT_SECRET, ENV_JWT_SECRET_FILE, ENV_ADMIN_PASSWORD_FILE];
pub const ENV_ADMIN_LISTEN: &str = "GATEHOUSE_ADMIN_LISTEN";
pub const ENV_LOG_FORMAT: &str = "GATEHOUSE_LOG_FORMAT";

/// How long the proxy keeps an idle pooled backend connection, and the least
/// `backend.idle_timeout_seconds` may be: that plus a margin for timers and a loaded machine.
const PROXY_POOL_IDLE_SECONDS: u64 = gatehouse_proxy::upstream::POOL_IDLE_TIMEOUT.as_secs();
const MIN_BACKEND_IDLE_SECONDS: u64 = PROXY_POOL_IDLE_SECONDS + 5;
/// Idle connections the proxy may keep pooled to one backend (Pingora's
/// `upstream_keepalive_pool_size`, whose default the proxy keeps), on top of the requests in
/// flight; and a few more for the health checks.
const PROXY_POOL_IDLE_CONNECTIONS: usize = 128;
const HEALTH_CHECK_CONNECTIONS: usize = 8;

/// Unix socket paths are limited to 108 bytes including the terminator (`sun_path`).
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug)]
pub struct ConfigError {
    /// The file (or environment variable) the bad value came from.
    pub origin: String,
    pub line: Option<usize>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub proxy: Proxy,
    pub backend: Backend,
    pub redis: Redis,
    pub tls: Option<Tls>,
    pub statics: gatehouse_proxy::StaticSettings,
    pub access: gatehouse_proxy::AccessSettings,
    pub runtime_dir: PathBuf,
    pub data_dir: PathBuf,
    pub routes: Vec<gatehouse_proxy::Route>,
    /// `None`: no admin listener (and no metrics kept).
    pub admin_listen: Option<SocketAddr>,
    pub logging: Logging,
}

#[derive(Debug, Clone)]
pub struct Logging {
    /// Application logs as JSON lines rather than text.
    pub json: bool,
    pub access_log_format: gatehouse_proxy::LogFormat,
    /// The log of requests no route takes, and of routes that name none.
    pub access_log: Option<gatehouse_proxy::LogTarget>,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Names for redirects (the first) and for a generated certificate (all).
    pub server_names: Vec<String>,
    pub hsts: Option<String>,
    pub redirect_http: bool,
}

#[derive(Debug, Clone)]
pub struct Proxy {
    pub listen: SocketAddr,
    pub limits: gatehouse_proxy::RequestLimits,
    pub h2_max_streams: u32,
    /// Requests in flight to one backend at once.
    pub upstream_max_connections: usize,
    pub upstream_queue_timeout: Duration,
    pub threads: usize,
    pub shutdown_grace: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub health_check_interval: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Backend {
    pub count: usize,
    pub users_file: PathBuf,
    pub token_ttl_seconds: u64,
    pub max_body_bytes: usize,
    /// Where the JWT secret comes from; `None`: `gatehouse run` makes one for the group and
    /// warns. Read with [`Backend::jwt_secret`].
    pub jwt_secret: Option<Secret>,
    /// The password of the first `admin` user, replacing the users file's; read with
    /// [`Backend::admin_password`].
    pub admin_password: Option<Secret>,
    /// Live tokens a user may hold; a login past it revokes the oldest.
    pub max_tokens_per_user: usize,
    /// The login brute-force guard.
    pub login_guard: gatehouse_backend::GuardSettings,
    /// Deadlines and the cap on each backend's own connections.
    pub connections: gatehouse_backend::ConnectionLimits,
}

/// Where a secret is read from. Loading the config only names it: the processes that need it
/// (the backends, and `gatehouse check` and `run` to validate it) read it, and the proxy,
/// which signs and checks no token, never does.
#[derive(Debug, Clone, PartialEq)]
pub enum Secret {
    /// The value of this environment variable.
    Env(&'static str),
    /// A file, and who named it, for errors: a key of the config file (with its line) or an
    /// environment variable.
    File {
        path: PathBuf,
        origin: String,
        line: Option<usize>,
        key: Option<String>,
    },
}

impl Secret {
    /// The secret's bytes, without the newline a file written with `echo` ends in.
    fn read(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Vec<u8>, ConfigError> {
        let mut bytes = match self {
            Secret::Env(name) => env(name).unwrap_or_default().into_bytes(),
            Secret::File { path, .. } => std::fs::read(path).map_err(|e| {
                self.error(format!(
                    "cannot read the secret file {}: {e}",
                    path.display()
                ))
            })?,
        };
        while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
            bytes.pop();
        }
        Ok(bytes)
    }

    /// An error about the secret, naming where it came from.
    fn error(&self, message: String) -> ConfigError {
        match self {
            Secret::Env(name) => ConfigError {
                origin: format!("environment variable {name}"),
                line: None,
                key: None,
                message,
            },
            Secret::File {
                origin, line, key, ..
            } => ConfigError {
                origin: origin.clone(),
                line: *line,
                key: key.clone(),
                message,
            },
        }
    }
}

impl Backend {
    /// Reads and checks the JWT secret (`None`: none configured). Only backends, `check` and
    /// the supervisor call this; never the proxy.
    pub fn jwt_secret(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(secret) = &self.jwt_secret else {
            return Ok(None);
        };
        let bytes = secret.read(env)?;
        gatehouse_backend::Tokens::new(&bytes, 1).map_err(|e| secret.error(e.to_string()))?;
        Ok(Some(bytes))
    }

    /// Reads and checks the first admin's password (`None`: the users file's stands).
    pub fn admin_password(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<String>, ConfigError> {
        let Some(secret) = &self.admin_password else {
            return Ok(None);
        };
        let password = String::from_utf8(secret.read(env)?)
            .map_err(|_| secret.error("the admin password is not UTF-8".into()))?;
        let (min, max) = (
            gatehouse_backend::password::MIN_PASSWORD_CHARS,
            gatehouse_backend::password::MAX_PASSWORD_CHARS,
        );
        let chars = password.chars().count();
        if !(min..=max).contains(&chars) {
            return Err(secret.error(format!(
                "the admin password has {chars} characters: it needs {min} to {max}"
            )));
        }
        Ok(Some(password))
    }
}

/// The real environment, for [`Backend::jwt_secret`] and [`Backend::admin_password`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Redis {
    /// `None`: `gatehouse run` starts and manages its own `redis-server`.
    pub url: Option<String>,
    pub server_binary: String,
    pub timeout: Duration,
}

impl Config {
    /// An error about `key` found after loading (in a file the config names, say), naming
    /// the config file and the key's line in it as a loading error would.
    pub fn error_at(&self, key: &str, message: String) -> ConfigError {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        ConfigError {
            origin: self.file.display().to_string(),
            line: Document::parse(&text).line_of_key(key),
            key: Some(key.to_string()),
            message,
        }
    }

    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
            origin: file.display().to_string(),
            line: None,
            key: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Self::from_str(&text, file, &|name| std::env::var(name).ok())
    }

    /// `env` is the environment lookup, passed in so tests need not touch the real one.
    pub fn from_str(
        text: &str,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let doc = Document::parse(text);
        let origin = file.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map(|s| s.start);
            ConfigError {
                origin: origin.clone(),
                line: offset.map(|o| doc.line_of_offset(o)),
                key: offset.and_then(|o| doc.key_at(o)),
                message: e.message().trim().to_string(),
            }
        })?;
        // Absolute, because children (Redis above all) may change their working directory.
        let parent = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(parent).map_err(|e| ConfigError {
            origin: origin.clone(),
            line: None,
            key: None,
            message: format!("cannot resolve the config directory: {e}"),
        })?;
        let base = base.as_path();
        let at = |key: &str, message: String| ConfigError {
            origin: origin.clone(),
            line: doc.line_of_key(key),
            key: Some(key.to_string()),
            message,
        };
        let from_env = |name: &str, message: String| ConfigError {
            origin: format!("environment variable {name}"),
            line: None,
            key: None,
            message,
        };

        let proxy = {
            let p = &raw.proxy;
            let listen =
                listen_address(env(ENV_LISTEN), ENV_LISTEN, &p.listen, "proxy.listen", &at)?;
            let threads = match p.threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n if n > 256 => {
                    return Err(at("proxy.threads", format!("{n} threads is more than 256")));
                }
                n => n,
            };
            positive(
                p.upstream_connect_timeout_ms,
                "proxy.upstream_connect_timeout_ms",
                &at,
            )?;
            positive(
                p.upstream_read_timeout_seconds,
                "proxy.upstream_read_timeout_seconds",
                &at,
            )?;
            positive(
                p.health_check_interval_ms,
                "proxy.health_check_interval_ms",
                &at,
            )?;
            within(
                p.max_body_bytes,
                1..=1 << 30,
                "proxy.max_body_bytes",
                " bytes",
                &at,
            )?;
            // Pingora refuses more than 1 MiB read with a header (body bytes included) and
            // more than 256 fields; a quarter of that leaves room for the body's first bytes.
            within(
                p.max_header_bytes,
                1024..=256 << 10,
                "proxy.max_header_bytes",
                " bytes",
                &at,
            )?;
            within(p.max_headers, 8..=256, "proxy.max_headers", "", &at)?;
            within(
                p.header_timeout_ms,
                100..=600_000,
                "proxy.header_timeout_ms",
                " ms",
                &at,
            )?;
            within(
                p.body_timeout_ms,
                100..=600_000,
                "proxy.body_timeout_ms",
                " ms",
                &at,
            )?;
            within(
                p.max_connections,
                1..=1_000_000,
                "proxy.max_connections",
                "",
                &at,
            )?;
            within(
                p.max_connections_per_client,
                1..=1_000_000,
                "proxy.max_connections_per_client",
                "",
                &at,
            )?;
            within(
                p.send_timeout_ms,
                100..=600_000,
                "proxy.send_timeout_ms",
                " ms",
                &at,
            )?;
            within(
                p.tls_handshake_timeout_ms,
                100..=600_000,
                "proxy.tls_handshake_timeout_ms",
                " ms",
                &at,
            )?;
            within(p.h2_max_streams, 1..=1000, "proxy.h2_max_streams", "", &at)?;
            within(
                p.upstream_max_connections,
                1..=1_000_000,
                "proxy.upstream_max_connections",
                "",
                &at,
            )?;
            within(
                p.upstream_max_requests_per_client,
                1..=1_000_000,
                "proxy.upstream_max_requests_per_client",
                "",
                &at,
            )?;
            within(
                p.upstream_queue_timeout_ms,
                0..=600_000,
                "proxy.upstream_queue_timeout_ms",
                " ms",
                &at,
            )?;
            Proxy {
                listen,
                limits: gatehouse_proxy::RequestLimits {
                    max_body_bytes: p.max_body_bytes,
                    max_header_bytes: p.max_header_bytes,
                    max_headers: p.max_headers,
                    header_timeout: Duration::from_millis(p.header_timeout_ms),
                    body_timeout: Duration::from_millis(p.body_timeout_ms),
                    max_connections: p.max_connections,
                    max_connections_per_client: p.max_connections_per_client,
                    send_timeout: Duration::from_millis(p.send_timeout_ms),
                    tls_handshake_timeout: Duration::from_millis(p.tls_handshake_timeout_ms),
                    max_upstream_requests_per_client: p.upstream_max_requests_per_client,
                },
                h2_max_streams: p.h2_max_streams,
                upstream_max_connections: p.upstream_max_connections,
                upstream_queue_timeout: Duration::from_millis(p.upstream_queue_timeout_ms),
                threads,
                shutdown_grace: Duration::from_secs(p.shutdown_grace_seconds),
                connect_timeout: Duration::from_millis(p.upstream_connect_timeout_ms),
                read_timeout: Duration::from_secs(p.upstream_read_timeout_seconds),
                health_check_interval: Duration::from_millis(p.health_check_interval_ms),
            }
        };

        let backend = {
            let b = &raw.backend;
            if !(1..=64).contains(&b.count) {
                return Err(at(
                    "backend.count",
                    format!("{} backends: choose 1 to 64", b.count),
                ));
            }
            positive(b.token_ttl_seconds, "backend.token_ttl_seconds", &at)?;
            if !(64..=1 << 20).contains(&b.max_body_bytes) {
                return Err(at(
                    "backend.max_body_bytes",
                    format!("{} bytes: choose 64 to 1048576", b.max_body_bytes),
                ));
            }
            // Named here, read only by those that need it (see `Secret`).
            let from_file = |path: &Path, key: &str| Secret::File {
                path: base.join(path),
                origin: origin.clone(),
                line: doc.line_of_key(key),
                key: Some(key.to_string()),
            };
            let from_env_file = |name: &'static str, path: String| Secret::File {
                path: PathBuf::from(path),
                origin: format!("environment variable {name}"),
                line: None,
                key: None,
            };
            let jwt_secret = match (env(ENV_JWT_SECRET), env(ENV_JWT_SECRET_FILE)) {
                (Some(_), _) => Some(Secret::Env(ENV_JWT_SECRET)),
                (None, Some(path)) => Some(from_env_file(ENV_JWT_SECRET_FILE, path)),
                (None, None) => b
                    .jwt_secret_file
                    .as_deref()
                    .map(|path| from_file(path, "backend.jwt_secret_file")),
            };
            let admin_password = match env(ENV_ADMIN_PASSWORD_FILE).filter(|p| !p.is_empty()) {
                Some(path) => Some(from_env_file(ENV_ADMIN_PASSWORD_FILE, path)),
                None => b
                    .admin_password_file
                    .as_deref()
                    .filter(|p| !p.as_os_str().is_empty())
                    .map(|path| from_file(path, "backend.admin_password_file")),
            };
            within(
                b.max_tokens_per_user,
                1..=gatehouse_backend::accounts::MAX_TOKENS_PER_USER,
                "backend.max_tokens_per_user",
                "",
                &at,
            )?;
            if b.login_max_failures_per_user.is_some() {
                // Its old meaning (one count per name, from every address) was a lockout
                // weapon; a file that still sets it must say which of the new limits it means.
                return Err(at(
                    "backend.login_max_failures_per_user",
                    "renamed: failures for one user name are now counted per client address \
                     (backend.login_max_failures_per_user_per_ip, default 5), with a higher \
                     ceiling over every address (backend.login_max_failures_per_user_all_ips, \
                     default 100)"
                        .into(),
                ));
            }
            positive(
                b.login_max_failures_per_user_per_ip,
                "backend.login_max_failures_per_user_per_ip",
                &at,
            )?;
            positive(
                b.login_max_failures_per_ip,
                "backend.login_max_failures_per_ip",
                &at,
            )?;
            if b.login_max_failures_per_user_all_ips < b.login_max_failures_per_user_per_ip {
                return Err(at(
                    "backend.login_max_failures_per_user_all_ips",
                    format!(
                        "{} is below backend.login_max_failures_per_user_per_ip ({}): the \
                         ceiling over every address must be at least the per-address limit",
                        b.login_max_failures_per_user_all_ips, b.login_max_failures_per_user_per_ip
                    ),
                ));
            }
            within(
                b.login_known_address_seconds,
                0..=31_536_000,
                "backend.login_known_address_seconds",
                " seconds",
                &at,
            )?;
            within(
                b.header_timeout_ms,
                100..=600_000,
                "backend.header_timeout_ms",
                " ms",
                &at,
            )?;
            within(
                b.body_timeout_ms,
                100..=600_000,
                "backend.body_timeout_ms",
                " ms",
                &at,
            )?;
            within(
                b.idle_timeout_seconds,
                1..=3600,
                "backend.idle_timeout_seconds",
                " seconds",
                &at,
            )?;
            // The proxy must be the one to close an idle pooled connection: if the backend
            // closes it first, a request the proxy sends on it at that moment fails.
            if b.idle_timeout_seconds <= MIN_BACKEND_IDLE_SECONDS {
                return Err(at(
                    "backend.idle_timeout_seconds",
                    format!(
                        "{} seconds: must be above {MIN_BACKEND_IDLE_SECONDS}, so that the \
                         proxy, which keeps an idle backend connection for \
                         {PROXY_POOL_IDLE_SECONDS} s, always closes it first (a request sent on \
                         a connection the backend is closing would fail)",
                        b.idle_timeout_seconds
                    ),
                ));
            }
            within(
                b.max_connections,
                1..=1_000_000,
                "backend.max_connections",
                "",
                &at,
            )?;
            let needed = proxy
                .upstream_max_connections
                .saturating_add(PROXY_POOL_IDLE_CONNECTIONS + HEALTH_CHECK_CONNECTIONS);
            if b.max_connections < needed {
                return Err(at(
                    "backend.max_connections",
                    format!(
                        "{}: must be at least {needed}, proxy.upstream_max_connections ({}) + \
                         {PROXY_POOL_IDLE_CONNECTIONS} idle connections the proxy may keep \
                         pooled + {HEALTH_CHECK_CONNECTIONS} for health checks; below that, \
                         requests the proxy lets through wait in the backend's listen queue",
                        b.max_connections, proxy.upstream_max_connections
                    ),
                ));
            }
            if !(1..=86_400).contains(&b.login_failure_window_seconds) {
                return Err(at(
                    "backend.login_failure_window_seconds",
                    format!(
                        "{} seconds: choose 1 to 86400",
                        b.login_failure_window_seconds
                    ),
                ));
            }
            Backend {
                count: b.count,
                users_file: base.join(&b.users_file),
                token_ttl_seconds: b.token_ttl_seconds,
                max_body_bytes: b.max_body_bytes,
                jwt_secret,
                admin_password,
                max_tokens_per_user: b.max_tokens_per_user,
                login_guard: gatehouse_backend::GuardSettings {
                    max_failures_per_user_per_ip: b.login_max_failures_per_user_per_ip,
                    max_failures_per_ip: b.login_max_failures_per_ip,
                    max_failures_per_user_all_ips: b.login_max_failures_per_user_all_ips,
                    window_seconds: b.login_failure_window_seconds,
                    known_address_seconds: b.login_known_address_seconds,
                },
                connections: gatehouse_backend::ConnectionLimits {
                    header_timeout: Duration::from_millis(b.header_timeout_ms),
                    body_timeout: Duration::from_millis(b.body_timeout_ms),
                    idle_timeout: Duration::from_secs(b.idle_timeout_seconds),
                    max_connections: b.max_connections,
                },
            }
        };

        let redis = {
            let r = &raw.redis;
            let url = env(ENV_REDIS_URL)
                .or_else(|| r.url.clone())
                .filter(|u| !u.is_empty());
            if let Some(url) = &url {
                redis_url_ok(url).map_err(|m| match env(ENV_REDIS_URL) {
                    Some(_) => from_env(ENV_REDIS_URL, m),
                    None => at("redis.url", m),
                })?;
            }
            positive(r.timeout_ms, "redis.timeout_ms", &at)?;
            Redis {
                url,
                server_binary: r.server_binary.clone(),
                timeout: Duration::from_millis(r.timeout_ms),
            }
        };

        let runtime_dir = base.join(&raw.paths.runtime_dir);
        let data_dir = base.join(&raw.paths.data_dir);

        let tls = match &raw.tls {
            t if !t.enabled => None,
            t => {
                let listen = listen_address(
                    env(ENV_TLS_LISTEN),
                    ENV_TLS_LISTEN,
                    &t.listen,
                    "tls.listen",
                    &at,
                )?;
                for (i, name) in t.server_names.iter().enumerate() {
                    if !gatehouse_proxy::https_redirect::is_dns_name(name) {
                        return Err(at(
                            &format!("tls.server_names[{i}]"),
                            format!("{name:?} is not a host name"),
                        ));
                    }
                }
                let hsts = Some(t.hsts.trim().to_string()).filter(|h| !h.is_empty());
                if let Some(value) = &hsts {
                    header_value_ok(value).map_err(|m| at("tls.hsts", m))?;
                }
                Some(Tls {
                    listen,
                    cert: base.join(&t.cert),
                    key: base.join(&t.key),
                    server_names: t.server_names.clone(),
                    hsts,
                    redirect_http: t.redirect_http,
                })
            }
        };

        let st = &raw.statics;
        positive(st.cache_bytes, "static.cache_bytes", &at)?;
        within(
            st.check_interval_ms,
            0..=3_600_000,
            "static.check_interval_ms",
            " ms",
            &at,
        )?;
        positive(
            st.max_cached_file_bytes,
            "static.max_cached_file_bytes",
            &at,
        )?;
        let statics = gatehouse_proxy::StaticSettings {
            cache_bytes: st.cache_bytes,
            max_cached_file_bytes: st.max_cached_file_bytes,
            min_compress_bytes: st.min_compress_bytes,
            check_interval: Duration::from_millis(st.check_interval_ms),
        };

        let admin_listen = match env(ENV_ADMIN_LISTEN) {
            Some(value) if value.is_empty() => None,
            Some(value) => Some(listen_address(
                Some(value),
                ENV_ADMIN_LISTEN,
                "",
                "admin.listen",
                &at,
            )?),
            None if raw.admin.listen.is_empty() => None,
            None => Some(listen_address(
                None,
                ENV_ADMIN_LISTEN,
                &raw.admin.listen,
                "admin.listen",
                &at,
            )?),
        };
        if let Some(admin) = admin_listen {
            let public = [Some(proxy.listen), tls.as_ref().map(|t| t.listen)];
            if let Some(taken) = public.into_iter().flatten().find(|p| same_port(*p, admin)) {
                let message = format!("{admin} would share {taken} with a public listener");
                return Err(match env(ENV_ADMIN_LISTEN) {
                    Some(_) => from_env(ENV_ADMIN_LISTEN, message),
                    None => at("admin.listen", message),
                });
            }
        }
        let json_logs = match env(ENV_LOG_FORMAT) {
            Some(value) => log_format(&value).ok_or_else(|| {
                from_env(
                    ENV_LOG_FORMAT,
                    format!("{value:?}: choose \"text\" or \"json\""),
                )
            })?,
            None => log_format(&raw.logging.format).ok_or_else(|| {
                at(
                    "logging.format",
                    format!("{:?}: choose \"text\" or \"json\"", raw.logging.format),
                )
            })?,
        };
        let access_log_format = match raw.logging.access_log_format.as_str() {
            "json" => gatehouse_proxy::LogFormat::Json,
            "combined" => gatehouse_proxy::LogFormat::Combined,
            other => {
                return Err(at(
                    "logging.access_log_format",
                    format!("{other:?}: choose \"json\" or \"combined\""),
                ));
            }
        };
        let default_log = log_target(&raw.logging.access_log, base, "logging.access_log", &at)?;
        let logging = Logging {
            json: json_logs,
            access_log_format,
            access_log: default_log.clone(),
        };

        if raw.routes.is_empty() {
            return Err(at(
                "routes",
                "at least one [[routes]] entry is required".into(),
            ));
        }
        let mut routes = Vec::with_capacity(raw.routes.len());
        for (i, route) in raw.routes.iter().enumerate() {
            let key = |field: &str| format!("routes[{i}].{field}");
            if !route.prefix.starts_with('/') {
                return Err(at(
                    &key("prefix"),
                    format!("{:?} must start with `/`", route.prefix),
                ));
            }
            // A static route is a directory; a backend route may be one exact endpoint
            // (`/auth/login`, to give it a stricter rate limit).
            if route.static_dir.is_some() && !route.prefix.ends_with('/') {
                return Err(at(
                    &key("prefix"),
                    format!("{:?}: a static route must end with `/`", route.prefix),
                ));
            }
            if routes
                .iter()
                .any(|r: &gatehouse_proxy::Route| r.prefix == route.prefix)
            {
                return Err(at(
                    &key("prefix"),
                    format!("{:?} is routed twice", route.prefix),
                ));
            }
            let target = match (&route.upstream, &route.static_dir) {
                (Some(upstream), None) => {
                    if upstream != "backends" {
                        return Err(at(
                            &key("upstream"),
                            format!("unknown upstream {upstream:?}; the one pool is \"backends\""),
                        ));
                    }
                    if route.cache_control.is_some() {
                        return Err(at(
                            &key("cache_control"),
                            "only static routes take cache_control; backends set their own".into(),
                        ));
                    }
                    gatehouse_proxy::Target::Backends
                }
                (None, Some(dir)) => {
                    let dir = base.join(dir);
                    if !dir.is_dir() {
                        return Err(at(
                            &key("static_dir"),
                            format!("{} is not a directory", dir.display()),
                        ));
                    }
                    if let Some(value) = &route.cache_control {
                        header_value_ok(value).map_err(|m| at(&key("cache_control"), m))?;
                    }
                    gatehouse_proxy::Target::Static {
                        dir,
                        cache_control: route.cache_control.clone(),
                    }
                }
                _ => {
                    return Err(at(
                        &key("prefix"),
                        "a route needs exactly one of `upstream` or `static_dir`".into(),
                    ));
                }
            };
            let access = route_access(route, i, &raw, base, &at)?;
            let access_log = match &route.access_log {
                Some(value) => log_target(value, base, &key("access_log"), &at)?,
                None => default_log.clone(),
            };
            routes.push(gatehouse_proxy::Route {
                prefix: route.prefix.clone(),
                target,
                access,
                access_log,
            });
        }

        let p = &raw.proxy;
        let trusted_proxies = gatehouse_proxy::access::ip_list::IpList::parse(&p.trusted_proxies)
            .map_err(|(j, m)| at(&format!("proxy.trusted_proxies[{j}]"), m))?;
        let client_ip_header =
            gatehouse_proxy::access::client_ip::ClientIpHeader::parse(&p.client_ip_header)
                .ok_or_else(|| {
                    at(
                        "proxy.client_ip_header",
                        format!(
                            "{:?}: choose \"x-forwarded-for\" or \"x-real-ip\"",
                            p.client_ip_header
                        ),
                    )
                })?;
        positive(p.rate_limit_max_keys, "proxy.rate_limit_max_keys", &at)?;
        positive(p.auth_max_failures, "proxy.auth_max_failures", &at)?;
        if p.auth_max_failures_per_user < p.auth_max_failures {
            return Err(at(
                "proxy.auth_max_failures_per_user",
                format!(
                    "{} is below proxy.auth_max_failures ({}): one address could then hold a user back everywhere",
                    p.auth_max_failures_per_user, p.auth_max_failures
                ),
            ));
        }
        // A day at most: longer holds a mistyped password against a user for too long.
        within(
            p.auth_failure_window_seconds,
            1..=86_400,
            "proxy.auth_failure_window_seconds",
            " s",
            &at,
        )?;
        within(
            p.auth_guard_max_keys,
            1000..=10_000_000,
            "proxy.auth_guard_max_keys",
            "",
            &at,
        )?;
        let access = gatehouse_proxy::AccessSettings {
            trusted_proxies,
            client_ip_header,
            rate_limit_max_keys: p.rate_limit_max_keys,
            auth_guard: gatehouse_proxy::access::auth_guard::GuardSpec {
                max_failures: p.auth_max_failures,
                max_failures_per_user: p.auth_max_failures_per_user,
                window: Duration::from_secs(p.auth_failure_window_seconds),
                max_keys: p.auth_guard_max_keys,
            },
        };

        let config = Config {
            file: file.to_path_buf(),
            proxy,
            backend,
            redis,
            tls,
            statics,
            access,
            runtime_dir,
            data_dir,
            routes,
            admin_listen,
            logging,
        };
        for i in 0..config.backend.count {
            // The admin socket has the longer name.
            let socket = config.backend_admin_socket(i);
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(at(
                    "paths.runtime_dir",
                    format!(
                        "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter runtime_dir",
                        socket.display()
                    ),
                ));
            }
        }
        Ok(config)
    }

    pub fn backend_id(&self, index: usize) -> String {
        format!("b{}", index + 1)
    }

    pub fn backend_socket(&self, index: usize) -> PathBuf {
        self.runtime_dir.join(format!("backend-{}.sock", index + 1))
    }

    /// Where backend `index` serves its metrics to the admin listener.
    pub fn backend_admin_socket(&self, index: usize) -> PathBuf {
        self.runtime_dir
            .join(format!("backend-{}.admin.sock", index + 1))
    }

    pub fn managed_redis_socket(&self) -> PathBuf {
        self.runtime_dir.join("redis.sock")
    }

    pub fn proxy_settings(&self) -> gatehouse_proxy::Settings {
        gatehouse_proxy::Settings {
            listen: self.proxy.listen.to_string(),
            limits: self.proxy.limits,
            h2_max_streams: self.proxy.h2_max_streams,
            threads: self.proxy.threads,
            routes: self.routes.clone(),
            pool: gatehouse_proxy::PoolSettings {
                backends: (0..self.backend.count)
                    .map(|i| gatehouse_proxy::BackendSocket {
                        id: self.backend_id(i),
                        socket: self.backend_socket(i),
                        admin_socket: Some(self.backend_admin_socket(i)),
                    })
                    .collect(),
                connect_timeout: self.proxy.connect_timeout,
                read_timeout: self.proxy.read_timeout,
                health_check_interval: self.proxy.health_check_interval,
                health_check_timeout: self.redis.timeout + Duration::from_secs(1),
                max_connections_per_backend: self.proxy.upstream_max_connections,
                queue_timeout: self.proxy.upstream_queue_timeout,
            },
            statics: self.statics.clone(),
            tls: self.tls.as_ref().map(|t| gatehouse_proxy::TlsListener {
                listen: t.listen.to_string(),
                cert: t.cert.clone(),
                key: t.key.clone(),
            }),
            tls_behaviour: gatehouse_proxy::TlsBehaviour {
                redirect: self.tls.as_ref().filter(|t| t.redirect_http).map(|t| {
                    gatehouse_proxy::HttpsRedirect {
                        server_name: t.server_names.first().cloned(),
                        https_port: t.listen.port(),
                    }
                }),
                hsts: self.tls.as_ref().and_then(|t| t.hsts.clone()),
            },
            access: self.access.clone(),
            shutdown_grace: self.proxy.shutdown_grace,
            runtime_dir: self.runtime_dir.clone(),
            admin_listen: self.admin_listen.map(|a| a.to_string()),
            access_log_format: self.logging.access_log_format,
            default_access_log: self.logging.access_log.clone(),
        }
    }
}

impl Tls {
    /// Both files absent: `run` makes a development certificate, `check` says it will.
    pub fn certificate_missing(&self) -> bool {
        !self.cert.exists() && !self.key.exists()
    }
}

/// Loads the config and checks what it names, without starting anything: what `gatehouse
/// check` runs, and `run`, `reload` and the supervisor's reload and upgrade before they act.
pub fn load_checked(file: &Path) -> Result<(Config, gatehouse_backend::Users), ConfigError> {
    check(Config::load(file)?)
}

/// The checks beyond the file itself: the users file (someone must be able to log in), the
/// secrets, and a configured certificate pair.
pub fn check(config: Config) -> Result<(Config, gatehouse_backend::Users), ConfigError> {
    let users = gatehouse_backend::Users::load(&config.backend.users_file)
        .map_err(|e| config.error_at("backend.users_file", e.to_string()))?;
    // Redis is seeded from these whenever it has no users: with nobody to seed, nobody could
    // ever log in.
    if users.is_empty() && config.backend.admin_password.is_none() {
        return Err(config.error_at(
            "backend.users_file",
            format!(
                "{} has no users and no admin password is set (backend.admin_password_file \
                 or {ENV_ADMIN_PASSWORD_FILE}): nobody could log in; add a user, or set the \
                 admin password",
                config.backend.users_file.display(),
            ),
        ));
    }
    // The secrets are read here and by the backends, never by the proxy.
    config.backend.jwt_secret(&process_env)?;
    config.backend.admin_password(&process_env)?;
    if let Some(tls) = &config.tls
        && !tls.certificate_missing()
    {
        crate::certs::validate(&tls.cert, &tls.key).map_err(|e| config.error_at("tls.cert", e))?;
    }
    Ok((config, users))
}

/// A listen address from its environment override, or else from the file.
fn listen_address(
    from_env: Option<String>,
    env_name: &str,
    in_file: &str,
    key: &str,
    at: &dyn Fn(&str, String) -> ConfigError,
) -> Result<SocketAddr, ConfigError> {
    let (value, origin) = match &from_env {
        Some(value) => (value.as_str(), None),
        None => (in_file, Some(key)),
    };
    value.parse().map_err(|e| {
        let message = format!("{value:?} is not an address like 0.0.0.0:8080: {e}");
        match origin {
            Some(key) => at(key, message),
            None => ConfigError {
                origin: format!("environment variable {env_name}"),
                line: None,
                key: None,
                message,
            },
        }
    })
}

fn positive<N: PartialEq + Default + fmt::Display>(
    value: N,
    key: &str,
    at: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if value == N::default() {
        Err(at(key, "must be greater than 0".into()))
    } else {
        Ok(())
    }
}

/// `value` (in `unit`) must lie in `range`; the error says which values to choose.
fn within<N: PartialOrd + fmt::Display>(
    value: N,
    range: std::ops::RangeInclusive<N>,
    key: &str,
    unit: &str,
    at: &dyn Fn(&str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(at(
            key,
            format!("{value}{unit}: choose {} to {}", range.start(), range.end()),
        ))
    }
}

/// A route's access rules: its rate limit (its own, the default, or `"none"`), its allow and
/// deny lists, and its htpasswd users.
fn route_access(
    route: &RawRoute,
    i: usize,
    raw: &RawConfig,
    base: &Path,
    at: &dyn Fn(&str, String) -> ConfigError,
) -> Result<gatehouse_proxy::AccessSpec, ConfigError> {
    use gatehouse_proxy::access::{
        AuthSpec, basic_auth::Htpasswd, ip_list::IpList, rate_limit::RateSpec,
    };
    let key = |field: &str| format!("routes[{i}].{field}");
    let (name, name_key) = match &route.rate_limit {
        Some(name) => (name.as_str(), key("rate_limit")),
        None => (
            raw.proxy.default_rate_limit.as_str(),
            "proxy.default_rate_limit".to_string(),
        ),
    };
    let rate_limit = match name {
        "" | "none" => None,
        name => {
            let rate = raw.rate_limits.get(name).ok_or_else(|| {
                let known: Vec<&str> = raw.rate_limits.keys().map(String::as_str).collect();
                at(
                    &name_key,
                    format!(
                        "no [rate_limits.{name}] policy (defined: {})",
                        known.join(", ")
                    ),
                )
            })?;
            let policy_key = format!("rate_limits.{name}");
            if !(rate.per_second > 0.0 && rate.per_second <= 1_000_000.0)
                || Duration::try_from_secs_f64(1.0 / rate.per_second).is_err()
            {
                return Err(at(
                    &format!("{policy_key}.per_second"),
                    "must be above 0 and at most 1000000".into(),
                ));
            }
            positive(rate.burst, &format!("{policy_key}.burst"), at)?;
            Some(RateSpec {
                name: name.to_string(),
                per_second: rate.per_second,
                burst: rate.burst,
            })
        }
    };
    let allow =
        IpList::parse(&route.allow).map_err(|(j, m)| at(&format!("{}[{j}]", key("allow")), m))?;
    let deny =
        IpList::parse(&route.deny).map_err(|(j, m)| at(&format!("{}[{j}]", key("deny")), m))?;
    let auth = match &route.htpasswd {
        None => {
            if route.realm.is_some() {
                return Err(at(&key("realm"), "a realm needs an htpasswd file".into()));
            }
            None
        }
        Some(file) => {
            let path = base.join(file);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                at(
                    &key("htpasswd"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let users = Htpasswd::parse(&text).map_err(|(line, message)| ConfigError {
                origin: path.display().to_string(),
                line: Some(line),
                key: None,
                message,
            })?;
            if users.is_empty() {
                return Err(at(
                    &key("htpasswd"),
                    format!("{} has no users", path.display()),
                ));
            }
            let realm = route.realm.clone().unwrap_or_else(|| "gatehouse".into());
            header_value_ok(&realm).map_err(|m| at(&key("realm"), m))?;
            Some(AuthSpec {
                users: std::sync::Arc::new(users),
                realm,
                pass_authorization: route.pass_authorization,
            })
        }
    };
    Ok(gatehouse_proxy::AccessSpec {
        rate_limit,
        allow,
        deny,
        auth,
    })
}

/// Whether two listeners would fight over one port (a wildcard address takes it on every
/// address).
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn log_format(value: &str) -> Option<bool> {
    match value {
        "text" => Some(false),
        "json" => Some(true),
        _ => None,
    }
}

/// `""`: no log; `"-"`: standard output; otherwise a file (the proxy creates its directory).
fn log_target(
    value: &str,
    base: &Path,
    key: &str,
    at: &dyn Fn(&str, String) -> ConfigError,
) -> Result<Option<gatehouse_proxy::LogTarget>, ConfigError> {
    Ok(match value {
        "" => None,
        "-" => Some(gatehouse_proxy::LogTarget::Stdout),
        file => {
            let path = base.join(file);
            if path.is_dir() {
                return Err(at(key, format!("{} is a directory", path.display())));
            }
            Some(gatehouse_proxy::LogTarget::File(path))
        }
    })
}

fn header_value_ok(value: &str) -> Result<(), String> {
    if value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        Ok(())
    } else {
        Err(format!("{value:?} is not a valid header value"))
    }
}

fn redis_url_ok(url: &str) -> Result<(), String> {
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("redis" | "rediss" | "unix" | "redis+unix") => Ok(()),
        _ => Err(format!(
            "{url:?} is not a Redis URL (redis://host:port, unix:///path)"
        )),
    }
}

// The file as written. Defaults live here; `deny_unknown_fields` turns typos into errors.

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    proxy: RawProxy,
    tls: RawTls,
    #[serde(rename = "static")]
    statics: RawStatic,
    backend: RawBackend,
    redis: RawRedis,
    paths: RawPaths,
    admin: RawAdmin,
    logging: RawLogging,
    #[serde(default = "default_rate_limits")]
    rate_limits: std::collections::BTreeMap<String, RawRate>,
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    enabled: bool,
    listen: String,
    cert: PathBuf,
    key: PathBuf,
    server_names: Vec<String>,
    hsts: String,
    redirect_http: bool,
}

impl Default for RawTls {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:8443".into(),
            cert: "../certs/gatehouse.crt".into(),
            key: "../certs/gatehouse.key".into(),
            server_names: Vec::new(),
            hsts: "max-age=31536000".into(),
            redirect_http: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawStatic {
    cache_bytes: u64,
    max_cached_file_bytes: u64,
    min_compress_bytes: u64,
    check_interval_ms: u64,
}

impl Default for RawStatic {
    fn default() -> Self {
        Self {
            cache_bytes: 64 << 20,
            max_cached_file_bytes: 1 << 20,
            min_compress_bytes: 256,
            check_interval_ms: 1000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawProxy {
    listen: String,
    threads: usize,
    shutdown_grace_seconds: u64,
    upstream_connect_timeout_ms: u64,
    upstream_read_timeout_seconds: u64,
    health_check_interval_ms: u64,
    trusted_proxies: Vec<String>,
    client_ip_header: String,
    default_rate_limit: String,
    rate_limit_max_keys: usize,
    auth_max_failures: u32,
    auth_max_failures_per_user: u32,
    auth_failure_window_seconds: u64,
    auth_guard_max_keys: usize,
    max_body_bytes: u64,
    max_header_bytes: usize,
    max_headers: usize,
    header_timeout_ms: u64,
    body_timeout_ms: u64,
    max_connections: usize,
    max_connections_per_client: usize,
    send_timeout_ms: u64,
    tls_handshake_timeout_ms: u64,
    h2_max_streams: u32,
    upstream_max_connections: usize,
    upstream_max_requests_per_client: usize,
    upstream_queue_timeout_ms: u64,
}

impl Default for RawProxy {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            threads: 0,
            shutdown_grace_seconds: 10,
            upstream_connect_timeout_ms: 1000,
            upstream_read_timeout_seconds: 30,
            health_check_interval_ms: 1000,
            trusted_proxies: Vec::new(),
            client_ip_header: "x-forwarded-for".into(),
            default_rate_limit: "default".into(),
            rate_limit_max_keys: 100_000,
            auth_max_failures: 10,
            auth_max_failures_per_user: 100,
            auth_failure_window_seconds: 60,
            auth_guard_max_keys: 100_000,
            max_body_bytes: 1 << 20,
            max_header_bytes: 32 << 10,
            max_headers: 100,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            max_connections: 4096,
            max_connections_per_client: 256,
            send_timeout_ms: 30_000,
            tls_handshake_timeout_ms: 10_000,
            h2_max_streams: 100,
            upstream_max_connections: 512,
            upstream_max_requests_per_client: 128,
            upstream_queue_timeout_ms: 2000,
        }
    }
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: f64,
    burst: u32,
}

fn default_rate_limits() -> std::collections::BTreeMap<String, RawRate> {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBackend {
    count: usize,
    users_file: PathBuf,
    token_ttl_seconds: u64,
    max_body_bytes: usize,
    jwt_secret_file: Option<PathBuf>,
    admin_password_file: Option<PathBuf>,
    max_tokens_per_user: usize,
    /// Renamed; kept only to say so (see the check).
    login_max_failures_per_user: Option<serde::de::IgnoredAny>,
    login_max_failures_per_user_per_ip: u32,
    login_max_failures_per_ip: u32,
    login_max_failures_per_user_all_ips: u32,
    login_failure_window_seconds: u64,
    login_known_address_seconds: u64,
    header_timeout_ms: u64,
    body_timeout_ms: u64,
    idle_timeout_seconds: u64,
    max_connections: usize,
}

impl Default for RawBackend {
    fn default() -> Self {
        Self {
            count: 3,
            users_file: "users".into(),
            token_ttl_seconds: 3600,
            max_body_bytes: 16 * 1024,
            jwt_secret_file: None,
            admin_password_file: None,
            max_tokens_per_user: gatehouse_backend::accounts::DEFAULT_MAX_TOKENS_PER_USER,
            login_max_failures_per_user: None,
            login_max_failures_per_user_per_ip: 5,
            login_max_failures_per_ip: 20,
            // NIST SP 800-63B: no more than 100 consecutive failures on one account.
            login_max_failures_per_user_all_ips: 100,
            login_failure_window_seconds: 300,
            login_known_address_seconds: 30 * 86_400,
            // nginx's client_header_timeout is 60 s; a backend's only client is the proxy,
            // which sends a whole header at once, so 10 s is generous (the proxy's own
            // header_timeout_ms).
            header_timeout_ms: 10_000,
            // nginx's client_body_timeout is 60 s between reads; this is for the whole body,
            // a few KiB of JSON the proxy passes on as it comes.
            body_timeout_ms: 10_000,
            // nginx's keepalive_timeout (75 s): longer than the proxy keeps an idle backend
            // connection (60 s), so the proxy is the one that closes it, never a request.
            idle_timeout_seconds: 75,
            // Like HAProxy's per-server maxconn; far below the usual 1024 soft limit once it
            // is raised to the hard one.
            max_connections: 1024,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRedis {
    url: Option<String>,
    server_binary: String,
    timeout_ms: u64,
}

impl Default for RawRedis {
    fn default() -> Self {
        Self {
            url: None,
            server_binary: "redis-server".into(),
            timeout_ms: 1000,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAdmin {
    listen: String,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9180".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLogging {
    format: String,
    access_log: String,
    access_log_format: String,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPaths {
    runtime_dir: PathBuf,
    data_dir: PathBuf,
}

impl Default for RawPaths {
    fn default() -> Self {
        Self {
            runtime_dir: "../var/run".into(),
            data_dir: "../var/data".into(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: String,
    upstream: Option<String>,
    static_dir: Option<PathBuf>,
    cache_control: Option<String>,
    rate_limit: Option<String>,
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    htpasswd: Option<PathBuf>,
    realm: Option<String>,
    #[serde(default)]
    pass_authorization: bool,
    access_log: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_str(text, Path::new("conf/g.toml"), &|_| None)
    }

    const ROUTES: &str = "\n[[routes]]\nprefix = \"/api/\"\nupstream = \"backends\"\n";

    #[test]
    fn admin_listener_may_not_share_a_public_port() {
        let error = parse(&format!("[admin]\nlisten = \"127.0.0.1:8443\"\n{ROUTES}")).unwrap_err();
        assert_eq!(error.key.as_deref(), Some("admin.listen"));
        assert_eq!(error.line, Some(2));
        let config = parse(&format!("[admin]\nlisten = \"\"\n{ROUTES}")).unwrap();
        assert!(config.admin_listen.is_none());
        let error = parse(&format!("[logging]\nformat = \"xml\"\n{ROUTES}")).unwrap_err();
        assert_eq!(error.key.as_deref(), Some("logging.format"));
    }

    #[test]
    fn defaults_are_sane() {
        let config = parse(ROUTES).unwrap();
        assert_eq!(config.backend.count, 3);
        assert_eq!(config.proxy.listen.port(), 8080);
        assert!(config.redis.url.is_none());
        let expected = std::env::current_dir()
            .unwrap()
            .join("conf/../var/run/backend-1.sock");
        assert_eq!(config.backend_socket(0), expected);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = parse(&format!(
            "[proxy]\nlisten = \"0.0.0.0:1\"\nlisen = 3\n{ROUTES}"
        ))
        .unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert_eq!(err.key.as_deref(), Some("proxy.lisen"), "{err}");
        assert!(
            err.to_string()
                .starts_with("conf/g.toml:3: proxy.lisen: unknown field"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let err = parse(&format!("[backend]\n\ncount = \"three\"\n{ROUTES}")).unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (Some(3), Some("backend.count")),
            "{err}"
        );
    }

    #[test]
    fn semantic_errors_name_line_and_key() {
        let err = parse(&format!("[proxy]\nlisten = \"nowhere\"\n{ROUTES}")).unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (Some(2), Some("proxy.listen")),
            "{err}"
        );
        let err = parse(&format!(
            "{ROUTES}\n[[routes]]\nprefix = \"/b/\"\nupstream = \"elsewhere\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (Some(8), Some("routes[1].upstream")),
            "{err}"
        );
    }

    #[test]
    fn access_keys_are_checked() {
        let config = parse(ROUTES).unwrap();
        let guard = config.access.auth_guard;
        assert_eq!((guard.max_failures, guard.max_failures_per_user), (10, 100));
        assert_eq!(guard.max_keys, 100_000);
        assert_eq!(
            config.access.client_ip_header,
            gatehouse_proxy::access::client_ip::ClientIpHeader::XForwardedFor
        );
        let config = parse(&format!(
            "[proxy]\nclient_ip_header = \"X-Real-IP\"\n{ROUTES}"
        ))
        .unwrap();
        assert_eq!(
            config.access.client_ip_header,
            gatehouse_proxy::access::client_ip::ClientIpHeader::XRealIp
        );
        for (text, key) in [
            ("client_ip_header = \"forwarded\"", "proxy.client_ip_header"),
            (
                "auth_max_failures = 20\nauth_max_failures_per_user = 19",
                "proxy.auth_max_failures_per_user",
            ),
            ("auth_guard_max_keys = 10", "proxy.auth_guard_max_keys"),
            (
                "auth_failure_window_seconds = 0",
                "proxy.auth_failure_window_seconds",
            ),
            (
                "auth_failure_window_seconds = 18446744073709551615",
                "proxy.auth_failure_window_seconds",
            ),
        ] {
            let err = parse(&format!("[proxy]\n{text}\n{ROUTES}")).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{err}");
            assert_eq!(err.line, Some(text.lines().count() + 1), "{err}");
        }
    }

    #[test]
    fn login_guard_keys_are_checked() {
        let config = parse(ROUTES).unwrap();
        let guard = config.backend.login_guard;
        assert_eq!(guard.max_failures_per_user_per_ip, 5);
        assert_eq!(guard.max_failures_per_ip, 20);
        assert_eq!(guard.max_failures_per_user_all_ips, 100);
        assert_eq!(guard.window_seconds, 300);
        assert_eq!(guard.known_address_seconds, 30 * 86_400);
        let err = parse(&format!(
            "[backend]\nlogin_max_failures_per_ip = 0\n{ROUTES}"
        ))
        .unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (Some(2), Some("backend.login_max_failures_per_ip")),
            "{err}"
        );
        let err = parse(&format!(
            "[backend]\ncount = 2\nlogin_failure_window_seconds = 100000\n{ROUTES}"
        ))
        .unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.to_string().contains("choose 1 to 86400"), "{err}");
        // The old per-name key meant one count from every address: a file that sets it is
        // told the new names rather than keeping a lockout weapon under a new meaning.
        let err = parse(&format!(
            "[backend]\ncount = 2\nlogin_max_failures_per_user = 5\n{ROUTES}"
        ))
        .unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (Some(3), Some("backend.login_max_failures_per_user")),
            "{err}"
        );
        assert!(
            err.message.contains("renamed")
                && err
                    .message
                    .contains("backend.login_max_failures_per_user_per_ip"),
            "{err}"
        );
        let err = parse(&format!(
            "[backend]\nlogin_max_failures_per_user_per_ip = 10\n\
             login_max_failures_per_user_all_ips = 9\n{ROUTES}"
        ))
        .unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("backend.login_max_failures_per_user_all_ips"),
            "{err}"
        );
    }

    #[test]
    fn backend_connection_keys_are_checked() {
        let limits = parse(ROUTES).unwrap().backend.connections;
        assert_eq!(limits.header_timeout, Duration::from_secs(10));
        assert_eq!(limits.idle_timeout, Duration::from_secs(75));
        assert_eq!(limits.max_connections, 1024);
        for (line, key) in [
            ("header_timeout_ms = 50", "backend.header_timeout_ms"),
            ("body_timeout_ms = 50", "backend.body_timeout_ms"),
            ("idle_timeout_seconds = 0", "backend.idle_timeout_seconds"),
            ("max_connections = 0", "backend.max_connections"),
        ] {
            let err = parse(&format!("[backend]\ncount = 2\n{line}\n{ROUTES}")).unwrap_err();
            assert_eq!(
                (err.line, err.key.as_deref()),
                (Some(3), Some(key)),
                "{err}"
            );
            assert!(err.message.contains("choose"), "{err}");
        }
        assert_eq!(limits.body_timeout, Duration::from_secs(10));
    }

    #[test]
    fn backend_connections_outlast_and_outnumber_the_proxys() {
        // At or below the proxy's pool idle time (and its margin), a pooled connection could
        // be closed by the backend as the proxy sends a request on it.
        let err = parse(&format!("[backend]\nidle_timeout_seconds = 65\n{ROUTES}")).unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (Some(2), Some("backend.idle_timeout_seconds"))
        );
        assert!(err.message.contains("60 s"), "{err}");
        assert!(parse(&format!("[backend]\nidle_timeout_seconds = 66\n{ROUTES}")).is_ok());
        // The proxy's requests in flight (512 by default), its idle pool and health checks.
        let err = parse(&format!("[backend]\nmax_connections = 600\n{ROUTES}")).unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (Some(2), Some("backend.max_connections"))
        );
        assert!(
            err.message.contains("at least 648")
                && err.message.contains("proxy.upstream_max_connections (512)"),
            "{err}"
        );
        let small = "[proxy]\nupstream_max_connections = 4\n[backend]\n";
        assert!(parse(&format!("{small}max_connections = 140\n{ROUTES}")).is_ok());
        assert!(parse(&format!("{small}max_connections = 139\n{ROUTES}")).is_err());
    }

    #[test]
    fn environment_overrides_and_short_secret() {
        let env = |name: &str| match name {
            ENV_LISTEN => Some("127.0.0.1:9999".to_string()),
            ENV_JWT_SECRET => Some("too short".to_string()),
            _ => None,
        };
        // Loading names the secret without reading it (the proxy loads the config too);
        // reading it is where a short one is refused.
        let config = Config::from_str(ROUTES, Path::new("g.toml"), &env).unwrap();
        let err = config.backend.jwt_secret(&env).unwrap_err();
        assert!(err.to_string().contains(ENV_JWT_SECRET), "{err}");
        let env = |name: &str| (name == ENV_LISTEN).then(|| "127.0.0.1:9999".to_string());
        let config = Config::from_str(ROUTES, Path::new("g.toml"), &env).unwrap();
        assert_eq!(config.proxy.listen.port(), 9999);
    }

    #[test]
    fn loading_never_reads_a_secret() {
        // Files that do not exist: loading the config (all the proxy does) succeeds, so it
        // cannot have read them; reading them names the file, line and key.
        let text = format!(
            "{ROUTES}\n[backend]\njwt_secret_file = \"no/such/jwt\"\n\
             admin_password_file = \"no/such/password\"\nmax_tokens_per_user = 3\n"
        );
        let config = Config::from_str(&text, Path::new("g.toml"), &|_| None).unwrap();
        assert_eq!(config.backend.max_tokens_per_user, 3);
        let err = config.backend.jwt_secret(&|_| None).unwrap_err();
        assert_eq!(err.key.as_deref(), Some("backend.jwt_secret_file"), "{err}");
        assert!(
            err.line.is_some() && err.message.contains("no/such/jwt"),
            "{err}"
        );
        let err = config.backend.admin_password(&|_| None).unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("backend.admin_password_file"),
            "{err}"
        );

        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("admin_password");
        std::fs::write(&password, "short\n").unwrap();
        let env =
            |name: &str| (name == ENV_ADMIN_PASSWORD_FILE).then(|| password.display().to_string());
        let config = Config::from_str(ROUTES, Path::new("g.toml"), &env).unwrap();
        let err = config.backend.admin_password(&env).unwrap_err();
        assert!(err.to_string().contains(ENV_ADMIN_PASSWORD_FILE), "{err}");
        assert!(err.message.contains("5 characters"), "{err}");
        std::fs::write(&password, "long enough\n").unwrap();
        assert_eq!(
            config.backend.admin_password(&env).unwrap().as_deref(),
            Some("long enough")
        );

        let text = format!("{ROUTES}\n[backend]\nmax_tokens_per_user = 0\n");
        let err = Config::from_str(&text, Path::new("g.toml"), &|_| None).unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some("backend.max_tokens_per_user"),
            "{err}"
        );
    }
}
