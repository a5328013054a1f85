//! One backend served in this test process (`gatehouse_backend::serve` on a temporary Unix
//! socket), against a real redis-server: the backend's own behaviour (login, a token refused,
//! the admin check, the count) without booting a group, and limits no config would pass.
//! What crosses processes (the proxy, several backends, replicas) stays in the group tests.

use std::{
    path::PathBuf,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use gatehouse_backend::{
    App, ConnectionLimits, GuardSettings, Metrics, Settings, Store, Tokens, Users,
};
use serde_json::{Value, json};

use crate::util::{PASSWORD, Redis, SECRET, USER, metric_sum, unix_request};

/// A backend on its own thread and runtime, stopped (and drained) when dropped.
pub struct Backend {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub metrics: Arc<Metrics>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Backend {
    /// With `redis` as its Redis, each call to it waiting at most `deadline`, seeding Redis
    /// with `users`. Tokens live 60 s; a user may hold 10.
    pub fn start(
        limits: ConnectionLimits,
        redis: String,
        deadline: Duration,
        users: Users,
    ) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("backend.sock");
        let metrics = Arc::new(Metrics::new("own").unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = {
            let (socket, metrics) = (socket.clone(), metrics.clone());
            thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    let store = Store::new(&redis, deadline, Some(metrics.clone())).unwrap();
                    let app = App::new(Settings {
                        id: "own".into(),
                        users,
                        tokens: Tokens::new(SECRET.as_bytes(), 60).unwrap(),
                        store,
                        guard: GuardSettings {
                            max_failures_per_user_per_ip: 5,
                            max_failures_per_ip: 20,
                            max_failures_per_user_all_ips: 100,
                            window_seconds: 60,
                            known_address_seconds: 60,
                        },
                        max_body_bytes: 4096,
                        body_timeout: limits.body_timeout,
                        max_tokens_per_user: 10,
                        metrics,
                        audit: gatehouse_backend::AuditSettings {
                            file: None,
                            max_events: 1000,
                        },
                        admin_address: None,
                        certificate_users: false,
                    })
                    .unwrap();
                    let listener = gatehouse_backend::bind(&socket).await.unwrap();
                    ready_tx.send(()).unwrap();
                    let shutdown = async {
                        let _ = stopped.await;
                    };
                    gatehouse_backend::serve(
                        listener,
                        Arc::new(app),
                        limits,
                        shutdown,
                        Duration::from_millis(100),
                    )
                    .await;
                });
            })
        };
        ready.recv_timeout(Duration::from_secs(10)).unwrap();
        Backend {
            _dir: dir,
            socket,
            metrics,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// On `redis`, with the default limits and `admin` (password [`PASSWORD`]) as its one user.
    pub fn on(redis: &Redis) -> Backend {
        let mut users = Users::parse("", "users").unwrap();
        users.set_admin_password(PASSWORD).unwrap();
        Backend::start(
            ConnectionLimits::default(),
            redis.url(),
            Duration::from_secs(1),
            users,
        )
    }

    /// One request on a connection of its own: its status and JSON body (`Null` if empty).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n");
        if let Some(token) = token {
            head += &format!("Authorization: Bearer {token}\r\n");
        }
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        if !body.is_empty() {
            head += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        let request = format!("{head}\r\n{body}");
        let (status, text) = unix_request(&self.socket, &request, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: {text}"))
        };
        (status, json)
    }

    /// Logs `user` in: the token.
    pub fn token(&self, user: &str, password: &str) -> String {
        let login = json!({"username": user, "password": password});
        let (status, body) = self.call("POST", "/auth/login", None, Some(login));
        assert_eq!(status, 200, "login as {user}: {body}");
        body["token"].as_str().unwrap().to_string()
    }

    /// The sum of one of its series, from its own registry.
    pub fn metric(&self, name: &str, parts: &[&str]) -> f64 {
        metric_sum(
            &String::from_utf8(self.metrics.render()).unwrap(),
            name,
            parts,
        )
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A backend on a Redis of the test's own; dropped in this order: the backend, Redis, its data.
fn backend() -> (Backend, Redis, tempfile::TempDir) {
    let data = tempfile::tempdir().unwrap();
    let redis = Redis::start(data.path());
    (Backend::on(&redis), redis, data)
}

/// The `error` code and message of a refusal with `status`.
fn refused(answer: (u16, Value), status: u16, what: &str) -> (String, String) {
    let (code, body) = answer;
    assert_eq!(code, status, "{what}: {body}");
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: {body}"));
    let message = body["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: {body}"));
    (error.to_string(), message.to_string())
}

#[test]
fn a_login_gives_a_token_that_the_protected_routes_accept() {
    let (backend, _redis, _data) = backend();
    let login = json!({"username": USER, "password": PASSWORD});
    let (status, body) = backend.call("POST", "/auth/login", None, Some(login));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["token_type"], &body["expires_in"]),
        (&json!("Bearer"), &json!(60))
    );
    let token = body["token"].as_str().unwrap();
    let (status, claims) = backend.call("GET", "/auth/verify", Some(token), None);
    assert_eq!(status, 200, "{claims}");
    assert_eq!(
        (&claims["sub"], &claims["role"]),
        (&json!(USER), &json!("admin"))
    );
    assert_eq!(
        backend.call("GET", "/api/me", Some(token), None),
        (
            200,
            json!({"username": USER, "role": "admin", "active": true})
        )
    );
    let wrong = json!({"username": USER, "password": "not the password"});
    let (error, _) = refused(
        backend.call("POST", "/auth/login", None, Some(wrong)),
        401,
        "wrong password",
    );
    assert_eq!(error, "invalid_credentials");
    let logins = |outcome: &str| {
        let label = format!(r#"outcome="{outcome}""#);
        backend.metric("gatehouse_backend_logins_total", &[&label])
    };
    assert_eq!((logins("success"), logins("refused")), (1.0, 1.0));
}

#[test]
fn a_token_is_refused_when_missing_malformed_or_logged_out() {
    let (backend, _redis, _data) = backend();
    let me = |token: Option<&str>| backend.call("GET", "/api/me", token, None);
    let cases = [
        (
            None,
            "`Authorization: Bearer <token>` or `X-API-Key` header is required",
        ),
        (Some("not-a-jwt"), "the bearer token is not valid"),
    ];
    for (token, says) in cases {
        let (error, message) = refused(me(token), 401, says);
        assert_eq!(error, "invalid_token");
        assert!(message.contains(says), "{message}");
    }
    let token = backend.token(USER, PASSWORD);
    assert_eq!(me(Some(&token)).0, 200);
    let logout = backend.call("POST", "/auth/logout", Some(&token), None);
    assert_eq!(logout, (204, Value::Null));
    let (_, message) = refused(me(Some(&token)), 401, "after logout");
    assert!(message.contains("revoked"), "{message}");
    refused(
        backend.call("POST", "/auth/logout", Some(&token), None),
        401,
        "logout again",
    );
}

#[test]
fn only_an_admin_manages_users() {
    let (backend, _redis, _data) = backend();
    let admin = backend.token(USER, PASSWORD);
    let vic = json!({"username": "vic", "password": "vic-password", "role": "viewer"});
    let (status, created) = backend.call("POST", "/api/users", Some(&admin), Some(vic));
    assert_eq!(status, 201, "{created}");
    let viewer = backend.token("vic", "vic-password");
    let (status, me) = backend.call("GET", "/api/me", Some(&viewer), None);
    assert_eq!((status, &me["role"]), (200, &json!("viewer")));
    for (method, path) in [("GET", "/api/users"), ("DELETE", "/api/users/admin")] {
        let what = format!("{method} {path} as a viewer");
        let (error, _) = refused(backend.call(method, path, Some(&viewer), None), 403, &what);
        assert_eq!(error, "forbidden", "{what}");
    }
    let (status, list) = backend.call("GET", "/api/users", Some(&admin), None);
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list["users"],
        json!([
            {"username": "admin", "role": "admin", "active": true},
            {"username": "vic", "role": "viewer", "active": true},
        ])
    );
}

#[test]
fn the_count_counts_each_accepted_visit_once() {
    let (backend, redis, _data) = backend();
    let token = backend.token(USER, PASSWORD);
    let count = |token: &str| backend.call("GET", "/api/count", Some(token), None);
    assert_eq!(count(&token), (200, json!({"visits": 1})));
    assert_eq!(count(&token), (200, json!({"visits": 2})));
    backend.call("POST", "/auth/logout", Some(&token), None);
    refused(count(&token), 401, "a revoked token");
    assert_eq!(redis.command(&["GET", "gatehouse:visits"]), "2");
    // One series per label of the route table.
    let requests = |status: &str| {
        let status = format!(r#"status="{status}""#);
        let name = "gatehouse_backend_http_requests_total";
        backend.metric(name, &[r#"endpoint="count""#, &status])
    };
    assert_eq!((requests("2xx"), requests("4xx")), (2.0, 1.0));
}

#[test]
fn the_backend_starts_while_redis_is_down_and_serves_once_it_is_up() {
    let data = tempfile::tempdir().unwrap();
    let mut redis = Redis::start(data.path());
    redis.stop();
    let backend = Backend::on(&redis);
    assert_eq!(backend.call("GET", "/api/ping", None, None).0, 200);
    let login = json!({"username": USER, "password": PASSWORD});
    let (error, _) = refused(
        backend.call("POST", "/auth/login", None, Some(login)),
        503,
        "login while Redis is down",
    );
    assert_eq!(error, "store_unavailable");
    redis.restart();
    let started = Instant::now();
    let token = loop {
        let login = json!({"username": USER, "password": PASSWORD});
        let (status, body) = backend.call("POST", "/auth/login", None, Some(login));
        if status == 200 {
            break body["token"].as_str().unwrap().to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{status}: {body}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(backend.call("GET", "/api/me", Some(&token), None).0, 200);
}
