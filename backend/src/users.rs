//! The users file, and what a user name may be.
//!
//! The file holds one `name:argon2id-hash:role` per line, `#` comments. It is only the seed:
//! the first backend to reach an empty Redis copies it there (see [`crate::accounts`]), and
//! from then on users live in Redis and are managed through the API. Parsed and checked once
//! at start-up; a bad line stops the backend with the file and line number.

use std::path::Path;

use argon2::PasswordHash;

use crate::{error::UsersError, password::hash_password, role::Role};

/// One line of the users file.
#[derive(Debug, Clone)]
pub struct SeedUser {
    pub name: String,
    pub hash: String,
    pub role: Role,
}

pub struct Users {
    pub seed: Vec<SeedUser>,
}

/// The user `backend.admin_password_file` gives a password to.
pub const ADMIN: &str = "admin";

impl Users {
    pub fn load(path: &Path) -> Result<Self, UsersError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| UsersError(format!("{}: cannot read users file: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, UsersError> {
        let mut seed: Vec<SeedUser> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |msg: String| UsersError(format!("{origin}:{}: {msg}", index + 1));
            // An argon2id PHC string has no `:`, so the line splits cleanly in three.
            let mut fields = line.splitn(3, ':');
            let (Some(name), Some(hash), Some(role)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(at(
                    "expected `name:argon2id-hash:role` (role: admin, maintainer or viewer)".into(),
                ));
            };
            if !valid_name(name) {
                return Err(at(format!(
                    "user name {name:?} must be 1-64 characters of letters, digits, `.`, `_`, `-`, starting with a letter or digit"
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
            let role = Role::parse(role).ok_or_else(|| {
                at(format!(
                    "role of {name:?} is {role:?}; choose admin, maintainer or viewer"
                ))
            })?;
            if seed.iter().any(|u| u.name == name) {
                return Err(at(format!("user {name:?} is listed twice")));
            }
            seed.push(SeedUser {
                name: name.to_string(),
                hash: hash.to_string(),
                role,
            });
        }
        // The file seeds Redis once; without an admin, nobody could ever manage users.
        if !seed.is_empty() && !seed.iter().any(|u| u.role == Role::Admin) {
            return Err(UsersError(format!(
                "{origin}: no user has the admin role; at least one must, to manage the others"
            )));
        }
        Ok(Self { seed })
    }

    /// Makes `admin` an admin with `password`, replacing the file's entry if it has one: a
    /// deployment's first admin gets a password of its own instead of a well-known one.
    pub fn set_admin_password(&mut self, password: &str) -> Result<(), UsersError> {
        let admin = SeedUser {
            name: ADMIN.to_string(),
            hash: hash_password(password)?,
            role: Role::Admin,
        };
        self.seed.retain(|u| u.name != ADMIN);
        self.seed.push(admin);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seed.is_empty()
    }
}

/// A letter or digit first: `.` and `..` would be unreachable in a URL path (clients remove
/// dot segments), and so would the user.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::password::verify_password;

    #[test]
    fn parses_names_hashes_and_roles() {
        let hash = hash_password("s3cret").unwrap();
        let text = format!("# comment\r\n\r\nadmin:{hash}:admin\r\nvera:{hash}:viewer\n");
        let users = Users::parse(&text, "users").unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(users.seed[1].name, "vera");
        assert_eq!(users.seed[1].role, Role::Viewer);
        assert!(verify_password(&users.seed[0].hash, "s3cret"));
        assert!(!verify_password(&users.seed[0].hash, "wrong"));
        assert!(!verify_password("not a hash", "s3cret"));
    }

    #[test]
    fn the_admin_password_replaces_the_files_admin() {
        let hash = hash_password("s3cret").unwrap();
        let text = format!("admin:{hash}:viewer\nvera:{hash}:admin\n");
        let mut users = Users::parse(&text, "users").unwrap();
        users.set_admin_password("from the secret").unwrap();
        assert_eq!(users.len(), 2);
        let admin = users.seed.iter().find(|u| u.name == ADMIN).unwrap();
        assert_eq!(admin.role, Role::Admin);
        assert!(verify_password(&admin.hash, "from the secret"));
        assert!(!verify_password(&admin.hash, "s3cret"));
        let mut none = Users::parse("# nobody\n", "users").unwrap();
        none.set_admin_password("from the secret").unwrap();
        assert_eq!(none.seed[0].name, ADMIN);
    }

    #[test]
    fn a_file_without_an_admin_and_dot_names_are_refused() {
        let hash = hash_password("s3cret").unwrap();
        let err = Users::parse(&format!("vera:{hash}:viewer\n"), "u")
            .err()
            .unwrap();
        assert!(err.0.contains("no user has the admin role"), "{err}");
        assert!(!valid_name(".."));
        assert!(!valid_name(".hidden"));
        assert!(valid_name("a.b_c-1"));
    }

    #[test]
    fn bad_lines_name_the_line() {
        let err = Users::parse("# x\nadmin\n", "conf/users").err().unwrap();
        assert!(err.0.starts_with("conf/users:2:"), "{err}");
        let err = Users::parse("admin:$2y$05$abcdefghijklmnopqrstuv:admin", "u")
            .err()
            .unwrap();
        assert!(err.0.contains("u:1:"), "{err}");
        let md5 = "admin:$apr1$abc$def:admin";
        assert!(Users::parse(md5, "u").is_err());
        let h = hash_password("x").unwrap();
        let no_role = format!("a:{h}\n");
        assert!(
            Users::parse(&no_role, "u")
                .err()
                .unwrap()
                .0
                .contains("u:1: expected")
        );
        let bad_role = format!("a:{h}:root\n");
        let err = Users::parse(&bad_role, "u").err().unwrap();
        assert!(err.0.contains("u:1: role of \"a\" is \"root\""), "{err}");
        let twice = format!("a:{h}:admin\na:{h}:viewer\n");
        assert!(
            Users::parse(&twice, "u")
                .err()
                .unwrap()
                .0
                .contains("u:2: user \"a\" is listed twice")
        );
    }
}
