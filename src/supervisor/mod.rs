//! `gatehouse run`: the process group.
//!
//! Start order: Redis (when managed), the backends, then the proxy, each waited on until it
//! answers. Children that die are restarted with backoff. SIGTERM stops the proxy first (it
//! drains in-flight requests), then the backends, then Redis; SIGINT stops everything at
//! once. Children are tied to the supervisor's life, so none outlives it even if it crashes.

mod child;
mod metrics;
mod systemd;

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
    sync::{mpsc, oneshot, watch},
    task::JoinHandle,
};

use crate::{
    Error, Result,
    config::{self, Config},
};
use child::{Order, Probe, Replace, Replacement, Spec, Stop};
use metrics::GroupMetrics;

const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A started child and the channel that gives it orders.
struct Running {
    name: String,
    orders: watch::Sender<Order>,
    task: JoinHandle<()>,
    pid: watch::Receiver<Option<u32>>,
    replacements: mpsc::Sender<Replace>,
}

impl Running {
    /// A planned restart or hand-over; returns once the new process is in place.
    async fn replace(&self, how: Replacement) -> Result<()> {
        let (done, outcome) = oneshot::channel();
        self.replacements
            .send(Replace { how, done })
            .await
            .map_err(|_| format!("{} is not running", self.name))?;
        outcome
            .await
            .map_err(|_| format!("{} stopped during its replacement", self.name))?
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = *self.pid.borrow() {
            // SAFETY: plain kill(2) on our own child's pid, which the child task has not
            // reaped yet (it clears the pid when it does).
            unsafe { libc::kill(pid as libc::pid_t, signal) };
        }
    }

    fn hold(&self) {
        let _ = self.orders.send(Order::NoRestart);
    }

    async fn stop(self, how: Stop) {
        let _ = self.orders.send(Order::Stop(how));
        let _ = self.task.await;
    }
}

/// The group's members, filled in as they start.
#[derive(Default)]
struct Members {
    redis: Option<Running>,
    backends: Vec<Running>,
    proxy: Option<Running>,
}

impl Members {
    /// Proxy first, so nothing new reaches the backends; then the backends; Redis last, so
    /// the final counts are written. Nobody is restarted once this begins.
    async fn stop(self, how: Stop) {
        let Members {
            redis,
            backends,
            proxy,
        } = self;
        redis.iter().chain(&backends).for_each(Running::hold);
        if let Some(proxy) = proxy {
            proxy.stop(how).await;
        }
        let backends: Vec<_> = backends
            .into_iter()
            .map(|b| tokio::spawn(b.stop(how)))
            .collect();
        for backend in backends {
            let _ = backend.await;
        }
        if let Some(redis) = redis {
            // Redis saves on SIGTERM and SIGINT alike; it always gets the clean one.
            redis.stop(Stop::Graceful).await;
        }
    }
}

/// Runs the group until a signal; returns the process exit code.
pub fn run(config: Config) -> Result<i32> {
    // Single-threaded on purpose: PR_SET_PDEATHSIG fires when the *thread* that spawned a
    // child exits, so every spawn must come from the one thread that lives as long as we do.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("cannot start the runtime"))?;
    runtime.block_on(run_group(config))
}

async fn run_group(config: Config) -> Result<i32> {
    let (Ok(mut term), Ok(mut int), Ok(mut usr1), Ok(mut hup), Ok(mut usr2)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::hangup()),
        signal(SignalKind::user_defined2()),
    ) else {
        return Err(Error::Runtime("cannot install signal handlers".into()));
    };
    create_dir(config.runtime_dir())?;
    let _lock = lock_runtime_dir(config.runtime_dir())?;
    // Everything that can be checked is checked before the first child starts.
    for i in 0..config.backend.count {
        refuse_live_socket(&config.backend_socket(i)).await?;
        refuse_live_socket(&config.backend_admin_socket(i)).await?;
    }
    if config.redis.url.is_none() {
        refuse_live_socket(&config.managed_redis_socket()).await?;
    }
    gatehouse_proxy::check_listen(config.proxy.listen)?;
    if let Some(admin) = config.proxy.admin_listen {
        gatehouse_proxy::check_listen(admin)?;
    }

    let metrics = GroupMetrics::new()?;
    let redis_url = config.redis.client_url(&config.managed_redis_socket())?;
    let redis = gatehouse_backend::Store::new(&redis_url, config.redis.timeout, None)?;
    let metrics_file = config
        .runtime_dir()
        .join(gatehouse_proxy::SUPERVISOR_METRICS);
    let writer = tokio::spawn(metrics.clone().keep_writing(metrics_file.clone(), redis));
    // Reloads and upgrades are audit events; the backends write the others.
    let audit = gatehouse_backend::audit::Audit::new(
        std::sync::Arc::new(gatehouse_backend::Store::new(
            &redis_url,
            config.redis.timeout,
            None,
        )?),
        config.backend.audit.file.as_deref(),
        config.backend.audit.max_events,
        "gatehouse",
        None,
    )
    .map_err(|e| Error::Runtime(format!("cannot open the audit file: {e}")))?;

    let mut members = Members::default();
    let started = tokio::select! {
        started = start_members(&config, &mut members, &metrics) => started.map(|()| None),
        _ = term.recv() => Ok(Some((Stop::Graceful, 0))),
        _ = int.recv() => Ok(Some((Stop::Fast, 130))),
    };
    let (how, code) = match started {
        Err(error) => {
            members.stop(Stop::Fast).await;
            writer.abort();
            let _ = std::fs::remove_file(metrics_file);
            return Err(error);
        }
        Ok(Some(stopped)) => {
            tracing::info!("stopped during start-up");
            stopped
        }
        Ok(None) => {
            tracing::info!(
                http = %config.proxy.listen,
                https = config.proxy.tls.as_ref().map(|t| t.listen.to_string()).unwrap_or_else(|| "off".into()),
                backends = config.backend.count,
                redis = if members.redis.is_some() { "managed" } else { "external" },
                "gatehouse is up"
            );
            systemd::ready("serving");
            let applied = std::cell::RefCell::new(BackendInputs::of(&config));
            // A reload or upgrade in progress; signals are still answered meanwhile, and a
            // stop abandons it (the replacement under way finishes in its child's task).
            let mut operation: Option<std::pin::Pin<Box<dyn Future<Output = ()> + '_>>> = None;
            let stopped = loop {
                tokio::select! {
                    _ = term.recv() => break (Stop::Graceful, 0),
                    _ = int.recv() => break (Stop::Fast, 130),
                    () = async { if let Some(op) = operation.as_mut() { op.await } else { std::future::pending().await } } => {
                        operation = None;
                    }
                    _ = hup.recv() => {
                        if operation.is_some() {
                            tracing::warn!("SIGHUP: a reload or upgrade is still in progress; try again when it is done");
                        } else {
                            let (config, members, applied, metrics, audit) = (&config, &members, &applied, &metrics, &audit);
                            operation = Some(Box::pin(async move {
                                let applied = reload(config, members, applied).await;
                                metrics.reload(applied);
                                audit.record(group_event("config.reloaded", applied)).await;
                            }));
                        }
                    }
                    _ = usr2.recv() => {
                        if operation.is_some() {
                            tracing::warn!("SIGUSR2: a reload or upgrade is still in progress; try again when it is done");
                        } else {
                            let (config, members, audit) = (&config, &members, &audit);
                            operation = Some(Box::pin(async move {
                                let done = upgrade(config, members).await;
                                audit.record(group_event("binary.upgraded", done)).await;
                            }));
                        }
                    }
                    // logrotate's signal: the proxy reopens its access logs.
                    _ = usr1.recv() => {
                        tracing::info!("SIGUSR1: the proxy reopens its access logs");
                        if let Some(proxy) = &members.proxy {
                            proxy.signal(libc::SIGUSR1);
                        }
                    }
                }
            };
            drop(operation);
            stopped
        }
    };
    tracing::info!(?how, "stopping the group");
    systemd::stopping();
    members.stop(how).await;
    writer.abort();
    let _ = std::fs::remove_file(metrics_file);
    Ok(code)
}

/// What the backends read from the configuration at start: when it changes, a reload restarts
/// them one by one.
#[derive(PartialEq)]
struct BackendInputs {
    backend: config::Backend,
    users: Option<Vec<u8>>,
    /// The secrets' contents, not only where they are: a new secret file restarts them too.
    secrets: (Option<Vec<u8>>, Option<String>),
    redis: config::Redis,
    health_check_interval: Duration,
}

impl BackendInputs {
    fn of(config: &Config) -> Self {
        let env = config::process_env;
        Self {
            backend: config.backend.clone(),
            users: std::fs::read(&config.backend.users_file).ok(),
            secrets: (
                config.backend.jwt_secret(&env).ok().flatten(),
                config.backend.admin_password(&env).ok().flatten(),
            ),
            redis: config.redis.clone(),
            health_check_interval: config.proxy.pool.health_check_interval,
        }
    }
}

/// SIGHUP: checks the file as `gatehouse check` does; a bad one changes nothing. Otherwise the
/// proxy reloads (it swaps its configuration without touching a connection) and, once it
/// reports success, and when what the backends read has changed, they restart one at a time.
/// Returns whether it was applied.
async fn reload(
    running: &Config,
    members: &Members,
    applied: &std::cell::RefCell<BackendInputs>,
) -> bool {
    let fresh = match config::load_checked(&running.file) {
        Ok((fresh, _)) => fresh,
        Err(error) => {
            tracing::error!(%error, "reload refused; the running configuration is unchanged");
            return false;
        }
    };
    // What the group was started with and cannot change in place: refused as a whole rather
    // than half applied.
    let restart_only = [
        (
            "backend.count",
            running.backend.count != fresh.backend.count,
        ),
        (
            "paths",
            running.runtime_dir() != fresh.runtime_dir() || running.data_dir != fresh.data_dir,
        ),
        ("redis.url", running.redis.url != fresh.redis.url),
        (
            "the JWT secret being set or not",
            running.backend.jwt_secret.is_some() != fresh.backend.jwt_secret.is_some(),
        ),
    ];
    let changed: Vec<&str> = restart_only
        .iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| *key)
        .collect();
    if !changed.is_empty() {
        tracing::error!(
            keys = %changed.join(", "),
            "reload refused: these change only with a restart of the group; nothing changed"
        );
        return false;
    }
    let report = running.runtime_dir().join(gatehouse_proxy::RELOAD_FILE);
    let _ = std::fs::remove_file(&report);
    tracing::info!("reloading: the proxy re-reads the configuration");
    if let Some(proxy) = &members.proxy {
        proxy.signal(libc::SIGHUP);
    }
    match proxy_report(&report).await {
        Ok(()) => {}
        Err(error) => {
            tracing::error!(%error, "reload failed in the proxy; it keeps its configuration and the backends are left alone");
            return false;
        }
    }
    let wanted = BackendInputs::of(&fresh);
    if wanted != *applied.borrow() {
        tracing::info!("the backends' settings changed: restarting them one at a time");
        if let Err(error) = rolling_restart(&members.backends, &fresh).await {
            tracing::error!(%error, "rolling restart stopped; the other backends keep their settings");
            return false;
        }
        *applied.borrow_mut() = wanted;
    }
    true
}

/// The outcome the proxy writes after a reload: `ok`, or `failed: why`.
async fn proxy_report(file: &Path) -> Result<()> {
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(file) {
            return match text.strip_prefix("failed: ") {
                Some(why) => Err(Error::Runtime(why.to_string())),
                None => Ok(()),
            };
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(Error::Runtime(
        "the proxy did not report within 10 s".into(),
    ))
}

/// One backend at a time: it leaves the proxy's rotation, drains, starts again, and the next
/// one waits until the proxy's health checks have seen it back. Stops at the first failure,
/// so a setting no backend can start with takes down at most one.
async fn rolling_restart(backends: &[Running], config: &Config) -> Result<()> {
    for backend in backends {
        backend
            .replace(Replacement::Restart)
            .await
            .map_err(|e| format!("{}: {e}", backend.name))?;
        tokio::time::sleep(config.proxy.pool.health_check_interval * 2).await;
    }
    Ok(())
}

/// SIGUSR2: a new binary in place of the running one without refusing a connection. A new
/// proxy takes the listening sockets over from the old one, which finishes its requests and
/// exits; then the backends restart one at a time on the new binary.
async fn upgrade(config: &Config, members: &Members) -> bool {
    if let Err(error) = config::load_checked(&config.file) {
        tracing::error!(%error, "upgrade refused: the config does not pass the check; nothing changed");
        return false;
    }
    tracing::info!("upgrade: starting a new proxy to take the sockets over");
    let hand_over = Replacement::HandOver {
        socket: config.runtime_dir().join("proxy-upgrade.sock"),
        ready: config.runtime_dir().join(gatehouse_proxy::READY_FILE),
    };
    if let Some(proxy) = &members.proxy
        && let Err(error) = proxy.replace(hand_over).await
    {
        tracing::error!(%error, "upgrade failed");
        return false;
    }
    match rolling_restart(&members.backends, config).await {
        Ok(()) => {
            tracing::info!("upgrade done");
            true
        }
        Err(error) => {
            tracing::error!(%error, "upgrade: rolling restart of the backends stopped");
            false
        }
    }
}

/// A reload or upgrade, done by the group on a signal, as an audit event.
fn group_event(event: &str, done: bool) -> gatehouse_backend::audit::Event<'_> {
    gatehouse_backend::audit::Event {
        event,
        actor: Some("gatehouse"),
        outcome: if done { "success" } else { "failure" },
        ..Default::default()
    }
}

/// Redis (when managed), then the backends, then the proxy, each waited on until it answers.
async fn start_members(
    config: &Config,
    members: &mut Members,
    metrics: &std::sync::Arc<GroupMetrics>,
) -> Result<()> {
    let exe = std::env::current_exe().map_err(Error::io("cannot find our own executable"))?;
    let config_file = std::fs::canonicalize(&config.file).unwrap_or_else(|_| config.file.clone());
    let mut shared_env: Vec<(String, OsString)> = Vec::new();
    // Only the backends sign and check tokens: the secret goes to them alone.
    let mut backend_env: Vec<(String, OsString)> = Vec::new();
    if config.backend.jwt_secret.is_none() {
        tracing::warn!(
            "no JWT secret configured ({} or backend.jwt_secret_file); using a random one for this run: \
             tokens will not survive a restart",
            config::ENV_JWT_SECRET
        );
        backend_env.push((config::ENV_JWT_SECRET.into(), random_secret().into()));
    }
    if config.redis.url.is_none() {
        let socket = config.managed_redis_socket();
        members.redis = Some(start(redis_spec(config, &socket)?, metrics).await?);
        shared_env.push((
            config::ENV_REDIS_URL.into(),
            format!("unix://{}", socket.display()).into(),
        ));
    }
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
                "--admin-socket".into(),
                config.backend_admin_socket(i).into(),
            ],
            env: [shared_env.clone(), backend_env.clone()].concat(),
            env_remove: Vec::new(),
            probe: Probe::Unix(socket),
            // Out of the proxy's rotation first, then drained: see `gatehouse backend`.
            stop_timeout: crate::serve_backend::lame_duck(config)
                + crate::serve_backend::DRAIN
                + Duration::from_secs(2),
            restart_signal: libc::SIGUSR2,
            ambient_caps: false,
        };
        members.backends.push(start(spec, metrics).await?);
    }
    let proxy = Spec {
        name: "proxy".into(),
        program: exe,
        args: vec!["proxy".into(), "--config".into(), config_file.into()],
        env: shared_env,
        // Never the JWT secret, nor where it is: a proxy that is broken into cannot mint tokens.
        env_remove: config::SECRET_ENV.to_vec(),
        probe: Probe::Tcp(config.proxy.listen),
        stop_timeout: config.proxy.shutdown_grace + Duration::from_secs(5),
        restart_signal: libc::SIGTERM,
        // It binds the public ports: under systemd, 80 and 443 with CAP_NET_BIND_SERVICE.
        ambient_caps: true,
    };
    members.proxy = Some(start(proxy, metrics).await?);
    Ok(())
}

async fn start(spec: Spec, metrics: &std::sync::Arc<GroupMetrics>) -> Result<Running> {
    let mut child = spec.spawn().map_err(Error::io(format!(
        "cannot start {} ({})",
        spec.name,
        spec.program.display()
    )))?;
    if let Err(error) = spec.wait_ready(&mut child, READY_TIMEOUT).await {
        child::stop(&spec.name, &mut child, Stop::Fast, Duration::from_secs(2)).await;
        return Err(error);
    }
    tracing::info!(child = %spec.name, pid = child.id(), "started");
    let (orders, receiver) = watch::channel(Order::Supervise);
    let (pid_sender, pid) = watch::channel(child.id());
    let (replacements, requests) = mpsc::channel(1);
    let name = spec.name.clone();
    let task = tokio::spawn(child::keep_running(
        spec,
        child,
        receiver,
        pid_sender,
        metrics.clone(),
        requests,
    ));
    Ok(Running {
        name,
        orders,
        task,
        pid,
        replacements,
    })
}

fn redis_spec(config: &Config, socket: &Path) -> Result<Spec> {
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
        env_remove: config::SECRET_ENV.to_vec(),
        probe: Probe::Unix(socket.to_path_buf()),
        stop_timeout: Duration::from_secs(10),
        restart_signal: libc::SIGTERM,
        ambient_caps: false,
    })
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("cannot create {}", dir.display())))
}

/// One group per runtime directory: a second `gatehouse run` on the same directory would
/// fight the first over its sockets.
fn lock_runtime_dir(dir: &Path) -> Result<File> {
    let path = dir.join("gatehouse.lock");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(Error::io(format!("cannot open {}", path.display())))?;
    // SAFETY: flock on a descriptor we own; released when the file closes or we exit.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(Error::Runtime(format!(
            "another gatehouse (pid {}) is running with runtime directory {}",
            holder.trim(),
            dir.display()
        )));
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(Error::io(format!("cannot write {}", path.display())))?;
    Ok(file)
}

/// A socket file some process still answers on belongs to someone else: never take it.
async fn refuse_live_socket(path: &Path) -> Result<()> {
    if path.exists() && UnixStream::connect(path).await.is_ok() {
        return Err(Error::Runtime(format!(
            "{} is in use by a running process; is another gatehouse running?",
            path.display()
        )));
    }
    Ok(())
}

fn random_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
