//! `gatehouse run`: the process group.
//!
//! Start order: Redis (when managed), the backends, then the proxy, each waited on until it
//! answers. Children that die are restarted with backoff. SIGTERM stops the proxy first (it
//! drains in-flight requests), then the backends, then Redis; SIGINT stops everything at
//! once. Children are tied to the supervisor's life, so none outlives it even if it crashes.

mod child;

use std::{
    ffi::OsString,
    fs::File,
    io::Write,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    net::UnixStream,
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinHandle,
};

use crate::config::{self, Config};
use child::{Probe, Spec, Stop};

const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A started child and the switch that stops it.
struct Running {
    stop: watch::Sender<Option<Stop>>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self, how: Stop) {
        let _ = self.stop.send(Some(how));
        let _ = self.task.await;
    }
}

/// Runs the group until a signal; returns the process exit code.
pub fn run(config: Config) -> Result<i32, String> {
    // Single-threaded on purpose: PR_SET_PDEATHSIG fires when the *thread* that spawned a
    // child exits, so every spawn must come from the one thread that lives as long as we do.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(run_group(config))
}

async fn run_group(config: Config) -> Result<i32, String> {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        _ => return Err("cannot install signal handlers".into()),
    };
    create_dir(&config.runtime_dir)?;
    let _lock = lock_runtime_dir(&config.runtime_dir)?;
    for i in 0..config.backend.count {
        refuse_live_socket(&config.backend_socket(i)).await?;
    }

    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find our own executable: {e}"))?;
    let config_file = std::fs::canonicalize(&config.file).unwrap_or_else(|_| config.file.clone());
    let mut shared_env: Vec<(String, OsString)> = Vec::new();
    if config.backend.jwt_secret.is_none() {
        tracing::warn!(
            "no JWT secret configured ({} or backend.jwt_secret_file); using a random one for this run: \
             tokens will not survive a restart",
            config::ENV_JWT_SECRET
        );
        shared_env.push((config::ENV_JWT_SECRET.into(), random_secret().into()));
    }

    let mut redis = None;
    if config.redis.url.is_none() {
        let socket = config.managed_redis_socket();
        refuse_live_socket(&socket).await?;
        let spec = redis_spec(&config, &socket)?;
        redis = Some(start(spec).await?);
        shared_env.push((
            config::ENV_REDIS_URL.into(),
            format!("unix://{}", socket.display()).into(),
        ));
    }

    let mut backends = Vec::new();
    for i in 0..config.backend.count {
        let socket = config.backend_socket(i);
        let spec = Spec {
            name: config.backend_id(i),
            program: exe.clone(),
            args: vec![
                "backend".into(),
                "--config".into(),
                config_file.clone().into(),
                "--socket".into(),
                socket.clone().into(),
                "--id".into(),
                config.backend_id(i).into(),
            ],
            env: shared_env.clone(),
            probe: Probe::Unix(socket),
            stop_timeout: Duration::from_secs(10),
        };
        match start(spec).await {
            Ok(running) => backends.push(running),
            Err(error) => {
                stop_all(None, backends, redis, Stop::Fast).await;
                return Err(error);
            }
        }
    }

    let proxy_spec = Spec {
        name: "proxy".into(),
        program: exe.clone(),
        args: vec!["proxy".into(), "--config".into(), config_file.into()],
        env: shared_env.clone(),
        probe: Probe::Tcp(config.proxy.listen),
        stop_timeout: config.proxy.shutdown_grace + Duration::from_secs(5),
    };
    let proxy = match start(proxy_spec).await {
        Ok(proxy) => proxy,
        Err(error) => {
            stop_all(None, backends, redis, Stop::Fast).await;
            return Err(error);
        }
    };
    tracing::info!(
        listen = %config.proxy.listen, backends = config.backend.count,
        redis = if redis.is_some() { "managed" } else { "external" },
        "gatehouse is up"
    );

    let (how, code) = tokio::select! {
        _ = term.recv() => (Stop::Graceful, 0),
        _ = int.recv() => (Stop::Fast, 130),
    };
    tracing::info!(?how, "stopping the group");
    stop_all(Some(proxy), backends, redis, how).await;
    Ok(code)
}

async fn start(spec: Spec) -> Result<Running, String> {
    let mut child = spec.spawn().map_err(|e| {
        format!(
            "cannot start {} ({}): {e}",
            spec.name,
            spec.program.display()
        )
    })?;
    if let Err(error) = spec.wait_ready(&mut child, READY_TIMEOUT).await {
        child::stop(&spec.name, &mut child, Stop::Fast, Duration::from_secs(2)).await;
        return Err(error);
    }
    tracing::info!(child = %spec.name, pid = child.id(), "started");
    let (stop, stop_rx) = watch::channel(None);
    let task = tokio::spawn(child::keep_running(spec, child, stop_rx));
    Ok(Running { stop, task })
}

/// Proxy first, so nothing new reaches the backends; then the backends; Redis last, so the
/// final counts are written.
async fn stop_all(
    proxy: Option<Running>,
    backends: Vec<Running>,
    redis: Option<Running>,
    how: Stop,
) {
    if let Some(proxy) = proxy {
        proxy.stop(how).await;
    }
    join_all(backends.into_iter().map(|b| b.stop(how))).await;
    if let Some(redis) = redis {
        // Redis saves on SIGTERM and SIGINT alike; it always gets the clean one.
        redis.stop(Stop::Graceful).await;
    }
}

async fn join_all(stops: impl Iterator<Item = impl Future<Output = ()> + Send + 'static>) {
    let tasks: Vec<_> = stops.map(tokio::spawn).collect();
    for task in tasks {
        let _ = task.await;
    }
}

fn redis_spec(config: &Config, socket: &Path) -> Result<Spec, String> {
    let dir = config.data_dir.join("redis");
    create_dir(&dir)?;
    let arg = |s: &str| OsString::from(s);
    Ok(Spec {
        name: "redis".into(),
        program: PathBuf::from(&config.redis.server_binary),
        args: vec![
            // No TCP port: the managed Redis is reached only through its socket.
            arg("--port"),
            arg("0"),
            arg("--unixsocket"),
            socket.into(),
            arg("--unixsocketperm"),
            arg("700"),
            arg("--dir"),
            dir.into(),
            // Append-only file, fsynced every second: counts survive a restart.
            arg("--appendonly"),
            arg("yes"),
            arg("--appendfsync"),
            arg("everysec"),
            arg("--save"),
            arg(""),
            arg("--daemonize"),
            arg("no"),
            arg("--loglevel"),
            arg("warning"),
        ],
        env: Vec::new(),
        probe: Probe::Unix(socket.to_path_buf()),
        stop_timeout: Duration::from_secs(10),
    })
}

fn create_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// One group per runtime directory: a second `gatehouse run` on the same directory would
/// fight the first over its sockets.
fn lock_runtime_dir(dir: &Path) -> Result<File, String> {
    let path = dir.join("gatehouse.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own; released when the file closes or we exit.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(format!(
            "another gatehouse (pid {}) is running with runtime directory {}",
            holder.trim(),
            dir.display()
        ));
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(file)
}

/// A socket file some process still answers on belongs to someone else: never take it.
async fn refuse_live_socket(path: &Path) -> Result<(), String> {
    if path.exists() && UnixStream::connect(path).await.is_ok() {
        return Err(format!(
            "{} is in use by a running process; is another gatehouse running?",
            path.display()
        ));
    }
    Ok(())
}

fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
