//! `gatehouse backend`: builds the backend's parts from the config and serves one socket.

use std::{path::Path, sync::Arc, time::Duration};

use gatehouse_backend::{App, Metrics, Settings, Store, Tokens, Users};
use tokio::signal::unix::{SignalKind, signal};

use crate::{Failure, config::Config};

/// How long open requests may run after SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `socket`, and the backend's metrics on `admin_socket` when given.
pub fn run(
    config: &Config,
    socket: &Path,
    admin_socket: Option<&Path>,
    id: String,
) -> Result<i32, Failure> {
    let users =
        Users::load(&config.backend.users_file).map_err(|e| Failure::Config(e.to_string()))?;
    let secret = config.backend.jwt_secret.as_deref().ok_or_else(|| {
        Failure::Config(format!(
            "no JWT secret: set {} or {}, or backend.jwt_secret_file in {}",
            crate::config::ENV_JWT_SECRET,
            crate::config::ENV_JWT_SECRET_FILE,
            config.file.display()
        ))
    })?;
    let tokens = Tokens::new(secret, config.backend.token_ttl_seconds).map_err(Failure::Config)?;
    let redis_url = config
        .redis
        .url
        .clone()
        .unwrap_or_else(|| format!("unix://{}", config.managed_redis_socket().display()));

    // One thread per backend: the group scales by running more backend processes.
    // Password checks run on the blocking pool; bounding it bounds the CPU and memory (about
    // 19 MiB per argon2id check) a flood of logins can take.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .build()
        .map_err(|e| Failure::Runtime(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async {
        let metrics = Arc::new(Metrics::new(&id).map_err(Failure::Runtime)?);
        let store = Store::new(&redis_url, config.redis.timeout, Some(metrics.clone()))
            .map_err(Failure::Config)?;
        let app = App::new(Settings {
            id: id.clone(),
            users,
            tokens,
            store,
            guard: config.backend.login_guard,
            max_body_bytes: config.backend.max_body_bytes,
            metrics: metrics.clone(),
        })
        .map_err(Failure::Config)?;
        // Handlers first: a SIGTERM that arrives once the socket exists must drain, not kill.
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return Err(Failure::Runtime("cannot install signal handlers".into()));
        };
        let listener = gatehouse_backend::bind(socket)
            .await
            .map_err(|e| Failure::Runtime(format!("cannot listen on {}: {e}", socket.display())))?;
        if let Some(admin) = admin_socket {
            let listener = gatehouse_backend::bind(admin).await.map_err(|e| {
                Failure::Runtime(format!("cannot listen on {}: {e}", admin.display()))
            })?;
            tokio::spawn(gatehouse_backend::serve_admin(listener, metrics));
        }
        tracing::info!(backend = %id, socket = %socket.display(), "backend listening");
        let shutdown = async {
            tokio::select! {
                _ = term.recv() => tracing::info!(backend = %id, "SIGTERM: draining"),
                _ = int.recv() => {
                    // SIGINT means now: no draining.
                    let _ = std::fs::remove_file(socket);
                    admin_socket.map(std::fs::remove_file);
                    std::process::exit(130);
                }
            }
        };
        gatehouse_backend::serve(listener, Arc::new(app), shutdown, DRAIN).await;
        let _ = std::fs::remove_file(socket);
        admin_socket.map(std::fs::remove_file);
        Ok(0)
    })
}
