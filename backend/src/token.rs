//! JSON Web Tokens: HS256 only, `sub`, `iat`, `exp` and `jti` required.
//!
//! Algorithm confusion is closed by construction: the validation accepts exactly one
//! algorithm, and `alg: none` is not an algorithm the crate can even parse.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Shorter secrets make HS256 guessable; RFC 7518 asks for at least the hash size.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    /// Optional in tokens we accept, but typed, so a string `nbf` fails to decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    pub jti: String,
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_seconds: u64,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl_seconds: u64) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the JWT secret is {} bytes; at least {MIN_SECRET_BYTES} are required",
                secret.len()
            ));
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "iat", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 5;
        Ok(Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl_seconds,
        })
    }

    pub fn ttl_seconds(&self) -> u64 {
        self.ttl_seconds
    }

    pub fn issue(&self, subject: &str) -> Result<String, jsonwebtoken::errors::Error> {
        let now = now();
        let claims = Claims {
            sub: subject.to_string(),
            iat: now,
            exp: now + self.ttl_seconds,
            nbf: None,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|d| d.claims)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trip_and_tampering() {
        let tokens = Tokens::new(SECRET, 60).unwrap();
        let token = tokens.issue("admin").unwrap();
        assert_eq!(tokens.verify(&token).unwrap().sub, "admin");
        let other = Tokens::new(b"another secret that is long enough!!", 60).unwrap();
        assert!(other.verify(&token).is_err());
    }

    #[test]
    fn short_secret_is_refused() {
        assert!(Tokens::new(b"short", 60).is_err());
    }
}
