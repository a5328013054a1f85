//! Automatic HTTPS against a real ACME server: pebble, with pebble-challtestsrv answering DNS
//! so that the test names resolve to loopback. Certificates over HTTP-01 and TLS-ALPN-01, the
//! served one checked with `openssl s_client -servername`; a renewal under load without a
//! failed request; a restart serving the stored certificate; a CA that stops answering, with
//! the old certificate serving on and the failure counted.
//!
//! Skipped where pebble is not installed, except where `GATEHOUSE_REQUIRE_PEBBLE` is set (CI).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use crate::{
    operations::Load,
    util::{self, Group, Options, Process, free_ports, wait_until},
};

const NAME: &str = "acme.test";

/// pebble and its DNS server, on ports of their own, told to check challenges on `http_port`
/// and `tls_port`.
struct Pebble {
    directory: String,
    /// The directory URL as gatehouse names its storage and Redis keys after it.
    dir_name: String,
    /// The root the ACME client trusts for pebble's own HTTPS.
    trust: PathBuf,
    server: Option<Process>,
    _dns: Process,
}

impl Pebble {
    /// `None` (skip) where pebble is not installed and no CI asks for it.
    fn start(dir: &Path, http_port: u16, tls_port: u16, validity: Duration) -> Option<Pebble> {
        let installed = Command::new("pebble")
            .arg("-h")
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !installed {
            assert!(
                std::env::var_os("GATEHOUSE_REQUIRE_PEBBLE").is_none(),
                "pebble is not installed, and GATEHOUSE_REQUIRE_PEBBLE asks for it"
            );
            eprintln!("skipped: pebble is not installed (apt-get install pebble)");
            return None;
        }
        let [acme_port, dns_port, dns_management] = free_ports();
        // pebble's HTTPS certificate, signed by a root of the test's own.
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca.self_signed(&ca_key).expect("root");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .signed_by(&leaf_key, &issuer)
            .expect("leaf");
        let trust = dir.join("pebble-root.pem");
        fs::write(&trust, ca_cert.pem()).expect("root");
        fs::write(dir.join("pebble.crt"), leaf.pem()).expect("cert");
        fs::write(dir.join("pebble.key"), leaf_key.serialize_pem()).expect("key");
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": "",
            "certificate": dir.join("pebble.crt"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
            "certificateValidityPeriod": validity.as_secs(),
        }});
        fs::write(dir.join("pebble.json"), config.to_string()).expect("pebble config");

        let log = |name: &str| fs::File::create(dir.join(name)).expect("log file");
        // Every name is loopback, over IPv4 only: the proxy listens on 127.0.0.1.
        let dns = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-management", &format!("127.0.0.1:{dns_management}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .stdout(log("challtestsrv.log"))
            .stderr(log("challtestsrv.err"))
            .spawn()
            .expect("pebble-challtestsrv");
        let server = Command::new("pebble")
            .args(["-config"])
            .arg(dir.join("pebble.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            // No random waits before checks, no nonces refused at random, no authorizations
            // reused: each order is checked for real.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .expect("pebble");
        let up = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", acme_port)).is_ok()
        });
        assert!(up, "pebble did not listen");
        Some(Pebble {
            directory: format!("https://127.0.0.1:{acme_port}/dir"),
            dir_name: format!("127.0.0.1-{acme_port}-dir"),
            trust,
            server: Some(Process(server)),
            _dns: Process(dns),
        })
    }

    fn stop(&mut self) {
        self.server.take();
    }
}

/// A group on `ports` holding `NAME`'s certificate from `pebble` by `challenge`.
fn group(pebble: &Pebble, ports: [u16; 3], challenge: &str, storage: &Path) -> Group {
    group_on(pebble, ports, challenge, storage, None)
}

/// As [`group`], with the Redis at `redis_url` rather than a managed one.
fn group_on(
    pebble: &Pebble,
    ports: [u16; 3],
    challenge: &str,
    storage: &Path,
    redis_url: Option<String>,
) -> Group {
    Group::start(Options {
        backends: 1,
        redis_url,
        ports: Some(ports),
        keys: format!("tls.server_names = [{NAME:?}]\n"),
        extra: format!(
            "[acme]\ndirectory = {:?}\ntrust = {:?}\nchallenge = {challenge:?}\nstorage = {:?}\n\
             contact = [\"ops@example.com\"]\n",
            pebble.directory,
            pebble.trust.display().to_string(),
            storage.display().to_string(),
        ),
        ..Options::default()
    })
}

/// The issuer and serial of the certificate the HTTPS port presents for `sni`; empty if no
/// handshake.
fn presented(port: u16, sni: &str) -> (String, String) {
    let out = util::served_certificate(port, sni, &["-issuer", "-serial"]);
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    (field("issuer="), field("serial="))
}

fn from_pebble(issuer: &str) -> bool {
    issuer.contains("Pebble Intermediate")
}

/// Waits until `port` presents a certificate from pebble for `NAME`; its serial.
fn wait_for_pebble_certificate(group: &Group, port: u16, within: Duration) -> String {
    let mut serial = String::new();
    let issued = wait_until(within, || {
        let (issuer, s) = presented(port, NAME);
        serial = s;
        from_pebble(&issuer)
    });
    assert!(
        issued,
        "no certificate from pebble within {within:?}:\n{}",
        group.log()
    );
    serial
}

/// A client of `NAME` on `port` making a new connection (a handshake) for every request, and
/// taking any certificate: what matters is that each handshake and request succeeds while the
/// certificate changes under it.
fn handshaking_client(port: u16) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .resolve(NAME, ([127, 0, 0, 1], port).into())
        .build()
        .expect("client")
}

/// Now, in seconds since the epoch, as the metrics give times.
fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

fn orders(group: &Group, result: &str) -> f64 {
    group
        .metric(&format!(
            "gatehouse_acme_orders_total{{name=\"{NAME}\",result=\"{result}\"}}"
        ))
        .unwrap_or(0.0)
}

#[test]
fn http_01_issues_a_certificate_served_at_once_and_renewed_under_load() {
    let files = tempfile::tempdir().expect("temp dir");
    let ports = free_ports();
    // 30 s certificates: renewed with a third of that left.
    let Some(pebble) = Pebble::start(files.path(), ports[0], ports[1], Duration::from_secs(30))
    else {
        return;
    };
    let storage = files.path().join("acme");
    let started = Instant::now();
    let group = group(&pebble, ports, "http-01", &storage);
    let tls_port = ports[1];

    // The self-signed certificate serves until the first arrives, then this one, without a
    // restart.
    let first = wait_for_pebble_certificate(&group, tls_port, Duration::from_secs(30));
    eprintln!(
        "first certificate served {:?} after start",
        started.elapsed()
    );
    // Counted, and stored, just after it is served.
    let counted = wait_until(Duration::from_secs(5), || orders(&group, "issued") == 1.0);
    assert!(counted, "{}", group.log());
    // Under a directory named for the ACME server.
    let dir = storage.join(&pebble.dir_name);
    let files = ["account.json".to_string(), format!("{NAME}.pem")];
    let stored = wait_until(Duration::from_secs(5), || {
        files.iter().all(|f| dir.join(f).exists())
    });
    assert!(stored, "nothing stored in {}", dir.display());
    use std::os::unix::fs::PermissionsExt;
    for file in &files {
        let mode = fs::metadata(dir.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file} is private");
    }
    // localhost keeps the configured certificate.
    let (issuer, _) = presented(tls_port, "localhost");
    assert!(!from_pebble(&issuer), "localhost got {issuer}");

    // The challenge path answers over plain HTTP, before the redirect to HTTPS; what is not
    // an ACME token gets a JSON 404.
    let response = group
        .client
        .get(group.http_url("/.well-known/acme-challenge/not.a.token"))
        .send()
        .expect("request");
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().expect("JSON error");
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    assert!(body["request_id"].is_string());

    // Renewed within about 20 s of issue, while clients make new connections all along.
    let clients = vec![handshaking_client(tls_port), handshaking_client(tls_port)];
    let load = Load::get_with(clients, &format!("https://{NAME}:{tls_port}/api/ping"));
    let mut serial = first.clone();
    let renewed = wait_until(Duration::from_secs(40), || {
        let (issuer, s) = presented(tls_port, NAME);
        if from_pebble(&issuer) {
            serial = s;
        }
        serial != first
    });
    thread::sleep(Duration::from_millis(500));
    load.finish_without_failures();
    assert!(renewed, "not renewed:\n{}", group.log());
    assert!(orders(&group, "issued") >= 2.0);
    assert_eq!(orders(&group, "failed"), 0.0, "{}", group.log());
    let expiry = group
        .metric(&format!(
            "gatehouse_acme_certificate_expiry_timestamp_seconds{{name=\"{NAME}\"}}"
        ))
        .expect("expiry series");
    let now = unix_now();
    assert!(expiry > now, "the served certificate has expired");
}

#[test]
fn tls_alpn_01_issues_a_certificate_kept_across_a_restart_and_when_the_ca_fails() {
    let files = tempfile::tempdir().expect("temp dir");
    let ports = free_ports();
    let Some(mut pebble) = Pebble::start(files.path(), ports[0], ports[1], Duration::from_secs(45))
    else {
        return;
    };
    let storage = files.path().join("acme");
    let mut group = group(&pebble, ports, "tls-alpn-01", &storage);
    let tls_port = ports[1];
    let first = wait_for_pebble_certificate(&group, tls_port, Duration::from_secs(30));
    let counted = wait_until(Duration::from_secs(5), || orders(&group, "issued") == 1.0);
    assert!(counted, "{}", group.log());

    // A client offering only acme-tls/1 when no order is in progress gets no handshake.
    let alpn = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{tls_port}")])
        .args(["-servername", NAME, "-alpn", "acme-tls/1"])
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    assert!(
        !String::from_utf8_lossy(&alpn.stdout).contains("BEGIN CERTIFICATE"),
        "a certificate was presented to an acme-tls/1 handshake with no order waiting"
    );

    // A restart serves the stored certificate from the start, due for renewal when it was.
    assert!(group.restart().success());
    let (issuer, serial) = presented(tls_port, NAME);
    assert!(from_pebble(&issuer) && serial == first, "{issuer} {serial}");
    let series = |name: &str| group.metric(&format!("{name}{{name=\"{NAME}\"}}"));
    assert!(series("gatehouse_acme_certificate_expiry_timestamp_seconds").is_some());
    let next = series("gatehouse_acme_next_order_timestamp_seconds").expect("next order");
    let now = unix_now();
    assert!(next > now + 5.0, "ordered again at once after a restart");
    thread::sleep(Duration::from_secs(2));
    assert_eq!(orders(&group, "issued"), 0.0);

    // The CA goes away; the renewal (15 s before expiry) fails, is counted, and the
    // certificate serves on meanwhile.
    pebble.stop();
    let failed = wait_until(Duration::from_secs(45), || orders(&group, "failed") >= 1.0);
    assert!(failed, "no failed order counted:\n{}", group.log());
    assert_eq!(
        group.metric(&format!(
            "gatehouse_acme_last_order_success{{name=\"{NAME}\"}}"
        )),
        Some(0.0)
    );
    let (issuer, serial) = presented(tls_port, NAME);
    assert!(from_pebble(&issuer) && serial == first, "{issuer} {serial}");
    assert!(group.log().contains("certificate order failed"));
    let client = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .resolve(NAME, ([127, 0, 0, 1], tls_port).into())
        .build()
        .expect("client");
    let ping = client
        .get(format!("https://{NAME}:{tls_port}/api/ping"))
        .send()
        .expect("HTTPS while the CA is down");
    assert_eq!(ping.status(), 200);
}

#[test]
fn three_groups_sharing_one_redis_make_one_order() {
    let files = tempfile::tempdir().expect("temp dir");
    let redis = util::Redis::start(&files.path().join("redis"));
    let ports: Vec<[u16; 3]> = (0..3).map(|_| free_ports()).collect();
    // The CA checks one group's HTTP port, whichever group orders: the others answer
    // through Redis.
    let Some(pebble) = Pebble::start(
        files.path(),
        ports[0][0],
        ports[0][1],
        Duration::from_secs(3600),
    ) else {
        return;
    };
    let pebble = Arc::new(pebble);
    let start = |i: usize| {
        let (pebble, url, ports) = (pebble.clone(), redis.url(), ports[i]);
        // Storage of its own: only Redis is shared.
        let storage = files.path().join(format!("acme-{i}"));
        thread::spawn(move || group_on(&pebble, ports, "http-01", &storage, Some(url)))
    };
    // The one the CA checks first (a check that finds no listener fails the order), then
    // the other two at once, while its order may still be running.
    let first = start(0).join().expect("first group");
    let others = [start(1), start(2)].map(|t| t.join().expect("group started"));
    let groups: Vec<Group> = std::iter::once(first).chain(others).collect();

    let serials: Vec<String> = groups
        .iter()
        .zip(&ports)
        .map(|(group, ports)| wait_for_pebble_certificate(group, ports[1], Duration::from_secs(60)))
        .collect();
    assert!(
        serials.iter().all(|s| *s == serials[0]),
        "one certificate for all: {serials:?}"
    );
    let issued: f64 = groups.iter().map(|g| orders(g, "issued")).sum();
    let failed: f64 = groups.iter().map(|g| orders(g, "failed")).sum();
    assert_eq!((issued, failed), (1.0, 0.0), "one order in all");
    let adopted = groups
        .iter()
        .filter(|g| g.log().contains("certificate another replica ordered"))
        .count();
    assert_eq!(adopted, 2);

    // One account for all: any group answers any token, with the account's thumbprint, so
    // the CA's check may reach any of them. Nothing else gets an answer.
    let answers: Vec<String> = groups
        .iter()
        .map(|group| {
            let response = group
                .client
                .get(group.http_url("/.well-known/acme-challenge/tok-en_1"))
                .send()
                .expect("request");
            assert_eq!(response.status(), 200);
            response.text().expect("body")
        })
        .collect();
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    let thumbprint = answers[0]
        .strip_prefix("tok-en_1.")
        .expect("token.thumbprint");
    assert_eq!(
        thumbprint.len(),
        43,
        "a SHA-256 thumbprint, base64url: {thumbprint}"
    );
    for token in ["tok.en", &"a".repeat(129)] {
        let url = groups[1].http_url(&format!("/.well-known/acme-challenge/{token}"));
        let status = groups[1].client.get(url).send().expect("request").status();
        assert_eq!(status, 404, "{token}");
    }
    let account = format!("gatehouse:acme:{}:account", pebble.dir_name);
    assert_ne!(
        redis.command(&["EXISTS", &account]),
        "0",
        "the account is shared"
    );
}

#[test]
fn a_failed_validation_is_logged_with_the_reason_and_counted() {
    let files = tempfile::tempdir().expect("temp dir");
    let ports = free_ports();
    // The CA checks a port where nothing listens.
    let [nothing] = free_ports();
    let Some(pebble) = Pebble::start(files.path(), nothing, ports[1], Duration::from_secs(3600))
    else {
        return;
    };
    let group = group(&pebble, ports, "http-01", &files.path().join("acme"));
    let failed = wait_until(Duration::from_secs(30), || orders(&group, "failed") == 1.0);
    assert!(failed, "no failed order counted:\n{}", group.log());
    let log = group.log();
    let line = log
        .lines()
        .find(|l| l.contains("certificate order failed"))
        .expect("the failure logged");
    // pebble's own words for the failed check, and when the next attempt is.
    assert!(line.contains("connection refused"), "{line}");
    assert!(line.contains("retry_in_seconds"), "{line}");
    assert!(line.contains("120"), "{line}");
    assert_eq!(
        group.metric(&format!(
            "gatehouse_acme_last_order_success{{name=\"{NAME}\"}}"
        )),
        Some(0.0)
    );
    // HTTPS serves on, with the configured certificate.
    let (issuer, _) = presented(ports[1], NAME);
    assert!(!issuer.is_empty() && !from_pebble(&issuer), "{issuer}");

    // A restart keeps to the backoff rather than ordering again at once (a crash loop would
    // run into the CA's rate limits).
    let mut group = group;
    assert!(group.restart().success());
    let now = unix_now();
    let next = group
        .metric(&format!(
            "gatehouse_acme_next_order_timestamp_seconds{{name=\"{NAME}\"}}"
        ))
        .expect("next order");
    assert!(
        next > now + 60.0,
        "ordered again {}s after a restart",
        next - now
    );
    thread::sleep(Duration::from_secs(2));
    assert_eq!(orders(&group, "failed"), 0.0);
}

#[test]
fn replicas_wait_out_one_backoff_together() {
    let files = tempfile::tempdir().expect("temp dir");
    let redis = util::Redis::start(&files.path().join("redis"));
    let ports: Vec<[u16; 3]> = (0..2).map(|_| free_ports()).collect();
    // Every check fails: the CA checks a port where nothing listens.
    let [nothing] = free_ports();
    let Some(pebble) = Pebble::start(
        files.path(),
        nothing,
        ports[0][1],
        Duration::from_secs(3600),
    ) else {
        return;
    };
    let groups: Vec<Group> = ports
        .iter()
        .enumerate()
        .map(|(i, &ports)| {
            let storage = files.path().join(format!("acme-{i}"));
            group_on(&pebble, ports, "http-01", &storage, Some(redis.url()))
        })
        .collect();
    let failed = |groups: &[Group]| -> f64 { groups.iter().map(|g| orders(g, "failed")).sum() };
    assert!(
        wait_until(Duration::from_secs(30), || failed(&groups) >= 1.0),
        "no failed order:\n{}",
        groups[0].log()
    );
    // The other replica does not try the name again while the first's backoff runs.
    thread::sleep(Duration::from_secs(8));
    assert_eq!(failed(&groups), 1.0, "one failed validation in all");
    let prefix = format!("gatehouse:acme:{}:", pebble.dir_name);
    assert_eq!(
        redis.command(&["GET", &format!("{prefix}failures:{NAME}")]),
        "1"
    );
    let held: i64 = redis
        .command(&["PTTL", &format!("{prefix}lock:{NAME}")])
        .parse()
        .expect("a lifetime");
    assert!(
        held > 60_000,
        "the lock is held for the backoff: {held} ms left"
    );
}
