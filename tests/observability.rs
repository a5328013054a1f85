//! Metrics, readiness, access logs and request ids, seen from outside: the admin listener
//! scraped over HTTP, the log files read from disk.

use std::{
    fs,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::util::{
    self, BIN, Group, Options, PASSWORD, Redis, USER, metric_sum as sum, metric_value, wait_until,
};

/// Every value in `text` of the series whose name and labels contain all of `parts`, summed.
fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

const ROUTES: &str = r#"
[rate_limits.tight]
per_second = 0.5
burst = 1

[[routes]]
prefix = "/private/"
static_dir = "files"
allow = ["10.0.0.0/8"]

[[routes]]
prefix = "/limited/"
static_dir = "files"
rate_limit = "tight"

[[routes]]
prefix = "/members/"
static_dir = "files"
htpasswd = "htpasswd"
access_log = "logs/members.log"
"#;

fn observed_group(options: Options) -> Group {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(repo_file("conf/htpasswd"), dir.path().join("htpasswd")).unwrap();
    fs::create_dir_all(dir.path().join("files")).unwrap();
    fs::write(dir.path().join("files/index.html"), "x".repeat(4096)).unwrap();
    Group::start_in(
        dir,
        Options {
            extra: ROUTES.to_string() + &options.extra,
            ..options
        },
    )
}

#[test]
fn every_series_moves_when_its_feature_acts() {
    let group = observed_group(Options::default());
    let before = group.admin("/metrics").1;
    let api = r#"route="/api/""#;

    assert_eq!(group.get("/api/ping").unwrap().status(), 200);
    let gzip = |path: &str| {
        group
            .client
            .get(group.url(path))
            .header("accept-encoding", "gzip")
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(gzip("/open/"), 200);
    assert_eq!(gzip("/open/"), 200);
    assert_eq!(group.get("/private/").unwrap().status(), 403);
    assert_eq!(group.get("/limited/").unwrap().status(), 200);
    assert_eq!(group.get("/limited/").unwrap().status(), 429);
    assert_eq!(group.get("/members/").unwrap().status(), 401);
    assert_eq!(group.login(USER, "wrong").status(), 401);
    assert_eq!(group.login(USER, PASSWORD).status(), 200);
    // The plain HTTP listener redirects: no route took it.
    let redirect = group
        .client
        .get(group.http_url("/api/ping"))
        .send()
        .unwrap();
    assert_eq!(redirect.status(), 301);

    // The test's client keeps its connection open while the scrape counts it.
    let (status, after) = group.admin("/metrics");
    assert_eq!(status, 200);
    let moved = |name: &str, parts: &[&str]| sum(&after, name, parts) - sum(&before, name, parts);
    assert_eq!(
        moved(
            "gatehouse_http_requests_total",
            &[api, r#"method="GET""#, r#"status="2xx""#]
        ),
        1.0
    );
    assert!(moved("gatehouse_http_request_duration_seconds_count", &[api]) >= 1.0);
    assert_eq!(
        moved(
            "gatehouse_http_requests_total",
            &[r#"route="none""#, r#"method="GET""#, r#"status="3xx""#]
        ),
        1.0
    );
    for (encoding, cache) in [("gzip", "miss"), ("gzip", "hit")] {
        assert_eq!(
            moved(
                "gatehouse_static_responses_total",
                &[
                    r#"route="/open/""#,
                    &format!(r#"encoding="{encoding}""#),
                    &format!(r#"cache="{cache}""#)
                ]
            ),
            1.0,
            "{encoding} {cache}"
        );
    }
    assert_eq!(
        moved("gatehouse_denied_total", &[r#"route="/private/""#]),
        1.0
    );
    assert_eq!(
        moved("gatehouse_rate_limited_total", &[r#"route="/limited/""#]),
        1.0
    );
    assert_eq!(
        moved("gatehouse_auth_failures_total", &[r#"route="/members/""#]),
        1.0
    );
    // The backends' own series, merged in with a `backend` label.
    assert_eq!(
        moved(
            "gatehouse_backend_http_requests_total",
            &[r#"endpoint="ping""#, r#"status="2xx""#]
        ),
        1.0
    );
    assert_eq!(
        moved("gatehouse_backend_logins_total", &[r#"outcome="refused""#]),
        1.0
    );
    assert_eq!(
        moved("gatehouse_backend_logins_total", &[r#"outcome="success""#]),
        1.0
    );
    for backend in ["b1", "b2", "b3"] {
        let up = format!(r#"gatehouse_backend_up{{backend="{backend}"}}"#);
        assert_eq!(metric_value(&after, &up), Some(1.0), "{up}");
        let redis = format!(r#"gatehouse_backend_redis_up{{backend="{backend}"}}"#);
        assert_eq!(metric_value(&after, &redis), Some(1.0), "{redis}");
    }
    // One `# TYPE` per family, however many backends report it.
    assert_eq!(
        after
            .matches("# TYPE gatehouse_backend_http_requests_total ")
            .count(),
        1
    );
    let handshakes = metric_value(&after, "gatehouse_tls_handshakes_total").unwrap();
    assert!(handshakes >= 1.0);
    assert!(metric_value(&after, "gatehouse_tls_connections_total").unwrap() >= handshakes);
    assert!(metric_value(&after, "gatehouse_open_connections").unwrap() >= 1.0);
    assert_eq!(metric_value(&after, "gatehouse_redis_up"), Some(1.0));
    assert_eq!(
        metric_value(&after, r#"gatehouse_supervisor_child_up{child="proxy"}"#),
        Some(1.0)
    );

    // A backend that dies is restarted, and the scrape says so.
    let b2 = group.child_pid("--id b2").expect("backend b2");
    util::signal(b2, libc::SIGKILL);
    assert!(
        wait_until(Duration::from_secs(10), || {
            group.metric(r#"gatehouse_supervisor_restarts_total{child="b2"}"#) == Some(1.0)
        }),
        "restart not counted"
    );
    // The public /healthz says only that the proxy is alive.
    let health: Value = group.get("/healthz").unwrap().json().unwrap();
    assert_eq!(health, serde_json::json!({"status": "ok"}));
    // The admin listener's own health, and nothing else on it.
    assert_eq!(group.admin("/healthz").0, 200);
    assert_eq!(group.admin("/other").0, 404);
}

#[test]
fn a_hung_backend_is_counted_as_a_timeout_and_leaves_rotation() {
    let group = Group::start(Options {
        backends: 1,
        keys: "upstream.read_timeout = \"1s\"".into(),
        ..Options::default()
    });
    let backend = group.child_pid("--id b1").expect("backend b1");
    util::signal(backend, libc::SIGSTOP);
    let response = group.get("/api/ping").unwrap();
    let (status, id) = (response.status(), request_id(&response));
    let up = r#"gatehouse_backend_up{backend="b1"}"#;
    let down = wait_until(Duration::from_secs(10), || group.metric(up) == Some(0.0));
    let timeouts = group.metric(r#"gatehouse_upstream_errors_total{backend="b1",kind="timeout"}"#);
    let (ready, body) = group.admin("/readyz");
    util::signal(backend, libc::SIGCONT);
    assert_eq!(status, 504);
    assert_eq!(timeouts, Some(1.0));
    let line = group
        .log()
        .lines()
        .find(|l| l.contains(&id))
        .map(str::to_owned);
    assert!(
        line.as_deref().is_some_and(|l| l.contains("status: 504")),
        "the proxy's log line about the 504 lacks its request id: {line:?}"
    );
    assert!(down, "the hung backend stayed in rotation");
    assert_eq!(ready, 503, "{body}");
    assert!(
        wait_until(Duration::from_secs(10), || group.metric(up) == Some(1.0)),
        "the backend did not come back"
    );
    assert_eq!(group.admin("/readyz").0, 200);
}

#[test]
fn readyz_follows_redis() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(dir.path());
    let group = Group::start(Options {
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let (status, body) = group.admin("/readyz");
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["redis"], "up");
    assert_eq!(body["backends"]["b1"], "up");

    redis.stop();
    assert!(
        wait_until(Duration::from_secs(10), || group.admin("/readyz").0 == 503),
        "still ready with Redis stopped"
    );
    let body: Value = serde_json::from_str(&group.admin("/readyz").1).unwrap();
    assert_eq!(body["ready"], false);
    assert_eq!(body["redis"], "down");
    assert!(
        wait_until(Duration::from_secs(5), || group
            .metric("gatehouse_redis_up")
            == Some(0.0)),
        "gatehouse_redis_up stayed 1"
    );
    // The health check says ready for containers only when it is.
    let config = group.dir.path().join("gatehouse.toml");
    let check = |args: &[&str]| {
        Command::new(BIN)
            .arg("healthcheck")
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(check(&[]), Some(0), "alive");
    assert_eq!(check(&["--ready"]), Some(1), "not ready");

    redis.restart();
    assert!(
        wait_until(Duration::from_secs(15), || group.admin("/readyz").0 == 200),
        "not ready again after Redis came back"
    );
    assert_eq!(check(&["--ready"]), Some(0));
}

fn log_lines(group: &Group, file: &str) -> Vec<Value> {
    fs::read_to_string(group.dir.path().join("logs").join(file))
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn wait_for_line(group: &Group, file: &str, request_id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(line) = log_lines(group, file)
            .into_iter()
            .find(|l| l["request_id"] == request_id)
        {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no line for {request_id} in {file}"
        );
        sleep(Duration::from_millis(50));
    }
}

fn request_id(response: &reqwest::blocking::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn access_logs_land_in_the_routes_files_with_every_field_and_no_secret() {
    let group = observed_group(Options {
        env: vec![("GATEHOUSE_LOG_FORMAT".into(), "json".into())],
        ..Options::default()
    });
    let token = group.token();
    let response = group
        .client
        .get(group.url("/api/count"))
        .bearer_auth(&token)
        .header("user-agent", "observability-test/1")
        .header(
            "referer",
            "https://example.com/page?token=from-the-referer#frag",
        )
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    // The header that names the user for the log never reaches the client.
    assert!(response.headers().get("x-gatehouse-user").is_none());
    let line = wait_for_line(&group, "access.log", &request_id(&response));
    for field in [
        "time",
        "request_id",
        "client",
        "method",
        "path",
        "status",
        "bytes",
        "duration_ms",
        "upstream",
        "upstream_ms",
        "user",
        "user_agent",
    ] {
        assert!(line.get(field).is_some(), "{field} missing: {line}");
    }
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/api/count");
    assert_eq!(line["status"], 200);
    assert_eq!(line["user"], USER, "the JWT's subject");
    assert_eq!(line["user_agent"], "observability-test/1");
    assert_eq!(
        line["referer"], "https://example.com/page",
        "without its query"
    );
    assert!(line["upstream"].as_str().unwrap().starts_with('b'));
    assert!(line["upstream_ms"].as_f64().unwrap() <= line["duration_ms"].as_f64().unwrap());
    assert!(line["bytes"].as_u64().unwrap() > 0);

    // Basic auth on a route with its own file: the user, never the password.
    let response = group
        .client
        .get(group.url("/members/?password=hunter2"))
        .basic_auth("admin", Some("homework"))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let line = wait_for_line(&group, "members.log", &request_id(&response));
    assert_eq!(line["user"], "admin");
    assert_eq!(line["path"], "/members/", "the query string is left out");
    assert!(
        log_lines(&group, "access.log")
            .iter()
            .all(|l| l["request_id"] != line["request_id"]),
        "a route's line went to the default log too"
    );

    // A failed login: in the log with its request id, in the backend's log too.
    let response = group.login(USER, "not-the-password");
    let id = request_id(&response);
    let line = wait_for_line(&group, "access.log", &id);
    assert_eq!(line["status"], 401);
    assert!(
        wait_until(Duration::from_secs(5), || group.log().contains(&id)),
        "the backend's log line lacks the request id"
    );

    // No secret anywhere: not the token, not a password, not the Authorization header.
    let mut everything = String::new();
    for entry in fs::read_dir(group.dir.path().join("logs")).unwrap() {
        everything += &fs::read_to_string(entry.unwrap().path()).unwrap();
    }
    everything += &group.log();
    let signature = token.rsplit('.').next().unwrap();
    for secret in [
        signature,
        "homework",
        "hunter2",
        "not-the-password",
        "Basic ",
        "from-the-referer",
    ] {
        assert!(!everything.contains(secret), "{secret:?} was logged");
    }
    // Application logs are JSON lines when configured.
    let app_line = group
        .log()
        .lines()
        .find(|l| l.contains("gatehouse is up"))
        .map(str::to_owned)
        .unwrap();
    let app_line: Value = serde_json::from_str(&app_line).unwrap();
    assert_eq!(app_line["level"], "INFO");
}

#[test]
fn request_and_correlation_ids_come_from_trusted_proxies_only_and_reach_the_backend() {
    let group = Group::start(Options {
        keys: r#"access.trusted_proxies = ["127.0.0.3"]"#.into(),
        logging_extra: r#"access_log_format = "combined""#.into(),
        ..Options::default()
    });
    let send_to = |client: &reqwest::blocking::Client, path: &str| {
        client
            .get(group.url(path))
            .header("x-request-id", "trace-42")
            .header("x-correlation-id", "tx-7")
            .send()
            .unwrap()
    };
    let send = |client: &reqwest::blocking::Client| send_to(client, "/api/nothing");
    let response = send(&group.client_from("127.0.0.3"));
    assert_eq!(response.headers()["x-request-id"], "trace-42");
    assert_eq!(response.headers()["x-correlation-id"], "tx-7");
    // The backend saw both: they are in the backend's error body.
    let body: Value = response.json().unwrap();
    assert_eq!(body["request_id"], "trace-42");
    assert_eq!(body["correlation_id"], "tx-7");
    // And in the proxy's own errors (a static site's 404).
    let response = send_to(&group.client_from("127.0.0.3"), "/files/no-such-file");
    assert_eq!(response.status(), 404);
    assert!(response.headers().get("x-backend-id").is_none());
    assert_eq!(response.headers()["x-correlation-id"], "tx-7");
    let body: Value = response.json().unwrap();
    assert_eq!(body["correlation_id"], "tx-7");

    // Anyone else's are replaced: the correlation id is then the request id.
    let response = send(&group.client_from("127.0.0.4"));
    let headers = response.headers().clone();
    assert_ne!(headers["x-request-id"], "trace-42");
    assert_eq!(headers["x-correlation-id"], headers["x-request-id"]);
    let body: Value = response.json().unwrap();
    assert_eq!(body["correlation_id"], body["request_id"]);
    assert_ne!(
        body["request_id"], "trace-42",
        "an untrusted id reached the backend"
    );

    // nginx's combined format, with the request id and times after it.
    let log = group.dir.path().join("logs/access.log");
    assert!(
        wait_until(Duration::from_secs(5), || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(" trace-42 ")
        }),
        "no combined line"
    );
    let text = fs::read_to_string(&log).unwrap();
    let line = text.lines().find(|l| l.contains(" trace-42 ")).unwrap();
    assert!(line.starts_with("127.0.0.3 - - ["), "{line}");
    assert!(
        line.ends_with(" tx-7"),
        "the correlation id ends the line: {line}"
    );
    assert!(
        line.contains(r#""GET /api/nothing HTTP/2.0" 404 "#)
            || line.contains(r#""GET /api/nothing HTTP/1.1" 404 "#),
        "{line}"
    );
}

#[test]
fn sigusr1_reopens_the_access_logs_after_logrotate_moves_them() {
    let group = Group::start(Options::default());
    let log = group.dir.path().join("logs/access.log");
    let rotated = group.dir.path().join("logs/access.log.1");
    let first = request_id(&group.get("/api/ping").unwrap());
    assert!(wait_until(Duration::from_secs(5), || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&first)
    }));
    fs::rename(&log, &rotated).unwrap();
    // To the supervisor, as logrotate's postrotate would: it passes it on to the proxy.
    util::signal(group.pid(), libc::SIGUSR1);
    assert!(
        wait_until(Duration::from_secs(5), || group
            .log()
            .contains("access logs reopened")),
        "no reopen:\n{}",
        group.log()
    );
    let second = request_id(&group.get("/api/ping").unwrap());
    assert!(
        wait_until(Duration::from_secs(5), || {
            fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&second)
        }),
        "nothing in the new file"
    );
    let old = fs::read_to_string(&rotated).unwrap();
    assert!(old.contains(&first) && !old.contains(&second));
}

#[test]
fn the_last_lines_are_written_before_the_proxy_exits() {
    let mut group = Group::start(Options::default());
    let ids: Vec<String> = (0..20)
        .map(|_| request_id(&group.get("/api/ping").unwrap()))
        .collect();
    util::signal(group.pid(), libc::SIGTERM);
    assert!(group.wait_exit(Duration::from_secs(20)).success());
    let log = fs::read_to_string(group.dir.path().join("logs/access.log")).unwrap();
    for id in ids {
        assert!(log.contains(&id), "{id} was lost at exit");
    }
}

#[test]
fn sigusr1_without_access_logs_changes_nothing() {
    let group = Group::start(Options {
        access_log: "off".into(),
        ..Options::default()
    });
    let proxy = group.child_pid(" proxy ").expect("the proxy");
    util::signal(group.pid(), libc::SIGUSR1);
    util::signal(proxy, libc::SIGUSR1);
    sleep(Duration::from_millis(500));
    assert_eq!(
        group.child_pid(" proxy "),
        Some(proxy),
        "the proxy was replaced"
    );
    assert_eq!(group.get("/api/ping").unwrap().status(), 200);
    assert!(!group.dir.path().join("logs").exists());
}
