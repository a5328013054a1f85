//! Identity end to end: permissions by role from the route table, API keys (made, used and
//! revoked across two groups sharing one Redis, charged to the login guard), the audit log
//! (file and shared stream, paged, capped, no secrets) and the group's status for admins.

use std::{
    thread,
    time::{Duration, Instant},
};

use reqwest::{Method, blocking::Response};
use serde_json::{Value, json};

use crate::util::{Group, Options, Redis, expect, metric_sum, signal, unix_request, wait_until};

fn create_user(group: &Group, admin: &str, name: &str, role: &str) {
    let body = json!({"username": name, "password": "correct horse 1", "role": role});
    expect(
        group.call(Method::POST, "/api/users", admin, Some(body)),
        201,
        "create a user",
    );
}

fn create_key(group: &Group, admin: &str, name: &str, role: &str) -> Value {
    let body = json!({"name": name, "role": role});
    expect(
        group.call(Method::POST, "/api/keys", admin, Some(body)),
        201,
        "create a key",
    )
}

/// A request with `X-API-Key`.
fn with_key(group: &Group, method: Method, path: &str, key: &str) -> Response {
    group
        .client
        .request(method, group.url(path))
        .header("x-api-key", key)
        .send()
        .expect("request with a key")
}

#[test]
fn each_role_may_do_what_the_route_table_says_and_403_names_the_role() {
    let group = Group::start(Options::default());
    let admin = group.token();
    create_user(&group, &admin, "vera", "viewer");
    create_user(&group, &admin, "max", "maintainer");
    let viewer = group.token_for("vera", "correct horse 1");
    let maintainer = group.token_for("max", "correct horse 1");

    // A viewer reads.
    expect(group.count(&viewer), 200, "count as viewer");
    let hello = expect(
        group.call(Method::GET, "/api/hello", &viewer, None),
        200,
        "hello",
    );
    assert_eq!(hello["message"], "Hello, vera!");
    // Writes need a maintainer; the refusal names the role needed and the one held.
    let refused = expect(
        group.call(Method::DELETE, "/api/count", &viewer, None),
        403,
        "reset as viewer",
    );
    assert_eq!(refused["error"], "forbidden");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("maintainer") && message.contains("viewer"),
        "{message}"
    );
    expect(
        group.call(Method::DELETE, "/api/count", &maintainer, None),
        204,
        "reset as maintainer",
    );
    assert_eq!(
        expect(group.count(&viewer), 200, "count after reset")["visits"],
        1
    );
    // Users, keys, the audit log and the status need an admin.
    for (method, path) in [
        (Method::GET, "/api/users"),
        (Method::GET, "/api/keys"),
        (Method::POST, "/api/keys"),
        (Method::DELETE, "/api/keys/0123456789abcdef"),
        (Method::GET, "/api/audit"),
        (Method::GET, "/api/status"),
    ] {
        let body = (method == Method::POST).then(|| json!({"name": "x", "role": "admin"}));
        let refused = expect(
            group.call(method.clone(), path, &maintainer, body),
            403,
            &format!("{method} {path} as maintainer"),
        );
        assert!(
            refused["message"].as_str().unwrap().contains("admin role"),
            "{refused}"
        );
    }
    assert_eq!(
        group
            .call(Method::GET, "/api/keys", &admin, None)
            .status()
            .as_u16(),
        200
    );
    // The OpenAPI document names the role of every protected operation.
    let document = expect(group.get("/api/openapi.json").unwrap(), 200, "the document");
    assert_eq!(
        document["paths"]["/api/count"]["delete"]["x-required-role"],
        "maintainer"
    );
    assert_eq!(
        document["paths"]["/api/keys"]["post"]["x-required-role"],
        "admin"
    );
    assert_eq!(
        document["paths"]["/api/count"]["get"]["x-required-role"],
        "viewer"
    );
}

/// Two groups on one Redis: a key made on one works on the other with its role, shows in
/// the access log as `key:NAME`, and once revoked on one is refused by the other at the next
/// request.
#[test]
fn an_api_key_works_everywhere_with_its_role_and_dies_everywhere_at_once() {
    let data = tempfile::tempdir().unwrap();
    let redis = Redis::start(data.path());
    let options = || Options {
        backends: 2,
        redis_url: Some(redis.url()),
        ..Options::default()
    };
    let (a, b) = (Group::start(options()), Group::start(options()));
    let admin = a.token();

    let made = create_key(&a, &admin, "deploy-bot", "maintainer");
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap().to_string();
    assert_eq!(made["name"], "deploy-bot");
    assert_eq!(made["role"], "maintainer");
    // At least 128 random bits: 64 hex digits of secret after the id.
    let secret = key.rsplit('_').next().unwrap();
    assert!(key.starts_with("gk_") && secret.len() == 64, "{key}");
    assert!(secret.bytes().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(
        create_key(&a, &admin, "other", "viewer")["key"],
        made["key"]
    );
    // Only a hash is kept, and the list never shows the key.
    let record = redis.command(&["HGETALL", &format!("gatehouse:apikey:{id}")]);
    assert!(!record.contains(secret), "{record}");
    let listed = expect(
        b.call(Method::GET, "/api/keys", &b.token(), None),
        200,
        "list keys",
    );
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{listed}");
    assert!(!listed.to_string().contains(secret), "{listed}");
    let entry = |listed: &Value| -> Value {
        listed["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == id.as_str())
            .cloned()
            .expect("the key is listed")
    };
    assert_eq!(entry(&listed)["name"], "deploy-bot");
    assert_eq!(entry(&listed)["last_used"], Value::Null);

    // On the other group, with the key's role.
    let me = expect(with_key(&b, Method::GET, "/api/me", &key), 200, "me");
    assert_eq!(me["username"], "key:deploy-bot");
    assert_eq!(me["role"], "maintainer");
    expect(
        with_key(&b, Method::DELETE, "/api/count", &key),
        204,
        "a maintainer key resets the count",
    );
    expect(
        with_key(&b, Method::GET, "/api/users", &key),
        403,
        "a maintainer key manages no users",
    );
    let listed = expect(
        a.call(Method::GET, "/api/keys", &admin, None),
        200,
        "list keys",
    );
    assert!(entry(&listed)["last_used"].as_u64().is_some(), "{listed}");
    let log = b.dir.path().join("logs/access.log");
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("key:deploy-bot"))),
        "the access log names the key"
    );

    // Mistakes: a name used twice, both credentials at once, a key that is not one.
    expect(
        a.call(
            Method::POST,
            "/api/keys",
            &admin,
            Some(json!({"name": "deploy-bot", "role": "viewer"})),
        ),
        409,
        "a second key of one name",
    );
    let refused = expect(
        a.call(
            Method::POST,
            "/api/keys",
            &admin,
            Some(json!({"name": "x", "role": "root"})),
        ),
        400,
        "an unknown role",
    );
    assert!(refused["message"].as_str().unwrap().starts_with("role"));
    let both = a
        .client
        .get(a.url("/api/me"))
        .bearer_auth(&admin)
        .header("x-api-key", &key)
        .send()
        .unwrap();
    expect(both, 400, "two credentials");
    let forged = format!(
        "{}{}",
        &key[..key.len() - 1],
        if key.ends_with('0') { '1' } else { '0' }
    );
    expect(
        with_key(&a, Method::GET, "/api/me", &forged),
        401,
        "a wrong secret",
    );
    expect(
        with_key(&a, Method::GET, "/api/me", "gk_x"),
        401,
        "a malformed key",
    );

    // Revoked on one group: the other refuses it at the next request.
    expect(
        a.call(Method::DELETE, &format!("/api/keys/{id}"), &admin, None),
        204,
        "revoke",
    );
    let refused = expect(with_key(&b, Method::GET, "/api/me", &key), 401, "revoked");
    assert_eq!(refused["error"], "invalid_token");
    expect(
        a.call(Method::DELETE, &format!("/api/keys/{id}"), &admin, None),
        404,
        "revoked twice",
    );
    // Both groups' events are in the one stream: what A's admin did, B's admin reads, with
    // the backend of A that wrote it.
    let seen_by_b = expect(
        b.call(Method::GET, "/api/audit?limit=100", &b.token(), None),
        200,
        "audit on b",
    );
    let revoked = seen_by_b["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "key.revoked" && e["target"] == "key:deploy-bot")
        .cloned()
        .unwrap_or_else(|| panic!("no key.revoked seen from b: {seen_by_b}"));
    assert_eq!(revoked["actor"], "admin");
    // A certificate user header from a client is never believed: the edge strips it, and a
    // backend whose edge maps no certificate to a user ignores it even sent straight to its
    // socket.
    let sent = a
        .client
        .get(a.url("/api/me"))
        .header("x-gatehouse-cert-user", "admin")
        .send()
        .unwrap();
    expect(sent, 401, "a client's own certificate-user header");
    let direct = unix_request(
        &a.dir.path().join("run/backend-1.sock"),
        "GET /api/me HTTP/1.1\r\nHost: b\r\nX-Gatehouse-Cert-User: admin\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(direct.0, 401, "{direct:?}");

    // A damaged record (no name nor role, then an unknown role) is no key: refused, no visit
    // counted, left out of the list (which still answers), and still revocable by its id.
    let damaged = "0123456789abcdef";
    let secret = "ab".repeat(32);
    let damaged_key = format!("gk_{damaged}_{secret}");
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(damaged_key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    redis.command(&[
        "HSET",
        &format!("gatehouse:apikey:{damaged}"),
        "hash",
        &digest,
    ]);
    redis.command(&["SADD", "gatehouse:apikeys", damaged]);
    let visits = redis.command(&["GET", "gatehouse:visits"]);
    expect(
        with_key(&a, Method::GET, "/api/count", &damaged_key),
        401,
        "a damaged key",
    );
    assert_eq!(redis.command(&["GET", "gatehouse:visits"]), visits);
    // Nor is one whose role this build does not know, with a name and a number that is not.
    let record = format!("gatehouse:apikey:{damaged}");
    redis.command(&[
        "HSET", &record, "name", "odd", "role", "root", "created", "soon",
    ]);
    expect(
        with_key(&a, Method::GET, "/api/count", &damaged_key),
        401,
        "a key with an unknown role",
    );
    assert_eq!(redis.command(&["GET", "gatehouse:visits"]), visits);
    assert_eq!(redis.command(&["HEXISTS", &record, "last_used"]), "0");
    let listed = expect(
        a.call(Method::GET, "/api/keys", &admin, None),
        200,
        "the list",
    );
    assert!(!listed.to_string().contains(damaged), "{listed}");
    expect(
        a.call(
            Method::DELETE,
            &format!("/api/keys/{damaged}"),
            &admin,
            None,
        ),
        204,
        "a damaged key revoked",
    );
    assert_eq!(
        redis.command(&["SISMEMBER", "gatehouse:apikeys", damaged]),
        "0"
    );
}

/// A route that caches the API: what a key's request got is never answered to anyone else
/// (the edge counts `X-API-Key` as a credential, and the API says `private, no-store`).
#[test]
fn answers_for_an_api_key_are_never_kept_for_others() {
    let group = Group::start(Options {
        extra:
            "[[routes]]\nprefix = \"/cached/\"\nupstream = \"backends\"\nrewrite_prefix = \"/\"\n\
                [routes.cache]\ndefault_ttl = \"60s\"\n"
                .into(),
        ..Options::default()
    });
    let admin = group.token();
    let key = create_key(&group, &admin, "ops", "admin")["key"]
        .as_str()
        .unwrap()
        .to_string();
    for path in ["/cached/api/users", "/cached/api/keys", "/cached/api/me"] {
        let first = with_key(&group, Method::GET, path, &key);
        assert_eq!(first.status(), 200, "{path}");
        assert_eq!(
            first.headers()["cache-control"],
            "private, no-store",
            "{path}"
        );
        assert_ne!(
            first.headers()["x-cache"],
            "MISS",
            "{path}: a key's request kept"
        );
        let anonymous = group.get(path).unwrap();
        assert_eq!(anonymous.status(), 401, "{path}: served to anonymous");
    }
}

/// Bad keys count against the client in the login guard, checked before the key in one
/// script: a burst of parallel guesses gets no more tries than the limit, then `429` even for
/// a good key from that client, while another client's good key is served.
#[test]
fn bad_keys_are_charged_to_the_login_guard_and_other_clients_are_served() {
    let group = Group::start(Options {
        backend_extra: "login_max_failures_per_ip = 6\nlogin_max_failures_per_user_per_ip = 4\n"
            .into(),
        ..Options::default()
    });
    let admin = group.token();
    let key = create_key(&group, &admin, "svc", "viewer")["key"]
        .as_str()
        .unwrap()
        .to_string();
    let attacker = group.client_from("127.0.0.2");
    let url = group.url("/api/count");
    let guesses: Vec<u16> = thread::scope(|scope| {
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let (attacker, url) = (&attacker, &url);
                scope.spawn(move || {
                    let guess = format!("gk_{:016x}_{}", i, "0".repeat(64));
                    attacker
                        .get(url)
                        .header("x-api-key", guess)
                        .send()
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let heard = guesses.iter().filter(|s| **s == 401).count();
    let throttled = guesses.iter().filter(|s| **s == 429).count();
    assert!(heard <= 6, "{heard} guesses were checked: {guesses:?}");
    assert_eq!(heard + throttled, 40, "{guesses:?}");
    // The attacker's address is held, even with a good key; Retry-After says how long.
    let held = attacker.get(&url).header("x-api-key", &key).send().unwrap();
    assert_eq!(held.status(), 429);
    assert!(held.headers().contains_key("retry-after"));
    // Another client with the good key is served meanwhile.
    expect(
        with_key(&group, Method::GET, "/api/count", &key),
        200,
        "another client",
    );
    let throttles = metric_sum(
        &group.admin("/metrics").1,
        "gatehouse_backend_api_key_checks_total",
        &[r#"outcome="throttled""#],
    );
    assert!(throttles >= 30.0, "{throttles}");
    // The flood is one guard.tripped event, not one per refusal.
    let page = expect(
        group.call(Method::GET, "/api/audit?limit=500", &admin, None),
        200,
        "audit",
    );
    let tripped: Vec<&Value> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "guard.tripped" && e["client"] == "127.0.0.2")
        .collect();
    assert!(
        (1..=3).contains(&tripped.len()),
        "one event per backend at most: {tripped:?}"
    );
}

fn events(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_audit_log_records_security_events_in_a_file_and_a_shared_stream_without_secrets() {
    let group = Group::start(Options {
        keys: "audit.file = \"logs/audit.log\"\naudit.max_events = 100\n".into(),
        ..Options::default()
    });
    let admin = group.token();
    expect(
        group.login("admin", "not the password"),
        401,
        "a wrong password",
    );
    create_user(&group, &admin, "dora", "viewer");
    let change = json!({"role": "maintainer"});
    expect(
        group.call(Method::PUT, "/api/users/dora", &admin, Some(change)),
        200,
        "change",
    );
    let dora = group.token_for("dora", "correct horse 1");
    let denied = group.call(Method::GET, "/api/users", &dora, None);
    let correlation = denied.headers()["x-correlation-id"]
        .to_str()
        .unwrap()
        .to_string();
    expect(denied, 403, "denied");
    expect(
        group.call(Method::POST, "/auth/logout", &dora, None),
        204,
        "logout",
    );
    expect(
        group.call(
            Method::PUT,
            "/api/users/dora",
            &admin,
            Some(json!({"active": false})),
        ),
        200,
        "disable",
    );
    expect(
        group.call(Method::DELETE, "/api/users/dora", &admin, None),
        204,
        "delete",
    );
    let made = create_key(&group, &admin, "ci", "viewer");
    let key = made["key"].as_str().unwrap().to_string();
    let id = made["id"].as_str().unwrap();
    expect(
        group.call(Method::DELETE, &format!("/api/keys/{id}"), &admin, None),
        204,
        "revoke",
    );
    signal(group.pid(), libc::SIGHUP);

    let wanted = [
        "login.succeeded",
        "login.failed",
        "user.created",
        "user.changed",
        "permission.denied",
        "logout",
        "user.disabled",
        "tokens.revoked",
        "user.deleted",
        "key.created",
        "key.revoked",
        "config.reloaded",
    ];
    let mut page = Value::Null;
    let complete = wait_until(Duration::from_secs(20), || {
        page = expect(
            group.call(Method::GET, "/api/audit?limit=100", &admin, None),
            200,
            "audit",
        );
        let seen = events(&page);
        wanted.iter().all(|w| seen.iter().any(|s| s == w))
    });
    assert!(complete, "missing events: {page}");
    // One client failing and then throttled under ever new names is a handful of events,
    // not one per request.
    let flooder = group.client_from("127.0.0.3");
    let mut throttled = 0;
    for i in 0..120 {
        let body = json!({"username": format!("flood{i}"), "password": "wrong password"});
        let answer = flooder
            .post(group.url("/auth/login"))
            .json(&body)
            .send()
            .unwrap();
        throttled += usize::from(answer.status() == 429);
    }
    assert!(throttled >= 90, "{throttled}");
    let flood = expect(
        group.call(Method::GET, "/api/audit?limit=500", &admin, None),
        200,
        "audit",
    );
    let from = |event: &str| {
        flood["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == event && e["client"] == "127.0.0.3")
            .count()
    };
    assert!(
        (1..=3).contains(&from("login.throttled")),
        "{}",
        from("login.throttled")
    );
    let suppressed = metric_sum(
        &group.admin("/metrics").1,
        "gatehouse_backend_audit_suppressed_total",
        &[],
    );
    assert!(suppressed >= 80.0, "{suppressed}");
    // Newest first, each with its request's ids and client; the denial names the role.
    let all = page["events"].as_array().unwrap();
    let times: Vec<&str> = all.iter().map(|e| e["time"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");
    let denial = all
        .iter()
        .find(|e| e["event"] == "permission.denied")
        .unwrap();
    assert_eq!(denial["actor"], "dora");
    assert_eq!(denial["detail"], "admin");
    assert_eq!(denial["correlation_id"], correlation.as_str());
    assert_eq!(denial["client"], "127.0.0.1");
    assert_eq!(denial["outcome"], "denied");
    let failed = all.iter().find(|e| e["event"] == "login.failed").unwrap();
    assert_eq!(failed["target"], "admin");
    assert_eq!(failed["outcome"], "failure");
    let reload = all
        .iter()
        .find(|e| e["event"] == "config.reloaded")
        .unwrap();
    assert_eq!(
        (reload["actor"].as_str(), reload["outcome"].as_str()),
        (Some("gatehouse"), Some("success"))
    );

    // Paging: `before` gives the older ones, none repeated.
    let first = expect(
        group.call(Method::GET, "/api/audit?limit=3", &admin, None),
        200,
        "page 1",
    );
    let before = first["next_before"].as_str().unwrap();
    let second = expect(
        group.call(
            Method::GET,
            &format!("/api/audit?limit=3&before={before}"),
            &admin,
            None,
        ),
        200,
        "page 2",
    );
    let ids = |p: &Value| -> Vec<String> {
        p["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (one, two) = (ids(&first), ids(&second));
    assert_eq!((one.len(), two.len()), (3, 3));
    assert!(one.iter().all(|id| !two.contains(id)));
    let order = |id: &str| -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap();
        (ms.parse().unwrap(), seq.parse().unwrap())
    };
    assert!(order(&two[0]) < order(&one[2]), "{one:?} then {two:?}");
    for bad in [
        "limit=0",
        "limit=501",
        "limit=x",
        "before=1",
        "before=%2B",
        "before=1-0-0",
    ] {
        let refused = expect(
            group.call(Method::GET, &format!("/api/audit?{bad}"), &admin, None),
            400,
            bad,
        );
        let message = refused["message"].as_str().unwrap();
        assert!(
            message.starts_with(bad.split('=').next().unwrap()),
            "{message}"
        );
    }

    // The file has the same events, one JSON object a line, and no secret anywhere.
    let file = group.dir.path().join("logs/audit.log");
    let text = std::fs::read_to_string(&file).unwrap();
    for line in text.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        assert!(
            event["time"].is_string() && event["event"].is_string(),
            "{line}"
        );
    }
    for wanted in wanted {
        assert!(
            text.contains(&format!("\"event\":\"{wanted}\"")),
            "{wanted} not in the file"
        );
    }
    let stream = page.to_string();
    for secret in [
        "correct horse 1",
        "not the password",
        "password\"",
        &key[3..],
    ] {
        assert!(
            !text.contains(secret) && !stream.contains(secret),
            "{secret} was written"
        );
    }

    // The stream is capped near `max_events`: a hundred keys made and revoked (two events
    // each) leave at most about that many.
    for i in 0..100 {
        let made = create_key(&group, &admin, &format!("k{i}"), "viewer");
        let id = made["id"].as_str().unwrap();
        expect(
            group.call(Method::DELETE, &format!("/api/keys/{id}"), &admin, None),
            204,
            "revoke",
        );
    }
    let page = expect(
        group.call(Method::GET, "/api/audit?limit=500", &admin, None),
        200,
        "audit",
    );
    let kept = page["events"].as_array().unwrap().len();
    assert!((100..=200).contains(&kept), "{kept} events kept");
    // The file keeps them all.
    let lines = std::fs::read_to_string(&file).unwrap().lines().count();
    assert!(lines >= 200 + wanted.len(), "{lines}");
}

#[test]
fn admins_see_the_groups_status() {
    let group = Group::start(Options::default());
    let admin = group.token();
    let status = |group: &Group| {
        expect(
            group.call(Method::GET, "/api/status", &admin, None),
            200,
            "status",
        )
    };
    let first = status(&group);
    assert_eq!(first["backends"]["in_rotation"], 3, "{first}");
    assert_eq!(first["backends"]["total"], 3, "{first}");
    assert_eq!(first["redis"], "up");
    for _ in 0..5 {
        group.get("/api/ping").unwrap();
    }
    let started = Instant::now();
    let second = status(&group);
    assert!(started.elapsed() < Duration::from_secs(2));
    let (a, b) = (
        first["requests_total"].as_u64().unwrap(),
        second["requests_total"].as_u64().unwrap(),
    );
    assert!(b >= a + 5, "{a} then {b}");
    assert!(second["time_ms"].as_u64() > first["time_ms"].as_u64());
}

/// The edge's own guards are audit events too: a client past a route's rate limit is one
/// `guard.tripped` (handed by the proxy to a backend, which writes it), however long it goes
/// on, and other clients are served.
#[test]
fn a_tripped_rate_limit_is_one_audit_event_per_client_and_route() {
    let group = Group::start(Options {
        extra: "[rate_limits.tight]\nper_second = 1\nburst = 2\n\
                [[routes]]\nprefix = \"/limited/\"\nupstream = \"backends\"\n\
                rewrite_prefix = \"/api/\"\nrate_limit = \"tight\"\n"
            .into(),
        ..Options::default()
    });
    let admin = group.token();
    let flooder = group.client_from("127.0.0.5");
    let limited = (0..60)
        .filter(|_| {
            flooder
                .get(group.url("/limited/ping"))
                .send()
                .unwrap()
                .status()
                == 429
        })
        .count();
    assert!(limited >= 50, "{limited}");
    assert_eq!(group.get("/limited/ping").unwrap().status(), 200);
    let mut tripped = Vec::new();
    let found = wait_until(Duration::from_secs(5), || {
        let page = expect(
            group.call(Method::GET, "/api/audit?limit=500", &admin, None),
            200,
            "audit",
        );
        tripped = page["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "guard.tripped" && e["client"] == "127.0.0.5")
            .cloned()
            .collect();
        !tripped.is_empty()
    });
    assert!(found, "no guard.tripped event");
    assert_eq!(tripped.len(), 1, "{tripped:?}");
    let event = &tripped[0];
    assert_eq!(event["detail"], "rate_limit");
    assert_eq!(event["target"], "/limited/");
    assert!(
        event["source"].as_str().is_some_and(|s| s.starts_with('b')),
        "written by a backend: {event}"
    );
    assert_eq!(event["outcome"], "denied");
    assert!(
        event["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    // The backend's admin socket takes only such an event, whole and small.
    let socket = group.dir.path().join("run/backend-1.admin.sock");
    let post = |body: &str| {
        let request = format!(
            "POST /audit HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        unix_request(&socket, &request, Duration::from_secs(5))
            .unwrap()
            .0
    };
    let long_route = format!(
        r#"{{"guard":"rate_limit","client":"192.0.2.1","route":"{}","request_id":"r","correlation_id":"c"}}"#,
        "x".repeat(5000)
    );
    for bad in [
        "{}",
        "not json",
        r#"{"guard":"login","client":"192.0.2.1","route":"/","request_id":"r","correlation_id":"c"}"#,
        r#"{"guard":"rate_limit","client":"nowhere","route":"/","request_id":"r","correlation_id":"c"}"#,
        &long_route,
    ] {
        assert_eq!(post(bad), 400, "{bad:.80}");
    }
}
