//! Per-route header rules, security headers and CORS, through the real proxy: a backend of
//! the test's own that answers each request with the head it received (so the test sees what
//! reached it), and static files. GET takes the proxy's fast path to the backend, POST
//! Pingora's.

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::Path,
    thread,
    time::Duration,
};

use reqwest::blocking::{Client, Response};

use crate::{
    socket_dir,
    util::{self, Options, Process, wait_until},
};

/// Answers every request on `dir/echo.sock` with the request's head as its body, plus
/// headers of its own for the response rules to act on, and the CORS headers of a careless
/// backend: the request's `Origin` reflected (or another), with credentials.
pub fn echo_backend(dir: &Path) {
    let hidden = dir.join(".echo.sock");
    let listener = UnixListener::bind(&hidden).expect("bind the echo socket");
    // In place only once it listens, as the socket directory expects.
    fs::rename(&hidden, dir.join("echo.sock")).expect("rename the echo socket");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || echo(stream));
        }
    });
}

fn echo(stream: UnixStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone the stream"));
    let mut writer = stream;
    loop {
        let mut head = String::new();
        let mut length = 0usize;
        let mut origin = "https://evil.example".to_string();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("origin")
            {
                origin = value.trim().to_string();
            }
            head.push_str(&line);
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             X-Backend-Secret: 1\r\nX-Frame-Options: DENY\r\n\
             Access-Control-Allow-Origin: {origin}\r\nAccess-Control-Allow-Credentials: true\r\n\
             Access-Control-Expose-Headers: X-Backend-Secret\r\n\r\n{head}",
            head.len()
        );
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

const ROUTES: &str = r#"
[[routes]]
prefix = "/echo/"
upstream = "backends"
request_headers = { set = { "X-Env" = "prod", "X-Client" = "$client_ip", "X-Id" = "id-${request_id}", "X-Url" = "$scheme://$host" }, add = { "X-Tag" = "edge" }, remove = ["X-Debug"] }
response_headers = { set = { "X-Served-By" = "gatehouse $$1" }, add = { "X-Tag" = "edge" }, remove = ["X-Backend-Secret"] }
security_headers = true
cors = { origins = ["https://app.example"], methods = ["GET", "PUT"], headers = ["X-Token"], max_age = "10m", credentials = true }

[[routes]]
prefix = "/plain/"
upstream = "backends"
cors = { origins = ["https://app.example"], methods = ["patch", "delete"] }

[[routes]]
prefix = "/site/"
static_dir = "STATIC"
response_headers = { set = { "X-Host" = "$host" } }
security_headers = true
cors = { origins = ["*"] }

[[routes]]
prefix = "/locked/"
static_dir = "STATIC"
htpasswd = "HTPASSWD"
cors = { origins = ["https://app.example"] }

[[routes]]
prefix = "/limited/"
static_dir = "STATIC"
rate_limit = "tight"
cors = { origins = ["https://app.example"] }

[rate_limits.tight]
per_second = 1
burst = 2
"#;

/// `gatehouse proxy` in front of the echo backend, and the test's routes.
fn start() -> (tempfile::TempDir, Process, u16) {
    let dir = tempfile::tempdir().expect("temp dir");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let routes = ROUTES
        .replace("STATIC", &repo.join("static/open").display().to_string())
        .replace(
            "HTPASSWD",
            &repo.join("conf/htpasswd").display().to_string(),
        );
    let (sockets, port, _) = socket_dir::socket_dir_config_with_routes(
        dir.path(),
        "redis://127.0.0.1:1".into(),
        "",
        routes,
    );
    echo_backend(&sockets);
    let proxy = util::start_alone(dir.path(), &["proxy"], "proxy.log");
    let client = client();
    let url = format!("http://127.0.0.1:{port}/echo/up");
    assert!(
        wait_until(Duration::from_secs(15), || client
            .get(&url)
            .send()
            .is_ok_and(|r| r.status() == 200)),
        "the echo backend never answered through the proxy: {}",
        fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default()
    );
    (dir, proxy, port)
}

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn header(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().expect("text").to_owned())
}

fn all(response: &Response, name: &str) -> Vec<String> {
    response
        .headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("text").to_owned())
        .collect()
}

/// How many times `Vary` names `Origin` (compression adds its own `Accept-Encoding`).
fn vary_origin(response: &Response) -> usize {
    all(response, "vary")
        .iter()
        .flat_map(|v| v.split(',').map(str::trim).collect::<Vec<_>>())
        .filter(|v| v.eq_ignore_ascii_case("origin"))
        .count()
}

#[test]
fn header_rules_apply_on_both_proxy_paths_and_to_static_files() {
    let (_dir, _proxy, port) = start();
    let client = client();
    let url = format!("http://127.0.0.1:{port}/echo/x");
    for (path, response) in [
        (
            "fast",
            client
                .get(&url)
                .header("x-debug", "1")
                .header("x-tag", "client")
                .send(),
        ),
        (
            "pingora",
            client
                .post(&url)
                .header("x-debug", "1")
                .header("x-tag", "client")
                .body("hello")
                .send(),
        ),
    ] {
        let response = response.expect("answer");
        assert_eq!(response.status(), 200, "{path}");
        let id = header(&response, "x-request-id").expect("a request id");
        // Response rules: set, add beside the backend's own, remove; the security headers
        // fill in what the backend did not send and leave what it did.
        assert_eq!(
            header(&response, "x-served-by").as_deref(),
            Some("gatehouse $1"),
            "{path}"
        );
        assert_eq!(header(&response, "x-backend-secret"), None, "{path}");
        assert_eq!(
            header(&response, "x-frame-options").as_deref(),
            Some("DENY"),
            "{path}"
        );
        assert_eq!(
            header(&response, "x-content-type-options").as_deref(),
            Some("nosniff")
        );
        assert_eq!(
            header(&response, "referrer-policy").as_deref(),
            Some("strict-origin-when-cross-origin")
        );
        assert!(
            header(&response, "content-security-policy")
                .is_some_and(|csp| csp.contains("frame-ancestors 'self'")),
            "{path}"
        );
        assert_eq!(vary_origin(&response), 1, "{path}");
        // Request rules, as the backend received them.
        let seen = response.text().expect("body").to_ascii_lowercase();
        let received = |name: &str| -> Vec<String> {
            seen.lines()
                .filter_map(|l| l.split_once(": "))
                .filter(|(n, _)| *n == name)
                .map(|(_, v)| v.trim().to_string())
                .collect()
        };
        assert_eq!(received("x-env"), ["prod"], "{path}: {seen}");
        assert_eq!(received("x-client"), ["127.0.0.1"], "{path}: {seen}");
        assert_eq!(
            received("x-id"),
            [format!("id-{id}").to_ascii_lowercase()],
            "{path}"
        );
        assert_eq!(
            received("x-url"),
            [format!("http://127.0.0.1:{port}")],
            "{path}"
        );
        assert_eq!(received("x-tag"), ["client", "edge"], "{path}: {seen}");
        assert!(received("x-debug").is_empty(), "{path}: {seen}");
    }

    // A static route: its rules on the file, the edge's own 404 and a HEAD alike.
    for (method, path, status) in [
        ("GET", "/site/", 200),
        ("HEAD", "/site/", 200),
        ("GET", "/site/missing.txt", 404),
    ] {
        let url = format!("http://127.0.0.1:{port}{path}");
        let response = client
            .request(method.parse().expect("method"), &url)
            .send()
            .expect("answer");
        assert_eq!(response.status(), status, "{method} {path}");
        assert_eq!(
            header(&response, "x-host"),
            Some(format!("127.0.0.1:{port}")),
            "{method} {path}"
        );
        assert_eq!(
            header(&response, "x-frame-options").as_deref(),
            Some("SAMEORIGIN")
        );
        assert_eq!(
            header(&response, "x-content-type-options").as_deref(),
            Some("nosniff")
        );
        // `*` answers the same to every origin, and to requests without one: no Vary on it.
        assert_eq!(
            header(&response, "access-control-allow-origin").as_deref(),
            Some("*"),
            "{method} {path}"
        );
        assert_eq!(vary_origin(&response), 0, "{method} {path}");
    }
}

fn preflight(client: &Client, url: &str, origin: &str, method: &str, headers: &str) -> Response {
    let mut request = client
        .request(reqwest::Method::OPTIONS, url)
        .header("origin", origin)
        .header("access-control-request-method", method);
    if !headers.is_empty() {
        request = request.header("access-control-request-headers", headers);
    }
    request.send().expect("answer")
}

#[test]
fn cors_preflights_are_answered_at_the_edge_and_responses_name_the_origin() {
    let (_dir, _proxy, port) = start();
    let client = client();
    let echo = format!("http://127.0.0.1:{port}/echo/x");
    let app = "https://app.example";

    // Allowed: 204 from the edge (the backend would have answered 200), with the allowed set.
    let response = preflight(&client, &echo, app, "PUT", "x-token");
    assert_eq!(response.status(), 204);
    assert_eq!(
        header(&response, "access-control-allow-origin").as_deref(),
        Some(app)
    );
    assert_eq!(
        header(&response, "access-control-allow-methods").as_deref(),
        Some("GET, PUT")
    );
    assert_eq!(
        header(&response, "access-control-allow-headers").as_deref(),
        Some("x-token")
    );
    assert_eq!(
        header(&response, "access-control-max-age").as_deref(),
        Some("600")
    );
    assert_eq!(
        header(&response, "access-control-allow-credentials").as_deref(),
        Some("true")
    );
    assert_eq!(vary_origin(&response), 1);
    assert_eq!(header(&response, "content-length"), None);

    // Refused: another origin, a method or a header not listed.
    for (origin, method, headers) in [
        ("https://evil.example", "PUT", ""),
        (app, "DELETE", ""),
        (app, "PUT", "x-token, x-other"),
    ] {
        let response = preflight(&client, &echo, origin, method, headers);
        assert_eq!(response.status(), 403, "{origin} {method} {headers}");
        assert_eq!(header(&response, "access-control-allow-origin"), None);
        assert_eq!(vary_origin(&response), 1);
        let body: serde_json::Value = response.json().expect("JSON");
        assert_eq!(body["error"], "cors_refused", "{body}");
    }

    // The request itself: the origin echoed when allowed, never for another; Vary always.
    for (origin, allowed) in [
        (Some(app), true),
        (Some("https://evil.example"), false),
        (None, false),
    ] {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let mut request = client.request(method.clone(), &echo);
            if let Some(origin) = origin {
                request = request.header("origin", origin);
            }
            let response = request.send().expect("answer");
            assert_eq!(response.status(), 200);
            assert_eq!(
                header(&response, "access-control-allow-origin").as_deref(),
                allowed.then_some(app),
                "{method} from {origin:?}"
            );
            assert_eq!(vary_origin(&response), 1, "{method} from {origin:?}");
        }
    }

    // `*`: any origin, told `*`.
    let site = format!("http://127.0.0.1:{port}/site/");
    let response = preflight(&client, &site, "https://any.example", "GET", "");
    assert_eq!(response.status(), 204);
    assert_eq!(
        header(&response, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    let response = client
        .get(&site)
        .header("origin", "https://any.example")
        .send()
        .expect("answer");
    assert_eq!(
        header(&response, "access-control-allow-origin").as_deref(),
        Some("*")
    );

    // Behind basic auth: a preflight carries no credentials and is not asked for them; the
    // request itself still is, and its refusal names the origin so the page can read it.
    let locked = format!("http://127.0.0.1:{port}/locked/");
    let response = preflight(&client, &locked, app, "GET", "");
    assert_eq!(response.status(), 204);
    let response = client
        .get(&locked)
        .header("origin", app)
        .send()
        .expect("answer");
    assert_eq!(response.status(), 401);
    assert_eq!(
        header(&response, "access-control-allow-origin").as_deref(),
        Some(app)
    );

    // The rate limit holds for preflights as for everything else.
    let limited = format!("http://127.0.0.1:{port}/limited/");
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            preflight(&client, &limited, app, "GET", "")
                .status()
                .as_u16()
        })
        .collect();
    assert_eq!(statuses[..2], [204, 204], "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
}

/// The echo backend reflects `Origin` in its own `Access-Control-Allow-Origin` and allows
/// credentials: on a CORS route none of that reaches the client, on either proxy path; only
/// the edge's answer does.
#[test]
fn a_backends_own_cors_headers_never_pass_the_edge() {
    let (_dir, _proxy, port) = start();
    let client = client();
    let app = "https://app.example";
    for (route, credentials) in [("plain", false), ("echo", true)] {
        let url = format!("http://127.0.0.1:{port}/{route}/x");
        for origin in ["https://evil.example", app] {
            for method in [reqwest::Method::GET, reqwest::Method::POST] {
                let response = client
                    .request(method.clone(), &url)
                    .header("origin", origin)
                    .send()
                    .expect("answer");
                let what = format!("{method} /{route}/ from {origin}");
                assert_eq!(response.status(), 200, "{what}");
                let allowed = origin == app;
                assert_eq!(
                    all(&response, "access-control-allow-origin"),
                    if allowed {
                        vec![app.to_string()]
                    } else {
                        vec![]
                    },
                    "{what}"
                );
                assert_eq!(
                    all(&response, "access-control-allow-credentials"),
                    if allowed && credentials {
                        vec!["true".to_string()]
                    } else {
                        vec![]
                    },
                    "{what}"
                );
                assert!(
                    all(&response, "access-control-expose-headers").is_empty(),
                    "{what}"
                );
            }
        }
    }
}

/// A method outside the six browsers upper-case is compared as written: the config's
/// `"patch"` allows a page's `fetch(url, {method: "patch"})` and not `"PATCH"`; `"delete"`
/// is `DELETE`, as browsers send it.
#[test]
fn preflight_methods_keep_their_case_but_the_standard_six() {
    let (_dir, _proxy, port) = start();
    let client = client();
    let url = format!("http://127.0.0.1:{port}/plain/x");
    let app = "https://app.example";
    for (method, status) in [
        ("patch", 204),
        ("PATCH", 403),
        ("DELETE", 204),
        ("delete", 403),
    ] {
        let response = preflight(&client, &url, app, method, "");
        assert_eq!(response.status(), status, "{method}");
        if status == 204 {
            assert_eq!(
                header(&response, "access-control-allow-methods").as_deref(),
                Some("patch, DELETE")
            );
        }
    }
}

/// The head of a raw HTTP/1 exchange: each header's values by lower-case name.
fn raw_headers(port: u16, request: &str) -> (String, Vec<(String, String)>) {
    let response = util::raw_http(port, request);
    let head = response.split("\r\n\r\n").next().unwrap_or_default();
    let mut lines = head.lines();
    let status = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    (status, headers)
}

/// `$host` is the client's to choose: one that is not a host name and port never reaches a
/// header, towards the client or the backend, and none at all leaves the header out rather
/// than empty. Without `Host`, the request target's authority is the host.
#[test]
fn a_host_that_is_not_a_host_name_never_reaches_a_header() {
    let (_dir, _proxy, port) = start();
    let values = |headers: &[(String, String)], name: &str| -> Vec<String> {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .collect()
    };
    for (host, expected) in [
        ("a.example,evil.example", None),
        ("a b", None),
        ("a\"<x>", None),
        ("a;evil=1", None),
        ("", None),
        ("A.Example:8080", Some("a.example:8080")),
    ] {
        let request = format!("GET /site/ HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (status, headers) = raw_headers(port, &request);
        assert!(status.contains(" 200 "), "{host:?}: {status}");
        assert_eq!(
            values(&headers, "x-host"),
            expected.map(str::to_string).into_iter().collect::<Vec<_>>(),
            "{host:?}"
        );
        // Towards the backend: the echo shows what it received.
        let request = format!("GET /echo/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let response = util::raw_http(port, &request).to_ascii_lowercase();
        let url = response
            .lines()
            .find_map(|line| line.strip_prefix("x-url:"))
            .map(str::trim);
        assert_eq!(
            url,
            expected.map(|h| format!("http://{h}")).as_deref(),
            "{host:?}: {response}"
        );
    }
    for (request, expected) in [
        ("GET /site/ HTTP/1.0\r\n\r\n", None),
        (
            "GET http://B.example:81/site/ HTTP/1.0\r\n\r\n",
            Some("b.example:81"),
        ),
    ] {
        let (status, headers) = raw_headers(port, request);
        assert!(status.contains(" 200 "), "{request:?}: {status}");
        assert_eq!(
            values(&headers, "x-host"),
            expected.map(str::to_string).into_iter().collect::<Vec<_>>(),
            "{request:?}"
        );
    }
}

/// The landing page frames `/open/` and `/close/`: with the shipped sites' security headers on
/// (`X-Frame-Options: SAMEORIGIN`, `frame-ancestors 'self'`) both frames still show their site,
/// and nothing on the three pages, nor on the proxy's error page, is blocked by the
/// Content-Security-Policy.
#[test]
fn the_shipped_pages_load_and_frame_each_other_under_their_security_headers() {
    let Some(chromium) = crate::browser::chromium("the shipped pages were not framed in a browser")
    else {
        return;
    };
    let group = util::Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    let mut browser = crate::browser::Browser::launch(&chromium);
    browser.open(&group.url("/"));
    let titles = browser.evaluate(FRAME_TITLES);
    let titles: Vec<&str> = titles
        .as_array()
        .expect("a list")
        .iter()
        .map(|t| t.as_str().expect("a title"))
        .collect();
    assert_eq!(titles.len(), 2, "{titles:?}");
    for (title, site) in titles.iter().zip(["open site", "members area"]) {
        assert!(title.to_ascii_lowercase().contains(site), "{titles:?}");
    }
    // The proxy's own error page keeps its inline style, which the policy allows by its hash:
    // blocked, the body would have no width limit.
    browser.open(&group.url("/open/missing.html"));
    let page = browser.evaluate("[document.title, getComputedStyle(document.body).maxWidth]");
    assert_eq!(page, serde_json::json!(["404 Not Found", "576px"]));
    let blocked: Vec<_> = browser
        .log()
        .iter()
        .filter(|line| line.contains("Content Security Policy") || line.contains("frame"))
        .collect();
    assert!(blocked.is_empty(), "{blocked:#?}");
}

/// Scrolls each frame into view (they load lazily) and gives the title of the page in it,
/// which only a frame that was allowed to load has.
const FRAME_TITLES: &str = r#"(async () => {
  const sleep = (ms) => new Promise((done) => setTimeout(done, ms));
  const titles = [];
  for (const frame of document.querySelectorAll("iframe")) {
    frame.scrollIntoView();
    // A frame whose load failed (an error page, cross-origin to us) gets one more try: on a
    // loaded machine a lazy frame's first load can fail on its own.
    for (let attempt = 0; attempt < 2; attempt++) {
      for (let i = 0; i < 200; i++) {
        const inner = frame.contentDocument;
        if (!inner || (inner.readyState === "complete" && inner.title)) break;
        await sleep(50);
      }
      if (frame.contentDocument) break;
      frame.src = frame.getAttribute("src");
      await sleep(200);
    }
    titles.push(frame.contentDocument ? frame.contentDocument.title : "(blocked)");
  }
  return titles;
})()"#;

/// Over HTTPS the variables are the request's own, on HTTP/1.1 and on HTTP/2, where the host
/// comes from the `:authority` (an HTTP/2 request has no `Host` header).
#[test]
fn variables_are_the_requests_over_https_on_http1_and_http2() {
    let site = Path::new(env!("CARGO_MANIFEST_DIR")).join("static/open");
    let group = util::Group::start(Options {
        backends: 1,
        extra: format!(
            "[[routes]]\nprefix = \"/vars/\"\nstatic_dir = {:?}\nresponse_headers = {{ set = {{ \
             \"X-Where\" = \"$scheme://$host\", \"X-Who\" = \"$client_ip\" }} }}\n",
            site.display().to_string()
        ),
        ..Options::default()
    });
    let tls_port = group.tls_port.expect("an HTTPS port");
    for (http1_only, version) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let response = group
            .http_client(http1_only)
            .get(group.url("/vars/"))
            .send()
            .expect("answer");
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
        assert_eq!(
            header(&response, "x-where"),
            Some(format!("https://localhost:{tls_port}")),
            "{version:?}"
        );
        assert_eq!(
            header(&response, "x-who").as_deref(),
            Some("127.0.0.1"),
            "{version:?}"
        );
    }
}
