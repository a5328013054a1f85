//! The shared store: Redis, reached through one `ConnectionManager` per process.
//!
//! The manager is created lazily, so a backend starts while Redis is down and picks the
//! connection up by itself when Redis returns. Every call is bounded by a deadline: a
//! request never waits on a dead Redis for longer than that.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{
    Client, ScriptInvocation,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use crate::{
    error::{StartError, Unavailable},
    metrics::Metrics,
};

pub struct Store {
    manager: ConnectionManager,
    deadline: Duration,
    /// Last seen state, so an outage is logged once when it starts and once when it ends,
    /// not once per request.
    up: AtomicBool,
    metrics: Option<Arc<Metrics>>,
}

impl Store {
    /// Must be called inside a tokio runtime; it does not connect yet. Every call's outcome
    /// goes to `metrics` when given.
    pub fn new(
        url: &str,
        deadline: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, StartError> {
        let client = Client::open(url).map_err(StartError::RedisUrl)?;
        // Few, quick retries: a request that cannot be answered now gets a 503 and its
        // client retries, rather than holding a connection open through a long backoff.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(deadline))
            .set_response_timeout(Some(deadline))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(StartError::RedisSetup)?;
        Ok(Self {
            manager,
            deadline,
            up: AtomicBool::new(true),
            metrics,
        })
    }

    pub async fn ping(&self) -> bool {
        let mut conn = self.connection();
        self.bounded(async move { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await
            .is_ok()
    }

    /// A handle on the shared connection (cheap: the manager multiplexes one socket), for a
    /// call to be run through [`Store::bounded`].
    pub fn connection(&self) -> ConnectionManager {
        self.manager.clone()
    }

    /// Runs a Lua script (atomic in Redis) within the deadline.
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        invocation: ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        let mut conn = self.connection();
        self.bounded(async move { invocation.invoke_async(&mut conn).await })
            .await
    }

    /// Runs one Redis call (a command, a pipeline or a script) within the deadline, and
    /// records its outcome.
    pub async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        let outcome = match tokio::time::timeout(self.deadline, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {:?}", self.deadline)),
        };
        if let Some(metrics) = &self.metrics {
            metrics.redis(outcome.is_ok());
        }
        let was_up = self.up.swap(outcome.is_ok(), Ordering::Relaxed);
        match &outcome {
            Err(error) if was_up => tracing::warn!(%error, "redis unavailable"),
            Ok(_) if !was_up => tracing::info!("redis available again"),
            _ => {}
        }
        outcome.map_err(|_| Unavailable)
    }
}
