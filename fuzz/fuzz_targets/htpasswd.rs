//! The htpasswd parser, on whatever an operator's file may hold. Checked: no panic, and a
//! file it accepts lists no more users than it has lines.
#![no_main]

use gatehouse_proxy::access::basic_auth::Htpasswd;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Htpasswd::parse(text) {
        Ok(users) => assert!(users.len() <= text.lines().count()),
        Err((line, message)) => {
            assert!(line >= 1 && line <= text.lines().count(), "line {line}");
            assert!(!message.is_empty());
        }
    }
});
