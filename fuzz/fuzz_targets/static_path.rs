//! The static-file path guard: whatever the request path, what it lets through names a file
//! below the route's directory, never a dotfile, never through `.`, `..`, `\` or NUL.
#![no_main]

use std::path::{Component, Path};

use gatehouse_proxy::{path, statics};
use libfuzzer_sys::fuzz_target;

const PREFIXES: [&str; 3] = ["/", "/open/", "/docs/v1/"];

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(decoded) = path::check(raw) else {
        return;
    };
    assert!(!decoded.contains(['\\', '\0']), "{raw:?} -> {decoded:?}");
    assert!(
        !decoded.split('/').any(|s| s == "." || s == ".."),
        "{raw:?} -> {decoded:?}"
    );
    for prefix in PREFIXES {
        let Some(relative) = statics::relative(&decoded, prefix) else {
            continue;
        };
        assert!(
            !relative.is_empty() && !relative.starts_with('/'),
            "{relative:?}"
        );
        assert!(!relative.ends_with('/'), "{relative:?}");
        for segment in relative.split('/') {
            assert!(
                !segment.is_empty() && !segment.starts_with('.'),
                "{raw:?} -> {relative:?}"
            );
        }
        let joined = Path::new("/srv/site").join(&relative);
        assert!(joined.starts_with("/srv/site"), "{raw:?} -> {joined:?}");
        assert!(
            Path::new(&relative)
                .components()
                .all(|c| matches!(c, Component::Normal(_))),
            "{raw:?} -> {relative:?}"
        );
    }
});
