//! Backends found in a directory rather than listed: every `NAME.sock` in it is a backend
//! named `NAME` (its metrics on `NAME.metrics`), for backends that come and go on their own
//! (`upstream.socket_dir`: containers sharing a volume of sockets with the proxy).
//!
//! Pingora's load balancer asks [`SocketDir`] again every `health_check_interval`: a socket
//! that appears joins the rotation, one that is gone leaves it, and the health checks judge
//! the rest as they judge listed backends. A backend therefore puts its socket in place only
//! once it listens (it binds under a hidden name, then renames), and removes it before it
//! drains, so the proxy never picks a backend that cannot take a request.
//!
//! A visible socket that refuses connections (`ECONNREFUSED`: nobody listens) is therefore
//! one whose backend died. The health check that meets the refusal notes it ([`Refused`]),
//! and the next look leaves the socket out of the pool, its metrics with it, until a new
//! socket takes its path. The proxy never removes the file: it may have no right to write in
//! the directory (the Swarm stack mounts it read-only in the edge), and the next backend to
//! start on the directory removes it (`gatehouse backend` does, as it starts).
//!
//! The directory is a trust boundary of sorts (any writer in it adds backends), so the
//! proxy takes at most `upstream.socket_dir_max_backends` sockets from it, and connects
//! only to sockets, never through a symbolic link ([`is_socket`]).
//!
//! A known backend keeps its entry (and so its request slots) from one look to the next.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::unix::fs::{FileTypeExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use pingora::lb::{
    Backend,
    discovery::ServiceDiscovery,
    health_check::{HealthCheck, HttpHealthCheck},
};

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

/// Whether `path` is a socket itself, not a symbolic link to one nor anything else: a writer
/// of the socket directory must not steer the proxy to another socket it can reach.
pub fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Which file a path named when it was looked at: a socket renamed to the same path by a new
/// backend is another file. The inode number alone does not tell: a file system may give the
/// new socket the number the dead one just freed, so its change time is part of it.
type FileId = (u64, u64, i64, i64);

fn identity(meta: &std::fs::Metadata) -> FileId {
    (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec())
}

fn file_id(path: &Path) -> Option<FileId> {
    std::fs::symlink_metadata(path).ok().map(|m| identity(&m))
}

/// Sockets found refusing connections, each with the file it was then.
#[derive(Default)]
pub struct Refused(Mutex<HashMap<PathBuf, FileId>>);

impl Refused {
    fn note(&self, path: PathBuf, id: FileId) {
        let mut refused = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if refused.insert(path.clone(), id) != Some(id) {
            tracing::warn!(socket = %path.display(), "backend socket refuses connections (its backend is gone): left out until a new socket takes its place");
        }
    }

    /// Forgets the refusals of paths now gone or holding another file, and tells which of
    /// `found` are still the files that refused.
    fn dead(&self, found: &[(String, PathBuf, FileId)]) -> BTreeSet<PathBuf> {
        let mut refused = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now: HashMap<&Path, FileId> = found
            .iter()
            .map(|(_, path, id)| (path.as_path(), *id))
            .collect();
        refused.retain(|path, id| now.get(path.as_path()) == Some(id));
        refused.keys().cloned().collect()
    }
}

/// The pool's health check for found backends: the `/healthz` check, which also notes the
/// sockets that refuse the connection.
pub struct RefusalCheck {
    pub inner: HttpHealthCheck,
    pub refused: Arc<Refused>,
}

#[async_trait]
impl HealthCheck for RefusalCheck {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        let socket = upstream::member(target);
        // The file before the connect: one put in place meanwhile is not the one that refused.
        let before = socket.and_then(|s| file_id(&s.socket));
        let result = self.inner.check(target).await;
        if let (Err(error), Some(socket), Some(id)) = (&result, socket, before)
            && error.etype() == &pingora::ErrorType::ConnectRefused
        {
            self.refused.note(socket.socket.clone(), id);
        }
        result
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        self.inner.health_status_change(target, healthy).await
    }

    fn backend_summary(&self, target: &Backend) -> String {
        self.inner.backend_summary(target)
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.inner.health_threshold(success)
    }
}

pub struct SocketDir {
    dir: PathBuf,
    settings: PoolSettings,
    refused: Arc<Refused>,
    /// Socket path -> its entry, as last found.
    known: Mutex<BTreeMap<PathBuf, Backend>>,
    /// Whether the last look failed, so a lasting failure is logged once.
    failing: Mutex<bool>,
    /// Sockets left out at the last look for the cap, so a change is logged once.
    over_cap: Mutex<usize>,
}

impl SocketDir {
    pub fn new(dir: &Path, settings: &PoolSettings, refused: Arc<Refused>) -> Box<Self> {
        Box::new(Self {
            dir: dir.to_path_buf(),
            settings: settings.clone(),
            refused,
            known: Mutex::new(BTreeMap::new()),
            failing: Mutex::new(false),
            over_cap: Mutex::new(0),
        })
    }

    /// Every backend socket in the directory, by name.
    fn sockets(&self) -> std::io::Result<Vec<(String, PathBuf, FileId)>> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some(backend) = backend_name(&name) else {
                continue;
            };
            // DirEntry::metadata does not follow a symbolic link.
            if let Ok(meta) = entry.metadata()
                && meta.file_type().is_socket()
            {
                found.push((backend.to_owned(), entry.path(), identity(&meta)));
            }
        }
        found.sort();
        Ok(found)
    }

    /// The sockets the pool takes: every known one first, so a crowd of new sockets cannot
    /// push out backends in service, then new ones by name, up to the cap.
    fn within_cap(
        &self,
        found: Vec<(String, PathBuf, FileId)>,
        known: &BTreeMap<PathBuf, Backend>,
    ) -> Vec<(String, PathBuf)> {
        let cap = self.settings.socket_dir_max_backends;
        let total = found.len();
        let (old, new): (Vec<_>, Vec<_>) = found
            .into_iter()
            .map(|(name, path, _)| (name, path))
            .partition(|(_, path)| known.contains_key(path));
        let taken: Vec<_> = old.into_iter().chain(new).take(cap).collect();
        let left_out = total - taken.len();
        let mut over_cap = self.over_cap.lock().unwrap_or_else(|p| p.into_inner());
        if left_out != *over_cap && left_out > 0 {
            tracing::warn!(dir = %self.dir.display(), sockets = total, max = cap, left_out, "more backend sockets than upstream.socket_dir_max_backends: the rest are left out");
        }
        *over_cap = left_out;
        taken
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
        let dead = self.refused.dead(&sockets);
        let alive = sockets
            .into_iter()
            .filter(|(_, path, _)| !dead.contains(path))
            .collect();
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let mut now = BTreeMap::new();
        for (name, path) in self.within_cap(alive, &known) {
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

    #[test]
    fn a_symbolic_link_to_a_socket_is_not_a_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let real = dir.path().join("real.metrics");
        let _listener = std::os::unix::net::UnixListener::bind(&real).expect("bind");
        let link = dir.path().join("link.metrics");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        assert!(is_socket(&real));
        assert!(!is_socket(&link));
        assert!(!is_socket(&dir.path().join("none.metrics")));
    }
}
