//! A route's header rules (`request_headers`, `response_headers`), its `security_headers`
//! and its `cors`, checked and made into what the proxy applies per request.

use std::time::Duration;

use gatehouse_proxy::{
    RouteHeaders,
    cors::{self, AllowedHeaders, Cors, CorsSpec, Origins},
    header_rules::{self, Direction, HeaderRules, Template},
};

use super::{
    error::{ConfigError, Source},
    raw::{RawCors, RawHeaderRules, RawRoute},
};

/// Route `i`'s headers; `is_static`: it has no backend to send request headers to.
pub fn route(
    route: &RawRoute,
    i: usize,
    is_static: bool,
    source: &Source,
) -> Result<RouteHeaders, ConfigError> {
    let key = |field: &str| format!("routes[{i}].{field}");
    let request = match &route.request_headers {
        Some(_) if is_static => {
            return Err(source.at(
                &key("request_headers"),
                "static and redirect routes send no request on; request_headers are for routes to an upstream".into(),
            ));
        }
        Some(raw) => rules(
            raw,
            Direction::Request,
            false,
            &key("request_headers"),
            source,
        )?,
        None => HeaderRules::default(),
    };
    let mut response = match &route.response_headers {
        Some(raw) => rules(
            raw,
            Direction::Response,
            route.cors.is_some(),
            &key("response_headers"),
            source,
        )?,
        None => HeaderRules::default(),
    };
    if route.security_headers {
        let ready =
            header_rules::security_headers().map_err(|m| source.at(&key("security_headers"), m))?;
        for (name, value) in ready {
            // The route's own rule for a header wins over the ready-made one.
            if !response.names(&name) {
                response.set_if_absent(name, value);
            }
        }
    }
    let cors = route
        .cors
        .as_ref()
        .map(|raw| self::cors(raw, &key("cors"), source))
        .transpose()?;
    Ok(RouteHeaders {
        request,
        response,
        cors,
    })
}

/// `has_cors`: the route's `cors` owns the `Access-Control-*` response headers.
fn rules(
    raw: &RawHeaderRules,
    direction: Direction,
    has_cors: bool,
    key: &str,
    source: &Source,
) -> Result<HeaderRules, ConfigError> {
    let name = |name: &str, at: &str| {
        let parsed = header_rules::name(direction, name).map_err(|m| source.at(at, m))?;
        if has_cors && parsed.as_str().starts_with("access-control-") {
            return Err(source.at(
                at,
                format!("{name:?}: the route's cors sets the Access-Control-* headers"),
            ));
        }
        Ok(parsed)
    };
    let mut rules = HeaderRules::default();
    for (j, header) in raw.remove.iter().enumerate() {
        rules.remove(name(header, &format!("{key}.remove[{j}]"))?);
    }
    for (list, entries) in [("set", &raw.set), ("add", &raw.add)] {
        for (header, value) in entries {
            let at = format!("{key}.{list}.{header}");
            let parsed = name(header, &at)?;
            let value = Template::parse(value).map_err(|m| source.at(&at, m))?;
            match list {
                "set" => rules.set(parsed, value),
                _ => rules.add(parsed, value),
            }
        }
    }
    Ok(rules)
}

fn cors(raw: &RawCors, key: &str, source: &Source) -> Result<Cors, ConfigError> {
    let at = |field: &str| format!("{key}.{field}");
    let wildcard = |list: &[String]| list.iter().any(|v| v == "*");
    let origins = if wildcard(&raw.origins) {
        if raw.origins.len() > 1 {
            return Err(source.at(
                &at("origins"),
                "\"*\" is every origin: list origins or write [\"*\"] alone".into(),
            ));
        }
        Origins::Any
    } else {
        let list = raw
            .origins
            .iter()
            .enumerate()
            .map(|(j, o)| cors::origin(o).map_err(|m| source.at(&at(&format!("origins[{j}]")), m)))
            .collect::<Result<Vec<_>, _>>()?;
        if list.is_empty() {
            return Err(source.at(
                &at("origins"),
                "name at least one origin, or [\"*\"] for any".into(),
            ));
        }
        Origins::List(list)
    };
    // The Fetch standard: a response with credentials must name its origin, and `*` in the
    // other lists means a literal `*` there.
    if raw.credentials && (matches!(origins, Origins::Any) || wildcard(&raw.headers)) {
        return Err(source.at(
            &at("credentials"),
            "credentials = true needs the origins and headers listed: browsers refuse \"*\" \
             with credentials"
                .into(),
        ));
    }
    // The Fetch standard reads `*` in these lists as any only without credentials, and never
    // in the methods a preflight asks for.
    if raw.credentials && wildcard(&raw.expose_headers) {
        return Err(source.at(
            &at("expose_headers"),
            "\"*\" exposes every header only without credentials: list the headers".into(),
        ));
    }
    let methods = raw
        .methods
        .iter()
        .enumerate()
        .map(|(j, m)| cors::method(m).map_err(|e| source.at(&at(&format!("methods[{j}]")), e)))
        .collect::<Result<Vec<_>, _>>()?;
    let names = |field: &str, list: &[String]| {
        list.iter()
            .enumerate()
            .map(|(j, h)| {
                cors::header_name(h).map_err(|e| source.at(&at(&format!("{field}[{j}]")), e))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let headers = if wildcard(&raw.headers) {
        AllowedHeaders::Any
    } else {
        AllowedHeaders::List(names("headers", &raw.headers)?)
    };
    let max_age_secs = raw
        .max_age
        .map(|age| {
            source.seconds(
                age.0,
                Duration::ZERO..=Duration::from_secs(86_400),
                &at("max_age"),
            )
        })
        .transpose()?;
    Ok(Cors::new(CorsSpec {
        origins,
        methods,
        headers,
        expose_headers: names("expose_headers", &raw.expose_headers)?,
        max_age_secs,
        credentials: raw.credentials,
    }))
}
