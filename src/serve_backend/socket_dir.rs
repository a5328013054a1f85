//! A backend in the proxy's socket directory (`upstream.socket_dir`), where the proxy finds
//! every `NAME.sock` by itself (`gatehouse_proxy::socket_dir`). The socket appears there
//! only once it listens: it is bound under a hidden name of its own (pid and random) and
//! renamed into place, so the proxy never finds one that refuses connections because it is
//! not listening yet.
//!
//! Backends starting at once on one directory take turns: each holds an exclusive lock on
//! the directory (flock) while it removes the sockets of killed backends, checks that no
//! running backend serves its name, and puts its socket in place. Without the turns, two
//! backends given the same id could both find the name free and the second rename would
//! replace the first one's socket, leaving it running unreachable.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use gatehouse_proxy::socket_dir::{METRICS_SUFFIX, backend_name};
use tokio::net::{UnixListener, UnixStream};

use crate::{Error, Result};

/// Binds `socket` (in the socket directory) and puts it where the proxy finds it.
pub async fn publish(socket: &Path) -> Result<UnixListener> {
    let cannot = |what: &str| Error::io(format!("cannot {what} {}", socket.display()));
    let (Some(dir), Some(_)) = (socket.parent(), socket.file_name()) else {
        return Err(Error::Runtime(format!(
            "{} is not a socket path in a directory",
            socket.display()
        )));
    };
    let _turn = DirLock::take(dir).map_err(Error::io(format!(
        "cannot lock the socket directory {}",
        dir.display()
    )))?;
    remove_stale(dir).await;
    if UnixStream::connect(socket).await.is_ok() {
        return Err(Error::Runtime(format!(
            "{} is served by a running backend: give this one another id (--id, GATEHOUSE_BACKEND_ID)",
            socket.display()
        )));
    }
    let hidden = hidden_name(dir);
    let listener = gatehouse_backend::bind(&hidden)
        .await
        .map_err(cannot("listen on"))?;
    if let Err(error) = std::fs::rename(&hidden, socket) {
        let _ = std::fs::remove_file(&hidden);
        return Err(cannot("move the socket to")(error));
    }
    Ok(listener)
}

/// A name no other backend binds: hidden (the proxy ignores it) and short, so it fits in a
/// socket path wherever the final name does.
fn hidden_name(dir: &Path) -> PathBuf {
    dir.join(format!(
        ".{}-{:08x}.tmp",
        std::process::id(),
        rand::random::<u32>()
    ))
}

/// An exclusive flock on the directory, released when dropped (the descriptor closes).
struct DirLock {
    _dir: File,
}

impl DirLock {
    fn take(dir: &Path) -> io::Result<Self> {
        let file = File::open(dir)?;
        // Held for the milliseconds one start takes; blocking the starting backend's only
        // thread meanwhile is harmless.
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { _dir: file })
    }
}

/// Removes the sockets in `dir` that nobody listens on (their backend was killed), with
/// their metrics sockets, and hidden ones a backend killed while starting left. Called with
/// the directory locked: no other backend is between binding and listening then, so a
/// refused connection means a dead socket.
async fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let metrics =
            backend_name(file_name).map(|name| dir.join(format!("{name}{METRICS_SUFFIX}")));
        let hidden = file_name.starts_with('.') && file_name.ends_with(".tmp");
        if metrics.is_none() && !hidden {
            continue;
        }
        let path = entry.path();
        if let Err(error) = UnixStream::connect(&path).await
            && error.kind() == io::ErrorKind::ConnectionRefused
        {
            tracing::info!(socket = %path.display(), "removing the socket of a backend that is gone");
            let _ = std::fs::remove_file(&path);
            if let Some(metrics) = metrics {
                let _ = std::fs::remove_file(metrics);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two backends given one id start at once, many times over: exactly one serves the
    /// socket, and the other is refused with the message that names the conflict.
    #[test]
    fn one_of_two_backends_with_one_id_starts() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("twin.sock");
        runtime.block_on(async {
            for round in 0..200 {
                let (a, b) = tokio::join!(
                    tokio::spawn({
                        let socket = socket.clone();
                        async move { publish(&socket).await }
                    }),
                    tokio::spawn({
                        let socket = socket.clone();
                        async move { publish(&socket).await }
                    }),
                );
                let results = [a.expect("task a"), b.expect("task b")];
                let started: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
                let refused: Vec<String> = results
                    .iter()
                    .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
                    .collect();
                assert_eq!(started.len(), 1, "round {round}: {refused:?}");
                assert!(
                    refused[0].contains("served by a running backend"),
                    "round {round}: {refused:?}"
                );
                // The socket in place is the started one's: a connection reaches its listener.
                let _client = UnixStream::connect(&socket).await.expect("connect");
                let accepted =
                    tokio::time::timeout(std::time::Duration::from_secs(2), started[0].accept())
                        .await;
                assert!(
                    accepted.is_ok(),
                    "round {round}: the socket is not the started one's"
                );
                let leftovers: Vec<_> = std::fs::read_dir(dir.path())
                    .expect("read dir")
                    .flatten()
                    .map(|e| e.file_name())
                    .collect();
                assert_eq!(leftovers, ["twin.sock"], "round {round}");
                drop(results);
                let _ = std::fs::remove_file(&socket);
            }
        });
    }
}
