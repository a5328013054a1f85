//! `[access]` and each route's access rules: who the client is (trusted proxies and the
//! header they name it in), the default rate limit, the basic-auth guard; a route's rate
//! limit, allow and deny lists and htpasswd users.

use std::{collections::BTreeMap, time::Duration};

use gatehouse_proxy::{
    AccessSettings, AccessSpec,
    access::{
        AuthSpec, auth_guard::GuardSpec, basic_auth::Htpasswd, client_ip::ClientIpHeader,
        ip_list::IpList, rate_limit::RateSpec,
    },
};

use super::{
    error::{ConfigError, Source},
    raw::{RawAccess, RawRate, RawRoute},
};

pub fn validate(a: &RawAccess, source: &Source) -> Result<AccessSettings, ConfigError> {
    let trusted_proxies = IpList::parse(&a.trusted_proxies)
        .map_err(|(j, m)| source.at(&format!("access.trusted_proxies[{j}]"), m))?;
    let client_ip_header = ClientIpHeader::parse(&a.client_ip_header).ok_or_else(|| {
        source.at(
            "access.client_ip_header",
            format!(
                "{:?}: choose \"x-forwarded-for\" or \"x-real-ip\"",
                a.client_ip_header
            ),
        )
    })?;
    source.positive(a.rate_limit_max_keys, "access.rate_limit_max_keys")?;
    source.positive(a.auth_max_failures, "access.auth_max_failures")?;
    if a.auth_max_failures_per_user < a.auth_max_failures {
        return Err(source.at(
            "access.auth_max_failures_per_user",
            format!(
                "{} is below access.auth_max_failures ({}): one address could then hold a user \
                 back everywhere",
                a.auth_max_failures_per_user, a.auth_max_failures
            ),
        ));
    }
    // A day at most: longer holds a mistyped password against a user for too long.
    let window = source.duration(
        a.auth_failure_window.0,
        Duration::from_secs(1)..=Duration::from_secs(86_400),
        "access.auth_failure_window",
    )?;
    source.within(
        a.auth_guard_max_keys,
        1000..=10_000_000,
        "access.auth_guard_max_keys",
    )?;
    Ok(AccessSettings {
        trusted_proxies,
        client_ip_header,
        rate_limit_max_keys: a.rate_limit_max_keys,
        auth_guard: GuardSpec {
            max_failures: a.auth_max_failures,
            max_failures_per_user: a.auth_max_failures_per_user,
            window,
            max_keys: a.auth_guard_max_keys,
        },
    })
}

/// Route `i`'s access rules: its rate limit (its own, or `access.default_rate_limit`), its
/// allow and deny lists, and its htpasswd users.
pub fn route(
    route: &RawRoute,
    i: usize,
    default_rate_limit: &str,
    rates: &BTreeMap<String, RawRate>,
    source: &Source,
) -> Result<AccessSpec, ConfigError> {
    let key = |field: &str| format!("routes[{i}].{field}");
    let (name, name_key) = match &route.rate_limit {
        Some(name) => (name.as_str(), key("rate_limit")),
        None => (default_rate_limit, "access.default_rate_limit".to_string()),
    };
    let rate_limit = match source.off_or(name, &name_key)? {
        None => None,
        Some(name) => Some(rate(name, &name_key, rates, source)?),
    };
    let allow = IpList::parse(&route.allow)
        .map_err(|(j, m)| source.at(&format!("{}[{j}]", key("allow")), m))?;
    let deny = IpList::parse(&route.deny)
        .map_err(|(j, m)| source.at(&format!("{}[{j}]", key("deny")), m))?;
    let auth = match &route.htpasswd {
        None => {
            if route.realm.is_some() {
                return Err(source.at(&key("realm"), "a realm needs an htpasswd file".into()));
            }
            None
        }
        Some(file) => {
            let path = source.base.join(file);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                source.at(
                    &key("htpasswd"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let users = Htpasswd::parse(&text).map_err(|(line, message)| ConfigError {
                origin: path.display().to_string(),
                line: Some(line),
                key: None,
                message,
            })?;
            if users.is_empty() {
                return Err(source.at(&key("htpasswd"), format!("{} has no users", path.display())));
            }
            let realm = route.realm.clone().unwrap_or_else(|| "gatehouse".into());
            source.header_value(&realm, &key("realm"))?;
            Some(AuthSpec {
                users: std::sync::Arc::new(users),
                realm,
                pass_authorization: route.pass_authorization,
            })
        }
    };
    Ok(AccessSpec {
        rate_limit,
        allow,
        deny,
        auth,
    })
}

/// The `[rate_limits.NAME]` policy a route (or the default) names at `key`.
fn rate(
    name: &str,
    key: &str,
    rates: &BTreeMap<String, RawRate>,
    source: &Source,
) -> Result<RateSpec, ConfigError> {
    let rate = rates.get(name).ok_or_else(|| {
        let known: Vec<&str> = rates.keys().map(String::as_str).collect();
        source.at(
            key,
            format!(
                "no [rate_limits.{name}] policy (defined: {})",
                known.join(", ")
            ),
        )
    })?;
    let policy_key = format!("rate_limits.{name}");
    if !(rate.per_second > 0.0 && rate.per_second <= 1_000_000.0)
        || Duration::try_from_secs_f64(1.0 / rate.per_second).is_err()
    {
        return Err(source.at(
            &format!("{policy_key}.per_second"),
            "must be above 0 and at most 1000000".into(),
        ));
    }
    source.positive(rate.burst, &format!("{policy_key}.burst"))?;
    Ok(RateSpec {
        name: name.to_string(),
        per_second: rate.per_second,
        burst: rate.burst,
    })
}
