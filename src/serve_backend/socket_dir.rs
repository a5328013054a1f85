//! A backend in the proxy's socket directory (`upstream.socket_dir`), where the proxy finds
//! every `NAME.sock` by itself (`gatehouse_proxy::socket_dir`). The socket appears there
//! only once it listens: it is bound under a hidden name and renamed into place, so the
//! proxy never finds one that refuses connections because it is not listening yet. Sockets
//! left by backends that were killed are removed first.

use std::{io, path::Path};

use gatehouse_proxy::socket_dir::{METRICS_SUFFIX, backend_name};
use tokio::net::{UnixListener, UnixStream};

use crate::{Error, Result};

/// Binds `socket` (in the socket directory) and puts it where the proxy finds it.
pub async fn publish(socket: &Path) -> Result<UnixListener> {
    let cannot = |what: &str| Error::io(format!("cannot {what} {}", socket.display()));
    let (Some(dir), Some(name)) = (socket.parent(), socket.file_name().and_then(|n| n.to_str()))
    else {
        return Err(Error::Runtime(format!(
            "{} is not a socket path in a directory",
            socket.display()
        )));
    };
    remove_stale(dir).await;
    if UnixStream::connect(socket).await.is_ok() {
        return Err(Error::Runtime(format!(
            "{} is served by a running backend: give this one another id (--id, GATEHOUSE_BACKEND_ID)",
            socket.display()
        )));
    }
    let hidden = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&hidden);
    let listener = gatehouse_backend::bind(&hidden)
        .await
        .map_err(cannot("listen on"))?;
    std::fs::rename(&hidden, socket).map_err(cannot("move the socket to"))?;
    Ok(listener)
}

/// Removes the sockets in `dir` that nobody listens on (their backend was killed), with
/// their metrics sockets.
async fn remove_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(name) = entry
            .file_name()
            .to_str()
            .and_then(backend_name)
            .map(str::to_owned)
        else {
            continue;
        };
        let path = entry.path();
        if let Err(error) = UnixStream::connect(&path).await
            && error.kind() == io::ErrorKind::ConnectionRefused
        {
            tracing::info!(socket = %path.display(), "removing the socket of a backend that is gone");
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(dir.join(format!("{name}{METRICS_SUFFIX}")));
        }
    }
}
