//! Per-client rate limits: a token bucket (GCRA, `governor`) per client address, with nginx
//! `limit_req` semantics: a steady rate, and a burst allowed on top of it.
//!
//! IPv6 clients are grouped by /64, since one host usually holds a whole /64 and could
//! otherwise rotate addresses to escape the limit.
//!
//! Memory stays bounded without ever starting over: past `max_keys` clients, those whose
//! bucket has refilled are forgotten first (they are indistinguishable from new ones, so this
//! gives nothing away); if a flood of fresh addresses still leaves too many, the clients whose
//! buckets are nearest to full are forgotten next, so a forgotten client regains at most the
//! little it had spent, and a client that has spent its burst keeps its debt. (nginx's
//! `limit_req_zone` instead evicts least recently used entries when its zone is full.)

use std::{
    net::IpAddr,
    num::NonZeroU32,
    num::NonZeroU64,
    sync::{
        Arc, Mutex, MutexGuard, TryLockError,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use dashmap::{DashMap, mapref::entry::Entry};
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock},
    middleware::NoOpMiddleware,
    nanos::Nanos,
    state::{StateStore, keyed::ShrinkableKeyedStateStore},
};
use prometheus::IntCounter;

use crate::error::BuildError;

/// New clients between two checks of the table's size: bounds the overshoot past `max_keys`
/// without counting every request.
const SIZE_CHECK_EVERY: usize = 256;

/// One named policy, as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct RateSpec {
    pub name: String,
    /// Sustained requests per second per client.
    pub per_second: f64,
    /// Requests a client may make at once on top of the steady rate.
    pub burst: u32,
}

type Limiter =
    RateLimiter<IpAddr, Buckets, DefaultClock, NoOpMiddleware<<DefaultClock as Clock>::Instant>>;

pub struct RateLimit {
    spec: RateSpec,
    limiter: Limiter,
    buckets: Buckets,
    max_keys: usize,
    /// One sweep at a time; the others go on serving.
    sweeping: Mutex<()>,
    /// Clients forgotten while their bucket was not yet full.
    evicted: IntCounter,
    clock: DefaultClock,
}

pub enum Verdict {
    Allowed,
    /// Over the limit: the client may try again after this many seconds.
    Limited {
        retry_after: u64,
    },
}

impl RateLimit {
    pub fn new(spec: RateSpec, max_keys: usize, evicted: IntCounter) -> Result<Self, BuildError> {
        let burst =
            NonZeroU32::new(spec.burst).ok_or(BuildError::RateLimit("burst must be at least 1"))?;
        if !(spec.per_second > 0.0 && spec.per_second.is_finite()) {
            return Err(BuildError::RateLimit("per_second must be greater than 0"));
        }
        let period = Duration::try_from_secs_f64(1.0 / spec.per_second)
            .map_err(|_| BuildError::RateLimit("per_second is too small"))?;
        let quota = Quota::with_period(period)
            .ok_or(BuildError::RateLimit("per_second is too large"))?
            .allow_burst(burst);
        let buckets = Buckets::new(max_keys);
        let clock = DefaultClock::default();
        Ok(Self {
            spec,
            limiter: RateLimiter::new(quota, buckets.clone(), clock.clone()),
            buckets,
            max_keys,
            sweeping: Mutex::new(()),
            evicted,
            clock,
        })
    }

    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    pub fn spec(&self) -> &RateSpec {
        &self.spec
    }

    pub fn check(&self, ip: IpAddr) -> Verdict {
        let verdict = match self.limiter.check_key(&super::client_ip::key(ip)) {
            Ok(()) => Verdict::Allowed,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                // Whole seconds, rounded up: coming back earlier would only be refused again.
                Verdict::Limited {
                    retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                }
            }
        };
        if self.buckets.0.over.load(Ordering::Relaxed) {
            self.keep_bounded();
        }
        verdict
    }

    /// Clients currently tracked.
    pub fn len(&self) -> usize {
        self.buckets.0.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn keep_bounded(&self) {
        let Some(_sweeping) = sweep_lock(&self.sweeping) else {
            return;
        };
        let map = &self.buckets.0.map;
        self.buckets.0.over.store(false, Ordering::Relaxed);
        if map.len() <= self.max_keys {
            return;
        }
        self.limiter.retain_recent();
        let tracked = map.len();
        // Down to 90%, so that a flood sweeps once per tenth of the table, not per client.
        let keep = self.max_keys - self.max_keys / 10;
        if tracked > keep {
            let mut arrivals: Vec<u64> = map
                .iter()
                .map(|bucket| bucket.value().load(Ordering::Relaxed))
                .collect();
            let cut = tracked - keep;
            let (_, threshold, _) = arrivals.select_nth_unstable(cut - 1);
            let threshold = *threshold;
            map.retain(|_, bucket| bucket.load(Ordering::Relaxed) > threshold);
            let forgotten = tracked.saturating_sub(map.len());
            self.evicted.inc_by(forgotten as u64);
            tracing::warn!(
                policy = %self.spec.name, forgotten, max = self.max_keys,
                "too many clients to track; the nearest to a full bucket were forgotten"
            );
        }
        // Rehashing costs a pass over the table under its locks: only worth it when most of
        // the room is empty.
        if map.len() < map.capacity() / 4 {
            map.shrink_to_fit();
        }
    }
}

/// The buckets of one policy: each client's theoretical arrival time (GCRA), in nanoseconds
/// since the limiter started, 0 meaning a full bucket, as `governor`'s own stores keep it.
#[derive(Clone)]
struct Buckets(Arc<BucketTable>);

struct BucketTable {
    map: DashMap<IpAddr, AtomicU64>,
    max_keys: usize,
    inserted: AtomicUsize,
    /// Set when the table has grown past `max_keys`.
    over: AtomicBool,
}

impl Buckets {
    fn new(max_keys: usize) -> Self {
        Self(Arc::new(BucketTable {
            map: DashMap::new(),
            max_keys,
            inserted: AtomicUsize::new(0),
            over: AtomicBool::new(false),
        }))
    }
}

/// `governor`'s compare-and-swap update of one bucket.
fn measure_and_replace<T, E>(
    bucket: &AtomicU64,
    f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
) -> Result<T, E> {
    let mut previous = bucket.load(Ordering::Acquire);
    loop {
        let (result, next) = f(NonZeroU64::new(previous).map(|n| Nanos::from(n.get())))?;
        match bucket.compare_exchange_weak(
            previous,
            next.as_u64(),
            Ordering::Release,
            Ordering::Relaxed,
        ) {
            Ok(_) => return Ok(result),
            Err(current) => previous = current,
        }
    }
}

impl StateStore for Buckets {
    type Key = IpAddr;

    fn measure_and_replace<T, F, E>(&self, key: &IpAddr, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let table = &self.0;
        if let Some(bucket) = table.map.get(key) {
            return measure_and_replace(&bucket, f);
        }
        let result = match table.map.entry(*key) {
            Entry::Occupied(bucket) => measure_and_replace(bucket.get(), f),
            Entry::Vacant(vacant) => {
                let bucket = vacant.insert(AtomicU64::new(0));
                measure_and_replace(&bucket, f)
            }
        };
        if table.inserted.fetch_add(1, Ordering::Relaxed) % SIZE_CHECK_EVERY == SIZE_CHECK_EVERY - 1
            && table.map.len() > table.max_keys
        {
            table.over.store(true, Ordering::Relaxed);
        }
        result
    }
}

impl ShrinkableKeyedStateStore<IpAddr> for Buckets {
    fn retain_recent(&self, drop_below: Nanos) {
        self.0
            .map
            .retain(|_, bucket| bucket.load(Ordering::Relaxed) > drop_below.as_u64());
    }

    fn shrink_to_fit(&self) {
        self.0.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.map.len()
    }

    fn is_empty(&self) -> bool {
        self.0.map.is_empty()
    }
}

/// One sweep at a time; the others go on serving. A sweep that panicked left nothing half
/// done that matters (entries are only ever removed), so a poisoned lock is taken as usual.
/// (The basic-auth guard sweeps its tables the same way.)
pub(super) fn sweep_lock(lock: &Mutex<()>) -> Option<MutexGuard<'_, ()>> {
    match lock.try_lock() {
        Ok(held) => Some(held),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(per_second: f64, burst: u32, max_keys: usize) -> RateLimit {
        RateLimit::new(
            RateSpec {
                name: "t".into(),
                per_second,
                burst,
            },
            max_keys,
            IntCounter::new("t", "t").unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn burst_then_limited_with_retry_after() {
        let limit = limit(1.0, 3, 100);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert!(matches!(limit.check(ip), Verdict::Allowed));
        }
        match limit.check(ip) {
            Verdict::Limited { retry_after } => assert_eq!(retry_after, 1),
            Verdict::Allowed => panic!("the fourth request exceeds the burst"),
        }
        assert!(
            matches!(limit.check("192.0.2.2".parse().unwrap()), Verdict::Allowed),
            "per client"
        );
    }

    #[test]
    fn ipv6_is_grouped_by_64() {
        let limit = limit(1.0, 1, 100);
        assert!(matches!(
            limit.check("2001:db8::1".parse().unwrap()),
            Verdict::Allowed
        ));
        assert!(matches!(
            limit.check("2001:db8::ffff".parse().unwrap()),
            Verdict::Limited { .. }
        ));
        assert!(matches!(
            limit.check("2001:db8:0:1::1".parse().unwrap()),
            Verdict::Allowed
        ));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_addresses() {
        let limit = limit(1000.0, 10, 500);
        for i in 0..50_000u32 {
            limit.check(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
        }
        assert!(
            limit.len() <= 500 + SIZE_CHECK_EVERY,
            "tracked {}",
            limit.len()
        );
        assert!(
            RateLimit::new(
                RateSpec {
                    name: "x".into(),
                    per_second: 0.0,
                    burst: 1
                },
                1,
                IntCounter::new("x", "x").unwrap(),
            )
            .is_err()
        );
    }

    #[test]
    fn a_flood_of_new_addresses_gives_no_client_a_fresh_burst() {
        // Slow refill: every flooding address stays "busy" for far longer than the flood
        // takes, even on a loaded machine, so nothing is idle and the table must choose whom
        // to forget.
        let limit = limit(0.001, 3, 500);
        let heavy: IpAddr = "192.0.2.1".parse().unwrap();
        let light: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..3 {
            assert!(matches!(limit.check(heavy), Verdict::Allowed));
        }
        assert!(matches!(limit.check(heavy), Verdict::Limited { .. }));
        assert!(matches!(limit.check(light), Verdict::Allowed));
        for i in 0..20_000u32 {
            limit.check(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
        }
        assert!(limit.len() <= 500 + SIZE_CHECK_EVERY, "{}", limit.len());
        assert!(limit.evicted.get() > 0, "the flood was evicted");
        assert!(
            matches!(limit.check(heavy), Verdict::Limited { .. }),
            "a client that spent its burst is still limited after the flood"
        );
        assert!(matches!(limit.check(light), Verdict::Allowed));
    }
}
