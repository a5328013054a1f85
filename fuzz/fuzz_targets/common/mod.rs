//! What the token targets share: the secret they verify with, and the rule every token that
//! passes must meet.

use gatehouse_backend::token::{self, Claims, LEEWAY_SECONDS, Tokens};

pub const SECRET: &[u8] = b"fuzzing secret, 32 bytes or more";

pub fn tokens() -> Tokens {
    let Ok(tokens) = Tokens::new(SECRET, 3600) else {
        panic!("the secret is long enough");
    };
    tokens
}

/// A token that passed is within its validity window, leeway included.
pub fn assert_in_window(claims: &Claims) {
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
