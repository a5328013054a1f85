//! Passwords: the length rule, argon2id hashing and checking, and the turns at it.
//!
//! argon2id takes about 19 MiB and tens of milliseconds of CPU by design, so a request never
//! runs it on the I/O threads: [`Hashing`] hands it to the blocking threads, a few at a time.

use std::{sync::Arc, time::Duration};

use argon2::{
    Argon2, PasswordHash, PasswordHasher, PasswordVerifier,
    password_hash::{SaltString, rand_core::OsRng},
};
use tokio::sync::Semaphore;

use crate::error::{ApiError, HashError};

pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_PASSWORD_CHARS: usize = 256;

/// Password hashes computed at once by one backend.
const HASHING_AT_ONCE: usize = 2;
/// How long a login waits for its turn before it is told to come back.
const HASHING_WAIT: Duration = Duration::from_secs(2);

/// An argon2id PHC string with the crate's recommended parameters and a random salt. Slow on
/// purpose: call it off the async threads.
pub fn hash_password(password: &str) -> Result<String, HashError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(HashError)
}

/// Whether `password` matches the PHC string `hash`. Slow on purpose: call it off the async
/// threads.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A password a user may be given: counted in characters, not bytes.
pub fn check_length(password: &str) -> Result<(), ApiError> {
    let chars = password.chars().count();
    if (MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "password: must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
        )))
    }
}

/// Turns at argon2id: a flood of logins queues here, bounded, instead of piling up on the
/// blocking threads.
pub struct Hashing {
    turns: Arc<Semaphore>,
    /// Checked against when the user is unknown or disabled, so that costs the same time as a
    /// wrong password and does not reveal which names exist.
    decoy: String,
}

impl Hashing {
    /// Hashes the decoy password: call it before serving, not on a request.
    pub fn new() -> Result<Self, HashError> {
        Ok(Self {
            turns: Arc::new(Semaphore::new(HASHING_AT_ONCE)),
            decoy: hash_password("decoy password, never matches")?,
        })
    }

    /// Whether `password` matches `hash`; with no hash (no such user, or a disabled one),
    /// `false` at the same cost.
    pub async fn verify(&self, hash: Option<String>, password: String) -> Result<bool, ApiError> {
        let hash = hash.unwrap_or_else(|| self.decoy.clone());
        self.off_thread(move || verify_password(&hash, &password))
            .await
    }

    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        self.off_thread(move || hash_password(&password))
            .await?
            .map_err(|e| {
                tracing::error!(error = %e, "cannot hash a password");
                ApiError::internal("cannot hash the password")
            })
    }

    /// Runs password work on the blocking threads, at most [`HASHING_AT_ONCE`] at a time. A
    /// request that gives up while waiting for its turn costs nothing; one that waits too
    /// long gets `503` with `Retry-After`.
    async fn off_thread<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = tokio::time::timeout(HASHING_WAIT, self.turns.clone().acquire_owned())
            .await
            .map_err(|_| ApiError::busy())?
            .map_err(|_| ApiError::internal("cannot check the password"))?;
        tokio::task::spawn_blocking(move || {
            let _turn = permit;
            work()
        })
        .await
        .map_err(|_| ApiError::internal("cannot check the password"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_length_is_counted_in_characters() {
        assert!(check_length("1234567").is_err());
        assert!(check_length("12345678").is_ok());
        assert!(check_length(&"é".repeat(256)).is_ok());
        let error = check_length(&"x".repeat(257)).unwrap_err();
        assert!(error.message.starts_with("password:"), "{}", error.message);
    }
}
