//! Backends found in a directory (`upstream.socket_dir`), as the Swarm stack runs them: the
//! proxy and each backend are processes of their own, and the proxy is never told which
//! backends there are. Backends join, leave (SIGTERM) and die (SIGKILL) under load.

use std::{
    fs,
    path::Path,
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

/// Writes `dir`/gatehouse.toml for backends found in `dir`/sockets (made here, with the
/// static files' directory); returns the proxy's HTTP port, its admin port and the socket
/// directory.
pub(crate) fn write_config(dir: &Path, redis_url: String) -> (u16, u16, std::path::PathBuf) {
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
                "upstream.socket_dir = {:?}\nupstream.health_check_interval = \"200ms\"",
                sockets.display().to_string()
            ),
            ..Options::default()
        },
    );
    (port, admin_port, sockets)
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

#[test]
fn backends_join_and_leave_a_socket_directory_without_a_failed_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let redis = Redis::start(&dir.path().join("redis"));
    let (port, admin_port, sockets) = write_config(dir.path(), redis.url());
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

    // A killed backend leaves its socket: requests go to the others, and the next backend
    // to start removes it.
    let mut b = _b;
    b.0.kill().expect("kill b");
    let _ = b.0.wait();
    assert!(sockets.join("b.sock").exists());
    let ok = (0..20)
        .filter(|_| client.get(&url).send().is_ok_and(|r| r.status() == 200))
        .count();
    assert_eq!(ok, 20, "requests failed with b's socket left behind");
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
    let metrics = reqwest::blocking::get(format!("http://127.0.0.1:{admin_port}/metrics"))
        .and_then(|r| r.text())
        .expect("metrics");
    assert!(metrics.contains(r#"backend="d""#), "no series of d");
}
