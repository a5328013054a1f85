//! Accounts and tokens end to end, across backends and replicas: logout that every one
//! honours, roles on the admin endpoints, disabled users, the login guard, Redis outages.
//! (The API's own document and Swagger UI are in `api_docs.rs`; one backend's own behaviour,
//! in-process, in `backend_inprocess.rs`.)

use std::{
    collections::HashSet,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use reqwest::{Method, blocking::Response};
use serde_json::{Value, json};

use crate::util::{
    Group, Options, PASSWORD, Redis, SECRET, USER, expect, group_with_own_redis, metric_sum,
    wait_until,
};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The claims of a token, read without checking it (the server does that).
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&B64.decode(payload).expect("base64url")).expect("JSON claims")
}

/// A token signed with the test secret, in Redis's generation, but never issued by a login:
/// it is in no user's live tokens, so it is refused as if revoked.
fn unrecorded_token(user: &str, role: &str, generation: &str) -> String {
    let claims = json!({
        "sub": user, "role": role, "iat": now(), "nbf": now(), "exp": now() + 600,
        "jti": format!("unrecorded-{user}"), "gen": generation
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn backend_of(response: &Response) -> String {
    response.headers()["x-backend-id"]
        .to_str()
        .unwrap()
        .to_string()
}

fn create_user(group: &Group, admin: &str, name: &str, password: &str, role: &str) {
    let body = json!({"username": name, "password": password, "role": role});
    let response = group.call(Method::POST, "/api/users", admin, Some(body));
    let user = expect(response, 201, "create a user");
    assert_eq!(
        user,
        json!({"username": name, "role": role, "active": true})
    );
}

/// Enables or disables `name`; returns the user as the API now shows it.
fn set_active(group: &Group, admin: &str, name: &str, active: bool) -> Value {
    let path = format!("/api/users/{name}");
    let body = json!({"active": active});
    expect(
        group.call(Method::PUT, &path, admin, Some(body)),
        200,
        &path,
    )
}

fn users(group: &Group, admin: &str) -> Value {
    expect(
        group.call(Method::GET, "/api/users", admin, None),
        200,
        "list users",
    )["users"]
        .clone()
}

/// One step of a test's story: a token, a refused login, or a call.
enum Step {
    /// `name` logs in with `password`; the token (whose `role` claim must be the third field)
    /// is `name`'s from now on.
    Token(&'static str, &'static str, &'static str),
    /// `name` fails to log in with `password`: `401`.
    Refused(&'static str, &'static str),
    /// A call with `name`'s latest token, the status it must get, and what its body must be.
    Call(
        &'static str,
        Method,
        &'static str,
        Option<Value>,
        u16,
        Check,
    ),
}

/// What a call's answer must be, besides its status.
enum Check {
    Any,
    /// This body, exactly.
    Is(Value),
    /// An error whose message says this.
    Says(&'static str),
}

#[test]
fn logout_is_refused_by_every_backend_and_every_replica() {
    // Two replicas (two groups) sharing one Redis, which starts empty: five backends race to
    // seed it from the users file, and exactly one does.
    let data = tempfile::tempdir().unwrap();
    let redis = Redis::start(data.path());
    let one = Group::start(Options {
        backends: 3,
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let two = Group::start(Options {
        backends: 2,
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let seeded = |group: &Group| group.log().matches("seeded the users in Redis").count();
    assert_eq!(seeded(&one) + seeded(&two), 1, "{}", one.log());
    assert_eq!(redis.command(&["SCARD", "gatehouse:users"]), "1");
    assert_eq!(
        redis.command(&["HGET", "gatehouse:user:admin", "role"]),
        "admin"
    );
    let generation = redis.command(&["GET", "gatehouse:generation"]);
    assert_ne!(generation, "(nil)");

    let token = one.token();
    let other = one.token();
    assert_eq!(
        claims_of(&token)["gen"],
        generation,
        "tokens carry the generation"
    );
    // A token from one replica works on the other.
    expect(
        two.call(Method::GET, "/auth/verify", &token, None),
        200,
        "verify on the other replica",
    );

    let response = one.call(Method::POST, "/auth/logout", &token, None);
    let logged_out_on = backend_of(&response);
    expect(response, 204, "logout");

    // Every backend of both replicas now refuses it, on every protected endpoint.
    let mut refused_by = HashSet::new();
    for (replica, group) in [("one", &one), ("two", &two)] {
        for _ in 0..4 {
            for path in ["/auth/verify", "/api/me", "/api/count"] {
                let response = group.call(Method::GET, path, &token, None);
                assert_eq!(response.headers()["www-authenticate"], "Bearer");
                refused_by.insert(format!("{replica}/{}", backend_of(&response)));
                let body = expect(response, 401, path);
                assert!(
                    body["message"].as_str().unwrap().contains("revoked"),
                    "{body}"
                );
            }
        }
    }
    assert_eq!(refused_by.len(), 5, "refused by {refused_by:?} only");
    assert!(
        refused_by
            .iter()
            .any(|b| *b != format!("one/{logged_out_on}"))
    );
    // A second logout with it is refused too; another token of the same user still works.
    expect(
        one.call(Method::POST, "/auth/logout", &token, None),
        401,
        "logout again",
    );
    expect(
        two.call(Method::GET, "/api/me", &other, None),
        200,
        "another token",
    );

    // Logging out took the token off its user's live tokens (scored by when each was issued,
    // in milliseconds), which expire with the newest of them, plus leeway.
    let jti = claims_of(&token)["jti"].as_str().unwrap().to_string();
    assert_eq!(
        redis.command(&["ZSCORE", "gatehouse:sessions:admin", &jti]),
        "(nil)"
    );
    let other_jti = claims_of(&other)["jti"].as_str().unwrap().to_string();
    let issued_ms: u64 = redis
        .command(&["ZSCORE", "gatehouse:sessions:admin", &other_jti])
        .parse()
        .unwrap();
    assert!(issued_ms / 1000 >= claims_of(&other)["iat"].as_u64().unwrap());
    let ttl: u64 = redis
        .command(&["TTL", "gatehouse:sessions:admin"])
        .parse()
        .unwrap();
    // The token's lifetime plus leeway and margin, less the time the test has taken so far
    // (a loaded machine may take a while).
    assert!(
        (3600 + 5 + 30 - 60..=3600 + 5 + 30).contains(&ttl),
        "ttl {ttl}"
    );
}

#[test]
fn roles_decide_who_manages_users() {
    let group = Group::start(Options {
        backends: 2,
        ..Options::default()
    });
    let admin = group.token();

    // What a token says, and who it belongs to.
    let claims = expect(
        group.call(Method::GET, "/auth/verify", &admin, None),
        200,
        "verify",
    );
    let keys: Vec<&String> = claims.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["exp", "gen", "iat", "jti", "nbf", "role", "sub"],
        "{claims}"
    );
    assert_eq!(
        (&claims["sub"], &claims["role"]),
        (&json!(USER), &json!("admin"))
    );
    assert_eq!(claims["nbf"], claims["iat"]);
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        3600
    );
    assert_eq!(claims, claims_of(&admin), "the token's own claims");
    let response = group.call(Method::GET, "/api/me", &admin, None);
    assert!(
        response.headers().get("x-gatehouse-user").is_none(),
        "the proxy keeps the user header to itself"
    );
    assert_eq!(
        expect(response, 200, "me"),
        json!({"username": USER, "role": "admin", "active": true})
    );

    create_user(&group, &admin, "mia", "mia-password", "maintainer");
    create_user(&group, &admin, "vic", "vic-password", "viewer");
    let listed = users(&group, &admin);
    assert_eq!(
        listed,
        json!([
            {"username": "admin", "role": "admin", "active": true},
            {"username": "mia", "role": "maintainer", "active": true},
            {"username": "vic", "role": "viewer", "active": true},
        ])
    );

    // Every admin endpoint refuses the other roles with 403 and changes nothing, and refuses
    // a missing token with 401. The other roles keep their own endpoints.
    let admin_only = [
        (Method::GET, "/api/users", None),
        (
            Method::POST,
            "/api/users",
            Some(json!({"username": "eve", "password": "eve-password", "role": "admin"})),
        ),
        (
            Method::PUT,
            "/api/users/vic",
            Some(json!({"role": "admin"})),
        ),
        (Method::DELETE, "/api/users/admin", None),
    ];
    for (name, password, role) in [
        ("mia", "mia-password", "maintainer"),
        ("vic", "vic-password", "viewer"),
    ] {
        let token = group.token_for(name, password);
        let me = expect(group.call(Method::GET, "/api/me", &token, None), 200, name);
        assert_eq!(me["role"], role);
        let verified = expect(
            group.call(Method::GET, "/auth/verify", &token, None),
            200,
            name,
        );
        assert_eq!(verified["role"], role);
        expect(group.count(&token), 200, "count as {name}");
        for (method, path, body) in &admin_only {
            let response = group.call(method.clone(), path, &token, body.clone());
            let error = expect(response, 403, &format!("{method} {path} as {role}"));
            assert_eq!(error["error"], "forbidden");
        }
    }
    for (method, path, body) in &admin_only {
        let mut request = group.client.request(method.clone(), group.url(path));
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        expect(response, 401, &format!("{method} {path} without a token"));
    }
    assert_eq!(users(&group, &admin), listed, "nothing changed");

    // Bad bodies: 400 with the field named, 409 for a taken name, 415 for another type.
    let post = |body: Value| group.call(Method::POST, "/api/users", &admin, Some(body));
    let put = |name: &str, body: Value| {
        group.call(
            Method::PUT,
            &format!("/api/users/{name}"),
            &admin,
            Some(body),
        )
    };
    let cases = [
        (
            post(json!({"username": "bad name", "password": "long enough", "role": "viewer"})),
            400,
            "username:",
        ),
        (
            post(json!({"username": "eve", "password": "short", "role": "viewer"})),
            400,
            "password:",
        ),
        (
            post(json!({"username": "eve", "password": "long enough", "role": "root"})),
            400,
            "role:",
        ),
        (
            post(json!({"username": "eve", "role": "viewer"})),
            400,
            "`password`",
        ),
        (
            post(
                json!({"username": "eve", "password": "long enough", "role": "viewer", "admin": true}),
            ),
            400,
            "`admin`",
        ),
        (
            post(
                json!({"username": "eve", "password": "long enough", "role": "viewer", "active": "yes"}),
            ),
            400,
            "active:",
        ),
        (
            post(json!({"username": "mia", "password": "long enough", "role": "viewer"})),
            409,
            "username:",
        ),
        (put("vic", json!({})), 400, "body:"),
        (put("vic", json!({"role": null})), 400, "role:"),
        (put("vic", json!({"password": "short"})), 400, "password:"),
        (put("vic", json!({"active": 1})), 400, "active:"),
        (put("nobody", json!({"role": "viewer"})), 404, "nobody"),
        (
            group.call(Method::DELETE, "/api/users/nobody", &admin, None),
            404,
            "nobody",
        ),
        // Nobody may leave the API without an active admin.
        (
            put(USER, json!({"role": "viewer"})),
            409,
            "last active admin",
        ),
        (
            put(USER, json!({"active": false})),
            409,
            "last active admin",
        ),
        (
            group.call(Method::DELETE, "/api/users/admin", &admin, None),
            409,
            "last active admin",
        ),
    ];
    for (response, status, names) in cases {
        let body = expect(response, status, names);
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(names), "{names}: {message}");
    }
    let response = group
        .client
        .post(group.url("/api/users"))
        .bearer_auth(&admin)
        .header("content-type", "text/plain")
        .body(r#"{"username":"eve","password":"long enough","role":"viewer"}"#)
        .send()
        .unwrap();
    expect(response, 415, "text/plain");
    assert_eq!(users(&group, &admin), listed, "nothing changed");

    // What the admin's changes do to a user's tokens and logins, step by step.
    use Check::{Any, Is, Says};
    use Step::{Call, Refused, Token};
    let user = |name: &str, role: &str| json!({"username": name, "role": role, "active": true});
    let (vic, mia, admin_path) = ("/api/users/vic", "/api/users/mia", "/api/users/admin");
    let new_vic = json!({"username": "vic", "password": "vic-password", "role": "viewer"});
    let maintainer = user("vic", "maintainer");
    let all_users = json!({"users": [
        {"username": "admin", "role": "viewer", "active": true},
        {"username": "mia", "role": "admin", "active": true},
        {"username": "vic", "role": "viewer", "active": true},
    ]});
    #[rustfmt::skip]
    let steps = [
        // A new role applies at once: the user's tokens are revoked, and the next login says so.
        Token("vic", "vic-password", "viewer"),
        Call(USER, Method::PUT, vic, Some(json!({"role": "maintainer"})), 200, Is(maintainer)),
        Call("vic", Method::GET, "/api/me", None, 401, Any),
        Token("vic", "vic-password", "maintainer"),
        // A new password: the old one no longer logs in, nor do the old tokens work.
        Call(USER, Method::PUT, vic, Some(json!({"password": "vic-new-password"})), 200, Any),
        Call("vic", Method::GET, "/api/me", None, 401, Any),
        Refused("vic", "vic-password"),
        Token("vic", "vic-new-password", "maintainer"),
        // Deleted: gone, its tokens refused, its name free again.
        Call(USER, Method::DELETE, vic, None, 204, Any),
        Call(USER, Method::DELETE, vic, None, 404, Any),
        Call("vic", Method::GET, "/api/me", None, 401, Says("revoked")),
        Refused("vic", "vic-new-password"),
        Call(USER, Method::POST, "/api/users", Some(new_vic), 201, Is(user("vic", "viewer"))),
        // A new vic does not bring the old one's tokens back.
        Call("vic", Method::GET, "/api/me", None, 401, Any),
        // With a second admin, the first may step down, and the second manages users.
        Call(USER, Method::PUT, mia, Some(json!({"role": "admin"})), 200, Any),
        Token("mia", "mia-password", "admin"),
        Call(USER, Method::PUT, admin_path, Some(json!({"role": "viewer"})), 200, Any),
        Call(USER, Method::GET, "/api/users", None, 401, Any),
        Token(USER, PASSWORD, "viewer"),
        Call(USER, Method::GET, "/api/users", None, 403, Any),
        Call("mia", Method::GET, "/api/users", None, 200, Is(all_users)),
    ];
    let mut tokens = std::collections::HashMap::from([(USER, admin.clone())]);
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            Token(name, password, role) => {
                let token = group.token_for(name, password);
                assert_eq!(
                    claims_of(&token)["role"],
                    role,
                    "step {i}: {name}'s new token"
                );
                tokens.insert(name, token);
            }
            Refused(name, password) => {
                expect(
                    group.login(name, password),
                    401,
                    &format!("step {i}: {name} logs in"),
                );
            }
            Call(name, method, path, body, status, check) => {
                let what = format!("step {i}: {method} {path} as {name}");
                let answer = expect(group.call(method, path, &tokens[name], body), status, &what);
                match check {
                    Is(expected) => assert_eq!(answer, expected, "{what}"),
                    Says(text) => assert!(
                        answer["message"].as_str().unwrap().contains(text),
                        "{what}: {answer}"
                    ),
                    Any => {}
                }
            }
        }
    }

    // The user-management series moved under its one `users` label.
    let metrics = group.admin("/metrics").1;
    for status in ["2xx", "4xx"] {
        let label = format!(r#"status="{status}""#);
        let moved = metric_sum(
            &metrics,
            "gatehouse_backend_http_requests_total",
            &[r#"endpoint="users""#, &label],
        );
        assert!(moved >= 5.0, "users {status}: {moved}");
    }

    // No password, and no hash, ever reached a log. (The shipped one, "password", is a word
    // the logs use: the distinct ones above stand for it.)
    let mut logs = group.log();
    for entry in std::fs::read_dir(group.dir.path().join("logs")).unwrap() {
        logs += &std::fs::read_to_string(entry.unwrap().path()).unwrap();
    }
    assert!(logs.contains("user created"), "admin actions are logged");
    for secret in [
        "mia-password",
        "vic-password",
        "vic-new-password",
        "eve-password",
        "$argon2id$",
    ] {
        assert!(!logs.contains(secret), "{secret:?} is in the logs");
    }
}

#[test]
fn a_disabled_user_is_refused_at_once() {
    let group = Group::start(Options {
        backends: 2,
        ..Options::default()
    });
    let admin = group.token();
    create_user(&group, &admin, "dora", "dora-password", "viewer");
    let issued = group.token_for("dora", "dora-password");
    expect(
        group.call(Method::GET, "/api/me", &issued, None),
        200,
        "before",
    );
    // Signed with the secret and in the current generation, but issued by no login: refused.
    let generation = claims_of(&issued)["gen"].as_str().unwrap().to_string();
    let unrecorded = unrecorded_token("dora", "viewer", &generation);
    let body = expect(
        group.call(Method::GET, "/api/me", &unrecorded, None),
        401,
        "unrecorded",
    );
    assert!(
        body["message"].as_str().unwrap().contains("revoked"),
        "{body}"
    );

    assert_eq!(
        set_active(&group, &admin, "dora", false),
        json!({"username": "dora", "role": "viewer", "active": false})
    );
    // Its tokens were revoked, on every endpoint and backend.
    for path in ["/api/me", "/auth/verify", "/api/count", "/api/me"] {
        let body = expect(group.call(Method::GET, path, &issued, None), 401, path);
        assert!(
            body["message"].as_str().unwrap().contains("revoked"),
            "{body}"
        );
    }
    expect(
        group.login("dora", "dora-password"),
        401,
        "a disabled user's login",
    );

    // Enabled again: the old token stays revoked; logging in works again.
    set_active(&group, &admin, "dora", true);
    expect(
        group.call(Method::GET, "/api/me", &issued, None),
        401,
        "old token",
    );
    let fresh = group.token_for("dora", "dora-password");
    expect(
        group.call(Method::GET, "/api/me", &fresh, None),
        200,
        "new token",
    );
}

#[test]
fn the_count_counts_only_tokens_every_protected_route_lets_through() {
    // `/api/count` checks its token and counts in one Lua script, where the other routes read
    // a pipeline: a token they refuse gets the very same answer from the count, uncounted.
    let (_data, redis, group) = group_with_own_redis(2);
    let admin = group.token();
    let mut tokens = std::collections::HashMap::new();
    for name in ["cole", "dora", "nemo", "rex"] {
        let password = format!("{name}-password");
        create_user(&group, &admin, name, &password, "viewer");
        tokens.insert(name, group.token_for(name, &password));
    }
    let logged_out = tokens["cole"].clone();
    expect(
        group.call(Method::POST, "/auth/logout", &logged_out, None),
        204,
        "logout",
    );
    // Changes no backend makes (the API revokes a user's tokens with any change): the
    // per-request check of the user's state still refuses them.
    redis.command(&["HSET", "gatehouse:user:dora", "active", "0"]);
    redis.command(&["DEL", "gatehouse:user:nemo"]);
    // A role no backend writes: a damaged record is our fault (500), and still no visit.
    redis.command(&["HSET", "gatehouse:user:rex", "role", "root"]);
    let generation = redis.command(&["GET", "gatehouse:generation"]);
    let refused = [
        (logged_out, 401, "revoked"),
        (tokens["dora"].clone(), 401, "disabled"),
        (tokens["nemo"].clone(), 401, "no longer exists"),
        (tokens["rex"].clone(), 500, "damaged"),
        (
            unrecorded_token("admin", "admin", &generation),
            401,
            "revoked",
        ),
        (
            unrecorded_token("admin", "admin", "another generation"),
            401,
            "lost its data",
        ),
    ];

    let visits = |token: &str| expect(group.count(token), 200, "count")["visits"].clone();
    assert_eq!(visits(&admin), 1);
    // All of an answer but its request id.
    let answer = |response: Response, status: u16| {
        let challenge = response.headers().get("www-authenticate").cloned();
        let body = expect(response, status, "refused");
        (challenge, body["error"].clone(), body["message"].clone())
    };
    for (token, status, says) in &refused {
        let count = answer(group.count(token), *status);
        let me = answer(group.call(Method::GET, "/api/me", token, None), *status);
        assert_eq!(count, me, "{says}");
        assert!(count.2.as_str().unwrap().contains(says), "{count:?}");
    }
    assert_eq!(redis.command(&["GET", "gatehouse:visits"]), "1");
    assert_eq!(visits(&admin), 2);
}

#[test]
fn the_login_guard_counts_per_user_and_per_address_across_backends() {
    let window = 3;
    let group = Group::start(Options {
        backends: 3,
        backend_extra: format!(
            "login_max_failures_per_user_per_ip = 3\nlogin_max_failures_per_ip = 6\n\
             login_failure_window = \"{window}s\"\n"
        ),
        ..Options::default()
    });
    let admin = group.token();
    create_user(&group, &admin, "gus", "gus-password", "viewer");
    let login_from = |client: &reqwest::blocking::Client, user: &str, password: &str| {
        client
            .post(group.url("/auth/login"))
            .json(&json!({"username": user, "password": password}))
            .send()
            .unwrap()
    };
    let local = group.client_from("127.0.0.1");

    // Three failures for gus from one address, spread over the backends, then even the
    // right password is refused unheard there, with the seconds left in the window.
    let mut backends = HashSet::new();
    for _ in 0..3 {
        let response = login_from(&local, "gus", "wrong");
        backends.insert(backend_of(&response));
        expect(response, 401, "wrong password");
    }
    assert!(backends.len() >= 2, "all failures went to {backends:?}");
    let response = login_from(&local, "gus", "gus-password");
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=window).contains(&retry), "Retry-After {retry}");
    let body = expect(response, 429, "throttled");
    assert_eq!(body["error"], "too_many_attempts");
    // The count is per user name and address: gus still logs in from another address
    // (tests/backend_limits.rs covers the ceiling over every address)...
    expect(
        login_from(&group.client_from("127.0.0.2"), "gus", "gus-password"),
        200,
        "gus from another address",
    );
    // ...and other users are not affected.
    expect(login_from(&local, USER, PASSWORD), 200, "admin");
    let metrics = group.admin("/metrics").1;
    let throttled = metric_sum(
        &metrics,
        "gatehouse_backend_logins_total",
        &[r#"outcome="throttled""#],
    );
    assert_eq!(throttled, 1.0);

    // Once the window is over gus may log in from the first address again.
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(window + 3), || {
            login_from(&local, "gus", "gus-password").status() == 200
        }),
        "gus still refused after the window"
    );
    assert!(started.elapsed() >= Duration::from_secs(retry.saturating_sub(1)));

    // Per address: six failures over six names from one address block that address, for any
    // name, while another address still logs in. Signing in to its own account halfway
    // does not wipe the address's count: it only takes back its own attempt.
    let sprayer = group.client_from("127.0.0.3");
    for i in 0..3 {
        expect(
            login_from(&sprayer, &format!("guess{i}"), "x"),
            401,
            "spray",
        );
    }
    expect(
        login_from(&sprayer, "gus", "gus-password"),
        200,
        "own account",
    );
    for i in 3..6 {
        expect(
            login_from(&sprayer, &format!("guess{i}"), "x"),
            401,
            "spray",
        );
    }
    expect(login_from(&sprayer, "gus", "gus-password"), 429, "sprayer");
    expect(
        login_from(&group.client_from("127.0.0.4"), "gus", "gus-password"),
        200,
        "another address",
    );
}

#[test]
fn protected_routes_fail_closed_while_redis_is_down() {
    let (_data, mut redis, group) = group_with_own_redis(2);
    let admin = group.token();
    create_user(&group, &admin, "rita", "rita-password", "viewer");
    let rita = group.token_for("rita", "rita-password");
    let before = users(&group, &admin);

    redis.stop();
    let eve = json!({"username": "eve", "password": "eve-password", "role": "viewer"});
    let protected = [
        (Method::GET, "/auth/verify", None),
        (Method::GET, "/api/me", None),
        (Method::GET, "/api/count", None),
        (Method::POST, "/auth/logout", None),
        (Method::GET, "/api/users", None),
        (Method::POST, "/api/users", Some(eve)),
        (
            Method::PUT,
            "/api/users/rita",
            Some(json!({"active": false})),
        ),
        (Method::DELETE, "/api/users/rita", None),
    ];
    for (method, path, body) in &protected {
        for token in [&admin, &rita] {
            let started = Instant::now();
            let response = group.call(method.clone(), path, token, body.clone());
            assert_eq!(response.headers()["retry-after"], "1", "{method} {path}");
            let error = expect(response, 503, &format!("{method} {path}"));
            assert_eq!(error["error"], "store_unavailable");
            // Within the Redis deadline (1 s), with room for a slow machine.
            assert!(
                started.elapsed() < Duration::from_secs(4),
                "{method} {path}"
            );
        }
    }
    expect(group.login(USER, PASSWORD), 503, "login");
    // What needs no Redis still answers.
    expect(group.get("/api/ping").unwrap(), 200, "ping");
    expect(group.get("/api/openapi.json").unwrap(), 200, "openapi");

    redis.restart();
    assert!(
        wait_until(Duration::from_secs(15), || {
            group.call(Method::GET, "/api/me", &admin, None).status() == 200
        }),
        "not back after Redis returned:\n{}",
        group.log()
    );
    // Nothing was half done: the logout, the disable, the delete and the create all failed
    // as a whole.
    expect(
        group.call(Method::GET, "/api/me", &rita, None),
        200,
        "rita's token",
    );
    assert_eq!(users(&group, &admin), before);
}
