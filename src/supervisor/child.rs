//! One supervised child process: how to start it, how to tell it is ready, how to stop it,
//! and the loop that restarts it with backoff when it dies.

use std::{
    ffi::OsString,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitStatus,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpStream, UnixStream},
    process::{Child, Command},
    sync::{mpsc, oneshot, watch},
    time::sleep,
};

use super::metrics::GroupMetrics;
use crate::{Error, Result};

/// How the group is being stopped; each child maps it to its own signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: finish what is in flight.
    Graceful,
    /// SIGINT: stop now.
    Fast,
}

/// What the supervisor wants of one child, sent over a watch channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Keep it running: restart it when it exits.
    Supervise,
    /// The group is going down: leave it running, but do not restart it if it exits.
    NoRestart,
    Stop(Stop),
}

/// Where a child answers once it is ready.
#[derive(Debug, Clone)]
pub enum Probe {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Probe {
    async fn answers(&self) -> bool {
        match self {
            Probe::Unix(path) => UnixStream::connect(path).await.is_ok(),
            Probe::Tcp(addr) => TcpStream::connect(reachable(*addr)).await.is_ok(),
        }
    }
}

/// A wildcard listen address is reached through loopback.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub env: Vec<(String, OsString)>,
    /// Variables of the supervisor's own environment the child must not inherit.
    pub env_remove: Vec<&'static str>,
    pub probe: Probe,
    /// How long a graceful stop may take before the child is killed.
    pub stop_timeout: Duration,
    /// The signal that stops it for a planned restart (backends: SIGUSR2, which first takes
    /// them out of the proxy's rotation).
    pub restart_signal: libc::c_int,
    /// Whether it keeps the supervisor's ambient capabilities (systemd's
    /// `AmbientCapabilities=`). Only the proxy binds privileged ports; the rest start with
    /// none, so a backend broken into cannot bind port 80 either.
    pub ambient_caps: bool,
}

/// A planned replacement of a running child, with its outcome sent back on `done`.
#[derive(Debug)]
pub struct Replace {
    pub how: Replacement,
    pub done: oneshot::Sender<Result<()>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replacement {
    /// Stop it with its restart signal, start it again, wait until it answers.
    Restart,
    /// The proxy: start a new one that takes the listening sockets over, then tell the old
    /// one (SIGQUIT) to hand them over and drain. No connection is refused meanwhile.
    HandOver {
        /// Where the new proxy listens for the sockets.
        socket: PathBuf,
        /// Where the new proxy writes its pid once it holds them.
        ready: PathBuf,
    },
}

impl Spec {
    pub fn spawn(&self) -> io::Result<Child> {
        self.spawn_with(&[])
    }

    fn spawn_with(&self, extra: &[&str]) -> io::Result<Child> {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .args(extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        for name in &self.env_remove {
            command.env_remove(name);
        }
        // Own process group: a Ctrl-C in the terminal reaches only the supervisor, which
        // then stops the children in order.
        command.process_group(0);
        // A child whose handle is dropped on an unexpected path is killed, never left behind.
        command.kill_on_drop(true);
        let parent = std::process::id() as libc::pid_t;
        let ambient_caps = self.ambient_caps;
        // SAFETY: only async-signal-safe calls (prctl, getppid, raise) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // If the supervisor dies, even by SIGKILL, the kernel stops its children:
                // no orphans. The signal is tied to the spawning thread, which is why the
                // supervisor runs on a single-threaded runtime.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::raise(libc::SIGTERM);
                }
                // Ambient capabilities survive exec for an unprivileged user; cleared, the
                // child runs with none. A kernel without them (before 4.3) has none to clear,
                // hence the result ignored.
                if !ambient_caps {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_CLEAR_ALL,
                        0,
                        0,
                        0,
                    );
                }
                Ok(())
            });
        }
        command.spawn()
    }

    /// Waits until the child answers on its probe; fails if it exits or takes too long.
    pub async fn wait_ready(&self, child: &mut Child, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.probe.answers().await {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::Runtime(format!(
                    "{} exited before it was ready ({status})",
                    self.name
                )));
            }
            if Instant::now() >= deadline {
                return Err(Error::Runtime(format!(
                    "{} was not ready within {timeout:?}",
                    self.name
                )));
            }
            sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Signals `child` and waits for it; kills it when it outlasts `timeout`.
pub async fn stop(name: &str, child: &mut Child, how: Stop, timeout: Duration) {
    let signal = match how {
        Stop::Graceful => libc::SIGTERM,
        Stop::Fast => libc::SIGINT,
    };
    stop_with(name, child, signal, timeout).await;
}

async fn stop_with(name: &str, child: &mut Child, signal: libc::c_int, timeout: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: plain kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => tracing::info!(child = name, status = %describe(status), "stopped"),
        Err(_) => {
            tracing::warn!(child = name, ?timeout, "did not stop in time; killing");
            let _ = child.kill().await;
        }
    }
}

/// Keeps `child` running until told to stop: restarts it with exponential backoff when it
/// exits, and stops it with the requested signal when the group goes down. Its current pid
/// goes to `pid`, so signals can be forwarded to it.
pub async fn keep_running(
    spec: Spec,
    mut child: Child,
    mut orders: watch::Receiver<Order>,
    pid: watch::Sender<Option<u32>>,
    metrics: Arc<GroupMetrics>,
    mut replacements: mpsc::Receiver<Replace>,
) {
    metrics.started(&spec.name);
    let mut failures: u32 = 0;
    let mut started = Instant::now();
    // The proxy an upgrade replaced, finishing its requests.
    let mut retiring: Option<Child> = None;
    loop {
        tokio::select! {
            status = wait_for(&mut retiring) => {
                tracing::info!(child = %spec.name, status = %describe(status), "the replaced process exited");
                retiring = None;
            }
            status = child.wait() => {
                metrics.exited(&spec.name);
                let _ = pid.send(None);
                if *orders.borrow() != Order::Supervise {
                    tracing::info!(child = %spec.name, status = %describe(status), "exited while the group stops");
                    return;
                }
                // A child that ran for a while earns a fresh backoff.
                if started.elapsed() > Duration::from_secs(10) {
                    failures = 0;
                }
                tracing::warn!(child = %spec.name, status = %describe(status), "child exited; restarting");
                loop {
                    let delay = backoff(failures);
                    failures += 1;
                    tokio::select! {
                        () = sleep(delay) => {}
                        _ = orders.changed() => return,
                    }
                    match spec.spawn() {
                        Ok(c) => {
                            tracing::info!(child = %spec.name, pid = c.id(), restarts = failures, after = ?delay, "restarted");
                            metrics.restarted(&spec.name);
                            let _ = pid.send(c.id());
                            child = c;
                            started = Instant::now();
                            break;
                        }
                        Err(error) => tracing::error!(child = %spec.name, %error, "restart failed"),
                    }
                }
            }
            Some(Replace { how, done }) = replacements.recv() => {
                let outcome = replace(&spec, &mut child, &mut retiring, how).await;
                let _ = pid.send(child.id());
                if outcome.is_ok() {
                    started = Instant::now();
                }
                let _ = done.send(outcome);
            }
            changed = orders.changed() => {
                let order = if changed.is_ok() { *orders.borrow() } else { Order::Stop(Stop::Fast) };
                if let Order::Stop(how) = order {
                    stop(&spec.name, &mut child, how, spec.stop_timeout).await;
                    // A replaced proxy still finishing requests goes before the backends do.
                    if let Some(mut old) = retiring.take() {
                        stop(&spec.name, &mut old, how, spec.stop_timeout).await;
                    }
                    metrics.exited(&spec.name);
                    return;
                }
            }
        }
    }
}

/// Waits for a replaced process to exit; never, when there is none.
async fn wait_for(retiring: &mut Option<Child>) -> io::Result<ExitStatus> {
    match retiring {
        Some(child) => child.wait().await,
        None => std::future::pending().await,
    }
}

/// A planned replacement; on failure the child is left for the restart loop to bring back.
async fn replace(
    spec: &Spec,
    child: &mut Child,
    retiring: &mut Option<Child>,
    how: Replacement,
) -> Result<()> {
    match how {
        Replacement::Restart => {
            stop_with(&spec.name, child, spec.restart_signal, spec.stop_timeout).await;
            let mut fresh = spec
                .spawn()
                .map_err(Error::io(format!("cannot start {}", spec.name)))?;
            let ready = spec.wait_ready(&mut fresh, Duration::from_secs(15)).await;
            *child = fresh;
            ready?;
            tracing::info!(child = %spec.name, pid = child.id(), "restarted as planned");
            Ok(())
        }
        Replacement::HandOver { socket, ready } => {
            if retiring.is_some() {
                return Err(Error::Runtime(
                    "the previous upgrade is still finishing".into(),
                ));
            }
            let _ = std::fs::remove_file(&socket);
            let _ = std::fs::remove_file(&ready);
            let mut fresh = spec
                .spawn_with(&["--upgrade"])
                .map_err(Error::io(format!("cannot start the new {}", spec.name)))?;
            let pid = fresh.id().map(|p| p.to_string()).unwrap_or_default();
            // Only once the new one listens for the sockets may the old one send them.
            let listening = poll(&mut fresh, Duration::from_secs(10), || socket.exists()).await;
            if let Err(error) = listening {
                let _ = fresh.kill().await;
                return Err(error);
            }
            if let Some(old) = child.id() {
                // SAFETY: plain kill(2) on a child we spawned and have not reaped.
                unsafe { libc::kill(old as libc::pid_t, libc::SIGQUIT) };
            }
            // From here the old one is leaving whatever happens: it finishes its requests
            // and exits, and is stopped with the group if that comes first.
            *retiring = Some(std::mem::replace(child, fresh));
            poll(child, Duration::from_secs(20), || {
                std::fs::read_to_string(&ready).is_ok_and(|text| text.trim() == pid)
            })
            .await?;
            tracing::info!(child = %spec.name, pid = child.id(), "the new process holds the sockets");
            Ok(())
        }
    }
}

/// Checks `done` every 50 ms until it holds; fails if `child` exits or time runs out.
async fn poll(child: &mut Child, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::Runtime(format!("the new process exited ({status})")));
        }
        if Instant::now() >= deadline {
            return Err(Error::Runtime(format!(
                "the new process was not ready within {timeout:?}"
            )));
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// 100 ms, doubling, at most 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(5))
}

fn describe(status: io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(error) => format!("unknown ({error})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_caps() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(10), Duration::from_secs(5));
    }

    #[test]
    fn wildcard_addresses_probe_loopback() {
        assert_eq!(
            reachable("0.0.0.0:80".parse().unwrap()),
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(
            reachable("[::]:80".parse().unwrap()),
            "[::1]:80".parse().unwrap()
        );
    }
}
