//! Configuration in layers, each in its own file:
//!
//! 1. `raw.rs`: the file as written, with the defaults (serde types, nothing checked but
//!    types). A key of the earlier shape is refused by `moved.rs` with its new name.
//! 2. `env.rs`: the environment's overlay, recording which keys it set, so that a bad value
//!    is reported as its variable's.
//! 3. One validation per section (`proxy.rs`, `upstream.rs`, `access.rs`, `tls.rs`,
//!    `statics.rs`, `backend.rs`, `redis.rs`, `logging.rs`, `routes.rs`), each producing its part
//!    of the one model, [`Config`], whose proxy part is the proxy crate's own
//!    [`gatehouse_proxy::Settings`]. Then the checks across sections.
//! 4. `check.rs`: what the file names (the users file, the secrets, the certificate pair).
//!
//! Every error names the file, the line and the key ([`ConfigError`], located by
//! `locate.rs`). Relative paths are relative to the file's own directory, so the group runs
//! the same from any working directory. Nothing after this module parses a setting again.

mod access;
mod acme;
mod backend;
mod cache;
mod check;
mod env;
mod error;
mod headers;
mod locate;
mod logging;
mod moved;
mod proxy;
mod raw;
mod redis;
mod routes;
mod site_pages;
mod statics;
mod tls;
mod upstream;
mod upstreams;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

pub use backend::{Backend, Secret};
pub use check::{certificate_missing, check, load_checked};
pub use env::{
    ENV_ADMIN_LISTEN, ENV_ADMIN_PASSWORD_FILE, ENV_JWT_SECRET, ENV_JWT_SECRET_FILE, ENV_LISTEN,
    ENV_LOG_FORMAT, ENV_REDIS_URL, ENV_SOCKET_DIR, ENV_TLS_LISTEN, SECRET_ENV,
};
pub use error::ConfigError;
pub use redis::Redis;

use error::Source;
use locate::Document;

/// Idle connections the proxy may keep pooled to one backend (Pingora's
/// `upstream_keepalive_pool_size`, whose default the proxy keeps), on top of the requests in
/// flight; and a few more for the health checks.
const PROXY_POOL_IDLE_CONNECTIONS: usize = 128;
const HEALTH_CHECK_CONNECTIONS: usize = 8;

/// Unix socket paths are limited to 108 bytes including the terminator (`sun_path`).
const MAX_SOCKET_PATH: usize = 107;

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    /// Everything the proxy is started (or reloaded) with.
    pub proxy: gatehouse_proxy::Settings,
    pub backend: Backend,
    pub redis: Redis,
    pub data_dir: PathBuf,
    /// Names of this server, for a generated certificate.
    pub server_names: Vec<String>,
    /// Keys the environment set, and the variable that set each: an error found later about
    /// one of them names the variable, not the file's line.
    from_env: BTreeMap<&'static str, &'static str>,
}

/// The real environment, for [`Config::load`], [`Backend::jwt_secret`] and
/// [`Backend::admin_password`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

impl Config {
    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|e| {
            ConfigError::about(
                file.display().to_string(),
                format!("cannot read the config file: {e}"),
            )
        })?;
        Self::from_str(&text, file, &process_env)
    }

    /// `env` is the environment lookup, passed in so tests need not touch the real one.
    /// Reads no file but the static directories and htpasswd files the config names.
    pub fn from_str(
        text: &str,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let origin = file.display().to_string();
        let doc = Document::parse(text);
        if let Ok(table) = text.parse::<toml::Table>()
            && let Some((old, message)) = moved::find(&table)
        {
            return Err(ConfigError {
                origin,
                line: doc.line_of_key(old),
                key: Some(old.to_string()),
                message,
            });
        }
        let mut raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
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
        let base = std::path::absolute(parent).map_err(|e| {
            ConfigError::about(
                origin.clone(),
                format!("cannot resolve the config directory: {e}"),
            )
        })?;
        let overlay = env::overlay(&mut raw, env)?;
        let source = Source {
            origin,
            doc,
            base,
            from_env: overlay.from_env,
        };
        Self::validate(&raw, overlay.jwt_secret, file, &source)
    }

    fn validate(
        raw: &raw::RawConfig,
        jwt_secret_in_env: bool,
        file: &Path,
        source: &Source,
    ) -> Result<Self, ConfigError> {
        let listener = proxy::validate(&raw.proxy, source)?;
        let (limits, h2_max_streams) = proxy::limits(&raw.limits, source)?;
        let backend = backend::validate(&raw.backend, &raw.audit, jwt_secret_in_env, source)?;
        let redis = redis::validate(&raw.redis, source)?;
        let runtime_dir = source.base.join(&raw.paths.runtime_dir);
        let pool = upstream::validate(
            &raw.upstream,
            backend.count,
            &runtime_dir,
            redis.timeout,
            source,
        )?;
        let statics = statics::validate(&raw.statics, source)?;
        let cache = cache::validate(&raw.cache, source)?;
        let access = access::validate(&raw.access, source)?;
        let admin_listen = source.listen(&raw.admin.listen, "admin.listen", true)?;
        let logging = logging::validate(&raw.logging, source)?;
        let upstreams = upstreams::validate(raw, source)?;
        let routes = routes::validate(raw, &logging.access_log, source)?;
        let tls = tls::validate(&raw.tls, &routes, source)?;
        let data_dir = source.base.join(&raw.paths.data_dir);
        let acme = raw
            .acme
            .as_ref()
            .map(|a| {
                let https = tls.listener.is_some();
                acme::validate(a, &tls.server_names, &routes, https, &data_dir, source)
            })
            .transpose()?;

        // Across sections.
        // A TLS-ALPN-01 check is a handshake from the CA, which has no client certificate.
        let alpn_challenge = acme
            .as_ref()
            .is_some_and(|a| a.challenge == gatehouse_proxy::acme::ChallengeKind::TlsAlpn01);
        let certificates_required = tls
            .listener
            .as_ref()
            .and_then(|l| l.client_auth.as_ref())
            .is_some_and(|a| a.required);
        if alpn_challenge && certificates_required {
            return Err(source.at(
                "tls.client_certs",
                "\"required\" refuses the ACME server's TLS-ALPN-01 handshakes: use \
                 acme.challenge = \"http-01\", or client_certs = \"optional\" with routes \
                 that require one"
                    .into(),
            ));
        }
        if let Some(admin) = admin_listen {
            let public = [
                Some(listener.listen),
                tls.listener.as_ref().map(|t| t.listen),
            ];
            if let Some(taken) = public.into_iter().flatten().find(|p| same_port(*p, admin)) {
                return Err(source.at(
                    "admin.listen",
                    format!("{admin} would share {taken} with a public listener"),
                ));
            }
        }
        let needed = pool
            .max_connections_per_backend
            .saturating_add(PROXY_POOL_IDLE_CONNECTIONS + HEALTH_CHECK_CONNECTIONS);
        if backend.connections.max_connections < needed {
            return Err(source.at(
                "backend.max_connections",
                format!(
                    "{}: must be at least {needed}, upstream.max_connections ({}) + \
                     {PROXY_POOL_IDLE_CONNECTIONS} idle connections the proxy may keep pooled \
                     + {HEALTH_CHECK_CONNECTIONS} for health checks; below that, requests the \
                     proxy lets through wait in the backend's listen queue",
                    backend.connections.max_connections, pool.max_connections_per_backend
                ),
            ));
        }
        // The admin socket has the longer name.
        if let Some(socket) = pool
            .backends
            .iter()
            .filter_map(|b| b.admin_socket.as_ref())
            .find(|s| s.as_os_str().len() > MAX_SOCKET_PATH)
        {
            return Err(source.at(
                "paths.runtime_dir",
                format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter \
                     runtime_dir",
                    socket.display()
                ),
            ));
        }

        let mut backend = backend;
        backend.certificate_users = !tls.behaviour.client_users.is_empty();
        Ok(Config {
            file: file.to_path_buf(),
            proxy: gatehouse_proxy::Settings {
                listen: listener.listen,
                limits,
                h2_max_streams,
                threads: listener.threads,
                routes,
                statics,
                cache,
                pool,
                upstreams,
                tls: tls.listener,
                tls_behaviour: tls.behaviour,
                acme,
                access,
                shutdown_grace: listener.shutdown_grace,
                runtime_dir,
                admin_listen,
                access_log_format: logging.access_log_format,
                default_access_log: logging.access_log,
                json_logs: logging.json,
            },
            backend,
            redis,
            data_dir,
            server_names: tls.server_names,
            from_env: source.from_env.clone(),
        })
    }

    /// An error about `key` found after loading (in a file the config names, say), naming
    /// its environment variable or the key's line in the file, as a loading error would.
    pub fn error_at(&self, key: &str, message: String) -> ConfigError {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        let source = Source {
            origin: self.file.display().to_string(),
            doc: Document::parse(&text),
            base: self.file.parent().unwrap_or(Path::new(".")).to_path_buf(),
            from_env: self.from_env.clone(),
        };
        source.at(key, message)
    }

    /// The proxy's settings, with the Redis that replicas coordinate ACME orders through
    /// (the group's: managed or `redis.url`, with its password).
    pub fn into_proxy_settings(self) -> Result<gatehouse_proxy::Settings, ConfigError> {
        let managed = self.managed_redis_socket();
        let mut settings = self.proxy;
        if let Some(acme) = &mut settings.acme {
            let url = self.redis.client_url(&managed)?;
            acme.redis = Some(gatehouse_proxy::acme::RedisUrl(url));
        }
        Ok(settings)
    }

    /// Backend sockets, the managed Redis socket, the lock and pid files.
    pub fn runtime_dir(&self) -> &Path {
        &self.proxy.runtime_dir
    }

    pub fn backend_id(&self, index: usize) -> String {
        backend_id(index)
    }

    pub fn backend_socket(&self, index: usize) -> PathBuf {
        backend_socket(self.runtime_dir(), index)
    }

    /// Where backend `index` serves its metrics to the admin listener.
    pub fn backend_admin_socket(&self, index: usize) -> PathBuf {
        backend_admin_socket(self.runtime_dir(), index)
    }

    pub fn managed_redis_socket(&self) -> PathBuf {
        self.runtime_dir().join("redis.sock")
    }
}

fn backend_id(index: usize) -> String {
    format!("b{}", index + 1)
}

fn backend_socket(runtime_dir: &Path, index: usize) -> PathBuf {
    runtime_dir.join(format!("backend-{}.sock", index + 1))
}

fn backend_admin_socket(runtime_dir: &Path, index: usize) -> PathBuf {
    runtime_dir.join(format!("backend-{}.admin.sock", index + 1))
}

/// Whether two listeners would fight over one port (a wildcard address takes it on every
/// address).
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests;
