//! Named pools (`[upstreams.NAME]`) through `gatehouse proxy`, to servers the test starts: two
//! on TCP ports, one on a Unix socket, one over HTTPS with a CA of its own. Each balance
//! policy's spread or stickiness, health checks taking a server out and back, servers that
//! close their kept-alive connections unannounced or write a `408` on them, the pool and
//! server named in the access log, and a reload that adds, changes and removes pools under
//! load.

use std::{
    collections::BTreeMap,
    io::{BufReader, Read, Write},
    net::{Ipv4Addr, TcpListener},
    os::unix::net::UnixListener,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use crate::{
    operations::Load,
    socket_dir,
    util::{self, read_request, wait_until},
};

/// What a test server shares with the test: whether its health check passes, and how many
/// health checks it had.
struct Server {
    id: &'static str,
    healthy: AtomicBool,
    checks: AtomicUsize,
    /// Closes each connection after one answer, without saying so (`Connection: close`), as
    /// a server whose keep-alive timed out does.
    closes: AtomicBool,
    /// Writes a `408` on each connection 100 ms after an answer, unasked, and closes it, as
    /// some servers do when a kept-alive connection idles too long.
    times_out: AtomicBool,
}

/// Answers requests on `stream` until it closes: `{id} {request line}` (and the SNI it was
/// reached by, over TLS), `503` to `/health` while unhealthy, and `/slow` after 1.5 s.
fn serve<S: Read + Write>(stream: S, server: &Server, sni: &str) {
    let mut reader = BufReader::new(stream);
    while let Some(request) = read_request(&mut reader) {
        let request_line = &request.line;
        let path = request_line.split(' ').nth(1).unwrap_or_default();
        if path == "/health" {
            server.checks.fetch_add(1, Ordering::Relaxed);
        }
        let status = if path == "/health" && !server.healthy.load(Ordering::Relaxed) {
            "503 Service Unavailable"
        } else {
            "200 OK"
        };
        if path.ends_with("/slow") {
            thread::sleep(Duration::from_millis(1500));
        }
        let answer = format!("{} {request_line} {sni}", server.id);
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if reader.get_mut().write_all(response.as_bytes()).is_err()
            || server.closes.load(Ordering::Relaxed)
        {
            return;
        }
        if server.times_out.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(100));
            let timeout =
                "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
            let _ = reader.get_mut().write_all(timeout.as_bytes());
            return;
        }
    }
}

fn tcp_server(id: &'static str) -> (Arc<Server>, u16) {
    let server = Arc::new(Server {
        id,
        healthy: AtomicBool::new(true),
        checks: AtomicUsize::new(0),
        closes: AtomicBool::new(false),
        times_out: AtomicBool::new(false),
    });
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    let shared = server.clone();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let server = shared.clone();
            thread::spawn(move || serve(stream, &server, "-"));
        }
    });
    (server, port)
}

fn unix_server(id: &'static str, path: &Path) -> Arc<Server> {
    let server = Arc::new(Server {
        id,
        healthy: AtomicBool::new(true),
        checks: AtomicUsize::new(0),
        closes: AtomicBool::new(false),
        times_out: AtomicBool::new(false),
    });
    let listener = UnixListener::bind(path).expect("bind");
    let shared = server.clone();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let server = shared.clone();
            thread::spawn(move || serve(stream, &server, "-"));
        }
    });
    server
}

/// An HTTPS server for `localhost` with a certificate from a CA of its own, written to
/// `ca_file`.
fn tls_server(id: &'static str, ca_file: &Path) -> u16 {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
    std::fs::write(ca_file, ca.pem()).expect("write the CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("leaf");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
        )
        .expect("TLS config");
    let config = Arc::new(config);
    let server = Arc::new(Server {
        id,
        healthy: AtomicBool::new(true),
        checks: AtomicUsize::new(0),
        closes: AtomicBool::new(false),
        times_out: AtomicBool::new(false),
    });
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (config, server) = (config.clone(), server.clone());
            thread::spawn(move || {
                let Ok(connection) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = rustls::StreamOwned::new(connection, stream);
                // The handshake, so the SNI is known before the first answer.
                while tls.conn.is_handshaking() {
                    if tls.conn.complete_io(&mut tls.sock).is_err() {
                        return;
                    }
                }
                let sni = tls.conn.server_name().unwrap_or("none").to_owned();
                serve(tls, &server, &sni);
            });
        }
    });
    port
}

/// `GET path` through the proxy from the loopback address `from` (127.0.0.0/8 is all ours),
/// on a new connection; the body of a `200`, or the status.
fn get(port: u16, path: &str, from: Ipv4Addr, user: Option<&str>) -> String {
    let client = reqwest::blocking::Client::builder()
        .local_address(std::net::IpAddr::V4(from))
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let mut request = client.get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(user) = user {
        request = request.header("x-user", user);
    }
    match request.send() {
        Ok(response) if response.status() == 200 => response.text().unwrap_or_default(),
        Ok(response) => response.status().to_string(),
        Err(error) => error.to_string(),
    }
}

/// Which server answered each of `n` requests for `path`, counted by server.
fn spread(port: u16, path: &str, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let body = get(port, path, Ipv4Addr::LOCALHOST, None);
        let id = body.split(' ').next().unwrap_or_default().to_owned();
        *counts.entry(id).or_default() += 1;
    }
    counts
}

#[test]
fn named_pools_balance_check_health_and_speak_tls_to_servers_of_every_kind() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, a_port) = tcp_server("a");
    let (_b, b_port) = tcp_server("b");
    let (_c, c_port) = tcp_server("c");
    let (closer, closer_port) = tcp_server("z");
    closer.closes.store(true, Ordering::Relaxed);
    let (timer, timer_port) = tcp_server("w");
    timer.times_out.store(true, Ordering::Relaxed);
    let unix = dir.path().join("u.sock");
    let _u = unix_server("u", &unix);
    let ca_file = dir.path().join("ca.pem");
    let tls_port = tls_server("t", &ca_file);
    let tcp = |port: u16| format!("\"127.0.0.1:{port}\"");
    let pools = format!(
        "[upstreams.mixed]\nservers = [{a}, {b}, \"unix:{u}\"]\n\
         health_check = \"/health\"\nhealth_check_interval = \"200ms\"\n\
         health_check_rise = 1\nhealth_check_fall = 1\n\
         [upstreams.sticky]\nservers = [{a}, {b}, {c}]\nbalance = \"client_hash\"\n\
         [upstreams.byuser]\nservers = [{a}, {b}, {c}]\nbalance = \"header_hash\"\nhash_header = \"x-user\"\n\
         [upstreams.least]\nservers = [{a}, {b}]\nbalance = \"least_connections\"\n\
         [upstreams.secure]\nservers = [\"localhost:{tls_port}\"]\ntls = true\nca_file = {ca:?}\n\
         [upstreams.closer]\nservers = [{z}]\n\
         [upstreams.timer]\nservers = [{w}]\n\
         [[routes]]\nprefix = \"/timer/\"\nupstream = \"timer\"\n\
         [[routes]]\nprefix = \"/closer/\"\nupstream = \"closer\"\n\
         [[routes]]\nprefix = \"/mixed/\"\nupstream = \"mixed\"\nrewrite_prefix = \"/\"\n\
         [[routes]]\nprefix = \"/sticky/\"\nupstream = \"sticky\"\n\
         [[routes]]\nprefix = \"/byuser/\"\nupstream = \"byuser\"\n\
         [[routes]]\nprefix = \"/least/\"\nupstream = \"least\"\n\
         [[routes]]\nprefix = \"/secure/\"\nupstream = \"secure\"\n",
        a = tcp(a_port),
        b = tcp(b_port),
        c = tcp(c_port),
        z = tcp(closer_port),
        w = tcp(timer_port),
        u = unix.display(),
        ca = ca_file.display().to_string(),
    );
    let (_, port, _) = socket_dir::socket_dir_config_with_routes(
        dir.path(),
        "redis://127.0.0.1:1".into(),
        "",
        pools,
    );
    let _proxy = socket_dir::start_proxy(dir.path(), port, "/mixed/x");

    // Round robin over TCP and Unix servers alike, the prefix removed.
    let counts = spread(port, "/mixed/x", 30);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n >= 8), "{counts:?}");
    let body = get(port, "/mixed/x?q", Ipv4Addr::LOCALHOST, None);
    assert!(body.ends_with(" GET /x?q HTTP/1.1 -"), "{body}");

    // A failing health check takes a server out; a good one brings it back.
    a.healthy.store(false, Ordering::Relaxed);
    thread::sleep(Duration::from_millis(800));
    let counts = spread(port, "/mixed/x", 20);
    assert!(!counts.contains_key("a"), "{counts:?}");
    a.healthy.store(true, Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(5), || spread(port, "/mixed/x", 6)
            .contains_key("a")),
        "a did not come back"
    );

    // client_hash: one client, one server; many clients, several servers.
    let mut seen = BTreeMap::new();
    for last in 1..=12u8 {
        let from = Ipv4Addr::new(127, 0, 0, last);
        let first = get(port, "/sticky/x", from, None);
        for _ in 0..4 {
            let again = get(port, "/sticky/x", from, None);
            assert_eq!(
                again[..1],
                first[..1],
                "client {from} moved: {first} then {again}"
            );
        }
        *seen.entry(first[..1].to_owned()).or_insert(0) += 1;
    }
    assert!(seen.len() >= 2, "every client on one server: {seen:?}");

    // header_hash: one user, one server; requests without the header go round robin.
    let mut users = BTreeMap::new();
    for user in ["ann", "bob", "cy", "dee", "eve", "fay", "gus", "hal"] {
        let first = get(port, "/byuser/x", Ipv4Addr::LOCALHOST, Some(user));
        for _ in 0..4 {
            let again = get(port, "/byuser/x", Ipv4Addr::LOCALHOST, Some(user));
            assert_eq!(again[..1], first[..1], "{user} moved");
        }
        users.insert(user, first[..1].to_owned());
    }
    let servers: std::collections::BTreeSet<_> = users.values().collect();
    assert!(servers.len() >= 2, "{users:?}");
    assert_eq!(spread(port, "/byuser/x", 12).len(), 3);

    // least_connections: while one server holds a slow request, the others take the rest.
    let slow = thread::spawn(move || get(port, "/least/slow", Ipv4Addr::LOCALHOST, None));
    thread::sleep(Duration::from_millis(300));
    let counts = spread(port, "/least/x", 6);
    let busy = slow.join().expect("slow request");
    let busy = &busy[..1];
    assert!(!counts.contains_key(busy), "{busy} was busy: {counts:?}");

    // A server that closes its connections unannounced: the proxy's kept-alive one fails
    // at its next use, and the request is sent again on a new one (GET is safe to repeat).
    for round in 0..10 {
        let body = get(port, "/closer/x", Ipv4Addr::LOCALHOST, None);
        assert!(body.starts_with("z GET /closer/x"), "round {round}: {body}");
    }

    // A server that writes a 408 on its idle connections: that answer is never taken for the
    // next request's.
    for round in 0..4 {
        let body = get(port, "/timer/x", Ipv4Addr::LOCALHOST, None);
        assert!(body.starts_with("w GET /timer/x"), "round {round}: {body}");
        thread::sleep(Duration::from_millis(300));
    }

    // HTTPS to a server whose certificate only the pool's own CA vouches for, by its name.
    let body = get(port, "/secure/x", Ipv4Addr::LOCALHOST, None);
    assert_eq!(body, "t GET /secure/x HTTP/1.1 localhost");

    // The access log names the pool and the server.
    let log = dir.path().join("logs/access.log");
    let named = format!("\"upstream\":\"mixed/127.0.0.1:{a_port}\"");
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .is_ok_and(|text| text.contains(&named)
                && text.contains(&format!(
                    "\"upstream\":\"mixed/unix:{}\"",
                    unix.display()
                )))),
        "{named} not in the access log"
    );
}

/// Changes the config in `dir` as `edit` does to its TOML.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut toml::Table)) {
    let path = dir.join("gatehouse.toml");
    let mut table: toml::Table = std::fs::read_to_string(&path)
        .expect("config")
        .parse()
        .expect("TOML");
    edit(&mut table);
    std::fs::write(&path, toml::to_string(&table).expect("TOML")).expect("write the config");
}

#[test]
fn a_reload_adds_changes_and_removes_pools_without_a_failed_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (a, a_port) = tcp_server("a");
    let (_b, b_port) = tcp_server("b");
    let (_c, c_port) = tcp_server("c");
    let tcp = |port: u16| format!("\"127.0.0.1:{port}\"");
    let pools = format!(
        "[upstreams.app]\nservers = [{a}, {b}]\n\
         [upstreams.checked]\nservers = [{a}]\nhealth_check = \"/health\"\n\
         health_check_interval = \"100ms\"\n\
         [[routes]]\nprefix = \"/app/\"\nupstream = \"app\"\n\
         [[routes]]\nprefix = \"/checked/\"\nupstream = \"checked\"\n",
        a = tcp(a_port),
        b = tcp(b_port),
    );
    let (_, port, _) = socket_dir::socket_dir_config_with_routes(
        dir.path(),
        "redis://127.0.0.1:1".into(),
        "",
        pools,
    );
    let proxy = socket_dir::start_proxy(dir.path(), port, "/app/x");
    assert_eq!(spread(port, "/app/x", 10).len(), 2);
    assert!(wait_until(Duration::from_secs(5), || a
        .checks
        .load(Ordering::Relaxed)
        > 2));

    // A client keeping its connection idle across the reload holds no configuration.
    let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    idle.write_all(b"GET /checked/x HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("send");
    let mut answer = [0u8; 256];
    let n = idle.read(&mut answer).expect("answer");
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));

    // Under load: `app` moves to b and c, `checked` goes with its route, `fresh` comes.
    let load = Load::get(&format!("http://127.0.0.1:{port}/app/x"), 4);
    thread::sleep(Duration::from_millis(300));
    edit_config(dir.path(), |config| {
        let upstreams = config["upstreams"].as_table_mut().expect("upstreams");
        upstreams.remove("checked");
        upstreams["app"]["servers"] = toml::Value::Array(vec![
            format!("127.0.0.1:{b_port}").into(),
            format!("127.0.0.1:{c_port}").into(),
        ]);
        let mut fresh = toml::Table::new();
        fresh.insert(
            "servers".into(),
            toml::Value::Array(vec![format!("127.0.0.1:{a_port}").into()]),
        );
        upstreams.insert("fresh".into(), fresh.into());
        let routes = config["routes"].as_array_mut().expect("routes");
        for route in routes.iter_mut() {
            if route.get("prefix").and_then(toml::Value::as_str) == Some("/checked/") {
                route["prefix"] = "/fresh/".into();
                route["upstream"] = "fresh".into();
            }
        }
    });
    util::signal(proxy.0.id(), libc::SIGHUP);
    let moved = || {
        let counts = spread(port, "/app/x", 6);
        counts.len() == 2 && counts.contains_key("b") && counts.contains_key("c")
    };
    assert!(
        wait_until(Duration::from_secs(10), moved),
        "app did not move to b and c: {:?}\n{}",
        spread(port, "/app/x", 6),
        std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default()
    );
    assert!(get(port, "/fresh/x", Ipv4Addr::LOCALHOST, None).starts_with("a GET /fresh/x"));
    assert_eq!(
        get(port, "/checked/x", Ipv4Addr::LOCALHOST, None),
        "404 Not Found"
    );
    thread::sleep(Duration::from_millis(300));
    load.finish_without_failures();

    // The pool that went stopped checking its server.
    let checks = a.checks.load(Ordering::Relaxed);
    thread::sleep(Duration::from_millis(600));
    assert_eq!(
        a.checks.load(Ordering::Relaxed),
        checks,
        "the removed pool still checks its server"
    );
    let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();
    assert!(
        !log.contains("keep their running values"),
        "a pool change was held for a restart:\n{log}"
    );
    drop(idle);

    // A pool whose server has no address refuses the reload; the running pools serve on.
    edit_config(dir.path(), |config| {
        config["upstreams"]["app"]["servers"] =
            toml::Value::Array(vec!["nowhere.invalid:80".into()]);
    });
    util::signal(proxy.0.id(), libc::SIGHUP);
    let refused = "upstreams.app: no address found for nowhere.invalid:80";
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(
            dir.path().join("proxy.log")
        )
        .is_ok_and(|log| log.contains(refused))),
        "the reload was not refused"
    );
    assert_eq!(spread(port, "/app/x", 6).len(), 2, "app changed anyway");
}
