//! The backends under attack: the login guard (no lockout of a user from other addresses, a
//! ceiling per name, no race, a success that takes back only its own charge) and the limits on
//! a backend's own connections (header and idle deadlines, the connection cap), each asserting
//! that the attacker is refused or cut off while an ordinary client is served.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use reqwest::blocking::{Client, Response};
use serde_json::json;

use gatehouse_backend::ConnectionLimits;

use crate::{
    backend_inprocess::Backend,
    util::{Group, Options, PASSWORD, Redis, USER, metric_sum, unix_get, wait_until},
};

fn login(group: &Group, client: &Client, user: &str, password: &str) -> Response {
    client
        .post(group.url("/auth/login"))
        .json(&json!({"username": user, "password": password}))
        .send()
        .unwrap()
}

fn status(response: Response) -> u16 {
    response.status().as_u16()
}

/// The sum of a backend series over every backend, from the group's merged `/metrics`.
fn backend_metric(group: &Group, name: &str, label: &str) -> f64 {
    metric_sum(&group.admin("/metrics").1, name, &[label])
}

/// Two backends on a Redis the test can look into.
fn guarded_group(extra: &str) -> (tempfile::TempDir, Redis, Group) {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let group = Group::start(Options {
        backends: 2,
        redis_url: Some(redis.url()),
        backend_extra: format!("login_failure_window = \"60s\"\n{extra}"),
        ..Options::default()
    });
    (dir, redis, group)
}

#[test]
fn wrong_passwords_from_one_address_do_not_lock_the_user_out_elsewhere() {
    let (_dir, redis, group) = guarded_group(
        "login_max_failures_per_user_per_ip = 3\nlogin_max_failures_per_ip = 20\n\
         login_max_failures_per_user_all_ips = 8\n",
    );
    let attacker = group.client_from("127.0.0.2");
    let user = group.client_from("127.0.0.3");

    // Three wrong guesses at admin from one address: that address is refused, even with the
    // right password, while admin logs in from another address.
    for _ in 0..3 {
        assert_eq!(status(login(&group, &attacker, USER, "wrong")), 401);
    }
    let refused = login(&group, &attacker, USER, PASSWORD);
    assert_eq!(status(refused), 429, "the attacker's address");
    assert_eq!(status(login(&group, &user, USER, PASSWORD)), 200, "admin");
    assert_eq!(
        redis.command(&["GET", "gatehouse:guard:pair:admin|127.0.0.2"]),
        "3"
    );

    // Many addresses reach the ceiling on the name (8 failures): an address admin has not
    // logged in from is refused, one it has logged in from is not.
    for source in ["127.0.0.4", "127.0.0.5"] {
        let client = group.client_from(source);
        for _ in 0..3 {
            let code = status(login(&group, &client, USER, "wrong"));
            assert!(code == 401 || code == 429, "{source}: {code}");
        }
    }
    assert_eq!(redis.command(&["GET", "gatehouse:guard:user:admin"]), "8");
    let new_device = group.client_from("127.0.0.6");
    let response = login(&group, &new_device, USER, PASSWORD);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(status(response), 429, "an unknown address at the ceiling");
    assert_eq!(status(login(&group, &user, USER, PASSWORD)), 200, "known");
    // Other names are not touched by either limit.
    assert_eq!(
        status(login(&group, &new_device, "nobody", "x")),
        401,
        "another name"
    );
    for (limit, at_least) in [("user_per_ip", 1.0), ("user_all_ips", 1.0)] {
        let count = backend_metric(
            &group,
            "gatehouse_backend_login_throttled_total",
            &format!(r#"limit="{limit}""#),
        );
        assert!(count >= at_least, "{limit}: {count}");
    }
}

#[test]
fn parallel_wrong_guesses_cannot_pass_the_limit() {
    let (_dir, redis, group) = guarded_group("login_max_failures_per_user_per_ip = 5\n");
    let codes: Vec<u16> = thread::scope(|scope| {
        let guesses: Vec<_> = (0..40)
            .map(|i| {
                let group = &group;
                scope.spawn(move || {
                    let client = group.client_from("127.0.0.2");
                    status(login(group, &client, USER, &format!("guess-{i}")))
                })
            })
            .collect();
        // Meanwhile admin logs in from another address.
        let user = group.client_from("127.0.0.3");
        assert_eq!(status(login(&group, &user, USER, PASSWORD)), 200);
        guesses.into_iter().map(|g| g.join().unwrap()).collect()
    });
    let wrong = codes.iter().filter(|&&c| c == 401).count();
    let throttled = codes.iter().filter(|&&c| c == 429).count();
    // Every attempt is charged before its hash, atomically: not one guess past the limit.
    assert_eq!((wrong, throttled), (5, 35), "{codes:?}");
    assert_eq!(
        redis.command(&["GET", "gatehouse:guard:pair:admin|127.0.0.2"]),
        "5"
    );
}

#[test]
fn a_success_takes_back_only_its_own_charge() {
    let (_dir, redis, group) = guarded_group("login_max_failures_per_user_per_ip = 3\n");
    let client = group.client_from("127.0.0.2");
    let pair = ["GET", "gatehouse:guard:pair:admin|127.0.0.2"];
    // "Wrong, wrong, right" over and over: the right one no longer wipes the wrong ones.
    assert_eq!(status(login(&group, &client, USER, "wrong")), 401);
    assert_eq!(status(login(&group, &client, USER, "wrong")), 401);
    assert_eq!(status(login(&group, &client, USER, PASSWORD)), 200);
    assert_eq!(redis.command(&pair), "2");
    assert_eq!(redis.command(&["GET", "gatehouse:guard:user:admin"]), "2");
    assert_eq!(redis.command(&["GET", "gatehouse:guard:ip:127.0.0.2"]), "2");
    assert_eq!(status(login(&group, &client, USER, "wrong")), 401);
    assert_eq!(status(login(&group, &client, USER, PASSWORD)), 429);
    assert_eq!(redis.command(&pair), "3");
    // The address is now known for admin, for as long as login_known_address_seconds.
    let ttl: u64 = redis
        .command(&["TTL", "gatehouse:guard:known:admin|127.0.0.2"])
        .parse()
        .unwrap();
    assert!(ttl > 86_400, "known for {ttl} s");
    // Meanwhile another address logs in.
    let other = group.client_from("127.0.0.3");
    assert_eq!(status(login(&group, &other, USER, PASSWORD)), 200);
}

fn limited_group(backend_extra: &str) -> Group {
    Group::start(Options {
        backends: 1,
        tls: false,
        backend_extra: backend_extra.into(),
        ..Options::default()
    })
}

fn socket(group: &Group) -> PathBuf {
    group.dir.path().join("run/backend-1.sock")
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(usize::MAX)
}

/// Waits until the peer closes `stream` (EOF or reset) and returns how long that took, or
/// `None` if it is still open after `limit`.
fn closed_within(stream: &mut UnixStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return None,
            Err(_) => return Some(started.elapsed()),
        }
    }
}

#[test]
fn a_slow_header_is_cut_at_the_deadline_while_others_are_served() {
    let group = limited_group("header_timeout = \"1s\"\n");
    let socket = socket(&group);
    // A header trickled one byte every 100 ms never ends; nor does a silent connection's.
    let connected = Instant::now();
    let mut slow = UnixStream::connect(&socket).unwrap();
    let mut silent = UnixStream::connect(&socket).unwrap();
    slow.write_all(b"GET /api/ping HTTP/1.1\r\nHost: backend\r\n")
        .unwrap();
    let mut writer = slow.try_clone().unwrap();
    let trickle = thread::spawn(move || {
        for _ in 0..50 {
            if writer.write_all(b"X").is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    // Meanwhile the backend serves, directly and through the proxy.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(unix_get(&socket, "/api/ping").unwrap().0, 200);
    assert_eq!(group.get("/api/ping").unwrap().status(), 200);

    closed_within(&mut slow, Duration::from_secs(5)).expect("slow header cut");
    let slow_cut = connected.elapsed();
    closed_within(&mut silent, Duration::from_secs(1)).expect("silent cut");
    let silent_cut = connected.elapsed();
    // Both about one second after they connected (a quarter of it late at most, and some
    // slack for a loaded machine).
    for cut in [slow_cut, silent_cut] {
        assert!(
            cut > Duration::from_millis(900) && cut < Duration::from_millis(3000),
            "{cut:?}"
        );
    }
    trickle.join().unwrap();
    assert_eq!(group.get("/api/ping").unwrap().status(), 200);
    let cut = backend_metric(
        &group,
        "gatehouse_backend_connection_limits_total",
        r#"limit="header_timeout""#,
    );
    assert!(cut >= 2.0, "{cut}");
}

/// A backend served in this process with limits no config would pass (a 1 s idle deadline,
/// below the proxy's pool idle time), for deadlines too long to wait for through the group.
/// Its Redis is `redis` (by default unreachable: `/api/ping` needs none), each call waiting at
/// most `deadline`.
fn own_backend(limits: ConnectionLimits, redis: Option<String>, deadline: Duration) -> Backend {
    let redis = redis.unwrap_or_else(|| "redis://127.0.0.1:1".into());
    let nobody = gatehouse_backend::Users::parse("", "users").unwrap();
    Backend::start(limits, redis, deadline, nobody)
}

fn limit_count(backend: &Backend, limit: &str) -> f64 {
    let label = format!(r#"limit="{limit}""#);
    backend.metric("gatehouse_backend_connection_limits_total", &[&label])
}

#[test]
fn a_header_begun_while_a_request_is_handled_is_due_from_the_requests_end() {
    // A Redis that accepts connections and never answers: a login waits its deadline for it.
    let silent_redis = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let redis = format!("redis://{}", silent_redis.local_addr().unwrap());
    let backend = own_backend(
        ConnectionLimits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            ..Default::default()
        },
        Some(redis),
        Duration::from_millis(800),
    );
    let mut stream = UnixStream::connect(&backend.socket).unwrap();
    let body = r#"{"username":"admin","password":"password"}"#;
    write!(
        stream,
        "POST /auth/login HTTP/1.1\r\nHost: backend\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // While the login waits for Redis, the start of a next request, never finished.
    thread::sleep(Duration::from_millis(200));
    stream
        .write_all(b"GET /api/ping HTTP/1.1\r\nHost: backend\r\n")
        .unwrap();
    let response = read_response(&mut stream);
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    let answered = Instant::now();
    // Cut at the header deadline from the login's end, not kept for the idle one.
    closed_within(&mut stream, Duration::from_secs(5)).expect("the half header is cut");
    let cut = answered.elapsed();
    assert!(
        cut > Duration::from_millis(700) && cut < Duration::from_millis(2500),
        "{cut:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || limit_count(
            &backend,
            "header_timeout"
        ) >= 1.0),
        "not counted"
    );
    // Meanwhile, and after, the backend serves.
    assert_eq!(unix_get(&backend.socket, "/api/ping").unwrap().0, 200);
}

/// Reads one whole response (with a `Content-Length`) from `stream`.
fn read_response(stream: &mut UnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let complete = |response: &[u8]| {
        let text = String::from_utf8_lossy(response).to_ascii_lowercase();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap();
        body.len() >= length
    };
    while !complete(&response) {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the response");
        response.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&response).into_owned()
}

#[test]
fn idle_connections_are_closed_after_the_idle_deadline() {
    let backend = own_backend(
        ConnectionLimits {
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(1),
            ..Default::default()
        },
        None,
        Duration::from_millis(100),
    );
    let mut stream = UnixStream::connect(&backend.socket).unwrap();
    stream
        .write_all(b"GET /api/ping HTTP/1.1\r\nHost: backend\r\n\r\n")
        .unwrap();
    // The response, then nothing more: the connection stays kept alive until the deadline.
    assert!(read_response(&mut stream).starts_with("HTTP/1.1 200"));
    let closed = closed_within(&mut stream, Duration::from_secs(5)).expect("idle close");
    assert!(
        closed > Duration::from_millis(700) && closed < Duration::from_millis(2500),
        "{closed:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || limit_count(
            &backend,
            "idle_timeout"
        ) >= 1.0),
        "not counted"
    );
    // A connection is served again and again, each request before the deadline.
    let mut stream = UnixStream::connect(&backend.socket).unwrap();
    for _ in 0..3 {
        stream
            .write_all(b"GET /api/ping HTTP/1.1\r\nHost: backend\r\n\r\n")
            .unwrap();
        assert!(read_response(&mut stream).starts_with("HTTP/1.1 200"));
        thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(limit_count(&backend, "idle_timeout"), 1.0);
}

#[test]
fn a_connection_flood_waits_past_the_cap_and_the_descriptors_return() {
    // The least a backend may take with one request in flight from the proxy: 1 + the
    // proxy's idle pool (128) + 8 for health checks.
    let cap = 137;
    let group = Group::start(Options {
        backends: 1,
        tls: false,
        keys: "upstream.max_connections = 1".into(),
        backend_extra: format!("max_connections = {cap}\nheader_timeout = \"1s\"\n"),
        ..Options::default()
    });
    let socket = socket(&group);
    let backend = group.child_pid("--id b1 ").expect("b1");
    assert_eq!(group.get("/api/ping").unwrap().status(), 200);
    let baseline = open_files(backend);

    // Silent connections, twice the cap: the backend holds at most the cap of them.
    let flood: Vec<UnixStream> = (0..cap * 2)
        .map(|_| UnixStream::connect(&socket).unwrap())
        .collect();
    let mut most = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        most = most.max(open_files(backend));
        thread::sleep(Duration::from_millis(20));
    }
    // The proxy's pooled connection or a health check may come and go.
    assert!(
        most <= baseline + cap + 2,
        "{most} descriptors open, {baseline} before"
    );
    assert!(most + 2 >= baseline + cap, "the flood never filled the cap");
    let waited = backend_metric(
        &group,
        "gatehouse_backend_connection_limits_total",
        r#"limit="max_connections""#,
    );
    assert!(waited >= 1.0, "{waited}");

    // The flood gives up: everyone is served again, and the descriptors return.
    drop(flood);
    assert!(
        wait_until(Duration::from_secs(5), || {
            group.get("/api/ping").is_ok_and(|r| r.status() == 200)
        }),
        "not served after the flood"
    );
    assert_eq!(unix_get(&socket, "/api/ping").unwrap().0, 200);
    assert!(
        wait_until(Duration::from_secs(5), || open_files(backend)
            <= baseline + 1),
        "{} descriptors open, {baseline} before",
        open_files(backend)
    );
}

/// A login sent straight to a backend's socket, as the proxy would send it for `client`.
fn socket_login(socket: &std::path::Path, client: &str, user: &str, password: &str) -> u16 {
    let body = json!({"username": user, "password": password}).to_string();
    let request = format!(
        "POST /auth/login HTTP/1.1\r\nHost: backend\r\nX-Real-IP: {client}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    crate::util::unix_request(socket, &request, Duration::from_secs(30))
        .map_or(0, |(status, _)| status)
}

#[test]
fn attempts_that_reach_no_verdict_are_not_failures() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start(dir.path());
    let group = Group::start(Options {
        backends: 1,
        tls: false,
        redis_url: Some(redis.url()),
        backend_extra: "login_max_failures_per_user_per_ip = 1000\n\
                        login_max_failures_per_ip = 1000\n\
                        login_max_failures_per_user_all_ips = 1000\n"
            .into(),
        ..Options::default()
    });
    let socket = socket(&group);
    // More guesses at once than the backend's two hashing slots get through in the 2 s a
    // login may wait: the late ones get 503 unchecked.
    let codes: Vec<u16> = thread::scope(|scope| {
        let guesses: Vec<_> = (0..400)
            .map(|i| {
                let socket = &socket;
                scope.spawn(move || socket_login(socket, "198.51.100.7", USER, &format!("g{i}")))
            })
            .collect();
        guesses.into_iter().map(|g| g.join().unwrap()).collect()
    });
    let wrong = codes.iter().filter(|&&c| c == 401).count();
    let busy = codes.iter().filter(|&&c| c == 503).count();
    eprintln!("{wrong} wrong, {busy} busy");
    assert_eq!(wrong + busy, codes.len(), "{codes:?}");
    assert!(busy > 0, "every guess was checked; nothing was busy");
    // Only the guesses that were checked count.
    assert_eq!(
        redis.command(&["GET", "gatehouse:guard:pair:admin|198.51.100.7"]),
        wrong.to_string()
    );
}

/// Sends a login's header and then its body a byte every `every`, on `stream`, until the body
/// is done or the peer stops reading. The declared body never completes in time.
fn trickle_login<S: Write + Send + 'static>(
    mut stream: S,
    every: Duration,
) -> thread::JoinHandle<()> {
    let body = br#"{"username":"admin","password":"password"}"#;
    let head = format!(
        "POST /auth/login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    thread::spawn(move || {
        for byte in body {
            if stream.write_all(&[*byte]).is_err() {
                return;
            }
            thread::sleep(every);
        }
    })
}

#[test]
fn a_body_that_trickles_in_gets_408_at_the_deadline_while_others_log_in() {
    let group = Group::start(Options {
        backends: 1,
        tls: false,
        backend_extra: "body_timeout = \"1500ms\"\n".into(),
        ..Options::default()
    });
    // Through the proxy: it passes the body on as it comes, each byte well within its own
    // per-read body deadline.
    let started = Instant::now();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", group.port)).unwrap();
    let trickle = trickle_login(client.try_clone().unwrap(), Duration::from_millis(200));
    // Meanwhile others log in.
    for _ in 0..3 {
        assert_eq!(group.login(USER, PASSWORD).status(), 200);
    }
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut response = String::new();
    let _ = client.read_to_string(&mut response);
    let answered = started.elapsed();
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        response.contains(r#""error":"request_timeout""#),
        "{response}"
    );
    assert!(response.contains(r#""request_id""#), "{response}");
    assert!(
        answered > Duration::from_millis(1400) && answered < Duration::from_secs(5),
        "{answered:?}"
    );
    trickle.join().unwrap();

    // Straight to the backend: the same, and the backend closes the connection after it.
    let mut direct = UnixStream::connect(socket(&group)).unwrap();
    let started = Instant::now();
    let trickle = trickle_login(direct.try_clone().unwrap(), Duration::from_millis(200));
    let response = read_response(&mut direct);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    closed_within(&mut direct, Duration::from_secs(2)).expect("closed after the 408");
    let answered = started.elapsed();
    assert!(answered < Duration::from_secs(5), "{answered:?}");
    trickle.join().unwrap();

    assert_eq!(group.login(USER, PASSWORD).status(), 200);
    let timeouts = backend_metric(
        &group,
        "gatehouse_backend_connection_limits_total",
        r#"limit="body_timeout""#,
    );
    assert!(timeouts >= 2.0, "{timeouts}");
}
