//! HTTP/1.1 pipelining (RFC 9112, 9.3.2): requests a client sends without waiting for the
//! answers are each answered, in order, with every check the first one gets; a request's body
//! is never read as the next request; and a client pipelining without end is served its share
//! of requests while others are served too.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    sync::{Arc, atomic::AtomicBool},
    thread,
    time::{Duration, Instant},
};

use crate::{
    drills::{plain_group, steady_pings},
    util::{Group, metric_sum},
};

/// One response as read off the connection.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads the next response, framed as RFC 9112, 6.3 says (`to_head`: it answers a `HEAD`, so
/// has no body whatever its headers say); `None` once the connection is closed or stays
/// silent for the read timeout.
fn read_response(reader: &mut impl BufRead, to_head: bool) -> Option<Response> {
    let mut line = String::new();
    reader.read_line(&mut line).ok().filter(|&n| n > 0)?;
    let status = line.split(' ').nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok().filter(|&n| n > 0)?;
        let field = line.trim_end();
        if field.is_empty() {
            break;
        }
        let (name, value) = field.split_once(':')?;
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let mut response = Response {
        status,
        headers,
        body: Vec::new(),
    };
    if to_head || status == 204 || status == 304 {
        return Some(response);
    }
    if response
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            line.clear();
            reader.read_line(&mut line).ok()?;
            let size = usize::from_str_radix(line.trim_end().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                return Some(response);
            }
            response.body.extend_from_slice(&chunk[..size]);
        }
    }
    let length: usize = response.header("content-length")?.parse().ok()?;
    response.body = vec![0; length];
    reader.read_exact(&mut response.body).ok()?;
    Some(response)
}

fn connect(group: &Group) -> (TcpStream, BufReader<TcpStream>) {
    let stream = TcpStream::connect(("127.0.0.1", group.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let reader = BufReader::new(stream.try_clone().expect("clone"));
    (stream, reader)
}

/// Whether the proxy closed the connection (nothing more comes, within 5 s).
fn closed(reader: &mut BufReader<TcpStream>) -> bool {
    let _ = reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)));
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => rest.is_empty(),
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn pings_at_backends(group: &Group) -> f64 {
    metric_sum(
        &group.admin("/metrics").1,
        "gatehouse_backend_http_requests_total",
        &[r#"endpoint="ping""#],
    )
}

const HELLO: &str = "hello, pipelined world\n";

#[test]
fn requests_sent_in_one_write_are_each_answered_in_order() {
    let group = plain_group(1, "");
    std::fs::write(group.dir.path().join("files/hello.txt"), HELLO).expect("static file");
    let (mut stream, mut reader) = connect(&group);
    stream
        .write_all(
            b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /files/hello.txt HTTP/1.1\r\nHost: x\r\n\r\n\
              HEAD /files/hello.txt HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .expect("send");
    let ping = read_response(&mut reader, false).expect("the ping's answer");
    assert_eq!(ping.status, 200, "{ping:?}");
    assert!(ping.text().contains(r#""status":"ok""#), "{ping:?}");
    let page = read_response(&mut reader, false).expect("the page's answer");
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(page.text(), HELLO);
    let head = read_response(&mut reader, true).expect("the HEAD's answer");
    assert_eq!(head.status, 200, "{head:?}");
    assert_eq!(
        head.header("content-length"),
        Some(&*HELLO.len().to_string())
    );
    let ids: Vec<_> = [&ping, &page, &head]
        .iter()
        .map(|r| r.header("x-request-id").unwrap_or_default().to_string())
        .collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2], "{ids:?}");

    // The connection is still good for more, pipelined again, and nothing extra came back.
    stream
        .write_all(
            b"GET /files/hello.txt HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /api/ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .expect("send");
    let page = read_response(&mut reader, false).expect("the page's answer");
    assert_eq!(page.text(), HELLO);
    let ping = read_response(&mut reader, false).expect("the ping's answer");
    assert!(ping.text().contains(r#""status":"ok""#), "{ping:?}");
    assert!(closed(&mut reader), "more came after the last answer");
}

/// A pipelined request is checked as the first one is: its framing, its size.
#[test]
fn a_pipelined_request_meets_the_same_checks() {
    let group = plain_group(1, "limits.max_header_bytes = 1024");
    let big = "a".repeat(2000);
    let (mut stream, mut reader) = connect(&group);
    let before = pings_at_backends(&group);
    stream
        .write_all(
            format!(
                "GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n\
                 GET /api/ping HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n\
                 GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            .as_bytes(),
        )
        .expect("send");
    assert_eq!(
        read_response(&mut reader, false).map(|r| r.status),
        Some(200)
    );
    let refused = read_response(&mut reader, false).expect("the refusal");
    assert_eq!(refused.status, 431, "{refused:?}");
    assert!(closed(&mut reader), "served past a refused request");
    assert_eq!(pings_at_backends(&group), before + 1.0);

    let (mut stream, mut reader) = connect(&group);
    stream
        .write_all(
            b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        )
        .expect("send");
    assert_eq!(
        read_response(&mut reader, false).map(|r| r.status),
        Some(200)
    );
    assert_eq!(
        read_response(&mut reader, false).map(|r| r.status),
        Some(400)
    );
    assert!(closed(&mut reader));
}

/// A body is read as a body, however it arrives, even one that looks like a request.
#[test]
fn a_body_is_never_taken_for_the_next_request() {
    let group = plain_group(1, "");
    let lookalike = "GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n";
    let login = |body: &str| {
        format!(
            "POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let before = pings_at_backends(&group);

    // All in one write.
    let (mut stream, mut reader) = connect(&group);
    stream
        .write_all(format!("{}{lookalike}", login(lookalike)).as_bytes())
        .expect("send");
    let refused = read_response(&mut reader, false).expect("the login's answer");
    assert_eq!(refused.status, 400, "not JSON: {refused:?}");
    let ping = read_response(&mut reader, false).expect("the ping's answer");
    assert_eq!(ping.status, 200, "{ping:?}");
    assert_eq!(
        pings_at_backends(&group),
        before + 1.0,
        "the body was served"
    );

    // The body in two writes, the second carrying the next request: the rest of the body is
    // read up to its end and no further.
    let body = r#"{"username":"nobody","password":"wrong"}"#;
    let request = login(body);
    let (first, rest) = request.split_at(request.len() - 10);
    stream.write_all(first.as_bytes()).expect("send");
    thread::sleep(Duration::from_millis(200));
    stream
        .write_all(format!("{rest}{lookalike}").as_bytes())
        .expect("send");
    let refused = read_response(&mut reader, false).expect("the login's answer");
    assert_eq!(refused.status, 401, "{refused:?}");
    let ping = read_response(&mut reader, false).expect("the ping's answer");
    assert_eq!(ping.status, 200, "{ping:?}");
    assert_eq!(pings_at_backends(&group), before + 2.0);
}

/// After a chunked body, where the body ends is Pingora's to find: a request pipelined behind
/// one is not served, and the connection closes after the first answer (the client sends it
/// again on a new connection, RFC 9112, 9.3.2).
#[test]
fn after_a_chunked_body_a_pipelined_request_closes_the_connection() {
    let group = plain_group(1, "");
    let (mut stream, mut reader) = connect(&group);
    stream
        .write_all(
            b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
              Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n\
              GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .expect("send");
    let first = read_response(&mut reader, false).expect("the login's answer");
    assert_eq!(first.status, 400, "{first:?}");
    let started = Instant::now();
    assert!(
        closed(&mut reader),
        "the ping was served or the connection hangs"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// 10,000 requests in one write: answered one after another up to the per-connection cap,
/// then the connection closes, and a client on another connection is served throughout.
#[test]
fn a_pipelined_flood_gets_its_share_and_others_are_served() {
    const FLOOD: usize = 10_000;
    const CAP: usize = 1000;
    let group = plain_group(1, "");
    let stop = Arc::new(AtomicBool::new(false));
    let pings = steady_pings(group.port, stop.clone());
    let (stream, mut reader) = connect(&group);
    let started = Instant::now();
    let flood: Vec<u8> = (0..FLOOD)
        .flat_map(|i| format!("GET /api/ping?n={i} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes())
        .collect();
    let mut writer = stream.try_clone().expect("clone");
    // Written while the answers are read: the proxy closes the connection at its cap, so the
    // write may fail then.
    let writing = thread::spawn(move || writer.write_all(&flood));
    let mut answered = 0;
    while let Some(response) = read_response(&mut reader, false) {
        assert_eq!(response.status, 200, "answer {answered}: {response:?}");
        answered += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = writing.join();
    let (served, failed) = pings.join().expect("pings");
    assert!(
        answered <= CAP,
        "{answered} answers on one connection, past the cap of {CAP}"
    );
    // The last few answers may be lost to the reset a close with unread requests makes.
    assert!(answered >= CAP / 2, "only {answered} answers");
    assert!(failed.is_empty(), "other clients failed: {failed:?}");
    assert!(served > 0, "no other client was served during the flood");
    eprintln!(
        "flood: {answered} of {FLOOD} answered in {:?}; {served} pings from another client",
        started.elapsed()
    );
}
