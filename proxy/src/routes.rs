//! The route table: path prefixes mapped to what serves them. Built from config at start-up
//! and on each reload; a lookup is a scan of a handful of prefixes, longest first, and gives
//! the request everything its route decides.

use std::path::PathBuf;

use std::{collections::HashMap, sync::Arc};

use crate::{
    access::{
        Access, AccessCounters, AccessSettings, AccessSpec, auth_guard::AuthGuard, basic_auth,
        rate_limit::RateLimit,
    },
    access_log::LogTarget,
    cors::Cors,
    error::BuildError,
    header_rules::HeaderRules,
    observe::Observer,
    rewrite::PrefixRewrite,
    statics::{Site, StaticSettings, fallback::SitePages},
};

/// What a route sends requests to, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The pool of backend processes on Unix sockets.
    Backends,
    /// A named pool (`[upstreams.NAME]`).
    Pool(String),
    /// Files under a directory.
    Static {
        dir: PathBuf,
        cache_control: Option<String>,
        pages: SitePages,
    },
    /// A redirect to the same path with the prefix replaced (`redirect`: moved pages).
    Redirect(PrefixRewrite),
}

/// A route as configured; at run time it is a [`LiveRoute`].
#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    /// The hosts it serves (`app.example.com`, `*.example.com`, lower case); empty: the
    /// default site, every host no route names.
    pub hosts: Vec<String>,
    pub target: Target,
    pub access: AccessSpec,
    /// Where its requests are logged; `None`: not logged.
    pub access_log: Option<LogTarget>,
    pub headers: RouteHeaders,
    /// The prefix replaced on the way to the backend; static routes have none.
    pub rewrite: Option<PrefixRewrite>,
    /// Backend responses kept in memory; only routes to backends have it.
    pub cache: Option<crate::cache::RoutePolicy>,
    /// Requests without a verified client certificate are refused (`client_cert =
    /// "required"`).
    pub requires_client_cert: bool,
}

/// A route's header rules (the security headers among its response defaults) and CORS.
#[derive(Debug, Clone, Default)]
pub struct RouteHeaders {
    /// Towards the backend; static routes have none.
    pub request: HeaderRules,
    /// Towards the client, on every response of the route (the edge's own refusals too).
    pub response: HeaderRules,
    pub cors: Option<Cors>,
}

/// What serves a route at run time.
pub enum Served {
    Backends,
    Pool(Arc<crate::upstream::Pool>),
    Static(Site),
    Redirect(PrefixRewrite),
}

/// A route at run time: a request finds it once and keeps it to its end.
pub struct LiveRoute {
    pub prefix: Arc<str>,
    pub hosts: Vec<String>,
    pub served: Served,
    pub access: Access,
    /// Its metric series and access log.
    pub observer: Observer,
    pub headers: RouteHeaders,
    pub rewrite: Option<PrefixRewrite>,
    pub cache: Option<crate::cache::RoutePolicy>,
    pub requires_client_cert: bool,
}

pub struct RouteTable {
    /// Longest prefix first, so `/api/admin/` wins over `/api/`.
    routes: Vec<Arc<LiveRoute>>,
    /// The hosts routes name: exact ones, and the parents of wildcards (`example.com` for
    /// `*.example.com`), longest first. Both empty: one site, and no host is looked at.
    exact_hosts: std::collections::HashSet<String>,
    wildcard_hosts: Vec<String>,
    /// Every rate limit policy in use, by name.
    limits: HashMap<String, Arc<RateLimit>>,
    /// The basic-auth guard's counts and verification caches: made once, then handed from
    /// table to table.
    basic_auth: Arc<basic_auth::Shared>,
}

/// Makes a route's [`Observer`] from its prefix and access log.
pub type MakeObserver<'a> = &'a dyn Fn(&str, Option<&LogTarget>) -> Observer;

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
        observer: MakeObserver<'_>,
        pools: &crate::pools::Pools,
    ) -> Result<Self, BuildError> {
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
        let basic_auth = previous.map_or_else(
            || {
                Arc::new(basic_auth::Shared::new(AuthGuard::new(
                    counters.auth_guard.clone(),
                    counters.auth_guard_keys.clone(),
                )))
            },
            |p| p.basic_auth.clone(),
        );
        let routes: Vec<Arc<LiveRoute>> = routes
            .into_iter()
            .map(|route| {
                let served = match route.target {
                    Target::Backends => Served::Backends,
                    Target::Pool(name) => Served::Pool(
                        pools
                            .get(&name)
                            .cloned()
                            .ok_or(BuildError::UnknownPool(name))?,
                    ),
                    Target::Static {
                        dir,
                        cache_control,
                        pages,
                    } => Served::Static(Site::new(&dir, cache_control, pages, statics, sites)?),
                    Target::Redirect(to) => Served::Redirect(to),
                };
                // A site's routes are told apart in metrics and logs by its first host.
                let name = match route.hosts.first() {
                    Some(host) => format!("{host}{}", route.prefix),
                    None => route.prefix.clone(),
                };
                let observer = observer(&name, route.access_log.as_ref());
                let rules =
                    Access::build(route.access, access, &mut limits, &basic_auth, counters)?;
                Ok(Arc::new(LiveRoute {
                    prefix: Arc::from(route.prefix),
                    hosts: route.hosts,
                    served,
                    access: rules,
                    observer,
                    headers: route.headers,
                    rewrite: route.rewrite,
                    cache: route.cache,
                    requires_client_cert: route.requires_client_cert,
                }))
            })
            .collect::<Result<_, BuildError>>()?;
        let mut exact_hosts = std::collections::HashSet::new();
        let mut wildcard_hosts = Vec::new();
        for host in routes.iter().flat_map(|r| &r.hosts) {
            match host.strip_prefix("*.") {
                Some(parent) if !wildcard_hosts.iter().any(|w| w == parent) => {
                    wildcard_hosts.push(parent.to_owned())
                }
                Some(_) => {}
                None => {
                    exact_hosts.insert(host.clone());
                }
            }
        }
        wildcard_hosts.sort_by_key(|w| std::cmp::Reverse(w.len()));
        Ok(Self {
            routes,
            exact_hosts,
            wildcard_hosts,
            limits,
            basic_auth,
        })
    }

    /// Whether any route names a host: only then is the request's host looked at.
    pub fn has_hosts(&self) -> bool {
        !self.exact_hosts.is_empty() || !self.wildcard_hosts.is_empty()
    }

    /// The site `host` (lower case, without a port) belongs to, as routes name it: the host
    /// itself, `*.` and the longest parent a wildcard names, or `None`, the default site (as
    /// nginx picks a `server` by `server_name`: exact, then wildcard, then the default).
    pub fn site(&self, host: Option<&str>) -> Option<String> {
        let host = host?;
        if self.exact_hosts.contains(host) {
            return Some(host.to_owned());
        }
        self.wildcard_hosts
            .iter()
            .find(|parent| {
                host.strip_suffix(parent.as_str())
                    .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.'))
            })
            .map(|parent| format!("*.{parent}"))
    }

    /// The route of `site` whose prefix is the longest that `path` starts with. A site's
    /// routes are its own: a path none of them takes is not looked for in the default site.
    pub fn lookup(&self, site: Option<&str>, path: &str) -> Option<&Arc<LiveRoute>> {
        self.routes
            .iter()
            .filter(|route| serves(route, site))
            .find(|route| path.starts_with(&*route.prefix))
    }

    /// Clients tracked by each rate limit policy, for the metrics.
    pub fn rate_limit_keys(&self) -> impl Iterator<Item = (&str, usize)> {
        self.limits
            .iter()
            .map(|(name, limit)| (name.as_str(), limit.len()))
    }

    /// Whether `path` names a static route of `site` without its trailing slash (`/open` for
    /// `/open/`).
    pub fn is_static_without_slash(&self, site: Option<&str>, path: &str) -> bool {
        self.routes
            .iter()
            .filter(|route| serves(route, site))
            .any(|route| {
                matches!(route.served, Served::Static(_))
                    && route.prefix.strip_suffix('/') == Some(path)
            })
    }
}

/// Whether `route` belongs to `site` (`None`: the default site, routes naming no host).
fn serves(route: &LiveRoute, site: Option<&str>) -> bool {
    match site {
        None => route.hosts.is_empty(),
        Some(site) => route.hosts.iter().any(|h| h == site),
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

    fn unobserved(name: &str, _: Option<&LogTarget>) -> Observer {
        Observer::new(name, None, None, None)
    }

    fn route(prefix: &str, target: Target) -> Route {
        Route {
            prefix: prefix.into(),
            hosts: Vec::new(),
            target,
            access: AccessSpec::default(),
            access_log: None,
            headers: RouteHeaders::default(),
            rewrite: None,
            cache: None,
            requires_client_cert: false,
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
                        pages: SitePages::default(),
                    },
                ),
                route("/api/", Target::Backends),
                route(
                    "/open/",
                    Target::Static {
                        dir,
                        cache_control: None,
                        pages: SitePages::default(),
                    },
                ),
            ],
            &settings(),
            &access(),
            None,
            &AccessCounters::new().unwrap(),
            &unobserved,
            &Default::default(),
        )
        .unwrap();
        let prefix = |path| table.lookup(None, path).map(|route| &*route.prefix);
        assert_eq!(prefix("/api/ping"), Some("/api/"));
        assert_eq!(prefix("/x"), Some("/"));
        assert!(table.is_static_without_slash(None, "/open"));
        assert!(!table.is_static_without_slash(None, "/api"));
        let only_api = RouteTable::new(
            vec![route("/api/", Target::Backends)],
            &settings(),
            &access(),
            None,
            &AccessCounters::new().unwrap(),
            &unobserved,
            &Default::default(),
        )
        .unwrap();
        assert!(only_api.lookup(None, "/apix").is_none());
    }
}
