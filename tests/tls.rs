//! HTTPS: ALPN, TLS versions, the HTTP->HTTPS redirect, HSTS, and certificates.

use std::{fs, path::Path, process::Command};

use crate::util::{BIN, Group, Options, raw_http};

#[test]
fn https_speaks_http1_and_http2_with_hsts() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    for (http1_only, version) in [
        (true, reqwest::Version::HTTP_11),
        (false, reqwest::Version::HTTP_2),
    ] {
        let client = group.http_client(http1_only);
        let response = client.get(group.url("/api/ping")).send().unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), version);
        assert_eq!(
            response.headers()["strict-transport-security"],
            "max-age=31536000"
        );
        let page = client.get(group.url("/")).send().unwrap();
        assert_eq!(page.status(), 200);
        assert_eq!(page.version(), version);
        assert!(page.headers().contains_key("strict-transport-security"));
    }
}

#[test]
fn plain_http_redirects_to_https_keeping_path_and_query() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    let tls_port = group.tls_port.unwrap();
    let client = group.http_client(false);
    for (method, status) in [("GET", 301), ("HEAD", 301), ("POST", 308), ("DELETE", 308)] {
        let response = client
            .request(
                method.parse().unwrap(),
                group.http_url("/open/page.html?a=1&b=two"),
            )
            .send()
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{method}");
        assert_eq!(
            response.headers()["location"],
            format!("https://127.0.0.1:{tls_port}/open/page.html?a=1&b=two").as_str(),
            "{method}"
        );
        assert!(
            !response.headers().contains_key("strict-transport-security"),
            "no HSTS over HTTP"
        );
    }
    // A valid Host is kept; the proxy's own health check is answered, not redirected.
    let response = client
        .get(group.http_url("/x"))
        .header("host", "edge.example:8080")
        .send()
        .unwrap();
    assert_eq!(
        response.headers()["location"],
        format!("https://edge.example:{tls_port}/x").as_str()
    );
    assert_eq!(
        client
            .get(group.http_url("/healthz"))
            .send()
            .unwrap()
            .status(),
        200
    );

    // A garbage Host never becomes part of a redirect.
    for host in ["evil.com/steal", "evil.com@other", "a b", "x:notaport"] {
        let response = raw_http(
            group.port,
            &format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        );
        assert!(response.starts_with("HTTP/1.1 400"), "{host}: {response}");
        assert!(
            !response.to_ascii_lowercase().contains("location:"),
            "{host}: {response}"
        );
    }
}

#[test]
fn only_tls_1_2_and_1_3_with_aead_ciphers() {
    let group = Group::start(Options {
        backends: 1,
        ..Options::default()
    });
    let connect = |args: &[&str]| {
        let output = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", group.tls_port.unwrap()),
            ])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert!(connect(&["-tls1_3"]).contains("TLSv1.3"));
    assert!(connect(&["-tls1_2"]).contains("TLSv1.2"));
    // Older protocols and CBC suites are refused: no session is established.
    for args in [
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"][..],
        &["-tls1_2", "-cipher", "AES128-SHA"][..],
    ] {
        let out = connect(args);
        assert!(
            out.contains("Cipher is (NONE)") || !out.contains("Cipher is"),
            "{args:?}: {out}"
        );
    }
}

/// A config with TLS on, in a fresh directory, for the certificate checks.
fn tls_config(dir: &Path) -> std::path::PathBuf {
    let users = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/users");
    let path = dir.join("gatehouse.toml");
    fs::write(
        &path,
        format!(
            "[tls]\ncert = \"certs/site.crt\"\nkey = \"certs/site.key\"\nserver_names = [\"edge.example\"]\n\n\
             [backend]\nusers_file = \"{}\"\n\n[[routes]]\nprefix = \"/api/\"\nupstream = \"backends\"\n",
            users.display()
        ),
    )
    .unwrap();
    path
}

fn gatehouse(args: &[&str], config: &Path) -> (i32, String) {
    let output = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn certificates_are_generated_checked_and_bad_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = tls_config(dir.path());
    let (code, out) = gatehouse(&["check"], &config);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("certificate to be generated"), "{out}");

    let (code, out) = gatehouse(&["cert"], &config);
    assert_eq!(code, 0, "{out}");
    let (cert, key) = (
        dir.path().join("certs/site.crt"),
        dir.path().join("certs/site.key"),
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600,
        "the key is private"
    );
    let (code, _) = gatehouse(&["cert"], &config);
    assert_eq!(
        code, 1,
        "an existing pair is not overwritten without --force"
    );

    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(&cert)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    for name in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:0:0:0:0:0:0:0:1",
        "DNS:edge.example",
    ] {
        assert!(text.contains(name), "{name} missing:\n{text}");
    }
    assert!(
        text.contains("prime256v1") || text.contains("P-256"),
        "ECDSA P-256:\n{text}"
    );
    let enddate = Command::new("openssl")
        .args(["x509", "-noout", "-checkend"])
        .arg((366 * 86400).to_string())
        .arg("-in")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(!enddate.status.success(), "valid for at most 366 days");
    let (code, out) = gatehouse(&["check"], &config);
    assert_eq!(code, 0, "{out}");

    // A key that belongs to another certificate.
    let other = tempfile::tempdir().unwrap();
    let other_config = tls_config(other.path());
    assert_eq!(gatehouse(&["cert"], &other_config).0, 0);
    fs::copy(other.path().join("certs/site.key"), &key).unwrap();
    for command in ["check", "run"] {
        let (code, out) = gatehouse(&[command], &config);
        assert_eq!(code, 2, "{command}: {out}");
        assert!(out.contains("site.key does not match"), "{command}: {out}");
    }

    // One file missing: named, never regenerated over the other.
    fs::remove_file(&cert).unwrap();
    for command in ["check", "run"] {
        let (code, out) = gatehouse(&[command], &config);
        assert_eq!(code, 2, "{command}: {out}");
        assert!(out.contains("site.crt"), "{command}: {out}");
    }
    // Garbage in the certificate file.
    fs::write(&cert, "not a certificate").unwrap();
    let (code, out) = gatehouse(&["check"], &config);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("site.crt"), "{out}");
}
