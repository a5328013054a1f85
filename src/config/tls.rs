//! `[tls]`: the HTTPS listener, its certificate pair, and what HTTPS changes for plain HTTP
//! (the redirect) and for responses (HSTS); client certificates (`client_ca`,
//! `client_certs`, `[[tls.client_users]]`, and the routes that require one).

use std::collections::HashMap;

use gatehouse_proxy::{
    HttpsRedirect, Route, SiteTls, TlsBehaviour, TlsListener,
    client_cert::{self, ClientAuth, ClientUsers, Kind},
};

use super::{
    error::{ConfigError, Source},
    raw::{RawClientUser, RawTls},
    upstreams,
};

/// More mappings than a hand-written file holds: past this, a CA to sign in by is the tool.
const MAX_CLIENT_USERS: usize = 10_000;

pub struct Tls {
    /// `None`: HTTPS is off.
    pub listener: Option<TlsListener>,
    pub behaviour: TlsBehaviour,
    /// Names for redirects (the first) and for a generated certificate (all).
    pub server_names: Vec<String>,
}

/// `routes`: the validated routes, whose hosts `[[tls.sites]]` may name.
pub fn validate(t: &RawTls, routes: &[Route], source: &Source) -> Result<Tls, ConfigError> {
    for (i, name) in t.server_names.iter().enumerate() {
        if !gatehouse_proxy::https_redirect::is_dns_name(name) {
            return Err(source.at(
                &format!("tls.server_names[{i}]"),
                format!("{name:?} is not a host name"),
            ));
        }
    }
    if t.redirect_port == Some(0) {
        return Err(source.at("tls.redirect_port", "must be greater than 0".into()));
    }
    let hsts_value = source.off_or(t.hsts.trim(), "tls.hsts")?;
    if let Some(value) = hsts_value {
        source.header_value(value, "tls.hsts")?;
    }
    let listen = source.listen(&t.listen, "tls.listen", true)?;
    let client_auth = client_auth(t, listen.is_some(), routes, source)?;
    let listener = listen.map(|listen| TlsListener {
        listen,
        cert: source.base.join(&t.cert),
        key: source.base.join(&t.key),
        certificates: t
            .certificates
            .iter()
            .map(|pair| (source.base.join(&pair.cert), source.base.join(&pair.key)))
            .collect(),
        client_auth,
    });
    let https = listener.as_ref().map(|l| HttpsRedirect {
        server_name: t.server_names.first().cloned(),
        https_port: t.redirect_port.unwrap_or(l.listen.port()),
    });
    let redirect = |on: bool| https.clone().filter(|_| on);
    let hsts = |value: Option<&str>| listener.as_ref().and(value).map(str::to_string);
    let mut sites = HashMap::new();
    for (i, site) in t.sites.iter().enumerate() {
        let key = |field: &str| format!("tls.sites[{i}].{field}");
        let own_hsts = match &site.hsts {
            Some(value) => {
                let value = source.off_or(value.trim(), &key("hsts"))?;
                if let Some(value) = value {
                    source.header_value(value, &key("hsts"))?;
                }
                value
            }
            None => hsts_value,
        };
        let policy = SiteTls {
            redirect: redirect(site.redirect_http.unwrap_or(t.redirect_http)),
            hsts: hsts(own_hsts),
        };
        if site.hosts.is_empty() {
            return Err(source.at(&key("hosts"), "names no host".into()));
        }
        for (j, host) in site.hosts.iter().enumerate() {
            let host = super::routes::host_name(host);
            let at = || key(&format!("hosts[{j}]"));
            if !routes.iter().any(|r| r.hosts.contains(&host)) {
                let message = format!(
                    "{host:?}: no route names this host (a site is the hosts routes name, \
                     exact or `*.example.com`)"
                );
                return Err(source.at(&at(), message));
            }
            if sites.insert(host.clone(), policy.clone()).is_some() {
                return Err(source.at(&at(), format!("{host:?} is in tls.sites twice")));
            }
        }
    }
    let behaviour = TlsBehaviour {
        redirect: redirect(t.redirect_http),
        hsts: hsts(hsts_value),
        sites,
        client_users: client_users(&t.client_users, source)?,
    };
    Ok(Tls {
        listener,
        behaviour,
        server_names: t.server_names.clone(),
    })
}

/// `client_ca` and `client_certs`; `https`: the HTTPS listener is on. Routes that require a
/// certificate need a listener that asks for one.
fn client_auth(
    t: &RawTls,
    https: bool,
    routes: &[Route],
    source: &Source,
) -> Result<Option<ClientAuth>, ConfigError> {
    let Some(file) = &t.client_ca else {
        if t.client_certs.is_some() {
            return Err(source.at(
                "tls.client_certs",
                "needs tls.client_ca, the CAs whose certificates are taken".into(),
            ));
        }
        if !t.client_users.is_empty() {
            return Err(source.at(
                "tls.client_users",
                "needs tls.client_ca, the CAs whose certificates are taken".into(),
            ));
        }
        if let Some(i) = routes.iter().position(|r| r.requires_client_cert) {
            return Err(source.at(
                &format!("routes[{i}].client_cert"),
                "no client could have one: set tls.client_ca, the CAs whose certificates are \
                 taken"
                    .into(),
            ));
        }
        return Ok(None);
    };
    if !https {
        return Err(source.at(
            "tls.client_ca",
            "client certificates come in the TLS handshake: tls.listen is off".into(),
        ));
    }
    let required = match t.client_certs.as_deref() {
        None | Some("required") => true,
        Some("optional") => false,
        Some(other) => {
            return Err(source.at(
                "tls.client_certs",
                format!("{other:?}: choose \"required\" or \"optional\""),
            ));
        }
    };
    let ca = upstreams::ca_certificates(&source.path("tls.client_ca", file))
        .map_err(|m| source.at("tls.client_ca", m))?;
    let auth = ClientAuth { ca, required };
    // As the proxy will build it: a bundle rustls refuses is refused here.
    auth.verifier(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .map_err(|e| source.at("tls.client_ca", e.to_string()))?;
    Ok(Some(auth))
}

/// `[[tls.client_users]]`: each entry a user and exactly one name of the certificate.
fn client_users(raw: &[RawClientUser], source: &Source) -> Result<ClientUsers, ConfigError> {
    if raw.len() > MAX_CLIENT_USERS {
        return Err(source.at(
            "tls.client_users",
            format!("{} entries: at most {MAX_CLIENT_USERS}", raw.len()),
        ));
    }
    let mut users = ClientUsers::default();
    for (i, entry) in raw.iter().enumerate() {
        let key = |field: &str| format!("tls.client_users[{i}].{field}");
        let named: Vec<(&str, Kind, &String)> = [
            ("fingerprint", Kind::Fingerprint, &entry.fingerprint),
            ("uri", Kind::Uri, &entry.uri),
            ("dns", Kind::Dns, &entry.dns),
            ("email", Kind::Email, &entry.email),
            ("cn", Kind::Cn, &entry.cn),
        ]
        .into_iter()
        .filter_map(|(field, kind, value)| value.as_ref().map(|v| (field, kind, v)))
        .collect();
        let [(field, kind, value)] = named[..] else {
            return Err(source.at(
                &format!("tls.client_users[{i}]"),
                "name the certificate by exactly one of fingerprint, uri, dns, email or cn".into(),
            ));
        };
        let name = match kind {
            Kind::Fingerprint => client_cert::fingerprint(value).ok_or_else(|| {
                source.at(
                    &key(field),
                    format!("{value:?}: a SHA-256 fingerprint, 64 hex digits (colons allowed)"),
                )
            })?,
            Kind::Dns => value.to_ascii_lowercase(),
            Kind::Uri | Kind::Email | Kind::Cn => value.clone(),
        };
        if name.is_empty() {
            return Err(source.at(&key(field), "is empty".into()));
        }
        if !client_cert::is_user_name(&entry.user) {
            return Err(source.at(
                &key("user"),
                format!(
                    "{:?} is not a user name (a letter or digit, then up to 63 letters, \
                     digits, `.`, `_` or `-`)",
                    entry.user
                ),
            ));
        }
        users
            .insert(kind, name, &entry.user)
            .map_err(|m| source.at(&key(field), m))?;
    }
    Ok(users)
}
