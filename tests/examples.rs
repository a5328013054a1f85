//! The example configs of `conf/examples/`, run as shipped (in a copy of the repository's
//! layout, on ports of their own) and walked through with `curl`, as their users would.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use crate::util::{BIN, PASSWORD, SECRET, USER, free_ports, signal, wait_until};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create dir");
    for entry in fs::read_dir(from).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            copy_dir(&path, &to.join(entry.file_name()));
        } else {
            fs::copy(&path, to.join(entry.file_name())).expect("copy");
        }
    }
}

/// `curl ARGS`: its status code line (`-w`) and body, or both when asked for with `-i`.
fn curl(args: &[&str]) -> String {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl");
    assert!(output.status.success(), "curl {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn seed_001_serves_the_api_under_flask_with_the_seeds_own_walkthrough() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    fs::create_dir_all(root.join("conf/examples")).expect("conf dir");
    let config = root.join("conf/examples/seed-001.toml");
    fs::copy(repo().join("conf/examples/seed-001.toml"), &config).expect("copy the example");
    for file in ["users", "htpasswd"] {
        fs::copy(repo().join("conf").join(file), root.join("conf").join(file)).expect("copy");
    }
    copy_dir(&repo().join("static"), &root.join("static"));

    let [http, https] = free_ports();
    let log = fs::File::create(root.join("gatehouse.log")).expect("log file");
    let mut group = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env("GATEHOUSE_JWT_SECRET", SECRET)
        .env("GATEHOUSE_LISTEN", format!("127.0.0.1:{http}"))
        .env("GATEHOUSE_TLS_LISTEN", format!("127.0.0.1:{https}"))
        .env("GATEHOUSE_ADMIN_LISTEN", "off")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("start the group");
    let base = format!("https://127.0.0.1:{https}");
    let ping = format!("{base}/flask/api/ping");
    let up = wait_until(Duration::from_secs(30), || {
        Command::new("curl")
            .args(["-sk", "--max-time", "2", &ping])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("\"ok\""))
    });
    let walk = || {
        assert!(
            up,
            "the group did not serve {ping}: {}",
            fs::read_to_string(root.join("gatehouse.log")).unwrap_or_default()
        );
        // Plain HTTP goes to HTTPS, path and query kept.
        let redirect = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
            &format!("http://127.0.0.1:{http}/flask/api/ping?x=1"),
        ]);
        assert_eq!(
            redirect,
            format!("301 https://127.0.0.1:{https}/flask/api/ping?x=1")
        );
        assert_eq!(curl(&["-k", &ping]), r#"{"status":"ok"}"#);

        // The walkthrough: sign in, count visits, be refused without the token.
        let login = curl(&[
            "-k",
            "-X",
            "POST",
            &format!("{base}/flask/auth/login"),
            "-H",
            "Content-Type: application/json",
            "-d",
            &format!(r#"{{"username":"{USER}","password":"{PASSWORD}"}}"#),
        ]);
        let login: serde_json::Value = serde_json::from_str(&login).expect("a JSON login answer");
        let token = login["token"].as_str().expect("a token").to_owned();
        let bearer = format!("Authorization: Bearer {token}");
        for visit in 1..=3 {
            let count = curl(&["-k", &format!("{base}/flask/api/count"), "-H", &bearer]);
            assert_eq!(count, format!(r#"{{"visits":{visit}}}"#));
        }
        let refused = curl(&["-ki", &format!("{base}/flask/api/count")]);
        assert!(refused.starts_with("HTTP/2 401"), "{refused}");
        assert!(refused.contains(r#""error":"invalid_token""#), "{refused}");
        // Only under /flask/: the API's own paths are the landing site's, which has no such file.
        let bare = curl(&[
            "-k",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{base}/api/ping"),
        ]);
        assert_eq!(bare, "404");

        // The document names the prefix; Swagger UI beside it loads it through the prefix.
        let document = curl(&["-k", &format!("{base}/flask/api/openapi.json")]);
        let document: serde_json::Value = serde_json::from_str(&document).expect("the document");
        assert_eq!(document["servers"], serde_json::json!([{"url": "/flask"}]));
        let swagger = curl(&["-k", &format!("{base}/flask/swagger/")]);
        assert!(swagger.contains("swagger-initializer.js"), "{swagger}");

        // The sites, and the landing page framing them.
        let status = |args: &[&str]| {
            let mut all = vec!["-k", "-o", "/dev/null", "-w", "%{http_code}"];
            all.extend_from_slice(args);
            curl(&all)
        };
        assert_eq!(status(&[&format!("{base}/open/")]), "200");
        assert_eq!(status(&[&format!("{base}/close/")]), "401");
        assert_eq!(
            status(&["-u", "admin:homework", &format!("{base}/close/")]),
            "200"
        );
        let landing = curl(&["-k", &format!("{base}/")]);
        assert!(landing.contains(r#"<iframe src="/open/""#), "{landing}");
        assert!(landing.contains(r#"<iframe src="/close/""#), "{landing}");
        // Every link of the landing page leads somewhere, the API's through a redirect.
        let links: Vec<&str> = landing
            .split("href=\"/")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .collect();
        assert!(links.contains(&"swagger/") && links.contains(&"api/openapi.json"));
        for link in links {
            let url = format!("{base}/{link}");
            let followed = status(&["-L", "-u", "admin:homework", &url]);
            assert_eq!(followed, "200", "{url}");
        }
        let moved = curl(&["-ksI", &format!("{base}/swagger/index.html?x")]);
        assert!(
            moved.starts_with("HTTP/2 301")
                && moved.contains("location: /flask/swagger/index.html?x"),
            "{moved}"
        );
        // Another method keeps its method (308); no target turns it into another host.
        let posted = curl(&["-ksi", "-X", "POST", &format!("{base}/swagger/x")]);
        assert!(posted.starts_with("HTTP/2 308"), "{posted}");
        let sneaky = curl(&[
            "-ksi",
            "--path-as-is",
            &format!("{base}/swagger//evil.example/"),
        ]);
        assert!(
            sneaky.starts_with("HTTP/2 400") && !sneaky.contains("location"),
            "{sneaky}"
        );

        // One access log per site.
        let logs = root.join("var/seed-001/log");
        let logged = |file: &str, needle: &str| {
            wait_until(Duration::from_secs(5), || {
                fs::read_to_string(logs.join(file)).is_ok_and(|text| text.contains(needle))
            })
        };
        assert!(logged("flask.log", "/flask/api/count"), "flask.log");
        assert!(logged("flask.log", "/flask/swagger/"), "flask.log");
        assert!(logged("open.log", "/open/"), "open.log");
        assert!(logged("close.log", "/close/"), "close.log");
        assert!(logged("main.log", "\"path\":\"/\""), "main.log");
    };
    let walked = std::panic::catch_unwind(walk);
    signal(group.id(), libc::SIGTERM);
    let stopped = wait_until(Duration::from_secs(15), || {
        matches!(group.try_wait(), Ok(Some(_)))
    });
    if !stopped {
        let _ = group.kill();
        let _ = group.wait();
    }
    if let Err(panic) = walked {
        std::panic::resume_unwind(panic);
    }
    assert!(stopped, "the group did not stop on SIGTERM");
}
