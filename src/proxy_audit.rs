//! `gatehouse proxy`'s audit events: the guards it trips (a rate limit, the basic-auth guard)
//! written to the group's audit log, the file and the shared Redis stream the backends write.
//!
//! The log is made at the first event, inside the proxy's runtime (the Redis connection
//! needs one), and each event is written by a task of its own: the request that tripped the
//! guard is answered at once. Its deduplication and budget (one event per guard, client and
//! route every 10 s, at most 100 in 10 s) are decided before anything is spent, so a flood of
//! refusals costs the proxy one lock and a map lookup each.

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Duration,
};

use gatehouse_backend::{
    Store,
    audit::{Audit, Event},
};
use gatehouse_proxy::guard_events::{Sink, Tripped};

use crate::{Result, config::Config};

/// The sink `gatehouse proxy` sets ([`gatehouse_proxy::guard_events::set_sink`]).
pub fn sink(config: &Config) -> Result<Sink> {
    let url = config.redis.client_url(&config.managed_redis_socket())?;
    let settings = Settings {
        url,
        timeout: config.redis.timeout,
        file: config.backend.audit.file.clone(),
        max_events: config.backend.audit.max_events,
    };
    let audit: OnceLock<Option<Arc<Audit>>> = OnceLock::new();
    Ok(Box::new(move |tripped: &Tripped<'_>| {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(audit) = audit.get_or_init(|| settings.open()) else {
            return;
        };
        // The route stands for the actor: one event per guard, client and route.
        let route = format!("{} {}", tripped.guard, tripped.route);
        if !audit.admit_refusal("guard.tripped", Some(tripped.client), Some(&route)) {
            return;
        }
        let audit = Arc::clone(audit);
        let (client, guard) = (tripped.client, tripped.guard);
        let (target, request_id, correlation_id) = (
            tripped.route.to_string(),
            tripped.request_id.to_string(),
            tripped.correlation_id.to_string(),
        );
        runtime.spawn(async move {
            audit
                .record(Event {
                    event: "guard.tripped",
                    client: Some(client),
                    request_id: Some(&request_id),
                    correlation_id: Some(&correlation_id),
                    target: Some(&target),
                    outcome: "denied",
                    detail: Some(guard),
                    ..Event::default()
                })
                .await;
        });
    }))
}

struct Settings {
    url: String,
    timeout: Duration,
    file: Option<PathBuf>,
    max_events: u64,
}

impl Settings {
    /// The audit log, or `None` (said once) when it cannot be made: guards still refuse, and
    /// are still counted in metrics.
    fn open(&self) -> Option<Arc<Audit>> {
        let store = match Store::new(&self.url, self.timeout, None) {
            Ok(store) => store,
            Err(error) => {
                tracing::warn!(%error, "no audit log for the proxy's guards: Redis is not usable");
                return None;
            }
        };
        match Audit::new(
            Arc::new(store),
            self.file.as_deref(),
            self.max_events,
            "proxy",
            None,
        ) {
            Ok(audit) => Some(Arc::new(audit)),
            Err(error) => {
                tracing::warn!(%error, "no audit log for the proxy's guards: the audit file cannot be opened");
                None
            }
        }
    }
}
