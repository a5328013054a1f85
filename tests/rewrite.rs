//! Prefix rewrites (`rewrite_prefix`): what the backend gets, what the client sees of its
//! `Location` headers, and `X-Forwarded-Prefix`, on both of the proxy's paths to a backend.

use std::{
    io::{BufReader, Write},
    os::unix::net::UnixListener,
    path::Path,
    thread,
};

use crate::{drills::exchange, socket_dir, util};

/// A backend on `socket` that answers every request with what it got: the request line and
/// `X-Forwarded-Prefix` in the body, and the request's `X-Location` as its `Location`.
fn echo_backend(socket: &Path) {
    let listener = UnixListener::bind(socket).expect("bind the backend socket");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                while let Some(request) = util::read_request(&mut reader) {
                    let request_line = &request.line;
                    let prefixes: Vec<_> = request.values("x-forwarded-prefix").collect();
                    let location = request.values("x-location").next();
                    // Every value it got, so a second one would show.
                    let prefix = if prefixes.is_empty() {
                        "-".to_owned()
                    } else {
                        prefixes.join(",")
                    };
                    let answer = format!("{request_line}\nprefix: {prefix}\n");
                    let location = location.map_or(String::new(), |l| format!("Location: {l}\r\n"));
                    let status = if location.is_empty() {
                        "200 OK"
                    } else {
                        "302 Found"
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\n{location}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if reader.get_mut().write_all(response.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// The proxy alone, finding the [`echo_backend`] in its socket directory, with routes that
/// remove a prefix (`/app/`) and replace one (`/v1/` with `/api/`).
fn proxy_with_rewrites(dir: &Path) -> (util::Process, u16) {
    let (sockets, port, _) = socket_dir::socket_dir_config_with_routes(
        dir,
        "redis://127.0.0.1:1".into(),
        "",
        "[[routes]]\nprefix = \"/app/\"\nupstream = \"backends\"\nrewrite_prefix = \"/\"\n\
         [[routes]]\nprefix = \"/v1/\"\nupstream = \"backends\"\nrewrite_prefix = \"/api/\"\n"
            .into(),
    );
    echo_backend(&sockets.join("echo.sock"));
    let proxy = socket_dir::start_proxy(dir, port, "/app/x");
    (proxy, port)
}

/// The response to `request`, sent with `Host: edge.test` and `Connection: close`.
fn send(port: u16, request_line: &str, headers: &str, body: &str) -> String {
    let length = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    let raw = format!(
        "{request_line}\r\nHost: edge.test\r\n{headers}{length}Connection: close\r\n\r\n{body}"
    );
    exchange(port, raw.as_bytes()).0
}

fn location(response: &str) -> Option<&str> {
    response.lines().find_map(|l| {
        l.strip_prefix("location: ")
            .or(l.strip_prefix("Location: "))
    })
}

#[test]
fn a_prefix_is_removed_or_replaced_and_locations_are_mapped_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_proxy, port) = proxy_with_rewrites(dir.path());

    // Removed, on the fast path (GET) and Pingora's (a body): the rest of the target exactly
    // as sent, and the removed prefix told to the backend.
    let got = send(port, "GET /app/a%2Fb?q=1 HTTP/1.1", "", "");
    assert!(
        got.contains("\r\n\r\nGET /a%2Fb?q=1 HTTP/1.1\nprefix: /app\n"),
        "{got}"
    );
    let got = send(port, "POST /app/form HTTP/1.1", "", "x=1");
    assert!(
        got.contains("\r\n\r\nPOST /form HTTP/1.1\nprefix: /app\n"),
        "{got}"
    );
    // The prefix in another spelling takes the route, and is removed all the same.
    let got = send(port, "GET /ap%70/thing HTTP/1.1", "", "");
    assert!(got.contains("\r\n\r\nGET /thing HTTP/1.1\n"), "{got}");

    // Locations: a path under the backend's root, or a URL naming the host asked for, come
    // back under the prefix; another host's URL is left alone.
    for (method, body) in [("GET", ""), ("POST", "x=1")] {
        for (sent, seen) in [
            ("/next?x=1", "/app/next?x=1"),
            ("http://edge.test/next", "http://edge.test/app/next"),
            ("https://EDGE.test/next", "https://EDGE.test/app/next"),
            ("http://other.test/next", "http://other.test/next"),
            ("//other.test/next", "//other.test/next"),
            ("relative", "relative"),
        ] {
            let got = send(
                port,
                &format!("{method} /app/go HTTP/1.1"),
                &format!("X-Location: {sent}\r\n"),
                body,
            );
            assert!(got.starts_with("HTTP/1.1 302 "), "{got}");
            assert_eq!(location(&got), Some(seen), "{method} {sent}: {got}");
        }
    }

    // Replaced: `/v1/` is `/api/` to the backend, which is told of no prefix, and its
    // locations under `/api/` come back under `/v1/`.
    let got = send(
        port,
        "GET /v1/users HTTP/1.1",
        "X-Location: /api/users/7\r\n",
        "",
    );
    assert!(
        got.contains("\r\n\r\nGET /api/users HTTP/1.1\nprefix: -\n"),
        "{got}"
    );
    assert_eq!(location(&got), Some("/v1/users/7"), "{got}");

    // A path made a host (`//evil.example`) once the prefix is gone, and the backends' own
    // health check, are not sent on.
    for (request_line, status) in [
        ("GET /app//evil.example/x HTTP/1.1", "400"),
        ("GET /app/%2Fevil.example HTTP/1.1", "400"),
        ("POST /app//evil.example HTTP/1.1", "400"),
        ("GET /app/healthz HTTP/1.1", "404"),
        ("GET /app/health%7A?x HTTP/1.1", "404"),
    ] {
        let got = send(port, request_line, "", "");
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status} ")),
            "{request_line}: {got}"
        );
        assert!(got.contains(r#""request_id":""#), "{request_line}: {got}");
    }
    // An absolute-form target: the backend gets the path, in origin form.
    let got = send(port, "GET http://edge.test/app/abs?q HTTP/1.1", "", "");
    assert!(got.contains("\r\n\r\nGET /abs?q HTTP/1.1\n"), "{got}");

    // A client cannot claim a prefix: on a route without a rewrite its header is dropped, on
    // one with a rewrite it is replaced.
    let got = send(
        port,
        "GET /api/x HTTP/1.1",
        "X-Forwarded-Prefix: /evil\r\n",
        "",
    );
    assert!(
        got.contains("\r\n\r\nGET /api/x HTTP/1.1\nprefix: -\n"),
        "{got}"
    );
    let got = send(
        port,
        "GET /app/x HTTP/1.1",
        "X-Forwarded-Prefix: /evil\r\n",
        "",
    );
    assert!(got.contains("\nprefix: /app\n"), "{got}");
}
