//! The route table: path prefixes mapped to what serves them. Built once from config; a
//! lookup is a scan of a handful of prefixes, longest first.

use std::path::PathBuf;

use std::{collections::HashMap, sync::Arc};

use crate::{
    access::{
        Access, AccessCounters, AccessSettings, AccessSpec, auth_guard::AuthGuard,
        rate_limit::RateLimit,
    },
    access_log::LogTarget,
    statics::{Site, StaticSettings},
};

/// What a route sends requests to, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The pool of backend processes on Unix sockets.
    Backends,
    /// Files under a directory.
    Static {
        dir: PathBuf,
        cache_control: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub target: Target,
    pub access: AccessSpec,
    /// Where its requests are logged; `None`: not logged.
    pub access_log: Option<LogTarget>,
}

/// What serves a route at run time.
pub enum Served {
    Backends,
    Static(Site),
}

pub struct RouteTable {
    routes: Vec<(String, Served, Access)>,
    /// Each route's access log, in the same order.
    logs: Vec<Option<LogTarget>>,
    /// Every rate limit policy in use, by name.
    limits: HashMap<String, Arc<RateLimit>>,
    /// The basic-auth guard's counts: made once, then handed from table to table.
    auth_guard: Arc<AuthGuard>,
}

impl RouteTable {
    /// `previous`: the table this one replaces on a reload; its rate limit policies that are
    /// defined the same way carry their buckets over, and the basic-auth guard its counts, so
    /// a reload is no way around a limit.
    pub fn new(
        mut routes: Vec<Route>,
        statics: &StaticSettings,
        access: &AccessSettings,
        previous: Option<&RouteTable>,
        counters: &AccessCounters,
    ) -> Result<Self, String> {
        // Longest prefix first, so `/api/admin/` wins over `/api/`.
        routes.sort_by_key(|route| std::cmp::Reverse(route.prefix.len()));
        let sites = routes
            .iter()
            .filter(|r| matches!(r.target, Target::Static { .. }))
            .count();
        let mut limits = HashMap::new();
        if let Some(previous) = previous {
            for spec in routes.iter().filter_map(|r| r.access.rate_limit.as_ref()) {
                if let Some(limit) = previous.limits.get(&spec.name)
                    && limit.spec() == spec
                    && limit.max_keys() == access.rate_limit_max_keys
                {
                    limits.insert(spec.name.clone(), limit.clone());
                }
            }
        }
        let auth_guard = previous.map_or_else(
            || {
                Arc::new(AuthGuard::new(
                    counters.auth_guard.clone(),
                    counters.auth_guard_keys.clone(),
                ))
            },
            |p| p.auth_guard.clone(),
        );
        let logs = routes.iter().map(|r| r.access_log.clone()).collect();
        let routes = routes
            .into_iter()
            .map(|route| {
                let served = match route.target {
                    Target::Backends => Served::Backends,
                    Target::Static { dir, cache_control } => {
                        Served::Static(Site::new(&dir, cache_control, statics, sites)?)
                    }
                };
                let rules =
                    Access::build(route.access, access, &mut limits, &auth_guard, counters)?;
                Ok((route.prefix, served, rules))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            routes,
            logs,
            limits,
            auth_guard,
        })
    }

    pub fn lookup(&self, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .position(|(prefix, ..)| path.starts_with(prefix.as_str()))
    }

    pub fn get(&self, index: usize) -> Option<(&str, &Served, &Access)> {
        self.routes
            .get(index)
            .map(|(prefix, served, access)| (prefix.as_str(), served, access))
    }

    /// Prefixes and access logs of the routes, in lookup order (the index [`lookup`] returns).
    ///
    /// [`lookup`]: RouteTable::lookup
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&LogTarget>)> {
        self.routes
            .iter()
            .zip(&self.logs)
            .map(|((prefix, ..), log)| (prefix.as_str(), log.as_ref()))
    }

    /// Clients tracked by each rate limit policy, for the metrics.
    pub fn rate_limit_keys(&self) -> impl Iterator<Item = (&str, usize)> {
        self.limits
            .iter()
            .map(|(name, limit)| (name.as_str(), limit.len()))
    }

    /// Whether `path` names a static route without its trailing slash (`/open` for `/open/`).
    pub fn is_static_without_slash(&self, path: &str) -> bool {
        self.routes.iter().any(|(prefix, served, _)| {
            matches!(served, Served::Static(_)) && prefix.strip_suffix('/') == Some(path)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> StaticSettings {
        StaticSettings {
            cache_bytes: 1 << 20,
            max_cached_file_bytes: 1 << 16,
            min_compress_bytes: 256,
            check_interval: std::time::Duration::ZERO,
        }
    }

    fn access() -> AccessSettings {
        let auth_guard = crate::access::auth_guard::GuardSpec {
            max_failures: 5,
            max_failures_per_user: 50,
            window: std::time::Duration::from_secs(60),
            max_keys: 1000,
        };
        AccessSettings {
            trusted_proxies: Default::default(),
            client_ip_header: Default::default(),
            rate_limit_max_keys: 100,
            auth_guard,
        }
    }

    fn route(prefix: &str, target: Target) -> Route {
        Route {
            prefix: prefix.into(),
            target,
            access: AccessSpec::default(),
            access_log: None,
        }
    }

    #[test]
    fn longest_prefix_wins_and_unknown_is_none() {
        let dir = std::env::temp_dir();
        let table = RouteTable::new(
            vec![
                route(
                    "/",
                    Target::Static {
                        dir: dir.clone(),
                        cache_control: None,
                    },
                ),
                route("/api/", Target::Backends),
                route(
                    "/open/",
                    Target::Static {
                        dir,
                        cache_control: None,
                    },
                ),
            ],
            &settings(),
            &access(),
            None,
            &AccessCounters::new().unwrap(),
        )
        .unwrap();
        let prefix = |path| {
            table
                .lookup(path)
                .and_then(|i| table.get(i))
                .map(|(p, ..)| p)
        };
        assert_eq!(prefix("/api/ping"), Some("/api/"));
        assert_eq!(prefix("/x"), Some("/"));
        assert!(table.is_static_without_slash("/open"));
        assert!(!table.is_static_without_slash("/api"));
        let only_api = RouteTable::new(
            vec![route("/api/", Target::Backends)],
            &settings(),
            &access(),
            None,
            &AccessCounters::new().unwrap(),
        )
        .unwrap();
        assert!(only_api.lookup("/apix").is_none());
    }
}
