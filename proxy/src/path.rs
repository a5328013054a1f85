//! The request path, decoded once and guarded before any route sees it.
//!
//! The raw path is percent-decoded exactly once, and the decoded path is what routes match
//! and static files are looked up by. Anything that could climb out of a root or mean
//! something else to the file system is refused: `.`/`..` segments in any encoding,
//! backslashes and NUL. Because this runs before the route lookup, `/open/../close/` can
//! never reach the protected route through the open one.

use percent_encoding::percent_decode;

#[derive(Debug, PartialEq, Eq)]
pub enum Unsafe {
    /// Not UTF-8 once decoded.
    Encoding,
    /// `.` or `..` segment, backslash or NUL.
    Traversal,
}

/// Decodes `raw` once and checks it. Returns the decoded path.
pub fn check(raw: &str) -> Result<std::borrow::Cow<'_, str>, Unsafe> {
    let decoded = percent_decode(raw.as_bytes())
        .decode_utf8()
        .map_err(|_| Unsafe::Encoding)?;
    if decoded.contains(['\\', '\0'])
        || decoded
            .split('/')
            .any(|segment| segment == "." || segment == "..")
    {
        return Err(Unsafe::Traversal);
    }
    Ok(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_in_every_encoding_is_refused() {
        for raw in [
            "/open/../close/",
            "/open/%2e%2e/close/",
            "/open/%2E%2E/close/",
            "/open/..%2fclose/",
            "/open/.%2e/x",
            "/open/..\\close",
            "/open/%5c..%5cclose",
            "/open/a%00.html",
            "/open/./index.html",
            "/..",
        ] {
            assert_eq!(check(raw).err(), Some(Unsafe::Traversal), "{raw}");
        }
        assert_eq!(check("/open/%ff").err(), Some(Unsafe::Encoding));
    }

    #[test]
    fn double_encoding_stays_a_literal_name() {
        // `%252e%252e` decodes once to the file name `%2e%2e`, never to `..`.
        assert_eq!(check("/open/%252e%252e/x").unwrap(), "/open/%2e%2e/x");
    }
}
