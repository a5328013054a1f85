//! The basic-auth brute-force guard: how many wrong passwords a client, and a user name, may
//! see checked in a window before further attempts are refused (429) without any hash.
//!
//! - An attempt is charged before its hash is checked, under the lock of its table entry held
//!   for the increment only, so parallel guesses cannot slip past the limit: at most
//!   `max_failures` attempts per window are ever checked, however many arrive at once. A
//!   success takes back its own charge, nothing more.
//! - Counted per client address (IPv6 by /64, as for rate limits), across all user names, and
//!   per user name across all addresses, with a higher ceiling
//!   (`auth_max_failures_per_user`). The name's ceiling does not apply to an address that has
//!   signed in as that user within [`KNOWN_FOR`]: guesses from elsewhere can hold back new
//!   addresses for a window, never a user's own.
//! - The table is one per process, shared by every route and kept across reloads. Its size is
//!   bounded (`auth_guard_max_keys`): expired entries go first, then those with the fewest
//!   failures, so a flood of new entries evicts its own kind and never wipes a full count.

use std::{
    hash::BuildHasher,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use dashmap::{DashMap, mapref::entry::Entry};
use prometheus::{IntCounterVec, IntGauge};

/// How long an address that signed in as a user stays exempt from that user's ceiling.
pub const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);

/// How often a signed-in address's entry is renewed.
const KNOWN_REFRESH: Duration = Duration::from_secs(3600);

/// New entries between two checks of the table's size.
const SIZE_CHECK_EVERY: usize = 256;

/// New entries between two sweeps of expired ones.
const EXPIRE_EVERY: usize = 4096;

/// The guard's limits, as configured; they may change at a reload, the counts stay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSpec {
    /// Failures per client address (all user names) in a window.
    pub max_failures: u32,
    /// Failures per user name (all addresses) in a window.
    pub max_failures_per_user: u32,
    pub window: Duration,
    /// Entries the table holds at most.
    pub max_keys: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    /// A keyed hash of the name: no client-chosen string is kept.
    User(u64),
    /// An address that signed in as the user.
    Known(u64, IpAddr),
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    count: u32,
    /// When the window began; for [`Key::Known`], when the sign-in was.
    since: Instant,
}

/// An attempt's charge, to be taken back if its password turns out right.
pub struct Charge {
    address: (IpAddr, Instant),
    /// `None` when the header named no user, or the address is known for the user.
    user: Option<(u64, Instant)>,
}

/// Why an attempt is refused, and for how long (whole seconds, rounded up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Address { retry_after: u64 },
    User { retry_after: u64 },
}

impl Refusal {
    pub fn retry_after(self) -> u64 {
        match self {
            Refusal::Address { retry_after } | Refusal::User { retry_after } => retry_after,
        }
    }
}

pub struct AuthGuard {
    slots: DashMap<Key, Slot>,
    names: std::hash::RandomState,
    inserted: AtomicUsize,
    sweeping: Mutex<()>,
    /// By event: `address` and `user` refusals, `evicted` entries.
    events: IntCounterVec,
    /// Entries held, kept as they come and go.
    keys: IntGauge,
}

impl AuthGuard {
    pub fn new(events: IntCounterVec, keys: IntGauge) -> Self {
        Self {
            slots: DashMap::new(),
            names: std::hash::RandomState::new(),
            inserted: AtomicUsize::new(0),
            sweeping: Mutex::new(()),
            events,
            keys,
        }
    }

    /// Entries tracked.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether an attempt would be refused now, without charging one: for requests whose
    /// credentials need no hash (none at all, or already verified).
    pub fn refusal(&self, spec: &GuardSpec, client: IpAddr, user: Option<&str>) -> Option<Refusal> {
        let now = Instant::now();
        let address = super::rate_limit::key(client);
        if let Some(left) = self.full(&Key::Address(address), spec.max_failures, spec.window, now) {
            return Some(self.refused(Refusal::Address { retry_after: left }));
        }
        let name = self.name(user?);
        if self.known(name, address, now) {
            return None;
        }
        self.full(
            &Key::User(name),
            spec.max_failures_per_user,
            spec.window,
            now,
        )
        .map(|left| self.refused(Refusal::User { retry_after: left }))
    }

    /// Charges an attempt before its password is checked, or refuses it.
    pub fn charge(
        &self,
        spec: &GuardSpec,
        client: IpAddr,
        user: Option<&str>,
    ) -> Result<Charge, Refusal> {
        let now = Instant::now();
        let address = super::rate_limit::key(client);
        let charged_address = self
            .take(spec, Key::Address(address), spec.max_failures, now)
            .map_err(|left| self.refused(Refusal::Address { retry_after: left }))?;
        let mut charge = Charge {
            address: (address, charged_address),
            user: None,
        };
        let Some(name) = user.map(|u| self.name(u)) else {
            return Ok(charge);
        };
        if self.known(name, address, now) {
            return Ok(charge);
        }
        match self.take(spec, Key::User(name), spec.max_failures_per_user, now) {
            Ok(since) => {
                charge.user = Some((name, since));
                Ok(charge)
            }
            Err(left) => {
                // Refused before any check: the address's charge goes back.
                self.give_back(Key::Address(address), charged_address);
                Err(self.refused(Refusal::User { retry_after: left }))
            }
        }
    }

    /// A right password: its own charge is taken back, and the address is remembered as one
    /// the user signs in from.
    pub fn succeeded(&self, charge: Charge, user: &str) {
        let (address, since) = charge.address;
        self.give_back(Key::Address(address), since);
        if let Some((name, since)) = charge.user {
            self.give_back(Key::User(name), since);
        }
        self.remember(self.name(user), address, Instant::now());
    }

    fn remember(&self, name: u64, address: IpAddr, now: Instant) {
        let known = Slot {
            count: 0,
            since: now,
        };
        if self
            .slots
            .insert(Key::Known(name, address), known)
            .is_none()
        {
            self.keys.inc();
        }
    }

    /// A right password answered without a hash (from the verification cache): the address
    /// is remembered as one the user signs in from, written only when new or an hour old, so
    /// that signed-in traffic reads the table and rarely writes it.
    pub fn signed_in(&self, client: IpAddr, user: &str) {
        let (name, address, now) = (
            self.name(user),
            super::rate_limit::key(client),
            Instant::now(),
        );
        let fresh = self
            .slots
            .get(&Key::Known(name, address))
            .is_some_and(|slot| now.saturating_duration_since(slot.since) < KNOWN_REFRESH);
        if !fresh {
            self.slots.insert(
                Key::Known(name, address),
                Slot {
                    count: 0,
                    since: now,
                },
            );
        }
    }

    fn name(&self, user: &str) -> u64 {
        self.names.hash_one(user)
    }

    fn refused(&self, refusal: Refusal) -> Refusal {
        let event = match refusal {
            Refusal::Address { .. } => "address",
            Refusal::User { .. } => "user",
        };
        self.events.with_label_values(&[event]).inc();
        refusal
    }

    fn known(&self, name: u64, address: IpAddr, now: Instant) -> bool {
        self.slots
            .get(&Key::Known(name, address))
            .is_some_and(|slot| now.saturating_duration_since(slot.since) < KNOWN_FOR)
    }

    /// Seconds left in the window if `key` has used up `limit`.
    fn full(&self, key: &Key, limit: u32, window: Duration, now: Instant) -> Option<u64> {
        let slot = *self.slots.get(key)?;
        let elapsed = now.saturating_duration_since(slot.since);
        (slot.count >= limit && elapsed < window).then(|| whole_seconds(window - elapsed))
    }

    /// One more attempt on `key`: the window it was charged in, or the seconds left if full.
    fn take(&self, spec: &GuardSpec, key: Key, limit: u32, now: Instant) -> Result<Instant, u64> {
        let fresh = Slot {
            count: 1,
            since: now,
        };
        let outcome = match self.slots.entry(key) {
            Entry::Vacant(vacant) => {
                vacant.insert(fresh);
                None
            }
            Entry::Occupied(mut occupied) => {
                let slot = occupied.get_mut();
                let elapsed = now.saturating_duration_since(slot.since);
                if elapsed >= spec.window {
                    *slot = fresh;
                    return Ok(now);
                }
                if slot.count >= limit {
                    return Err(whole_seconds(spec.window - elapsed));
                }
                slot.count += 1;
                Some(slot.since)
            }
        };
        match outcome {
            Some(since) => Ok(since),
            None => {
                self.keys.inc();
                let inserted = self.inserted.fetch_add(1, Ordering::Relaxed) + 1;
                // Expired entries are dropped now and then even below the limit, so the table
                // (and its gauge) shows the live ones.
                if inserted.is_multiple_of(EXPIRE_EVERY)
                    || (inserted.is_multiple_of(SIZE_CHECK_EVERY)
                        && self.slots.len() > spec.max_keys)
                {
                    self.keep_bounded(spec, now);
                }
                Ok(now)
            }
        }
    }

    /// Takes back one charge from `key`, if its window is still the one charged.
    fn give_back(&self, key: Key, since: Instant) {
        if let Some(mut slot) = self.slots.get_mut(&key)
            && slot.since == since
        {
            slot.count = slot.count.saturating_sub(1);
        }
    }

    /// Drops expired entries, then those with the fewest failures (the soonest ending first):
    /// forgetting them gives back the least. Addresses known for a user go last.
    fn keep_bounded(&self, spec: &GuardSpec, now: Instant) {
        let Ok(_sweeping) = self.sweeping.try_lock() else {
            return;
        };
        let ends = |key: &Key, slot: &Slot| {
            slot.since
                + match key {
                    Key::Known(..) => KNOWN_FOR,
                    Key::Address(_) | Key::User(_) => spec.window,
                }
        };
        let rank = |key: &Key, slot: &Slot| match key {
            Key::Known(..) => (u32::MAX, ends(key, slot)),
            Key::Address(_) | Key::User(_) => (slot.count, ends(key, slot)),
        };
        let before = self.slots.len();
        self.slots.retain(|key, slot| ends(key, slot) > now);
        let tracked = self.slots.len();
        if tracked > spec.max_keys {
            let keep = spec.max_keys - spec.max_keys / 10;
            let mut ranks: Vec<(u32, Instant)> = self
                .slots
                .iter()
                .map(|e| rank(e.key(), e.value()))
                .collect();
            let (_, threshold, _) = ranks.select_nth_unstable(tracked - keep - 1);
            let threshold = *threshold;
            self.slots.retain(|key, slot| rank(key, slot) > threshold);
            let evicted = tracked.saturating_sub(self.slots.len());
            self.events
                .with_label_values(&["evicted"])
                .inc_by(evicted as u64);
            tracing::warn!(
                evicted,
                max = spec.max_keys,
                "basic-auth guard full; the entries with the fewest failures were forgotten"
            );
        }
        if before > self.slots.len() {
            self.slots.shrink_to_fit();
        }
        self.keys.set(self.slots.len() as i64);
    }
}

/// Rounded up: a client that waits exactly this long must not be refused again.
fn whole_seconds(left: Duration) -> u64 {
    left.as_secs() + u64::from(left.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events() -> IntCounterVec {
        IntCounterVec::new(prometheus::Opts::new("t", "t"), &["event"]).unwrap()
    }

    fn spec(max_failures: u32, per_user: u32, max_keys: usize) -> GuardSpec {
        GuardSpec {
            max_failures,
            max_failures_per_user: per_user,
            window: Duration::from_secs(60),
            max_keys,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parallel_charges_never_pass_the_limit() {
        let guard = std::sync::Arc::new(AuthGuard::new(events(), IntGauge::new("k", "k").unwrap()));
        let spec = spec(10, 1000, 1000);
        let admitted: usize = (0..8)
            .map(|_| {
                let guard = guard.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .filter(|_| guard.charge(&spec, ip("192.0.2.1"), Some("u")).is_ok())
                        .count()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(admitted, 10);
    }

    #[test]
    fn a_success_takes_back_only_its_own_charge() {
        let guard = AuthGuard::new(events(), IntGauge::new("k", "k").unwrap());
        let spec = spec(3, 100, 1000);
        let client = ip("192.0.2.1");
        for _ in 0..2 {
            guard.charge(&spec, client, Some("u")).unwrap();
        }
        let right = guard.charge(&spec, client, Some("u")).unwrap();
        assert!(
            guard.charge(&spec, client, Some("u")).is_err(),
            "3 in flight"
        );
        guard.succeeded(right, "u");
        // Two failures remain: one more attempt, then refused.
        guard.charge(&spec, client, Some("u")).unwrap();
        assert!(matches!(
            guard.charge(&spec, client, Some("u")),
            Err(Refusal::Address { .. })
        ));
        assert!(guard.refusal(&spec, client, None).is_some());
        assert!(guard.refusal(&spec, ip("192.0.2.2"), Some("u")).is_none());
    }

    #[test]
    fn a_users_ceiling_spares_addresses_it_signed_in_from() {
        let guard = AuthGuard::new(events(), IntGauge::new("k", "k").unwrap());
        let spec = spec(2, 4, 1000);
        let home = ip("192.0.2.1");
        let right = guard.charge(&spec, home, Some("u")).unwrap();
        guard.succeeded(right, "u");
        for attacker in ["198.51.100.1", "198.51.100.2"] {
            for _ in 0..2 {
                guard.charge(&spec, ip(attacker), Some("u")).unwrap();
            }
            assert!(matches!(
                guard.charge(&spec, ip(attacker), Some("u")),
                Err(Refusal::Address { .. })
            ));
        }
        // Four failures on "u": new addresses are held back, for "u" only; home is not.
        let newcomer = ip("203.0.113.1");
        assert!(matches!(
            guard.charge(&spec, newcomer, Some("u")),
            Err(Refusal::User { .. })
        ));
        assert!(matches!(
            guard.refusal(&spec, newcomer, Some("u")),
            Some(Refusal::User { .. })
        ));
        assert!(guard.charge(&spec, newcomer, Some("other")).is_ok());
        assert!(guard.charge(&spec, home, Some("u")).is_ok());
        assert!(guard.refusal(&spec, home, Some("u")).is_none());
        // The refused attempt charged nothing to the newcomer's address: one more is left.
        assert!(guard.charge(&spec, newcomer, Some("other")).is_ok());
        assert!(guard.charge(&spec, newcomer, Some("other")).is_err());
    }

    #[test]
    fn a_flood_of_entries_stays_bounded_and_keeps_a_full_count() {
        let guard = AuthGuard::new(events(), IntGauge::new("k", "k").unwrap());
        let spec = spec(3, 1000, 2000);
        let attacker = ip("192.0.2.1");
        for _ in 0..3 {
            guard.charge(&spec, attacker, Some("admin")).unwrap();
        }
        for i in 0..20_000u32 {
            let _ = guard.charge(
                &spec,
                IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                Some(&format!("user{i}")),
            );
        }
        assert!(
            guard.len() <= 2000 + SIZE_CHECK_EVERY * 2,
            "{}",
            guard.len()
        );
        assert!(guard.events.with_label_values(&["evicted"]).get() > 0);
        assert!(
            guard.charge(&spec, attacker, Some("admin")).is_err(),
            "no fresh allowance after the flood"
        );
    }
}
