//! Failure drills: what a client sees when a backend hangs or dies, when requests are
//! oversized, slow or try to smuggle a second request past the proxy, and when connections
//! flood in. Each says what may fail and what may not. (Redis restarting is in `redis.rs`; reloads and upgrades in `operations.rs`.)

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::util::{self, Group, Options, metric_sum, wait_until};

/// Sends raw bytes to the plain listener; returns what came back and whether the proxy
/// closed the connection (within 3 s).
pub(crate) fn exchange(port: u16, request: &[u8]) -> (String, bool) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream.write_all(request).expect("send");
    let mut response = Vec::new();
    let mut buffer = [0u8; 8192];
    let closed = loop {
        match stream.read(&mut buffer) {
            Ok(0) => break true,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&response).into_owned(), closed)
}

pub(crate) fn plain_group(backends: usize, keys: &str) -> Group {
    Group::start(Options {
        tls: false,
        backends,
        keys: keys.into(),
        ..Options::default()
    })
}

/// Requests for /api/ping that the backends answered, from their own counters.
fn pings_at_backends(group: &Group) -> f64 {
    metric_sum(
        &group.admin("/metrics").1,
        "gatehouse_backend_http_requests_total",
        &[r#"endpoint="ping""#],
    )
}

#[test]
fn smuggling_probes_get_400_and_a_closed_connection_and_reach_no_backend() {
    let group = plain_group(1, "");
    let smuggled = "GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n";
    let probes: [(&str, String); 8] = [
        (
            "Content-Length with Transfer-Encoding",
            format!(
                "POST /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "two different lengths",
            format!(
                "POST /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 38\r\n\r\n{smuggled}"
            ),
        ),
        (
            "two equal lengths",
            format!(
                "POST /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "a signed length",
            format!("POST /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n{smuggled}"),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            format!(
                "POST /api/ping HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "an unknown transfer coding",
            format!(
                "POST /api/ping HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{smuggled}"
            ),
        ),
        (
            "obs-fold",
            format!("GET /api/ping HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n{smuggled}"),
        ),
        (
            "bare LF line ends",
            format!("GET /api/ping HTTP/1.1\nHost: x\n\n{smuggled}"),
        ),
    ];
    let before = pings_at_backends(&group);
    for (name, probe) in &probes {
        let (response, closed) = exchange(group.port, probe.as_bytes());
        assert!(response.starts_with("HTTP/1.1 400 "), "{name}: {response}");
        let body: serde_json::Value =
            serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap_or_default())
                .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {response}"));
        assert_eq!(body["error"], "bad_request", "{name}: {response}");
        assert!(
            body["request_id"].as_str().is_some_and(|id| !id.is_empty()),
            "{name}: {response}"
        );
        assert_eq!(
            response.matches("HTTP/1.1 ").count(),
            1,
            "{name}: a second response means a smuggled request was served: {response}"
        );
        assert!(closed, "{name}: the connection stayed open");
    }
    assert_eq!(
        pings_at_backends(&group),
        before,
        "a probe reached a backend"
    );
    // A well-formed request still works, and the count above does move when one arrives.
    let (response, _) = exchange(
        group.port,
        b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert_eq!(pings_at_backends(&group), before + 1.0);
    // A comma list of lengths is refused too.
    let (response, closed) = exchange(
        group.port,
        b"POST /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0, 0\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    assert!(closed);
}

#[test]
fn oversized_headers_get_431_and_oversized_bodies_413_even_chunked() {
    let group = plain_group(
        1,
        "limits.max_body_bytes = 4096\nlimits.max_header_bytes = 8192\nlimits.max_headers = 50",
    );
    let many: String = (0..60).map(|i| format!("X-Field-{i}: y\r\n")).collect();
    let (response, closed) = exchange(
        group.port,
        format!("GET /api/ping HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    );
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
    assert!(
        response.contains(r#""error":"headers_too_large""#),
        "{response}"
    );
    assert!(closed);
    let big = "a".repeat(10_000);
    let (response, _) = exchange(
        group.port,
        format!("GET /api/ping HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    );
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");

    // Announced: refused before the body is read.
    let (response, closed) = exchange(
        group.port,
        b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 413 "), "{response}");
    assert!(response.contains(r#""request_id""#), "{response}");
    assert!(closed);
    // Chunked: refused once the body passes the limit.
    let chunk = format!("800\r\n{}\r\n", "b".repeat(0x800));
    let body: String = std::iter::repeat_n(chunk, 4).collect::<String>() + "0\r\n\r\n";
    let (response, _) = exchange(
        group.port,
        format!("POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{body}").as_bytes(),
    );
    assert!(response.starts_with("HTTP/1.1 413 "), "{response}");
    assert!(
        response.contains(r#""error":"payload_too_large""#),
        "{response}"
    );
    // Under the limits, all is well.
    let (response, _) = exchange(
        group.port,
        b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
}

#[test]
fn a_hung_backend_costs_only_its_own_requests_504_and_leaves_the_rotation() {
    let group = plain_group(3, "upstream.read_timeout = \"2s\"");
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let client = group.http_client(true);
            // The query is never logged, Pingora's own lines about the 504s included.
            let (url, stop) = (group.url("/api/ping?token=not-for-logs"), stop.clone());
            thread::spawn(move || {
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let status = client
                        .get(&url)
                        .send()
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    statuses.push((status, started.elapsed()));
                }
                statuses
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    let b2 = group.child_pid("--id b2 ").expect("b2");
    util::signal(b2, libc::SIGSTOP);
    let left = wait_until(Duration::from_secs(10), || {
        group.metric(r#"gatehouse_backend_up{backend="b2"}"#) == Some(0.0)
    });
    thread::sleep(Duration::from_secs(3));
    util::signal(b2, libc::SIGCONT);
    let back = wait_until(Duration::from_secs(10), || {
        group.metric(r#"gatehouse_backend_up{backend="b2"}"#) == Some(1.0)
    });
    stop.store(true, Ordering::Relaxed);
    let statuses: Vec<(u16, Duration)> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    assert!(left, "the hung backend stayed in rotation");
    assert!(back, "the backend did not return after SIGCONT");
    // What may fail: requests already sent to the hung backend, with 504 after the read
    // timeout (2 s) and not much later. What may not: anything else.
    let failed: Vec<_> = statuses.iter().filter(|(s, _)| *s != 200).collect();
    assert!(
        failed
            .iter()
            .all(|(s, t)| *s == 504 && *t >= Duration::from_secs(2) && *t < Duration::from_secs(4)),
        "{failed:?}"
    );
    assert!(failed.len() <= 8, "{} requests failed", failed.len());
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert!(ok > 100, "the other backends served only {ok}");
    let log = group.log();
    assert!(
        !failed.is_empty() && log.contains("GET /api/ping, request_id"),
        "no failure logged with its request:\n{log}"
    );
    assert!(
        !log.contains("not-for-logs"),
        "a query reached the log:\n{log}"
    );
}

#[test]
fn a_backend_killed_mid_request_gets_502_at_once_and_comes_back() {
    let group = plain_group(1, "");
    // A login whose body has only half arrived: the backend is waiting for the rest.
    let mut stream = TcpStream::connect(("127.0.0.1", group.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n{\"username\":\"admin\",")
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let backend = group.child_pid("--id b1 ").expect("b1");
    let killed = Instant::now();
    util::signal(backend, libc::SIGKILL);
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(response.starts_with("HTTP/1.1 502 "), "{response}");
    assert!(
        killed.elapsed() < Duration::from_secs(3),
        "not at once: {:?}",
        killed.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(10), || {
            group.metric(r#"gatehouse_supervisor_restarts_total{child="b1"}"#) == Some(1.0)
                && group.get("/api/ping").is_ok_and(|r| r.status() == 200)
        }),
        "b1 did not come back"
    );
}

/// Writes `first`, then one byte of `drip` every `every` until the proxy stops reading or
/// `drip` runs out; returns the connection for reading the answer.
fn trickle(port: u16, first: &[u8], drip: &'static [u8], every: Duration) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(8)))
        .unwrap();
    let mut writer = stream.try_clone().expect("clone");
    writer.write_all(first).expect("send");
    thread::spawn(move || {
        for byte in drip {
            thread::sleep(every);
            if writer.write_all(&[*byte]).is_err() {
                break;
            }
        }
    });
    stream
}

/// Reads until the proxy closes the connection; the response, and when it began.
fn answer(mut stream: TcpStream) -> (String, Option<Instant>, bool) {
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    let mut began = None;
    let closed = loop {
        match stream.read(&mut buffer) {
            Ok(0) => break true,
            Ok(n) => {
                began.get_or_insert_with(Instant::now);
                response.extend_from_slice(&buffer[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (
        String::from_utf8_lossy(&response).into_owned(),
        began,
        closed,
    )
}

/// Plain pings on fresh connections until `stop`; the statuses that were not 200.
pub(crate) fn steady_pings(
    port: u16,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(usize, Vec<String>)> {
    thread::spawn(move || {
        let (mut served, mut failed) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let (response, _) = exchange(
                port,
                b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            );
            if response.starts_with("HTTP/1.1 200 ") {
                served += 1;
            } else {
                failed.push(response);
            }
            thread::sleep(Duration::from_millis(20));
        }
        (served, failed)
    })
}

#[test]
fn slow_headers_get_408_at_the_deadline_slow_bodies_at_theirs_and_others_are_served() {
    let group = plain_group(
        1,
        "limits.header_timeout = \"1s\"\nlimits.body_timeout = \"1s\"",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let pings = steady_pings(group.port, stop.clone());

    // Slowloris: a header line, then a byte every 200 ms that never ends the header.
    let started = Instant::now();
    let slow = trickle(
        group.port,
        b"GET /api/ping HTTP/1.1\r\nHost: x\r\n",
        b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        Duration::from_millis(200),
    );
    let (response, began, closed) = answer(slow);
    let after = began.map(|t| t - started).unwrap_or_default();
    assert!(
        response.starts_with("HTTP/1.1 408 "),
        "{response:?} (closed: {closed}, after {:?})",
        started.elapsed()
    );
    assert!(
        response.contains(r#""error":"request_timeout""#),
        "{response}"
    );
    assert!(response.contains(r#""request_id":""#), "{response}");
    assert!(closed, "the slow connection stayed open");
    // Bytes kept arriving all along: only a deadline for the whole header stops this.
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
        "408 after {after:?}"
    );

    // On a new connection the deadline runs from its opening, not from its first byte.
    let started = Instant::now();
    let mut late = TcpStream::connect(("127.0.0.1", group.port)).expect("connect");
    late.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    thread::sleep(Duration::from_millis(600));
    late.write_all(b"GET /api/ping HTTP/1.1\r\n").expect("send");
    let (response, began, _) = answer(late);
    assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
    let after = began.map(|t| t - started).unwrap_or_default();
    assert!(after < Duration::from_millis(1500), "408 after {after:?}");

    // A connection that sends nothing is closed at the deadline, without an answer.
    let idle = TcpStream::connect(("127.0.0.1", group.port)).expect("connect");
    idle.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let started = Instant::now();
    let (response, _, closed) = answer(idle);
    assert!(response.is_empty() && closed, "{response:?}");
    assert!(started.elapsed() < Duration::from_millis(2500));

    // A kept-alive connection may idle past the header deadline between requests.
    let mut kept = TcpStream::connect(("127.0.0.1", group.port)).expect("connect");
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buffer = [0u8; 4096];
    for round in 0..2 {
        kept.write_all(b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        let n = kept.read(&mut buffer).expect("an answer");
        let text = String::from_utf8_lossy(&buffer[..n]);
        assert!(text.starts_with("HTTP/1.1 200 "), "round {round}: {text}");
        thread::sleep(Duration::from_millis(1500));
    }

    // A slow body: half of it, then nothing. 408 one body timeout later.
    let started = Instant::now();
    let stalled = trickle(
        group.port,
        b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n{\"username\":",
        b"",
        Duration::ZERO,
    );
    let (response, began, _) = answer(stalled);
    assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
    assert!(response.contains(r#""request_id":""#), "{response}");
    let after = began.map(|t| t - started).unwrap_or_default();
    assert!(after < Duration::from_millis(3000), "408 after {after:?}");

    stop.store(true, Ordering::Relaxed);
    let (served, failed) = pings.join().expect("pings");
    assert!(failed.is_empty(), "other clients failed: {failed:?}");
    assert!(served > 50, "only {served} other requests were served");
    let refused = metric_sum(
        &group.admin("/metrics").1,
        "gatehouse_http_requests_total",
        &[r#"route="none""#, r#"status="4xx""#],
    );
    assert!(refused >= 1.0, "the 408 is not counted");
}

/// A memory field of /proc/PID/status (`VmRSS`, `RssAnon`), in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_connection_flood_waits_at_the_limit_in_bounded_memory_and_service_resumes() {
    let group = plain_group(
        1,
        "limits.max_connections = 20\nlimits.header_timeout = \"3s\"",
    );
    let proxy = group.child_pid("gatehouse proxy").expect("the proxy");
    let before = status_kib(proxy, "VmRSS");
    // Far more connections than allowed, each sending half a header and then nothing.
    let flood: Vec<TcpStream> = (0..400)
        .filter_map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", group.port)).ok()?;
            s.write_all(b"GET /api/ping HTTP/1.1\r\n").ok()?;
            Some(s)
        })
        .collect();
    assert!(flood.len() > 300, "only {} connections opened", flood.len());
    thread::sleep(Duration::from_millis(500));
    // Past the limit, a new request waits instead of being served...
    let mut waiting = TcpStream::connect(("127.0.0.1", group.port)).expect("connect");
    waiting
        .write_all(b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    waiting
        .set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let mut buffer = [0u8; 4096];
    assert!(
        waiting.read(&mut buffer).is_err(),
        "answered while {} connections were open",
        flood.len()
    );
    let during = status_kib(proxy, "VmRSS");
    assert!(
        group.metric("gatehouse_connection_limit_waits_total") >= Some(1.0),
        "the wait is not counted"
    );
    // ...and is served once the flood ends.
    drop(flood);
    waiting
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let n = waiting.read(&mut buffer).expect("served after the flood");
    let text = String::from_utf8_lossy(&buffer[..n]);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(
        during < before + 10 * 1024,
        "the flood grew the proxy from {before} to {during} KiB"
    );
    assert!(
        wait_until(Duration::from_secs(5), || group
            .get("/api/ping")
            .is_ok_and(|r| r.status() == 200)),
        "service did not resume"
    );
}

#[test]
fn memory_a_burst_of_connections_freed_goes_back_to_the_kernel() {
    let group = Group::start(Options {
        tls: false,
        backends: 1,
        keys: "limits.max_connections_per_client = 1000".into(),
        // The default allocator, named so the bound stays glibc's whatever the default. On
        // mimalloc (opt-in) this burst left the proxy 15 MB above its start under the whole
        // suite's load, over this bound: why mimalloc is not the default.
        env: vec![("GATEHOUSE_ALLOCATOR".into(), "system".into())],
        ..Options::default()
    });
    let proxy = group.child_pid("gatehouse proxy").expect("the proxy");
    let before = status_kib(proxy, "RssAnon");
    // 600 clients at once, each answered the landing page and keeping its connection.
    let burst: Vec<TcpStream> = (0..600)
        .filter_map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", group.port)).ok()?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
            Some(s)
        })
        .collect();
    let answered = burst
        .iter()
        .filter(|s| {
            let mut s = *s;
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut head = [0u8; 12];
            s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
        })
        .count();
    assert!(answered > 500, "only {answered} of the burst were answered");
    let during = status_kib(proxy, "RssAnon");
    assert!(
        during > before + 10 * 1024,
        "the burst grew the proxy only from {before} to {during} KiB: nothing to give back"
    );
    drop(burst);
    // Left alone, glibc keeps nearly all of it, and the proxy's heap trim gives it back.
    let slack = gatehouse_proxy::heap::SLACK / 1024 + 4 * 1024;
    let check = gatehouse_proxy::heap::CHECK_EVERY;
    assert!(
        wait_until(check * 2 + Duration::from_secs(5), || status_kib(
            proxy, "RssAnon"
        ) < before + slack),
        "the proxy kept {} KiB after the burst (before: {before} KiB, during: {during} KiB)",
        status_kib(proxy, "RssAnon")
    );
    assert!(group.get("/api/ping").is_ok_and(|r| r.status() == 200));
}

#[test]
fn at_the_connection_limit_idle_kept_alive_connections_make_room() {
    let group = plain_group(1, "limits.max_connections = 10");
    // Ten clients, each done with a request and keeping its connection for the next.
    let idle: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", group.port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("send");
            let mut buffer = [0u8; 4096];
            let n = s.read(&mut buffer).expect("an answer");
            assert!(buffer[..n].starts_with(b"HTTP/1.1 200 "));
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    // An eleventh is served at once, not after the 60 s keep-alive timeout.
    let started = Instant::now();
    let (response, _) = exchange(
        group.port,
        b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served after {:?}",
        started.elapsed()
    );
    // The idle ones were closed to make room.
    let closed = idle
        .into_iter()
        .filter(|s| {
            let mut s = s;
            matches!(s.read(&mut [0u8; 64]), Ok(0) | Err(_))
        })
        .count();
    assert!(closed >= 1, "no idle connection was closed");
}
