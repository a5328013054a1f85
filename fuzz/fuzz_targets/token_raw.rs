//! A bearer token as a client sends it, verified with a fixed secret. Checked: no panic, and
//! whatever passes is within its validity window (a forged signature never passes, so the
//! corpus's real tokens are what reach the claims).
#![no_main]

use gatehouse_backend::token::{self, LEEWAY_SECONDS, Tokens};
use libfuzzer_sys::fuzz_target;

pub const SECRET: &[u8] = b"fuzzing secret, 32 bytes or more";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(tokens) = Tokens::new(SECRET, 3600) else {
        panic!("the secret is long enough");
    };
    if let Ok(claims) = tokens.verify(text) {
        let now = token::now();
        // One second of slack: the clock may tick between the check and here.
        assert!(
            claims.exp + LEEWAY_SECONDS + 1 >= now,
            "expired: {claims:?}"
        );
        assert!(
            claims.nbf <= now + LEEWAY_SECONDS + 1,
            "not yet valid: {claims:?}"
        );
    }
});
