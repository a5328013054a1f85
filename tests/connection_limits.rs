//! What one client can hold, and for how long: readers that never read (HTTP/1 and HTTP/2),
//! silent TLS connections, HTTP/2 connections without a preface, one address opening
//! connection after connection, and slow requests holding every backend slot. Each attack
//! is cut off or refused, and an ordinary client is served meanwhile.

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use crate::{
    drills::{exchange, plain_group, steady_pings},
    util::{Group, Options, wait_until},
};

const PING: &[u8] = b"GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

fn tls_group(keys: &str) -> Group {
    Group::start(Options {
        backends: 1,
        keys: keys.into(),
        ..Options::default()
    })
}

fn cuts(group: &Group, reason: &str) -> f64 {
    group
        .metric(&format!(
            "gatehouse_connection_cuts_total{{reason=\"{reason}\"}}"
        ))
        .unwrap_or(0.0)
}

/// Asserts that at least `at_least` connections were cut for `reason`. A cut is counted as its
/// connection winds down, which on a loaded machine can be a moment after the client sees the
/// close: the count is waited for, not read once.
fn assert_cuts(group: &Group, reason: &str, at_least: f64) {
    let reached = wait_until(Duration::from_secs(5), || cuts(group, reason) >= at_least);
    assert!(
        reached,
        "{} connections cut for {reason}, expected at least {at_least}",
        cuts(group, reason)
    );
}

/// Reads what is left until the proxy closes the connection (or 10 s pass); the bytes read,
/// and whether it was closed.
fn drain(stream: &mut TcpStream) -> (usize, bool) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut total = 0;
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return (total, true),
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (total, true),
            Err(_) => return (total, false),
        }
    }
}

#[test]
fn readers_that_never_read_lose_their_response_and_slot_at_the_send_deadline() {
    let group = plain_group(
        1,
        "limits.max_connections = 10\nlimits.send_timeout = \"1s\"",
    );
    // Far more than the socket buffers hold, so the proxy's writes stall.
    let big = std::fs::File::create(group.dir.path().join("files/big.bin")).unwrap();
    big.set_len(64 << 20).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let pings = steady_pings(group.port, stop.clone());
    let mut stalled: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", group.port)).unwrap();
            s.write_all(b"GET /files/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    // Held while they stall, released once the deadline passes.
    assert!(
        wait_until(Duration::from_secs(3), || group
            .metric("gatehouse_open_connections")
            .is_some_and(|n| n >= 6.0)),
        "the stalled readers never held their connections"
    );
    assert!(
        wait_until(Duration::from_secs(8), || group
            .metric("gatehouse_open_connections")
            .is_some_and(|n| n <= 1.0)),
        "stalled readers still hold {:?} connections",
        group.metric("gatehouse_open_connections")
    );
    stop.store(true, Ordering::Relaxed);
    let (served, failed) = pings.join().unwrap();
    assert!(
        failed.is_empty() && served > 10,
        "{served} served, {failed:?}"
    );
    for stream in &mut stalled {
        let (bytes, closed) = drain(stream);
        assert!(
            closed && bytes < 64 << 20,
            "{bytes} bytes, closed: {closed}"
        );
    }
    assert_cuts(&group, "send_timeout", 6.0);
    // Counted, not logged one line each.
    assert!(!group.log().contains("WriteTimedout"), "{}", group.log());
}

/// A connection to loopback `port` whose receive buffer is as small as the kernel allows, so
/// that what the client does not read fills the proxy's side quickly.
fn connect_with_small_window(port: u16) -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: a socket made, configured and connected here, then owned by the TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let size: libc::c_int = 4096;
        let set = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const size).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(set, 0);
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
            },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            fd,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(connected, 0);
        TcpStream::from_raw_fd(fd)
    }
}

#[test]
fn a_client_that_keeps_asking_and_never_reads_is_cut_even_with_small_responses() {
    // Each response fits the proxy's write buffer and leaves in one final flush, which
    // Pingora's own write timeout does not cover: the deadline has to hold there too. One
    // request at a time, never read, until the kernel's buffers are full and a flush stalls.
    let group = plain_group(1, "limits.send_timeout = \"1s\"");
    std::fs::write(
        group.dir.path().join("files/small.bin"),
        vec![7u8; 30 << 10],
    )
    .unwrap();
    let mut stream = connect_with_small_window(group.port);
    let request = b"GET /files/small.bin HTTP/1.1\r\nHost: x\r\n\r\n";
    let started = Instant::now();
    let mut asked = 0;
    while stream.write_all(request).is_ok() && started.elapsed() < Duration::from_secs(30) {
        asked += 1;
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "still open after {asked} requests"
    );
    assert_cuts(&group, "send_timeout", 1.0);
    assert_eq!(group.get("/api/ping").unwrap().status(), 200);
}

/// An HTTPS client that speaks HTTP/2 only and opens every stream with a zero window: it
/// receives response headers, never a byte of a body.
fn zero_window_client(group: &Group) -> reqwest::blocking::Client {
    let pem = std::fs::read(group.dir.path().join("certs/gatehouse.crt")).unwrap();
    reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .http2_prior_knowledge()
        .http2_initial_stream_window_size(0)
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn http2_streams_stalled_by_a_zero_window_are_aborted_and_free_the_backend() {
    let group =
        tls_group("limits.send_timeout = \"1s\"\nlimits.max_upstream_requests_per_client = 5");
    let backend = group.child_pid("--id b1 ").expect("b1");
    let baseline = open_files(backend);
    let client = zero_window_client(&group);
    let started = Instant::now();
    let streams: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (client.clone(), group.url("/api/ping"));
            thread::spawn(move || {
                let response = client.get(url).send().map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                Ok::<_, String>((status, response.bytes().is_ok()))
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    // Another client is served meanwhile, at once: the stalled streams hold only their
    // client's share of the backend slots.
    let other = group.client_from("127.0.0.2");
    let asked = Instant::now();
    let ordinary = other.get(group.url("/api/ping")).send().unwrap();
    assert_eq!(ordinary.status(), 200);
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    let outcomes: Vec<_> = streams.into_iter().map(|s| s.join().unwrap()).collect();
    // Five reached the backend and stalled; the rest were refused at once with 429 (whose
    // body the zero window holds back too). No body got through.
    let statuses = |code| {
        outcomes
            .iter()
            .filter(|o| matches!(o, Ok((s, _)) if *s == code))
            .count()
    };
    assert_eq!((statuses(200), statuses(429)), (5, 15), "{outcomes:?}");
    assert!(
        outcomes.iter().all(|o| matches!(o, Ok((_, false)))),
        "a stalled stream got its body: {outcomes:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "aborted only after {:?}",
        started.elapsed()
    );
    assert_cuts(&group, "send_timeout", 5.0);
    assert_eq!(
        group.metric("gatehouse_upstream_client_limits_total"),
        Some(15.0)
    );
    // The backend connections the streams used are not pinned.
    assert!(
        wait_until(Duration::from_secs(5), || open_files(backend)
            <= baseline + 4),
        "the backend holds {} files, {baseline} before",
        open_files(backend)
    );
}

/// A TLS client that trusts the group's certificate and offers `alpn`.
fn tls_client(
    group: &Group,
    alpn: &[u8],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    let cert = CertificateDer::from_pem_file(group.dir.path().join("certs/gatehouse.crt")).unwrap();
    roots.add(cert).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let name = ServerName::try_from("localhost").unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let socket = TcpStream::connect(("127.0.0.1", group.tls_port.unwrap())).unwrap();
    let mut stream = rustls::StreamOwned::new(connection, socket);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).unwrap();
    }
    stream
}

/// Frames from the server until one of `kind` (with `flags`) arrives; its payload.
fn frame_of(stream: &mut impl Read, kind: u8, flags: u8) -> Vec<u8> {
    loop {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).unwrap();
        let length = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let mut payload = vec![0u8; length];
        stream.read_exact(&mut payload).unwrap();
        if head[3] == kind && head[4] & flags == flags {
            return payload;
        }
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// Reads until the proxy closes the connection (or 5 s pass); how long that took.
fn closed_after(stream: &mut impl Read, started: Instant) -> Duration {
    let mut buffer = [0u8; 256];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return started.elapsed(),
            // The server's own SETTINGS, and its acknowledgements.
            Ok(_) => {}
        }
    }
}

#[test]
fn http2_without_a_request_by_the_header_deadline_is_closed_and_a_working_client_is_not() {
    let group = tls_group("limits.header_timeout = \"1s\"\nlimits.h2_max_streams = 7");
    // TLS done, ALPN h2, and then nothing.
    let mut silent = tls_client(&group, b"h2");
    silent
        .sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let waited = closed_after(&mut silent, Instant::now());
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
    // The preface and SETTINGS, but no request: closed too, having been told the stream limit.
    let mut idle = tls_client(&group, b"h2");
    idle.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = Instant::now();
    idle.write_all(PREFACE).unwrap();
    idle.write_all(&EMPTY_SETTINGS).unwrap();
    idle.flush().unwrap();
    let settings = frame_of(&mut idle, 4, 0);
    let max_streams = settings
        .chunks(6)
        .find(|s| s[..2] == [0, 3])
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    assert_eq!(max_streams, Some(7));
    let waited = closed_after(&mut idle, started);
    assert!(waited < Duration::from_secs(4), "closed after {waited:?}");
    // Not HTTP/2 at all after ALPN h2: cut at once, counted, and not logged.
    let mut wrong = tls_client(&group, b"h2");
    wrong
        .sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = Instant::now();
    wrong.write_all(PING).unwrap();
    wrong.flush().unwrap();
    let waited = closed_after(&mut wrong, started);
    assert!(
        waited < Duration::from_millis(900),
        "closed after {waited:?}"
    );
    assert_eq!(cuts(&group, "h2_opening"), 3.0);
    assert!(
        !group.log().to_lowercase().contains("handshake"),
        "{}",
        group.log()
    );

    // A client that sent a request keeps its connection past the deadline.
    let client = group.http_client(false);
    let first = client.get(group.url("/api/ping")).send().unwrap();
    assert_eq!(first.version(), reqwest::Version::HTTP_2);
    assert_eq!(first.status(), 200);
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        client.get(group.url("/api/ping")).send().unwrap().status(),
        200
    );
    assert_eq!(
        cuts(&group, "h2_opening"),
        3.0,
        "the working client was cut"
    );
}

#[test]
fn silent_tls_connections_count_against_the_cap_until_their_handshake_deadline() {
    let group = tls_group("limits.max_connections = 6\nlimits.tls_handshake_timeout = \"2s\"");
    let mut silent: Vec<TcpStream> = (0..6)
        .map(|_| TcpStream::connect(("127.0.0.1", group.tls_port.unwrap())).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(300));
    // The cap is full of handshakes that never start: an ordinary client waits for the
    // deadline to free a slot, and is then served.
    let started = Instant::now();
    let fresh = group.http_client(false);
    let response = fresh.get(group.url("/api/ping")).send().unwrap();
    assert_eq!(response.status(), 200);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
        "served after {waited:?}"
    );
    for stream in &mut silent {
        let (bytes, closed) = drain(stream);
        assert!(closed && bytes == 0, "{bytes} bytes, closed: {closed}");
    }
    assert_cuts(&group, "tls_handshake_timeout", 6.0);
    // A broken handshake is counted too, and neither kind is logged line by line.
    // Plain HTTP sent to the port is no handshake at all, and not counted as a failed one.
    let (response, closed) = exchange(group.tls_port.unwrap(), PING);
    assert!(!response.starts_with("HTTP") && closed, "{response}");
    let (_, closed) = exchange(group.tls_port.unwrap(), b"\x16\x03\x01\x00\x05hello");
    assert!(closed);
    assert!(wait_until(Duration::from_secs(3), || cuts(
        &group,
        "tls_handshake_error"
    ) == 1.0));
    let log = group.log();
    assert!(!log.to_lowercase().contains("handshake"), "{log}");
}

#[test]
fn one_address_is_refused_past_its_share_while_another_is_served() {
    let group = plain_group(
        1,
        "limits.max_connections_per_client = 4\nlimits.header_timeout = \"5s\"",
    );
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(("127.0.0.1", group.port)).unwrap())
        .collect();
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let (response, closed) = exchange(group.port, PING);
    assert!(response.is_empty() && closed, "{response}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_cuts(&group, "per_client_limit", 1.0);
    // Another client is served meanwhile.
    let other = group.client_from("127.0.0.2");
    let response = other.get(group.url("/api/ping")).send().unwrap();
    assert_eq!(response.status(), 200);
    // The address gets its share back as its connections close.
    drop(held);
    assert!(
        wait_until(Duration::from_secs(3), || exchange(group.port, PING)
            .0
            .starts_with("HTTP/1.1 200 ")),
        "the address stayed refused"
    );
}

#[test]
fn slow_requests_holding_every_backend_slot_queue_others_then_get_503() {
    let group = plain_group(
        1,
        "upstream.max_connections = 2\nupstream.queue_timeout = \"500ms\"",
    );
    std::fs::write(group.dir.path().join("files/page.txt"), "static").unwrap();
    // Two logins whose bodies never finish: each holds a backend slot.
    let slow: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", group.port)).unwrap();
            s.write_all(b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60\r\n\r\n{\"username\":")
                .unwrap();
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    let (response, _) = exchange(group.port, PING);
    let waited = started.elapsed();
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    assert!(
        response.to_lowercase().contains("retry-after: 1\r\n"),
        "{response}"
    );
    assert!(response.contains(r#""error":"unavailable""#), "{response}");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "answered after {waited:?}"
    );
    assert_eq!(
        group.metric("gatehouse_upstream_queue_timeouts_total"),
        Some(1.0)
    );
    // Static files need no backend slot.
    assert_eq!(group.get("/files/page.txt").unwrap().status(), 200);
    drop(slow);
    assert!(
        wait_until(Duration::from_secs(5), || group
            .get("/api/ping")
            .is_ok_and(|r| r.status() == 200)),
        "the slots were not given back"
    );
}

#[test]
fn an_http2_path_counts_towards_the_header_limit() {
    let group = tls_group("limits.max_header_bytes = 2048");
    let long = "a".repeat(3000);
    let client = group.http_client(false);
    let response = client
        .get(group.url(&format!("/api/ping?q={long}")))
        .send()
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 431);
    let response = client.get(group.url("/api/ping?q=short")).send().unwrap();
    assert_eq!(response.status(), 200);
}
