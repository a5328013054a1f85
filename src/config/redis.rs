//! `[redis]`: an external Redis, or the one `gatehouse run` manages.

use std::time::Duration;

use super::{
    error::{ConfigError, Source},
    raw::{MANAGED, RawRedis},
};

#[derive(Debug, Clone, PartialEq)]
pub struct Redis {
    /// `None`: `gatehouse run` starts and manages its own `redis-server`.
    pub url: Option<String>,
    pub server_binary: String,
    pub timeout: Duration,
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
    let timeout = source.duration(
        r.timeout.0,
        Duration::from_millis(1)..=Duration::from_secs(600),
        "redis.timeout",
    )?;
    Ok(Redis {
        url,
        server_binary: r.server_binary.clone(),
        timeout,
    })
}
