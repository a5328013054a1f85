//! Orders coordinated through Redis, so that replicas sharing it (the Swarm stack) share one
//! account and make one order per name, not one each:
//!
//! - the account: the first replica to make one offers it, and the others take it;
//! - a lock per name (`SET NX` with a lifetime longer than an order's deadline, released only
//!   by its holder): the replica holding it orders, the others wait for its result;
//! - the certificate, with its key, kept for the others to serve;
//! - the failures in a row per name, so that the replicas wait out one backoff together
//!   (the CA limits failed validations per account and name), the lock held meanwhile.
//!
//! HTTP-01 answers need no sharing: with one account, any replica can answer any token.
//!
//! A replica that cannot reach Redis orders nothing until it can: its served certificate stays.

use std::time::Duration;

use redis::{
    Client, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

use super::order::ORDER_DEADLINE;
use crate::error::BuildError;

/// Each Redis call's deadline.
const DEADLINE: Duration = Duration::from_secs(2);

/// How long a lock outlives its holder (a replica that died mid-order).
const LOCK_LIFETIME: Duration = ORDER_DEADLINE.saturating_add(Duration::from_secs(60));

pub struct Shared {
    client: Client,
    /// Made at first use: it needs a runtime to run on, which exists only once the proxy's
    /// services start.
    redis: tokio::sync::OnceCell<ConnectionManager>,
    /// `gatehouse:acme:DIRECTORY:`, one namespace per ACME server.
    prefix: String,
}

/// A lock on one name's order; [`Shared::unlock`] gives it back.
pub struct Lock {
    key: String,
    token: String,
}

impl Shared {
    /// Connects at first use: Redis may come up after the proxy.
    pub fn new(url: &str, directory: &str) -> Result<Self, BuildError> {
        let client = Client::open(url).map_err(|e| BuildError::AcmeRedis(e.to_string()))?;
        Ok(Self {
            client,
            redis: tokio::sync::OnceCell::new(),
            prefix: format!("gatehouse:acme:{directory}:"),
        })
    }

    async fn connection(&self) -> Result<ConnectionManager, String> {
        let make = || async {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(DEADLINE))
                .set_response_timeout(Some(DEADLINE))
                .set_number_of_retries(1);
            ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                .map_err(|e| format!("redis: {e}"))
        };
        self.redis.get_or_try_init(make).await.cloned()
    }

    async fn run<T: redis::FromRedisValue>(&self, command: redis::Cmd) -> Result<T, String> {
        let mut redis = self.connection().await?;
        bounded(command.query_async(&mut redis)).await
    }

    /// The shared account, `ours` if none was shared yet.
    pub async fn account_or(&self, ours: &[u8]) -> Result<Vec<u8>, String> {
        // Set if absent, and the value either way, in one step.
        let script = Script::new(
            "if redis.call('SET', KEYS[1], ARGV[1], 'NX') then return ARGV[1] end \
             return redis.call('GET', KEYS[1])",
        );
        let key = format!("{}account", self.prefix);
        let mut redis = self.connection().await?;
        bounded(script.key(key).arg(ours).invoke_async(&mut redis)).await
    }

    pub async fn account(&self) -> Result<Option<Vec<u8>>, String> {
        self.run(
            redis::cmd("GET")
                .arg(format!("{}account", self.prefix))
                .clone(),
        )
        .await
    }

    pub async fn certificate(&self, name: &str) -> Result<Option<Vec<u8>>, String> {
        self.run(
            redis::cmd("GET")
                .arg(format!("{}cert:{name}", self.prefix))
                .clone(),
        )
        .await
    }

    pub async fn put_certificate(&self, name: &str, pem: &str) -> Result<(), String> {
        let key = format!("{}cert:{name}", self.prefix);
        self.run(redis::cmd("SET").arg(key).arg(pem).clone()).await
    }

    /// The lock on `name`'s order, or `None` while another replica holds it.
    pub async fn lock(&self, name: &str) -> Result<Option<Lock>, String> {
        let key = format!("{}lock:{name}", self.prefix);
        let token = uuid::Uuid::new_v4().to_string();
        let taken: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_LIFETIME.as_millis() as u64)
                    .clone(),
            )
            .await?;
        Ok(taken.map(|_| Lock { key, token }))
    }

    /// Gives `lock` back if this replica still holds it; if this fails, it lapses by itself.
    pub async fn unlock(&self, lock: Lock) {
        let script = Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end \
             return 0",
        );
        let Ok(mut redis) = self.connection().await else {
            return;
        };
        let mut invocation = script.key(&lock.key);
        invocation.arg(&lock.token);
        if let Err(error) = bounded(invocation.invoke_async::<i64>(&mut redis)).await {
            tracing::warn!(key = %lock.key, %error, "cannot release the ACME order lock; it lapses by itself");
        }
    }

    /// Counts a failed order of `name` for all replicas and holds `lock` for the backoff that
    /// count calls for, so that no replica orders before it ends; the count.
    pub async fn hold_after_failure(&self, lock: &Lock, name: &str) -> Result<u32, String> {
        let key = format!("{}failures:{name}", self.prefix);
        // Forgotten a day after the last failure.
        let script = Script::new(
            "local n = redis.call('INCR', KEYS[1]) redis.call('EXPIRE', KEYS[1], 86400) return n",
        );
        let mut redis = self.connection().await?;
        let failures: u32 = bounded(script.key(&key).invoke_async(&mut redis)).await?;
        let hold = super::backoff(failures);
        let extend = Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then \
             return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
        );
        let mut invocation = extend.key(&lock.key);
        invocation.arg(&lock.token).arg(hold.as_millis() as u64);
        let _: i64 = bounded(invocation.invoke_async(&mut redis)).await?;
        Ok(failures)
    }

    pub async fn clear_failures(&self, name: &str) {
        let key = format!("{}failures:{name}", self.prefix);
        let _: Result<i64, _> = self.run(redis::cmd("DEL").arg(key).clone()).await;
    }

    pub async fn remove_account(&self) {
        let key = format!("{}account", self.prefix);
        let _: Result<i64, _> = self.run(redis::cmd("DEL").arg(key).clone()).await;
    }
}

async fn bounded<T>(call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(DEADLINE, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("redis: {e}")),
        Err(_) => Err(format!("redis: no answer within {}s", DEADLINE.as_secs())),
    }
}
