//! `[redis]`: an external Redis, or the one `gatehouse run` manages.

use std::{path::Path, time::Duration};

use super::{
    backend::Secret,
    error::{ConfigError, Source},
    raw::{MANAGED, RawRedis},
};

#[derive(Debug, Clone, PartialEq)]
pub struct Redis {
    /// `None`: `gatehouse run` starts and manages its own `redis-server`.
    pub url: Option<String>,
    /// The external Redis's password (`requirepass`): named here, read by the processes
    /// that talk to Redis ([`Redis::client_url`]), never by the proxy.
    pub password: Option<Secret>,
    pub server_binary: String,
    pub timeout: Duration,
}

impl Redis {
    /// The URL clients connect with: `redis.url` with the password read from
    /// `redis.password_file`, or the managed Redis's socket.
    pub fn client_url(&self, managed_socket: &Path) -> Result<String, ConfigError> {
        let Some(url) = &self.url else {
            return Ok(format!("unix://{}", managed_socket.display()));
        };
        let Some(secret) = &self.password else {
            return Ok(url.clone());
        };
        let password = String::from_utf8(secret.read(&|_| None)?)
            .map_err(|_| secret.error("the Redis password is not UTF-8".into()))?;
        if password.is_empty() {
            return Err(secret.error("the Redis password file is empty".into()));
        }
        Ok(with_password(url, &password))
    }
}

/// `url` with `password` in it: in the user part of a TCP URL, percent-encoded, or as the
/// `pass` parameter of a Unix socket URL.
fn with_password(url: &str, password: &str) -> String {
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    match url.split_once("://") {
        Some((scheme @ ("unix" | "redis+unix"), rest)) => {
            let joint = if rest.contains('?') { '&' } else { '?' };
            format!("{scheme}://{rest}{joint}pass={encoded}")
        }
        Some((scheme, rest)) => format!("{scheme}://:{encoded}@{rest}"),
        None => url.to_string(),
    }
}

pub fn validate(r: &RawRedis, source: &Source) -> Result<Redis, ConfigError> {
    let url = match r.url.as_str() {
        MANAGED => None,
        url => {
            let scheme = url.split_once("://").map(|(s, _)| s);
            if !matches!(scheme, Some("redis" | "rediss" | "unix" | "redis+unix")) {
                return Err(source.at(
                    "redis.url",
                    format!(
                        "{url:?} is not a Redis URL (redis://host:port, unix:///path), nor \
                         \"{MANAGED}\" for a redis-server of the group's own"
                    ),
                ));
            }
            Some(url.to_string())
        }
    };
    let password = match (&url, &r.password_file) {
        (_, None) => None,
        (None, Some(_)) => {
            return Err(source.at(
                "redis.password_file",
                format!(
                    "is for an external Redis (redis.url); the \"{MANAGED}\" one is reached \
                     only through its socket in the runtime directory"
                ),
            ));
        }
        (Some(url), Some(_))
            if url.split_once("://").is_some_and(|(_, rest)| {
                rest.split(['/', '?'])
                    .next()
                    .is_some_and(|host| host.contains('@'))
            }) =>
        {
            return Err(source.at(
                "redis.password_file",
                "redis.url has a user or password already: give it in one place".into(),
            ));
        }
        (Some(_), Some(path)) => Some(Secret::file(source, "redis.password_file", path)),
    };
    let timeout = source.duration(
        r.timeout.0,
        Duration::from_millis(1)..=Duration::from_secs(600),
        "redis.timeout",
    )?;
    Ok(Redis {
        url,
        password,
        server_binary: r.server_binary.clone(),
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_goes_into_the_url() {
        assert_eq!(
            with_password("redis://redis:6379", "a/b+c="),
            "redis://:a%2Fb%2Bc%3D@redis:6379"
        );
        assert_eq!(
            with_password("unix:///run/redis.sock", "pw"),
            "unix:///run/redis.sock?pass=pw"
        );
        assert_eq!(
            with_password("redis+unix:///r.sock?db=1", "pw"),
            "redis+unix:///r.sock?db=1&pass=pw"
        );
    }
}
