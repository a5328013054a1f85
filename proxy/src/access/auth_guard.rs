//! The basic-auth brute-force guard: how many wrong passwords a client, and a user name, may
//! see checked in a window before further attempts are refused (429) without any hash.
//!
//! - An attempt is charged before its hash is checked, under the lock of its table entry held
//!   for the increment only, so parallel guesses cannot slip past the limit: at most
//!   `max_failures` attempts per window are ever checked, however many arrive at once. A
//!   success takes back its own charge, nothing more; so does an attempt abandoned (the client
//!   went away) while it waited for its turn to be hashed, since it cost and learned nothing.
//! - Counted per client address (IPv6 by /64, as for rate limits), across all user names and
//!   routes, and per user name across all addresses, with a higher ceiling
//!   (`auth_max_failures_per_user`). A user name is counted per *scope*: the realm and the
//!   htpasswd file it is checked against, so `admin` on one route is not `admin` on another.
//!   The name's ceiling does not apply to an address that has signed in as that user (in that
//!   scope) within [`KNOWN_FOR`]: guesses from elsewhere can hold back new addresses for a
//!   window, never a user's own.
//! - Failure counts and signed-in addresses live in two tables, each bounded by
//!   `auth_guard_max_keys`. A user keeps at most [`KNOWN_PER_USER`] addresses (the least
//!   recently signed-in one makes way), so one valid password used from ever new addresses
//!   churns its own few slots and never grows the tables nor touches a failure count.
//! - The tables are one per process, shared by every route and kept across reloads. Past
//!   their size, expired entries go first; then counts with the fewest failures (the soonest
//!   ending first), and users whose latest sign-in is oldest, down to 90%: a flood of new
//!   entries evicts its own kind and never wipes a full count.

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

/// Addresses remembered per user: a few homes (office, phone, laptop), not a history.
pub const KNOWN_PER_USER: usize = 4;

/// How often a signed-in address's entry is renewed.
const KNOWN_REFRESH: Duration = Duration::from_secs(3600);

/// New entries between two checks of the tables' size.
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
    /// Entries each table holds at most.
    pub max_keys: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    /// A keyed hash of the scope and the name: no client-chosen string is kept.
    User(u64),
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    count: u32,
    /// When the window began.
    since: Instant,
}

/// The addresses a user signed in from, and when; empty places are `None`.
type KnownAddresses = [Option<(IpAddr, Instant)>; KNOWN_PER_USER];

/// An attempt's charge. Taken back if its password turns out right, or if the attempt is
/// dropped before its hash is checked ([`Charge::hashing`]) or its verdict is given.
pub struct Charge<'a> {
    guard: &'a AuthGuard,
    address: (IpAddr, Instant),
    /// The name's key, when the header named a user.
    name: Option<u64>,
    /// `None` when the header named no user, or the address is known for the user.
    user: Option<Instant>,
    settled: bool,
}

impl Charge<'_> {
    /// The hash is being checked: from now on the charge stands even if the attempt is
    /// dropped, since its cost is paid (else hanging up would buy unlimited hashes).
    pub fn hashing(&mut self) {
        self.settled = true;
    }

    /// A wrong password: the charge stands.
    pub fn failed(mut self) {
        self.settled = true;
    }

    /// A right password: the charge is taken back, and the address is remembered as one
    /// the user signs in from.
    pub fn succeeded(mut self, spec: &GuardSpec) {
        self.settled = true;
        self.give_back();
        if let Some(name) = self.name {
            self.guard
                .remember(spec, name, self.address.0, Instant::now());
        }
    }

    fn give_back(&self) {
        let (address, since) = self.address;
        self.guard.give_back(Key::Address(address), since);
        if let (Some(name), Some(since)) = (self.name, self.user) {
            self.guard.give_back(Key::User(name), since);
        }
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.give_back();
        }
    }
}

/// An address or a user name locked out after too many failures, and for how long (whole
/// seconds, rounded up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lockout {
    Address { retry_after: u64 },
    User { retry_after: u64 },
}

impl Lockout {
    pub fn retry_after(self) -> u64 {
        match self {
            Lockout::Address { retry_after } | Lockout::User { retry_after } => retry_after,
        }
    }
}

pub struct AuthGuard {
    /// Failure counts, by address and by (scope, user name).
    slots: DashMap<Key, Slot>,
    /// Addresses each (scope, user name) signed in from.
    known: DashMap<u64, KnownAddresses>,
    names: std::hash::RandomState,
    /// New entries in either table, for the size checks.
    inserted: AtomicUsize,
    sweeping: Mutex<()>,
    /// By event: `address` and `user` refusals, `evicted` entries.
    events: IntCounterVec,
    /// Entries held (counts and signed-in addresses), kept as they come and go.
    keys: IntGauge,
}

impl AuthGuard {
    pub fn new(events: IntCounterVec, keys: IntGauge) -> Self {
        Self {
            slots: DashMap::new(),
            known: DashMap::new(),
            names: std::hash::RandomState::new(),
            inserted: AtomicUsize::new(0),
            sweeping: Mutex::new(()),
            events,
            keys,
        }
    }

    /// Failure counts tracked.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Users with remembered addresses.
    pub fn known_users(&self) -> usize {
        self.known.len()
    }

    /// Whether an attempt would be refused now, without charging one: for requests whose
    /// credentials need no hash (none at all, or already verified). `scope` names the realm
    /// and user list the name belongs to.
    pub fn lockout(
        &self,
        spec: &GuardSpec,
        scope: &[u8],
        client: IpAddr,
        user: Option<&str>,
    ) -> Option<Lockout> {
        let now = Instant::now();
        let address = super::client_ip::key(client);
        if let Some(left) = self.full(&Key::Address(address), spec.max_failures, spec.window, now) {
            return Some(self.refused(Lockout::Address { retry_after: left }));
        }
        let name = self.name(scope, user?);
        if self.known(name, address, now) {
            return None;
        }
        self.full(
            &Key::User(name),
            spec.max_failures_per_user,
            spec.window,
            now,
        )
        .map(|left| self.refused(Lockout::User { retry_after: left }))
    }

    /// Charges an attempt before its password is checked, or refuses it.
    pub fn charge(
        &self,
        spec: &GuardSpec,
        scope: &[u8],
        client: IpAddr,
        user: Option<&str>,
    ) -> Result<Charge<'_>, Lockout> {
        let now = Instant::now();
        let address = super::client_ip::key(client);
        let charged_address = self
            .take(spec, Key::Address(address), spec.max_failures, now)
            .map_err(|left| self.refused(Lockout::Address { retry_after: left }))?;
        let mut charge = Charge {
            guard: self,
            address: (address, charged_address),
            name: None,
            user: None,
            settled: false,
        };
        let Some(name) = user.map(|u| self.name(scope, u)) else {
            return Ok(charge);
        };
        charge.name = Some(name);
        if self.known(name, address, now) {
            return Ok(charge);
        }
        match self.take(spec, Key::User(name), spec.max_failures_per_user, now) {
            Ok(since) => {
                charge.user = Some(since);
                Ok(charge)
            }
            // Refused before any check: dropping the charge gives the address's back.
            Err(left) => Err(self.refused(Lockout::User { retry_after: left })),
        }
    }

    /// A right password answered without a hash (from the verification cache): the address
    /// is remembered as one the user signs in from, written only when new or an hour old, so
    /// that signed-in traffic reads the table and rarely writes it.
    pub fn signed_in(&self, spec: &GuardSpec, scope: &[u8], client: IpAddr, user: &str) {
        let (name, address) = (self.name(scope, user), super::client_ip::key(client));
        self.remember(spec, name, address, Instant::now());
    }

    fn name(&self, scope: &[u8], user: &str) -> u64 {
        self.names.hash_one((scope, user))
    }

    fn refused(&self, lockout: Lockout) -> Lockout {
        let event = match lockout {
            Lockout::Address { .. } => "address",
            Lockout::User { .. } => "user",
        };
        self.events.with_label_values(&[event]).inc();
        lockout
    }

    fn known(&self, name: u64, address: IpAddr, now: Instant) -> bool {
        self.known.get(&name).is_some_and(|places| {
            places.iter().flatten().any(|(ip, since)| {
                *ip == address && now.saturating_duration_since(*since) < KNOWN_FOR
            })
        })
    }

    /// Records a sign-in: renews the address's place, or takes an empty, expired or the
    /// least recently signed-in one.
    fn remember(&self, spec: &GuardSpec, name: u64, address: IpAddr, now: Instant) {
        let fresh = self.known.get(&name).is_some_and(|places| {
            places.iter().flatten().any(|(ip, since)| {
                *ip == address && now.saturating_duration_since(*since) < KNOWN_REFRESH
            })
        });
        if fresh {
            return;
        }
        let new_user = match self.known.entry(name) {
            Entry::Vacant(vacant) => {
                let mut places = KnownAddresses::default();
                places[0] = Some((address, now));
                vacant.insert(places);
                self.keys.inc();
                true
            }
            Entry::Occupied(mut occupied) => {
                let places = occupied.get_mut();
                let index = places
                    .iter()
                    .position(|p| p.is_some_and(|(ip, _)| ip == address))
                    .or_else(|| places.iter().position(Option::is_none))
                    .unwrap_or_else(|| {
                        // Full: the least recently signed-in address makes way.
                        let mut oldest = 0;
                        for (i, place) in places.iter().enumerate() {
                            if let (Some((_, a)), Some((_, b))) = (place, places[oldest])
                                && *a < b
                            {
                                oldest = i;
                            }
                        }
                        oldest
                    });
                if places[index].is_none() {
                    self.keys.inc();
                }
                places[index] = Some((address, now));
                false
            }
        };
        if new_user {
            self.inserted_one(spec, now);
        }
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
        match self.slots.entry(key) {
            Entry::Vacant(vacant) => {
                vacant.insert(fresh);
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
                return Ok(slot.since);
            }
        }
        // Only a new entry gets here, its shard's lock released.
        self.keys.inc();
        self.inserted_one(spec, now);
        Ok(now)
    }

    /// Every new entry, of either table, passes here: now and then the tables are swept.
    fn inserted_one(&self, spec: &GuardSpec, now: Instant) {
        let inserted = self.inserted.fetch_add(1, Ordering::Relaxed) + 1;
        // Expired entries are dropped now and then even below the limit, so the tables (and
        // the gauge) show the live ones.
        if inserted.is_multiple_of(EXPIRE_EVERY)
            || (inserted.is_multiple_of(SIZE_CHECK_EVERY)
                && (self.slots.len() > spec.max_keys || self.known.len() > spec.max_keys))
        {
            self.keep_bounded(spec, now);
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

    /// Drops expired entries; then, from a table still above 90% of its size, the counts
    /// with the fewest failures (the soonest ending first), or the users whose latest
    /// sign-in is oldest: forgetting them gives back the least.
    fn keep_bounded(&self, spec: &GuardSpec, now: Instant) {
        let Some(_sweeping) = super::rate_limit::sweep_lock(&self.sweeping) else {
            return;
        };
        // 90%, so that a flood sweeps once per tenth of the table, not per entry.
        let keep = spec.max_keys - spec.max_keys / 10;
        let mut evicted = 0;

        // Comparing ages, never adding to an instant: no window can overflow.
        self.slots
            .retain(|_, slot| now.saturating_duration_since(slot.since) < spec.window);
        let tracked = self.slots.len();
        if tracked > keep {
            let rank = |slot: &Slot| (slot.count, slot.since);
            let mut ranks: Vec<(u32, Instant)> =
                self.slots.iter().map(|e| rank(e.value())).collect();
            // Only sweeps remove entries, so at least `tracked` were read; more may have come.
            let cut = ranks.len() - keep - 1;
            let (_, threshold, _) = ranks.select_nth_unstable(cut);
            let threshold = *threshold;
            self.slots.retain(|_, slot| rank(slot) > threshold);
            evicted += tracked.saturating_sub(self.slots.len());
        }

        self.known.retain(|_, places| {
            for place in places.iter_mut() {
                if place.is_some_and(|(_, since)| now.saturating_duration_since(since) >= KNOWN_FOR)
                {
                    *place = None;
                }
            }
            places.iter().any(Option::is_some)
        });
        let users = self.known.len();
        if users > keep {
            let latest =
                |places: &KnownAddresses| places.iter().flatten().map(|(_, since)| *since).max();
            let mut ranks: Vec<Option<Instant>> =
                self.known.iter().map(|e| latest(e.value())).collect();
            // Only sweeps remove entries, so at least `users` were read; more may have come.
            let cut = ranks.len() - keep - 1;
            let (_, threshold, _) = ranks.select_nth_unstable(cut);
            let threshold = *threshold;
            self.known.retain(|_, places| latest(places) > threshold);
            evicted += users.saturating_sub(self.known.len());
        }

        if evicted > 0 {
            self.events
                .with_label_values(&["evicted"])
                .inc_by(evicted as u64);
            tracing::warn!(
                evicted,
                max = spec.max_keys,
                "basic-auth guard full; the entries with the fewest failures were forgotten"
            );
        }
        // Rehashing costs a pass over the table under its locks: only worth it when most of
        // the room is empty.
        if self.slots.len() < self.slots.capacity() / 4 {
            self.slots.shrink_to_fit();
        }
        if self.known.len() < self.known.capacity() / 4 {
            self.known.shrink_to_fit();
        }
        let addresses: usize = self
            .known
            .iter()
            .map(|e| e.value().iter().flatten().count())
            .sum();
        self.keys.set((self.slots.len() + addresses) as i64);
    }
}

/// Rounded up: a client that waits exactly this long must not be refused again.
fn whole_seconds(left: Duration) -> u64 {
    left.as_secs()
        .saturating_add(u64::from(left.subsec_nanos() > 0))
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

    const S: &[u8] = b"realm";

    fn failed(charge: Result<Charge<'_>, Lockout>) -> Result<(), Lockout> {
        charge.map(Charge::failed)
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
                        .filter(|_| {
                            failed(guard.charge(&spec, S, ip("192.0.2.1"), Some("u"))).is_ok()
                        })
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
            guard.charge(&spec, S, client, Some("u")).unwrap().failed();
        }
        let right = guard.charge(&spec, S, client, Some("u")).unwrap();
        assert!(
            guard.charge(&spec, S, client, Some("u")).is_err(),
            "3 in flight"
        );
        right.succeeded(&spec);
        // Two failures remain: one more attempt, then refused.
        guard.charge(&spec, S, client, Some("u")).unwrap().failed();
        assert!(matches!(
            guard.charge(&spec, S, client, Some("u")),
            Err(Lockout::Address { .. })
        ));
        assert!(guard.lockout(&spec, S, client, None).is_some());
        assert!(
            guard
                .lockout(&spec, S, ip("192.0.2.2"), Some("u"))
                .is_none()
        );
    }

    #[test]
    fn a_users_ceiling_spares_addresses_it_signed_in_from() {
        let guard = AuthGuard::new(events(), IntGauge::new("k", "k").unwrap());
        let spec = spec(2, 4, 1000);
        let home = ip("192.0.2.1");
        let right = guard.charge(&spec, S, home, Some("u")).unwrap();
        right.succeeded(&spec);
        for attacker in ["198.51.100.1", "198.51.100.2"] {
            for _ in 0..2 {
                guard
                    .charge(&spec, S, ip(attacker), Some("u"))
                    .unwrap()
                    .failed();
            }
            assert!(matches!(
                guard.charge(&spec, S, ip(attacker), Some("u")),
                Err(Lockout::Address { .. })
            ));
        }
        // Four failures on "u": new addresses are held back, for "u" only; home is not.
        let newcomer = ip("203.0.113.1");
        assert!(matches!(
            guard.charge(&spec, S, newcomer, Some("u")),
            Err(Lockout::User { .. })
        ));
        assert!(matches!(
            guard.lockout(&spec, S, newcomer, Some("u")),
            Some(Lockout::User { .. })
        ));
        assert!(failed(guard.charge(&spec, S, newcomer, Some("other"))).is_ok());
        assert!(failed(guard.charge(&spec, S, home, Some("u"))).is_ok());
        assert!(guard.lockout(&spec, S, home, Some("u")).is_none());
        // The refused attempt charged nothing to the newcomer's address: one more is left.
        assert!(failed(guard.charge(&spec, S, newcomer, Some("other"))).is_ok());
        assert!(guard.charge(&spec, S, newcomer, Some("other")).is_err());
    }

    #[test]
    fn a_flood_of_entries_stays_bounded_and_keeps_a_full_count() {
        let guard = AuthGuard::new(events(), IntGauge::new("k", "k").unwrap());
        let spec = spec(3, 1000, 2000);
        let attacker = ip("192.0.2.1");
        for _ in 0..3 {
            guard
                .charge(&spec, S, attacker, Some("admin"))
                .unwrap()
                .failed();
        }
        for i in 0..20_000u32 {
            let _ = failed(guard.charge(
                &spec,
                S,
                IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
                Some(&format!("user{i}")),
            ));
        }
        assert!(
            guard.len() <= 2000 + SIZE_CHECK_EVERY * 2,
            "{}",
            guard.len()
        );
        assert!(guard.events.with_label_values(&["evicted"]).get() > 0);
        assert!(
            guard.charge(&spec, S, attacker, Some("admin")).is_err(),
            "no fresh allowance after the flood"
        );
    }

    fn v6(i: u32) -> IpAddr {
        // A new /64 each time.
        IpAddr::V6(std::net::Ipv6Addr::from(
            (0x2001_0db8_u128 << 96) | (u128::from(i) << 64),
        ))
    }

    #[test]
    fn a_flood_of_sign_ins_never_wipes_a_count() {
        let guard = AuthGuard::new(events(), IntGauge::new("k", "k").unwrap());
        let spec = spec(3, 5, 1000);
        let attacker = ip("192.0.2.1");
        for _ in 0..3 {
            guard
                .charge(&spec, S, attacker, Some("admin"))
                .unwrap()
                .failed();
        }
        for i in 0..2 {
            for _ in 0..3 {
                let _ =
                    failed(guard.charge(&spec, S, ip(&format!("198.51.100.{i}")), Some("root")));
            }
        }
        // Many valid users signing in.
        for i in 0..20_000 {
            guard.signed_in(&spec, S, ip("203.0.113.1"), &format!("user{i}"));
        }
        // One valid (cached) password, used from ever new /64s
        for i in 0..20_000 {
            guard.signed_in(&spec, S, v6(i), "u");
        }
        assert!(
            guard.known_users() <= 1000 + SIZE_CHECK_EVERY,
            "{}",
            guard.known_users()
        );
        assert!(guard.len() <= 1000, "{}", guard.len());
        assert!(guard.known(guard.name(S, "u"), v6(19_999), Instant::now()));
        assert!(
            !guard.known(guard.name(S, "u"), v6(0), Instant::now()),
            "a few per user"
        );
        assert!(
            matches!(
                guard.charge(&spec, S, attacker, Some("x")),
                Err(Lockout::Address { .. })
            ),
            "the address's full count survived"
        );
        assert!(
            matches!(
                guard.charge(&spec, S, ip("192.0.2.77"), Some("root")),
                Err(Lockout::User { .. })
            ),
            "the name's full count survived"
        );
    }

    #[test]
    fn one_name_in_two_scopes_is_two_users() {
        let guard = AuthGuard::new(events(), IntGauge::new("k", "k").unwrap());
        let spec = spec(2, 4, 1000);
        for i in 0..2 {
            for _ in 0..2 {
                guard
                    .charge(
                        &spec,
                        b"weak",
                        ip(&format!("198.51.100.{i}")),
                        Some("admin"),
                    )
                    .unwrap()
                    .failed();
            }
        }
        let newcomer = ip("203.0.113.1");
        assert!(matches!(
            guard.charge(&spec, b"weak", newcomer, Some("admin")),
            Err(Lockout::User { .. })
        ));
        assert!(failed(guard.charge(&spec, b"strong", newcomer, Some("admin"))).is_ok());
        // Signing in on one route does not make the address known on the other.
        let home = ip("192.0.2.1");
        guard.signed_in(&spec, b"weak", home, "admin");
        assert!(guard.lockout(&spec, b"weak", home, Some("admin")).is_none());
        for i in 0..4 {
            let _ = failed(guard.charge(
                &spec,
                b"strong",
                ip(&format!("198.51.100.{}", 10 + i)),
                Some("admin"),
            ));
        }
        assert!(matches!(
            guard.lockout(&spec, b"strong", home, Some("admin")),
            Some(Lockout::User { .. })
        ));
    }

    #[test]
    fn an_abandoned_attempt_gives_its_charge_back() {
        let guard = AuthGuard::new(events(), IntGauge::new("k", "k").unwrap());
        let spec = spec(2, 100, 1000);
        let client = ip("192.0.2.1");
        for _ in 0..10 {
            drop(guard.charge(&spec, S, client, Some("u")).unwrap());
        }
        let mut hashed = guard.charge(&spec, S, client, Some("u")).unwrap();
        hashed.hashing();
        drop(hashed);
        guard.charge(&spec, S, client, Some("u")).unwrap().failed();
        assert!(guard.charge(&spec, S, client, Some("u")).is_err());
    }

    #[test]
    fn the_longest_window_does_not_overflow() {
        let guard = AuthGuard::new(events(), IntGauge::new("k", "k").unwrap());
        let mut spec = spec(1, 1, 100);
        spec.window = Duration::MAX;
        for i in 0..5_000u32 {
            let _ = failed(guard.charge(&spec, S, IpAddr::V4(std::net::Ipv4Addr::from(i)), None));
        }
        assert!(guard.len() <= 100 + SIZE_CHECK_EVERY, "{}", guard.len());
        assert!(
            guard
                .charge(&spec, S, IpAddr::V4(std::net::Ipv4Addr::from(4_999)), None)
                .is_err()
        );
    }

    #[test]
    fn the_gauge_counts_sign_ins() {
        let keys = IntGauge::new("k", "k").unwrap();
        let guard = AuthGuard::new(events(), keys.clone());
        let spec = spec(3, 5, 1000);
        guard.signed_in(&spec, S, ip("192.0.2.1"), "u");
        guard.signed_in(&spec, S, ip("192.0.2.1"), "u");
        guard.signed_in(&spec, S, ip("192.0.2.2"), "u");
        assert_eq!(keys.get(), 2);
    }
}
