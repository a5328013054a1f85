//! Memory that a burst of connections freed, given back to the kernel.
//!
//! glibc keeps freed memory for reuse and hands pages back to the kernel only from the top of
//! a heap. The buffers of a burst of connections (a flood from many addresses, hundreds of
//! handshakes at once) are freed among longer-lived allocations, so after the burst the
//! proxy's RSS stays at its high-water mark, and each later burst leaves it a little higher
//! as the free space fragments: in the soak (`scripts/soak.py`), 500 connections at once left
//! the proxy 27 MB above the 9 MB it really used, and `malloc_trim` took it back down at once.
//! So every [`CHECK_EVERY`], when more than [`SLACK`] of the proxy's resident heap is free,
//! `malloc_trim(0)` returns the free pages. Pages are reused where they are, so this costs a
//! few page faults after a burst and nothing in a steady state (nothing is trimmed then).
//!
//! With `GATEHOUSE_ALLOCATOR=mimalloc` the proxy allocates with mimalloc instead (the binary's
//! `allocator.rs`, which then gives mimalloc's free pages back); the trim runs only on glibc.

use std::time::Duration;

use async_trait::async_trait;
use pingora::{server::ShutdownWatch, services::background::BackgroundService};

/// How often the heap is looked at: well within the time a burst's memory would be noticed,
/// and rare enough to cost nothing (one read of `/proc/self/status` and of glibc's counters).
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// Free resident heap kept for reuse; more is given back.
pub const SLACK: u64 = 8 << 20;

/// The allocator the proxy's process runs on: glibc's needs the arena cap and the trim below,
/// mimalloc neither (the binary gives its free pages back itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocator {
    Glibc,
    Mimalloc,
}

/// The background service that trims the heap.
pub struct Trim;

#[async_trait]
impl BackgroundService for Trim {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut every = tokio::time::interval(CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {
                    // malloc_trim takes each arena's lock while it walks it: off the I/O threads.
                    let _ = tokio::task::spawn_blocking(|| trim_if_over(SLACK)).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Gives glibc's free pages back to the kernel when more than `slack` bytes of the resident
/// anonymous memory are not in use; returns whether it did.
pub fn trim_if_over(slack: u64) -> bool {
    let Some(resident) = resident_anonymous() else {
        return false;
    };
    // SAFETY: mallinfo2 only reads glibc's heap counters, under glibc's own locks.
    let info = unsafe { libc::mallinfo2() };
    // Allocated bytes, in the arenas and in chunks mapped on their own. Thread stacks and
    // other mappings count as free here: a few hundred KiB, far below any useful slack.
    let in_use = (info.uordblks + info.hblkhd) as u64;
    if resident.saturating_sub(in_use) <= slack {
        return false;
    }
    // SAFETY: malloc_trim only releases pages that glibc holds free, under its own locks.
    unsafe { libc::malloc_trim(0) };
    true
}

/// RssAnon of this process, in bytes.
pub fn resident_anonymous() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_memory_among_live_allocations_goes_back_to_the_kernel() {
        // 64 MiB in 32 KiB buffers, each followed by a small allocation that stays: freeing the
        // buffers leaves holes glibc does not return by itself.
        let mut buffers = Vec::new();
        let mut kept = Vec::new();
        for i in 0..2048u32 {
            // Written whole, so resident (zeroed memory may be fresh pages never touched).
            buffers.push(vec![1u8; 32 << 10]);
            kept.push(Box::new(i));
        }
        drop(buffers);
        let before = resident_anonymous().expect("RssAnon");
        assert!(trim_if_over(SLACK), "nothing to trim at {before} bytes");
        let after = resident_anonymous().expect("RssAnon");
        assert!(
            after + (32 << 20) < before,
            "the trim gave back {} of 64 MiB freed",
            before.saturating_sub(after)
        );
        assert_eq!(kept.len(), 2048);
    }
}
