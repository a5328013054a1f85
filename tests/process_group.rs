//! The process group: supervision, failover, shutdown, and no orphans.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use serde_json::Value;

use crate::util::{Group, Options, alive, signal, unix_get, wait_until};

#[test]
fn killed_backend_is_restarted_while_requests_keep_succeeding() {
    let group = Group::start(Options::default());
    let victim = group.child_pid("--id b2").expect("backend b2 is running");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let (client, url) = (group.client.clone(), group.url("/api/ping"));
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url).send() {
                        Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();

    assert!(
        wait_until(Duration::from_secs(10), || ok.load(Ordering::Relaxed) > 50),
        "load is flowing"
    );
    let before = ok.load(Ordering::Relaxed);
    signal(victim, libc::SIGKILL);
    let flowing = wait_until(Duration::from_secs(15), || {
        ok.load(Ordering::Relaxed) > before + 200
    });
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        worker.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(
        flowing,
        "requests kept flowing after the kill ({before} -> {ok})"
    );
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed around the kill:\n{}",
        ok + failed,
        group.log()
    );

    // The supervisor starts a new b2, and it rejoins the rotation.
    assert!(
        wait_until(Duration::from_secs(10), || group
            .child_pid("--id b2")
            .is_some_and(|p| p != victim)),
        "b2 was not restarted:\n{}",
        group.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            group
                .get("/api/ping")
                .is_ok_and(|r| r.headers()["x-backend-id"] == "b2")
        }),
        "the restarted b2 never served again"
    );
    assert!(group.log().contains("restarted"), "the restart is logged");
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_then_everything_exits() {
    let mut group = Group::start(Options {
        tls: false,
        backends: 2,
        ..Options::default()
    });
    let members = group.members();
    assert_eq!(
        members.len(),
        4,
        "redis, two backends and the proxy: {members:?}"
    );

    // A login whose body is still arriving when the group is told to stop.
    let body = r#"{"username":"admin","password":"password"}"#;
    let mut stream = TcpStream::connect(("127.0.0.1", group.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    write!(
        stream,
        "POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
        body.len(),
        &body[..10]
    )
    .unwrap();
    // Time for the proxy to read the headers and count the request as in flight.
    thread::sleep(Duration::from_millis(1000));
    signal(group.pid(), libc::SIGTERM);
    thread::sleep(Duration::from_millis(800));
    assert!(
        alive(group.pid()),
        "the group waits for the request in flight"
    );
    stream.write_all(&body.as_bytes()[10..]).unwrap();
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    // Read until the JSON body is complete; the proxy may keep the connection open.
    while !String::from_utf8_lossy(&response).contains("\"token\"") {
        let n = stream.read(&mut buffer).unwrap();
        assert!(
            n > 0,
            "connection closed early: {}",
            String::from_utf8_lossy(&response)
        );
        response.extend_from_slice(&buffer[..n]);
    }
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let status = group.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{}", group.log());
    for pid in members {
        assert!(!alive(pid), "child {pid} outlived the group");
    }
}

#[test]
fn killing_the_supervisor_leaves_no_orphans() {
    let mut group = Group::start(Options {
        backends: 2,
        ..Options::default()
    });
    let members = group.members();
    assert_eq!(members.len(), 4, "{members:?}");
    signal(group.pid(), libc::SIGKILL);
    group.wait_exit(Duration::from_secs(5));
    for pid in members {
        assert!(
            wait_until(Duration::from_secs(10), || !alive(pid)),
            "child {pid} was orphaned"
        );
    }
}

#[test]
fn sigint_stops_the_group_quickly() {
    let mut group = Group::start(Options {
        backends: 2,
        shutdown_grace_seconds: 30,
        ..Options::default()
    });
    let members = group.members();
    signal(group.pid(), libc::SIGINT);
    let started = std::time::Instant::now();
    let status = group.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(130));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    for pid in members {
        assert!(!alive(pid), "child {pid} outlived the group");
    }
}

#[test]
fn stale_sockets_are_replaced_but_a_live_group_is_never_disturbed() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    let socket = group.dir.path().join("run/backend-1.sock");
    let (status, body) = unix_get(&socket, "/healthz").unwrap();
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (health["backend"].as_str(), health["redis"].as_str()),
        (Some("b1"), Some("up"))
    );

    // A second group on the same runtime directory refuses to start and takes nothing.
    let config = group.dir.path().join("gatehouse.toml");
    let output = std::process::Command::new(crate::util::BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env(
            "GATEHOUSE_LISTEN",
            format!("127.0.0.1:{}", crate::util::free_port()),
        )
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("another gatehouse"), "{stderr}");
    assert_eq!(
        unix_get(&socket, "/api/ping").unwrap().0,
        200,
        "the first group still serves"
    );
    drop(group);
}

#[test]
fn a_stale_socket_file_does_not_block_start_up() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    // A socket file nobody listens on, as a crash leaves behind.
    let stale = dir.path().join("run/backend-1.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let group = Group::start_in(
        dir,
        Options {
            backends: 1,
            ..Options::default()
        },
    );
    assert_eq!(group.get("/api/ping").unwrap().status(), 200);
}

#[test]
fn managed_redis_keeps_the_count_across_restarts_of_the_group() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    let token = group.token();
    for _ in 0..3 {
        assert_eq!(group.count(&token).status(), 200);
    }
    let mut group = group;
    assert_eq!(group.restart().code(), Some(0));
    let visits = group.count(&group.token()).json::<Value>().unwrap()["visits"].clone();
    assert_eq!(visits, 4);
}

#[test]
fn a_taken_port_is_a_clear_error_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gatehouse.toml");
    let users = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/users");
    std::fs::write(
        &config,
        format!(
            "[tls]\nlisten = \"off\"\n\n[paths]\nruntime_dir = \"run\"\ndata_dir = \"data\"\n\n[backend]\nusers_file = \"{}\"\n\n[[routes]]\nprefix = \"/api/\"\nupstream = \"backends\"\n",
            users.display()
        ),
    )
    .unwrap();
    let output = std::process::Command::new(crate::util::BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("GATEHOUSE_LISTEN", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert!(!stderr.contains("started"), "nothing was started: {stderr}");
}
