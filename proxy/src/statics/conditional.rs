//! Conditional and partial requests: `If-None-Match`, `If-Modified-Since`, `Range`, `If-Range`
//! (RFC 9110, sections 13 and 14).

use std::time::{SystemTime, UNIX_EPOCH};

/// Whether `If-None-Match` names `etag` (weak comparison, as the RFC asks for GET and HEAD).
pub fn none_match(header: &[u8], etag: &str) -> bool {
    let Ok(header) = std::str::from_utf8(header) else {
        return false;
    };
    let ours = etag.trim_start_matches("W/");
    header
        .split(',')
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == ours)
}

/// Whether the file is unchanged since the date in `If-Modified-Since` (to the second).
pub fn not_modified_since(header: &[u8], modified: SystemTime) -> bool {
    let Some(since) = std::str::from_utf8(header)
        .ok()
        .and_then(|h| httpdate::parse_http_date(h).ok())
    else {
        return false;
    };
    let seconds = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    seconds(modified) <= seconds(since)
}

/// Whether `If-Range` still matches the current representation, so the range may be sent.
/// An ETag must match strongly; a date must equal `Last-Modified` exactly.
pub fn if_range_holds(header: &[u8], etag: &str, last_modified: &str) -> bool {
    let Ok(value) = std::str::from_utf8(header).map(str::trim) else {
        return false;
    };
    if value.starts_with('"') {
        value == etag
    } else if value.starts_with("W/") {
        false
    } else {
        value == last_modified
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Range {
    /// Serve the whole representation: no range, several ranges, or one we do not understand.
    Full,
    /// Inclusive byte positions.
    Part(u64, u64),
    Unsatisfiable,
}

/// Parses a `Range` header against a representation of `len` bytes. Only one range is
/// served; syntax we do not understand is ignored, as the RFC allows.
pub fn range(header: &[u8], len: u64) -> Range {
    let Some(spec) = std::str::from_utf8(header)
        .ok()
        .and_then(|h| h.trim().strip_prefix("bytes="))
    else {
        return Range::Full;
    };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Range::Full;
    };
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (start.trim(), end.trim()) {
        ("", suffix) => match number(suffix) {
            Some(0) => Range::Unsatisfiable,
            Some(_) if len == 0 => Range::Unsatisfiable,
            Some(n) => Range::Part(len.saturating_sub(n), len - 1),
            None => Range::Full,
        },
        (first, last) => {
            let Some(first) = number(first) else {
                return Range::Full;
            };
            let last = if last.is_empty() {
                Some(u64::MAX)
            } else {
                number(last)
            };
            match last {
                None => Range::Full,
                Some(last) if last < first => Range::Full,
                Some(_) if first >= len => Range::Unsatisfiable,
                Some(last) => Range::Part(first, last.min(len - 1)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(range(b"bytes=0-9", 100), Range::Part(0, 9));
        assert_eq!(range(b"bytes=90-", 100), Range::Part(90, 99));
        assert_eq!(range(b"bytes=-10", 100), Range::Part(90, 99));
        assert_eq!(range(b"bytes=-500", 100), Range::Part(0, 99));
        assert_eq!(range(b"bytes=50-500", 100), Range::Part(50, 99));
        assert_eq!(range(b"bytes=100-", 100), Range::Unsatisfiable);
        assert_eq!(range(b"bytes=-0", 100), Range::Unsatisfiable);
        assert_eq!(range(b"bytes=0-1,5-6", 100), Range::Full);
        assert_eq!(range(b"bytes=9-1", 100), Range::Full);
        assert_eq!(range(b"lines=1-2", 100), Range::Full);
        assert_eq!(range(b"bytes=a-b", 100), Range::Full);
        assert_eq!(range(b"bytes=0-0", 0), Range::Unsatisfiable);
    }

    #[test]
    fn validators() {
        assert!(none_match(b"\"a\", \"b\"", "\"b\""));
        assert!(none_match(b"W/\"b\"", "\"b\""));
        assert!(none_match(b"*", "\"b\""));
        assert!(!none_match(b"\"c\"", "\"b\""));
        assert!(if_range_holds(b"\"b\"", "\"b\"", "x"));
        assert!(!if_range_holds(b"W/\"b\"", "\"b\"", "x"));
        let now = SystemTime::now();
        let later = httpdate::fmt_http_date(now + std::time::Duration::from_secs(5));
        assert!(not_modified_since(later.as_bytes(), now));
        let earlier = httpdate::fmt_http_date(now - std::time::Duration::from_secs(5));
        assert!(!not_modified_since(earlier.as_bytes(), now));
        assert!(!not_modified_since(b"garbage", now));
    }
}
