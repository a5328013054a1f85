//! Changing a running group: reload (SIGHUP, `gatehouse reload`), rolling backend restarts and
//! the zero-downtime binary upgrade, each under load from real HTTP clients that count every
//! failed request.

use std::{
    fs,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use crate::util::{self, BIN, Group, Options, wait_until};

/// Clients hammering one URL over keep-alive connections until stopped: GETs, which the proxy
/// may retry on another backend, and POSTs, which it never replays (a backend answers them
/// with 405), so a request lost in a restart shows.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    pub(crate) fn start(group: &Group, path: &str, clients: usize) -> Load {
        let clients = (0..clients)
            .map(|i| {
                // Half over HTTP/1.1 keep-alive, half over HTTP/2; every third one POSTs.
                let client = group.http_client(i % 2 == 0);
                (client, group.url(path), i % 3 == 2)
            })
            .collect();
        Load::run(clients)
    }

    /// `clients` HTTP/1.1 clients sending `GET url` over keep-alive connections.
    pub(crate) fn get(url: &str, clients: usize) -> Load {
        let clients = (0..clients)
            .map(|_| {
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("client");
                (client, url.to_owned(), false)
            })
            .collect();
        Load::run(clients)
    }

    /// Each of `clients` sending `GET url`, with whatever connections it was built to make.
    pub(crate) fn get_with(clients: Vec<reqwest::blocking::Client>, url: &str) -> Load {
        Load::run(
            clients
                .into_iter()
                .map(|c| (c, url.to_owned(), false))
                .collect(),
        )
    }

    /// Each client with its URL, and whether it POSTs (which a backend answers 405).
    fn run(clients: Vec<(reqwest::blocking::Client, String, bool)>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let workers = clients
            .into_iter()
            .map(|(client, url, post)| {
                let stop = stop.clone();
                let expected = if post { 405 } else { 200 };
                thread::spawn(move || {
                    let (mut ok, mut failures) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        let request = if post {
                            client.post(&url)
                        } else {
                            client.get(&url)
                        };
                        match request.send() {
                            Ok(r) if r.status() == expected => ok += 1,
                            Ok(r) => failures.push(format!("status {}", r.status())),
                            Err(e) => failures.push(format!("{e:?}")),
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, workers }
    }

    /// Stops the clients and checks that plenty of requests were made and none failed.
    pub(crate) fn finish_without_failures(self) {
        let (ok, failures) = self.finish();
        assert!(ok > 100, "only {ok} requests");
        assert!(
            failures.is_empty(),
            "{} failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }

    /// Stops the clients; returns how many requests succeeded and every failure.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = (0, Vec::new());
        for worker in self.workers {
            let (ok, failures) = worker.join().expect("load thread");
            total.0 += ok;
            total.1.extend(failures);
        }
        total
    }
}

fn gatehouse(group: &Group, command: &str) -> std::process::Output {
    Command::new(BIN)
        .args([command, "--config"])
        .arg(group.dir.path().join("gatehouse.toml"))
        .output()
        .expect("gatehouse")
}

pub(crate) fn edit_config(group: &Group, old: &str, new: &str) {
    let path = group.dir.path().join("gatehouse.toml");
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains(old), "{old} not in the config");
    fs::write(&path, text.replacen(old, new, 1)).unwrap();
}

#[test]
fn reload_applies_routes_and_certificates_without_a_failed_request_and_refuses_a_bad_file() {
    let group = Group::start(Options::default());
    let load = Load::start(&group, "/api/ping", 6);
    assert_eq!(group.get("/open/").unwrap().status(), 200);

    // An allowlist on /open/, applied by `gatehouse reload` (which checks the file first),
    // and a deadline of the backend pool, which is built at start: named, not applied.
    edit_config(
        &group,
        "prefix = \"/open/\"\n",
        "prefix = \"/open/\"\nallow = [\"10.0.0.0/8\"]\n",
    );
    edit_config(
        &group,
        "[upstream]\n",
        "[upstream]\nread_timeout = \"6s\"\n",
    );
    let output = gatehouse(&group, "reload");
    assert!(output.status.success(), "{output:?}");
    assert!(
        wait_until(Duration::from_secs(5), || group
            .get("/open/")
            .is_ok_and(|r| r.status() == 403)),
        "the new allowlist was not applied:\n{}",
        group.log()
    );
    assert!(wait_until(Duration::from_secs(5), || {
        group.metric(r#"gatehouse_reloads_total{result="ok"}"#) == Some(1.0)
            && group.metric(r#"gatehouse_proxy_reloads_total{result="ok"}"#) == Some(1.0)
    }));
    let log = group.log();
    assert!(
        log.lines()
            .any(|line| line.contains("change only at a restart or upgrade")
                && line.contains("upstream.read_timeout")),
        "the reload did not name upstream.read_timeout:\n{log}"
    );

    // A bad file: `gatehouse reload` says where and sends nothing; SIGHUP with it is refused
    // by the supervisor, and the running configuration stays.
    edit_config(
        &group,
        "allow = [\"10.0.0.0/8\"]",
        "allow = [\"10.0.0.0/33\"]",
    );
    let output = gatehouse(&group, "reload");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("gatehouse.toml:") && stderr.contains("allow[0]"),
        "{stderr}"
    );
    util::signal(group.pid(), libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || {
            group.metric(r#"gatehouse_reloads_total{result="failed"}"#) == Some(1.0)
        }),
        "the failed reload was not counted"
    );
    assert!(group.log().contains("reload refused"));
    assert_eq!(group.get("/open/").unwrap().status(), 403, "the old config");

    // A new certificate: new connections get it after the reload.
    edit_config(
        &group,
        "allow = [\"10.0.0.0/33\"]",
        "allow = [\"10.0.0.0/8\"]",
    );
    let output = Command::new(BIN)
        .args(["cert", "--force", "--config"])
        .arg(group.dir.path().join("gatehouse.toml"))
        .output()
        .unwrap();
    assert!(output.status.success());
    let trusts_new_certificate = group.http_client(true);
    assert!(
        trusts_new_certificate
            .get(group.url("/api/ping"))
            .send()
            .is_err(),
        "the new certificate is served before the reload"
    );
    util::signal(group.pid(), libc::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(5), || trusts_new_certificate
            .get(group.url("/api/ping"))
            .send()
            .is_ok_and(|r| r.status() == 200)),
        "the new certificate was not served after the reload"
    );

    // The load clients built before the new certificate keep their open connections.
    load.finish_without_failures();
}

#[test]
fn backends_restart_one_at_a_time_when_their_settings_change() {
    let group = Group::start(Options::default());
    let before: Vec<u32> = ["b1", "b2", "b3"]
        .iter()
        .map(|id| group.child_pid(&format!("--id {id} ")).expect("backend"))
        .collect();
    let load = Load::start(&group, "/api/ping", 6);
    thread::sleep(Duration::from_millis(300));
    // A key that needs a restart of the group: refused as a whole.
    edit_config(&group, "count = 3\n", "count = 2\n");
    util::signal(group.pid(), libc::SIGHUP);
    assert!(wait_until(Duration::from_secs(5), || {
        group.metric(r#"gatehouse_reloads_total{result="failed"}"#) == Some(1.0)
    }));
    assert!(group.log().contains("change only with a restart"));
    edit_config(&group, "count = 2\n", "count = 3\n");
    edit_config(&group, "[backend]\n", "[backend]\ntoken_ttl = \"10m\"\n");
    assert!(gatehouse(&group, "reload").status.success());
    assert!(
        wait_until(Duration::from_secs(30), || {
            ["b1", "b2", "b3"].iter().zip(&before).all(|(id, old)| {
                group
                    .child_pid(&format!("--id {id} "))
                    .is_some_and(|pid| pid != *old)
            })
        }),
        "the backends were not all restarted:\n{}",
        group.log()
    );
    thread::sleep(Duration::from_millis(500));
    load.finish_without_failures();
    // The new setting is in force: a fresh token lives 600 s.
    let token = group.token();
    let payload = token.split('.').nth(1).unwrap();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );
    // A planned restart is not a crash.
    assert_eq!(
        group.metric(r#"gatehouse_supervisor_restarts_total{child="b1"}"#),
        Some(0.0)
    );
}

#[test]
fn a_reload_that_only_moves_lines_leaves_the_backends_alone() {
    // A secret file named in the config: the key's line moves with the comment below.
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("admin_password"),
        "a random admin password\n",
    )
    .unwrap();
    let group = Group::start_in(
        dir,
        Options {
            backends: 1,
            backend_extra: "admin_password_file = \"admin_password\"\n".into(),
            ..Options::default()
        },
    );
    let before = group.child_pid("--id b1 ").expect("backend");
    let path = group.dir.path().join("gatehouse.toml");
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, format!("# every line one further down\n{text}")).unwrap();
    assert!(gatehouse(&group, "reload").status.success());
    // Counted once the reload is done, a rolling restart included.
    assert!(
        wait_until(Duration::from_secs(30), || {
            group.metric(r#"gatehouse_reloads_total{result="ok"}"#) == Some(1.0)
        }),
        "the reload did not complete:\n{}",
        group.log()
    );
    assert_eq!(
        group.child_pid("--id b1 "),
        Some(before),
        "the backend was restarted:\n{}",
        group.log()
    );
}

#[test]
fn upgrade_hands_the_sockets_to_a_new_proxy_without_a_failed_request() {
    let group = Group::start(Options::default());
    let old_proxy = group.child_pid(" proxy ").expect("proxy");
    let load = Load::start(&group, "/api/ping", 6);
    thread::sleep(Duration::from_millis(300));
    let output = gatehouse(&group, "upgrade");
    assert!(output.status.success(), "{output:?}");
    assert!(
        wait_until(Duration::from_secs(40), || {
            !util::alive(old_proxy)
                && group.child_pid(" proxy ").is_some_and(|p| p != old_proxy)
                && group.log().contains("upgrade done")
        }),
        "the upgrade did not complete:\n{}",
        group.log()
    );
    thread::sleep(Duration::from_millis(500));
    load.finish_without_failures();
    assert_eq!(group.get("/api/ping").unwrap().status(), 200);
    // The audit log has it, done by the group.
    let audit: serde_json::Value = group
        .call(reqwest::Method::GET, "/api/audit", &group.token(), None)
        .json()
        .unwrap();
    let upgraded = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event"] == "binary.upgraded")
        .cloned()
        .unwrap_or_else(|| panic!("no binary.upgraded event: {audit}"));
    assert_eq!(upgraded["outcome"], "success");
    assert_eq!(upgraded["actor"], "gatehouse");
}
