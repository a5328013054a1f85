//! What a user may do. Its own module because nearly every other one names it: the users
//! file, the tokens' claims, the route table's admin check, the API's bodies.

use serde::{Deserialize, Serialize};

/// Each role may do what the one below it may, and more: `viewer` reads, `maintainer` also
/// writes what is not user management (resetting the count), `admin` also manages users and
/// API keys and reads the audit log. Which role each endpoint needs is in
/// [`crate::routes::ROUTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Maintainer,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Maintainer, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Maintainer => "maintainer",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }

    /// Whether this role may do what `needed` may.
    pub fn at_least(self, needed: Role) -> bool {
        self.rank() >= needed.rank()
    }

    fn rank(self) -> u8 {
        match self {
            Role::Viewer => 0,
            Role::Maintainer => 1,
            Role::Admin => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip() {
        for role in [Role::Admin, Role::Maintainer, Role::Viewer] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.as_str()));
        }
        assert_eq!(Role::parse("Admin"), None);
    }

    #[test]
    fn each_role_may_do_what_the_ones_below_may() {
        use Role::*;
        assert!(Admin.at_least(Admin) && Admin.at_least(Maintainer) && Admin.at_least(Viewer));
        assert!(Maintainer.at_least(Viewer) && !Maintainer.at_least(Admin));
        assert!(Viewer.at_least(Viewer) && !Viewer.at_least(Maintainer));
    }
}
