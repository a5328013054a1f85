//! `[static]`: the memory static files are held in, and how often they are compared with
//! the disk.

use std::time::Duration;

use gatehouse_proxy::StaticSettings;

use super::{
    error::{ConfigError, Source},
    raw::RawStatic,
};

pub fn validate(s: &RawStatic, source: &Source) -> Result<StaticSettings, ConfigError> {
    source.positive(s.cache_bytes, "static.cache_bytes")?;
    source.positive(s.max_cached_file_bytes, "static.max_cached_file_bytes")?;
    let check_interval = source.duration(
        s.check_interval.0,
        Duration::ZERO..=Duration::from_secs(3600),
        "static.check_interval",
    )?;
    Ok(StaticSettings {
        cache_bytes: s.cache_bytes,
        max_cached_file_bytes: s.max_cached_file_bytes,
        min_compress_bytes: s.min_compress_bytes,
        check_interval,
    })
}
