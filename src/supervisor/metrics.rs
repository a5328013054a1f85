//! The supervisor's series: restarts and liveness of each child, and whether Redis answers.
//! The proxy's admin listener serves them; the supervisor writes them to a file in the
//! runtime directory every second and at once when a child starts or exits (written aside,
//! then renamed, so a scrape never reads half a file).

use crate::Result;
use std::{path::PathBuf, sync::Arc, time::Duration};

use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

pub struct GroupMetrics {
    registry: Registry,
    restarts: IntCounterVec,
    up: IntGaugeVec,
    redis_up: IntGauge,
    reloads: IntCounterVec,
    changed: tokio::sync::Notify,
}

impl GroupMetrics {
    pub fn new() -> Result<Arc<Self>> {
        let err = |e: prometheus::Error| format!("metrics: {e}");
        let registry = Registry::new();
        let restarts = IntCounterVec::new(
            Opts::new(
                "gatehouse_supervisor_restarts_total",
                "Times the supervisor restarted a child that exited.",
            ),
            &["child"],
        )
        .map_err(err)?;
        let up = IntGaugeVec::new(
            Opts::new(
                "gatehouse_supervisor_child_up",
                "1 while the child process is running.",
            ),
            &["child"],
        )
        .map_err(err)?;
        let redis_up = IntGauge::new(
            "gatehouse_redis_up",
            "1 when Redis (managed or external) answered the supervisor's last PING.",
        )
        .map_err(err)?;
        registry.register(Box::new(restarts.clone())).map_err(err)?;
        registry.register(Box::new(up.clone())).map_err(err)?;
        registry.register(Box::new(redis_up.clone())).map_err(err)?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "gatehouse_reloads_total",
                "Configuration reloads (SIGHUP, `gatehouse reload`) by result: ok, or failed (a bad file: nothing changed).",
            ),
            &["result"],
        )
        .map_err(err)?;
        registry.register(Box::new(reloads.clone())).map_err(err)?;
        for result in ["ok", "failed"] {
            reloads.with_label_values(&[result]);
        }
        Ok(Arc::new(Self {
            registry,
            restarts,
            up,
            redis_up,
            reloads,
            changed: tokio::sync::Notify::new(),
        }))
    }

    pub fn started(&self, child: &str) {
        self.up.with_label_values(&[child]).set(1);
        // Present from the start, so a scrape shows 0 rather than nothing.
        self.restarts.with_label_values(&[child]);
        self.changed.notify_one();
    }

    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.with_label_values(&[result]).inc();
        self.changed.notify_one();
    }

    pub fn exited(&self, child: &str) {
        self.up.with_label_values(&[child]).set(0);
        self.changed.notify_one();
    }

    pub fn restarted(&self, child: &str) {
        self.restarts.with_label_values(&[child]).inc();
        self.up.with_label_values(&[child]).set(1);
        self.changed.notify_one();
    }

    /// Every second: PING Redis, then write the series to `file`; on a child's change, write
    /// at once. Runs until aborted.
    pub async fn keep_writing(self: Arc<Self>, file: PathBuf, redis: gatehouse_backend::Store) {
        let staging = file.with_extension("prom.tmp");
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => self.redis_up.set(i64::from(redis.ping().await)),
                () = self.changed.notified() => {}
            }
            let mut text = Vec::with_capacity(2048);
            if TextEncoder::new()
                .encode(&self.registry.gather(), &mut text)
                .is_err()
            {
                continue;
            }
            let written = tokio::fs::write(&staging, &text).await;
            if let Err(error) = written.and(tokio::fs::rename(&staging, &file).await) {
                tracing::warn!(file = %file.display(), %error, "cannot write the supervisor's metrics");
            }
        }
    }
}
