//! `gatehouse backend`: builds the backend's parts from the config and serves one socket.

mod socket_dir;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use gatehouse_backend::{App, Metrics, Settings, Store, Tokens, Users};
use tokio::signal::unix::{SignalKind, signal};

use crate::{Error, Result, config::Config};

/// How long open requests may run after SIGTERM.
pub const DRAIN: Duration = Duration::from_secs(10);

/// How long a backend keeps serving after SIGUSR2 while failing its health check: long enough
/// for the proxy's checks to see it gone (two checks and a margin).
pub fn lame_duck(config: &Config) -> Duration {
    config.proxy.pool.health_check_interval * 2 + Duration::from_millis(300)
}

/// Where a backend listens.
pub struct Sockets {
    /// Requests and `/healthz`.
    pub socket: PathBuf,
    /// `/metrics`, when given.
    pub admin_socket: Option<PathBuf>,
    /// The socket is in `upstream.socket_dir`, where the proxy finds it: it appears there only
    /// once it listens, and leaves before the backend drains ([`socket_dir`]).
    pub published: bool,
}

impl Sockets {
    /// The backend `id`'s sockets in the proxy's socket directory.
    pub fn in_dir(dir: &Path, id: &str) -> Self {
        use gatehouse_proxy::socket_dir::{METRICS_SUFFIX, SOCKET_SUFFIX};
        Sockets {
            socket: dir.join(format!("{id}{SOCKET_SUFFIX}")),
            admin_socket: Some(dir.join(format!("{id}{METRICS_SUFFIX}"))),
            published: true,
        }
    }
}

/// Serves the request socket, and the backend's metrics on the admin socket when given.
pub fn run(config: &Config, sockets: &Sockets, id: String) -> Result<i32> {
    let socket = sockets.socket.as_path();
    let admin_socket = sockets.admin_socket.as_deref();
    let mut users = Users::load(&config.backend.users_file)
        .map_err(|e| config.error_at("backend.users_file", e.to_string()))?;
    let env = crate::config::process_env;
    if let Some(password) = config.backend.admin_password(&env)? {
        users
            .set_admin_password(&password)
            .map_err(|e| Error::Runtime(e.to_string()))?;
    }
    let secret = config.backend.jwt_secret(&env)?;
    let secret = secret.as_deref().ok_or_else(|| {
        config.error_at(
            "backend.jwt_secret_file",
            format!(
                "no JWT secret: set {} or {}, or this key",
                crate::config::ENV_JWT_SECRET,
                crate::config::ENV_JWT_SECRET_FILE,
            ),
        )
    })?;
    let tokens = Tokens::new(secret, config.backend.token_ttl_seconds)
        .map_err(|e| config.error_at("backend.jwt_secret_file", e.to_string()))?;
    let redis_url = config.redis.client_url(&config.managed_redis_socket())?;

    let limits = config.backend.connections;
    // Each connection takes a descriptor; the rest (Redis, the sockets, the logs) are few.
    if let Some(open_files) = gatehouse_proxy::file_limit::raise_to_hard() {
        let needed = (limits.max_connections as u64).saturating_add(64);
        if open_files < needed {
            tracing::warn!(
                backend = %id,
                open_files,
                max_connections = limits.max_connections,
                "the open-file limit is low for backend.max_connections; raise it (ulimit -n) or lower max_connections"
            );
        }
    }
    // An argon2id check takes about 19 MiB. glibc serves the first from mmap and returns it,
    // then raises its mmap threshold and keeps the next ones in the heap for good; a fixed
    // threshold hands every one back to the kernel when the check is done.
    // SAFETY: mallopt before the runtime starts its threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
    // One thread per backend: the group scales by running more backend processes.
    // Password checks run on the blocking pool; bounding it bounds the CPU and memory (about
    // 19 MiB per argon2id check) a flood of logins can take.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(2)
        .build()
        .map_err(Error::io("cannot start the runtime"))?;
    runtime.block_on(async {
        let metrics = Arc::new(Metrics::new(&id)?);
        let store = Store::new(&redis_url, config.redis.timeout, Some(metrics.clone()))
            .map_err(|e| config.error_at("redis.url", e.to_string()))?;
        let app = Arc::new(
            App::new(Settings {
                id: id.clone(),
                users,
                tokens,
                store,
                guard: config.backend.login_guard,
                max_body_bytes: config.backend.max_body_bytes,
                body_timeout: limits.body_timeout,
                max_tokens_per_user: config.backend.max_tokens_per_user,
                metrics: metrics.clone(),
                audit: config.backend.audit.clone(),
                admin_address: config.proxy.admin_listen,
                certificate_users: config.backend.certificate_users,
            })
            .map_err(|e| Error::Runtime(e.to_string()))?,
        );
        // Handlers first: a SIGTERM that arrives once the socket exists must drain, not kill.
        let (Ok(mut term), Ok(mut int), Ok(mut usr2)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::user_defined2()),
        ) else {
            return Err(Error::Runtime("cannot install signal handlers".into()));
        };
        let listener = if sockets.published {
            socket_dir::publish(socket).await?
        } else {
            gatehouse_backend::bind(socket)
                .await
                .map_err(Error::io(format!("cannot listen on {}", socket.display())))?
        };
        if let Some(admin) = admin_socket {
            let listener = gatehouse_backend::bind(admin)
                .await
                .map_err(Error::io(format!("cannot listen on {}", admin.display())))?;
            tokio::spawn(gatehouse_backend::serve_admin(listener, app.clone()));
        }
        tracing::info!(backend = %id, socket = %socket.display(), "backend listening");
        let lame_duck = lame_duck(config);
        let shutdown = async {
            tokio::select! {
                _ = term.recv() => {
                    if sockets.published {
                        // Found by the proxy in its socket directory: leave it, so no new
                        // request comes, and let the proxy look again before closing anything.
                        tracing::info!(backend = %id, ?lame_duck, "SIGTERM: leaving the socket directory, then draining");
                        let _ = std::fs::remove_file(socket);
                        app.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(lame_duck).await;
                    } else {
                        tracing::info!(backend = %id, "SIGTERM: draining");
                    }
                }
                // A rolling restart: leave the rotation first, so no request meets a closing
                // socket, then drain like SIGTERM.
                _ = usr2.recv() => {
                    tracing::info!(backend = %id, ?lame_duck, "SIGUSR2: leaving the rotation, then draining");
                    app.draining.store(true, std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(lame_duck).await;
                }
                _ = int.recv() => {
                    // SIGINT means now: no draining.
                    let _ = std::fs::remove_file(socket);
                    admin_socket.map(std::fs::remove_file);
                    std::process::exit(130);
                }
            }
        };
        gatehouse_backend::serve(listener, app.clone(), limits, shutdown, DRAIN).await;
        let _ = std::fs::remove_file(socket);
        admin_socket.map(std::fs::remove_file);
        Ok(0)
    })
}
