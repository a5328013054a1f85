//! Request paths that may reach the file system.
//!
//! The raw path is percent-decoded exactly once. Anything that could climb out of a root or
//! mean something else to the file system is refused before routing: `.`/`..` segments in
//! any encoding, backslashes and NUL. Dotfiles are never served. Because this runs before the
//! route lookup, `/open/../close/` can never reach the protected route through the open one.

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

/// The file path below a route's directory for a decoded request path; `None` when a segment
/// is a dotfile. Empty segments are dropped, so `//etc/passwd` stays below the root.
pub fn relative(decoded: &str, prefix: &str) -> Option<String> {
    let rest = decoded.strip_prefix(prefix)?;
    let mut relative = String::with_capacity(rest.len() + 10);
    // Empty segments (doubled slashes) are dropped: `/open//a` is `/open/a`, one cache entry.
    for segment in rest.split('/').filter(|s| !s.is_empty()) {
        if segment.starts_with('.') {
            return None;
        }
        if !relative.is_empty() {
            relative.push('/');
        }
        relative.push_str(segment);
    }
    // A path that names a directory (`/open/`, `/open/docs/`) means its index page.
    if relative.is_empty() || rest.ends_with('/') {
        if !relative.is_empty() {
            relative.push('/');
        }
        relative.push_str("index.html");
    }
    Some(relative)
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

    #[test]
    fn relative_paths_and_dotfiles() {
        assert_eq!(relative("/open/", "/open/").unwrap(), "index.html");
        assert_eq!(relative("/open/a/b.css", "/open/").unwrap(), "a/b.css");
        assert_eq!(
            relative("/open/docs/", "/open/").unwrap(),
            "docs/index.html"
        );
        assert!(relative("/open/.env", "/open/").is_none());
        assert!(relative("/open/a/.git/config", "/open/").is_none());
        assert_eq!(
            relative("/open/docs//a.css", "/open/").unwrap(),
            "docs/a.css"
        );
        assert_eq!(
            relative("/open//etc/passwd", "/open/").unwrap(),
            "etc/passwd"
        );
        assert_eq!(
            relative("/open/docs//", "/open/").unwrap(),
            "docs/index.html"
        );
    }
}
