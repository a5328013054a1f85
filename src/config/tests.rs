//! The loader's tests: each section's checks, the environment overlay, the moved keys, and
//! that the shipped reference file shows every default.

use std::{path::Path, time::Duration};

use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str(text, Path::new("conf/g.toml"), &|_| None)
}

const ROUTES: &str = "\n[[routes]]\nprefix = \"/api/\"\nupstream = \"backends\"\n";

#[test]
fn admin_listener_may_not_share_a_public_port() {
    let error = parse(&format!("[admin]\nlisten = \"127.0.0.1:8443\"\n{ROUTES}")).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("admin.listen"));
    assert_eq!(error.line, Some(2));
    let config = parse(&format!("[admin]\nlisten = \"off\"\n{ROUTES}")).unwrap();
    assert!(config.proxy.admin_listen.is_none());
    let error = parse(&format!("[logging]\nformat = \"xml\"\n{ROUTES}")).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("logging.format"));
}

#[test]
fn defaults_are_sane_and_relative_to_the_files_directory() {
    let config = parse(ROUTES).unwrap();
    assert_eq!(config.backend.count, 3);
    assert_eq!(config.proxy.listen.port(), 8080);
    assert!(config.redis.url.is_none());
    let conf = std::env::current_dir().unwrap().join("conf");
    assert_eq!(
        config.backend_socket(0),
        conf.join("var/run/backend-1.sock")
    );
    assert_eq!(config.data_dir, conf.join("var/data"));
    let tls = config.proxy.tls.as_ref().unwrap();
    assert_eq!(tls.cert, conf.join("certs/gatehouse.crt"));
    assert_eq!(tls.key, conf.join("certs/gatehouse.key"));
    assert_eq!(config.proxy.limits.send_timeout, Duration::from_secs(30));
    assert_eq!(config.proxy.pool.connect_timeout, Duration::from_secs(1));
    assert_eq!(config.redis.timeout, Duration::from_secs(1));
}

#[test]
fn durations_take_units_and_refuse_bare_numbers() {
    let config = parse(&format!(
        "[limits]\nsend_timeout = \"1500ms\"\nheader_timeout = \"2m\"\n\
         [backend]\ntoken_ttl = \"1h 30m\"\n{ROUTES}"
    ))
    .unwrap();
    assert_eq!(
        config.proxy.limits.send_timeout,
        Duration::from_millis(1500)
    );
    assert_eq!(config.proxy.limits.header_timeout, Duration::from_secs(120));
    assert_eq!(config.backend.token_ttl_seconds, 5400);
    let err = parse(&format!("[limits]\nsend_timeout = 30\n{ROUTES}")).unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(2), Some("limits.send_timeout")),
        "{err}"
    );
    let err = parse(&format!("[limits]\nsend_timeout = \"30\"\n{ROUTES}")).unwrap_err();
    assert!(err.message.contains("with a unit"), "{err}");
    let err = parse(&format!("[limits]\nsend_timeout = \"20m\"\n{ROUTES}")).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("limits.send_timeout"), "{err}");
    assert!(err.message.contains("choose \"100ms\" to \"10m\""), "{err}");
}

#[test]
fn durations_kept_in_seconds_refuse_a_fraction() {
    for (section, key) in [
        ("proxy", "shutdown_grace"),
        ("backend", "token_ttl"),
        ("backend", "login_failure_window"),
        ("backend", "login_known_address_ttl"),
    ] {
        let err = parse(&format!("[{section}]\n{key} = \"1500ms\"\n{ROUTES}")).unwrap_err();
        assert_eq!(
            (err.line, err.key.clone()),
            (Some(2), Some(format!("{section}.{key}"))),
            "{err}"
        );
        assert!(
            err.message
                .contains("whole seconds; write \"1s\" or \"2s\""),
            "{err}"
        );
    }
    let config = parse(&format!(
        "[proxy]\nshutdown_grace = \"1m\"\n[backend]\nlogin_known_address_ttl = \"2s\"\n{ROUTES}"
    ))
    .unwrap();
    assert_eq!(config.proxy.shutdown_grace, Duration::from_secs(60));
    assert_eq!(config.backend.login_guard.known_address_seconds, 2);
}

#[test]
fn a_reload_names_each_key_it_cannot_apply() {
    let fixed = |text: &str| gatehouse_proxy::live::Fixed::of(&parse(text).unwrap().proxy);
    let running = fixed(ROUTES);
    let edited = fixed(&format!(
        "[upstream]\nread_timeout = \"6s\"\nconnect_timeout = \"2s\"\n\
         [proxy]\nshutdown_grace = \"20s\"\n[redis]\ntimeout = \"3s\"\n\
         [logging]\nformat = \"json\"\n{ROUTES}"
    ));
    assert_eq!(
        running.changed(&edited),
        [
            "proxy.shutdown_grace",
            "upstream.connect_timeout",
            "upstream.read_timeout",
            "redis.timeout",
            "logging.format"
        ]
    );
    // What a reload applies is not named.
    let edited = fixed(&format!(
        "[limits]\nmax_body_bytes = 10\n[access]\nauth_max_failures = 3\n{ROUTES}"
    ));
    assert_eq!(running.changed(&edited), Vec::<&str>::new());
}

#[test]
fn off_has_one_spelling() {
    let config = parse(&format!(
        "[tls]\nlisten = \"off\"\n[admin]\nlisten = \"off\"\n[logging]\naccess_log = \"off\"\n\
         [access]\ndefault_rate_limit = \"off\"\n{ROUTES}"
    ))
    .unwrap();
    assert!(config.proxy.tls.is_none() && config.proxy.tls_behaviour.redirect.is_none());
    assert!(config.proxy.admin_listen.is_none());
    assert!(config.proxy.default_access_log.is_none());
    assert!(config.proxy.routes[0].access.rate_limit.is_none());
    let config = parse(&format!("[tls]\nhsts = \"off\"\n{ROUTES}")).unwrap();
    assert!(config.proxy.tls_behaviour.hsts.is_none());
    for (text, key) in [
        ("[admin]\nlisten = \"\"", "admin.listen"),
        ("[logging]\naccess_log = \"\"", "logging.access_log"),
        (
            "[access]\ndefault_rate_limit = \"none\"",
            "access.default_rate_limit",
        ),
        ("[tls]\nhsts = \"\"", "tls.hsts"),
    ] {
        let err = parse(&format!("{text}\n{ROUTES}")).unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (Some(2), Some(key)),
            "{err}"
        );
        assert!(err.message.contains("write \"off\""), "{err}");
    }
    let err = parse(&format!("[redis]\nurl = \"\"\n{ROUTES}")).unwrap_err();
    assert!(err.message.contains("\"managed\""), "{err}");
}

#[test]
fn moved_keys_name_their_new_key_and_value() {
    let err = parse(&format!(
        "[proxy]\nlisten = \"0.0.0.0:1\"\n\nsend_timeout_ms = 30000\n{ROUTES}"
    ))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "conf/g.toml:4: proxy.send_timeout_ms: moved: use limits.send_timeout = \"30s\""
    );
    let err = parse(&format!("[tls]\nenabled = false\n{ROUTES}")).unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(2), Some("tls.enabled"))
    );
    assert!(err.message.contains("tls.listen = \"off\""), "{err}");
    let err = parse(&format!("[static]\ncheck_interval_ms = 0\n{ROUTES}")).unwrap_err();
    assert!(
        err.message.ends_with("static.check_interval = \"0s\""),
        "{err}"
    );
}

#[test]
fn unknown_key_names_line_and_key() {
    let err = parse(&format!(
        "[proxy]\nlisten = \"0.0.0.0:1\"\nlisen = 3\n{ROUTES}"
    ))
    .unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert_eq!(err.key.as_deref(), Some("proxy.lisen"), "{err}");
    assert!(
        err.to_string()
            .starts_with("conf/g.toml:3: proxy.lisen: unknown field"),
        "{err}"
    );
}

#[test]
fn wrong_type_names_line_and_key() {
    let err = parse(&format!("[backend]\n\ncount = \"three\"\n{ROUTES}")).unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(3), Some("backend.count")),
        "{err}"
    );
}

#[test]
fn semantic_errors_name_line_and_key() {
    let err = parse(&format!("[proxy]\nlisten = \"nowhere\"\n{ROUTES}")).unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(2), Some("proxy.listen")),
        "{err}"
    );
    let err = parse(&format!(
        "{ROUTES}\n[[routes]]\nprefix = \"/b/\"\nupstream = \"elsewhere\"\n"
    ))
    .unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(8), Some("routes[1].upstream")),
        "{err}"
    );
}

#[test]
fn access_keys_are_checked() {
    use gatehouse_proxy::access::client_ip::ClientIpHeader;
    let config = parse(ROUTES).unwrap();
    let guard = config.proxy.access.auth_guard;
    assert_eq!((guard.max_failures, guard.max_failures_per_user), (10, 100));
    assert_eq!(guard.max_keys, 100_000);
    assert_eq!(guard.window, Duration::from_secs(60));
    assert_eq!(
        config.proxy.access.client_ip_header,
        ClientIpHeader::XForwardedFor
    );
    let config = parse(&format!(
        "[access]\nclient_ip_header = \"X-Real-IP\"\n{ROUTES}"
    ))
    .unwrap();
    assert_eq!(
        config.proxy.access.client_ip_header,
        ClientIpHeader::XRealIp
    );
    for (text, key) in [
        (
            "client_ip_header = \"forwarded\"",
            "access.client_ip_header",
        ),
        (
            "auth_max_failures = 20\nauth_max_failures_per_user = 19",
            "access.auth_max_failures_per_user",
        ),
        ("auth_guard_max_keys = 10", "access.auth_guard_max_keys"),
        ("auth_failure_window = \"0s\"", "access.auth_failure_window"),
        (
            "auth_failure_window = \"2days\"",
            "access.auth_failure_window",
        ),
    ] {
        let err = parse(&format!("[access]\n{text}\n{ROUTES}")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some(key), "{err}");
        assert_eq!(err.line, Some(text.lines().count() + 1), "{err}");
    }
}

#[test]
fn login_guard_keys_are_checked() {
    let config = parse(ROUTES).unwrap();
    let guard = config.backend.login_guard;
    assert_eq!(guard.max_failures_per_user_per_ip, 5);
    assert_eq!(guard.max_failures_per_ip, 20);
    assert_eq!(guard.max_failures_per_user_all_ips, 100);
    assert_eq!(guard.window_seconds, 300);
    assert_eq!(guard.known_address_seconds, 30 * 86_400);
    let err = parse(&format!(
        "[backend]\nlogin_max_failures_per_ip = 0\n{ROUTES}"
    ))
    .unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(2), Some("backend.login_max_failures_per_ip")),
        "{err}"
    );
    let err = parse(&format!(
        "[backend]\ncount = 2\nlogin_failure_window = \"100000s\"\n{ROUTES}"
    ))
    .unwrap_err();
    assert_eq!(err.line, Some(3), "{err}");
    assert!(
        err.to_string().contains("choose \"1s\" to \"1day\""),
        "{err}"
    );
    // The old per-name key meant one count from every address: a file that sets it is told
    // the new names rather than keeping a lockout weapon under a new meaning.
    let err = parse(&format!(
        "[backend]\ncount = 2\nlogin_max_failures_per_user = 5\n{ROUTES}"
    ))
    .unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(3), Some("backend.login_max_failures_per_user")),
        "{err}"
    );
    assert!(
        err.message.contains("renamed")
            && err
                .message
                .contains("backend.login_max_failures_per_user_per_ip"),
        "{err}"
    );
    let err = parse(&format!(
        "[backend]\nlogin_max_failures_per_user_per_ip = 10\n\
         login_max_failures_per_user_all_ips = 9\n{ROUTES}"
    ))
    .unwrap_err();
    assert_eq!(
        err.key.as_deref(),
        Some("backend.login_max_failures_per_user_all_ips"),
        "{err}"
    );
}

#[test]
fn backend_connection_keys_are_checked() {
    let limits = parse(ROUTES).unwrap().backend.connections;
    assert_eq!(limits.header_timeout, Duration::from_secs(10));
    assert_eq!(limits.idle_timeout, Duration::from_secs(75));
    assert_eq!(limits.max_connections, 1024);
    assert_eq!(limits.body_timeout, Duration::from_secs(10));
    for (line, key) in [
        ("header_timeout = \"50ms\"", "backend.header_timeout"),
        ("body_timeout = \"50ms\"", "backend.body_timeout"),
        ("idle_timeout = \"0s\"", "backend.idle_timeout"),
        ("max_connections = 0", "backend.max_connections"),
    ] {
        let err = parse(&format!("[backend]\ncount = 2\n{line}\n{ROUTES}")).unwrap_err();
        assert_eq!(
            (err.line, err.key.as_deref()),
            (Some(3), Some(key)),
            "{err}"
        );
        assert!(err.message.contains("choose"), "{err}");
    }
}

#[test]
fn backend_connections_outlast_and_outnumber_the_proxys() {
    // At or below the proxy's pool idle time (and its margin), a pooled connection could be
    // closed by the backend as the proxy sends a request on it.
    let err = parse(&format!("[backend]\nidle_timeout = \"65s\"\n{ROUTES}")).unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(2), Some("backend.idle_timeout"))
    );
    assert!(err.message.contains("60 s"), "{err}");
    assert!(parse(&format!("[backend]\nidle_timeout = \"66s\"\n{ROUTES}")).is_ok());
    // The proxy's requests in flight (512 by default), its idle pool and health checks.
    let err = parse(&format!("[backend]\nmax_connections = 600\n{ROUTES}")).unwrap_err();
    assert_eq!(
        (err.line, err.key.as_deref()),
        (Some(2), Some("backend.max_connections"))
    );
    assert!(
        err.message.contains("at least 648")
            && err.message.contains("upstream.max_connections (512)"),
        "{err}"
    );
    let small = "[upstream]\nmax_connections = 4\n[backend]\n";
    assert!(parse(&format!("{small}max_connections = 140\n{ROUTES}")).is_ok());
    assert!(parse(&format!("{small}max_connections = 139\n{ROUTES}")).is_err());
}

#[test]
fn environment_overrides_are_named_as_such() {
    let env = |name: &str| match name {
        ENV_LISTEN => Some("127.0.0.1:9999".to_string()),
        ENV_JWT_SECRET => Some("too short".to_string()),
        _ => None,
    };
    // Loading names the secret without reading it (the proxy loads the config too); reading
    // it is where a short one is refused.
    let config = Config::from_str(ROUTES, Path::new("g.toml"), &env).unwrap();
    let err = config.backend.jwt_secret(&env).unwrap_err();
    assert!(err.to_string().contains(ENV_JWT_SECRET), "{err}");
    assert_eq!(config.proxy.listen.port(), 9999);
    // A bad value from the environment is the variable's, not the file's.
    for (name, value) in [
        (ENV_LISTEN, "nowhere"),
        (ENV_ADMIN_LISTEN, "127.0.0.1:8080"),
        (ENV_LOG_FORMAT, "xml"),
        (ENV_REDIS_URL, "http://x"),
        (ENV_TLS_LISTEN, "none"),
    ] {
        let env = |n: &str| (n == name).then(|| value.to_string());
        let err = Config::from_str(ROUTES, Path::new("g.toml"), &env).unwrap_err();
        assert_eq!(err.origin, format!("environment variable {name}"), "{err}");
        assert_eq!((err.line, err.key), (None, None));
    }
    let env = |n: &str| (n == ENV_ADMIN_LISTEN).then(|| "off".to_string());
    let config = Config::from_str(ROUTES, Path::new("g.toml"), &env).unwrap();
    assert!(config.proxy.admin_listen.is_none());
}

#[test]
fn an_error_found_after_loading_names_the_variable_that_set_the_key() {
    let env = |n: &str| (n == ENV_ADMIN_LISTEN).then(|| "off".to_string());
    let config = Config::from_str(ROUTES, Path::new("g.toml"), &env).unwrap();
    let err = config.error_at("admin.listen", "the admin listener is off".into());
    assert_eq!(
        err.to_string(),
        format!("environment variable {ENV_ADMIN_LISTEN}: the admin listener is off")
    );
    let err = config.error_at("proxy.listen", "taken".into());
    assert_eq!(err.origin, "g.toml", "{err}");
    assert_eq!(err.key.as_deref(), Some("proxy.listen"), "{err}");
}

#[test]
fn an_empty_variable_is_refused_not_read_as_unset() {
    for (name, hint) in [
        (
            ENV_ADMIN_LISTEN,
            "write \"off\" to turn it off, or unset it",
        ),
        (ENV_TLS_LISTEN, "write \"off\" to turn it off, or unset it"),
        (ENV_LISTEN, "set but empty: unset it"),
        (ENV_JWT_SECRET, "set but empty: unset it"),
        (ENV_JWT_SECRET_FILE, "set but empty: unset it"),
    ] {
        let env = |n: &str| (n == name).then(String::new);
        let err = Config::from_str(ROUTES, Path::new("g.toml"), &env).unwrap_err();
        assert_eq!(err.origin, format!("environment variable {name}"), "{err}");
        assert!(err.message.contains(hint), "{err}");
    }
}

#[test]
fn loading_never_reads_a_secret() {
    // Files that do not exist: loading the config (all the proxy does) succeeds, so it cannot
    // have read them; reading them names the file, line and key.
    let text = format!(
        "{ROUTES}\n[backend]\njwt_secret_file = \"no/such/jwt\"\n\
         admin_password_file = \"no/such/password\"\nmax_tokens_per_user = 3\n"
    );
    let config = Config::from_str(&text, Path::new("g.toml"), &|_| None).unwrap();
    assert_eq!(config.backend.max_tokens_per_user, 3);
    let err = config.backend.jwt_secret(&|_| None).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("backend.jwt_secret_file"), "{err}");
    assert!(
        err.line.is_some() && err.message.contains("no/such/jwt"),
        "{err}"
    );
    let err = config.backend.admin_password(&|_| None).unwrap_err();
    assert_eq!(
        err.key.as_deref(),
        Some("backend.admin_password_file"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("admin_password");
    std::fs::write(&password, "short\n").unwrap();
    let env =
        |name: &str| (name == ENV_ADMIN_PASSWORD_FILE).then(|| password.display().to_string());
    let config = Config::from_str(ROUTES, Path::new("g.toml"), &env).unwrap();
    let err = config.backend.admin_password(&env).unwrap_err();
    assert!(err.to_string().contains(ENV_ADMIN_PASSWORD_FILE), "{err}");
    assert!(err.message.contains("5 characters"), "{err}");
    std::fs::write(&password, "long enough\n").unwrap();
    assert_eq!(
        config.backend.admin_password(&env).unwrap().as_deref(),
        Some("long enough")
    );

    let text = format!("{ROUTES}\n[backend]\nmax_tokens_per_user = 0\n");
    let err = Config::from_str(&text, Path::new("g.toml"), &|_| None).unwrap_err();
    assert_eq!(
        err.key.as_deref(),
        Some("backend.max_tokens_per_user"),
        "{err}"
    );
}

/// The marker on a line of conf/gatehouse.toml whose value is not the default.
const SHIPPED_OVERRIDE: &str = "# shipped override";

/// conf/gatehouse.toml is the reference: each key there shows its real default unless its
/// line says it is a shipped override, and every key with a default is there.
#[test]
fn the_reference_file_shows_every_default() {
    let text = include_str!("../../conf/gatehouse.toml");
    let doc = Document::parse(text);
    let lines: Vec<&str> = text.lines().collect();
    let file: toml::Table = text.parse().unwrap();
    let defaults = toml::Table::try_from(raw::RawConfig::default()).unwrap();
    // The value as the loader reads it: a file of that one key, read and written back.
    let read = |section: &str, key: &str, value: &toml::Value| {
        let mut inner = toml::Table::new();
        inner.insert(key.to_string(), value.clone());
        let mut one = toml::Table::new();
        one.insert(section.to_string(), inner.into());
        let raw: raw::RawConfig = one
            .try_into()
            .unwrap_or_else(|e| panic!("{section}.{key}: {e}"));
        toml::Table::try_from(raw).unwrap()[section][key].clone()
    };
    let mut checked = 0;
    for (section, table) in &file {
        // The route table is the deployment's own; so are its rate limit policies, but for
        // the built-in one.
        if section == "routes" {
            continue;
        }
        for (key, value) in table.as_table().unwrap() {
            if section == "rate_limits" && key != "default" {
                continue;
            }
            let path = format!("{section}.{key}");
            let line = doc.line_of_key(&path).unwrap();
            let marked = lines[line - 1].contains(SHIPPED_OVERRIDE);
            let default = defaults[section.as_str()].get(key);
            let same = default == Some(&read(section, key, value));
            assert!(
                same != marked,
                "conf/gatehouse.toml:{line}: {path} = {value}: {}",
                match (default, marked) {
                    (None, _) => "not a key with a default".to_string(),
                    (Some(d), false) => format!(
                        "the default is {d}; show it, or mark the line \"{SHIPPED_OVERRIDE}\""
                    ),
                    (Some(_), true) => format!("the default, but marked \"{SHIPPED_OVERRIDE}\""),
                }
            );
            checked += 1;
        }
    }
    for (section, table) in &defaults {
        let Some(table) = table.as_table() else {
            continue;
        };
        for key in table.keys() {
            let listed = file
                .get(section)
                .and_then(|t| t.as_table())
                .is_some_and(|t| t.contains_key(key));
            assert!(listed, "conf/gatehouse.toml does not show {section}.{key}");
        }
    }
    assert!(checked > 50, "{checked} keys checked");
}

#[test]
fn the_redis_password_is_read_from_its_file_or_the_error_names_it() {
    let url = "redis://redis:6379";
    let text =
        format!("{ROUTES}\n[redis]\nurl = \"{url}\"\npassword_file = \"no/such/password\"\n");
    // Loading names the file without reading it; a client reading it gets file, line and key.
    let config = parse(&text).unwrap();
    let err = config.redis.client_url(Path::new("r.sock")).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("redis.password_file"), "{err}");
    assert_eq!(err.line, Some(8), "{err}");
    assert!(err.message.contains("no/such/password"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("redis_password");
    std::fs::write(&file, "p@ss\n").unwrap();
    let text = format!(
        "{ROUTES}\n[redis]\nurl = \"{url}\"\npassword_file = {:?}\n",
        file.display().to_string()
    );
    let config = parse(&text).unwrap();
    assert_eq!(
        config.redis.client_url(Path::new("r.sock")).unwrap(),
        "redis://:p%40ss@redis:6379"
    );

    // The managed Redis has no password: the key is refused with it.
    let text = format!("{ROUTES}\n[redis]\npassword_file = \"x\"\n");
    let err = parse(&text).unwrap_err();
    assert_eq!(err.key.as_deref(), Some("redis.password_file"), "{err}");
    // A password in the URL and a file: one place only.
    let text =
        format!("{ROUTES}\n[redis]\nurl = \"redis://:pw@redis:6379\"\npassword_file = \"x\"\n");
    assert!(parse(&text).is_err());
}

#[test]
fn a_prefix_rewrite_is_checked_where_it_is_written() {
    let route = |keys: &str| format!("[[routes]]\nprefix = \"/flask/\"\n{keys}\n");
    let config = parse(&route("upstream = \"backends\"\nrewrite_prefix = \"/\"")).unwrap();
    let rewrite = config.proxy.routes[0].rewrite.as_ref().unwrap();
    assert_eq!(rewrite.forwarded_prefix().unwrap(), "/flask");
    for (keys, says) in [
        (
            "upstream = \"backends\"\nrewrite_prefix = \"/api\"",
            "must end with `/`",
        ),
        (
            "upstream = \"backends\"\nrewrite_prefix = \"api/\"",
            "must start with `/`",
        ),
        (
            "upstream = \"backends\"\nrewrite_prefix = \"/a b/\"",
            "may hold only",
        ),
        (
            "static_dir = \".\"\nrewrite_prefix = \"/\"",
            "only routes to an upstream",
        ),
    ] {
        let error = parse(&route(keys)).unwrap_err();
        assert_eq!(
            error.key.as_deref(),
            Some("routes[0].rewrite_prefix"),
            "{keys}"
        );
        assert_eq!(error.line, Some(4), "{keys}");
        assert!(error.message.contains(says), "{keys}: {}", error.message);
    }
}

#[test]
fn named_pools_are_checked_where_they_are_written() {
    let pool = |keys: &str| {
        format!("[upstreams.app]\n{keys}\n[[routes]]\nprefix = \"/app/\"\nupstream = \"app\"\n")
    };
    let config = parse(&pool(
        "servers = [\"127.0.0.1:9000\", \"[::1]:9001\", \"App.Internal:80\", \"unix:app.sock\"]\n\
         balance = \"header_hash\"\nhash_header = \"x-user\"\nhealth_check = \"/up\"",
    ))
    .unwrap();
    let app = &config.proxy.upstreams[0];
    assert_eq!(app.servers.len(), 4);
    assert_eq!(
        app.servers[2],
        gatehouse_proxy::UpstreamServer::Tcp {
            host: "app.internal".into(),
            port: 80
        }
    );
    assert_eq!(app.health.as_ref().unwrap().path, "/up");
    assert_eq!(app.read_timeout, Duration::from_secs(30), "[upstream]'s");
    assert!(matches!(
        config.proxy.routes[0].target,
        gatehouse_proxy::Target::Pool(ref name) if name == "app"
    ));
    for (keys, key, says) in [
        ("servers = []", "upstreams.app.servers", "1 to 256"),
        (
            "servers = [\"nohost\"]",
            "upstreams.app.servers[0]",
            "host:port",
        ),
        (
            "servers = [\"a.example:0\"]",
            "upstreams.app.servers[0]",
            "host:port",
        ),
        (
            "servers = [\"a b:80\"]",
            "upstreams.app.servers[0]",
            "host:port",
        ),
        (
            "servers = [\"a:1\", \"a:1\"]",
            "upstreams.app.servers",
            "twice",
        ),
        (
            "servers = [\"a:1\"]\nbalance = \"random\"",
            "upstreams.app.balance",
            "choose",
        ),
        (
            "servers = [\"a:1\"]\nbalance = \"header_hash\"",
            "upstreams.app.balance",
            "hash_header",
        ),
        (
            "servers = [\"a:1\"]\nhash_header = \"x\"",
            "upstreams.app.hash_header",
            "only",
        ),
        (
            "servers = [\"a:1\"]\nsni = \"a\"",
            "upstreams.app.tls",
            "tls = true",
        ),
        (
            "servers = [\"unix:a.sock\"]\ntls = true",
            "upstreams.app.sni",
            "Unix",
        ),
        (
            "servers = [\"a:1\", \"b:1\"]\ntls = true",
            "upstreams.app.sni",
            "different names",
        ),
        (
            "servers = [\"a:1\"]\ntls = true\nca_file = \"missing.pem\"",
            "upstreams.app.ca_file",
            "missing.pem",
        ),
        (
            "servers = [\"a:1\"]\nhealth_check = \"up\"",
            "upstreams.app.health_check",
            "starting with `/`",
        ),
        (
            "servers = [\"a:1\"]\nresolve_interval = \"10ms\"",
            "upstreams.app.resolve_interval",
            "choose",
        ),
    ] {
        let error = parse(&pool(keys)).unwrap_err();
        assert_eq!(error.key.as_deref(), Some(key), "{keys}: {error}");
        assert!(error.line.is_some(), "{keys}: {error}");
        assert!(error.message.contains(says), "{keys}: {}", error.message);
    }
    let error = parse("[upstreams.backends]\nservers = [\"a:1\"]\n[[routes]]\nprefix = \"/\"\nupstream = \"backends\"\n").unwrap_err();
    assert!(error.message.contains("gatehouse's own"), "{error}");
    let error =
        parse(&format!("{ROUTES}upstream = \"nope\"\n").replace("upstream = \"backends\"\n", ""))
            .unwrap_err();
    assert_eq!(error.key.as_deref(), Some("routes[0].upstream"));
    assert!(error.message.contains("nope"), "{error}");
}

#[test]
fn route_hosts_are_checked_where_they_are_written() {
    let route = |hosts: &str| {
        format!(
            "[[routes]]\nprefix = \"/\"\nhosts = {hosts}\nupstream = \"backends\"\n\
             [[routes]]\nprefix = \"/\"\nupstream = \"backends\"\n"
        )
    };
    let config = parse(&route("[\"Shop.Example\", \"*.shop.example\"]")).unwrap();
    assert_eq!(
        config.proxy.routes[0].hosts,
        ["shop.example", "*.shop.example"]
    );
    for hosts in [
        "[\"a b\"]",
        "[\"*\"]",
        "[\"x.*.example\"]",
        "[\"shop.example:443\"]",
    ] {
        let error = parse(&route(hosts)).unwrap_err();
        assert_eq!(
            error.key.as_deref(),
            Some("routes[0].hosts[0]"),
            "{hosts}: {error}"
        );
        assert_eq!(error.line, Some(3), "{hosts}");
    }
    // One prefix once per site.
    let twice = "[[routes]]\nprefix = \"/\"\nhosts = [\"a.example\"]\nupstream = \"backends\"\n\
                 [[routes]]\nprefix = \"/\"\nhosts = [\"b.example\", \"a.example\"]\nupstream = \"backends\"\n";
    let error = parse(twice).unwrap_err();
    assert_eq!(error.key.as_deref(), Some("routes[1].prefix"));
    assert!(error.message.contains("same host"), "{error}");
}

#[test]
fn sites_have_their_own_redirect_and_hsts_for_hosts_routes_name() {
    let routes = "[[routes]]\nprefix = \"/\"\nhosts = [\"shop.test\", \"*.blog.test\"]\n\
                  static_dir = \".\"\n";
    let config = parse(&format!(
        "{ROUTES}{routes}[[tls.sites]]\nhosts = [\"SHOP.test.\"]\nredirect_http = false\n\
         [[tls.sites]]\nhosts = [\"*.blog.test\"]\nhsts = \"max-age=60\"\n"
    ))
    .unwrap();
    let tls = &config.proxy.tls_behaviour;
    assert!(tls.redirect(Some("shop.test")).is_none());
    assert_eq!(tls.hsts(Some("shop.test")), Some("max-age=31536000"));
    assert!(tls.redirect(Some("*.blog.test")).is_some());
    assert_eq!(tls.hsts(Some("*.blog.test")), Some("max-age=60"));
    assert!(tls.redirect(None).is_some());
    assert_eq!(tls.hsts(None), Some("max-age=31536000"));

    for (site, key, message) in [
        (
            "hosts = [\"other.test\"]",
            "tls.sites[0].hosts[0]",
            "no route names",
        ),
        ("hosts = []", "tls.sites[0].hosts", "names no host"),
        (
            "hosts = [\"shop.test\", \"shop.test\"]",
            "tls.sites[0].hosts[1]",
            "twice",
        ),
        (
            "hosts = [\"shop.test\"]\nhsts = \"\"",
            "tls.sites[0].hsts",
            "write \"off\"",
        ),
        (
            "hosts = [\"shop.test\"]\nhsts = \"a\\u0001\"",
            "tls.sites[0].hsts",
            "header value",
        ),
    ] {
        let err = parse(&format!("{ROUTES}{routes}[[tls.sites]]\n{site}\n")).unwrap_err();
        assert_eq!(err.key.as_deref(), Some(key), "{err}");
        assert!(err.line.is_some() && err.message.contains(message), "{err}");
    }
}

#[test]
fn redirect_routes_go_to_a_path_of_the_same_site() {
    let config = parse(&format!(
        "{ROUTES}[[routes]]\nprefix = \"/docs/\"\nredirect = \"/api/docs/\"\n"
    ))
    .unwrap();
    assert!(matches!(
        config.proxy.routes[1].target,
        gatehouse_proxy::Target::Redirect(_)
    ));
    for (keys, key, message) in [
        (
            "redirect = \"https://elsewhere.example/\"",
            "redirect",
            "must start with `/`",
        ),
        ("redirect = \"/manual\"", "redirect", "must end with `/`"),
        ("redirect = \"/a//b/\"", "redirect", "empty or dot segment"),
        (
            "redirect = \"/docs/v2/\"",
            "redirect",
            "leads to the redirect route \"/docs/\"",
        ),
        (
            "redirect = \"/\"",
            "redirect",
            "no route of this site takes it",
        ),
        (
            "redirect = \"/m/\"\nupstream = \"backends\"",
            "prefix",
            "exactly one of",
        ),
        (
            "redirect = \"/m/\"\ncache_control = \"no-cache\"",
            "cache_control",
            "takes no",
        ),
        (
            "redirect = \"/m/\"\nrewrite_prefix = \"/n/\"",
            "rewrite_prefix",
            "takes no",
        ),
        (
            "redirect = \"/m/\"\nrequest_headers = { set = { \"X-A\" = \"b\" } }",
            "request_headers",
            "send no request on",
        ),
    ] {
        let err = parse(&format!(
            "{ROUTES}[[routes]]\nprefix = \"/docs/\"\n{keys}\n"
        ))
        .unwrap_err();
        assert_eq!(
            err.key.as_deref(),
            Some(&*format!("routes[1].{key}")),
            "{err}"
        );
        assert!(err.message.contains(message), "{err}");
        assert!(err.line.is_some_and(|line| line >= 5), "{err}");
    }
}

#[test]
fn acme_orders_the_server_names_and_route_hosts_and_checks_its_keys() {
    let hosts = "\n[[routes]]\nprefix = \"/\"\nhosts = [\"shop.test\", \"*.shop.test\"]\nupstream = \"backends\"\n";
    let text = format!(
        "[tls]\nserver_names = [\"www.test.\", \"Shop.test\", \"localhost\", \"192.0.2.1\"]\n\
         [acme]\ncontact = [\"ops@example.com\"]\n{ROUTES}{hosts}"
    );
    let config = parse(&text).unwrap();
    let acme = config.proxy.acme.as_ref().unwrap();
    assert_eq!(
        acme.names,
        ["www.test", "shop.test"],
        "no wildcard, no repeat"
    );
    assert_eq!(
        acme.directory,
        "https://acme-v02.api.letsencrypt.org/directory"
    );
    assert_eq!(acme.contact, ["mailto:ops@example.com"]);
    assert_eq!(acme.challenge, gatehouse_proxy::acme::ChallengeKind::Http01);
    assert_eq!(acme.renew_before, Duration::from_secs(30 * 24 * 3600));
    let conf = std::env::current_dir().unwrap().join("conf");
    assert_eq!(acme.storage, conf.join("var/data/acme"));

    for (keys, key, says) in [
        ("challenge = \"dns-01\"", "acme.challenge", "choose"),
        (
            "directory = \"http://ca.test/dir\"",
            "acme.directory",
            "https://",
        ),
        ("contact = [\"nobody\"]", "acme.contact[0]", "email"),
        (
            "trust = \"no/such/root.pem\"",
            "acme.trust",
            "no/such/root.pem",
        ),
        ("renew_before = \"10m\"", "acme.renew_before", "choose"),
    ] {
        let text = format!("[tls]\nserver_names = [\"www.test\"]\n[acme]\n{keys}\n{ROUTES}");
        let error = parse(&text).unwrap_err();
        assert_eq!(
            (error.key.as_deref(), error.line),
            (Some(key), Some(4)),
            "{error}"
        );
        assert!(error.message.contains(says), "{error}");
    }
    // Nowhere to keep the certificates: a file in the way (root may write anywhere else).
    let text = format!(
        "[tls]\nserver_names = [\"www.test\"]\n[acme]\nstorage = \"Cargo.toml/acme\"\n{ROUTES}"
    );
    let error = Config::from_str(&text, Path::new("g.toml"), &|_| None).unwrap_err();
    assert_eq!(
        (error.key.as_deref(), error.line),
        (Some("acme.storage"), Some(4))
    );
    assert!(error.message.contains("is not a directory"), "{error}");

    // Nothing to order, or nowhere to serve it.
    let error = parse(&format!("[acme]\n{ROUTES}")).unwrap_err();
    assert_eq!((error.key.as_deref(), error.line), (Some("acme"), Some(1)));
    assert!(error.message.contains("no name"), "{error}");
    let text = format!("[tls]\nlisten = \"off\"\nserver_names = [\"www.test\"]\n[acme]\n{ROUTES}");
    let error = parse(&text).unwrap_err();
    assert!(error.message.contains("tls.listen"), "{error}");
}

#[test]
fn client_certificates_are_checked_where_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().unwrap();
    let bundle = dir.path().join("ca.pem");
    std::fs::write(&bundle, ca.self_signed(&key).unwrap().pem()).unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let large = dir.path().join("large.pem");
    std::fs::write(&large, vec![b'#'; (1 << 20) + 1]).unwrap();
    let tls = |keys: &str| format!("[tls]\nclient_ca = {bundle:?}\n{keys}\n{ROUTES}");
    let required =
        "[[routes]]\nprefix = \"/svc/\"\nupstream = \"backends\"\nclient_cert = \"required\"\n";

    let config = parse(&format!(
        "{}{required}",
        tls(
            "client_certs = \"optional\"\n[[tls.client_users]]\nuser = \"svc.billing\"\n\
             uri = \"spiffe://example.org/billing\"\n"
        )
    ))
    .unwrap();
    let auth = config
        .proxy
        .tls
        .as_ref()
        .unwrap()
        .client_auth
        .as_ref()
        .unwrap();
    assert!(!auth.required);
    assert_eq!(auth.ca.len(), 1);
    assert!(config.proxy.routes.iter().any(|r| r.requires_client_cert));
    assert!(!config.proxy.tls_behaviour.client_users.is_empty());
    let config = parse(&tls("")).unwrap();
    assert!(
        config.proxy.tls.unwrap().client_auth.unwrap().required,
        "the default"
    );

    let user = |keys: &str| tls(&format!("[[tls.client_users]]\n{keys}\n"));
    for (text, key, says) in [
        (
            format!("{ROUTES}{required}"),
            "routes[1].client_cert",
            "tls.client_ca",
        ),
        (
            format!("[tls]\nclient_certs = \"optional\"\n{ROUTES}"),
            "tls.client_certs",
            "tls.client_ca",
        ),
        (
            format!("[[tls.client_users]]\nuser = \"a\"\ncn = \"a\"\n{ROUTES}"),
            "tls.client_users",
            "tls.client_ca",
        ),
        (
            format!("[tls]\nclient_ca = {empty:?}\n{ROUTES}"),
            "tls.client_ca",
            "no PEM certificate",
        ),
        (
            format!("[tls]\nclient_ca = {large:?}\n{ROUTES}"),
            "tls.client_ca",
            "over 1048576 bytes",
        ),
        (
            format!("[tls]\nclient_ca = \"missing.pem\"\n{ROUTES}"),
            "tls.client_ca",
            "missing.pem",
        ),
        (
            format!("[tls]\nlisten = \"off\"\nclient_ca = {bundle:?}\n{ROUTES}"),
            "tls.client_ca",
            "tls.listen is off",
        ),
        (tls("client_certs = \"on\""), "tls.client_certs", "choose"),
        (
            ROUTES.replace("backends\"", "backends\"\nclient_cert = \"yes\""),
            "routes[0].client_cert",
            "choose",
        ),
        (
            user("user = \"-x\"\ncn = \"a\""),
            "tls.client_users[0].user",
            "user name",
        ),
        (user("user = \"a\""), "tls.client_users[0]", "exactly one"),
        (
            user("user = \"a\"\ncn = \"a\"\ndns = \"a\""),
            "tls.client_users[0]",
            "exactly one",
        ),
        (
            user("user = \"a\"\ncn = \"\""),
            "tls.client_users[0].cn",
            "empty",
        ),
        (
            user("user = \"a\"\nfingerprint = \"AB:CD\""),
            "tls.client_users[0].fingerprint",
            "64 hex digits",
        ),
        (
            user(
                "user = \"a\"\ndns = \"A.example\"\n[[tls.client_users]]\nuser = \"b\"\ndns = \"a.EXAMPLE\"",
            ),
            "tls.client_users[1].dns",
            "twice",
        ),
        (
            format!(
                "{}[acme]\nchallenge = \"tls-alpn-01\"\nstorage = {:?}\n",
                tls("server_names = [\"www.example.com\"]"),
                dir.path()
            ),
            "tls.client_certs",
            "TLS-ALPN-01",
        ),
    ] {
        let err = parse(&text).unwrap_err();
        assert_eq!(err.key.as_deref(), Some(key), "{text}\n{err}");
        assert!(err.line.is_some(), "{err}");
        assert!(err.message.contains(says), "{err}");
    }
    // The listener's part waits for a restart; the mappings are reloaded.
    let fixed = |text: &str| gatehouse_proxy::live::Fixed::of(&parse(text).unwrap().proxy);
    let running = fixed(&tls(""));
    assert_eq!(
        running.changed(&fixed(&tls("client_certs = \"optional\""))),
        ["tls.client_certs"]
    );
    assert_eq!(
        running.changed(&fixed(ROUTES)),
        ["tls.client_ca", "tls.client_certs"]
    );
    assert_eq!(
        running.changed(&fixed(&user("user = \"a\"\ncn = \"a\""))),
        Vec::<&str>::new()
    );
}
