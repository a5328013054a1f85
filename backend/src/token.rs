//! JSON Web Tokens: HS256 only, with `sub`, `role`, `iat`, `nbf`, `exp`, `jti` and `gen`, all
//! required.
//!
//! Algorithm confusion is closed by construction: the validation accepts exactly one
//! algorithm, and `alg: none` is not an algorithm the crate can even parse. The signature is
//! checked before any claim is read (`jsonwebtoken::decode` verifies first, then validates
//! `exp`/`nbf`, then deserializes), so a forged token's claims are never looked at.
//!
//! A valid signature is not the whole answer: the token may have been revoked, or its user
//! disabled. [`crate::accounts`] checks that in Redis on every request.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::{error::StartError, role::Role};

/// Shorter secrets make HS256 guessable; RFC 7518 asks for at least the hash size.
pub const MIN_SECRET_BYTES: usize = 32;

/// Seconds of clock difference between processes or replicas that `exp` and `nbf` forgive.
/// A revoked token stays on the denylist this much longer than its `exp`.
pub const LEEWAY_SECONDS: u64 = 5;

/// What a token says. Every field is required; typed, so `"exp": "123"` fails to decode.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(example = json!({
    "sub": "admin", "role": "admin", "iat": 1_790_000_000, "nbf": 1_790_000_000,
    "exp": 1_790_003_600, "jti": "9b0f3c56-6f0c-4a4b-9a8e-0c4c1b1f5a10",
    "gen": "5d1e2f7a-3b4c-4d5e-8f90-a1b2c3d4e5f6"
}))]
pub struct Claims {
    /// The user name.
    pub sub: String,
    /// The user's role when the token was issued. Changing it ends the user's tokens.
    pub role: Role,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Not valid before (Unix seconds).
    pub nbf: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// The token's id: what logout takes off its user's live tokens.
    pub jti: String,
    /// The generation of Redis's data it was issued in: after Redis loses its data, every
    /// earlier token is refused.
    #[serde(rename = "gen")]
    pub generation: String,
}

pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_seconds: u64,
}

impl Tokens {
    pub fn new(secret: &[u8], ttl_seconds: u64) -> Result<Self, StartError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(StartError::ShortSecret {
                bytes: secret.len(),
                min: MIN_SECRET_BYTES,
            });
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "iat", "nbf", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
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

    /// The claims of a new token for `subject`, not yet signed: the login records its `jti`
    /// in Redis, and stamps it with Redis's generation, before handing it out.
    pub fn claims(&self, subject: &str, role: Role) -> Claims {
        let now = now();
        Claims {
            sub: subject.to_string(),
            role,
            iat: now,
            nbf: now,
            exp: now + self.ttl_seconds,
            jti: uuid::Uuid::new_v4().to_string(),
            generation: String::new(),
        }
    }

    pub fn sign(&self, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|d| d.claims)
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::errors::ErrorKind;

    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trip_and_tampering() {
        let tokens = Tokens::new(SECRET, 60).unwrap();
        let token = tokens.sign(&tokens.claims("admin", Role::Admin)).unwrap();
        let claims = tokens.verify(&token).unwrap();
        assert_eq!((claims.sub.as_str(), claims.role), ("admin", Role::Admin));
        assert_eq!(claims.nbf, claims.iat);
        let other = Tokens::new(b"another secret that is long enough!!", 60).unwrap();
        assert!(other.verify(&token).is_err());
    }

    #[test]
    fn signature_is_checked_before_claims() {
        // Expired, role unknown and signed with another key: the answer must be about the
        // signature, proving that no claim was read first.
        let other = EncodingKey::from_secret(b"another secret that is long enough!!");
        let claims = serde_json::json!({
            "sub": "admin", "role": "root", "iat": 1, "nbf": 1, "exp": 2, "jti": "j", "gen": "g"
        });
        let forged = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &other);
        let error = Tokens::new(SECRET, 60)
            .unwrap()
            .verify(&forged.unwrap())
            .unwrap_err();
        assert_eq!(error.kind(), &ErrorKind::InvalidSignature);
    }

    #[test]
    fn short_secret_is_refused() {
        assert!(Tokens::new(b"short", 60).is_err());
    }
}
