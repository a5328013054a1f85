//! `[[routes]]`: the route table, each prefix with what serves it, its access rules and its
//! access log.

use gatehouse_proxy::{LogTarget, PrefixRewrite, Route, Target};

use super::{
    access,
    error::{ConfigError, Source},
    headers, logging,
    raw::RawConfig,
    site_pages, upstreams,
};

/// `default_log`: where routes that name no access log write.
pub fn validate(
    raw: &RawConfig,
    default_log: &Option<LogTarget>,
    source: &Source,
) -> Result<Vec<Route>, ConfigError> {
    if raw.routes.is_empty() {
        return Err(source.at("routes", "at least one [[routes]] entry is required".into()));
    }
    let mut routes: Vec<Route> = Vec::with_capacity(raw.routes.len());
    for (i, route) in raw.routes.iter().enumerate() {
        let key = |field: &str| format!("routes[{i}].{field}");
        if !route.prefix.starts_with('/') {
            return Err(source.at(
                &key("prefix"),
                format!("{:?} must start with `/`", route.prefix),
            ));
        }
        // A static route is a directory; a backend route may be one exact endpoint
        // (`/auth/login`, to give it a stricter rate limit).
        if route.static_dir.is_some() && !route.prefix.ends_with('/') {
            return Err(source.at(
                &key("prefix"),
                format!("{:?}: a static route must end with `/`", route.prefix),
            ));
        }
        let mut hosts = Vec::with_capacity(route.hosts.len());
        for (j, host) in route.hosts.iter().enumerate() {
            // As requests' hosts are compared: lower case, no final dot.
            let host = host.to_ascii_lowercase();
            let host = host.strip_suffix('.').unwrap_or(&host).to_owned();
            let name = host.strip_prefix("*.").unwrap_or(&host);
            if !gatehouse_proxy::https_redirect::is_dns_name(name) {
                return Err(source.at(
                    &format!("routes[{i}].hosts[{j}]"),
                    format!("{host:?}: a host name, or `*.` and one (`*.example.com`)"),
                ));
            }
            hosts.push(host);
        }
        // The same prefix for the same site twice; a prefix may be routed once per site.
        let same_site = |r: &Route| {
            r.hosts.is_empty() && hosts.is_empty() || r.hosts.iter().any(|h| hosts.contains(h))
        };
        if routes
            .iter()
            .any(|r| r.prefix == route.prefix && same_site(r))
        {
            return Err(source.at(
                &key("prefix"),
                format!("{:?} is routed twice for the same host", route.prefix),
            ));
        }
        let target = match (&route.upstream, &route.static_dir) {
            (Some(upstream), None) => {
                let target = if upstream == upstreams::BUILT_IN {
                    Target::Backends
                } else if raw.upstreams.contains_key(upstream) {
                    Target::Pool(upstream.clone())
                } else {
                    let mut known = vec![upstreams::BUILT_IN];
                    known.extend(raw.upstreams.keys().map(String::as_str));
                    return Err(source.at(
                        &key("upstream"),
                        format!("unknown upstream {upstream:?}; the pools are {known:?}"),
                    ));
                };
                if route.cache_control.is_some() {
                    return Err(source.at(
                        &key("cache_control"),
                        "only static routes take cache_control; backends set their own".into(),
                    ));
                }
                site_pages::refuse_on_backend(route, i, source)?;
                target
            }
            (None, Some(dir)) => {
                let dir = source.base.join(dir);
                if !dir.is_dir() {
                    return Err(source.at(
                        &key("static_dir"),
                        format!("{} is not a directory", dir.display()),
                    ));
                }
                if let Some(value) = &route.cache_control {
                    source.header_value(value, &key("cache_control"))?;
                }
                let pages = site_pages::route(route, i, &dir, source)?;
                Target::Static {
                    dir,
                    cache_control: route.cache_control.clone(),
                    pages,
                }
            }
            _ => {
                return Err(source.at(
                    &key("prefix"),
                    "a route needs exactly one of `upstream` or `static_dir`".into(),
                ));
            }
        };
        let access = access::route(
            route,
            i,
            &raw.access.default_rate_limit,
            &raw.rate_limits,
            source,
        )?;
        let access_log = match &route.access_log {
            Some(value) => logging::target(value, &key("access_log"), source)?,
            None => default_log.clone(),
        };
        let headers = headers::route(route, i, matches!(target, Target::Static { .. }), source)?;
        let rewrite = match &route.rewrite_prefix {
            None => None,
            Some(_) if route.static_dir.is_some() => {
                return Err(source.at(
                    &key("rewrite_prefix"),
                    "only routes to an upstream take rewrite_prefix".into(),
                ));
            }
            Some(to) => Some(
                PrefixRewrite::new(&route.prefix, to)
                    .map_err(|m| source.at(&key("rewrite_prefix"), m))?,
            ),
        };
        routes.push(Route {
            prefix: route.prefix.clone(),
            hosts,
            target,
            access,
            access_log,
            headers,
            rewrite,
        });
    }
    Ok(routes)
}
