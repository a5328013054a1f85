//! Bad configuration stops gatehouse with exit code 2 and a message naming file, line, key.

use std::{fs, path::Path, process::Command};

use crate::util::BIN;

fn shipped_config() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/gatehouse.toml")
}

fn run(args: &[&str], config: &Path, env: &[(&str, &str)]) -> (i32, String) {
    let output = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("GATEHOUSE_JWT_SECRET")
        .envs(env.iter().copied())
        .output()
        .expect("run gatehouse");
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

/// The shipped config with its first line equal to `from` replaced by `to`, written to a temp
/// dir laid out like the repository (conf/, static/).
fn variant(dir: &Path, from: &str, to: &str) -> std::path::PathBuf {
    let text = fs::read_to_string(shipped_config()).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == from)
        .unwrap_or_else(|| panic!("no line {from:?}"));
    lines[at] = to;
    // The shipped layout, so the config's relative paths (../static/...) resolve.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    for site in ["main", "open", "close", "swagger", "admin"] {
        fs::create_dir_all(dir.join("static").join(site)).unwrap();
    }
    fs::create_dir_all(dir.join("conf")).unwrap();
    fs::copy(repo.join("conf/users"), dir.join("conf/users")).unwrap();
    fs::copy(repo.join("conf/htpasswd"), dir.join("conf/htpasswd")).unwrap();
    let path = dir.join("conf/gatehouse.toml");
    fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn line_of(path: &Path, needle: &str) -> usize {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .position(|l| l.contains(needle))
        .unwrap()
        + 1
}

#[test]
fn shipped_config_passes_check() {
    let (code, out) = run(&["check"], &shipped_config(), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok"), "{out}");
}

#[test]
fn bad_configs_name_file_line_and_key_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("threads = 0", "threds = 0", "proxy.threds", "unknown field"),
        (
            "count = 3",
            "count = \"three\"",
            "backend.count",
            "invalid type",
        ),
        (
            "listen = \"0.0.0.0:8080\"",
            "listen = \"0.0.0.0:99999\"",
            "proxy.listen",
            "not an address",
        ),
        (
            "upstream = \"backends\"",
            "upstream = \"elsewhere\"",
            "routes[0].upstream",
            "unknown upstream",
        ),
        (
            "users_file = \"users\"",
            "users_file = \"missing-users\"",
            "",
            "cannot read users file",
        ),
        (
            "allow = [\"127.0.0.1\", \"::1\", \"192.168.1.0/24\", \"10.0.0.5\"]",
            "allow = [\"127.0.0.1\", \"10.0.0.0/33\"]",
            "routes[4].allow[1]",
            "not an IP address or CIDR network",
        ),
        (
            "rate_limit = \"login\"",
            "rate_limit = \"logni\"",
            "routes[2].rate_limit",
            "no [rate_limits.logni] policy",
        ),
        (
            "per_second = 20",
            "per_second = 0",
            "rate_limits.default.per_second",
            "must be above 0",
        ),
        (
            "login_max_failures_per_user_per_ip = 5",
            "login_max_failures_per_user_per_ip = 0",
            "backend.login_max_failures_per_user_per_ip",
            "must be greater than 0",
        ),
        (
            "login_max_failures_per_user_per_ip = 5",
            "login_max_failures_per_user = 5",
            "backend.login_max_failures_per_user",
            "renamed",
        ),
        (
            "idle_timeout = \"75s\"",
            "idle_timeout = \"0s\"",
            "backend.idle_timeout",
            "choose \"1s\" to \"1h\"",
        ),
        (
            "login_failure_window = \"5m\"",
            "login_failure_window = \"5 minutes or so\"",
            "backend.login_failure_window",
            "is not a duration",
        ),
        (
            "send_timeout = \"30s\"",
            "send_timeout = 30",
            "limits.send_timeout",
            "a duration with a unit",
        ),
        (
            "hsts = \"max-age=31536000\"",
            "hsts = \"\"",
            "tls.hsts",
            "write \"off\"",
        ),
        // A key of the earlier shape is told where it went, its value converted.
        (
            "shutdown_grace = \"10s\"",
            "shutdown_grace_seconds = 10",
            "proxy.shutdown_grace_seconds",
            "moved: use proxy.shutdown_grace = \"10s\"",
        ),
        (
            "send_timeout = \"30s\"",
            "send_timeout_ms = 1500",
            "limits.send_timeout_ms",
            "unknown field",
        ),
        (
            "h2_max_streams = 100",
            "enabled = true",
            "limits.enabled",
            "unknown field",
        ),
        (
            "listen = \"0.0.0.0:8443\"",
            "enabled = false",
            "tls.enabled",
            "tls.listen = \"off\" turns HTTPS off",
        ),
        // Header rules and CORS (routes[3] is /open/).
        (
            "cache_control = \"public, max-age=300\"",
            "response_headers = { set = { \"Content-Length\" = \"1\" } }",
            "routes[3].response_headers.set.Content-Length",
            "connection or framing header",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "response_headers = { add = { \"X-Id\" = \"id $nope\" } }",
            "routes[3].response_headers.add.X-Id",
            "unknown variable `$nope`",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "request_headers = { set = { \"X-Env\" = \"prod\" } }",
            "routes[3].request_headers",
            "request_headers are for routes to an upstream",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "cors = { origins = [\"*\"], credentials = true }",
            "routes[3].cors.credentials",
            "browsers refuse \"*\" with credentials",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "cors = { origins = [\"https://a.example/app\"] }",
            "routes[3].cors.origins[0]",
            "is not an origin",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "cors = { origins = [\"https://a.example:443\"] }",
            "routes[3].cors.origins[0]",
            "443 is the https port",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "cors = { origins = [\"https://a.example:\"] }",
            "routes[3].cors.origins[0]",
            "the port is not a number",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "cors = { origins = [\"https://a.example\"], methods = [\"*\"] }",
            "routes[3].cors.methods[0]",
            "\"*\" is not a method",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "cors = { origins = [\"https://a.example\"], expose_headers = [\"*\"], credentials = true }",
            "routes[3].cors.expose_headers",
            "only without credentials",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "cors = { origins = [\"https://a.example\"] }\nresponse_headers = { set = { \"Access-Control-Allow-Credentials\" = \"true\" } }",
            "routes[3].response_headers.set.Access-Control-Allow-Credentials",
            "the route's cors sets the Access-Control-* headers",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "response_headers = { set = { \"X-Env\" = \"prod \" } }",
            "routes[3].response_headers.set.X-Env",
            "starts or ends with white space",
        ),
        // Error pages and the fallback file must be files inside static_dir.
        (
            "cache_control = \"public, max-age=300\"",
            "fallback = \"shell.html\"",
            "routes[3].fallback",
            "No such file or directory",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "fallback = \"../../conf/users\"",
            "routes[3].fallback",
            "is outside static_dir",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "error_pages = { 404 = \"missing.html\" }",
            "routes[3].error_pages.404",
            "No such file or directory",
        ),
        (
            "cache_control = \"public, max-age=300\"",
            "error_pages = { 500 = \"500.html\" }",
            "routes[3].error_pages.500",
            "a route has its own page only for [401, 403, 404, 429]",
        ),
        (
            "access_log = \"../var/log/api.log\"",
            "fallback = \"app.html\"",
            "routes[0].fallback",
            "only static routes take fallback",
        ),
        (
            "upstream = \"backends\"",
            "upstream = \"backends\"\nclient_cert = 'required'",
            "routes[0].client_cert",
            "set tls.client_ca",
        ),
        (
            "client_users = []",
            "client_users = []\nclient_ca = \"missing-ca.pem\"",
            "tls.client_ca",
            "missing-ca.pem: No such file",
        ),
    ];
    for (from, to, key, message) in cases {
        let path = variant(dir.path(), from, to);
        for command in ["check", "run"] {
            let (code, out) = run(&[command], &path, &[]);
            assert_eq!(code, 2, "{command} with {to:?}: {out}");
            assert!(out.contains(message), "{command} with {to:?}: {out}");
            if !key.is_empty() {
                // The key's own line: the last of `to`.
                let line = line_of(&path, to.lines().last().unwrap_or(to));
                let expected = format!("{}:{line}: {key}:", path.display());
                assert!(
                    out.contains(&expected),
                    "{command} with {to:?} should say {expected:?}: {out}"
                );
            }
        }
    }
}

#[test]
fn a_bad_value_from_the_environment_names_the_variable() {
    for (name, value, message) in [
        ("GATEHOUSE_LISTEN", "nowhere", "not an address"),
        ("GATEHOUSE_LOG_FORMAT", "xml", "choose \"text\" or \"json\""),
        // Empty is neither "off" nor unset: refused, saying what to write instead.
        (
            "GATEHOUSE_ADMIN_LISTEN",
            "",
            "set but empty: write \"off\" to turn it off, or unset it",
        ),
        ("GATEHOUSE_JWT_SECRET", "", "set but empty: unset it"),
        (
            "GATEHOUSE_ALLOCATOR",
            "jemalloc",
            "expected \"system\" or \"mimalloc\"",
        ),
    ] {
        let (code, out) = run(&["check"], &shipped_config(), &[(name, value)]);
        assert_eq!(code, 2, "{name}={value:?}: {out}");
        assert!(
            out.contains(&format!("environment variable {name}: ")) && out.contains(message),
            "{name}={value}: {out}"
        );
    }
}

#[test]
fn an_error_after_loading_names_the_variable_that_set_the_key() {
    let (code, out) = run(
        &["healthcheck"],
        &shipped_config(),
        &[("GATEHOUSE_ADMIN_LISTEN", "off")],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("environment variable GATEHOUSE_ADMIN_LISTEN: the admin listener is off"),
        "{out}"
    );
}

#[test]
fn a_bad_htpasswd_line_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = variant(dir.path(), "count = 3", "count = 3");
    fs::write(
        dir.path().join("conf/htpasswd"),
        "# users\r\nadmin:plaintext-password\r\n",
    )
    .unwrap();
    let (code, out) = run(&["check"], &path, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("conf/htpasswd:2:") && out.contains("unsupported hash"),
        "{out}"
    );
}

#[test]
fn short_secret_and_bad_users_line_are_refused() {
    let (code, out) = run(
        &["check"],
        &shipped_config(),
        &[("GATEHOUSE_JWT_SECRET", "short")],
    );
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("GATEHOUSE_JWT_SECRET") && out.contains("at least 32"),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = variant(dir.path(), "count = 3", "count = 3");
    fs::write(
        dir.path().join("conf/users"),
        "# users\nadmin:$apr1$abc$def\n",
    )
    .unwrap();
    let (code, out) = run(&["check"], &path, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("users:2:") && out.contains("argon2id"),
        "{out}"
    );

    // A role the code does not know, on the line that has it.
    let shipped = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/users"));
    let users = shipped.unwrap().replace(":admin\n", ":root\n");
    fs::write(dir.path().join("conf/users"), &users).unwrap();
    let line = users.lines().position(|l| l.ends_with(":root")).unwrap() + 1;
    let (code, out) = run(&["check"], &path, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("users:{line}: role of \"admin\" is \"root\"")),
        "{out}"
    );
}

#[test]
fn a_seed_with_nobody_in_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = variant(dir.path(), "count = 3", "count = 3");
    fs::write(dir.path().join("conf/users"), "# nobody yet\n").unwrap();
    let line = line_of(&path, "users_file =");
    let (code, out) = run(&["check"], &path, &[]);
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(&format!("gatehouse.toml:{line}: backend.users_file: "))
            && out.contains("no users")
            && out.contains("backend.admin_password_file"),
        "{out}"
    );
    // The admin password alone seeds the first admin.
    let password = dir.path().join("admin_password");
    fs::write(&password, "a long enough password\n").unwrap();
    let password = password.display().to_string();
    let (code, out) = run(
        &["check"],
        &path,
        &[("GATEHOUSE_ADMIN_PASSWORD_FILE", password.as_str())],
    );
    assert_eq!(code, 0, "{out}");
}

/// A config that names no paths keeps everything beside itself: `certs/` and `var/run`
/// under its own directory, wherever gatehouse is started from.
#[test]
fn default_paths_are_beside_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let users = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/users");
    let path = dir.path().join("site/gatehouse.toml");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(
        &path,
        format!(
            "[backend]\nusers_file = \"{}\"\n\n[[routes]]\nprefix = \"/api/\"\nupstream = \"backends\"\n",
            users.display()
        ),
    )
    .unwrap();
    let (code, out) = run(&["cert"], &path, &[]);
    assert_eq!(code, 0, "{out}");
    let certs = dir.path().join("site/certs");
    assert!(
        certs.join("gatehouse.crt").is_file() && certs.join("gatehouse.key").is_file(),
        "{out}"
    );
    let (code, out) = run(&["reload"], &path, &[]);
    assert_eq!(code, 1, "{out}");
    let lock = dir.path().join("site/var/run/gatehouse.lock");
    assert!(out.contains(&lock.display().to_string()), "{out}");
}
