//! Edge access control, checked on each route in a fixed order, cheapest first:
//! rate limit, then allow/deny lists, then basic auth.
//!
//! - [`client_ip`]: who the client is (trusted proxies, `X-Forwarded-For` or `X-Real-IP`).
//! - [`ip_list`]: CIDR lists.
//! - [`rate_limit`]: per-client token buckets.
//! - [`basic_auth`]: htpasswd users and the verification cache.
//! - [`auth_guard`]: the brute-force guard in front of basic auth's hashes.

pub mod auth_guard;
pub mod basic_auth;
pub mod client_ip;
pub mod ip_list;
pub mod rate_limit;

use std::{collections::HashMap, net::IpAddr, sync::Arc};

use auth_guard::GuardSpec;
use basic_auth::{BasicAuth, Htpasswd};
use client_ip::ClientIpHeader;
use ip_list::IpList;
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rate_limit::{RateLimit, RateSpec, Verdict};

use crate::error::BuildError;

/// A route's access rules, as configured (validated, not yet running).
#[derive(Debug, Clone, Default)]
pub struct AccessSpec {
    pub rate_limit: Option<RateSpec>,
    pub allow: IpList,
    pub deny: IpList,
    pub auth: Option<AuthSpec>,
}

#[derive(Debug, Clone)]
pub struct AuthSpec {
    pub users: Arc<Htpasswd>,
    pub realm: String,
    /// Pass the client's `Authorization` header on to the backend.
    pub pass_authorization: bool,
}

/// Settings shared by every route's access rules.
#[derive(Debug, Clone)]
pub struct AccessSettings {
    pub trusted_proxies: IpList,
    /// The header a trusted proxy names the client in.
    pub client_ip_header: ClientIpHeader,
    pub rate_limit_max_keys: usize,
    pub auth_guard: GuardSpec,
}

/// Counters the access rules move when they act (unregistered when metrics are off).
#[derive(Clone)]
pub struct AccessCounters {
    /// Clients a rate limit policy forgot before their bucket was full, by policy.
    pub rate_limit_evicted: IntCounterVec,
    /// The basic-auth guard's refusals (`address`, `user`) and evicted entries (`evicted`).
    pub auth_guard: IntCounterVec,
    /// Entries the basic-auth guard holds.
    pub auth_guard_keys: IntGauge,
}

impl AccessCounters {
    pub fn new() -> Result<Self, BuildError> {
        let counter = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help), &[label])
        };
        Ok(Self {
            rate_limit_evicted: counter(
                "gatehouse_rate_limit_evicted_total",
                "Clients a rate limit policy forgot, to stay within access.rate_limit_max_keys, before their bucket had refilled.",
                "policy",
            )?,
            auth_guard: counter(
                "gatehouse_auth_guard_total",
                "Basic-auth guard actions: attempts refused (429) for the address or the user name, and entries evicted to stay within access.auth_guard_max_keys.",
                "event",
            )?,
            auth_guard_keys: IntGauge::new(
                "gatehouse_auth_guard_keys",
                "Entries the basic-auth guard holds: client addresses, user names and addresses users signed in from.",
            )?,
        })
    }

    pub fn register(&self, registry: &Registry) -> Result<(), BuildError> {
        let collectors: [Box<dyn prometheus::core::Collector>; 3] = [
            Box::new(self.rate_limit_evicted.clone()),
            Box::new(self.auth_guard.clone()),
            Box::new(self.auth_guard_keys.clone()),
        ];
        for collector in collectors {
            registry.register(collector)?;
        }
        Ok(())
    }
}

/// A route's access rules, running.
pub struct Access {
    rate_limit: Option<Arc<RateLimit>>,
    allow: IpList,
    deny: IpList,
    auth: Option<BasicAuth>,
    pass_authorization: bool,
}

/// What the checks decided.
pub enum Decision {
    Pass { user: Option<String> },
    RateLimited { retry_after: u64, limit: u32 },
    Forbidden,
    Unauthorized { challenge: String },
    TooManyFailures { retry_after: u64 },
}

impl Access {
    /// Routes naming the same policy share its buckets (like an nginx `limit_req_zone`); every
    /// route's basic auth shares the one guard and its verification caches (`basic_auth`).
    pub fn build(
        spec: AccessSpec,
        settings: &AccessSettings,
        limits: &mut HashMap<String, Arc<RateLimit>>,
        basic_auth: &Arc<basic_auth::Shared>,
        counters: &AccessCounters,
    ) -> Result<Self, BuildError> {
        let rate_limit = match spec.rate_limit {
            None => None,
            Some(rate) => Some(match limits.get(&rate.name) {
                Some(existing) => existing.clone(),
                None => {
                    let evicted = counters.rate_limit_evicted.with_label_values(&[&rate.name]);
                    let limit = Arc::new(RateLimit::new(
                        rate.clone(),
                        settings.rate_limit_max_keys,
                        evicted,
                    )?);
                    limits.insert(rate.name, limit.clone());
                    limit
                }
            }),
        };
        let pass_authorization = spec.auth.as_ref().is_none_or(|a| a.pass_authorization);
        Ok(Self {
            rate_limit,
            allow: spec.allow,
            deny: spec.deny,
            auth: spec.auth.map(|a| {
                BasicAuth::new(a.users, &a.realm, settings.auth_guard, basic_auth.clone())
            }),
            pass_authorization,
        })
    }

    /// Whether the backend may see the client's `Authorization` header.
    /// The rate limit and the allow and deny lists, without basic auth: all a CORS preflight
    /// is held to, as the Fetch standard sends it without credentials.
    pub fn check_address(&self, client: IpAddr) -> Option<Decision> {
        if let Some(limit) = &self.rate_limit
            && let Verdict::Limited { retry_after } = limit.check(client)
        {
            return Some(Decision::RateLimited {
                retry_after,
                limit: limit.spec().burst,
            });
        }
        if self.deny.contains(client) || (!self.allow.is_empty() && !self.allow.contains(client)) {
            return Some(Decision::Forbidden);
        }
        None
    }

    pub fn passes_authorization(&self) -> bool {
        self.pass_authorization
    }

    pub async fn check(&self, client: IpAddr, authorization: Option<&[u8]>) -> Decision {
        if let Some(refused) = self.check_address(client) {
            return refused;
        }
        let Some(auth) = &self.auth else {
            return Decision::Pass { user: None };
        };
        match auth.check(client, authorization).await {
            basic_auth::Outcome::Allowed { user } => Decision::Pass { user: Some(user) },
            basic_auth::Outcome::Challenge => Decision::Unauthorized {
                challenge: auth.challenge().to_string(),
            },
            basic_auth::Outcome::Blocked { retry_after } => {
                Decision::TooManyFailures { retry_after }
            }
        }
    }
}
