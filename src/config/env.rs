//! The environment's layer over the file: each variable replaces one key, read once, and the
//! key is recorded as coming from it, so a bad value is reported as the variable's. Secrets
//! and listen addresses are what a deployment changes without editing the file.

use std::{collections::BTreeMap, path::PathBuf};

use super::{
    error::ConfigError,
    raw::{OFF, RawConfig},
};

pub const ENV_LISTEN: &str = "GATEHOUSE_LISTEN";
pub const ENV_TLS_LISTEN: &str = "GATEHOUSE_TLS_LISTEN";
pub const ENV_ADMIN_LISTEN: &str = "GATEHOUSE_ADMIN_LISTEN";
pub const ENV_REDIS_URL: &str = "GATEHOUSE_REDIS_URL";
pub const ENV_LOG_FORMAT: &str = "GATEHOUSE_LOG_FORMAT";
pub const ENV_SOCKET_DIR: &str = "GATEHOUSE_SOCKET_DIR";
/// The JWT secret itself; it wins over any file naming one.
pub const ENV_JWT_SECRET: &str = "GATEHOUSE_JWT_SECRET";
pub const ENV_JWT_SECRET_FILE: &str = "GATEHOUSE_JWT_SECRET_FILE";
pub const ENV_ADMIN_PASSWORD_FILE: &str = "GATEHOUSE_ADMIN_PASSWORD_FILE";
/// What the proxy's environment never holds: it signs and checks no token.
pub const SECRET_ENV: [&str; 3] = [ENV_JWT_SECRET, ENV_JWT_SECRET_FILE, ENV_ADMIN_PASSWORD_FILE];

/// Each variable, the key it replaces, whether that key accepts `"off"`, and how.
type Setter = fn(&mut RawConfig, String);
pub const VARIABLES: [(&str, &str, bool, Setter); 8] = [
    (ENV_LISTEN, "proxy.listen", false, |raw, v| {
        raw.proxy.listen = v
    }),
    (ENV_TLS_LISTEN, "tls.listen", true, |raw, v| {
        raw.tls.listen = v
    }),
    (ENV_ADMIN_LISTEN, "admin.listen", true, |raw, v| {
        raw.admin.listen = v
    }),
    (ENV_REDIS_URL, "redis.url", false, |raw, v| {
        raw.redis.url = v
    }),
    (ENV_LOG_FORMAT, "logging.format", false, |raw, v| {
        raw.logging.format = v
    }),
    (
        ENV_JWT_SECRET_FILE,
        "backend.jwt_secret_file",
        false,
        |raw, v| raw.backend.jwt_secret_file = Some(PathBuf::from(v)),
    ),
    (ENV_SOCKET_DIR, "upstream.socket_dir", false, |raw, v| {
        raw.upstream.socket_dir = Some(PathBuf::from(v))
    }),
    (
        ENV_ADMIN_PASSWORD_FILE,
        "backend.admin_password_file",
        false,
        |raw, v| raw.backend.admin_password_file = Some(PathBuf::from(v)),
    ),
];

/// What the environment changed.
pub struct Overlay {
    /// Key -> the variable that set it.
    pub from_env: BTreeMap<&'static str, &'static str>,
    /// [`ENV_JWT_SECRET`] holds the secret.
    pub jwt_secret: bool,
}

/// Applies the environment to `raw`. A variable that is set but empty is refused: read as
/// unset, `GATEHOUSE_ADMIN_LISTEN=` meant to turn the listener off would leave it on, and a
/// `GATEHOUSE_JWT_SECRET=` left empty by a template would give each group a random secret of
/// its own, so that replicas refuse each other's tokens.
pub fn overlay(
    raw: &mut RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Overlay, ConfigError> {
    let mut from_env = BTreeMap::new();
    for (name, key, may_be_off, set) in VARIABLES {
        if let Some(value) = non_empty(env, name, may_be_off)? {
            set(raw, value);
            from_env.insert(key, name);
        }
    }
    Ok(Overlay {
        from_env,
        jwt_secret: non_empty(env, ENV_JWT_SECRET, false)?.is_some(),
    })
}

/// The variable's value; an error if it is set to "".
fn non_empty(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
    may_be_off: bool,
) -> Result<Option<String>, ConfigError> {
    match env(name) {
        Some(value) if value.is_empty() => {
            let off = match may_be_off {
                true => format!("write \"{OFF}\" to turn it off, or "),
                false => String::new(),
            };
            Err(ConfigError::from_env(
                name,
                format!("set but empty: {off}unset it to use the file's setting"),
            ))
        }
        value => Ok(value),
    }
}
