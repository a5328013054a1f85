//! HTTP basic auth against an htpasswd file, as nginx's `auth_basic` does, made cheap enough
//! to sit in front of every request of a site.
//!
//! - Hash formats: bcrypt (`$2y$`, `$2b$`, `$2a$`), Apache MD5 (`$apr1$`), SHA-256/512 crypt
//!   (`$5$`, `$6$`) through `crypt3_rs`, and `{SHA}`. Checks are constant-time.
//! - A good verification is cached (bounded, expiring after [`CACHE_TTL`]), keyed by a SHA-256
//!   of realm, user and password, so bcrypt's cost is paid once per credential, not per
//!   request, and no password is kept in memory. A reload builds a new cache.
//! - Repeated failures from one client are refused with 429 before any hash is computed.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use quick_cache::sync::Cache;
use sha1::Digest;
use subtle::ConstantTimeEq;

pub const CACHE_TTL: Duration = Duration::from_secs(300);
const CACHE_ENTRIES: usize = 4096;
const GUARD_ENTRIES: usize = 65_536;

#[derive(Debug, Clone)]
enum Hash {
    /// `$2y$`, `$apr1$`, `$5$`, `$6$`: recognised by `crypt3_rs`.
    Crypt(String),
    /// `{SHA}`: base64 of the password's SHA-1.
    Sha1([u8; 20]),
}

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        if let Some(digest) = text.strip_prefix("{SHA}") {
            let bytes = STANDARD
                .decode(digest)
                .map_err(|_| "{SHA} hash is not base64".to_string())?;
            return <[u8; 20]>::try_from(bytes.as_slice())
                .map(Hash::Sha1)
                .map_err(|_| "{SHA} hash is not 20 bytes".into());
        }
        let known = ["$2y$", "$2b$", "$2a$", "$apr1$", "$5$", "$6$"];
        if !known.iter().any(|p| text.starts_with(p)) {
            return Err(
                "unsupported hash: use bcrypt, $apr1$, {SHA}, $5$ or $6$ (htpasswd -B)".into(),
            );
        }
        crypt3_rs::Hash::try_from(text).map_err(|e| format!("malformed hash: {e:?}"))?;
        Ok(Hash::Crypt(text.to_string()))
    }

    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Crypt(hash) => crypt3_rs::unix::verify(password, hash),
            Hash::Sha1(digest) => sha1::Sha1::digest(password)[..].ct_eq(&digest[..]).into(),
        }
    }
}

/// The users of an htpasswd file: `user:hash` per line, `#` comments, CRLF or LF.
#[derive(Debug, Clone)]
pub struct Htpasswd {
    users: HashMap<String, Hash>,
}

impl Htpasswd {
    /// Errors carry the 1-based line number.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut users = HashMap::new();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |message: String| (index + 1, message);
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| at("expected `user:hash`".into()))?;
            if user.is_empty() {
                return Err(at("empty user name".into()));
            }
            let hash = Hash::parse(hash).map_err(|e| at(format!("user {user:?}: {e}")))?;
            if users.insert(user.to_string(), hash).is_some() {
                return Err(at(format!("user {user:?} is listed twice")));
            }
        }
        Ok(Self { users })
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Slow by design for bcrypt: call it off the async threads.
    fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                // Spend the same effort on an unknown name, so timing does not reveal names.
                if let Some(any) = self.users.values().next() {
                    any.verify(password);
                }
                false
            }
        }
    }
}

/// What a request's credentials earned it.
pub enum Outcome {
    Allowed {
        user: String,
    },
    /// Missing or wrong credentials: 401 with the challenge.
    Challenge,
    /// Too many failures from this client: 429.
    Blocked {
        retry_after: u64,
    },
}

/// How many failures a client may have in a window before it is refused outright.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSpec {
    pub max_failures: u32,
    pub window: Duration,
}

pub struct BasicAuth {
    users: Arc<Htpasswd>,
    realm: String,
    challenge: String,
    verified: Cache<[u8; 32], (String, Instant)>,
    failures: Cache<IpAddr, (u32, Instant)>,
    guard: GuardSpec,
}

impl BasicAuth {
    pub fn new(users: Arc<Htpasswd>, realm: &str, guard: GuardSpec) -> Self {
        Self {
            users,
            realm: realm.to_string(),
            challenge: format!(
                "Basic realm=\"{}\", charset=\"UTF-8\"",
                realm.replace(['"', '\\'], "")
            ),
            verified: Cache::new(CACHE_ENTRIES),
            failures: Cache::new(GUARD_ENTRIES),
            guard,
        }
    }

    /// The `WWW-Authenticate` value for a 401.
    pub fn challenge(&self) -> &str {
        &self.challenge
    }

    pub async fn check(&self, client: IpAddr, authorization: Option<&[u8]>) -> Outcome {
        if let Some(retry_after) = self.blocked(client) {
            return Outcome::Blocked { retry_after };
        }
        let Some(header) = authorization else {
            return Outcome::Challenge;
        };
        let Some((user, password)) = decode(header) else {
            return self.failed(client);
        };
        let key = self.cache_key(&user, &password);
        if let Some((cached_user, expires)) = self.verified.get(&key)
            && Instant::now() < expires
        {
            return Outcome::Allowed { user: cached_user };
        }
        let users = self.users.clone();
        let name = user.clone();
        let valid = tokio::task::spawn_blocking(move || users.verify(&name, &password))
            .await
            .unwrap_or(false);
        if !valid {
            return self.failed(client);
        }
        self.verified
            .insert(key, (user.clone(), Instant::now() + CACHE_TTL));
        self.failures.remove(&client);
        Outcome::Allowed { user }
    }

    fn cache_key(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut hasher = sha2::Sha256::new();
        for part in [
            self.realm.as_bytes(),
            b"\0",
            user.as_bytes(),
            b"\0",
            password,
        ] {
            hasher.update(part);
        }
        hasher.finalize().into()
    }

    fn blocked(&self, client: IpAddr) -> Option<u64> {
        let (count, since) = self.failures.get(&client)?;
        let elapsed = since.elapsed();
        // Rounded up: a client that waits exactly this long must not be refused again.
        (count >= self.guard.max_failures && elapsed < self.guard.window).then(|| {
            let left = self.guard.window - elapsed;
            left.as_secs() + u64::from(left.subsec_nanos() > 0)
        })
    }

    fn failed(&self, client: IpAddr) -> Outcome {
        let now = Instant::now();
        let (count, since) = match self.failures.get(&client) {
            Some((count, since)) if since.elapsed() < self.guard.window => (count + 1, since),
            _ => (1, now),
        };
        self.failures.insert(client, (count, since));
        match self.blocked(client) {
            Some(retry_after) => Outcome::Blocked { retry_after },
            None => Outcome::Challenge,
        }
    }
}

/// `Basic base64(user:password)`; `None` for anything else.
fn decode(header: &[u8]) -> Option<(String, Vec<u8>)> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every format made by the real `htpasswd` tool is checked end to end in tests/access.rs.

    #[test]
    fn malformed_lines_name_the_line() {
        assert_eq!(Htpasswd::parse("# x\nnocolon\n").unwrap_err().0, 2);
        assert_eq!(Htpasswd::parse("a:plaintext\n").unwrap_err().0, 1);
        assert_eq!(Htpasswd::parse("a:{SHA}notbase64!\n").unwrap_err().0, 1);
        assert_eq!(
            Htpasswd::parse(
                "a:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\na:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\n"
            )
            .unwrap_err()
            .0,
            2
        );
    }

    #[test]
    fn sha1_and_header_decoding() {
        // {SHA} of "test".
        let users = Htpasswd::parse("u:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=\r\n").unwrap();
        assert!(users.verify("u", b"test"));
        assert!(!users.verify("u", b"wrong"));
        assert!(!users.verify("nobody", b"test"));
        assert_eq!(
            decode(b"Basic dTp0ZXN0"),
            Some(("u".into(), b"test".to_vec()))
        );
        assert_eq!(
            decode(b"basic  dTp0ZXN0 "),
            Some(("u".into(), b"test".to_vec()))
        );
        for bad in [
            &b"Basic"[..],
            b"Basic !!!",
            b"Bearer dTp0ZXN0",
            b"Basic dXNlcg==",
            b"",
        ] {
            assert!(decode(bad).is_none(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn guard_blocks_after_repeated_failures_and_success_resets() {
        let users = Arc::new(Htpasswd::parse("u:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=").unwrap());
        let auth = BasicAuth::new(
            users,
            "r",
            GuardSpec {
                max_failures: 3,
                window: Duration::from_secs(60),
            },
        );
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let wrong = format!("Basic {}", STANDARD.encode("u:nope"));
        let right = format!("Basic {}", STANDARD.encode("u:test"));
        assert!(matches!(
            auth.check(ip, Some(right.as_bytes())).await,
            Outcome::Allowed { .. }
        ));
        assert!(matches!(
            auth.check(ip, Some(wrong.as_bytes())).await,
            Outcome::Challenge
        ));
        assert!(matches!(
            auth.check(ip, Some(wrong.as_bytes())).await,
            Outcome::Challenge
        ));
        assert!(matches!(
            auth.check(ip, Some(wrong.as_bytes())).await,
            Outcome::Blocked { .. }
        ));
        assert!(
            matches!(auth.check(ip, Some(right.as_bytes())).await, Outcome::Blocked { retry_after } if retry_after <= 60)
        );
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(matches!(
            auth.check(other, Some(right.as_bytes())).await,
            Outcome::Allowed { .. }
        ));
    }
}
