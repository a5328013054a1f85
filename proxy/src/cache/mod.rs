//! Backend responses kept in memory for the routes that ask for it (`[routes.cache]`), like
//! nginx's `proxy_cache` without the disk.
//!
//! - [`policy`]: whether a response may be kept, and how long it serves fresh and stale.
//! - [`Store`]: the responses, bounded in bytes (least recently used out first), keyed by
//!   host, path and query, and the request headers the response's `Vary` names; and the
//!   requests in flight to fill a key, so concurrent misses make one backend request.
//!
//! The gateway decides per request ([`crate::gateway`]): a fresh response is served (`HIT`);
//! a stale one within its `stale-while-revalidate` window is served while one background
//! request refreshes it (`STALE`); otherwise the request goes to the backends (`MISS`), and
//! when every backend fails a response within its `stale-if-error` window answers (`STALE`).

pub mod policy;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode, header};
use quick_cache::{Weighter, sync::Cache};
use tokio::sync::watch;

pub use policy::{Lifetimes, RoutePolicy};

/// `[cache]`: the memory for every route's kept responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    pub max_bytes: u64,
    /// A larger response is relayed, not kept.
    pub max_object_bytes: u64,
    /// How long a miss waits for the request already in flight for its key.
    pub lock_timeout: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
            max_object_bytes: 1 << 20,
            lock_timeout: Duration::from_secs(5),
        }
    }
}

/// What a request asks for: its scheme, host (lower case, without port) and target as sent,
/// and the values of the headers the response varies on (empty for the first lookup). The
/// scheme is nginx's default key's too: a backend told `X-Forwarded-Proto: http` may answer
/// with links or a redirect no HTTPS client should get.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    tls: bool,
    host: Box<str>,
    target: Box<[u8]>,
    variant: Box<[u8]>,
}

impl Key {
    pub fn new(tls: bool, host: &str, target: &[u8]) -> Self {
        Self {
            tls,
            host: host.into(),
            target: target.into(),
            variant: Box::default(),
        }
    }

    /// The key of the variant of this response that `request` selects: each header `vary`
    /// names, its values joined as sent (a missing header differs from an empty one).
    fn variant(&self, vary: &[HeaderName], request: &HeaderMap) -> Self {
        let mut variant = Vec::new();
        for name in vary {
            for value in request.get_all(name) {
                variant.extend_from_slice(value.as_bytes());
                variant.push(b',');
            }
            variant.push(0);
        }
        Self {
            variant: variant.into(),
            ..self.clone()
        }
    }

    /// The path, without the query.
    fn path(&self) -> &[u8] {
        let end = self
            .target
            .iter()
            .position(|b| *b == b'?')
            .unwrap_or(self.target.len());
        &self.target[..end]
    }
}

/// A kept response.
pub struct Entry {
    pub status: StatusCode,
    /// As the backend sent them, without hop-by-hop headers, with the body's length.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When the backend made it, by this process's clock.
    born: Instant,
    lifetimes: Lifetimes,
}

/// Where a kept response stands now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Expired, within its `stale-while-revalidate` window.
    Revalidate,
    /// Expired, within its `stale-if-error` window only.
    OnError,
    /// Of no more use.
    Gone,
}

impl Entry {
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes, lifetimes: Lifetimes) -> Self {
        let now = Instant::now();
        Self {
            status,
            headers,
            body,
            born: now.checked_sub(lifetimes.age).unwrap_or(now),
            lifetimes,
        }
    }

    /// Its `Age`: how long since the backend made it.
    pub fn age(&self) -> Duration {
        self.born.elapsed()
    }

    pub fn public(&self) -> bool {
        self.lifetimes.public
    }

    pub fn freshness(&self) -> Freshness {
        let age = self.age();
        let fresh = self.lifetimes.fresh;
        if age < fresh {
            Freshness::Fresh
        } else if age < fresh + self.lifetimes.stale_while_revalidate {
            Freshness::Revalidate
        } else if age < fresh + self.lifetimes.stale_if_error {
            Freshness::OnError
        } else {
            Freshness::Gone
        }
    }

    /// Whether it may answer when every backend fails.
    pub fn serves_on_error(&self) -> bool {
        self.age() < self.lifetimes.fresh + self.lifetimes.stale_if_error
    }
}

#[derive(Clone)]
enum Stored {
    /// The response varies on these request headers: its variants are kept under
    /// [`Key::variant`].
    Vary(Arc<[HeaderName]>),
    Response(Arc<Entry>),
    /// The last response for the key could not be kept: until this time, misses go to the
    /// backends side by side instead of queueing behind one another (Varnish's hit-for-miss).
    Pass(Instant),
}

/// How long a key whose response could not be kept skips the queue for misses.
const PASS_FOR: Duration = Duration::from_secs(10);

/// Memory a kept response costs beyond its body and header bytes: the map's slot, the key,
/// the entry.
const OVERHEAD: u64 = 256;

#[derive(Clone)]
struct Weight;

impl Weighter<Key, Stored> for Weight {
    fn weight(&self, key: &Key, stored: &Stored) -> u64 {
        let key_bytes = (key.host.len() + key.target.len() + key.variant.len()) as u64;
        let value = match stored {
            Stored::Vary(names) => names.iter().map(|n| n.as_str().len() as u64).sum(),
            Stored::Response(entry) => {
                let headers: usize = entry
                    .headers
                    .iter()
                    .map(|(n, v)| n.as_str().len() + v.len() + 32)
                    .sum();
                entry.body.len() as u64 + headers as u64
            }
            Stored::Pass(_) => 0,
        };
        OVERHEAD + key_bytes + value
    }
}

/// The result of a lookup.
pub struct Found {
    /// The key a response for this request is kept under (its variant, once known).
    pub key: Key,
    /// The response kept for it, unless of no more use.
    pub entry: Option<Arc<Entry>>,
    /// Misses of this key are not queued (see [`Stored::Pass`]).
    pub pass: bool,
}

/// Whose turn it is to fetch a key.
pub enum Turn<'a> {
    /// This request fetches it; the others wait until the guard is dropped.
    Lead(Filling<'a>),
    /// Another request is fetching it: ends when that one does.
    Wait(watch::Receiver<()>),
}

/// Held while a request fetches a key; dropping it lets the waiting requests look again.
pub struct Filling<'a> {
    store: &'a Store,
    key: Key,
    _done: watch::Sender<()>,
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        if let Ok(mut fills) = self.store.fills.lock() {
            fills.remove(&self.key);
        }
    }
}

pub struct Store {
    responses: Cache<Key, Stored, Weight>,
    /// Keys being fetched, each with the signal its waiters watch.
    fills: Mutex<HashMap<Key, watch::Receiver<()>>>,
    pub settings: CacheSettings,
}

impl Store {
    pub fn new(settings: CacheSettings) -> Self {
        // The item estimate only sizes the map up front: responses of a few kilobytes.
        let items = (settings.max_bytes / 4096).clamp(16, 1 << 20) as usize;
        Self {
            responses: Cache::with_weighter(items, settings.max_bytes, Weight),
            fills: Mutex::default(),
            settings,
        }
    }

    /// The response kept for `request` at `key`, following its `Vary`.
    pub fn lookup(&self, key: Key, request: &HeaderMap) -> Found {
        let mut key = key;
        let mut stored = self.responses.get(&key);
        if let Some(Stored::Vary(names)) = &stored {
            key = key.variant(names, request);
            stored = self.responses.get(&key);
        }
        match stored {
            Some(Stored::Response(entry)) if entry.freshness() != Freshness::Gone => Found {
                key,
                entry: Some(entry),
                pass: false,
            },
            Some(Stored::Pass(until)) if Instant::now() < until => Found {
                key,
                entry: None,
                pass: true,
            },
            _ => Found {
                key,
                entry: None,
                pass: false,
            },
        }
    }

    /// Keeps `entry` for requests like `request`, at `key` as [`Store::lookup`] gave it
    /// (its variant if a response varied before).
    pub fn insert(&self, key: Key, request: &HeaderMap, entry: Entry) {
        if entry.body.len() as u64 > self.settings.max_object_bytes {
            return;
        }
        let vary = vary_names(&entry.headers);
        let primary = Key {
            variant: Box::default(),
            ..key
        };
        if vary.is_empty() {
            self.responses
                .insert(primary, Stored::Response(Arc::new(entry)));
            return;
        }
        let variant = primary.variant(&vary, request);
        self.responses.insert(primary, Stored::Vary(vary.into()));
        self.responses
            .insert(variant, Stored::Response(Arc::new(entry)));
    }

    /// Notes that the response for `key` could not be kept (see [`Stored::Pass`]), unless
    /// one that can is there.
    pub fn pass(&self, key: Key) {
        if !matches!(self.responses.get(&key), Some(Stored::Response(_))) {
            self.responses
                .insert(key, Stored::Pass(Instant::now() + PASS_FOR));
        }
    }

    /// This request's turn to fetch `key`, or the signal that another's has ended.
    pub fn fill(&self, key: &Key) -> Option<Turn<'_>> {
        let mut fills = self.fills.lock().ok()?;
        if let Some(waiting) = fills.get(key) {
            return Some(Turn::Wait(waiting.clone()));
        }
        let (done, waiting) = watch::channel(());
        fills.insert(key.clone(), waiting);
        Some(Turn::Lead(Filling {
            store: self,
            key: key.clone(),
            _done: done,
        }))
    }

    /// Whether a request is fetching `key` now.
    pub fn filling(&self, key: &Key) -> bool {
        self.fills.lock().is_ok_and(|fills| fills.contains_key(key))
    }

    /// Removes every response whose path and query are `target`, or whose path starts with
    /// `prefix`, for `host` or for every host. Returns how many were removed.
    pub fn purge(&self, host: Option<&str>, target: Purge<'_>) -> usize {
        let purged = std::cell::Cell::new(0);
        self.responses.retain(|key, stored| {
            let host_matches = host.is_none_or(|h| h.eq_ignore_ascii_case(&key.host));
            let matches = host_matches
                && match target {
                    Purge::Target(target) => &*key.target == target,
                    Purge::Prefix(prefix) => key.path().starts_with(prefix),
                };
            if matches && matches!(stored, Stored::Response(_)) {
                purged.set(purged.get() + 1);
            }
            !matches
        });
        purged.get()
    }

    /// Bytes held, by the weights above.
    pub fn bytes(&self) -> u64 {
        self.responses.weight()
    }

    pub fn entries(&self) -> usize {
        self.responses.len()
    }
}

/// What to purge.
#[derive(Debug, Clone, Copy)]
pub enum Purge<'a> {
    /// One URL: path and query as requested.
    Target(&'a [u8]),
    /// Every path under a prefix.
    Prefix(&'a [u8]),
}

/// The request headers named in `Vary`, lower case, each once.
fn vary_names(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::VARY) {
        for field in value.as_bytes().split(|b| *b == b',') {
            if let Ok(name) = HeaderName::from_bytes(field.trim_ascii())
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
    }
    names
}

/// The `X-Cache` header of a cache route's responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Hit,
    Miss,
    Stale,
    /// Not looked up: a method or request the cache does not answer.
    Bypass,
}

impl Status {
    pub const ALL: [Status; 4] = [Status::Hit, Status::Miss, Status::Stale, Status::Bypass];

    pub fn header(self) -> http::HeaderValue {
        http::HeaderValue::from_static(match self {
            Status::Hit => "HIT",
            Status::Miss => "MISS",
            Status::Stale => "STALE",
            Status::Bypass => "BYPASS",
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            Status::Hit => "hit",
            Status::Miss => "miss",
            Status::Stale => "stale",
            Status::Bypass => "bypass",
        }
    }
}

/// Response headers not kept: the connection's, the cache's own, and the one a backend
/// names its user with (the edge's business, per request).
pub fn kept_headers(mut headers: HeaderMap, body_len: usize) -> HeaderMap {
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHENTICATE,
        header::AGE,
    ] {
        headers.remove(name);
    }
    for name in ["keep-alive", "x-cache", "x-gatehouse-user"] {
        headers.remove(name);
    }
    headers.insert(header::CONTENT_LENGTH, http::HeaderValue::from(body_len));
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(vary: Option<&str>, body: &'static str) -> Entry {
        let mut headers = HeaderMap::new();
        if let Some(vary) = vary {
            headers.insert(header::VARY, vary.parse().expect("vary"));
        }
        let lifetimes = Lifetimes {
            fresh: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            public: false,
            age: Duration::ZERO,
        };
        Entry::new(
            StatusCode::OK,
            headers,
            Bytes::from_static(body.as_bytes()),
            lifetimes,
        )
    }

    fn body(store: &Store, target: &str, request: &HeaderMap) -> Option<Bytes> {
        let found = store.lookup(Key::new(false, "h", target.as_bytes()), request);
        found.entry.map(|e| e.body.clone())
    }

    #[test]
    fn variants_are_kept_apart() {
        let store = Store::new(CacheSettings::default());
        let mut en = HeaderMap::new();
        en.insert("accept-language", "en".parse().expect("value"));
        let mut fr = HeaderMap::new();
        fr.insert("accept-language", "fr".parse().expect("value"));
        let key = store.lookup(Key::new(false, "h", b"/a"), &en).key;
        store.insert(key, &en, entry(Some("Accept-Language"), "en"));
        assert_eq!(body(&store, "/a", &en).as_deref(), Some(&b"en"[..]));
        assert_eq!(body(&store, "/a", &fr), None);
        let key = store.lookup(Key::new(false, "h", b"/a"), &fr).key;
        store.insert(key, &fr, entry(Some("accept-language"), "fr"));
        assert_eq!(body(&store, "/a", &fr).as_deref(), Some(&b"fr"[..]));
        assert_eq!(body(&store, "/a", &en).as_deref(), Some(&b"en"[..]));
        assert_eq!(body(&store, "/a", &HeaderMap::new()), None);
    }

    #[test]
    fn purge_by_target_and_prefix() {
        let store = Store::new(CacheSettings::default());
        let none = HeaderMap::new();
        for target in ["/p/a?x=1", "/p/a", "/p/b", "/q/a"] {
            store.insert(
                Key::new(false, "h", target.as_bytes()),
                &none,
                entry(None, "x"),
            );
        }
        store.insert(Key::new(true, "other", b"/p/b"), &none, entry(None, "x"));
        assert_eq!(store.purge(None, Purge::Target(b"/p/a?x=1")), 1);
        assert_eq!(body(&store, "/p/a", &none).as_deref(), Some(&b"x"[..]));
        assert_eq!(store.purge(Some("H"), Purge::Prefix(b"/p/")), 2);
        assert_eq!(body(&store, "/q/a", &none).as_deref(), Some(&b"x"[..]));
        assert_eq!(store.entries(), 2);
    }

    #[test]
    fn one_fill_per_key() {
        let store = Store::new(CacheSettings::default());
        let key = Key::new(false, "h", b"/a");
        let Some(Turn::Lead(lead)) = store.fill(&key) else {
            panic!("the first request leads");
        };
        let Some(Turn::Wait(mut waiting)) = store.fill(&key) else {
            panic!("the second waits");
        };
        drop(lead);
        // The leader gone, the waiter's signal ends, and the next request leads.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert!(runtime.block_on(waiting.changed()).is_err());
        assert!(matches!(store.fill(&key), Some(Turn::Lead(_))));
    }
}
