//! gatehouse's process group, as a library the `gatehouse` binary (`main.rs`, only the
//! command line) drives.
//!
//! - [`config`]: the config file -> one validated [`config::Config`]; [`config::check`] adds
//!   what it names (the users file, the certificate pair).
//! - [`supervisor`]: `gatehouse run`, the process group.
//! - [`serve_backend`]: `gatehouse backend`, one backend process.
//! - [`certs`]: the self-signed development certificate.

pub mod certs;
pub mod config;
pub mod serve_backend;
pub mod supervisor;

/// Why a command failed, for its exit code.
pub enum Failure {
    /// A bad config or usage: exit 2.
    Config(String),
    /// Anything else: exit 1.
    Runtime(String),
}
