//! Per-client shares, like nginx's `limit_conn`: how many connections (`limits.max_connections_per_client`,
//! in [`crate::connection`]) and how many requests in flight to the backends
//! (`limits.max_upstream_requests_per_client`, HTTP/2 streams included, in [`crate::gateway`])
//! one client holds, so that one address cannot take what everyone shares.

use std::{net::IpAddr, sync::Arc};

use dashmap::{DashMap, mapref::entry::Entry};

use crate::access::rate_limit;

/// What each client holds, by its rate-limit key (IPv4 address, IPv6 /64).
#[derive(Default)]
pub struct ClientShares(DashMap<IpAddr, usize>);

/// One connection's or request's share, given back when dropped.
pub struct Share {
    shares: Arc<ClientShares>,
    client: IpAddr,
}

impl ClientShares {
    /// Counts one more for `client`, unless it already holds `cap`. Checked and counted under
    /// one shard lock, so a burst from one client cannot slip past the cap together.
    pub fn enter(self: &Arc<Self>, client: IpAddr, cap: usize) -> Option<Share> {
        let client = rate_limit::key(client.to_canonical());
        let mut count = self.0.entry(client).or_insert(0);
        if *count >= cap {
            return None;
        }
        *count += 1;
        drop(count);
        Some(Share {
            shares: self.clone(),
            client,
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        if let Entry::Occupied(mut count) = self.shares.0.entry(self.client) {
            if *count.get() <= 1 {
                count.remove();
            } else {
                *count.get_mut() -= 1;
            }
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
}
