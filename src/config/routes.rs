//! `[[routes]]`: the route table, each prefix with what serves it, its access rules and its
//! access log.

use gatehouse_proxy::{LogTarget, PrefixRewrite, Route, Target};

use super::{
    access, cache,
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
            let host = host_name(host);
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
        let target = match (&route.upstream, &route.static_dir, &route.redirect) {
            (Some(upstream), None, None) => {
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
            (None, Some(dir), None) => {
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
            (None, None, Some(to)) => {
                // Moved pages, within this site: a path, never a URL a client could steer.
                let to = PrefixRewrite::for_key(&route.prefix, to, "redirect")
                    .map_err(|m| source.at(&key("redirect"), m))?;
                for (field, set) in [
                    ("rewrite_prefix", route.rewrite_prefix.is_some()),
                    ("cache_control", route.cache_control.is_some()),
                ] {
                    if set {
                        let message = format!("a redirect route takes no {field}");
                        return Err(source.at(&key(field), message));
                    }
                }
                site_pages::refuse_on_backend(route, i, source)?;
                Target::Redirect(to)
            }
            _ => {
                return Err(source.at(
                    &key("prefix"),
                    "a route needs exactly one of `upstream`, `static_dir` or `redirect`".into(),
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
        // Static and redirect routes send no request on.
        let sends_nothing = !matches!(target, Target::Backends | Target::Pool(_));
        let headers = headers::route(route, i, sends_nothing, source)?;
        let rewrite = match &route.rewrite_prefix {
            None => None,
            Some(_) if route.upstream.is_none() => {
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
        let cache = match &route.cache {
            None => None,
            Some(_) if sends_nothing => {
                return Err(source.at(
                    &key("cache"),
                    "only routes to an upstream take cache; static files have their own".into(),
                ));
            }
            Some(_)
                if route
                    .upstream
                    .as_ref()
                    .and_then(|u| raw.upstreams.get(u))
                    .is_some_and(|p| p.tls) =>
            {
                return Err(source.at(
                    &key("cache"),
                    "a pool reached over TLS is not cached; only plain-HTTP pools and the backends are".into(),
                ));
            }
            Some(c) => Some(cache::route(c, &key("cache"), source)?),
        };
        let requires_client_cert = match route.client_cert.as_deref() {
            None | Some("optional") => false,
            Some("required") => true,
            Some(other) => {
                return Err(source.at(
                    &key("client_cert"),
                    format!("{other:?}: choose \"required\" or \"optional\""),
                ));
            }
        };
        routes.push(Route {
            prefix: route.prefix.clone(),
            hosts,
            target,
            access,
            access_log,
            headers,
            rewrite,
            cache,
            requires_client_cert,
        });
    }
    refuse_redirect_loops(raw, &routes, source)?;
    Ok(routes)
}

/// A redirect must land where something is served, in each of its route's sites: a target
/// that a redirect route takes (itself included: `/docs/` to `/docs/v2/`), or under which
/// one lies, would send clients round in circles.
fn refuse_redirect_loops(
    raw: &RawConfig,
    routes: &[Route],
    source: &Source,
) -> Result<(), ConfigError> {
    let is_redirect = |r: &Route| matches!(r.target, Target::Redirect(_));
    for (i, (route, raw_route)) in routes.iter().zip(&raw.routes).enumerate() {
        let Some(to) = &raw_route.redirect else {
            continue;
        };
        let sites: Vec<Option<&String>> = match route.hosts.is_empty() {
            true => vec![None],
            false => route.hosts.iter().map(Some).collect(),
        };
        for site in sites {
            // The site's routes, as the route table picks among them.
            let of_site = routes.iter().filter(|r| match site {
                None => r.hosts.is_empty(),
                Some(host) => r.hosts.contains(host),
            });
            let taker = of_site
                .clone()
                .filter(|r| to.starts_with(&r.prefix))
                .max_by_key(|r| r.prefix.len());
            let below = of_site
                .clone()
                .find(|r| r.prefix.starts_with(to.as_str()) && is_redirect(r));
            let message = match (taker, below) {
                (None, _) => format!("{to:?}: no route of this site takes it"),
                (Some(other), _) | (_, Some(other)) if is_redirect(other) => format!(
                    "{to:?} leads to the redirect route {:?}: a redirect must land where \
                     something is served",
                    other.prefix
                ),
                _ => continue,
            };
            return Err(source.at(&format!("routes[{i}].redirect"), message));
        }
    }
    Ok(())
}

/// A host name as routes keep it, and requests' hosts are compared with it: lower case, no
/// final dot. `[[tls.sites]]` and `[acme]` write theirs the same way.
pub fn host_name(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.strip_suffix('.') {
        Some(name) => name.to_owned(),
        None => host,
    }
}
