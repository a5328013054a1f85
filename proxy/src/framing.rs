//! The first check on every request: its framing. A request whose length is ambiguous could
//! be read one way here and another way by a backend (request smuggling), so it is refused
//! and its connection closed. Pingora already refuses unparsable lengths, obs-fold and
//! `Transfer-Encoding` on HTTP/1.0; what it lets through is caught here. Oversized headers and
//! announced bodies are refused before anything reads them.

use pingora_proxy::Session;

use crate::RequestLimits;

/// Status, error code and message for a request to refuse, or `None`.
pub fn check(
    session: &Session,
    limits: &RequestLimits,
) -> Option<(u16, &'static str, &'static str)> {
    let headers = &session.req_header().headers;
    if headers.len() > limits.max_headers {
        return Some(TOO_MANY_HEADERS);
    }
    // The fields as the client sent them: Pingora drops Content-Length when a request also
    // has Transfer-Encoding, so the parsed header alone would hide the conflict.
    let (lengths, codings) = match session.as_downstream().as_http1() {
        Some(h1) => {
            let raw = h1.get_headers_raw_bytes();
            if raw.len() > limits.max_header_bytes {
                return Some(HEADERS_TOO_LARGE);
            }
            if has_bare_lf(&raw) {
                return Some((
                    400,
                    "bad_request",
                    "header lines must end with CRLF, not a bare LF",
                ));
            }
            (
                fields_named(&raw, b"content-length"),
                fields_named(&raw, b"transfer-encoding"),
            )
        }
        None => {
            let size: usize = headers
                .iter()
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum();
            if size > limits.max_header_bytes {
                return Some(HEADERS_TOO_LARGE);
            }
            (
                headers.get_all("content-length").iter().count(),
                headers.get_all("transfer-encoding").iter().count(),
            )
        }
    };
    if lengths > 1 {
        return Some((400, "bad_request", "more than one Content-Length header"));
    }
    let length = headers.get("content-length");
    if lengths > 0 && codings > 0 {
        return Some((
            400,
            "bad_request",
            "both Content-Length and Transfer-Encoding: the body's length is ambiguous",
        ));
    }
    // Digits only: `5, 5` or `+5` would be one length here and maybe another elsewhere.
    let announced = match length.map(|v| v.as_bytes()) {
        None => 0,
        Some(digits) if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) => {
            std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse::<u64>().ok())
                .unwrap_or(u64::MAX)
        }
        Some(_) => return Some((400, "bad_request", "Content-Length must be digits only")),
    };
    if announced > limits.max_body_bytes {
        return Some((
            413,
            "payload_too_large",
            "the request body is larger than this server accepts",
        ));
    }
    None
}

const TOO_MANY_HEADERS: (u16, &str, &str) = (
    431,
    "headers_too_large",
    "the request has too many header fields",
);
const HEADERS_TOO_LARGE: (u16, &str, &str) = (
    431,
    "headers_too_large",
    "the request's header section is too large",
);

/// How many header lines of `raw` have the field `name` (ASCII, lower case).
fn fields_named(raw: &[u8], name: &[u8]) -> usize {
    raw.split(|&b| b == b'\n')
        .filter(|line| {
            line.len() > name.len()
                && line[name.len()] == b':'
                && line[..name.len()].eq_ignore_ascii_case(name)
        })
        .count()
}

/// A line feed not preceded by a carriage return.
fn has_bare_lf(raw: &[u8]) -> bool {
    raw.iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || raw[i - 1] != b'\r'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_line_feeds_are_found() {
        assert!(!has_bare_lf(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\nHost: x\r\n\r\n"));
        assert!(has_bare_lf(b"\n"));
    }

    #[test]
    fn fields_are_counted_by_name_whatever_the_case() {
        let raw = b"POST / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\nX-Content-Length: 2\r\n\r\n";
        assert_eq!(fields_named(raw, b"content-length"), 2);
        assert_eq!(fields_named(raw, b"transfer-encoding"), 0);
    }
}
