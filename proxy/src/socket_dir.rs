//! Backends found in a directory rather than listed: every `NAME.sock` in it is a backend
//! named `NAME` (its metrics on `NAME.metrics`), for backends that come and go on their own
//! (`upstream.socket_dir`: containers sharing a volume of sockets with the proxy).
//!
//! Pingora's load balancer asks [`SocketDir`] again every `health_check_interval`: a socket
//! that appears joins the rotation, one that is gone leaves it, and the health checks judge
//! the rest as they judge listed backends. A backend therefore puts its socket in place only
//! once it listens (it binds under a hidden name, then renames), and removes it before it
//! drains, so the proxy never picks a backend that cannot take a request. A socket left by a
//! killed backend refuses connections: the request goes to the next backend and the health
//! check takes it out of rotation until a new backend removes the file.
//!
//! A known backend keeps its entry (and so its request slots) from one look to the next.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Mutex,
};

use async_trait::async_trait;
use pingora::lb::{Backend, discovery::ServiceDiscovery};

use crate::{settings::PoolSettings, upstream};

/// What a backend's request socket is named: `NAME` + this.
pub const SOCKET_SUFFIX: &str = ".sock";
/// What its metrics socket is named: `NAME` + this.
pub const METRICS_SUFFIX: &str = ".metrics";

/// A backend's name as it may appear in a socket's file name and in `X-Backend-Id`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The backend named by a file in the directory, if it is one: hidden files (a socket being
/// bound) and other names are not.
pub fn backend_name(file_name: &str) -> Option<&str> {
    file_name
        .strip_suffix(SOCKET_SUFFIX)
        .filter(|name| valid_name(name))
}

pub struct SocketDir {
    dir: PathBuf,
    settings: PoolSettings,
    /// Socket path -> its entry, as last found.
    known: Mutex<BTreeMap<PathBuf, Backend>>,
    /// Whether the last look failed, so a lasting failure is logged once.
    failing: Mutex<bool>,
}

impl SocketDir {
    pub fn new(dir: &Path, settings: &PoolSettings) -> Box<Self> {
        Box::new(Self {
            dir: dir.to_path_buf(),
            settings: settings.clone(),
            known: Mutex::new(BTreeMap::new()),
            failing: Mutex::new(false),
        })
    }

    fn sockets(&self) -> std::io::Result<Vec<(String, PathBuf)>> {
        use std::os::unix::fs::FileTypeExt;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
            if let (true, Some(name)) = (is_socket, entry.file_name().to_str().map(str::to_owned))
                && let Some(backend) = backend_name(&name)
            {
                found.push((backend.to_owned(), entry.path()));
            }
        }
        Ok(found)
    }

    fn note(&self, failure: Option<&std::io::Error>) {
        let mut failing = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        match failure {
            Some(error) if !*failing => {
                tracing::error!(dir = %self.dir.display(), %error, "cannot read the backend socket directory; keeping the backends found before");
            }
            None if *failing => {
                tracing::info!(dir = %self.dir.display(), "the backend socket directory reads again");
            }
            _ => {}
        }
        *failing = failure.is_some();
    }
}

#[async_trait]
impl ServiceDiscovery for SocketDir {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        // A directory of a few sockets reads in microseconds: no need for a blocking thread.
        let sockets = match self.sockets() {
            Ok(sockets) => sockets,
            Err(error) => {
                self.note(Some(&error));
                return Err(pingora::Error::because(
                    pingora::ErrorType::InternalError,
                    "reading the backend socket directory",
                    error,
                ));
            }
        };
        self.note(None);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = BTreeMap::new();
        for (name, path) in sockets {
            let entry = match known.remove(&path) {
                Some(entry) => entry,
                None => {
                    let socket = upstream::BackendSocket {
                        id: name.clone(),
                        admin_socket: Some(self.dir.join(format!("{name}{METRICS_SUFFIX}"))),
                        socket: path.clone(),
                    };
                    match upstream::entry(&self.settings, &socket) {
                        Ok(entry) => {
                            tracing::info!(backend = %name, socket = %path.display(), "backend found");
                            entry
                        }
                        Err(error) => {
                            tracing::error!(socket = %path.display(), %error, "unusable backend socket");
                            continue;
                        }
                    }
                }
            };
            now.insert(path, entry);
        }
        for path in known.keys() {
            tracing::info!(socket = %path.display(), "backend gone");
        }
        *known = now;
        Ok((known.values().cloned().collect(), HashMap::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(backend_name("b1.sock"), Some("b1"));
        assert_eq!(backend_name("3f2a9c1b7d4e.sock"), Some("3f2a9c1b7d4e"));
        assert_eq!(backend_name(".b1.sock.tmp"), None);
        assert_eq!(backend_name(".b1.sock"), None);
        assert_eq!(backend_name("b1.metrics"), None);
        assert_eq!(backend_name(".sock"), None);
        assert!(!valid_name(&"a".repeat(65)));
    }
}
