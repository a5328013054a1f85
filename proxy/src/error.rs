//! Why the proxy's run-time state could not be built, at start-up or on a reload.
//!
//! Each message names the file, socket or setting at fault: operators read it, tests match
//! it, and the root crate's config check prints it as it is.

use std::{io, path::PathBuf};

use rustls::pki_types::pem;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("acme.storage: cannot make {}: {source}", .path.display())]
    AcmeStorage {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("acme: the Redis that replicas share orders through: {0}")]
    AcmeRedis(String),
    #[error("upstreams.{0}.ca_file: a certificate in it cannot be parsed")]
    UpstreamCa(String),
    #[error("upstreams.{pool}: {} cannot be a socket address", .path.display())]
    UpstreamSocket { pool: String, path: PathBuf },
    #[error("no upstream pool {0:?}")]
    UnknownPool(String),
    /// A reload's new or changed pool with a server that has no address: refused, as
    /// nginx refuses a configuration whose upstream host is not found.
    #[error("upstreams.{pool}: no address found for {servers}")]
    Unresolved { pool: String, servers: String },
    #[error("cannot listen on {listen}: {source}")]
    Listen { listen: String, source: io::Error },
    /// Pingora takes the pid file and the upgrade socket as strings.
    #[error("{} is not UTF-8", .0.display())]
    NotUtf8(PathBuf),

    #[error("{}: cannot read a PEM certificate: {source}", .path.display())]
    Certificate { path: PathBuf, source: pem::Error },
    #[error("{}: no certificate in the file", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: the certificate names no DNS name (subjectAltName) to choose it by", .0.display())]
    NoDnsNames(PathBuf),
    #[error("{}: cannot read a PEM private key: {source}", .path.display())]
    PrivateKey { path: PathBuf, source: pem::Error },
    #[error("{}: unusable private key: {source}", .path.display())]
    UnusableKey {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("{} does not match the certificate {}: {source}", .key.display(), .cert.display())]
    KeyMismatch {
        key: PathBuf,
        cert: PathBuf,
        source: rustls::Error,
    },
    #[error("tls.client_ca: {0}")]
    ClientCa(String),
    #[error("TLS settings: {0}")]
    TlsSettings(rustls::Error),

    #[error("backend socket {}: {source}", .path.display())]
    BackendSocket {
        path: PathBuf,
        source: Box<pingora::Error>,
    },
    #[error("health check request: {0}")]
    HealthCheck(Box<pingora::Error>),

    #[error("static directory {}: {source}", .dir.display())]
    StaticDirectory { dir: PathBuf, source: io::Error },
    #[error("static cache: {0}")]
    StaticCache(String),
    /// A rate limit policy the token buckets cannot hold.
    #[error("{0}")]
    RateLimit(&'static str),

    #[error("access log directory {}: {source}", .dir.display())]
    AccessLogDirectory { dir: PathBuf, source: io::Error },
    #[error("access log {}: {source}", .path.display())]
    AccessLog { path: PathBuf, source: io::Error },
    #[error("cannot start the access log writer: {0}")]
    AccessLogWriter(io::Error),

    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),

    /// The configuration read again for a reload was refused; the message is the config
    /// check's, naming file, line and key.
    #[error("{0}")]
    Config(String),
}
