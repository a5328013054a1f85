//! The first check on every request: its framing. A request whose length is ambiguous could
//! be read one way here and another way by a backend (request smuggling), so it is refused
//! and its connection closed. Oversized headers and announced bodies are refused before
//! anything reads them.
//!
//! HTTP/1 headers are looked at as raw bytes, before Pingora parses them ([`look_h1`], called
//! by [`crate::connection`]): the raw fields show what parsing hides (Pingora drops
//! `Content-Length` when `Transfer-Encoding` is present), and everything Pingora would refuse
//! with a bare `400` is refused here first, with the JSON body every other error carries.
//! HTTP/2 frames requests itself; only its header size is checked ([`check_h2`]).

use std::mem::MaybeUninit;

use pingora_proxy::Session;

use crate::{RequestLimits, respond::ErrorReply};

/// What the bytes read so far of an HTTP/1 request header amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Look {
    /// The header is not complete yet.
    Partial,
    /// A complete header, fit to hand to Pingora.
    Complete(Head),
    /// Refused before any route sees it.
    Refuse(ErrorReply),
}

/// Where a complete request header ends, and where its request does.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Head {
    /// The header's bytes, the empty line that ends it included.
    pub len: usize,
    pub body: Body,
}

/// How much of the connection the request's body takes after its header.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Body {
    /// `Content-Length` bytes (none without the header).
    Length(u64),
    /// Chunked, or an upgrade or `CONNECT` that may turn the connection into a tunnel: only
    /// Pingora's reading of it tells where it ends.
    Unbounded,
}

/// Pingora's own limit on header fields.
const MOST_FIELDS: usize = 256;

pub fn look_h1(buf: &[u8], limits: &RequestLimits) -> Look {
    if leading_blank(buf) > MOST_LEADING_BLANK {
        return bad("too many empty lines before the request line");
    }
    let mut fields = [const { MaybeUninit::<httparse::Header>::uninit() }; MOST_FIELDS];
    let mut request = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut request,
        buf,
        &mut fields,
    );
    match parsed {
        Ok(httparse::Status::Complete(end)) => {
            let http10 = request.version == Some(0);
            let connect = request.method == Some("CONNECT");
            check_fields(request.headers, http10, connect, &buf[..end], limits)
        }
        Ok(httparse::Status::Partial) => Look::Partial,
        // Pingora percent-escapes a request line with raw spaces or bytes outside the URI
        // set (and refuses what it cannot escape); the fields still get every check here.
        Err(httparse::Error::Token | httparse::Error::Version) => {
            look_past_request_line(buf, limits)
        }
        Err(httparse::Error::TooManyHeaders) => Look::Refuse(TOO_MANY_HEADERS),
        Err(_) => Look::Refuse(MALFORMED),
    }
}

fn look_past_request_line(buf: &[u8], limits: &RequestLimits) -> Look {
    // The empty lines httparse skipped before the request line are not it.
    let blank = leading_blank(buf);
    let Some(line_end) = buf[blank..]
        .iter()
        .position(|&b| b == b'\n')
        .map(|at| blank + at)
    else {
        return Look::Partial;
    };
    let line = buf[blank..line_end]
        .strip_suffix(b"\r")
        .unwrap_or(&buf[blank..line_end]);
    let http10 = line.ends_with(b" HTTP/1.0");
    let connect = line.starts_with(b"CONNECT ");
    let mut fields = [httparse::EMPTY_HEADER; MOST_FIELDS];
    match httparse::parse_headers(&buf[line_end + 1..], &mut fields) {
        Ok(httparse::Status::Complete((length, fields))) => check_fields(
            fields,
            http10,
            connect,
            &buf[..line_end + 1 + length],
            limits,
        ),
        Ok(httparse::Status::Partial) => Look::Partial,
        Err(httparse::Error::TooManyHeaders) => Look::Refuse(TOO_MANY_HEADERS),
        Err(_) => Look::Refuse(MALFORMED),
    }
}

/// The checks on a complete header: `raw` is the whole header section as sent.
fn check_fields(
    fields: &[httparse::Header],
    http10: bool,
    connect: bool,
    raw: &[u8],
    limits: &RequestLimits,
) -> Look {
    if fields.len() > limits.max_headers {
        return Look::Refuse(TOO_MANY_HEADERS);
    }
    if raw.len() > limits.max_header_bytes {
        return Look::Refuse(HEADERS_TOO_LARGE);
    }
    if has_bare_lf(raw) {
        return bad("header lines must end with CRLF, not a bare LF");
    }
    let (mut lengths, mut codings, mut hosts, mut upgrade) = (0, 0, 0, false);
    let (mut length, mut coding): (&[u8], &[u8]) = (b"", b"");
    for field in fields {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            lengths += 1;
            length = field.value;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            codings += 1;
            coding = field.value;
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            if field.value.contains(&b'@') {
                return bad("the Host header may not carry user information");
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            upgrade = true;
        }
    }
    if hosts > 1 {
        return bad("more than one Host header");
    }
    if lengths > 1 {
        return bad("more than one Content-Length header");
    }
    if lengths > 0 && codings > 0 {
        return bad("both Content-Length and Transfer-Encoding: the body's length is ambiguous");
    }
    if codings > 0 {
        if http10 {
            return bad("HTTP/1.0 has no Transfer-Encoding");
        }
        // Only chunked says where the body ends; anything else after it would be read to
        // the close of the connection, which a proxy cannot pass on.
        let last = coding.rsplit(|&b| b == b',').next().unwrap_or_default();
        if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            return bad("the last Transfer-Encoding must be chunked");
        }
        return complete(raw, Body::Unbounded);
    }
    let tunnel = upgrade || connect;
    if lengths == 0 {
        return complete(
            raw,
            if tunnel {
                Body::Unbounded
            } else {
                Body::Length(0)
            },
        );
    }
    // Digits only: `5, 5` or `+5` would be one length here and maybe another elsewhere.
    if length.is_empty() || !length.iter().all(u8::is_ascii_digit) {
        return bad("Content-Length must be digits only");
    }
    let announced = std::str::from_utf8(length)
        .ok()
        .and_then(|digits| digits.parse::<u64>().ok())
        .unwrap_or(u64::MAX);
    if announced > limits.max_body_bytes {
        return Look::Refuse(TOO_LARGE_BODY);
    }
    complete(
        raw,
        if tunnel {
            Body::Unbounded
        } else {
            Body::Length(announced)
        },
    )
}

fn complete(raw: &[u8], body: Body) -> Look {
    Look::Complete(Head {
        len: raw.len(),
        body,
    })
}

/// The checks on an HTTP/2 request, whose codec has already refused malformed framing. The
/// pseudo-headers count towards the size as the request line does in HTTP/1, so a huge
/// `:path` is refused like a huge request line.
pub fn check_h2(session: &Session, limits: &RequestLimits) -> Option<ErrorReply> {
    let request = session.req_header();
    let headers = &request.headers;
    if headers.len() > limits.max_headers {
        return Some(TOO_MANY_HEADERS);
    }
    let uri = &request.uri;
    let pseudo = [
        (":method", request.method.as_str().len()),
        (
            ":path",
            uri.path_and_query().map_or(0, |p| p.as_str().len()),
        ),
        (
            ":authority",
            uri.authority().map_or(0, |a| a.as_str().len()),
        ),
        (":scheme", uri.scheme_str().map_or(0, str::len)),
    ];
    let size: usize = headers
        .iter()
        .map(|(name, value)| (name.as_str().len(), value.len()))
        .chain(pseudo.iter().map(|&(name, value)| (name.len(), value)))
        .map(|(name, value)| name + value + 4)
        .sum();
    if size > limits.max_header_bytes {
        return Some(HEADERS_TOO_LARGE);
    }
    let announced = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (announced > limits.max_body_bytes).then_some(TOO_LARGE_BODY)
}

fn bad(message: &'static str) -> Look {
    Look::Refuse(reply(400, "bad_request", message))
}

pub const MALFORMED: ErrorReply = reply(400, "bad_request", "the request header is malformed");
pub const TOO_MANY_HEADERS: ErrorReply = reply(
    431,
    "headers_too_large",
    "the request has too many header fields",
);
pub const HEADERS_TOO_LARGE: ErrorReply = reply(
    431,
    "headers_too_large",
    "the request's header section is too large",
);
pub const TOO_LARGE_BODY: ErrorReply = reply(
    413,
    "payload_too_large",
    "the request body is larger than this server accepts",
);
pub const HEADER_TIMEOUT: ErrorReply = reply(
    408,
    "request_timeout",
    "the request header did not arrive in time",
);

const fn reply(status: u16, code: &'static str, message: &'static str) -> ErrorReply {
    ErrorReply {
        status,
        code,
        message,
    }
}

/// Whether the empty line that ends a header (`\n\r\n`, or a bare `\n\n` that
/// [`look_h1`] refuses) may be among the bytes from `from` on. A trickled header is parsed only
/// when it may be whole, so reading it costs time linear in its length, not quadratic.
pub fn may_end(buf: &[u8], from: usize) -> bool {
    // Empty lines before the request line are skipped by the parser, not ends: past a few,
    // [`look_h1`] refuses them (so this says "look"); before, the search starts after them.
    let blank = leading_blank(buf);
    if blank > MOST_LEADING_BLANK {
        return true;
    }
    let tail = &buf[from.saturating_sub(2).max(blank).min(buf.len())..];
    // Jumping from LF to LF (memchr) rather than sliding a window over every byte: this runs
    // on every request, and the header (a bearer token, cookies) is mostly not LF.
    memchr::memchr_iter(b'\n', tail).any(|i| match tail.get(i + 1) {
        Some(b'\n') => true,
        Some(b'\r') => tail.get(i + 2) == Some(&b'\n'),
        _ => false,
    })
}

/// CR and LF bytes a request may start with (RFC 9112, 2.2: a server should ignore at least
/// one empty line before the request line); more is refused, or a client could send empty
/// lines for ever, each read parsed again.
const MOST_LEADING_BLANK: usize = 4;

/// The CR and LF bytes `buf` starts with, counted up to one past the most allowed.
fn leading_blank(buf: &[u8]) -> usize {
    buf.iter()
        .take(MOST_LEADING_BLANK + 1)
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count()
}

fn has_bare_lf(raw: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', raw).any(|i| i == 0 || raw[i - 1] != b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RequestLimits = RequestLimits {
        max_body_bytes: 100,
        max_header_bytes: 1024,
        max_headers: 10,
        header_timeout: std::time::Duration::from_secs(1),
        body_timeout: std::time::Duration::from_secs(1),
        max_connections: 10,
        max_connections_per_client: 10,
        send_timeout: std::time::Duration::from_secs(1),
        tls_handshake_timeout: std::time::Duration::from_secs(1),
        max_upstream_requests_per_client: 10,
        max_requests_per_connection: 10,
        upgrade_idle_timeout: std::time::Duration::from_secs(60),
        max_upgraded_per_client: 1,
    };

    #[test]
    fn the_lf_search_finds_what_a_byte_by_byte_scan_finds() {
        // Every string of up to 7 bytes over the alphabet that matters, from every start.
        let alphabet = [b'\r', b'\n', b'a'];
        for len in 0..=7u32 {
            for n in 0..3usize.pow(len) {
                let buf: Vec<u8> = (0..len).map(|k| alphabet[n / 3usize.pow(k) % 3]).collect();
                for from in 0..=buf.len() {
                    let blank = leading_blank(&buf);
                    let plain = blank > MOST_LEADING_BLANK || {
                        let tail = &buf[from.saturating_sub(2).max(blank).min(buf.len())..];
                        tail.windows(2).any(|w| w == b"\n\n")
                            || tail.windows(3).any(|w| w == b"\n\r\n")
                    };
                    assert_eq!(may_end(&buf, from), plain, "{buf:?} from {from}");
                }
                let bare = buf
                    .iter()
                    .enumerate()
                    .any(|(i, &b)| b == b'\n' && (i == 0 || buf[i - 1] != b'\r'));
                assert_eq!(has_bare_lf(&buf), bare, "{buf:?}");
            }
        }
    }

    #[test]
    fn a_header_may_end_only_where_an_empty_line_could_be() {
        let raw = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(may_end(raw, 0));
        // Byte by byte, the end shows only with the last byte, which looks back at two more.
        for len in 1..raw.len() {
            assert!(!may_end(&raw[..len], len - 1), "{len}");
        }
        assert!(may_end(raw, raw.len() - 1));
        assert!(may_end(b"GET / HTTP/1.1\nHost: x\n\n", 20));
        assert!(!may_end(b"", 0));
        // A blank line or two before the request is skipped, not an end; many are refused.
        assert!(!may_end(b"\r\n\r\n", 0));
        assert!(!may_end(b"\r\nGET / HTTP/1.1\r\n", 0));
        assert!(may_end(b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", 0));
        assert!(may_end(b"\r\n\r\n\r\n", 0));
        assert_eq!(
            refused("\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            400
        );
        assert_eq!(
            look("\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            complete(b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", Body::Length(0))
        );
    }

    fn look(raw: &str) -> Look {
        look_h1(raw.as_bytes(), &LIMITS)
    }

    fn refused(raw: &str) -> u16 {
        match look(raw) {
            Look::Refuse(reply) => reply.status,
            other => panic!("{raw:?} was not refused: {other:?}"),
        }
    }

    /// The header's length and the body's framing, for a header that passes.
    fn head(raw: &str) -> (usize, Body) {
        match look(raw) {
            Look::Complete(head) => (head.len, head.body),
            other => panic!("{raw:?} did not pass: {other:?}"),
        }
    }

    #[test]
    fn well_formed_headers_pass_and_partial_ones_wait() {
        let get = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(head(get), (get.len(), Body::Length(0)));
        assert_eq!(look("GET / HTTP/1.1\r\nHost: x\r\n"), Look::Partial);
        assert_eq!(look("GET / HT"), Look::Partial);
        // The header ends at its empty line; what follows is the body, then the next request.
        assert_eq!(
            head(&format!(
                "POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\nbody{get}"
            )),
            (40, Body::Length(100))
        );
        assert_eq!(
            head("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").1,
            Body::Unbounded
        );
        // Pingora escapes these itself; the fields are still checked.
        assert_eq!(head("GET /a b HTTP/1.1\r\nHost: x\r\n\r\nGET").0, 30);
        assert_eq!(
            refused("GET /a b HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
            400
        );
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/framing.rs`): an empty line before a request line
    /// that httparse refuses was taken for the request line, so the header was judged from
    /// its request line on (`400` for a raw space in the path, which passes without it).
    #[test]
    fn an_empty_line_first_changes_nothing_past_an_odd_request_line() {
        for raw in [
            "GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a b HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "\u{16}\u{3}\u{1}\u{2}\0\u{1}\0\u{1}",
        ] {
            for blank in ["\r\n", "\r\n\r\n"] {
                let expected = match look(raw) {
                    Look::Complete(head) => Look::Complete(Head {
                        len: head.len + blank.len(),
                        ..head
                    }),
                    other => other,
                };
                assert_eq!(look(&format!("{blank}{raw}")), expected, "{blank:?}{raw:?}");
            }
        }
    }

    /// A connection that may become a tunnel is Pingora's to read to the end.
    #[test]
    fn upgrades_and_connect_have_no_known_end() {
        for raw in [
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
        ] {
            assert_eq!(head(raw), (raw.len(), Body::Unbounded), "{raw:?}");
        }
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        for raw in [
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "GET / HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\nHost: x\n\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: u@b\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        ] {
            assert_eq!(refused(raw), 400, "{raw:?}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let many: String = (0..11).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(refused(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
        let big = "a".repeat(1100);
        assert_eq!(refused(&format!("GET / HTTP/1.1\r\nX: {big}\r\n\r\n")), 431);
        assert_eq!(
            refused("POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n"),
            413
        );
    }
}
