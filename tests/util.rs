//! The end-to-end harness: starts the real `gatehouse` binary (and, when a test wants one, a
//! real external `redis-server`) on free ports in a temporary directory, and tears it all
//! down when the test ends, passed or failed.

use std::{
    fs,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use serde_json::Value;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");
/// The secret every test group signs with, so tests can forge tokens against it.
pub const SECRET: &str = "test-secret-0123456789abcdef-0123456789abcdef";
pub const USER: &str = "admin";
pub const PASSWORD: &str = "password";

pub fn free_port() -> u16 {
    let [port] = free_ports();
    port
}

/// `N` distinct free ports. Every listener is held until all are picked: the kernel may hand
/// a port that was just closed out again at once, and one group given the same port twice
/// refuses its own config.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: [TcpListener; N] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"));
    listeners.map(|listener| listener.local_addr().expect("local addr").port())
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        sleep(Duration::from_millis(50));
    }
    check()
}

pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

pub fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); /proc tells the truth about its state.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Direct children of `pid` with their command lines.
pub fn children(pid: u32) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return found;
    };
    for task in tasks.flatten() {
        let list = fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for child in list
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let cmdline = fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            found.push((child, cmdline));
        }
    }
    found
}

/// A test's own Redis, on a free TCP port with an append-only file in its own directory.
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Redis {
    pub fn start(dir: &Path) -> Redis {
        fs::create_dir_all(dir).expect("redis dir");
        let mut redis = Redis {
            port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and data directory.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "yes", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for the tests");
        self.child = Some(child);
        let port = self.port;
        assert!(
            wait_until(Duration::from_secs(10), || redis_ping(port)),
            "redis-server did not start"
        );
    }

    /// SIGTERM: Redis writes its append-only file and exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Redis {
    /// One command, answered as text: a simple string, an integer, a bulk string, `(nil)`,
    /// or the error line. Enough for tests to look at what the backends stored.
    pub fn command(&self, args: &[&str]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request += &format!("${}\r\n{arg}\r\n", arg.len());
        }
        stream.write_all(request.as_bytes()).expect("send to redis");
        let mut reader = std::io::BufReader::new(stream);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("redis reply");
        let line = line.trim_end().to_string();
        match line.split_at(1) {
            ("$", "-1") => "(nil)".into(),
            ("$", len) => {
                let mut bulk = vec![0; len.parse::<usize>().expect("bulk length") + 2];
                reader.read_exact(&mut bulk).expect("bulk string");
                String::from_utf8_lossy(&bulk[..bulk.len() - 2]).into_owned()
            }
            ("+" | ":", rest) => rest.to_string(),
            _ => line,
        }
    }
}

fn redis_ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    stream.write_all(b"PING\r\n").is_ok()
        && stream.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

/// A group of `backends` on an external Redis the test can stop and restart. Keep the
/// directory (Redis's data) alive as long as Redis.
pub fn group_with_own_redis(backends: usize) -> (tempfile::TempDir, Redis, Group) {
    let data = tempfile::tempdir().expect("temp dir");
    let redis = Redis::start(data.path());
    let group = Group::start(Options {
        backends,
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    (data, redis, group)
}

/// How a test wants its group.
pub struct Options {
    /// HTTPS on a second port, plain HTTP redirecting to it; `false`: plain HTTP only.
    pub tls: bool,
    pub backends: usize,
    /// `None`: gatehouse manages its own Redis.
    pub redis_url: Option<String>,
    pub shutdown_grace_seconds: u64,
    /// Extra environment for `gatehouse run`.
    pub env: Vec<(String, String)>,
    /// Keys set over the base config, as TOML with dotted keys from the top
    /// (`limits.send_timeout = "1s"`); each replaces what the base sets.
    pub keys: String,
    /// `[logging] access_log`: `logs/access.log` unless a test says otherwise (`"off"`).
    pub access_log: String,
    /// Keys set in the `[logging]` table.
    pub logging_extra: String,
    /// Keys set in the `[backend]` table.
    pub backend_extra: String,
    /// Keys set in the `[static]` table (the base checks files at every request).
    pub static_extra: String,
    /// More TOML merged in: `[rate_limits.*]` tables, more `[[routes]]` (after the base's).
    pub extra: String,
    /// The HTTP, HTTPS and admin ports, when a test must know them before the group starts
    /// (another server is told them); free ones otherwise.
    pub ports: Option<[u16; 3]>,
    /// A client certificate and its key (PEM) for the group's own client to present, for a
    /// listener that requires one.
    pub client_identity: Option<Vec<u8>>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            tls: true,
            backends: 3,
            redis_url: None,
            shutdown_grace_seconds: 5,
            env: Vec::new(),
            keys: String::new(),
            access_log: "logs/access.log".into(),
            logging_extra: String::new(),
            backend_extra: String::new(),
            static_extra: String::new(),
            extra: String::new(),
            ports: None,
            client_identity: None,
        }
    }
}

/// A config file built key by key: a base, then keys set or merged over it, so a test can
/// change any key the base sets.
pub struct ConfigBuilder {
    table: toml::Table,
}

impl ConfigBuilder {
    pub fn new(base: &str) -> Self {
        Self {
            table: base.parse().expect("the base config is TOML"),
        }
    }

    /// Sets `key`, a dotted path (`limits.header_timeout`), making its tables as needed.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let (path, last) = key
            .rsplit_once('.')
            .map_or((None, key), |(p, l)| (Some(p), l));
        let mut table = &mut self.table;
        for part in path.into_iter().flat_map(|p| p.split('.')) {
            table = table
                .entry(part)
                .or_insert_with(|| toml::Table::new().into())
                .as_table_mut()
                .unwrap_or_else(|| panic!("{part} in {key} is not a table"));
        }
        table.insert(last.to_string(), value.into());
        self
    }

    /// Merges TOML in key by key: tables are merged, arrays of tables appended, anything
    /// else replaced. `under`: the table the keys belong to (`backend`), or the top.
    pub fn merge(mut self, text: &str, under: Option<&str>) -> Self {
        let mut snippet: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("not TOML: {e}\n{text}"));
        if let Some(section) = under {
            let mut outer = toml::Table::new();
            outer.insert(section.to_string(), snippet.into());
            snippet = outer;
        }
        merge(&mut self.table, snippet);
        self
    }

    pub fn text(&self) -> String {
        toml::to_string(&self.table).expect("a TOML table writes")
    }
}

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(old)), toml::Value::Table(new)) => merge(old, new),
            (Some(toml::Value::Array(old)), toml::Value::Array(new))
                if new.iter().all(toml::Value::is_table) =>
            {
                old.extend(new)
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// A process a test started on its own (`gatehouse proxy`, a backend), killed when the test
/// ends, passed or failed.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `gatehouse ARGS --config DIR/gatehouse.toml` on its own (not a group), its output in
/// `DIR/LOG`.
pub fn start_alone(dir: &Path, args: &[&str], log: &str) -> Process {
    let log = fs::File::create(dir.join(log)).expect("log file");
    let child = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(dir.join("gatehouse.toml"))
        .env("GATEHOUSE_JWT_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("start gatehouse");
    Process(child)
}

/// A running `gatehouse run`.
pub struct Group {
    pub dir: TempDir,
    /// The plain HTTP listener.
    pub port: u16,
    /// The HTTPS listener, when TLS is on.
    pub tls_port: Option<u16>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_port: u16,
    pub child: Child,
    pub client: reqwest::blocking::Client,
    env: Vec<(String, String)>,
    identity: Option<Vec<u8>>,
}

impl Group {
    pub fn start(options: Options) -> Group {
        let dir = tempfile::tempdir().expect("temp dir");
        Group::start_in(dir, options)
    }

    /// Starts in an existing directory (which may hold a previous run's leftovers).
    pub fn start_in(dir: TempDir, options: Options) -> Group {
        fs::create_dir_all(dir.path().join("files")).expect("files dir");
        let mut group = Group {
            dir,
            port: 0,
            tls_port: None,
            admin_port: 0,
            child: Command::new("true").spawn().expect("placeholder child"),
            client: reqwest::blocking::Client::new(),
            env: options.env.clone(),
            identity: options.client_identity.clone(),
        };
        // Tests run in parallel: a free port can be taken before the group binds it.
        for _ in 0..3 {
            let [port, tls_port, admin_port] = options.ports.unwrap_or_else(free_ports);
            group.port = port;
            group.tls_port = options.tls.then_some(tls_port);
            group.admin_port = admin_port;
            write_config(
                group.dir.path(),
                group.port,
                group.tls_port,
                group.admin_port,
                &options,
            );
            if options.tls && !group.dir.path().join("certs/gatehouse.crt").exists() {
                let status = Command::new(BIN)
                    .args(["cert", "--config"])
                    .arg(group.dir.path().join("gatehouse.toml"))
                    .status()
                    .expect("gatehouse cert");
                assert!(status.success(), "gatehouse cert failed");
            }
            group.client = group.http_client(false);
            let _ = group.child.wait();
            group.child = spawn(group.dir.path(), &group.env);
            match group.wait_ready() {
                Ok(()) => return group,
                Err(log) if log.contains("cannot listen on") => continue,
                Err(log) => panic!("{log}"),
            }
        }
        panic!("no free port after three tries:\n{}", group.log());
    }

    /// A client that trusts the group's certificate (and presents `Options::client_identity`),
    /// does not follow redirects and does not decompress (tests look at the bytes). `http1_only` pins HTTP/1.1; otherwise ALPN
    /// offers HTTP/2.
    pub fn http_client(&self, http1_only: bool) -> reqwest::blocking::Client {
        let mut builder = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .use_rustls_tls();
        if self.tls_port.is_some() {
            let pem = fs::read(self.dir.path().join("certs/gatehouse.crt")).expect("certificate");
            let cert = reqwest::Certificate::from_pem(&pem).expect("PEM certificate");
            builder = builder.add_root_certificate(cert);
        }
        if http1_only {
            builder = builder.http1_only();
        }
        if let Some(pem) = &self.identity {
            builder = builder.identity(reqwest::Identity::from_pem(pem).expect("PEM identity"));
        }
        builder.build().expect("http client")
    }

    /// A client whose connections come from `source` (another loopback address, such as
    /// 127.0.0.2), so the server sees a different client.
    pub fn client_from(&self, source: &str) -> reqwest::blocking::Client {
        let mut builder = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .use_rustls_tls()
            .local_address(source.parse::<std::net::IpAddr>().expect("source address"));
        if let Some(port) = self.tls_port {
            let pem = fs::read(self.dir.path().join("certs/gatehouse.crt")).expect("certificate");
            builder = builder
                .add_root_certificate(
                    reqwest::Certificate::from_pem(&pem).expect("PEM certificate"),
                )
                .resolve("localhost", ([127, 0, 0, 1], port).into());
        }
        builder.build().expect("http client")
    }

    /// Where requests go: HTTPS when TLS is on.
    pub fn base(&self) -> String {
        match self.tls_port {
            Some(port) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// SIGTERM, wait for a clean exit, then start again on the same directory and port.
    pub fn restart(&mut self) -> ExitStatus {
        signal(self.pid(), libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(20));
        self.child = spawn(self.dir.path(), &self.env);
        if let Err(log) = self.wait_ready() {
            panic!("{log}");
        }
        status
    }

    /// Ready means our supervisor says so and the proxy answers. Checking the log too keeps a
    /// test from mistaking another test's group on a reused port for its own.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "gatehouse exited during start-up ({status}):\n{}",
                    self.log()
                ));
            }
            if self.log().contains("gatehouse is up")
                && self.get("/api/ping").is_ok_and(|r| r.status() == 200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("gatehouse not ready in time:\n{}", self.log()));
            }
            sleep(Duration::from_millis(100));
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// The plain HTTP listener, whatever TLS does.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A GET to the admin listener: status and body.
    pub fn admin(&self, path: &str) -> (u16, String) {
        let response =
            reqwest::blocking::get(format!("http://127.0.0.1:{}{path}", self.admin_port))
                .expect("admin listener");
        (
            response.status().as_u16(),
            response.text().expect("admin body"),
        )
    }

    /// The value of one sample in the admin listener's `/metrics`, e.g.
    /// `gatehouse_denied_total{route="/close/"}`; `None` when the series is absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.admin("/metrics").1, series)
    }

    pub fn get(&self, path: &str) -> reqwest::Result<reqwest::blocking::Response> {
        self.client.get(self.url(path)).send()
    }

    pub fn login(&self, user: &str, password: &str) -> reqwest::blocking::Response {
        self.client
            .post(self.url("/auth/login"))
            .json(&serde_json::json!({"username": user, "password": password}))
            .send()
            .expect("login request")
    }

    /// A valid token for the shipped development user.
    pub fn token(&self) -> String {
        self.token_for(USER, PASSWORD)
    }

    /// A token for `user`, who must be able to log in. A `503` (Redis slow to answer, or every
    /// password check slot busy, on a loaded machine) says to try again after `Retry-After`,
    /// and is tried again a few times, as a client would.
    pub fn token_for(&self, user: &str, password: &str) -> String {
        let mut response = self.login(user, password);
        for _ in 0..5 {
            if response.status() != 503 {
                break;
            }
            let wait = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1)
                .min(2);
            sleep(Duration::from_secs(wait));
            response = self.login(user, password);
        }
        assert_eq!(response.status(), 200, "login of {user}");
        let body: Value = response.json().expect("login JSON");
        body["token"].as_str().expect("token").to_string()
    }

    /// A request to `path` with `token` as its bearer, and a JSON body when given.
    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> reqwest::blocking::Response {
        let mut request = self
            .client
            .request(method, self.url(path))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        request.send().expect("API request")
    }

    pub fn count(&self, token: &str) -> reqwest::blocking::Response {
        self.client
            .get(self.url("/api/count"))
            .bearer_auth(token)
            .send()
            .expect("count request")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pids of the group's children: Redis, the backends, the proxy.
    pub fn members(&self) -> Vec<u32> {
        children(self.pid())
            .into_iter()
            .map(|(pid, _)| pid)
            .collect()
    }

    /// The pid of the child whose command line contains `needle` (e.g. `--id b2`).
    pub fn child_pid(&self, needle: &str) -> Option<u32> {
        children(self.pid())
            .into_iter()
            .find(|(_, cmd)| cmd.contains(needle))
            .map(|(pid, _)| pid)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("gatehouse.log")).unwrap_or_default()
    }

    /// Waits for the supervisor to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gatehouse did not exit in time:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), libc::SIGINT);
            if !wait_until(Duration::from_secs(10), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            }) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

fn spawn(dir: &Path, env: &[(String, String)]) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("gatehouse.log"))
        .expect("log file");
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.join("gatehouse.toml"))
        .env("GATEHOUSE_JWT_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("start gatehouse")
}

/// The sum of every sample of `name` whose labels contain all of `parts` (e.g.
/// `r#"outcome="refused""#`), over every backend.
pub fn metric_sum(text: &str, name: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The value of `series` (name and labels exactly as exposed) in a Prometheus text page.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// What every test group shares; [`write_config`] sets the ports and paths of each.
const BASE_CONFIG: &str = r#"
[proxy]
threads = 2

[upstream]
health_check_interval = "200ms"

[access]
# Load tests must not be throttled; access tests set their own limits.
default_rate_limit = "off"

[tls]
cert = "certs/gatehouse.crt"
key = "certs/gatehouse.key"

[static]
max_cached_file_bytes = 65536
check_interval = "0s"

[paths]
runtime_dir = "run"
data_dir = "data"

[[routes]]
prefix = "/api/"
upstream = "backends"

[[routes]]
prefix = "/auth/"
upstream = "backends"

[[routes]]
prefix = "/files/"
static_dir = "files"
cache_control = "max-age=60"
"#;

pub fn write_config(
    dir: &Path,
    port: u16,
    tls_port: Option<u16>,
    admin_port: u16,
    options: &Options,
) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let statics = repo.join("static");
    let mut config = ConfigBuilder::new(BASE_CONFIG)
        .set("proxy.listen", format!("127.0.0.1:{port}"))
        .set(
            "proxy.shutdown_grace",
            format!("{}s", options.shutdown_grace_seconds),
        )
        .set(
            "tls.listen",
            tls_port.map_or("off".into(), |p| format!("127.0.0.1:{p}")),
        )
        .set("admin.listen", format!("127.0.0.1:{admin_port}"))
        .set("logging.access_log", options.access_log.clone())
        .set("backend.count", options.backends as i64)
        .set(
            "backend.users_file",
            repo.join("conf/users").display().to_string(),
        )
        .set(
            "redis.url",
            options.redis_url.clone().unwrap_or("managed".into()),
        );
    // The shipped sites, with the security headers the shipped config gives them.
    for (prefix, site, cache_control) in [
        ("/open/", "open", None),
        ("/close/", "close", None),
        ("/swagger/", "swagger", None),
        ("/admin/", "admin", Some("no-cache")),
        ("/", "main", Some("no-cache")),
    ] {
        let cache_control = cache_control
            .map(|c| format!("cache_control = \"{c}\"\n"))
            .unwrap_or_default();
        let mut route: toml::Table = format!(
            "prefix = \"{prefix}\"\nstatic_dir = \"{}\"\n{cache_control}security_headers = true\n",
            statics.join(site).display()
        )
        .parse()
        .expect("a route");
        // The shipped route's own header rules (the console's stricter policy), as shipped.
        if let Some(rules) = shipped_route(prefix).and_then(|r| r.get("response_headers").cloned())
        {
            route.insert("response_headers".into(), rules);
        }
        let mut routes = toml::Table::new();
        routes.insert("routes".into(), vec![toml::Value::Table(route)].into());
        config = config.merge(&toml::to_string(&routes).expect("TOML"), None);
    }
    let config = config
        .merge(&options.keys, None)
        .merge(&options.logging_extra, Some("logging"))
        .merge(&options.backend_extra, Some("backend"))
        .merge(&options.static_extra, Some("static"))
        .merge(&options.extra, None);
    let path = dir.join("gatehouse.toml");
    fs::write(&path, config.text()).expect("write config");
    path
}

/// The route with `prefix` in the shipped `conf/gatehouse.toml`.
fn shipped_route(prefix: &str) -> Option<toml::Table> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = fs::read_to_string(repo.join("conf/gatehouse.toml")).ok()?;
    let config: toml::Table = text.parse().ok()?;
    config
        .get("routes")?
        .as_array()?
        .iter()
        .filter_map(toml::Value::as_table)
        .find(|r| r.get("prefix").and_then(toml::Value::as_str) == Some(prefix))
        .cloned()
}

/// `openssl x509 -noout X509_ARGS` of the certificate the HTTPS port presents to a client
/// asking for `sni` (`-ext subjectAltName`, `-issuer -serial`); empty when no handshake.
pub fn served_certificate(port: u16, sni: &str, x509_args: &[&str]) -> String {
    let output = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", sni])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&output.stdout);
    let Some(pem) = text
        .split_once("-----BEGIN CERTIFICATE-----")
        .and_then(|(_, rest)| rest.split_once("-----END CERTIFICATE-----"))
        .map(|(body, _)| format!("-----BEGIN CERTIFICATE-----{body}-----END CERTIFICATE-----\n"))
    else {
        return String::new();
    };
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout"])
        .args(x509_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl x509");
    x509.stdin
        .take()
        .expect("stdin")
        .write_all(pem.as_bytes())
        .expect("write");
    let out = x509.wait_with_output().expect("openssl x509");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One HTTP/1.1 GET straight to a backend's Unix socket; returns status and body.
pub fn unix_get(socket: &Path, path: &str) -> std::io::Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n");
    unix_request(socket, &request, Duration::from_secs(5))
}

/// Sends raw `request` to a backend's socket and reads until it closes: the status and body.
pub fn unix_request(
    socket: &Path,
    request: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Sends raw request bytes to a plain-HTTP listener and returns the whole response as text
/// (the request must ask for `Connection: close`). For requests no HTTP library would send.
pub fn raw_http(port: u16, request: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    String::from_utf8_lossy(&response).into_owned()
}

pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(bytes), &mut plain)
        .expect("gzip body");
    plain
}

pub fn unbrotli(bytes: &[u8]) -> Vec<u8> {
    let mut plain = Vec::new();
    brotli::BrotliDecompress(&mut &bytes[..], &mut plain).expect("brotli body");
    plain
}

pub fn unzstd(bytes: &[u8]) -> Vec<u8> {
    zstd::stream::decode_all(bytes).expect("zstd body")
}

/// Asserts the status, and that an error has the one error shape; returns the body (`Null` for
/// an empty one).
pub fn expect(response: reqwest::blocking::Response, status: u16, what: &str) -> Value {
    let code = response.status().as_u16();
    let request_id = response.headers().get("x-request-id").cloned();
    let text = response.text().unwrap();
    assert_eq!(code, status, "{what}: {text}");
    if text.is_empty() {
        return Value::Null;
    }
    let body: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: {text}"));
    if status >= 400 {
        assert!(body["error"].is_string(), "{what}: {body}");
        assert!(body["message"].is_string(), "{what}: {body}");
        let request_id = request_id.expect("x-request-id");
        assert_eq!(body["request_id"], request_id.to_str().unwrap(), "{what}");
    }
    body
}

/// A request read by a test's own HTTP/1.1 server.
pub struct Request {
    pub line: String,
    /// Each header line's name in lower case, and its value trimmed, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// Every value of the header `name` (lower case).
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The next request on a connection a test's server reads (its body by `Content-Length`);
/// `None` once the connection ends.
pub fn read_request(reader: &mut impl std::io::BufRead) -> Option<Request> {
    let (mut line, mut request) = (String::new(), None::<Request>);
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
        match &mut request {
            None => {
                request = Some(Request {
                    line: line.trim_end().to_owned(),
                    headers: Vec::new(),
                    body: Vec::new(),
                })
            }
            Some(request) => {
                if let Some((name, value)) = line.split_once(':') {
                    let pair = (name.to_ascii_lowercase(), value.trim().to_owned());
                    request.headers.push(pair);
                }
            }
        }
        line.clear();
    }
    let mut request = request?;
    let length = request
        .values("content-length")
        .next()
        .and_then(|v| v.parse().ok());
    request.body = vec![0u8; length.unwrap_or(0)];
    reader.read_exact(&mut request.body).ok()?;
    Some(request)
}
