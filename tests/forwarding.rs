//! How requests reach the backends: the simplest ones over the proxy's own keep-alive
//! connections (`forward` in the proxy), everything else over Pingora's path. Either way the
//! client sees the same framing, and a request with hop-by-hop headers still gets through.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::net::UnixListener,
    thread,
    time::Duration,
};

use crate::{
    drills::{exchange, plain_group},
    socket_dir,
    util::{self, metric_sum, wait_until},
};

/// Status lines in a raw response stream.
fn statuses(raw: &str) -> Vec<&str> {
    raw.match_indices("HTTP/1.1 ")
        .map(|(at, _)| &raw[at + 9..at + 12])
        .collect()
}

/// Reads one response's header from `stream`: what came up to the blank line.
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).to_ascii_lowercase()
}

/// A chunked body, read chunk by chunk by its sizes (data can end in `0\r\n\r\n` too).
fn read_chunked_body(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => line.push(byte[0]),
                other => return Err(format!("{other:?} in a chunk size after {body:?}")),
            }
        }
        let size = std::str::from_utf8(&line[..line.len() - 2])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .ok_or_else(|| format!("a bad chunk size line {line:?}"))?;
        // The data and its CRLF; the last chunk has no data, only the CRLF that ends the body.
        let mut data = vec![0u8; size + 2];
        stream
            .read_exact(&mut data)
            .map_err(|e| format!("{e} in a chunk of {size} after {body:?}"))?;
        if !data.ends_with(b"\r\n") {
            return Err(format!("a chunk without its CRLF: {data:?}"));
        }
        if size == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&data[..size]);
    }
}

#[test]
fn a_head_response_has_no_body_and_the_connection_stays_in_step() {
    let group = plain_group(2, "");
    let mut stream = TcpStream::connect(("127.0.0.1", group.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    // The backends answer HEAD with GET's headers, its body's length among them, but no body.
    stream
        .write_all(b"HEAD /api/ping HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("send");
    let head = read_head(&mut stream);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        head.contains("content-length: 15\r\n"),
        "the HEAD says the length: {head}"
    );
    // The next response on the connection is the next request's, whole: had the length been
    // taken for a body, this would read the wrong bytes.
    stream
        .write_all(b"GET /api/ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut rest = String::new();
    let _ = stream.read_to_string(&mut rest);
    assert!(rest.starts_with("HTTP/1.1 200"), "{rest}");
    assert!(rest.contains(r#""status":"ok""#), "{rest}");
    assert!(
        rest.to_ascii_lowercase().contains("connection: close"),
        "the last response says the connection closes: {rest}"
    );
}

#[test]
fn an_http10_client_gets_its_answer_and_the_close() {
    let group = plain_group(1, "");
    let (raw, closed) = exchange(group.port, b"GET /api/ping HTTP/1.0\r\n\r\n");
    assert!(raw.starts_with("HTTP/1.") && raw.contains(" 200 "), "{raw}");
    assert!(raw.contains(r#""status":"ok""#), "{raw}");
    assert!(
        closed,
        "an HTTP/1.0 request without keep-alive ends its connection"
    );
}

#[test]
fn requests_with_hop_by_hop_headers_take_the_general_path_and_are_answered() {
    let group = plain_group(2, "");
    for extra in [
        "TE: trailers\r\nConnection: TE\r\n",
        "Keep-Alive: timeout=5\r\n",
        "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
        "Expect: 100-continue\r\nContent-Length: 0\r\n",
    ] {
        let request =
            format!("GET /api/ping HTTP/1.1\r\nHost: a\r\n{extra}Connection: close\r\n\r\n");
        let (raw, _) = exchange(group.port, request.as_bytes());
        assert_eq!(
            statuses(&raw).last().copied(),
            Some("200"),
            "{extra:?}:\n{raw}"
        );
        assert!(raw.contains(r#""status":"ok""#), "{extra:?}:\n{raw}");
    }
}

#[test]
fn sequential_requests_share_a_few_backend_connections() {
    let group = plain_group(2, "");
    let client = group.http_client(true);
    for _ in 0..200 {
        let response = client.get(group.url("/api/ping")).send().expect("ping");
        assert_eq!(response.status(), 200);
    }
    // One client, one request at a time: each backend needs one connection, kept alive.
    let (_, metrics) = group.admin("/metrics");
    let open = metric_sum(&metrics, "gatehouse_backend_connections_open", &[]);
    assert!(
        (1.0..=4.0).contains(&open),
        "{open} backend connections open after 200 sequential requests"
    );
}

#[test]
fn a_client_that_leaves_while_the_backend_stalls_gives_its_share_back_at_once() {
    // One request in flight per client: a request nobody will read must not keep the next.
    let group = plain_group(1, "limits.max_upstream_requests_per_client = 1");
    let backend = group.child_pid("--id b1 ").expect("b1");
    util::signal(backend, libc::SIGSTOP);
    let mut left = TcpStream::connect(("127.0.0.1", group.port)).expect("connect");
    left.write_all(b"GET /api/ping HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("send");
    thread::sleep(Duration::from_millis(300));
    drop(left);
    thread::sleep(Duration::from_millis(700));
    // The backend is still stopped: had the first request kept its share, this one would get
    // 429 at once.
    let next = thread::spawn({
        let port = group.port;
        move || {
            exchange(
                port,
                b"GET /api/ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
        }
    });
    thread::sleep(Duration::from_millis(500));
    util::signal(backend, libc::SIGCONT);
    let (raw, _) = next.join().expect("second client");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
}

#[test]
fn a_burst_leaves_at_most_64_idle_connections_per_backend() {
    let group = plain_group(1, "");
    let backend = group.child_pid("--id b1 ").expect("b1");
    // With the backend stopped, every request of the burst needs a connection of its own.
    util::signal(backend, libc::SIGSTOP);
    let burst: Vec<_> = (0..120)
        .map(|_| {
            let port = group.port;
            thread::spawn(move || {
                exchange(
                    port,
                    b"GET /api/ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                )
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(1500));
    util::signal(backend, libc::SIGCONT);
    let answered = burst
        .into_iter()
        .filter_map(|t| t.join().ok())
        .filter(|(raw, _)| raw.starts_with("HTTP/1.1 200"))
        .count();
    assert_eq!(answered, 120, "every request of the burst is answered");
    // Past the cap, connections are closed as they come back: the backend sees at most 64
    // idle ones from the fast path, plus the health check's.
    let open = || {
        metric_sum(
            &group.admin("/metrics").1,
            "gatehouse_backend_connections_open",
            &[],
        )
    };
    assert!(
        wait_until(Duration::from_secs(5), || open() <= 66.0),
        "{} backend connections open after the burst",
        open()
    );
    // The burst's leftovers serve the next client at once.
    let (raw, _) = exchange(
        group.port,
        b"GET /api/ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
}

/// A backend that answers like HTTP/1.0 servers do: no length, the body ends at the close.
/// The body is the request head it got.
fn close_delimited_backend(socket: &std::path::Path) {
    let listener = UnixListener::bind(socket).expect("bind the backend socket");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let (mut line, mut head) = (String::new(), String::new());
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    head.push_str(&line.to_ascii_lowercase());
                    line.clear();
                }
                let mut stream = reader.into_inner();
                let _ = write!(
                    stream,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nthe backend got:\n{head}"
                );
            });
        }
    });
}

/// The proxy alone, with a [`close_delimited_backend`] found in its socket directory.
fn proxy_with_close_delimited_backend(dir: &std::path::Path) -> (util::Process, u16) {
    let (sockets, port, _) = socket_dir::socket_dir_config(dir, "redis://127.0.0.1:1".into(), "");
    close_delimited_backend(&sockets.join("old.sock"));
    let proxy = util::start_alone(dir, &["proxy"], "proxy.log");
    assert!(
        wait_until(Duration::from_secs(10), || TcpStream::connect((
            "127.0.0.1",
            port
        ))
        .is_ok()),
        "the proxy did not listen"
    );
    (proxy, port)
}

#[test]
fn a_response_without_a_length_reaches_the_client_chunked_on_a_connection_that_stays() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_proxy, port) = proxy_with_close_delimited_backend(dir.path());
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    for round in 0..2 {
        stream
            .write_all(b"GET /api/anything HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect("send");
        let head = read_head(&mut stream);
        assert!(head.starts_with("http/1.1 200"), "round {round}: {head}");
        assert!(
            head.contains("transfer-encoding: chunked"),
            "round {round}: {head}"
        );
        assert!(!head.contains("connection: close"), "round {round}: {head}");
        let body = read_chunked_body(&mut stream)
            .unwrap_or_else(|e| panic!("round {round}: the body ended early: {e}"));
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("get /api/anything"), "round {round}: {body}");
    }

    // An HTTP/1.0 client cannot read chunks: it gets the body as it came, then the close.
    let (raw, closed) = exchange(port, b"GET /api/anything HTTP/1.0\r\n\r\n");
    let lower = raw.to_ascii_lowercase();
    assert!(lower.contains(" 200 "), "{raw}");
    assert!(!lower.contains("transfer-encoding"), "{raw}");
    assert!(
        lower.contains("the backend got:\nget /api/anything"),
        "{raw}"
    );
    assert!(closed, "the connection ends with the body");
}

#[test]
fn an_absolute_form_target_names_the_host_the_backend_gets() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_proxy, port) = proxy_with_close_delimited_backend(dir.path());
    for request in [
        // No Host at all, and a Host the target overrides (RFC 9112 section 3.2.2).
        "GET http://abs.example/api/anything HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET http://abs.example/api/anything HTTP/1.1\r\nHost: abs.example\r\nConnection: close\r\n\r\n",
    ] {
        let (raw, _) = exchange(port, request.as_bytes());
        assert!(raw.contains(" 200 "), "{request:?}: {raw}");
        assert!(raw.contains("host: abs.example\r\n"), "{request:?}: {raw}");
    }
}
