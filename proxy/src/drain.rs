//! Graceful shutdown that ends when the work does.
//!
//! On SIGTERM Pingora stops accepting and then sleeps for its whole grace period, even when
//! nothing is left to finish. Here the process exits as soon as the listeners have stopped and
//! the last request in flight is done; the grace period stays the upper bound.
//!
//! One [`Drain`] is made at start-up and handed to what needs it: [`Signals`] (Pingora's
//! shutdown signal watch) marks the way out, each request holds an [`InFlight`], and
//! [`ExitWhenDrained`] waits for both. Nothing polls: the last request to finish wakes it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use pingora::{
    server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch},
    services::background::BackgroundService,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};

/// How long no request may be in flight before the process exits: a connection accepted as
/// the listeners closed has its request counted by then.
const SETTLE: Duration = Duration::from_millis(200);

/// The way out, shared by the signal watch, every request and the exit task.
#[derive(Clone, Default)]
pub struct Drain(Arc<State>);

#[derive(Default)]
struct State {
    in_flight: AtomicUsize,
    /// Set by SIGTERM, SIGQUIT or SIGINT.
    leaving: AtomicBool,
    /// Set by SIGINT.
    fast: AtomicBool,
    /// Woken when the last request in flight finishes once `leaving` is set.
    idle: Notify,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn enter(&self) -> InFlight {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.0.clone())
    }

    /// Whether this process is on its way out (SIGTERM, or SIGQUIT for an upgrade). Responses
    /// then say `Connection: close`, so keep-alive clients open their next connection (to the
    /// new process, after an upgrade) instead of racing the close of an idle one.
    pub fn leaving(&self) -> bool {
        self.0.leaving.load(Ordering::Relaxed)
    }

    /// Whether the proxy was stopped by SIGINT.
    pub fn stopped_fast(&self) -> bool {
        self.0.fast.load(Ordering::Relaxed)
    }

    /// Resolves when no request is in flight; only once [`Drain::leaving`], since the last
    /// request wakes it only then.
    async fn idle(&self) {
        loop {
            let idle = self.0.idle.notified();
            let mut idle = std::pin::pin!(idle);
            // Registered before the count is read, so a request ending in between wakes it.
            idle.as_mut().enable();
            if self.0.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Held in each request's context; dropping it marks the request finished.
pub struct InFlight(Arc<State>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let before = self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        // Only on the way out, so a busy proxy never takes the waiters' lock.
        if before == 1 && self.0.leaving.load(Ordering::SeqCst) {
            self.0.idle.notify_waiters();
        }
    }
}

/// SIGTERM: drain then exit; SIGINT: stop now; SIGQUIT: hand sockets to a new process.
pub struct Signals(pub Drain);

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers; stopping");
            return ShutdownSignal::FastShutdown;
        };
        let signal = tokio::select! {
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: handing the listening sockets over");
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining in-flight requests");
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                self.0.0.fast.store(true, Ordering::Relaxed);
                ShutdownSignal::FastShutdown
            }
        };
        self.0.0.leaving.store(true, Ordering::SeqCst);
        signal
    }
}

/// Exits the process once the listeners have stopped and no request is in flight.
pub struct ExitWhenDrained {
    pub drain: Drain,
    /// Runs just before the exit: the last access-log lines may still be queued.
    pub before_exit: Box<dyn Fn() + Send + Sync>,
}

#[async_trait]
impl BackgroundService for ExitWhenDrained {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Pingora tells the listeners to stop with this: at once after SIGTERM; after SIGQUIT
        // once the sockets are handed over (retried for up to 5 s) and the new process has had
        // 5 s more to take over. Never after SIGINT, which stops without draining.
        if shutdown.wait_for(|&down| down).await.is_err() {
            return;
        }
        loop {
            self.drain.idle().await;
            tokio::time::sleep(SETTLE).await;
            if self.drain.0.in_flight.load(Ordering::SeqCst) == 0 {
                break;
            }
        }
        tracing::info!("drained; exiting");
        (self.before_exit)();
        std::process::exit(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_last_request_to_finish_wakes_the_drain() {
        let drain = Drain::new();
        let (first, second) = (drain.enter(), drain.enter());
        drain.0.leaving.store(true, Ordering::SeqCst);
        let waiting = tokio::spawn({
            let drain = drain.clone();
            async move { drain.idle().await }
        });
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a request is still in flight");
        drop(second);
        let woken = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(matches!(woken, Ok(Ok(()))), "not woken: {woken:?}");
    }
}
