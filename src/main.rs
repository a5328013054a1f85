//! `gatehouse`: one binary for the whole edge deployment.
//!
//! - `run`: the process group (see [`supervisor`]).
//! - `proxy`, `backend`: the group's members, also runnable on their own.
//! - `check`: validate a config file. `hash-password`: make a users-file entry.
//! - `cert`: write a self-signed development certificate.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 bad config or usage.

use std::{io::Read, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use gatehouse::{
    Error, Result, certs,
    config::{self, Config},
    serve_backend, supervisor,
};

mod allocator;

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "An edge server in one binary: proxy, backends and Redis as one process group."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole group: managed Redis, the backends and the proxy.
    Run(ConfigArg),
    /// Validate the config file and everything it points at; exit 2 on error.
    Check(ConfigArg),
    /// Check the config, then have the running group apply it (SIGHUP to the supervisor):
    /// routes, access rules, static roots, logs and certificates without dropping a
    /// connection; backends restart one at a time if their settings changed.
    Reload(ConfigArg),
    /// Have the running group move to the binary now on disk without refusing a connection
    /// (SIGUSR2 to the supervisor): a new proxy takes the listening sockets over, then the
    /// backends restart one at a time.
    Upgrade(ConfigArg),
    /// Run the edge proxy alone (making a self-signed certificate when there is none, as
    /// `run` does).
    Proxy {
        #[command(flatten)]
        config: ConfigArg,
        /// Take the listening sockets over from the running proxy, which hands them over
        /// when it gets SIGQUIT (a zero-downtime binary upgrade).
        #[arg(long)]
        upgrade: bool,
    },
    /// Run one backend on a Unix socket: the one given, or (without --socket) ID.sock in
    /// `upstream.socket_dir`, where the proxy finds it, with its metrics on ID.metrics.
    Backend {
        #[command(flatten)]
        config: ConfigArg,
        /// The Unix socket to listen on.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// The name this backend reports in `X-Backend-Id`; default: `b1` with --socket, the
        /// host name (a container's id) in the socket directory.
        #[arg(long, env = "GATEHOUSE_BACKEND_ID")]
        id: Option<String>,
        /// A second Unix socket, serving the backend's metrics at `/metrics`.
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Ask the running group's admin listener whether it is alive (or, with --ready, ready);
    /// exit 0 if so, 1 if not. For container health checks.
    Healthcheck {
        #[command(flatten)]
        config: ConfigArg,
        /// Ask `/readyz` (backends and Redis ready) instead of `/healthz` (alive).
        #[arg(long)]
        ready: bool,
        /// Ask this container's backend (`gatehouse backend` in `upstream.socket_dir`) on its
        /// socket instead of the admin listener.
        #[arg(long, conflicts_with = "ready")]
        backend: bool,
    },
    /// Read a password on stdin and print its argon2id hash for the users file
    /// (`name:HASH:role`).
    HashPassword,
    /// Write a self-signed ECDSA P-256 certificate and key to the paths in `[tls]`.
    Cert {
        #[command(flatten)]
        config: ConfigArg,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The config file.
    #[arg(
        long,
        short,
        env = "GATEHOUSE_CONFIG",
        default_value = "conf/gatehouse.toml"
    )]
    config: PathBuf,
}

impl ConfigArg {
    /// Loads the config and sets up logging as it says.
    fn load(&self) -> Result<Config> {
        let config = Config::load(&self.config)?;
        init_logging(config.proxy.json_logs);
        Ok(config)
    }
}

#[global_allocator]
static ALLOCATOR: allocator::PerProcess = allocator::PerProcess;

fn main() -> ExitCode {
    if allocator::invalid_choice() {
        eprintln!(
            "gatehouse: config error: environment variable {}: expected \"system\" or \"mimalloc\"",
            allocator::VARIABLE
        );
        return ExitCode::from(2);
    }
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(arg) => arg
            .load()
            .and_then(|config| ensure_certificate(&config))
            .and_then(|()| validate(&arg))
            .and_then(|(config, _)| {
                refuse_socket_dir(&config)?;
                supervisor::run(config)
            }),
        Command::Check(arg) => check(&arg),
        Command::Reload(arg) => {
            validate(&arg).and_then(|(config, _)| signal_group(&config, libc::SIGHUP))
        }
        Command::Upgrade(arg) => arg
            .load()
            .and_then(|config| signal_group(&config, libc::SIGUSR2)),
        Command::Proxy { config, upgrade } => config.load().and_then(|loaded| {
            allocator::start_returning_free_pages();
            // As `run` does: alone (a container of its own), the proxy is the one to make it.
            if !upgrade {
                ensure_certificate(&loaded)?;
            }
            let file = config.config.clone();
            // SIGHUP: the same checks as `gatehouse check`, then the new settings.
            let load: gatehouse_proxy::live::LoadSettings = Box::new(move || {
                Config::load(&file)
                    .and_then(Config::into_proxy_settings)
                    .map_err(|e| e.to_string())
            });
            let allocator = if allocator::on_mimalloc() {
                gatehouse_proxy::heap::Allocator::Mimalloc
            } else {
                gatehouse_proxy::heap::Allocator::Glibc
            };
            gatehouse_proxy::run(
                loaded.into_proxy_settings()?,
                Some(load),
                upgrade,
                allocator,
            )
            .map(|stopped| match stopped {
                gatehouse_proxy::Stopped::Graceful => 0,
                gatehouse_proxy::Stopped::Fast => 130,
            })
            .map_err(Error::from)
        }),
        Command::Backend {
            config,
            socket,
            id,
            admin_socket,
        } => config.load().and_then(|config| {
            let (sockets, id) = backend_sockets(&config, socket, id, admin_socket)?;
            serve_backend::run(&config, &sockets, id)
        }),
        Command::Healthcheck {
            config,
            ready,
            backend,
        } => config.load().and_then(|config| {
            if backend {
                backend_healthcheck(&config)
            } else {
                healthcheck(&config, ready)
            }
        }),
        Command::HashPassword => hash_password(),
        Command::Cert { config, force } => config.load().and_then(|config| cert(&config, force)),
    };
    match outcome {
        Ok(code) => ExitCode::from(code as u8),
        Err(error @ Error::Config(_)) => {
            eprintln!("gatehouse: config error: {error}");
            ExitCode::from(error.exit_code())
        }
        Err(error) => {
            eprintln!("gatehouse: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Loads the config and what it names (the users file), without starting anything. `run`
/// calls it too, so a group never starts half-way on a config that `check` would refuse.
fn validate(arg: &ConfigArg) -> Result<(Config, gatehouse_backend::Users)> {
    Ok(config::check(arg.load()?)?)
}

/// `gatehouse run` starts its own backends on sockets it names.
fn refuse_socket_dir(config: &Config) -> Result<()> {
    match &config.proxy.pool.socket_dir {
        Some(_) => Err(config
            .error_at(
                "upstream.socket_dir",
                "`gatehouse run` starts its own backends; a socket directory is for \
                 `gatehouse proxy` and `gatehouse backend` run apart (unset it, or \
                 GATEHOUSE_SOCKET_DIR)"
                    .into(),
            )
            .into()),
        None => Ok(()),
    }
}

/// Where `gatehouse backend` listens, and its name.
fn backend_sockets(
    config: &Config,
    socket: Option<PathBuf>,
    id: Option<String>,
    admin_socket: Option<PathBuf>,
) -> Result<(serve_backend::Sockets, String)> {
    if let Some(socket) = socket {
        let sockets = serve_backend::Sockets {
            socket,
            admin_socket,
            published: false,
        };
        return Ok((sockets, id.unwrap_or_else(|| "b1".into())));
    }
    let Some(dir) = &config.proxy.pool.socket_dir else {
        return Err(Error::Runtime(
            "--socket is needed unless upstream.socket_dir (GATEHOUSE_SOCKET_DIR) is set".into(),
        ));
    };
    let id = in_dir_id(id)?;
    Ok((serve_backend::Sockets::in_dir(dir, &id), id))
}

/// A backend's name in the socket directory: given, or the host name, which is unique per
/// container (Docker names a container's host after its id).
fn in_dir_id(id: Option<String>) -> Result<String> {
    let id = match id {
        Some(id) => id,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_err(Error::io("cannot read the host name"))?
            .trim()
            .to_string(),
    };
    if !gatehouse_proxy::socket_dir::valid_name(&id) {
        return Err(Error::Runtime(format!(
            "backend id {id:?}: 1 to 64 letters, digits, '-' or '_' (it names a socket file)"
        )));
    }
    Ok(id)
}

/// `/healthz` of this container's backend, on its socket: 0 if it answers 200, 1 if not.
fn backend_healthcheck(config: &Config) -> Result<i32> {
    let Some(dir) = &config.proxy.pool.socket_dir else {
        return Err(config
            .error_at(
                "upstream.socket_dir",
                "--backend asks a backend in the socket directory, and none is set".into(),
            )
            .into());
    };
    let id = in_dir_id(std::env::var("GATEHOUSE_BACKEND_ID").ok())?;
    let socket = serve_backend::Sockets::in_dir(dir, &id).socket;
    let answer = (|| -> std::io::Result<String> {
        use std::io::{Read, Write};
        let deadline = std::time::Duration::from_secs(5);
        let mut stream = std::os::unix::net::UnixStream::connect(&socket)?;
        stream.set_read_timeout(Some(deadline))?;
        stream.set_write_timeout(Some(deadline))?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })();
    report("/healthz", &socket.display().to_string(), answer)
}

fn ensure_certificate(config: &Config) -> Result<()> {
    let Some(tls) = &config.proxy.tls else {
        return Ok(());
    };
    if config::certificate_missing(tls) {
        certs::generate(&tls.cert, &tls.key, &config.server_names)?;
        tracing::warn!(
            cert = %tls.cert.display(), key = %tls.key.display(),
            "no TLS certificate configured; made a self-signed one (browsers will warn)"
        );
    }
    Ok(())
}

fn cert(config: &Config, force: bool) -> Result<i32> {
    let Some(tls) = &config.proxy.tls else {
        return Err(config
            .error_at("tls.listen", "HTTPS is off: no certificate to write".into())
            .into());
    };
    if !force && (tls.cert.exists() || tls.key.exists()) {
        return Err(Error::Runtime(format!(
            "{} or {} exists already; use --force to replace them",
            tls.cert.display(),
            tls.key.display()
        )));
    }
    certs::generate(&tls.cert, &tls.key, &config.server_names)?;
    println!(
        "wrote {} and {} (self-signed, 365 days)",
        tls.cert.display(),
        tls.key.display()
    );
    Ok(0)
}

fn check(arg: &ConfigArg) -> Result<i32> {
    let (config, users) = validate(arg)?;
    let tls = match &config.proxy.tls {
        None => "tls off".to_string(),
        Some(tls) if config::certificate_missing(tls) => {
            format!(
                "tls on {}, certificate to be generated by `gatehouse run`",
                tls.listen
            )
        }
        Some(tls) => format!("tls on {}", tls.listen),
    };
    let backends = match &config.proxy.pool.socket_dir {
        Some(dir) => format!("backends found in {}", dir.display()),
        None => format!("{} backends", config.backend.count),
    };
    println!(
        "{}: ok ({} routes, {backends}, {} users, redis {}, {tls})",
        config.file.display(),
        config.proxy.routes.len(),
        seeded_users(&config, &users),
        config.redis.url.as_deref().unwrap_or("managed"),
    );
    Ok(0)
}

/// The users Redis is seeded with: the file's, and `admin` when the admin password adds it.
fn seeded_users(config: &Config, users: &gatehouse_backend::Users) -> usize {
    let adds_admin = config.backend.admin_password.is_some()
        && !users
            .seed
            .iter()
            .any(|u| u.name == gatehouse_backend::users::ADMIN);
    users.len() + usize::from(adds_admin)
}

fn hash_password() -> Result<i32> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(Error::io("cannot read stdin"))?;
    let password = input.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(Error::Runtime("empty password on stdin".into()));
    }
    let hash = gatehouse_backend::password::hash_password(password)
        .map_err(|e| Error::Runtime(e.to_string()))?;
    println!("{hash}");
    Ok(0)
}

/// Signals the supervisor of the group running with this config (its pid is in the lock file).
fn signal_group(config: &Config, signal: libc::c_int) -> Result<i32> {
    let lock = config.runtime_dir().join("gatehouse.lock");
    // The running supervisor holds the lock; if we can take it, nobody does, and the pid in
    // the file may belong to some unrelated process by now.
    let held = std::fs::File::open(&lock).is_ok_and(|file| {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor we own; closing the file releases what we took.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
    });
    if !held {
        return Err(Error::Runtime(format!(
            "no running group holds {} (is `gatehouse run` running with this config?)",
            lock.display()
        )));
    }
    let pid = std::fs::read_to_string(&lock)
        .ok()
        .and_then(|text| text.trim().parse::<libc::pid_t>().ok())
        .filter(|pid| *pid > 0)
        .ok_or_else(|| {
            Error::Runtime(format!(
                "no running group: {} holds no pid (is `gatehouse run` running with this config?)",
                lock.display()
            ))
        })?;
    // SAFETY: kill(2) with a pid read from our lock file; signal 0 only checks it exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return Err(Error::Runtime(format!(
            "no running group: pid {pid} from {} is gone",
            lock.display()
        )));
    }
    // SAFETY: as above.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(Error::Runtime(format!(
            "cannot signal pid {pid}: {}",
            std::io::Error::last_os_error()
        )));
    }
    let what = if signal == libc::SIGHUP {
        "reload"
    } else {
        "upgrade"
    };
    println!("{what} requested from the group (pid {pid}); its log says how it went");
    Ok(0)
}

/// Application logs on stderr, as text or JSON lines; `RUST_LOG` sets the level.
fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // `try_init`: a second load (run validates twice) keeps the first subscriber.
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// One GET to the admin listener, with a short deadline: 0 on a 200, 1 otherwise.
fn healthcheck(config: &Config, ready: bool) -> Result<i32> {
    use std::io::{Read, Write};
    let Some(mut addr) = config.proxy.admin_listen else {
        return Err(config
            .error_at("admin.listen", "the admin listener is off".into())
            .into());
    };
    // A wildcard listen address is reached through loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let path = if ready { "/readyz" } else { "/healthz" };
    let deadline = std::time::Duration::from_secs(5);
    let answer = (|| -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, deadline)?;
        stream.set_read_timeout(Some(deadline))?;
        stream.set_write_timeout(Some(deadline))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    })();
    report(path, &format!("the admin listener on {addr}"), answer)
}

/// Prints a health check's outcome; 0 on a 200, 1 otherwise.
fn report(path: &str, whom: &str, answer: std::io::Result<String>) -> Result<i32> {
    match answer {
        Ok(response) if response.starts_with("HTTP/1.1 200") => {
            println!("{path}: ok");
            Ok(0)
        }
        Ok(response) => {
            let status = response.lines().next().unwrap_or_default();
            let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
            println!("{path}: {status} {body}");
            Ok(1)
        }
        Err(error) => {
            println!("{path}: cannot reach {whom}: {error}");
            Ok(1)
        }
    }
}
