//! gatehouse's process group, as a library the `gatehouse` binary (`main.rs`, only the
//! command line) drives.
//!
//! - [`config`]: the config file -> one validated [`config::Config`]; [`config::check`] adds
//!   what it names (the users file, the secrets, the certificate pair).
//! - [`supervisor`]: `gatehouse run`, the process group.
//! - [`serve_backend`]: `gatehouse backend`, one backend process.
//! - [`certs`]: the self-signed development certificate.
//!
//! # Errors
//!
//! Every fallible function here returns [`Result`], whose [`Error`] has two kinds, because
//! the binary does two different things with them: a bad config ([`Error::Config`]) is the
//! operator's to fix and exits 2, naming the file, line and key; anything else (a socket
//! that cannot be bound, a child that will not start) exits 1. Nothing in this crate recovers
//! from an error by looking inside it, so an error is a message for a person: what was being
//! done, on what, and the cause (an [`std::io::Error`] is kept as the source). The proxy and
//! backend crates report their failures as text, which becomes [`Error::Runtime`] at the
//! boundary. No `anyhow`: its one error type would lose the kind, and with it the exit code.
//! Nothing from outside (a file, a variable, a peer) is unwrapped.

pub mod certs;
pub mod config;
pub mod serve_backend;
pub mod supervisor;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad config, or a command the config does not allow: exit 2.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// An operating-system call failed: what was being done, on what, and the OS's reason.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Anything else at run time: exit 1.
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// For `map_err`: an [`Error::Io`] saying what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }

    /// The process exit code for it.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => 2,
            Error::Io { .. } | Error::Runtime(_) => 1,
        }
    }
}

/// The backend crate's start-up errors: reported as they are, at exit 1.
impl From<gatehouse_backend::StartError> for Error {
    fn from(error: gatehouse_backend::StartError) -> Self {
        Error::Runtime(error.to_string())
    }
}

/// The proxy crate's errors: reported as they are, at exit 1.
impl From<gatehouse_proxy::BuildError> for Error {
    fn from(error: gatehouse_proxy::BuildError) -> Self {
        Error::Runtime(error.to_string())
    }
}

/// Text errors (the proxy's settings loader).
impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::Runtime(message)
    }
}
