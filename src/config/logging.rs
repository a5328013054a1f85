//! `[logging]`: application logs and the access logs' default and format.

use gatehouse_proxy::{LogFormat, LogTarget};

use super::{
    error::{ConfigError, Source},
    raw::RawLogging,
};

pub struct Logging {
    /// Application logs as JSON lines rather than text.
    pub json: bool,
    pub access_log_format: LogFormat,
    /// The log of requests no route takes, and of routes that name none.
    pub access_log: Option<LogTarget>,
}

pub fn validate(l: &RawLogging, source: &Source) -> Result<Logging, ConfigError> {
    let json = match l.format.as_str() {
        "text" => false,
        "json" => true,
        other => {
            return Err(source.at(
                "logging.format",
                format!("{other:?}: choose \"text\" or \"json\""),
            ));
        }
    };
    let access_log_format = match l.access_log_format.as_str() {
        "json" => LogFormat::Json,
        "combined" => LogFormat::Combined,
        other => {
            return Err(source.at(
                "logging.access_log_format",
                format!("{other:?}: choose \"json\" or \"combined\""),
            ));
        }
    };
    Ok(Logging {
        json,
        access_log_format,
        access_log: target(&l.access_log, "logging.access_log", source)?,
    })
}

/// `"off"`: no log; `"-"`: standard output; otherwise a file (the proxy creates its
/// directory).
pub fn target(value: &str, key: &str, source: &Source) -> Result<Option<LogTarget>, ConfigError> {
    Ok(match source.off_or(value, key)? {
        None => None,
        Some("-") => Some(LogTarget::Stdout),
        Some(file) => {
            let path = source.base.join(file);
            if path.is_dir() {
                return Err(source.at(key, format!("{} is a directory", path.display())));
            }
            Some(LogTarget::File(path))
        }
    })
}
