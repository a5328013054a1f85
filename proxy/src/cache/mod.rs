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

/// What a request asks for: everything of it the backend gets that could change its answer.
/// Its scheme, host (lower case, with its port) and target (origin form), the request
/// headers in [`FORWARDED`] that the edge passes on, and the values of the headers the
/// response varies on (empty for the first lookup). The scheme is nginx's default key's
/// too: a backend told `X-Forwarded-Proto: http` may answer with links or a redirect no
/// HTTPS client should get.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    tls: bool,
    host: Box<str>,
    target: Box<[u8]>,
    forwarded: Box<[u8]>,
    variant: Box<[u8]>,
}

/// Request headers some frameworks read to build links and redirects, or to pick a method:
/// a client could otherwise have a response to its own stored for everyone. Part of the key
/// when present (a trusted proxy in front sets them on every request alike).
pub static FORWARDED: [HeaderName; 7] = [
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-http-method-override"),
];

impl Key {
    /// `host` as the backend gets it; `target` in origin form (`/path?query`).
    pub fn new(tls: bool, host: &str, target: &[u8], request: &HeaderMap) -> Self {
        Self {
            tls,
            host: host.to_ascii_lowercase().into(),
            target: target.into(),
            forwarded: header_values(&FORWARDED, request).into(),
            variant: Box::default(),
        }
    }

    /// The key of the variant of this response that `request` selects, in the `generation`
    /// of its `Vary` marker.
    fn variant(&self, vary: &VarySpec, request: &HeaderMap) -> Self {
        let mut variant = header_values(&vary.names, request);
        variant.extend_from_slice(&vary.generation.to_le_bytes());
        Self {
            variant: variant.into(),
            ..self.clone()
        }
    }

    fn primary(&self) -> Self {
        Self {
            variant: Box::default(),
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

    /// Whether the key is for `host` (with or without its port).
    fn for_host(&self, host: &str) -> bool {
        let ours = self
            .host
            .rsplit_once(':')
            .map_or(&*self.host, |(name, port)| {
                if port.contains(']') {
                    &*self.host
                } else {
                    name
                }
            });
        self.host.eq_ignore_ascii_case(host) || ours.eq_ignore_ascii_case(host)
    }
}

/// The values of `names` in `request`, each header's joined as sent and ended by a zero byte
/// (a missing header differs from an empty one).
fn header_values(names: &[HeaderName], request: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::new();
    if !names.iter().any(|name| request.contains_key(name)) {
        return out;
    }
    for name in names {
        for value in request.get_all(name) {
            out.extend_from_slice(value.as_bytes());
            out.push(b',');
        }
        out.push(0);
    }
    out
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
    Vary(Arc<VarySpec>),
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

/// The request headers a response varies on, and the generation its variants are keyed
/// in: a new one each time the marker is made, so that the variants of a marker that was
/// removed (invalidated, purged, evicted) are never found again.
struct VarySpec {
    names: Vec<HeaderName>,
    generation: u64,
}

static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Clone)]
struct Weight;

impl Weighter<Key, Stored> for Weight {
    fn weight(&self, key: &Key, stored: &Stored) -> u64 {
        let key_bytes = key.host.len() + key.target.len() + key.forwarded.len() + key.variant.len();
        let value = match stored {
            Stored::Vary(spec) => spec.names.iter().map(|n| n.as_str().len() as u64).sum(),
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
        OVERHEAD + key_bytes as u64 + value
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

/// Background refreshes (`stale-while-revalidate`) at once, over all keys: past it, a stale
/// response is served without one, and the next request tries again. Each holds a backend
/// slot that no client's share pays for.
const MAX_REFRESHES: usize = 16;

pub struct Store {
    responses: Cache<Key, Stored, Weight>,
    /// Keys being fetched, each with the signal its waiters watch.
    fills: Mutex<HashMap<Key, watch::Receiver<()>>>,
    pub refreshes: Arc<tokio::sync::Semaphore>,
    pub settings: CacheSettings,
}

impl Store {
    pub fn new(settings: CacheSettings) -> Self {
        // The item estimate only sizes the map up front: responses of a few kilobytes.
        let items = (settings.max_bytes / 4096).clamp(16, 1 << 20) as usize;
        // The memory is split into shards, and a response larger than its shard's part is
        // never kept: each holds at least four of the largest.
        let per_shard = settings.max_object_bytes.saturating_mul(4).max(1);
        let shards = (settings.max_bytes / per_shard).clamp(1, 16) as usize;
        let shards = 1 << shards.ilog2();
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(items)
            .weight_capacity(settings.max_bytes)
            .shards(shards)
            .build();
        let responses = match options {
            Ok(options) => {
                Cache::with_options(options, Weight, Default::default(), Default::default())
            }
            Err(_) => Cache::with_weighter(items, settings.max_bytes, Weight),
        };
        Self {
            responses,
            fills: Mutex::default(),
            refreshes: Arc::new(tokio::sync::Semaphore::new(MAX_REFRESHES)),
            settings,
        }
    }

    /// The response kept for `request` at `key`, following its `Vary`.
    pub fn lookup(&self, key: Key, request: &HeaderMap) -> Found {
        let mut key = key;
        let mut stored = self.responses.get(&key);
        if let Some(Stored::Vary(spec)) = &stored {
            key = key.variant(spec, request);
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
        let names = vary_names(&entry.headers);
        let primary = key.primary();
        if names.is_empty() {
            self.responses
                .insert(primary, Stored::Response(Arc::new(entry)));
            return;
        }
        // The variants kept beside this one stay, while the response varies as it did.
        let spec = match self.responses.get(&primary) {
            Some(Stored::Vary(spec)) if spec.names == names => spec,
            _ => {
                let generation = GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let spec = Arc::new(VarySpec { names, generation });
                self.responses
                    .insert(primary.clone(), Stored::Vary(spec.clone()));
                spec
            }
        };
        let variant = primary.variant(&spec, request);
        self.responses
            .insert(variant, Stored::Response(Arc::new(entry)));
    }

    /// Forgets what is kept for `key` and its variants: a request that may change the
    /// resource (`POST`, `PUT`, `DELETE`...) succeeded (RFC 9111 section 4.4).
    pub fn invalidate(&self, key: &Key) {
        self.responses.remove(&key.primary());
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
            let host_matches = host.is_none_or(|h| key.for_host(h));
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

/// Response headers not kept: the connection's (and those `Connection` names), the cache's
/// own, and the one a backend names its user with (the edge's business, per request).
pub fn kept_headers(status: StatusCode, mut headers: HeaderMap, body_len: usize) -> HeaderMap {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|token| HeaderName::from_bytes(token.trim_ascii()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
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
    // A 204 has no body and says no length (RFC 9110 8.6).
    if status == StatusCode::NO_CONTENT {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        headers.insert(header::CONTENT_LENGTH, http::HeaderValue::from(body_len));
    }
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
        let found = store.lookup(
            Key::new(false, "h", target.as_bytes(), &HeaderMap::new()),
            request,
        );
        found.entry.map(|e| e.body.clone())
    }

    #[test]
    fn variants_are_kept_apart() {
        let store = Store::new(CacheSettings::default());
        let mut en = HeaderMap::new();
        en.insert("accept-language", "en".parse().expect("value"));
        let mut fr = HeaderMap::new();
        fr.insert("accept-language", "fr".parse().expect("value"));
        let key = store
            .lookup(Key::new(false, "h", b"/a", &HeaderMap::new()), &en)
            .key;
        store.insert(key, &en, entry(Some("Accept-Language"), "en"));
        assert_eq!(body(&store, "/a", &en).as_deref(), Some(&b"en"[..]));
        assert_eq!(body(&store, "/a", &fr), None);
        let key = store
            .lookup(Key::new(false, "h", b"/a", &HeaderMap::new()), &fr)
            .key;
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
                Key::new(false, "h", target.as_bytes(), &HeaderMap::new()),
                &none,
                entry(None, "x"),
            );
        }
        store.insert(
            Key::new(true, "other", b"/p/b", &HeaderMap::new()),
            &none,
            entry(None, "x"),
        );
        assert_eq!(store.purge(None, Purge::Target(b"/p/a?x=1")), 1);
        assert_eq!(body(&store, "/p/a", &none).as_deref(), Some(&b"x"[..]));
        assert_eq!(store.purge(Some("H"), Purge::Prefix(b"/p/")), 2);
        assert_eq!(body(&store, "/q/a", &none).as_deref(), Some(&b"x"[..]));
        assert_eq!(store.entries(), 2);
    }

    #[test]
    fn one_fill_per_key() {
        let store = Store::new(CacheSettings::default());
        let key = Key::new(false, "h", b"/a", &HeaderMap::new());
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
