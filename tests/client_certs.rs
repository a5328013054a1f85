//! Client certificates (mTLS) through a real group: a CA, client certificates, one from
//! another CA and an expired one, all made by `openssl` at test time, presented by `curl
//! --cert` (and by rustls, through reqwest, for the flood). What reaches an upstream is seen
//! through an echo server that answers with the head it received.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    headers::echo_backend,
    operations::edit_config,
    util::{BIN, Group, Options, wait_until},
};

/// The certificates a test presents, each `NAME.pem` with `NAME.key`, under `pki/`.
const CLIENT: &str = "svc";
const OTHER_CA: &str = "stranger";
const EXPIRED: &str = "expired";
/// Signed by the CA, mapped to the seeded user `admin` by its common name.
const ADMIN: &str = "robot";

/// `openssl ARGS` in `dir`, which must succeed.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `openssl req`'s arguments for a new P-256 key, unencrypted.
const NEW_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// A CA (`NAME-ca.pem`, `NAME-ca.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let (pem, key) = (format!("{name}-ca.pem"), format!("{name}-ca.key"));
    let subject = format!("/CN={name} clients CA");
    let rest = [
        "-x509",
        "-keyout",
        &key,
        "-out",
        &pem,
        "-days",
        "2",
        "-subj",
        &subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ];
    openssl(dir, &[&["req"], &NEW_KEY[..], &rest].concat());
}

/// A client certificate `NAME.pem` (key `NAME.key`) signed by `ca`'s CA, valid for `days`
/// (negative: expired), for clientAuth with these subjectAltNames.
fn make_client(dir: &Path, ca: &str, name: &str, subject: &str, sans: &str, days: &str) {
    let (pem, key, csr) = (
        format!("{name}.pem"),
        format!("{name}.key"),
        format!("{name}.csr"),
    );
    let rest = ["-keyout", &key, "-out", &csr, "-subj", subject];
    openssl(dir, &[&["req"], &NEW_KEY[..], &rest].concat());
    let ext = format!("{name}.ext");
    fs::write(
        dir.join(&ext),
        format!("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\nsubjectAltName={sans}\n"),
    )
    .expect("write the extensions");
    let (ca_pem, ca_key) = (format!("{ca}-ca.pem"), format!("{ca}-ca.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            days,
            "-extfile",
            &ext,
        ],
    );
}

/// The CAs and certificates every test uses, in `dir/pki`.
fn make_pki(dir: &Path) -> PathBuf {
    let pki = dir.join("pki");
    fs::create_dir_all(&pki).expect("pki dir");
    make_ca(&pki, "edge");
    make_ca(&pki, "other");
    let sans = "DNS:billing.internal,URI:spiffe://example.org/billing,email:ops@example.com";
    make_client(
        &pki,
        "edge",
        CLIENT,
        "/O=Example, Inc./CN=svc-billing",
        sans,
        "1",
    );
    make_client(&pki, "other", OTHER_CA, "/CN=svc-billing", sans, "1");
    make_client(&pki, "edge", EXPIRED, "/CN=svc-billing", sans, "-1");
    make_client(
        &pki,
        "edge",
        ADMIN,
        "/CN=robot-admin",
        "DNS:robot.internal",
        "1",
    );
    pki
}

/// A group whose HTTPS listener takes client certificates from the `edge` CA
/// (`client_certs` as given), with routes to the echo server: `/echo/` for everyone,
/// `/secure/` for clients with a certificate.
fn start(client_certs: &str) -> (Group, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = make_pki(dir.path());
    let echo = dir.path().join("echo");
    fs::create_dir_all(&echo).expect("echo dir");
    echo_backend(&echo);
    let ca = pki.join("edge-ca.pem");
    let group = Group::start_in(
        dir,
        Options {
            backends: 1,
            keys: format!("tls.client_ca = {ca:?}\ntls.client_certs = {client_certs:?}\n"),
            extra: format!(
                "[upstreams.echo]\nservers = [\"unix:{}\"]\n\n\
                 [[tls.client_users]]\nuser = \"billing\"\nuri = \"spiffe://example.org/billing\"\n\n\
                 [[tls.client_users]]\nuser = \"admin\"\ncn = \"robot-admin\"\n\n\
                 [[routes]]\nprefix = \"/echo/\"\nupstream = \"echo\"\n\n\
                 [[routes]]\nprefix = \"/secure/\"\nupstream = \"echo\"\nclient_cert = \"required\"\n",
                echo.join("echo.sock").display()
            ),
            // For the harness's own requests, which a listener that requires one refuses.
            client_identity: Some(identity(&pki, CLIENT)),
            ..Options::default()
        },
    );
    (group, pki)
}

/// `curl` over HTTPS to `path`, presenting `cert` from `pki` (or none), with extra
/// arguments: the status and body, or curl's complaint when there was no answer.
fn curl(
    group: &Group,
    pki: &Path,
    cert: Option<&str>,
    path: &str,
    args: &[&str],
) -> Result<(u16, String), String> {
    let mut command = Command::new("curl");
    command
        .args([
            "-sS",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(group.dir.path().join("certs/gatehouse.crt"))
        .args(args);
    if let Some(name) = cert {
        command
            .arg("--cert")
            .arg(pki.join(format!("{name}.pem")))
            .arg("--key")
            .arg(pki.join(format!("{name}.key")));
    }
    let output = command.arg(group.url(path)).output().expect("run curl");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').ok_or("no status")?;
    let status = status.parse().map_err(|_| format!("status {status:?}"))?;
    Ok((status, body.to_owned()))
}

/// The values of header `name` in the head the echo server sent back as its body.
fn echoed<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

/// The certificate's SHA-256 as the edge writes it: lower-case hex, no colons.
fn fingerprint(pki: &Path, name: &str) -> String {
    let output = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pki.join(format!("{name}.pem")))
        .output()
        .expect("openssl x509");
    let text = String::from_utf8_lossy(&output.stdout);
    let hex = text.trim().rsplit_once('=').expect("a fingerprint").1;
    hex.replace(':', "").to_ascii_lowercase()
}

/// What a client may send to pass for a certificate it has not got: the edge's headers, and
/// one as CGI and WSGI applications would read as the edge's.
const FORGED: [&str; 10] = [
    "-H",
    "X-Client-Cert-Subject: CN=admin",
    "-H",
    "X-Gatehouse-Cert-User: admin",
    "-H",
    "X-Client-Cert-Fingerprint: 00",
    "-H",
    "x-client-cert-san: DNS:admin.internal",
    "-H",
    "X_Gatehouse_Cert_User: admin",
];

#[test]
fn a_required_listener_refuses_handshakes_without_a_good_certificate() {
    let (group, pki) = start("required");
    let served = curl(&group, &pki, Some(CLIENT), "/echo/up", &[]);
    assert_eq!(served.as_ref().map(|(s, _)| *s), Ok(200), "{served:?}");
    let ping = curl(&group, &pki, Some(CLIENT), "/api/ping", &[]);
    assert_eq!(ping.as_ref().map(|(s, _)| *s), Ok(200), "{ping:?}");
    for (cert, what) in [
        (None, "no certificate"),
        (Some(OTHER_CA), "a certificate from another CA"),
        (Some(EXPIRED), "an expired certificate"),
    ] {
        for http in ["--http1.1", "--http2"] {
            let answer = curl(&group, &pki, cert, "/echo/up", &[http]);
            assert!(
                answer.is_err(),
                "{what} over {http} was answered: {answer:?}"
            );
        }
    }
}

#[test]
fn an_optional_listener_passes_the_certificate_on_and_routes_may_require_one() {
    let (group, pki) = start("optional");
    let print = fingerprint(&pki, CLIENT);
    // GET takes the proxy's fast path, POST Pingora's; HTTP/2 and HTTP/1.1 alike.
    for args in [
        &["--http1.1"][..],
        &["--http2"],
        &["--http1.1", "-d", "x=1"],
        &["--http2", "-d", "x=1"],
    ] {
        let with_forged = |cert, path| {
            let args: Vec<&str> = args.iter().chain(&FORGED).copied().collect();
            curl(&group, &pki, cert, path, &args).unwrap_or_else(|e| panic!("{args:?} {path}: {e}"))
        };
        // Without a certificate: served where none is needed, the forged headers gone.
        let (status, head) = with_forged(None, "/echo/up");
        assert_eq!(status, 200, "{args:?}: {head}");
        for name in [
            "x-client-cert-subject",
            "x-client-cert-san",
            "x-client-cert-fingerprint",
            "x-gatehouse-cert-user",
            "x_gatehouse_cert_user",
        ] {
            assert_eq!(echoed(&head, name), Vec::<&str>::new(), "{args:?}: {head}");
        }
        let (status, body) = with_forged(None, "/secure/up");
        assert_eq!(status, 403, "{args:?}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
        assert_eq!(error["error"], "client_certificate_required", "{body}");
        for field in ["message", "request_id", "correlation_id"] {
            assert!(error[field].is_string(), "{field}: {body}");
        }

        // With one: the edge's headers, once each, in place of the client's.
        for path in ["/echo/up", "/secure/up"] {
            let (status, head) = with_forged(Some(CLIENT), path);
            assert_eq!(status, 200, "{args:?} {path}: {head}");
            assert_eq!(
                echoed(&head, "x-client-cert-subject"),
                [r"CN=svc-billing,O=Example\, Inc."],
                "{head}"
            );
            assert_eq!(
                echoed(&head, "x-client-cert-san"),
                ["DNS:billing.internal, URI:spiffe://example.org/billing, email:ops@example.com"],
                "{head}"
            );
            assert_eq!(echoed(&head, "x-client-cert-fingerprint"), [print.as_str()]);
            assert_eq!(
                echoed(&head, "x-gatehouse-cert-user"),
                ["billing"],
                "{head}"
            );
            assert_eq!(echoed(&head, "x_gatehouse_cert_user"), Vec::<&str>::new());
        }
    }
    // The most specific name mapped wins: robot's common name is; its DNS name is not.
    let (status, head) = curl(&group, &pki, Some(ADMIN), "/echo/up", &[]).expect("served");
    assert_eq!(status, 200, "{head}");
    assert_eq!(echoed(&head, "x-client-cert-subject"), ["CN=robot-admin"]);
    assert_eq!(echoed(&head, "x-client-cert-san"), ["DNS:robot.internal"]);
    assert_eq!(echoed(&head, "x-gatehouse-cert-user"), ["admin"], "{head}");
    // A certificate the CA did not sign, or an expired one, is no way past the handshake
    // even where certificates are optional.
    for cert in [OTHER_CA, EXPIRED] {
        let answer = curl(&group, &pki, Some(cert), "/echo/up", &[]);
        assert!(answer.is_err(), "{cert}: {answer:?}");
    }
}

/// Needs the backend's side of the contract: `X-Gatehouse-Cert-User` taken as the user's
/// sign-in when a request carries no token or key of its own.
#[test]
fn a_service_calls_the_api_with_its_certificate_alone() {
    let (group, pki) = start("optional");
    let (status, body) = curl(&group, &pki, Some(ADMIN), "/api/me", &[]).expect("an answer");
    assert_eq!(status, 200, "{body}");
    let me: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(me["username"], "admin", "{body}");
    // A client without a certificate cannot claim one's user.
    let forged = ["-H", "X-Gatehouse-Cert-User: admin"];
    let (status, body) = curl(&group, &pki, None, "/api/me", &forged).expect("an answer");
    assert_eq!(status, 401, "{body}");
    // Nor can one with a certificate mapped to nobody of the API: `billing` is not a user.
    let (status, body) = curl(&group, &pki, Some(CLIENT), "/api/me", &forged).expect("an answer");
    assert_eq!(status, 401, "{body}");
}

/// Certificate `name` and its key, as reqwest takes them.
fn identity(pki: &Path, name: &str) -> Vec<u8> {
    let mut pem = fs::read(pki.join(format!("{name}.pem"))).expect("certificate");
    pem.extend(fs::read(pki.join(format!("{name}.key"))).expect("key"));
    pem
}

/// A client presenting `cert` (from `pki`), trusting the group's certificate, making a new
/// handshake for every request.
fn client_with(group: &Group, pki: &Path, cert: &str) -> reqwest::blocking::Client {
    let pem = identity(pki, cert);
    let server = fs::read(group.dir.path().join("certs/gatehouse.crt")).expect("certificate");
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&server).expect("PEM"))
        .identity(reqwest::Identity::from_pem(&pem).expect("identity"))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client")
}

#[test]
fn clients_are_served_while_an_attacker_hammers_with_bad_certificates() {
    let (group, pki) = start("optional");
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = [OTHER_CA, EXPIRED, OTHER_CA, EXPIRED]
        .into_iter()
        .map(|cert| {
            let client = client_with(&group, &pki, cert);
            let url = group.url("/secure/up");
            let (stop, refused) = (stop.clone(), refused.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url).send() {
                        Ok(response) => panic!("a bad certificate was answered: {response:?}"),
                        Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let client = client_with(&group, &pki, CLIENT);
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let response = client.get(group.url("/secure/up")).send().expect("served");
        assert_eq!(response.status(), 200);
        let head = response.text().expect("body");
        assert_eq!(echoed(&head, "x-gatehouse-cert-user"), ["billing"]);
        served += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.join().expect("attacker");
    }
    let refused = refused.load(Ordering::Relaxed);
    assert!(served >= 20, "only {served} requests in 4 s");
    assert!(refused >= 100, "only {refused} bad handshakes were tried");
    // Refused handshakes are counted, not logged one by one.
    assert!(
        group
            .metric("gatehouse_connection_cuts_total{reason=\"tls_handshake_error\"}")
            .unwrap_or(0.0)
            >= refused as f64 / 2.0,
        "{}",
        group.admin("/metrics").1
    );
}

/// A reload applies `[[tls.client_users]]` to the next request, and names the listener's
/// keys, which keep their running values until a restart.
#[test]
fn a_reload_maps_certificates_anew_and_names_the_listeners_keys() {
    let (group, pki) = start("optional");
    let user = |cert| {
        let (status, head) = curl(&group, &pki, cert, "/echo/up", &[]).expect("served");
        assert_eq!(status, 200, "{head}");
        echoed(&head, "x-gatehouse-cert-user").join(",")
    };
    assert_eq!(user(Some(CLIENT)), "billing");
    edit_config(&group, "user = \"billing\"", "user = \"billing-2\"");
    edit_config(
        &group,
        "client_certs = \"optional\"",
        "client_certs = \"required\"",
    );
    // Another CA in the bundle: the same path, other contents.
    let bundle = pki.join("edge-ca.pem");
    let mut text = fs::read_to_string(&bundle).expect("bundle");
    text.push_str(&fs::read_to_string(pki.join("other-ca.pem")).expect("other CA"));
    fs::write(&bundle, text).expect("bundle");
    let output = Command::new(BIN)
        .args(["reload", "--config"])
        .arg(group.dir.path().join("gatehouse.toml"))
        .output()
        .expect("gatehouse reload");
    assert!(output.status.success(), "{output:?}");
    assert!(
        wait_until(Duration::from_secs(10), || user(Some(CLIENT))
            == "billing-2"),
        "the new mapping was not applied:\n{}",
        group.log()
    );
    // The running listener's: clients without a certificate still served, the other CA's
    // certificates still refused.
    assert_eq!(user(None), "");
    assert!(curl(&group, &pki, Some(OTHER_CA), "/echo/up", &[]).is_err());
    let log = group.log();
    assert!(
        log.lines()
            .any(|line| line.contains("change only at a restart or upgrade")
                && line.contains("tls.client_ca")
                && line.contains("tls.client_certs")),
        "the reload did not name the listener's keys:\n{log}"
    );
}

/// An HTTP/2 upload refused before its body arrived (here a `403` for want of a certificate):
/// the proxy reads a small body still on its way, so its stream ends cleanly. Reset at once
/// instead (with `NO_ERROR`, as RFC 9113 allows), curl 7.x reported about one such upload in
/// 300 as error 92 in place of the answer. A slow one is waited on for a second only.
#[test]
fn refused_http2_uploads_get_their_answer_and_slow_ones_are_not_waited_on() {
    let (group, pki) = start("optional");
    let refused = |args: &[&str], urls: usize| {
        let mut command = Command::new("curl");
        command
            .args(["-sS", "--max-time", "20", "--http2", "-w", "%{http_code}\n"])
            .args(args)
            .arg("--cacert")
            .arg(group.dir.path().join("certs/gatehouse.crt"));
        for _ in 0..urls {
            command
                .args(["-o", "/dev/null"])
                .arg(group.url("/secure/up"));
        }
        let output = command.output().expect("run curl");
        // A stream reset under an upload is curl's error 92, whatever it printed before.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success() && !stderr.contains("curl: ("),
            "{stderr}"
        );
        let answers = String::from_utf8_lossy(&output.stdout).into_owned();
        (
            answers.lines().filter(|status| *status == "403").count(),
            output,
        )
    };
    // Many at once on one connection, as curl sends them: each gets its 403.
    for _ in 0..5 {
        let (answered, output) = refused(&["--parallel", "--parallel-max", "50", "-d", "x=1"], 300);
        assert_eq!(answered, 300, "{}", String::from_utf8_lossy(&output.stderr));
    }
    // A megabyte at 4 KiB/s: answered, and let go of after the second the proxy waits.
    let big = group.dir.path().join("big");
    fs::write(&big, vec![b'x'; 1 << 20]).expect("write the upload");
    let upload = format!("@{}", big.display());
    let started = Instant::now();
    let (answered, output) = thread::scope(|scope| {
        let slow = scope.spawn(|| refused(&["--limit-rate", "4k", "--data-binary", &upload], 1));
        // Another client, while the proxy waits on the slow body: served.
        thread::sleep(Duration::from_millis(300));
        let (status, head) = curl(&group, &pki, None, "/echo/up", &[]).expect("an answer");
        assert_eq!(status, 200, "{head}");
        slow.join().expect("the slow upload")
    });
    assert_eq!(answered, 1, "{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
}
