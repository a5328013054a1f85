//! How requests reach the backends: the simplest ones over the proxy's own keep-alive
//! connections (`forward` in the proxy), everything else over Pingora's path. Either way the
//! client sees the same framing, and a request with hop-by-hop headers still gets through.

use std::{
    io::{Read, Write},
    net::TcpStream,
    thread,
    time::Duration,
};

use crate::{
    drills::{exchange, plain_group},
    util::{self, metric_sum},
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
