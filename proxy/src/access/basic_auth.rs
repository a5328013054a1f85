//! HTTP basic auth against an htpasswd file, as nginx's `auth_basic` does, made cheap enough
//! to sit in front of every request of a site.
//!
//! - Hash formats: bcrypt (`$2y$`, `$2b$`, `$2a$`), Apache MD5 (`$apr1$`), SHA-256/512 crypt
//!   (`$5$`, `$6$`) through `crypt3_rs`, and `{SHA}`. Checks are constant-time.
//! - A good verification is cached (bounded, expiring after [`CACHE_TTL`]), keyed by a SHA-256
//!   of the route's scope (realm and htpasswd file), user and password, so bcrypt's cost is
//!   paid once per credential, not per request, and no password is kept in memory. A reload
//!   keeps the cache of a scope it keeps (same realm, same file), so it costs no re-hashing.
//! - Every attempt whose hash must be checked is charged to the brute-force guard
//!   ([`super::auth_guard`]) first, its user name counted within the route's scope; past its
//!   limits, attempts are refused with 429 before any hash is computed. Parallel requests with
//!   the same credentials share one verification (and one charge); a route runs at most one
//!   verification per core at a time.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use quick_cache::sync::Cache;

use super::auth_guard::{AuthGuard, GuardSpec};
use sha1::Digest;
use subtle::ConstantTimeEq;

pub const CACHE_TTL: Duration = Duration::from_secs(300);
const CACHE_ENTRIES: usize = 4096;

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
    /// SHA-256 of the file's text: two routes share user names only when they share it.
    digest: [u8; 32],
    /// The file's slowest hash, checked for unknown names so that their timing matches the
    /// worst case and reveals nothing about which names exist.
    decoy: Option<Hash>,
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
        // bcrypt first (by cost), then the SHA-crypts, then the cheap formats.
        let cost = |hash: &Hash| match hash {
            Hash::Crypt(h) if h.starts_with("$2") => {
                1000 + h.get(4..6).and_then(|c| c.parse::<u32>().ok()).unwrap_or(0)
            }
            Hash::Crypt(h) if h.starts_with("$6$") || h.starts_with("$5$") => 100,
            Hash::Crypt(_) => 10,
            Hash::Sha1(_) => 1,
        };
        let decoy = users.values().max_by_key(|h| cost(h)).cloned();
        let digest = sha2::Sha256::digest(text.as_bytes()).into();
        Ok(Self {
            users,
            digest,
            decoy,
        })
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
                if let Some(decoy) = &self.decoy {
                    decoy.verify(password);
                }
                false
            }
        }
    }
}

/// Verified credentials, by the SHA-256 of scope, user and password: the user and when the
/// entry expires.
pub type Verified = Cache<[u8; 32], (String, Instant)>;

/// What every route's basic auth shares, kept from table to table across reloads: the
/// brute-force guard's counts and the verification caches.
pub struct Shared {
    pub guard: AuthGuard,
    verified: VerifiedCaches,
}

impl Shared {
    pub fn new(guard: AuthGuard) -> Self {
        Self {
            guard,
            verified: VerifiedCaches::default(),
        }
    }
}

/// The verification caches in use, by scope, so that a reload's new routes pick up the old
/// ones' (held weakly: a cache goes when the last route using it does).
#[derive(Default)]
struct VerifiedCaches(Mutex<HashMap<[u8; 32], Weak<Verified>>>);

impl VerifiedCaches {
    fn for_scope(&self, scope: [u8; 32]) -> Arc<Verified> {
        let mut caches = match self.0.lock() {
            Ok(caches) => caches,
            // Nothing half written matters here: at worst a cache is built anew.
            Err(poisoned) => poisoned.into_inner(),
        };
        caches.retain(|_, cache| cache.strong_count() > 0);
        if let Some(cache) = caches.get(&scope).and_then(Weak::upgrade) {
            return cache;
        }
        let cache = Arc::new(Cache::new(CACHE_ENTRIES));
        caches.insert(scope, Arc::downgrade(&cache));
        cache
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

pub struct BasicAuth {
    users: Arc<Htpasswd>,
    /// The realm and the htpasswd file: where a user name means the same user.
    scope: [u8; 32],
    challenge: String,
    verified: Arc<Verified>,
    /// Shared by every route and kept across reloads.
    shared: Arc<Shared>,
    spec: GuardSpec,
    /// Verifications running at once.
    verifying: tokio::sync::Semaphore,
}

impl BasicAuth {
    pub fn new(users: Arc<Htpasswd>, realm: &str, spec: GuardSpec, shared: Arc<Shared>) -> Self {
        let scope: [u8; 32] = {
            let mut hasher = sha2::Sha256::new();
            hasher.update(realm.as_bytes());
            hasher.update(b"\0");
            hasher.update(users.digest);
            hasher.finalize().into()
        };
        Self {
            scope,
            challenge: format!(
                "Basic realm=\"{}\", charset=\"UTF-8\"",
                realm.replace(['"', '\\'], "")
            ),
            users,
            verified: shared.verified.for_scope(scope),
            shared,
            spec,
            verifying: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
        }
    }

    /// The `WWW-Authenticate` value for a 401.
    pub fn challenge(&self) -> &str {
        &self.challenge
    }

    pub async fn check(&self, client: IpAddr, authorization: Option<&[u8]>) -> Outcome {
        let blocked = |lockout: super::auth_guard::Lockout| Outcome::Blocked {
            retry_after: lockout.retry_after(),
        };
        let Some(header) = authorization else {
            return self
                .shared
                .guard
                .lockout(&self.spec, &self.scope, client, None)
                .map_or(Outcome::Challenge, blocked);
        };
        let Some((user, password)) = decode(header) else {
            // Malformed credentials count as a failure of the address.
            return match self
                .shared
                .guard
                .charge(&self.spec, &self.scope, client, None)
            {
                Ok(charge) => {
                    charge.failed();
                    Outcome::Challenge
                }
                Err(lockout) => blocked(lockout),
            };
        };
        let key = self.cache_key(&user, &password);
        loop {
            // Single flight: requests carrying the same credentials in parallel (a browser's
            // connections, a load test) wait for one verification instead of each running it.
            let slot = match self.verified.get_value_or_guard_async(&key).await {
                Ok((cached_user, expires)) if Instant::now() < expires => {
                    // No hash to pay for, but while the guard refuses this client, a cached
                    // password must not answer guesses either.
                    return match self.shared.guard.lockout(
                        &self.spec,
                        &self.scope,
                        client,
                        Some(&user),
                    ) {
                        Some(lockout) => blocked(lockout),
                        None => {
                            self.shared.guard.signed_in(
                                &self.spec,
                                &self.scope,
                                client,
                                &cached_user,
                            );
                            Outcome::Allowed { user: cached_user }
                        }
                    };
                }
                Ok(_) => {
                    self.verified.remove(&key);
                    continue;
                }
                Err(slot) => slot,
            };
            // Charged before the hash is checked, so parallel guesses cannot outrun the count.
            // Should this request be dropped while it waits its turn, the charge goes back.
            let mut charge =
                match self
                    .shared
                    .guard
                    .charge(&self.spec, &self.scope, client, Some(&user))
                {
                    Ok(charge) => charge,
                    Err(lockout) => return blocked(lockout),
                };
            // Different credentials verify in parallel only up to the number of cores, so a
            // flood of guesses costs bounded CPU.
            let valid = match self.verifying.acquire().await {
                Ok(_permit) => {
                    // From here the hash is paid for whether the client waits or not: a
                    // client that hangs up now does not get its attempt back.
                    charge.hashing();
                    let (users, name, password) =
                        (self.users.clone(), user.clone(), password.clone());
                    tokio::task::spawn_blocking(move || users.verify(&name, &password))
                        .await
                        .unwrap_or(false)
                }
                Err(_) => false,
            };
            if !valid {
                charge.failed();
                return Outcome::Challenge;
            }
            let _ = slot.insert((user.clone(), Instant::now() + CACHE_TTL));
            charge.succeeded(&self.spec);
            return Outcome::Allowed { user };
        }
    }

    fn cache_key(&self, user: &str, password: &[u8]) -> [u8; 32] {
        let mut hasher = sha2::Sha256::new();
        for part in [&self.scope[..], b"\0", user.as_bytes(), b"\0", password] {
            hasher.update(part);
        }
        hasher.finalize().into()
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

    fn auth(max_failures: u32) -> BasicAuth {
        let users = Arc::new(Htpasswd::parse("u:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=").unwrap());
        let spec = GuardSpec {
            max_failures,
            max_failures_per_user: 100,
            window: Duration::from_secs(60),
            max_keys: 1000,
        };
        let events =
            prometheus::IntCounterVec::new(prometheus::Opts::new("t", "t"), &["event"]).unwrap();
        let keys = prometheus::IntGauge::new("k", "k").unwrap();
        BasicAuth::new(
            users,
            "r",
            spec,
            Arc::new(Shared::new(AuthGuard::new(events, keys))),
        )
    }

    #[tokio::test]
    async fn parallel_right_credentials_are_never_counted_as_failures() {
        let auth = Arc::new(auth(2));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let auth = auth.clone();
            tasks.spawn(async move {
                check(
                    &auth,
                    "192.0.2.9".parse().unwrap(),
                    &format!("Basic {}", STANDARD.encode("u:test")),
                )
                .await
            });
        }
        while let Some(outcome) = tasks.join_next().await {
            assert!(matches!(outcome.unwrap(), Outcome::Allowed { .. }));
        }
    }

    async fn check(auth: &BasicAuth, ip: IpAddr, header: &str) -> Outcome {
        auth.check(ip, Some(header.as_bytes())).await
    }

    #[tokio::test]
    async fn guard_blocks_after_repeated_failures_and_a_success_takes_back_only_itself() {
        let auth = auth(3);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let wrong = format!("Basic {}", STANDARD.encode("u:nope"));
        let right = format!("Basic {}", STANDARD.encode("u:test"));
        assert!(matches!(check(&auth, ip, &wrong).await, Outcome::Challenge));
        assert!(matches!(check(&auth, ip, &wrong).await, Outcome::Challenge));
        assert!(matches!(
            check(&auth, ip, &right).await,
            Outcome::Allowed { .. }
        ));
        // The two failures still count: one more, then refused.
        assert!(matches!(check(&auth, ip, &wrong).await, Outcome::Challenge));
        assert!(matches!(
            check(&auth, ip, &wrong).await,
            Outcome::Blocked { .. }
        ));
        // Refused, the right password included, though it is cached: no hash, no answer.
        assert!(
            matches!(check(&auth, ip, &right).await, Outcome::Blocked { retry_after } if retry_after <= 60)
        );
        assert!(matches!(
            auth.check(ip, None).await,
            Outcome::Blocked { .. }
        ));
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(matches!(
            auth.check(other, Some(right.as_bytes())).await,
            Outcome::Allowed { .. }
        ));
    }

    #[test]
    fn a_reload_keeps_the_cache_of_an_unchanged_scope() {
        let old = auth(3);
        let same = BasicAuth::new(old.users.clone(), "r", old.spec, old.shared.clone());
        assert!(Arc::ptr_eq(&old.verified, &same.verified));
        let realm = BasicAuth::new(old.users.clone(), "other", old.spec, old.shared.clone());
        assert!(!Arc::ptr_eq(&old.verified, &realm.verified));
        let users = Arc::new(Htpasswd::parse("v:{SHA}qUqP5cyxm6YcTAhz05Hph5gvu9M=").unwrap());
        let file = BasicAuth::new(users, "r", old.spec, old.shared.clone());
        assert!(!Arc::ptr_eq(&old.verified, &file.verified));
    }
}
