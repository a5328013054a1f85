//! Static sites: serving, validators, ranges, compression done once, edits, and safety.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use reqwest::blocking::Response;
use serde_json::Value;

use crate::util::{self, Group, Options, gunzip, raw_http, unbrotli, unzstd, wait_until};

fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// The raw response to a GET of `path` as sent (no client normalises it), asserted to be a
/// refusal: 400, 403 or 404. `headers`: extra header lines, each ending in CRLF.
fn refused(port: u16, path: &str, headers: &str) -> String {
    let response = raw_http(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Connection: close\r\n\r\n"),
    );
    let status = response.get(9..12).unwrap_or("");
    assert!(
        status == "403" || status == "404" || status == "400",
        "{path}: {response}"
    );
    response
}

#[test]
fn sites_are_served_with_types_validators_and_cache_headers() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    let client = &group.client;

    let landing = client.get(group.url("/")).send().unwrap();
    assert_eq!(landing.status(), 200);
    assert_eq!(header(&landing, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&landing, "cache-control"), "no-cache");
    assert!(header(&landing, "etag").starts_with('"'));
    assert!(!header(&landing, "last-modified").is_empty());
    let html = landing.text().unwrap();
    assert!(
        html.contains("src=\"/open/\"") && html.contains("src=\"/close/\""),
        "the landing page frames both sites"
    );

    for (path, mime) in [
        ("/open/", "text/html; charset=utf-8"),
        ("/close/", "text/html; charset=utf-8"),
        ("/style.css", "text/css; charset=utf-8"),
        ("/logo.svg", "image/svg+xml"),
    ] {
        let response = client.get(group.url(path)).send().unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(header(&response, "content-type"), mime, "{path}");
    }

    // A directory without its slash, the route itself and one below it.
    let response = client.get(group.url("/open?x=1")).send().unwrap();
    assert_eq!(
        (response.status().as_u16(), header(&response, "location")),
        (301, "/open/?x=1".into())
    );
    fs::create_dir_all(group.dir.path().join("files/docs")).unwrap();
    fs::write(
        group.dir.path().join("files/docs/index.html"),
        "<p>docs</p>",
    )
    .unwrap();
    let response = client.get(group.url("/files/docs")).send().unwrap();
    assert_eq!(
        (response.status().as_u16(), header(&response, "location")),
        (301, "/files/docs/".into())
    );
    assert_eq!(
        client
            .get(group.url("/files/docs/"))
            .send()
            .unwrap()
            .text()
            .unwrap(),
        "<p>docs</p>"
    );

    // Methods.
    let response = client.post(group.url("/open/")).send().unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(header(&response, "allow"), "GET, HEAD");
    let head = client.head(group.url("/open/")).send().unwrap();
    assert_eq!(head.status(), 200);
    assert!(header(&head, "content-length").parse::<u64>().unwrap() > 0);
    assert!(head.bytes().unwrap().is_empty());

    // Missing files: HTML for browsers, JSON for everyone else.
    let response = client
        .get(group.url("/open/missing.html"))
        .header("accept", "text/html,*/*")
        .send()
        .unwrap();
    assert_eq!(response.status(), 404);
    assert!(header(&response, "content-type").starts_with("text/html"));
    let response = client
        .get(group.url("/open/missing.html"))
        .header("accept", "application/json")
        .send()
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().unwrap();
    assert_eq!(body["error"], "not_found");
    assert!(body["request_id"].is_string());
}

#[test]
fn conditional_and_range_requests() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    let client = &group.client;
    let content: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    fs::write(group.dir.path().join("files/data.bin"), &content).unwrap();
    let url = group.url("/files/data.bin");

    let full = client.get(&url).send().unwrap();
    let (etag, modified) = (header(&full, "etag"), header(&full, "last-modified"));
    assert_eq!(header(&full, "cache-control"), "max-age=60");
    assert_eq!(header(&full, "accept-ranges"), "bytes");
    assert_eq!(full.bytes().unwrap().as_ref(), &content[..]);

    let response = client
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .unwrap();
    assert_eq!(response.status(), 304);
    assert_eq!(header(&response, "etag"), etag);
    assert_eq!(
        header(&response, "content-length"),
        "",
        "a 304 carries no Content-Length"
    );
    assert!(response.bytes().unwrap().is_empty());
    let response = client
        .get(&url)
        .header("if-none-match", "\"other\", W/".to_string() + &etag)
        .send()
        .unwrap();
    assert_eq!(response.status(), 304, "weak comparison over a list");
    let response = client
        .get(&url)
        .header("if-modified-since", &modified)
        .send()
        .unwrap();
    assert_eq!(response.status(), 304);
    let response = client
        .get(&url)
        .header("if-none-match", "\"other\"")
        .header("if-modified-since", &modified)
        .send()
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "If-None-Match wins over If-Modified-Since"
    );

    let response = client
        .get(&url)
        .header("range", "bytes=10-19")
        .send()
        .unwrap();
    assert_eq!(response.status(), 206);
    assert_eq!(header(&response, "content-range"), "bytes 10-19/5000");
    assert_eq!(response.bytes().unwrap().as_ref(), &content[10..20]);
    let response = client
        .get(&url)
        .header("range", "bytes=-100")
        .send()
        .unwrap();
    assert_eq!(header(&response, "content-range"), "bytes 4900-4999/5000");
    assert_eq!(response.bytes().unwrap().as_ref(), &content[4900..]);
    let response = client
        .get(&url)
        .header("range", "bytes=10-19")
        .header("if-range", &etag)
        .send()
        .unwrap();
    assert_eq!(response.status(), 206);
    let response = client
        .get(&url)
        .header("range", "bytes=10-19")
        .header("if-range", "\"stale\"")
        .send()
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "a stale If-Range gets the whole file"
    );
    assert_eq!(response.bytes().unwrap().len(), 5000);
    let response = client
        .get(&url)
        .header("range", "bytes=5000-")
        .send()
        .unwrap();
    assert_eq!(response.status(), 416);
    assert_eq!(header(&response, "content-range"), "bytes */5000");

    // A file too large to hold in memory is streamed, ranges included.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    fs::write(group.dir.path().join("files/big.bin"), &big).unwrap();
    let response = client.get(group.url("/files/big.bin")).send().unwrap();
    assert_eq!(response.bytes().unwrap().as_ref(), &big[..]);
    let response = client
        .get(group.url("/files/big.bin"))
        .header("range", "bytes=100000-100099")
        .send()
        .unwrap();
    assert_eq!(response.status(), 206);
    assert_eq!(response.bytes().unwrap().as_ref(), &big[100_000..100_100]);
}

#[test]
fn compression_is_negotiated_and_done_once_per_version() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    let client = &group.client;
    let text = "gatehouse compresses text once per version. ".repeat(200);
    let path = group.dir.path().join("files/page.html");
    fs::write(&path, &text).unwrap();
    let url = group.url("/files/page.html");
    let get = |accept: &str| {
        client
            .get(&url)
            .header("accept-encoding", accept)
            .send()
            .unwrap()
    };

    let identity = get("identity");
    let identity_etag = header(&identity, "etag");
    assert_eq!(header(&identity, "content-encoding"), "");
    assert_eq!(header(&identity, "vary"), "Accept-Encoding");
    assert_eq!(identity.text().unwrap(), text);

    let gzip = get("gzip");
    assert_eq!(header(&gzip, "content-encoding"), "gzip");
    assert_eq!(header(&gzip, "vary"), "Accept-Encoding");
    let gzip_etag = header(&gzip, "etag");
    let body = gzip.bytes().unwrap();
    assert!(body.len() < text.len() / 4);
    assert_eq!(gunzip(&body), text.as_bytes());

    let br = get("gzip;q=0.5, br");
    assert_eq!(header(&br, "content-encoding"), "br");
    let br_etag = header(&br, "etag");
    assert_eq!(unbrotli(&br.bytes().unwrap()), text.as_bytes());
    assert_eq!(
        header(&get("br;q=0.1, gzip;q=0.9"), "content-encoding"),
        "gzip"
    );
    assert_eq!(
        header(&get("gzip;q=0, br;q=0"), "content-encoding"),
        "",
        "identity fallback"
    );
    assert_eq!(
        header(&get("deflate"), "content-encoding"),
        "",
        "unknown codings fall back to identity"
    );
    // zstd by q-value; brotli wins a tie (the smaller text), zstd one with gzip.
    let zstd = get("gzip;q=0.5, br;q=0.5, zstd");
    assert_eq!(header(&zstd, "content-encoding"), "zstd");
    let zstd_etag = header(&zstd, "etag");
    assert_eq!(unzstd(&zstd.bytes().unwrap()), text.as_bytes());
    assert_eq!(
        header(&get("gzip, deflate, br, zstd"), "content-encoding"),
        "br"
    );
    assert_eq!(header(&get("gzip, zstd"), "content-encoding"), "zstd");
    let etags = [&identity_etag, &gzip_etag, &br_etag, &zstd_etag];
    let distinct: std::collections::BTreeSet<_> = etags.iter().collect();
    assert_eq!(distinct.len(), 4, "{etags:?}");
    assert_eq!(
        get("gzip").headers()["etag"],
        gzip_etag.as_str(),
        "the same variant keeps its ETag"
    );
    let response = client
        .get(&url)
        .header("accept-encoding", "gzip")
        .header("if-none-match", &gzip_etag)
        .send()
        .unwrap();
    assert_eq!(response.status(), 304);

    // A text file too large to hold in memory is streamed as it is: never compressed per request.
    fs::write(
        group.dir.path().join("files/huge.txt"),
        "large text ".repeat(10_000),
    )
    .unwrap();
    let huge = client
        .get(group.url("/files/huge.txt"))
        .header("accept-encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(header(&huge, "content-encoding"), "");
    assert_eq!(huge.bytes().unwrap().len(), 110_000);

    // Small files and images are sent as they are.
    fs::write(group.dir.path().join("files/tiny.txt"), "tiny").unwrap();
    assert_eq!(
        header(
            &client
                .get(group.url("/files/tiny.txt"))
                .header("accept-encoding", "gzip")
                .send()
                .unwrap(),
            "content-encoding"
        ),
        ""
    );
    fs::write(group.dir.path().join("files/pic.png"), vec![7u8; 4096]).unwrap();
    assert_eq!(
        header(
            &client
                .get(group.url("/files/pic.png"))
                .header("accept-encoding", "gzip")
                .send()
                .unwrap(),
            "content-encoding"
        ),
        ""
    );

    // A precompressed file beside the original is served as it is (nginx gzip_static).
    let sidecar_text = "precompressed by the build, not by the server ".repeat(50);
    let plain = group.dir.path().join("files/app.js");
    fs::write(&plain, "x".repeat(sidecar_text.len())).unwrap();
    thread::sleep(Duration::from_millis(20));
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut encoder, sidecar_text.as_bytes()).unwrap();
    fs::write(
        group.dir.path().join("files/app.js.gz"),
        encoder.finish().unwrap(),
    )
    .unwrap();
    let response = client
        .get(group.url("/files/app.js"))
        .header("accept-encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(header(&response, "content-encoding"), "gzip");
    assert_eq!(gunzip(&response.bytes().unwrap()), sidecar_text.as_bytes());
    // And a `.zst` one (zstd's own suffix), for clients that prefer zstd.
    let zst = zstd::bulk::compress(sidecar_text.as_bytes(), 1).unwrap();
    fs::write(group.dir.path().join("files/app.js.zst"), zst).unwrap();
    let response = client
        .get(group.url("/files/app.js"))
        .header("accept-encoding", "zstd")
        .send()
        .unwrap();
    assert_eq!(header(&response, "content-encoding"), "zstd");
    assert_eq!(unzstd(&response.bytes().unwrap()), sidecar_text.as_bytes());

    // Large JSON from a backend is compressed too (a long path makes a long 404 message).
    let long = format!("/api/{}", "n".repeat(2000));
    let response = client
        .get(group.url(&long))
        .header("accept-encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(header(&response, "content-encoding"), "gzip");
    let body: Value = serde_json::from_slice(&gunzip(&response.bytes().unwrap())).unwrap();
    assert_eq!(body["error"], "not_found");
    let small = client
        .get(group.url("/api/ping"))
        .header("accept-encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(
        header(&small, "content-encoding"),
        "",
        "small responses are not worth it"
    );
}

#[test]
fn an_edit_on_disk_is_served_on_the_next_request() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    let client = &group.client;
    let path = group.dir.path().join("files/news.txt");
    let url = group.url("/files/news.txt");
    fs::write(&path, "version one ".repeat(100)).unwrap();
    let first = client
        .get(&url)
        .header("accept-encoding", "gzip")
        .send()
        .unwrap();
    let first_etag = header(&first, "etag");
    assert_eq!(
        gunzip(&first.bytes().unwrap()),
        "version one ".repeat(100).as_bytes()
    );

    // Same size, new content: the modification time alone tells them apart.
    fs::write(&path, "version two ".repeat(100)).unwrap();
    let second = client
        .get(&url)
        .header("accept-encoding", "gzip")
        .send()
        .unwrap();
    assert_ne!(header(&second, "etag"), first_etag);
    assert_eq!(
        gunzip(&second.bytes().unwrap()),
        "version two ".repeat(100).as_bytes()
    );
    assert_eq!(
        client.get(&url).send().unwrap().text().unwrap(),
        "version two ".repeat(100)
    );

    fs::remove_file(&path).unwrap();
    assert_eq!(
        client.get(&url).send().unwrap().status(),
        404,
        "a deleted file is gone at once"
    );
}

#[test]
fn with_a_check_interval_an_edit_is_served_once_it_has_passed() {
    let group = Group::start(Options {
        backends: 1,
        static_extra: "check_interval = \"1500ms\"".into(),
        ..Options::default()
    });
    let path = group.dir.path().join("files/news.txt");
    let body = || group.get("/files/news.txt").unwrap().text().unwrap();
    fs::write(&path, "version one").unwrap();
    assert_eq!(body(), "version one");
    let edited = Instant::now();
    fs::write(&path, "version two").unwrap();
    // Within the interval the file is not looked at: the copy in memory is served.
    assert_eq!(body(), "version one");
    assert!(
        wait_until(Duration::from_secs(5), || body() == "version two"),
        "the edit was never served"
    );
    let after = edited.elapsed();
    assert!(
        after > Duration::from_millis(1000) && after < Duration::from_millis(2500),
        "the edit was served after {after:?}"
    );
}

#[test]
fn traversal_dotfiles_and_symlinks_never_leave_the_root() {
    let group = Group::start(Options {
        tls: false,
        backends: 1,
        ..Options::default()
    });
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret.txt"), "TOP-SECRET").unwrap();
    let files = group.dir.path().join("files");
    fs::write(files.join(".env"), "TOP-SECRET").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), files.join("link.txt")).unwrap();
    std::os::unix::fs::symlink(outside.path(), files.join("linkdir")).unwrap();
    fs::write(files.join("inside.txt"), "fine").unwrap();
    std::os::unix::fs::symlink(files.join("inside.txt"), files.join("good-link.txt")).unwrap();
    let secret_rel = outside.path().join("secret.txt").display().to_string();

    let probes = [
        "/files/../gatehouse.toml".to_string(),
        "/files/%2e%2e/gatehouse.toml".into(),
        "/files/%2E%2E/gatehouse.toml".into(),
        "/files/..%2fgatehouse.toml".into(),
        "/files/%2e%2e%2fgatehouse.toml".into(),
        "/files/%252e%252e/gatehouse.toml".into(),
        "/files/..%5cgatehouse.toml".into(),
        "/files/..\\gatehouse.toml".into(),
        "/files/inside.txt%00.png".into(),
        format!("/files/{secret_rel}"),
        format!("/files//{secret_rel}"),
        "/files/.env".into(),
        "/files/%2eenv".into(),
        "/files/link.txt".into(),
        "/files/linkdir/secret.txt".into(),
        "/open/../close/index.html".into(),
        "/open/%2e%2e/close/index.html".into(),
    ];
    for probe in &probes {
        let response = refused(group.port, probe, "");
        assert!(
            !response.contains("TOP-SECRET") && !response.contains("[proxy]"),
            "{probe} leaked: {response}"
        );
    }
    // A symlink to a dotfile is refused like the dotfile itself.
    std::os::unix::fs::symlink(files.join(".env"), files.join("env.txt")).unwrap();
    let response = raw_http(
        group.port,
        "GET /files/env.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(
        response.starts_with("HTTP/1.1 404") && !response.contains("TOP-SECRET"),
        "{response}"
    );
    // Doubled slashes name the same file, and a directory redirect is built from the
    // normalised path, never a protocol-relative `//host` one.
    fs::create_dir_all(files.join("docs")).unwrap();
    let response = raw_http(
        group.port,
        "GET /files//docs HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 301"), "{response}");
    assert!(
        response
            .to_ascii_lowercase()
            .contains("location: /files/docs/\r\n"),
        "{response}"
    );
    let response = raw_http(
        group.port,
        "GET /files//inside.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("fine"),
        "{response}"
    );
    // A symlink that stays inside the root is fine.
    let response = raw_http(
        group.port,
        "GET /files/good-link.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(
        response.starts_with("HTTP/1.1 200") && response.ends_with("fine"),
        "{response}"
    );
}

/// A single-page app: its own error pages for browsers (JSON still for API clients), and its
/// shell for every client-side route, never for what the path guard or the root refuses.
#[test]
fn error_pages_and_the_fallback_for_client_side_routes() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    fs::create_dir_all(app.join("assets")).unwrap();
    // Large enough to be compressed.
    let shell = format!(
        "<!doctype html><title>app shell</title>{}",
        "<div>route here</div>".repeat(100)
    );
    fs::write(app.join("index.html"), &shell).unwrap();
    fs::write(app.join("404.html"), "<h1>custom missing page</h1>").unwrap();
    fs::write(app.join("denied.html"), "<h1>custom denied page</h1>").unwrap();
    fs::write(app.join("assets/app.js"), "console.log(1)").unwrap();
    fs::write(app.join(".env"), "TOP-SECRET").unwrap();
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret.txt"), "TOP-SECRET").unwrap();
    std::os::unix::fs::symlink(outside.path(), app.join("out")).unwrap();
    let group = Group::start_in(
        dir,
        Options {
            tls: false,
            backends: 1,
            extra: r#"
[[routes]]
prefix = "/app/"
static_dir = "app"
cache_control = "public, max-age=31536000, immutable"
fallback = "index.html"
error_pages = { 404 = "404.html" }

[[routes]]
prefix = "/shut/"
static_dir = "app"
deny = ["127.0.0.0/8"]
error_pages = { 403 = "denied.html" }
"#
            .into(),
            ..Options::default()
        },
    );
    let client = &group.client;
    let get = |path: &str, accept: &str| {
        client
            .get(group.url(path))
            .header("accept", accept)
            .send()
            .unwrap()
    };

    // A client-side route: the shell, revalidated each time, with the file's validators.
    let deep = get("/app/some/deep/route", "text/html");
    assert_eq!(deep.status(), 200);
    assert_eq!(header(&deep, "cache-control"), "no-cache");
    assert_eq!(header(&deep, "content-type"), "text/html; charset=utf-8");
    let etag = header(&deep, "etag");
    assert!(etag.starts_with('"'), "{etag}");
    assert_eq!(deep.text().unwrap(), shell);
    let again = client
        .get(group.url("/app/users/42/"))
        .header("if-none-match", &etag)
        .send()
        .unwrap();
    assert_eq!(again.status(), 304);
    let gzipped = client
        .get(group.url("/app/settings"))
        .header("accept-encoding", "gzip")
        .send()
        .unwrap();
    assert_eq!(gzipped.status(), 200);
    assert_eq!(header(&gzipped, "content-encoding"), "gzip");
    assert_eq!(gunzip(&gzipped.bytes().unwrap()), shell.as_bytes());
    let head = client.head(group.url("/app/some/route")).send().unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-length"), shell.len().to_string());
    assert!(head.bytes().unwrap().is_empty());
    // Real files keep the route's own Cache-Control; other methods are still refused.
    let asset = get("/app/assets/app.js", "*/*");
    assert_eq!(asset.status(), 200);
    assert_eq!(
        header(&asset, "cache-control"),
        "public, max-age=31536000, immutable"
    );
    let post = client.post(group.url("/app/some/route")).send().unwrap();
    assert_eq!(post.status(), 405);

    // A missing asset is a 404: the route's page for a browser, JSON for an API client.
    let page = get("/app/assets/missing.js", "text/html,*/*");
    assert_eq!(page.status(), 404);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    assert!(!header(&page, "x-request-id").is_empty());
    // Which form it takes depends on Accept: no cache keeps it or hands it to another client.
    assert_eq!(header(&page, "cache-control"), "no-store");
    let vary: Vec<_> = page.headers().get_all("vary").iter().collect();
    assert!(vary.iter().any(|v| *v == "Accept"), "{vary:?}");
    assert_eq!(page.text().unwrap(), "<h1>custom missing page</h1>");
    let api = get("/app/assets/missing.js", "application/json");
    assert_eq!(api.status(), 404);
    assert_eq!(header(&api, "cache-control"), "no-store");
    assert_eq!(header(&api, "vary"), "Accept");
    let body: Value = api.json().unwrap();
    assert_eq!(body["error"], "not_found");
    // An access refusal: the route's page, with the refusal's status.
    let denied = get("/shut/", "text/html");
    assert_eq!(denied.status(), 403);
    assert_eq!(denied.text().unwrap(), "<h1>custom denied page</h1>");
    let denied = get("/shut/", "application/json");
    assert_eq!(denied.status(), 403);
    assert_eq!(denied.json::<Value>().unwrap()["error"], "forbidden");

    // Traversal, dotfiles and a symlink out of the root never get the shell.
    for probe in [
        "/app/../../etc/passwd",
        "/app/%2e%2e/%2e%2e/etc/passwd",
        "/app/..%2f..%2fetc/passwd",
        "/app/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/app/..\\..\\etc\\passwd",
        "/app/.env",
        "/app/%2eenv",
        "/app/.git/config",
        "/app/out",
        "/app/out/secret.txt",
    ] {
        let response = refused(group.port, probe, "Accept: text/html\r\n");
        assert!(
            !response.contains("app shell") && !response.contains("TOP-SECRET"),
            "{probe} got the fallback: {response}"
        );
    }

    // A reload naming a fallback that is not there is refused; the running one stays.
    let path = group.dir.path().join("gatehouse.toml");
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("fallback = \"index.html\""), "{text}");
    // The error names the route by its place in the config's table.
    let route = text[..text.find("fallback = \"index.html\"").unwrap()]
        .matches("[[routes]]")
        .count()
        - 1;
    fs::write(
        &path,
        text.replacen("fallback = \"index.html\"", "fallback = \"gone.html\"", 1),
    )
    .unwrap();
    util::signal(group.pid(), libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || {
            group.metric(r#"gatehouse_reloads_total{result="failed"}"#) == Some(1.0)
        }),
        "the reload was not refused:\n{}",
        group.log()
    );
    assert!(
        group.log().contains(&format!("routes[{route}].fallback: ")),
        "{}",
        group.log()
    );
    assert_eq!(get("/app/after/reload", "text/html").text().unwrap(), shell);
}
