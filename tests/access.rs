//! Edge access control for real: distinct loopback source addresses, htpasswd files made by
//! the real `htpasswd` tool, forged forwarding headers, bursts and floods.

use std::{fs, process::Command, thread, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use serde_json::Value;

use crate::util::{self, Group, Options};

/// A group whose `/files/` directory is served again under guarded prefixes.
fn group(access: &str, extra: &str) -> Group {
    Group::start(Options {
        backends: 1,
        keys: format!("[access]\n{access}"),
        extra: extra.into(),
        ..Options::default()
    })
}

fn status(client: &reqwest::blocking::Client, url: &str, headers: &[(&str, &str)]) -> u16 {
    let mut request = client.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().unwrap().status().as_u16()
}

#[test]
fn allowlists_denylists_and_forged_forwarding_headers() {
    let group = group(
        r#"trusted_proxies = ["127.0.0.3"]"#,
        r#"
[[routes]]
prefix = "/guarded/"
static_dir = "files"
allow = ["127.0.0.1/32", "127.0.1.0/24", "2001:db8::/64", "::ffff:10.9.9.9"]
deny = ["127.0.1.7"]
"#,
    );
    fs::write(group.dir.path().join("files/page.txt"), "members only").unwrap();
    let url = group.url("/guarded/page.txt");

    // Socket peers: /32 and /24 edges, and deny winning over allow.
    for (source, expected) in [
        ("127.0.0.1", 200),
        ("127.0.0.2", 403),
        ("127.0.1.0", 200),
        ("127.0.1.255", 200),
        ("127.0.1.7", 403),
        ("127.0.2.1", 403),
    ] {
        assert_eq!(
            status(&group.client_from(source), &url, &[]),
            expected,
            "from {source}"
        );
    }
    // Denied: JSON for programs, HTML for browsers.
    let denied = group.client_from("127.0.0.2").get(&url).send().unwrap();
    assert_eq!(denied.json::<Value>().unwrap()["error"], "forbidden");
    let denied = group
        .client_from("127.0.0.2")
        .get(&url)
        .header("accept", "text/html")
        .send()
        .unwrap();
    assert!(
        denied.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );

    // A forged X-Forwarded-For / X-Real-IP from an untrusted peer changes nothing.
    let untrusted = group.client_from("127.0.0.2");
    for (name, value) in [
        ("x-forwarded-for", "127.0.0.1"),
        ("x-real-ip", "127.0.0.1"),
        ("x-forwarded-for", "10.9.9.9"),
    ] {
        assert_eq!(
            status(&untrusted, &url, &[(name, value)]),
            403,
            "{name}: {value}"
        );
    }
    // From the trusted proxy, the rightmost untrusted hop is the client: IPv6, mapped IPv4.
    let proxy = group.client_from("127.0.0.3");
    for (chain, expected) in [
        ("10.9.9.9", 200),
        ("::ffff:10.9.9.9", 200),
        ("2001:db8::42", 200),
        ("2001:db8:0:1::42", 403),
        ("198.51.100.1", 403),
        ("10.9.9.9, 198.51.100.1", 403),
        ("198.51.100.1, 10.9.9.9", 200),
        ("10.9.9.9, 127.0.0.3", 200),
        ("garbage", 403),
    ] {
        assert_eq!(
            status(&proxy, &url, &[("x-forwarded-for", chain)]),
            expected,
            "XFF {chain}"
        );
    }
    // Only the configured header (here the default, X-Forwarded-For) names the client.
    assert_eq!(status(&proxy, &url, &[("x-real-ip", "10.9.9.9")]), 403);
    assert_eq!(
        status(&proxy, &url, &[]),
        403,
        "the proxy itself is not allowed"
    );
}

/// An htpasswd file with one user per format, made by the real tool.
fn htpasswd_file(path: &std::path::Path) -> Vec<(String, String)> {
    let mut lines = vec!["# made by htpasswd\r".to_string()];
    let mut users = Vec::new();
    for (flag, user) in [
        ("-B", "bcrypt"),
        ("-m", "apr1"),
        ("-s", "sha1"),
        ("-2", "sha256"),
        ("-5", "sha512"),
    ] {
        let password = format!("{user}-pass:word");
        let output = Command::new("htpasswd")
            .args(["-nb", flag, user, &password])
            .output()
            .expect("htpasswd (apache2-utils) must be installed for the tests");
        assert!(output.status.success(), "htpasswd {flag}");
        let line = String::from_utf8(output.stdout).unwrap().trim().to_string();
        lines.push(format!("{line}\r"));
        users.push((user.to_string(), password));
    }
    // The same bcrypt under the other prefixes crypt libraries write.
    let bcrypt = lines[1].split_once(':').unwrap().1.trim_end().to_string();
    for prefix in ["$2b$", "$2a$"] {
        let user = format!("bcrypt{}", &prefix[2..3]);
        lines.push(format!("{user}:{}{}\r", prefix, &bcrypt[4..]));
        users.push((user, "bcrypt-pass:word".to_string()));
    }
    fs::write(path, lines.join("\n")).unwrap();
    users
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

#[test]
fn basic_auth_with_every_hash_format_and_malformed_headers() {
    let dir = tempfile::tempdir().unwrap();
    let users = htpasswd_file(&dir.path().join("htpasswd"));
    let extra = format!(
        r#"
[[routes]]
prefix = "/secret/"
static_dir = "files"
htpasswd = "{}"
realm = "test realm"

[[routes]]
prefix = "/api/count"
upstream = "backends"
htpasswd = "{0}"
"#,
        dir.path().join("htpasswd").display()
    );
    let group = group(
        "auth_max_failures = 1000\nauth_max_failures_per_user = 1000",
        &extra,
    );
    fs::write(group.dir.path().join("files/s.txt"), "secret").unwrap();
    let url = group.url("/secret/s.txt");
    let client = &group.client;

    for (user, password) in &users {
        assert_eq!(
            status(client, &url, &[("authorization", &basic(user, password))]),
            200,
            "{user} right"
        );
        assert_eq!(
            status(client, &url, &[("authorization", &basic(user, "wrong"))]),
            401,
            "{user} wrong"
        );
        // Again: now answered from the verification cache.
        assert_eq!(
            status(client, &url, &[("authorization", &basic(user, password))]),
            200,
            "{user} cached"
        );
    }
    assert_eq!(
        status(client, &url, &[("authorization", &basic("nobody", "x"))]),
        401
    );

    let response = client.get(&url).send().unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Basic realm=\"test realm\", charset=\"UTF-8\""
    );
    let no_colon = format!("Basic {}", STANDARD.encode("bcrypt"));
    for bad in [
        "Basic",
        "Basic ",
        "Basic !!!notbase64",
        &no_colon,
        "Bearer abc",
        "",
        "basic",
    ] {
        let response = client
            .get(&url)
            .header("authorization", bad)
            .send()
            .unwrap();
        assert_eq!(response.status(), 401, "{bad:?}");
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{bad:?}"
        );
    }

    // The backend never sees the edge's credentials: its answer is "no bearer token at all".
    let (user, password) = &users[0];
    let response = client
        .get(group.url("/api/count"))
        .header("authorization", basic(user, password))
        .send()
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().unwrap();
    assert_eq!(body["error"], "invalid_token");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("header is required"),
        "{body}"
    );
}

/// A group serving `/secret/` behind basic auth with the users of [`htpasswd_file`].
fn guarded_group(guard: &str) -> (tempfile::TempDir, Vec<(String, String)>, Group) {
    let dir = tempfile::tempdir().unwrap();
    let users = htpasswd_file(&dir.path().join("htpasswd"));
    let extra = format!(
        "\n[[routes]]\nprefix = \"/secret/\"\nstatic_dir = \"files\"\nhtpasswd = \"{}\"\n",
        dir.path().join("htpasswd").display()
    );
    let group = group(guard, &extra);
    fs::write(group.dir.path().join("files/s.txt"), "secret").unwrap();
    (dir, users, group)
}

fn password_of<'a>(users: &'a [(String, String)], user: &str) -> &'a str {
    &users.iter().find(|(u, _)| u == user).unwrap().1
}

#[test]
fn repeated_failures_are_refused_and_a_success_takes_back_only_its_own_charge() {
    let (_dir, users, group) = guarded_group("auth_max_failures = 3\nauth_failure_window = \"5s\"");
    let url = group.url("/secret/");
    let right = basic("sha1", password_of(&users, "sha1"));
    let wrong = basic("sha1", "guess");

    // Many parallel requests with the right password are never mistaken for an attack.
    let parallel: Vec<_> = (0..16)
        .map(|_| {
            let (client, url, right) = (group.client_from("127.0.0.4"), url.clone(), right.clone());
            thread::spawn(move || status(&client, &url, &[("authorization", &right)]))
        })
        .collect();
    for request in parallel {
        assert_ne!(request.join().unwrap(), 429);
    }

    // A success in between takes back its own attempt, not the failures before it.
    let client = group.client_from("127.0.0.5");
    for _ in 0..2 {
        assert_eq!(status(&client, &url, &[("authorization", &wrong)]), 401);
    }
    assert_ne!(status(&client, &url, &[("authorization", &right)]), 429);
    assert_eq!(status(&client, &url, &[("authorization", &wrong)]), 401);
    let blocked = client
        .get(&url)
        .header("authorization", &wrong)
        .send()
        .unwrap();
    assert_eq!(
        blocked.status(),
        429,
        "three failures, a success in between: the next attempt is refused"
    );
    assert_eq!(
        blocked.json::<Value>().unwrap()["error"],
        "too_many_failures"
    );
    let blocked = client.get(&url).send().unwrap();
    let retry_after: u64 = blocked.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry_after), "{retry_after}");
    // Even the right password (verified and cached) waits: it must not answer guesses.
    assert_eq!(status(&client, &url, &[("authorization", &right)]), 429);
    // Other clients are not affected.
    assert_ne!(
        status(
            &group.client_from("127.0.0.6"),
            &url,
            &[("authorization", &right)]
        ),
        429
    );
    thread::sleep(Duration::from_secs(retry_after) + Duration::from_millis(200));
    assert_ne!(
        status(&client, &url, &[("authorization", &right)]),
        429,
        "after Retry-After"
    );
    assert!(
        group
            .metric(r#"gatehouse_auth_guard_total{event="address"}"#)
            .unwrap_or(0.0)
            >= 2.0
    );
}

#[test]
fn forty_parallel_guesses_get_no_more_than_the_limit_checked() {
    let (_dir, users, group) = guarded_group("auth_max_failures = 10");
    let url = group.url("/secret/s.txt");
    let right = basic("bcrypt", password_of(&users, "bcrypt"));
    let start = std::sync::Arc::new(std::sync::Barrier::new(41));
    let guesses: Vec<_> = (0..40)
        .map(|i| {
            let (client, url, start) =
                (group.client_from("127.0.0.20"), url.clone(), start.clone());
            thread::spawn(move || {
                let guess = basic("bcrypt", &format!("guess-{i}"));
                start.wait();
                status(&client, &url, &[("authorization", &guess)])
            })
        })
        .collect();
    // An ordinary user signs in from elsewhere while the guesses are checked.
    let user = group.client_from("127.0.0.21");
    start.wait();
    assert_eq!(status(&user, &url, &[("authorization", &right)]), 200);
    let statuses: Vec<u16> = guesses.into_iter().map(|g| g.join().unwrap()).collect();
    let unauthorized = statuses.iter().filter(|s| **s == 401).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    // Every attempt is charged before its hash is checked: exactly the limit gets checked.
    assert_eq!(unauthorized, 10, "{statuses:?}");
    assert_eq!(refused, 30, "{statuses:?}");
    assert_eq!(status(&user, &url, &[("authorization", &right)]), 200);
}

#[test]
fn wrong_wrong_right_loops_end_in_429() {
    let (_dir, users, group) = guarded_group("auth_max_failures = 10");
    let url = group.url("/secret/s.txt");
    let right = basic("sha1", password_of(&users, "sha1"));
    let attacker = group.client_from("127.0.0.22");
    let mut wrong_guesses = 0;
    let mut refused = false;
    'rounds: for round in 0..20 {
        for i in 0..9 {
            let guess = basic("sha1", &format!("guess-{round}-{i}"));
            match status(&attacker, &url, &[("authorization", &guess)]) {
                401 => wrong_guesses += 1,
                429 => {
                    refused = true;
                    break 'rounds;
                }
                other => panic!("{other}"),
            }
        }
        // The right password (verified once, then from the cache) does not wipe the count.
        if status(&attacker, &url, &[("authorization", &right)]) == 429 {
            refused = true;
            break;
        }
    }
    assert!(refused, "{wrong_guesses} wrong guesses and never refused");
    assert_eq!(wrong_guesses, 10);
    assert_eq!(
        status(
            &group.client_from("127.0.0.23"),
            &url,
            &[("authorization", &right)]
        ),
        200,
        "an ordinary client is served"
    );
}

#[test]
fn a_reload_keeps_the_guard_counts() {
    let (_dir, users, group) = guarded_group("auth_max_failures = 3");
    let url = group.url("/secret/s.txt");
    let right = basic("sha1", password_of(&users, "sha1"));
    let attacker = group.client_from("127.0.0.24");
    for i in 0..3 {
        let guess = basic("sha1", &format!("guess-{i}"));
        assert_eq!(status(&attacker, &url, &[("authorization", &guess)]), 401);
    }
    assert_eq!(status(&attacker, &url, &[]), 429);
    util::signal(group.pid(), libc::SIGHUP);
    assert!(
        util::wait_until(Duration::from_secs(10), || {
            group.metric(r#"gatehouse_proxy_reloads_total{result="ok"}"#) == Some(1.0)
        }),
        "no reload:\n{}",
        group.log()
    );
    for i in 3..6 {
        let guess = basic("sha1", &format!("guess-{i}"));
        assert_eq!(
            status(&attacker, &url, &[("authorization", &guess)]),
            429,
            "the count survived the reload"
        );
    }
    assert_eq!(
        status(
            &group.client_from("127.0.0.25"),
            &url,
            &[("authorization", &right)]
        ),
        200
    );
}

#[test]
fn guesses_from_one_address_do_not_lock_the_user_out_elsewhere() {
    let (_dir, users, group) =
        guarded_group("auth_max_failures = 3\nauth_max_failures_per_user = 9");
    let url = group.url("/secret/s.txt");
    let right = basic("sha1", password_of(&users, "sha1"));
    let ok = |source: &str| {
        status(
            &group.client_from(source),
            &url,
            &[("authorization", &right)],
        )
    };
    // The user signs in from home.
    assert_eq!(ok("127.0.0.40"), 200);
    let guess = |source: &str, n: usize| {
        let client = group.client_from(source);
        (0..n)
            .map(|i| {
                let guess = basic("sha1", &format!("guess-{source}-{i}"));
                status(&client, &url, &[("authorization", &guess)])
            })
            .collect::<Vec<u16>>()
    };
    // One attacker address: refused after its own three failures...
    assert_eq!(guess("127.0.0.41", 4), [401, 401, 401, 429]);
    // ...while the user signs in from anywhere, a new address included.
    assert_eq!(ok("127.0.0.42"), 200);
    assert_eq!(ok("127.0.0.40"), 200);
    // Three attacker addresses reach the name's ceiling (nine): new addresses are held back
    // for that name for the window; addresses the user signed in from are not, nor are other
    // users.
    assert_eq!(guess("127.0.0.43", 3), [401, 401, 401]);
    assert_eq!(guess("127.0.0.44", 3), [401, 401, 401]);
    assert_eq!(ok("127.0.0.45"), 429);
    assert_eq!(ok("127.0.0.40"), 200);
    assert_eq!(ok("127.0.0.42"), 200);
    assert_eq!(
        status(
            &group.client_from("127.0.0.45"),
            &url,
            &[("authorization", &basic("apr1", password_of(&users, "apr1")))]
        ),
        200
    );
    assert!(
        group
            .metric(r#"gatehouse_auth_guard_total{event="user"}"#)
            .unwrap_or(0.0)
            >= 1.0
    );
    // Five addresses, one user name, two addresses known for it.
    assert!(group.metric("gatehouse_auth_guard_keys").unwrap_or(0.0) >= 8.0);
}

#[test]
fn rate_limits_burst_then_429_then_recover_and_stay_bounded() {
    let group = group(
        "trusted_proxies = [\"127.0.0.3\"]\nrate_limit_max_keys = 200",
        r#"
[rate_limits.tight]
per_second = 2
burst = 3

[rate_limits.slow]
per_second = 0.01
burst = 3

[[routes]]
prefix = "/limited/"
static_dir = "files"
rate_limit = "tight"

[[routes]]
prefix = "/slow/"
static_dir = "files"
rate_limit = "slow"
"#,
    );
    fs::write(group.dir.path().join("files/x.txt"), "x").unwrap();
    let url = group.url("/limited/x.txt");
    let client = group.client_from("127.0.0.7");
    for i in 0..3 {
        assert_eq!(
            status(&client, &url, &[]),
            200,
            "request {i} is within the burst"
        );
    }
    let limited = client.get(&url).send().unwrap();
    assert_eq!(limited.status(), 429);
    let headers = limited.headers().clone();
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["ratelimit-limit"], "3");
    assert_eq!(headers["ratelimit-remaining"], "0");
    assert_eq!(headers["ratelimit-reset"], "1");
    assert_eq!(limited.json::<Value>().unwrap()["error"], "rate_limited");
    // Forged forwarding headers from an untrusted peer do not open a new bucket.
    for i in 0..5 {
        let forged = format!("198.51.100.{i}");
        assert_eq!(status(&client, &url, &[("x-forwarded-for", &forged)]), 429);
    }
    // Another client has its own bucket; this one recovers after the advertised wait.
    assert_eq!(status(&group.client_from("127.0.0.8"), &url, &[]), 200);
    thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        status(&client, &url, &[]),
        200,
        "recovered after Retry-After"
    );

    // Hops the trusted proxy wrote that are no address are each a client of their own: one
    // of them spending its burst leaves the others (and the proxy's own address) alone.
    let proxy = group.client_from("127.0.0.3");
    let slow = group.url("/slow/x.txt");
    let via = |chain: &str| status(&proxy, &slow, &[("x-forwarded-for", chain)]);
    for _ in 0..3 {
        assert_eq!(via("unknown, 127.0.0.3"), 200);
    }
    assert_eq!(via("unknown, 127.0.0.3"), 429);
    assert_eq!(via("garbage"), 200);
    assert_eq!(via("198.51.100.200:4711"), 200);
    assert_eq!(status(&proxy, &slow, &[]), 200);

    // A flood of distinct client addresses (through the trusted proxy) stays bounded, and
    // gives no client a fresh burst: one that spent its burst on the slow policy (which takes
    // 100 s to give one request back) is still refused after the flood.
    let heavy = group.client_from("127.0.0.9");
    for _ in 0..3 {
        assert_eq!(status(&heavy, &slow, &[]), 200);
    }
    assert_eq!(status(&heavy, &slow, &[]), 429);
    for i in 0..3000u32 {
        let ip = format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255);
        for url in [&url, &slow] {
            let _ = status(&proxy, url, &[("x-forwarded-for", &ip)]);
        }
    }
    assert_eq!(
        status(&heavy, &slow, &[]),
        429,
        "no fresh burst after the flood"
    );
    assert_eq!(
        status(&group.client_from("127.0.0.10"), &slow, &[]),
        200,
        "an ordinary client is served"
    );
    for policy in ["tight", "slow"] {
        let tracked = group
            .metric(&format!(
                r#"gatehouse_rate_limit_keys{{policy="{policy}"}}"#
            ))
            .expect("the policy's key count");
        assert!(
            (1.0..=(200.0 + 256.0)).contains(&tracked),
            "3000 clients, {tracked} tracked by {policy}"
        );
    }
    assert!(
        group
            .metric(r#"gatehouse_rate_limit_evicted_total{policy="slow"}"#)
            .unwrap_or(0.0)
            > 0.0,
        "the slow policy's busy clients had to be evicted"
    );
}

#[test]
fn x_real_ip_names_the_client_when_configured() {
    let group = group(
        "trusted_proxies = [\"127.0.0.3\"]\nclient_ip_header = \"x-real-ip\"",
        r#"
[rate_limits.tight]
per_second = 0.1
burst = 2

[[routes]]
prefix = "/limited/"
static_dir = "files"
rate_limit = "tight"
"#,
    );
    fs::write(group.dir.path().join("files/x.txt"), "x").unwrap();
    let url = group.url("/limited/x.txt");
    let proxy = group.client_from("127.0.0.3");
    let via = |headers: &[(&str, &str)]| status(&proxy, &url, headers);
    for _ in 0..2 {
        assert_eq!(via(&[("x-real-ip", "198.51.100.1")]), 200);
    }
    assert_eq!(via(&[("x-real-ip", "198.51.100.1")]), 429);
    // X-Forwarded-For is not read at all now.
    assert_eq!(
        via(&[
            ("x-real-ip", "198.51.100.1"),
            ("x-forwarded-for", "198.51.100.9")
        ]),
        429
    );
    assert_eq!(via(&[("x-real-ip", "198.51.100.2")]), 200);
    // From anyone else, X-Real-IP is ignored.
    let other = group.client_from("127.0.0.11");
    assert_eq!(
        status(&other, &url, &[("x-real-ip", "198.51.100.1")]),
        200,
        "an ordinary client is served"
    );
}

#[test]
fn checks_run_in_order_rate_limit_then_allowlist_then_basic_auth() {
    let dir = tempfile::tempdir().unwrap();
    let users = htpasswd_file(&dir.path().join("htpasswd"));
    let (user, password) = users.iter().find(|(u, _)| u == "apr1").unwrap();
    let extra = format!(
        r#"
[rate_limits.tight]
per_second = 0.5
burst = 3

[[routes]]
prefix = "/ordered/"
static_dir = "files"
rate_limit = "tight"
allow = ["127.0.0.1"]
htpasswd = "{}"
"#,
        dir.path().join("htpasswd").display()
    );
    let group = group("", &extra);
    let url = group.url("/ordered/");
    let outsider = group.client_from("127.0.0.9");
    let good = basic(user, password);
    // Not on the list: 403 before any credential is looked at, right ones included...
    assert_eq!(status(&outsider, &url, &[]), 403);
    assert_eq!(status(&outsider, &url, &[("authorization", &good)]), 403);
    assert_eq!(
        status(&outsider, &url, &[("authorization", &basic(user, "x"))]),
        403
    );
    // ...and the rate limit comes first of all.
    assert_eq!(status(&outsider, &url, &[]), 429);
    // On the list: credentials decide.
    let insider = group.client_from("127.0.0.1");
    assert_eq!(status(&insider, &url, &[]), 401);
    assert_ne!(status(&insider, &url, &[("authorization", &good)]), 401);
}

#[test]
fn a_non_ascii_byte_in_forwarded_for_spoils_only_its_own_hop() {
    let group = group(
        r#"trusted_proxies = ["127.0.0.3"]"#,
        r#"
[[routes]]
prefix = "/guarded/"
static_dir = "files"
allow = ["198.51.100.7/32"]
"#,
    );
    fs::write(group.dir.path().join("files/page.txt"), "members only").unwrap();
    let url = group.url("/guarded/page.txt");
    let proxy = group.client_from("127.0.0.3");
    let via = |chain: &[u8]| {
        proxy
            .get(&url)
            .header(
                "x-forwarded-for",
                reqwest::header::HeaderValue::from_bytes(chain).unwrap(),
            )
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    // The client wrote a Latin-1 byte; the proxy in front appended the address it saw.
    assert_eq!(via(b"caf\xe9, 198.51.100.7"), 200);
    assert_eq!(
        via(b"caf\xe9, 198.51.100.8"),
        403,
        "another client is not let in"
    );
    assert_eq!(
        via(b"198.51.100.7, caf\xe9"),
        403,
        "the bad hop reached is the client"
    );
}

#[test]
fn one_user_name_on_two_routes_is_counted_per_route() {
    let dir = tempfile::tempdir().unwrap();
    let users = htpasswd_file(&dir.path().join("htpasswd"));
    // The same users, in another realm and file.
    fs::copy(dir.path().join("htpasswd"), dir.path().join("other")).unwrap();
    let route = |prefix: &str, realm: &str, file: &str| {
        format!(
            "\n[[routes]]\nprefix = \"{prefix}\"\nstatic_dir = \"files\"\nrealm = \"{realm}\"\nhtpasswd = \"{}\"\n",
            dir.path().join(file).display()
        )
    };
    let group = group(
        "auth_max_failures = 3\nauth_max_failures_per_user = 6",
        &(route("/secret/", "secret", "htpasswd") + &route("/other/", "other", "other")),
    );
    fs::write(group.dir.path().join("files/s.txt"), "secret").unwrap();
    let right = basic("sha1", password_of(&users, "sha1"));
    let secret = group.url("/secret/s.txt");
    let other = group.url("/other/s.txt");
    // Two addresses use up the name's ceiling on /secret/ only.
    for source in ["127.0.0.61", "127.0.0.62"] {
        let client = group.client_from(source);
        for i in 0..3 {
            let guess = basic("sha1", &format!("guess-{i}"));
            assert_eq!(status(&client, &secret, &[("authorization", &guess)]), 401);
        }
    }
    let newcomer = group.client_from("127.0.0.63");
    assert_eq!(
        status(&newcomer, &secret, &[("authorization", &right)]),
        429
    );
    assert_eq!(
        status(&newcomer, &other, &[("authorization", &right)]),
        200,
        "the same name on another route is another user"
    );
    // Signing in on /other/ does not make the address known on /secret/.
    assert_eq!(
        status(&newcomer, &secret, &[("authorization", &right)]),
        429
    );
}

#[test]
fn a_flood_of_sign_ins_from_new_addresses_does_not_wipe_the_guard() {
    let (_dir, users, group) = guarded_group(
        "trusted_proxies = [\"127.0.0.70\"]\nauth_max_failures = 3\nauth_guard_max_keys = 1000",
    );
    let url = group.url("/secret/s.txt");
    let right = basic("sha1", password_of(&users, "sha1"));
    let attacker = group.client_from("127.0.0.71");
    for i in 0..3 {
        let guess = basic("apr1", &format!("guess-{i}"));
        assert_eq!(status(&attacker, &url, &[("authorization", &guess)]), 401);
    }
    assert_eq!(status(&attacker, &url, &[("authorization", &right)]), 429);
    // One valid password, from ever new /64s behind the trusted proxy...
    let proxy = group.client_from("127.0.0.70");
    for i in 0..1500 {
        let from = format!("2001:db8:{:x}:{:x}::1", i / 65536 + 1, i % 65536);
        let headers = [
            ("authorization", right.as_str()),
            ("x-forwarded-for", &from),
        ];
        assert_eq!(status(&proxy, &url, &headers), 200, "{from}");
    }
    // ...then enough new failing addresses to make the table sweep.
    for i in 0..600 {
        let from = format!("2001:db8:ffff:{i:x}::1");
        let headers = [("authorization", "Basic !!!"), ("x-forwarded-for", &from)];
        assert_eq!(status(&proxy, &url, &headers), 401, "{from}");
    }
    assert_eq!(
        status(&attacker, &url, &[("authorization", &right)]),
        429,
        "the attacker's full count survived"
    );
    assert_eq!(
        status(
            &group.client_from("127.0.0.72"),
            &url,
            &[("authorization", &right)]
        ),
        200,
        "an ordinary client is served"
    );
    assert!(group.metric("gatehouse_auth_guard_keys").unwrap_or(0.0) <= 1100.0);
}
