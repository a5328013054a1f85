//! [`ConfigError`], and [`Source`]: what every section's validation needs to name the place
//! of a bad value (the file's line and key, or the environment variable that set it) and to
//! resolve a relative path.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{locate::Document, raw::OFF};

/// A refused configuration: where the bad value is and what is wrong with it.
#[derive(Debug)]
pub struct ConfigError {
    /// The file (or `environment variable NAME`) the bad value came from.
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

impl ConfigError {
    /// An error about the file as a whole, or about an environment variable.
    pub fn about(origin: impl Into<String>, message: String) -> Self {
        Self {
            origin: origin.into(),
            line: None,
            key: None,
            message,
        }
    }

    pub fn from_env(name: &str, message: String) -> Self {
        Self::about(format!("environment variable {name}"), message)
    }
}

/// Where the values being validated came from.
pub struct Source<'a> {
    pub origin: String,
    pub doc: Document<'a>,
    /// The config file's directory (absolute): relative paths start here.
    pub base: PathBuf,
    /// Keys the environment set, and the variable that set each.
    pub from_env: BTreeMap<&'static str, &'static str>,
}

impl Source<'_> {
    /// An error about `key`: named by its environment variable if that set it, else by the
    /// file's line.
    pub fn at(&self, key: &str, message: String) -> ConfigError {
        match self.from_env.get(key) {
            Some(name) => ConfigError::from_env(name, message),
            None => ConfigError {
                origin: self.origin.clone(),
                line: self.doc.line_of_key(key),
                key: Some(key.to_string()),
                message,
            },
        }
    }

    /// A path from the file, relative to its directory; one from the environment, as given.
    pub fn path(&self, key: &str, path: &Path) -> PathBuf {
        if self.from_env.contains_key(key) {
            path.to_path_buf()
        } else {
            self.base.join(path)
        }
    }

    pub fn positive<N: PartialEq + Default>(&self, value: N, key: &str) -> Result<(), ConfigError> {
        if value == N::default() {
            Err(self.at(key, "must be greater than 0".into()))
        } else {
            Ok(())
        }
    }

    /// `value` must lie in `range`; the error says which values to choose.
    pub fn within<N: PartialOrd + fmt::Display>(
        &self,
        value: N,
        range: RangeInclusive<N>,
        key: &str,
    ) -> Result<(), ConfigError> {
        if range.contains(&value) {
            Ok(())
        } else {
            Err(self.at(
                key,
                format!("{value}: choose {} to {}", range.start(), range.end()),
            ))
        }
    }

    /// A duration that must lie in `range`.
    pub fn duration(
        &self,
        value: Duration,
        range: RangeInclusive<Duration>,
        key: &str,
    ) -> Result<Duration, ConfigError> {
        if range.contains(&value) {
            Ok(value)
        } else {
            let human = humantime::format_duration;
            Err(self.at(
                key,
                format!(
                    "\"{}\": choose \"{}\" to \"{}\"",
                    human(value),
                    human(*range.start()),
                    human(*range.end())
                ),
            ))
        }
    }

    /// A duration in `range` that is kept in whole seconds (a Redis expiry, Pingora's grace
    /// period). A fraction is refused rather than cut off: `"500ms"` would become 0, which
    /// turns some of these features off.
    pub fn seconds(
        &self,
        value: Duration,
        range: RangeInclusive<Duration>,
        key: &str,
    ) -> Result<u64, ConfigError> {
        let value = self.duration(value, range, key)?;
        if value.subsec_nanos() == 0 {
            return Ok(value.as_secs());
        }
        Err(self.at(
            key,
            format!(
                "\"{}\": this is kept in whole seconds; write \"{}s\" or \"{}s\"",
                humantime::format_duration(value),
                value.as_secs(),
                value.as_secs() + 1
            ),
        ))
    }

    /// `"off"` -> `None`. The old spellings of it (`""`, `"none"`) are refused by name.
    pub fn off_or<'v>(&self, value: &'v str, key: &str) -> Result<Option<&'v str>, ConfigError> {
        match value {
            OFF => Ok(None),
            "" | "none" => Err(self.at(key, format!("{value:?}: write \"{OFF}\" to turn it off"))),
            value => Ok(Some(value)),
        }
    }

    /// A listen address, or `None` for `"off"` where `may_be_off`.
    pub fn listen(
        &self,
        value: &str,
        key: &str,
        may_be_off: bool,
    ) -> Result<Option<SocketAddr>, ConfigError> {
        let value = match may_be_off {
            true => self.off_or(value, key)?,
            false => Some(value),
        };
        value
            .map(|v| {
                v.parse().map_err(|e| {
                    self.at(
                        key,
                        format!("{v:?} is not an address like 0.0.0.0:8080: {e}"),
                    )
                })
            })
            .transpose()
    }

    pub fn header_value(&self, value: &str, key: &str) -> Result<(), ConfigError> {
        if value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        {
            Ok(())
        } else {
            Err(self.at(key, format!("{value:?} is not a valid header value")))
        }
    }
}
