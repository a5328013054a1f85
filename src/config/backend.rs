//! `[backend]`: the backend processes, their login guard and connection limits, and where
//! their secrets are (named here, read only by those that need them: see [`Secret`]).

use std::{path::PathBuf, time::Duration};

use super::{
    error::{ConfigError, Source},
    raw::{RawAudit, RawBackend},
};

/// How long the proxy keeps an idle pooled backend connection; a backend's idle timeout must
/// be longer by a margin for timers and a loaded machine.
const PROXY_POOL_IDLE: Duration = gatehouse_proxy::upstream::POOL_IDLE_TIMEOUT;
const IDLE_MARGIN: Duration = Duration::from_secs(5);

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
    /// `[audit]`: the backends write most events, the supervisor the rest.
    pub audit: gatehouse_backend::AuditSettings,
    /// Whether `[[tls.client_users]]` maps any certificate to a user: only then do the
    /// backends sign in the user the edge names in `X-Gatehouse-Cert-User`.
    pub certificate_users: bool,
}

/// `[audit]`. `max_events` bounds Redis's memory: about 300 bytes an event.
pub fn audit(
    a: &RawAudit,
    source: &Source,
) -> Result<gatehouse_backend::AuditSettings, ConfigError> {
    source.within(a.max_events, 100..=10_000_000, "audit.max_events")?;
    let file = match source.off_or(&a.file, "audit.file")? {
        None => None,
        Some("-") => Some(PathBuf::from("-")),
        Some(file) => {
            let path = source.base.join(file);
            if path.is_dir() {
                return Err(source.at("audit.file", format!("{} is a directory", path.display())));
            }
            Some(path)
        }
    };
    Ok(gatehouse_backend::AuditSettings {
        file,
        max_events: a.max_events,
    })
}

/// Where a secret is read from. Loading the config only names it: the processes that need it
/// (the backends, and `gatehouse check` and `run` to validate it) read it, and the proxy,
/// which signs and checks no token, never does.
#[derive(Debug, Clone)]
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

/// The same secret: the same variable, or the same file. Who named the file, and on which line,
/// is for errors only; a comment added above the key must not look like a new secret (the
/// supervisor restarts the backends when their settings differ).
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Secret::Env(a), Secret::Env(b)) => a == b,
            (Secret::File { path: a, .. }, Secret::File { path: b, .. }) => a == b,
            _ => false,
        }
    }
}

impl Secret {
    pub(super) fn file(source: &Source, key: &str, path: &std::path::Path) -> Self {
        let at = source.at(key, String::new());
        Secret::File {
            path: source.path(key, path),
            origin: at.origin,
            line: at.line,
            key: at.key,
        }
    }

    /// The secret's bytes, without the newline a file written with `echo` ends in.
    pub(super) fn read(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Vec<u8>, ConfigError> {
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
    pub(super) fn error(&self, message: String) -> ConfigError {
        match self {
            Secret::Env(name) => ConfigError::from_env(name, message),
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

/// `jwt_secret_in_env`: the secret itself is in [`super::ENV_JWT_SECRET`], which wins.
pub fn validate(
    b: &RawBackend,
    raw_audit: &RawAudit,
    jwt_secret_in_env: bool,
    source: &Source,
) -> Result<Backend, ConfigError> {
    source.within(b.count, 1..=64, "backend.count")?;
    let token_ttl = source.seconds(
        b.token_ttl.0,
        Duration::from_secs(1)..=Duration::from_secs(366 * 86_400),
        "backend.token_ttl",
    )?;
    source.within(b.max_body_bytes, 64..=1 << 20, "backend.max_body_bytes")?;
    let jwt_secret = match (jwt_secret_in_env, &b.jwt_secret_file) {
        (true, _) => Some(Secret::Env(super::ENV_JWT_SECRET)),
        (false, file) => file
            .as_deref()
            .map(|path| Secret::file(source, "backend.jwt_secret_file", path)),
    };
    let admin_password = b
        .admin_password_file
        .as_deref()
        .map(|path| Secret::file(source, "backend.admin_password_file", path));
    source.within(
        b.max_tokens_per_user,
        1..=gatehouse_backend::accounts::MAX_TOKENS_PER_USER,
        "backend.max_tokens_per_user",
    )?;
    source.positive(
        b.login_max_failures_per_user_per_ip,
        "backend.login_max_failures_per_user_per_ip",
    )?;
    source.positive(
        b.login_max_failures_per_ip,
        "backend.login_max_failures_per_ip",
    )?;
    if b.login_max_failures_per_user_all_ips < b.login_max_failures_per_user_per_ip {
        return Err(source.at(
            "backend.login_max_failures_per_user_all_ips",
            format!(
                "{} is below backend.login_max_failures_per_user_per_ip ({}): the ceiling over \
                 every address must be at least the per-address limit",
                b.login_max_failures_per_user_all_ips, b.login_max_failures_per_user_per_ip
            ),
        ));
    }
    let window = source.seconds(
        b.login_failure_window.0,
        Duration::from_secs(1)..=Duration::from_secs(86_400),
        "backend.login_failure_window",
    )?;
    let known = source.seconds(
        b.login_known_address_ttl.0,
        Duration::ZERO..=Duration::from_secs(365 * 86_400),
        "backend.login_known_address_ttl",
    )?;
    let request_deadline = Duration::from_millis(100)..=Duration::from_secs(600);
    let header_timeout = source.duration(
        b.header_timeout.0,
        request_deadline.clone(),
        "backend.header_timeout",
    )?;
    let body_timeout =
        source.duration(b.body_timeout.0, request_deadline, "backend.body_timeout")?;
    let idle_timeout = source.duration(
        b.idle_timeout.0,
        Duration::from_secs(1)..=Duration::from_secs(3600),
        "backend.idle_timeout",
    )?;
    // The proxy must be the one to close an idle pooled connection: if the backend closes it
    // first, a request the proxy sends on it at that moment fails.
    if idle_timeout <= PROXY_POOL_IDLE + IDLE_MARGIN {
        return Err(source.at(
            "backend.idle_timeout",
            format!(
                "\"{}\": must be above \"{}\", so that the proxy, which keeps an idle backend \
                 connection for {} s, always closes it first (a request sent on a connection \
                 the backend is closing would fail)",
                humantime::format_duration(idle_timeout),
                humantime::format_duration(PROXY_POOL_IDLE + IDLE_MARGIN),
                PROXY_POOL_IDLE.as_secs(),
            ),
        ));
    }
    source.within(b.max_connections, 1..=1_000_000, "backend.max_connections")?;
    Ok(Backend {
        count: b.count,
        users_file: source.base.join(&b.users_file),
        token_ttl_seconds: token_ttl,
        max_body_bytes: b.max_body_bytes,
        jwt_secret,
        admin_password,
        max_tokens_per_user: b.max_tokens_per_user,
        login_guard: gatehouse_backend::GuardSettings {
            max_failures_per_user_per_ip: b.login_max_failures_per_user_per_ip,
            max_failures_per_ip: b.login_max_failures_per_ip,
            max_failures_per_user_all_ips: b.login_max_failures_per_user_all_ips,
            window_seconds: window,
            known_address_seconds: known,
        },
        connections: gatehouse_backend::ConnectionLimits {
            header_timeout,
            body_timeout,
            idle_timeout,
            max_connections: b.max_connections,
        },
        audit: audit(raw_audit, source)?,
        certificate_users: false,
    })
}
