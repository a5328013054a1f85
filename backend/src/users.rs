//! The users file: one `name:argon2id-hash` per line, `#` comments. Parsed and checked once at
//! start-up; a bad line stops the backend with the file and line number.

use std::{collections::HashMap, fmt, path::Path};

use argon2::{
    Argon2, PasswordHash, PasswordHasher, PasswordVerifier,
    password_hash::{SaltString, rand_core::OsRng},
};

pub struct Users {
    hashes: HashMap<String, String>,
    /// Checked against when the user is unknown, so a missing name costs the same time as a
    /// wrong password and does not reveal which names exist.
    decoy: String,
}

#[derive(Debug)]
pub struct UsersError(pub String);

impl fmt::Display for UsersError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsersError {}

impl Users {
    pub fn load(path: &Path) -> Result<Self, UsersError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| UsersError(format!("{}: cannot read users file: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, UsersError> {
        let mut hashes = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |msg: String| UsersError(format!("{origin}:{}: {msg}", index + 1));
            let (name, hash) = line
                .split_once(':')
                .ok_or_else(|| at("expected `name:argon2id-hash`".into()))?;
            if !valid_name(name) {
                return Err(at(format!(
                    "user name {name:?} must be 1-64 characters of letters, digits, `.`, `_`, `-`"
                )));
            }
            if !hash.starts_with("$argon2id$") {
                return Err(at(format!(
                    "password hash of {name:?} is not argon2id; make one with `gatehouse hash-password`"
                )));
            }
            PasswordHash::new(hash).map_err(|e| {
                at(format!(
                    "password hash of {name:?} is not a valid argon2id string: {e}"
                ))
            })?;
            if hashes.insert(name.to_string(), hash.to_string()).is_some() {
                return Err(at(format!("user {name:?} is listed twice")));
            }
        }
        Ok(Self {
            hashes,
            decoy: hash_password("decoy password, never matches")?,
        })
    }

    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Slow on purpose (argon2id): call it off the async threads.
    pub fn verify(&self, name: &str, password: &str) -> bool {
        let (hash, known) = match self.hashes.get(name) {
            Some(hash) => (hash.as_str(), true),
            None => (self.decoy.as_str(), false),
        };
        let Ok(parsed) = PasswordHash::new(hash) else {
            return false;
        };
        let matches = Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok();
        matches && known
    }
}

pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// An argon2id PHC string with the crate's recommended parameters and a random salt.
pub fn hash_password(password: &str) -> Result<String, UsersError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UsersError(format!("cannot hash password: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_the_right_password_only() {
        let text = format!(
            "# comment\r\n\r\nadmin:{}\r\n",
            hash_password("s3cret").unwrap()
        );
        let users = Users::parse(&text, "users").unwrap();
        assert_eq!(users.len(), 1);
        assert!(users.verify("admin", "s3cret"));
        assert!(!users.verify("admin", "wrong"));
        assert!(!users.verify("nobody", "s3cret"));
    }

    #[test]
    fn bad_lines_name_the_line() {
        let err = Users::parse("# x\nadmin\n", "conf/users").err().unwrap();
        assert!(err.0.starts_with("conf/users:2:"), "{err}");
        let err = Users::parse("admin:$2y$05$abcdefghijklmnopqrstuv", "u")
            .err()
            .unwrap();
        assert!(err.0.contains("u:1:"), "{err}");
        let md5 = "admin:$apr1$abc$def";
        assert!(Users::parse(md5, "u").is_err());
        let twice = format!("a:{h}\na:{h}\n", h = hash_password("x").unwrap());
        assert!(
            Users::parse(&twice, "u")
                .err()
                .unwrap()
                .0
                .contains("u:2: user \"a\" is listed twice")
        );
    }
}
