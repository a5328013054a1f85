//! Graceful shutdown that ends when the work does.
//!
//! On SIGTERM Pingora stops accepting and then sleeps for its whole grace period, even when
//! nothing is left to finish. We count requests in flight and exit as soon as the count has
//! been zero for a moment; the grace period stays the upper bound.

use std::{
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    thread,
    time::Duration,
};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{SignalKind, signal};

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
static STOPPED_FAST: AtomicBool = AtomicBool::new(false);
static LEAVING: AtomicBool = AtomicBool::new(false);

/// Whether this process is on its way out (SIGTERM, or SIGQUIT for an upgrade). Responses then
/// say `Connection: close`, so keep-alive clients open their next connection (to the new
/// process, after an upgrade) instead of racing the close of an idle one.
pub fn leaving() -> bool {
    LEAVING.load(Ordering::Relaxed)
}

/// Whether the proxy was stopped by SIGINT.
pub fn stopped_fast() -> bool {
    STOPPED_FAST.load(Ordering::Relaxed)
}

/// Held in each request's context; dropping it marks the request finished.
pub struct InFlight(());

impl InFlight {
    pub fn enter() -> Self {
        IN_FLIGHT.fetch_add(1, Ordering::Relaxed);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
    }
}

/// SIGTERM: drain then exit; SIGINT: stop now; SIGQUIT: hand sockets to a new process.
pub struct Signals;

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
                // Pingora sends the sockets (retrying for up to 5 s), keeps accepting 5 s more
                // while the new process takes over, then stops accepting and tells HTTP/2
                // clients to go away; only after all that, leave once the last request is done.
                tracing::info!("SIGQUIT: handing the listening sockets over");
                thread::spawn(|| {
                    thread::sleep(Duration::from_secs(11));
                    exit_when_drained();
                });
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining in-flight requests");
                thread::spawn(exit_when_drained);
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                STOPPED_FAST.store(true, Ordering::Relaxed);
                ShutdownSignal::FastShutdown
            }
        };
        LEAVING.store(true, Ordering::Relaxed);
        signal
    }
}

fn exit_when_drained() {
    // Give the listeners time to close, so no request slips in after we look.
    thread::sleep(Duration::from_millis(200));
    let mut idle_looks = 0;
    loop {
        if IN_FLIGHT.load(Ordering::Relaxed) == 0 {
            idle_looks += 1;
            if idle_looks == 3 {
                tracing::info!("drained; exiting");
                crate::access_log::flush_before_exit();
                std::process::exit(0);
            }
        } else {
            idle_looks = 0;
        }
        thread::sleep(Duration::from_millis(20));
    }
}
