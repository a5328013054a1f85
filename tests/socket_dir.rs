//! Backends found in a directory (`upstream.socket_dir`), as the Swarm stack runs them: the
//! proxy and each backend are processes of their own, and the proxy is never told which
//! backends there are. Backends join, leave (SIGTERM) and die (SIGKILL) under load.

use std::{
    fs,
    io::{Read, Write},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use crate::util::{self, BIN, Options, Process, Redis, SECRET, free_ports, signal, wait_until};

fn backend(dir: &Path, id: &str) -> Process {
    util::start_alone(dir, &["backend", "--id", id], &format!("backend-{id}.log"))
}

/// The backend ids that answer /api/ping among `tries` requests.
fn answering(client: &reqwest::blocking::Client, url: &str, tries: usize) -> Vec<String> {
    let mut ids: Vec<String> = (0..tries)
        .filter_map(|_| client.get(url).send().ok())
        .filter(|r| r.status() == 200)
        .filter_map(|r| Some(r.headers().get("x-backend-id")?.to_str().ok()?.to_string()))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// A config in `dir` for a proxy finding its backends in `dir/sockets`, checked every 200 ms,
/// with `keys` added; returns the socket directory and the HTTP and admin ports.
pub(crate) fn socket_dir_config(dir: &Path, redis_url: String, keys: &str) -> (PathBuf, u16, u16) {
    socket_dir_config_with_routes(dir, redis_url, keys, String::new())
}

/// [`socket_dir_config`], with `routes` (`[[routes]]` tables) after the base's.
pub(crate) fn socket_dir_config_with_routes(
    dir: &Path,
    redis_url: String,
    keys: &str,
    routes: String,
) -> (PathBuf, u16, u16) {
    let sockets = dir.join("sockets");
    fs::create_dir_all(&sockets).expect("socket dir");
    fs::create_dir_all(dir.join("files")).expect("files dir");
    let [port, admin_port] = free_ports();
    util::write_config(
        dir,
        port,
        None,
        admin_port,
        &Options {
            tls: false,
            redis_url: Some(redis_url),
            keys: format!(
                "upstream.socket_dir = {:?}\nupstream.health_check_interval = \"200ms\"\n{keys}",
                sockets.display().to_string()
            ),
            extra: routes,
            ..Options::default()
        },
    );
    (sockets, port, admin_port)
}

/// `gatehouse proxy` on the config in `dir`, once it answers `GET path` with `200` through a
/// backend of the test's own.
pub(crate) fn start_proxy(dir: &Path, port: u16, path: &str) -> util::Process {
    let proxy = util::start_alone(dir, &["proxy"], "proxy.log");
    let request = format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
    let up = || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && crate::drills::exchange(port, request.as_bytes())
                .0
                .contains(" 200 ")
    };
    assert!(
        wait_until(Duration::from_secs(10), up),
        "the proxy did not serve {path} through the backend: {}",
        fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
    );
    proxy
}

/// The admin listener's /metrics, or nothing while it does not answer.
fn admin_metrics(admin_port: u16) -> String {
    reqwest::blocking::get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .and_then(|r| r.text())
        .unwrap_or_default()
}

#[test]
fn backends_join_and_leave_a_socket_directory_without_a_failed_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let redis = Redis::start(&dir.path().join("redis"));
    let (sockets, port, admin_port) = socket_dir_config(dir.path(), redis.url(), "");
    // `gatehouse run` starts its own backends and refuses a socket directory.
    let run = Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("gatehouse.toml"))
        .env("GATEHOUSE_JWT_SECRET", SECRET)
        .output()
        .expect("gatehouse run");
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("upstream.socket_dir"),
        "{run:?}"
    );

    let _proxy = util::start_alone(dir.path(), &["proxy"], "proxy.log");
    let mut a = backend(dir.path(), "a");
    let _b = backend(dir.path(), "b");
    let url = format!("http://127.0.0.1:{port}/api/ping");
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    assert!(
        wait_until(Duration::from_secs(15), || answering(&client, &url, 8)
            == ["a", "b"]),
        "a and b did not both answer: {:?}",
        answering(&client, &url, 8)
    );
    // A second backend with a name in use is refused, and leaves the first one serving.
    let mut twin = backend(dir.path(), "a");
    let status = twin.0.wait().expect("wait");
    assert_eq!(status.code(), Some(1), "a second backend `a` started");

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, sent, failed, url, client) = (
                stop.clone(),
                sent.clone(),
                failed.clone(),
                url.clone(),
                client.clone(),
            );
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let ok = client.get(&url).send().is_ok_and(|r| r.status() == 200);
                    sent.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    // A new backend joins by itself; one stopped with SIGTERM leaves before it closes.
    let _c = backend(dir.path(), "c");
    assert!(
        wait_until(Duration::from_secs(15), || answering(&client, &url, 12)
            == ["a", "b", "c"]),
        "c did not join"
    );
    signal(a.0.id(), libc::SIGTERM);
    let exited = a.0.wait().expect("wait for a");
    assert!(exited.success(), "a: {exited:?}");
    assert!(!sockets.join("a.sock").exists(), "a left its socket");
    assert!(
        wait_until(Duration::from_secs(5), || answering(&client, &url, 12)
            == ["b", "c"]),
        "a still answers"
    );
    stop.store(true, Ordering::Relaxed);
    load.into_iter()
        .for_each(|t| t.join().expect("load thread"));
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(sent > 100, "only {sent} requests sent");
    assert_eq!(failed, 0, "{failed} of {sent} requests failed");

    // A killed backend leaves its socket: requests go to the others, the proxy leaves the
    // socket out once it refuses a connection (its metrics too), and the next backend to
    // start removes it.
    let mut b = _b;
    b.0.kill().expect("kill b");
    let _ = b.0.wait();
    assert!(sockets.join("b.sock").exists());
    let ok = (0..20)
        .filter(|_| client.get(&url).send().is_ok_and(|r| r.status() == 200))
        .count();
    assert_eq!(ok, 20, "requests failed with b's socket left behind");
    // Its past errors stay counted; its place in the pool (and its scrape) goes.
    let metrics = || admin_metrics(admin_port);
    let in_pool = r#"gatehouse_backend_up{backend="b"}"#;
    assert!(
        wait_until(Duration::from_secs(5), || !metrics().contains(in_pool)),
        "b's dead socket is still in the pool"
    );
    let proxy_log = fs::read_to_string(dir.path().join("proxy.log")).expect("proxy log");
    assert!(
        proxy_log.contains("refuses connections"),
        "no log line for b's dead socket"
    );
    let _d = backend(dir.path(), "d");
    assert!(
        wait_until(Duration::from_secs(15), || answering(&client, &url, 12)
            == ["c", "d"]),
        "d did not join"
    );
    assert!(
        !sockets.join("b.sock").exists(),
        "b's socket was not removed"
    );
    // The admin listener scrapes the backends it found.
    assert!(metrics().contains(r#"backend="d""#), "no series of d");
    // A new backend b: a new socket at the path that refused is a backend again.
    let _b = backend(dir.path(), "b");
    assert!(
        wait_until(Duration::from_secs(15), || answering(&client, &url, 12)
            == ["b", "c", "d"]),
        "the new b did not join"
    );
}

/// Answers every connection on `listener` with `body` as an HTTP response, then closes it.
fn serve_text(listener: UnixListener, body: &'static str) {
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// Whoever writes in the socket directory gets no more than upstream.socket_dir_max_backends
/// backends, and cannot point the admin listener's scrape at another socket by a symbolic link.
#[test]
fn a_socket_directory_is_capped_and_its_links_are_not_followed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (sockets, _, admin_port) = socket_dir_config(
        dir.path(),
        "redis://127.0.0.1:1".into(),
        "upstream.socket_dir_max_backends = 3",
    );
    // Five sockets that listen (and never answer): three are taken, by name.
    let _listeners: Vec<UnixListener> = (1..=5)
        .map(|i| UnixListener::bind(sockets.join(format!("e{i}.sock"))).expect("bind"))
        .collect();
    // e1's metrics "socket" is a link to a socket elsewhere; e2's is a socket.
    let elsewhere = dir.path().join("elsewhere.sock");
    serve_text(
        UnixListener::bind(&elsewhere).expect("bind"),
        "leaked_series 1\n",
    );
    std::os::unix::fs::symlink(&elsewhere, sockets.join("e1.metrics")).expect("symlink");
    serve_text(
        UnixListener::bind(sockets.join("e2.metrics")).expect("bind"),
        "# TYPE real_series gauge\nreal_series 1\n",
    );
    let _proxy = util::start_alone(dir.path(), &["proxy"], "proxy.log");
    let metrics = || admin_metrics(admin_port);
    assert!(
        wait_until(Duration::from_secs(15), || metrics()
            .contains("real_series 1")),
        "e2's metrics were not scraped: {}",
        metrics()
    );
    let text = metrics();
    // Up or not (they never answer a health check): which backends the pool has.
    let mut pool: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("gatehouse_backend_up{backend=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    pool.sort();
    assert_eq!(pool, ["e1", "e2", "e3"], "{text}");
    assert!(
        !text.contains("leaked_series"),
        "a symbolic link was followed"
    );
    let log = fs::read_to_string(dir.path().join("proxy.log")).expect("proxy log");
    assert!(
        log.contains("upstream.socket_dir_max_backends"),
        "the sockets left out were not logged: {log}"
    );
}
