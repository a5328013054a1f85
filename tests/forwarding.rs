//! How requests reach the backends: the simplest ones over the proxy's own keep-alive
//! connections (`forward` in the proxy), everything else over Pingora's path. Either way the
//! client sees the same framing, and a request with hop-by-hop headers still gets through.

use crate::{
    drills::{exchange, plain_group},
    util::metric_sum,
};

/// Status lines in a raw response stream.
fn statuses(raw: &str) -> Vec<&str> {
    raw.match_indices("HTTP/1.1 ")
        .map(|(at, _)| &raw[at + 9..at + 12])
        .collect()
}

#[test]
fn head_pipelined_and_closing_requests_keep_their_framing() {
    let group = plain_group(2, "");
    // Three requests in one write: a HEAD (a length, no body), a GET, and a GET that closes.
    let (raw, closed) = exchange(
        group.port,
        b"HEAD /api/ping HTTP/1.1\r\nHost: a\r\n\r\n\
          GET /api/ping HTTP/1.1\r\nHost: a\r\n\r\n\
          GET /api/ping HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(statuses(&raw), ["200", "200", "200"], "{raw}");
    // Only the two GETs carry a body; the HEAD's length did not eat the next response.
    assert_eq!(raw.matches(r#""status":"ok""#).count(), 2, "{raw}");
    let head = raw.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase();
    assert!(head.contains("content-length:"), "the HEAD says the length: {head}");
    assert!(closed, "the connection closed after the request that asked for it");
    let last = raw.rsplit("HTTP/1.1 ").next().unwrap_or_default().to_ascii_lowercase();
    assert!(last.contains("connection: close"), "the last response says so: {last}");
}

#[test]
fn an_http10_client_gets_its_answer_and_the_close() {
    let group = plain_group(1, "");
    let (raw, closed) = exchange(group.port, b"GET /api/ping HTTP/1.0\r\n\r\n");
    assert!(raw.starts_with("HTTP/1.") && raw.contains(" 200 "), "{raw}");
    assert!(raw.contains(r#""status":"ok""#), "{raw}");
    assert!(closed, "an HTTP/1.0 request without keep-alive ends its connection");
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
        let request = format!("GET /api/ping HTTP/1.1\r\nHost: a\r\n{extra}Connection: close\r\n\r\n");
        let (raw, _) = exchange(group.port, request.as_bytes());
        assert_eq!(statuses(&raw).last().copied(), Some("200"), "{extra:?}:\n{raw}");
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
