//! A bearer token as a client sends it, verified with a fixed secret. Checked: no panic, and
//! whatever passes is within its validity window (a forged signature never passes, so the
//! corpus's real tokens are what reach the claims).
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(claims) = common::tokens().verify(text) {
        common::assert_in_window(&claims);
    }
});
