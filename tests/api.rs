//! The HTTP API through the proxy: ping, login, count, errors.

use std::collections::HashSet;

use serde_json::Value;

use crate::util::{Group, Options, PASSWORD, USER};

fn error_body(response: reqwest::blocking::Response) -> Value {
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body: Value = response.json().expect("error body is JSON");
    assert!(body["error"].is_string(), "{body}");
    assert!(body["message"].is_string(), "{body}");
    assert_eq!(body["request_id"].as_str(), request_id.as_deref(), "{body}");
    body
}

#[test]
fn ping_count_and_errors_through_the_proxy() {
    let group = Group::start(Options::default());

    // Ping, with a request id made by the proxy; a client's own id is replaced (only a trusted
    // proxy's is kept: see the observability tests).
    let response = group.get("/api/ping").unwrap();
    assert_eq!(response.status(), 200);
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(generated.len(), 36, "a UUID: {generated}");
    assert_eq!(
        response.json::<Value>().unwrap(),
        serde_json::json!({"status": "ok"})
    );
    let response = group
        .client
        .get(group.url("/api/ping"))
        .header("x-request-id", "trace-42")
        .send()
        .unwrap();
    assert_ne!(response.headers()["x-request-id"], "trace-42");
    let response = group
        .client
        .get(group.url("/api/ping"))
        .header("x-request-id", "bad id\"")
        .send()
        .unwrap();
    assert_ne!(response.headers()["x-request-id"], "bad id\"");

    // Unknown paths: a JSON 404 from the proxy; unknown API paths: a JSON 404 from a backend.
    let response = group.get("/nowhere").unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(error_body(response)["error"], "not_found");
    let response = group.get("/api/nothing-here").unwrap();
    assert_eq!(response.status(), 404);
    error_body(response);

    // The count increments, and requests are spread over the backends.
    let token = group.token();
    let mut backends = HashSet::new();
    let mut last = 0;
    for _ in 0..6 {
        let response = group.count(&token);
        assert_eq!(response.status(), 200);
        backends.insert(
            response.headers()["x-backend-id"]
                .to_str()
                .unwrap()
                .to_string(),
        );
        let visits = response.json::<Value>().unwrap()["visits"]
            .as_i64()
            .unwrap();
        assert_eq!(visits, last + 1, "counts go up by one");
        last = visits;
    }
    assert!(backends.len() >= 2, "requests went to {backends:?} only");
}

#[test]
fn login_accepts_the_right_password_and_refuses_bad_input() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });

    let response = group.login(USER, PASSWORD);
    assert_eq!(response.status(), 200);
    let body: Value = response.json().unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["token"].as_str().unwrap().split('.').count(), 3);

    for (user, password) in [(USER, "wrong"), ("nobody", PASSWORD), ("", "")] {
        let response = group.login(user, password);
        assert_eq!(response.status(), 401, "{user}/{password}");
        assert_eq!(error_body(response)["error"], "invalid_credentials");
    }

    let post = |content_type: &str, body: String| {
        group
            .client
            .post(group.url("/auth/login"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .unwrap()
    };
    let cases = [
        ("application/json", "{not json".to_string(), 400),
        (
            "application/json",
            r#"{"username":"admin"}"#.to_string(),
            400,
        ),
        (
            "application/json",
            r#"{"username":1,"password":2}"#.to_string(),
            400,
        ),
        (
            "text/plain",
            r#"{"username":"admin","password":"password"}"#.to_string(),
            415,
        ),
        (
            "application/json",
            format!(r#"{{"username":"{}","password":"x"}}"#, "a".repeat(20_000)),
            413,
        ),
    ];
    for (content_type, body, status) in cases {
        let response = post(content_type, body.clone());
        assert_eq!(
            response.status().as_u16(),
            status,
            "{content_type} {}",
            &body[..body.len().min(40)]
        );
        error_body(response);
    }

    // Wrong method on a known endpoint.
    let response = group.get("/auth/login").unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
}

/// `HEAD` wherever `GET` is (RFC 9110, 9.3.2): the status and headers `GET` gives, no body;
/// `HEAD /api/count` counts no visit.
#[test]
fn head_is_answered_wherever_get_is_without_a_body() {
    let group = Group::start(Options::default());
    let token = group.token();
    let send = |method: reqwest::Method, path: &str| {
        group
            .client
            .request(method, group.url(path))
            .bearer_auth(&token)
            // The same representation both times: no compression to tell them apart.
            .header("accept-encoding", "identity")
            .send()
            .expect("request")
    };
    let header = |response: &reqwest::blocking::Response, name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    for path in [
        "/api/ping",
        "/api/openapi.json",
        "/auth/verify",
        "/api/me",
        "/api/users",
    ] {
        let get = send(reqwest::Method::GET, path);
        let head = send(reqwest::Method::HEAD, path);
        assert_eq!(head.status(), 200, "{path}");
        assert_eq!(get.status(), 200, "{path}");
        for name in ["content-type", "content-length", "cache-control"] {
            assert_eq!(header(&head, name), header(&get, name), "{path}: {name}");
        }
        assert!(header(&head, "content-length").is_some(), "{path}");
        assert!(header(&head, "x-request-id").is_some(), "{path}");
        assert!(head.bytes().expect("body").is_empty(), "{path}");
    }

    let visits = |response: reqwest::blocking::Response| -> i64 {
        let body: Value = response.json().expect("count body");
        body["visits"].as_i64().expect("visits")
    };
    let before = visits(send(reqwest::Method::GET, "/api/count"));
    for _ in 0..3 {
        let head = send(reqwest::Method::HEAD, "/api/count");
        assert_eq!(head.status(), 200);
        let length = format!(r#"{{"visits":{before}}}"#).len().to_string();
        assert_eq!(header(&head, "content-length"), Some(length));
    }
    assert_eq!(visits(send(reqwest::Method::GET, "/api/count")), before + 1);
    // A token is checked as for `GET`.
    let refused = group
        .client
        .head(group.url("/api/count"))
        .send()
        .expect("request");
    assert_eq!(refused.status(), 401);
    assert_eq!(
        header(&refused, "www-authenticate").as_deref(),
        Some("Bearer")
    );

    // `Allow` names `HEAD` wherever `GET` is.
    let response = send(reqwest::Method::POST, "/api/ping");
    assert_eq!(response.status(), 405);
    assert_eq!(header(&response, "allow").as_deref(), Some("GET, HEAD"));
    let response = send(reqwest::Method::DELETE, "/api/users");
    assert_eq!(
        header(&response, "allow").as_deref(),
        Some("GET, HEAD, POST")
    );
}
