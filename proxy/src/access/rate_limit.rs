//! Per-client rate limits: a token bucket (GCRA, `governor`) per client address, with nginx
//! `limit_req` semantics: a steady rate, and a burst allowed on top of it.
//!
//! IPv6 clients are grouped by /64, since one host usually holds a whole /64 and could
//! otherwise rotate addresses to escape the limit. Memory stays bounded: every 1024 checks,
//! when more than `max_keys` clients are tracked, clients whose bucket has refilled are
//! forgotten; if a flood of fresh addresses still leaves too many, the table starts over.

use std::{
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use governor::{
    DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

/// One named policy, as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct RateSpec {
    pub name: String,
    /// Sustained requests per second per client.
    pub per_second: f64,
    /// Requests a client may make at once on top of the steady rate.
    pub burst: u32,
}

pub struct RateLimit {
    spec: RateSpec,
    quota: Quota,
    limiter: ArcSwap<DefaultKeyedRateLimiter<IpAddr>>,
    max_keys: usize,
    checks: AtomicU64,
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
    pub fn new(spec: RateSpec, max_keys: usize) -> Result<Self, String> {
        let burst = NonZeroU32::new(spec.burst).ok_or("burst must be at least 1")?;
        if !(spec.per_second > 0.0 && spec.per_second.is_finite()) {
            return Err("per_second must be greater than 0".into());
        }
        let period = Duration::try_from_secs_f64(1.0 / spec.per_second)
            .map_err(|_| "per_second is too small")?;
        let quota = Quota::with_period(period)
            .ok_or("per_second is too large")?
            .allow_burst(burst);
        Ok(Self {
            spec,
            quota,
            limiter: ArcSwap::from_pointee(RateLimiter::keyed(quota)),
            max_keys,
            checks: AtomicU64::new(0),
            clock: DefaultClock::default(),
        })
    }

    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    pub fn spec(&self) -> &RateSpec {
        &self.spec
    }

    pub fn check(&self, ip: IpAddr) -> Verdict {
        if self.checks.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            self.keep_bounded();
        }
        match self.limiter.load().check_key(&key(ip)) {
            Ok(()) => Verdict::Allowed,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                // Whole seconds, rounded up: coming back earlier would only be refused again.
                Verdict::Limited {
                    retry_after: wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                }
            }
        }
    }

    /// Clients currently tracked.
    pub fn len(&self) -> usize {
        self.limiter.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn keep_bounded(&self) {
        let limiter = self.limiter.load();
        if limiter.len() <= self.max_keys {
            return;
        }
        limiter.retain_recent();
        limiter.shrink_to_fit();
        if limiter.len() > self.max_keys {
            tracing::warn!(
                policy = %self.spec.name, tracked = limiter.len(), max = self.max_keys,
                "too many clients to track; rate limit state reset"
            );
            self.limiter.store(Arc::new(RateLimiter::keyed(self.quota)));
        }
    }
}

/// The bucket a client counts against: its IPv4 address, or its IPv6 /64.
pub fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
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
        assert!(limit.len() <= 500 + 1024, "tracked {}", limit.len());
        assert!(
            RateLimit::new(
                RateSpec {
                    name: "x".into(),
                    per_second: 0.0,
                    burst: 1
                },
                1
            )
            .is_err()
        );
    }
}
