//! Tokens fail closed: Redis losing its data refuses every earlier token and heals without a
//! restart; a user's live tokens are capped; the proxy never holds the JWT secret.

use std::{
    fs,
    io::{Read, Seek, SeekFrom},
    thread,
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use reqwest::Method;
use serde_json::{Value, json};

use crate::util::{
    Group, Options, PASSWORD, Redis, SECRET, USER, group_with_own_redis, metric_sum, signal,
    wait_until,
};

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&B64.decode(payload).expect("base64url")).expect("JSON claims")
}

/// The status and message of a request with `token`, on `/api/me` or `/api/count`.
fn answer(group: &Group, path: &str, token: &str) -> (u16, String) {
    let response = group.call(Method::GET, path, token, None);
    let status = response.status().as_u16();
    let body: Value = response.json().unwrap_or(Value::Null);
    if status >= 400 {
        assert_eq!(body["error"], "invalid_token", "{path}: {body}");
        assert!(body["request_id"].is_string(), "{path}: {body}");
    }
    (status, body["message"].as_str().unwrap_or("").to_string())
}

fn refused_as_lost(group: &Group, token: &str, what: &str) {
    for path in ["/api/me", "/api/count", "/auth/verify"] {
        let (status, message) = answer(group, path, token);
        assert_eq!(status, 401, "{what} on {path}: {message}");
        assert!(message.contains("lost its data"), "{what}: {message}");
    }
}

fn seedings(group: &Group) -> usize {
    group.log().matches("seeded the users in Redis").count()
}

/// Kills every backend and waits until the supervisor has started them all again.
fn restart_backends(group: &Group, backends: usize) {
    let ids: Vec<String> = (1..=backends).map(|i| format!("--id b{i} ")).collect();
    let old: Vec<u32> = ids
        .iter()
        .map(|id| group.child_pid(id).expect("a backend"))
        .collect();
    for pid in &old {
        signal(*pid, libc::SIGKILL);
    }
    for (id, pid) in ids.iter().zip(&old) {
        assert!(
            wait_until(Duration::from_secs(20), || group
                .child_pid(id)
                .is_some_and(|p| p != *pid)),
            "{id} was not restarted:\n{}",
            group.log()
        );
    }
    assert!(
        wait_until(Duration::from_secs(20), || {
            group.get("/api/ping").is_ok_and(|r| r.status() == 200)
        }),
        "the backends did not come back"
    );
}

#[test]
fn redis_data_loss_refuses_earlier_tokens_and_heals_without_a_restart() {
    let backends = 3;
    let (_data, redis, group) = group_with_own_redis(backends);
    let kept = group.token();
    let logged_out = group.token();
    assert_eq!(
        group
            .call(Method::POST, "/auth/logout", &logged_out, None)
            .status(),
        204
    );
    assert_eq!(answer(&group, "/api/count", &kept).0, 200);
    assert_eq!(seedings(&group), 1);

    // The volume is lost. Every earlier token is refused, the logged-out one too (it was on
    // no list that could be lost: it had left its user's live tokens).
    assert_eq!(redis.command(&["FLUSHALL"]), "OK");
    refused_as_lost(&group, &kept, "a token of before");
    let (status, _) = answer(&group, "/api/me", &logged_out);
    assert_eq!(status, 401, "the logged-out token");

    // Logging in works again at once, without a restart, even with every backend racing to
    // seed: the users are seeded exactly once. (Four at once: under the login guard's
    // per-name limit, which charges each attempt before its password is checked.)
    let logins: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (group.client.clone(), group.url("/auth/login"));
            thread::spawn(move || {
                let response = client
                    .post(url)
                    .json(&json!({"username": USER, "password": PASSWORD}))
                    .send()
                    .unwrap();
                let status = response.status().as_u16();
                let body: Value = response.json().unwrap();
                (status, body["token"].as_str().unwrap_or("").to_string())
            })
        })
        .collect();
    let fresh: Vec<String> = logins
        .into_iter()
        .map(|login| {
            let (status, token) = login.join().unwrap();
            assert_eq!(status, 200, "a login after the loss:\n{}", group.log());
            token
        })
        .collect();
    assert_eq!(redis.command(&["SCARD", "gatehouse:users"]), "1");
    assert_eq!(seedings(&group), 2, "seeded once more:\n{}", group.log());
    let generation = redis.command(&["GET", "gatehouse:generation"]);
    assert_ne!(generation, claims_of(&kept)["gen"].as_str().unwrap());
    for token in &fresh {
        assert_eq!(claims_of(token)["gen"], generation.as_str());
        assert_eq!(answer(&group, "/api/count", token).0, 200);
    }
    refused_as_lost(&group, &kept, "a token of before, after the heal");
    refused_as_lost(&group, &logged_out, "the logged-out token, after the heal");

    // Loud: an error line and a metric.
    assert!(
        group.log().contains("Redis lost its data"),
        "{}",
        group.log()
    );
    let metrics = group.admin("/metrics").1;
    assert!(metric_sum(&metrics, "gatehouse_backend_redis_data_losses_total", &[]) >= 1.0);
    assert_eq!(
        metric_sum(&metrics, "gatehouse_backend_redis_generations_total", &[]),
        2.0,
        "{metrics}"
    );

    // Restarted backends do not bring the earlier tokens back, and keep the new ones.
    restart_backends(&group, backends);
    refused_as_lost(&group, &kept, "a token of before, after a restart");
    refused_as_lost(&group, &logged_out, "the logged-out token, after a restart");
    assert_eq!(answer(&group, "/api/me", &fresh[0]).0, 200);

    // Lost again, and this time the backends restart before anyone logs in: they seed at
    // start, and still nothing of before is accepted.
    assert_eq!(redis.command(&["FLUSHALL"]), "OK");
    restart_backends(&group, backends);
    assert!(
        wait_until(Duration::from_secs(10), || {
            redis.command(&["GET", "gatehouse:generation"]) != "(nil)"
        }),
        "the restarted backends seed at start"
    );
    for token in [&kept, &logged_out, &fresh[0]] {
        refused_as_lost(&group, token, "after a loss and a restart");
    }
    let again = group.token();
    assert_eq!(answer(&group, "/api/count", &again).0, 200);
}

#[test]
fn a_user_past_the_token_cap_loses_its_oldest_and_a_change_revokes_them_all() {
    let data = tempfile::tempdir().unwrap();
    let redis = Redis::start(data.path());
    let group = Group::start(Options {
        backends: 2,
        redis_url: Some(redis.url()),
        backend_extra: "max_tokens_per_user = 3".into(),
        ..Options::default()
    });
    let admin = group.token();
    let body = json!({"username": "vic", "password": "vic-password", "role": "viewer"});
    assert_eq!(
        group
            .call(Method::POST, "/api/users", &admin, Some(body))
            .status(),
        201
    );
    let tokens: Vec<String> = (0..5)
        .map(|_| group.token_for("vic", "vic-password"))
        .collect();
    // The two oldest went when the fourth and fifth were issued; the newest three work.
    for (i, token) in tokens.iter().enumerate() {
        let (status, message) = answer(&group, "/api/me", token);
        if i < 2 {
            assert_eq!(status, 401, "token {i}");
            assert!(message.contains("revoked"), "token {i}: {message}");
        } else {
            assert_eq!(status, 200, "token {i}: {message}");
        }
    }
    assert_eq!(redis.command(&["ZCARD", "gatehouse:sessions:vic"]), "3");
    let metrics = group.admin("/metrics").1;
    assert_eq!(
        metric_sum(&metrics, "gatehouse_backend_tokens_over_cap_total", &[]),
        2.0
    );
    // Each is an audit event too.
    let audit: Value = group
        .call(Method::GET, "/api/audit?limit=100", &admin, None)
        .json()
        .unwrap();
    let revoked = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "tokens.revoked" && e["target"] == "vic")
        .count();
    assert_eq!(revoked, 2, "{audit}");

    // Any change to the user revokes every token it holds (a bounded delete: at most the
    // cap), and no one else's.
    let change = json!({"role": "maintainer"});
    assert_eq!(
        group
            .call(Method::PUT, "/api/users/vic", &admin, Some(change))
            .status(),
        200
    );
    for token in &tokens {
        assert_eq!(answer(&group, "/api/me", token).0, 401);
    }
    assert_eq!(redis.command(&["EXISTS", "gatehouse:sessions:vic"]), "0");
    assert_eq!(
        answer(&group, "/api/me", &admin).0,
        200,
        "the admin's token"
    );
    let fresh = group.token_for("vic", "vic-password");
    assert_eq!(answer(&group, "/api/me", &fresh).0, 200);
}

/// Whether `needle` is anywhere in the writable memory of process `pid`.
fn in_memory(pid: u32, needle: &[u8]) -> bool {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut mem = fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    // A scan that could read nothing would find nothing, and pass for the wrong reason.
    let mut read = 0;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        if !perms.starts_with("rw") {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        if end - start > 512 << 20 {
            continue;
        }
        let mut region = vec![0; (end - start) as usize];
        if mem.seek(SeekFrom::Start(start)).is_err() || mem.read_exact(&mut region).is_err() {
            continue;
        }
        read += 1;
        if region.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
    }
    assert!(read > 0, "no writable memory region of {pid} could be read");
    false
}

#[test]
fn the_proxy_holds_no_jwt_secret_and_the_admin_password_comes_from_its_secret() {
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("admin_password");
    fs::write(&password_file, "a random admin password\n").unwrap();
    // The harness gives `gatehouse run` the JWT secret in its environment.
    let group = Group::start(Options {
        backends: 1,
        env: vec![(
            "GATEHOUSE_ADMIN_PASSWORD_FILE".into(),
            password_file.display().to_string(),
        )],
        ..Options::default()
    });
    let proxy = group.child_pid(" proxy --config").expect("the proxy");
    let backend = group.child_pid("--id b1 ").expect("a backend");
    let environ = |pid: u32| {
        String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/environ")).unwrap()).into_owned()
    };
    let (proxy_env, backend_env) = (environ(proxy), environ(backend));
    assert!(
        backend_env.contains(SECRET),
        "the backend has it: the check can see"
    );
    for leak in [
        SECRET,
        "GATEHOUSE_JWT_SECRET",
        "GATEHOUSE_ADMIN_PASSWORD_FILE",
    ] {
        assert!(
            !proxy_env.contains(leak),
            "the proxy's environment has {leak}"
        );
    }
    // Nor its memory: the backend's has the secret (the scan finds it), the proxy's not.
    assert!(in_memory(backend, SECRET.as_bytes()), "the scan works");
    assert!(
        !in_memory(proxy, SECRET.as_bytes()),
        "the proxy's memory has it"
    );

    // A proxy started by an upgrade (SIGUSR2) gets the same environment.
    signal(group.pid(), libc::SIGUSR2);
    assert!(
        wait_until(Duration::from_secs(40), || {
            !crate::util::alive(proxy)
                && group.log().contains("upgrade done")
                && group.child_pid(" proxy --config").is_some()
        }),
        "the upgrade did not complete:\n{}",
        group.log()
    );
    let upgraded = group.child_pid(" proxy --config").expect("the new proxy");
    let upgraded_env = environ(upgraded);
    for leak in [
        SECRET,
        "GATEHOUSE_JWT_SECRET",
        "GATEHOUSE_ADMIN_PASSWORD_FILE",
    ] {
        assert!(
            !upgraded_env.contains(leak),
            "the new proxy's environment has {leak}"
        );
    }

    // The first admin's password is the secret's, not the users file's well-known one.
    assert_eq!(group.login(USER, PASSWORD).status(), 401);
    let token = group.token_for(USER, "a random admin password");
    assert_eq!(answer(&group, "/api/me", &token).0, 200);
}

#[test]
fn a_redis_with_a_generation_but_no_users_is_seeded() {
    // What a configuration with nobody in it left behind (or a loss of the users alone): a
    // generation marker, no users. The users are seeded all the same, under a new generation.
    let data = tempfile::tempdir().unwrap();
    let redis = Redis::start(data.path());
    assert_eq!(redis.command(&["SET", "gatehouse:generation", "old"]), "OK");
    let group = Group::start(Options {
        backends: 2,
        redis_url: Some(redis.url()),
        ..Options::default()
    });
    let token = group.token();
    assert_eq!(answer(&group, "/api/me", &token).0, 200);
    assert_eq!(redis.command(&["SCARD", "gatehouse:users"]), "1");
    let generation = redis.command(&["GET", "gatehouse:generation"]);
    assert_ne!(generation, "old");
    assert_eq!(claims_of(&token)["gen"], generation.as_str());
    assert_eq!(seedings(&group), 1, "{}", group.log());

    // The users set alone is lost (an eviction): the next login seeds it again, and a record
    // that outlived it keeps its password rather than the file's.
    let changed = group.call(
        Method::PUT,
        "/api/users/admin",
        &token,
        Some(json!({"password": "changed-by-the-api"})),
    );
    assert_eq!(changed.status(), 200);
    let token = group.token_for("admin", "changed-by-the-api");
    assert_eq!(redis.command(&["DEL", "gatehouse:users"]), "1");
    let again = group.token_for("admin", "changed-by-the-api");
    assert_eq!(redis.command(&["SCARD", "gatehouse:users"]), "1");
    assert_eq!(answer(&group, "/api/me", &again).0, 200);
    assert_eq!(group.login("admin", "password").status(), 401);
    refused_as_lost(
        &group,
        &token,
        "a token of before the users were seeded again",
    );
}

/// A request straight to backend `b1`'s socket; the status.
fn socket_request(group: &Group, request: &str) -> u16 {
    let socket = group.dir.path().join("run/backend-1.sock");
    crate::util::unix_request(&socket, request, Duration::from_secs(30))
        .map_or(0, |(status, _)| status)
}

fn post(path: &str, headers: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: backend\r\n{headers}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[test]
fn a_user_created_with_a_token_of_before_a_loss_does_not_stop_the_seeding() {
    let data = tempfile::tempdir().unwrap();
    let redis = Redis::start(data.path());
    let group = Group::start(Options {
        backends: 1,
        tls: false,
        redis_url: Some(redis.url()),
        backend_extra: "login_max_failures_per_ip = 1000\n\
                        login_max_failures_per_user_all_ips = 1000\n"
            .into(),
        ..Options::default()
    });
    let admin = group.token();
    // Logins that keep the backend's two password-hashing slots busy, so the creation waits
    // for its turn after its token was checked, and Redis loses its data meanwhile.
    let create = post(
        "/api/users",
        &format!("Authorization: Bearer {admin}\r\n"),
        r#"{"username":"late","password":"late-password","role":"admin"}"#,
    );
    let created = thread::scope(|scope| {
        let busy: Vec<_> = (0..16)
            .map(|i| {
                let group = &group;
                scope.spawn(move || {
                    let body = format!(r#"{{"username":"nobody{i}","password":"x"}}"#);
                    socket_request(
                        group,
                        &post("/auth/login", "X-Real-IP: 198.51.100.9\r\n", &body),
                    )
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(30));
        let creating = scope.spawn(|| socket_request(&group, &create));
        thread::sleep(Duration::from_millis(100));
        assert_eq!(redis.command(&["FLUSHALL"]), "OK");
        for login in busy {
            login.join().unwrap();
        }
        creating.join().unwrap()
    });
    // Refused as the token check would refuse it now; the file's users are seeded, and the
    // user the admin asked for was not made.
    assert_eq!(created, 401, "{}", group.log());
    let fresh = group.token();
    assert_eq!(answer(&group, "/api/me", &fresh).0, 200);
    assert_eq!(
        redis.command(&["SISMEMBER", "gatehouse:users", "late"]),
        "0"
    );
    assert_eq!(redis.command(&["SCARD", "gatehouse:users"]), "1");
}

#[test]
fn while_redis_refuses_writes_a_backend_tries_to_seed_once_a_second_and_says_so_once() {
    let (_data, redis, group) = group_with_own_redis(1);
    let token = group.token();
    assert_eq!(redis.command(&["FLUSHALL"]), "OK");
    // No replica, so no write is accepted: the seed script fails.
    assert_eq!(
        redis.command(&["CONFIG", "SET", "min-replicas-to-write", "1"]),
        "OK"
    );
    let scripts = || {
        let stats = redis.command(&["INFO", "commandstats"]);
        stats
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .flat_map(|l| l.split([',', ':']))
            .filter_map(|f| {
                let (name, value) = f.split_once('=')?;
                // A script that fails is in `calls` and `failed_calls`; one refused
                // before it runs only in `rejected_calls`.
                ["calls", "rejected_calls"]
                    .contains(&name)
                    .then(|| value.parse::<u64>().ok())
                    .flatten()
            })
            .sum::<u64>()
    };
    let before = scripts();
    let started = std::time::Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_millis(2500) {
        assert_eq!(answer(&group, "/api/me", &token).0, 401);
        requests += 1;
    }
    let tries = scripts() - before;
    assert!(requests >= 10, "{requests} requests");
    assert!(tries <= 4, "{tries} seed scripts for {requests} requests");
    assert_eq!(
        group.log().matches("cannot seed Redis again yet").count(),
        1,
        "{}",
        group.log()
    );
    // Writes come back: the next try seeds, and logging in works.
    assert_eq!(
        redis.command(&["CONFIG", "SET", "min-replicas-to-write", "0"]),
        "OK"
    );
    let fresh = group.token();
    assert_eq!(answer(&group, "/api/me", &fresh).0, 200);
}
