//! Per-client shares, like nginx's `limit_conn`: how many connections (`limits.max_connections_per_client`,
//! in [`crate::connection`]) and how many requests in flight to the backends
//! (`limits.max_upstream_requests_per_client`, HTTP/2 streams included, in [`crate::gateway`])
//! one client holds, so that one address cannot take what everyone shares.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use dashmap::DashMap;

use crate::access::client_ip;

/// What each client holds, by its rate-limit key (IPv4 address, IPv6 /64).
///
/// Every request of a client touches its entry twice, from whichever worker thread serves it,
/// so a count is an atomic changed under the map's shard *read* lock, which threads share:
/// a busy client (a load test from one address) costs no lock waits. The write lock is taken
/// only to add a client's entry and to remove it when its count falls to zero; holding the
/// read lock across each change means a removal never comes between a lookup and its
/// increment, so no share is counted on an entry already dropped.
#[derive(Default)]
pub struct ClientShares(DashMap<IpAddr, AtomicUsize>);

/// One connection's or request's share, given back when dropped.
pub struct Share {
    shares: Arc<ClientShares>,
    client: IpAddr,
}

impl ClientShares {
    /// A share for `client` if it holds fewer than `cap`.
    pub fn enter(self: &Arc<Self>, client: IpAddr, cap: usize) -> Option<Share> {
        let client = client_ip::key(client.to_canonical());
        let taken = match self.0.get(&client) {
            Some(count) => take(&count, cap),
            None => take(&self.0.entry(client).or_default().downgrade(), cap),
        };
        taken.then(|| Share {
            shares: self.clone(),
            client,
        })
    }
}

/// Counts one more share on `count` unless it is at `cap`.
fn take(count: &AtomicUsize, cap: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < cap).then_some(n + 1)
        })
        .is_ok()
}

impl Drop for Share {
    fn drop(&mut self) {
        let last = match self.shares.0.get(&self.client) {
            Some(count) => count.fetch_sub(1, Ordering::AcqRel) == 1,
            None => false,
        };
        if last {
            // Under the write lock: a share taken since (the count is no longer zero) keeps
            // the entry.
            self.shares
                .0
                .remove_if(&self.client, |_, count| count.load(Ordering::Acquire) == 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_share_and_gets_it_back() {
        let shares = Arc::new(ClientShares::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let held: Vec<Share> = (0..3).filter_map(|_| shares.enter(a, 3)).collect();
        assert_eq!(held.len(), 3);
        assert!(shares.enter(a, 3).is_none());
        // An IPv4-mapped IPv6 address is the same client.
        assert!(
            shares
                .enter("::ffff:192.0.2.1".parse().unwrap(), 3)
                .is_none()
        );
        assert!(shares.enter(b, 3).is_some());
        drop(held);
        assert!(shares.enter(a, 3).is_some());
        assert!(shares.0.is_empty(), "counts left behind");
    }

    /// Threads taking and giving back shares of one client at once (what every request of a
    /// load test from one address does): the cap holds at every moment, and every share
    /// comes back.
    #[test]
    fn shares_taken_at_once_from_many_threads_keep_the_cap() {
        let shares = Arc::new(ClientShares::default());
        let client: IpAddr = "192.0.2.7".parse().unwrap();
        let held = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (shares, held, most) = (shares.clone(), held.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(share) = shares.enter(client, 3) {
                            let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            held.fetch_sub(1, Ordering::SeqCst);
                            drop(share);
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert!(
            most.load(Ordering::SeqCst) <= 3,
            "more than the cap held at once"
        );
        assert!(shares.0.is_empty(), "counts left behind");
        let all: Vec<Share> = (0..3).filter_map(|_| shares.enter(client, 3)).collect();
        assert_eq!(all.len(), 3, "a share was lost");
    }
}
