//! `[tls]`: the HTTPS listener, its certificate pair, and what HTTPS changes for plain HTTP
//! (the redirect) and for responses (HSTS).

use std::collections::HashMap;

use gatehouse_proxy::{HttpsRedirect, Route, SiteTls, TlsBehaviour, TlsListener};

use super::{
    error::{ConfigError, Source},
    raw::RawTls,
};

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
    let listener = source
        .listen(&t.listen, "tls.listen", true)?
        .map(|listen| TlsListener {
            listen,
            cert: source.base.join(&t.cert),
            key: source.base.join(&t.key),
            certificates: t
                .certificates
                .iter()
                .map(|pair| (source.base.join(&pair.cert), source.base.join(&pair.key)))
                .collect(),
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
    };
    Ok(Tls {
        listener,
        behaviour,
        server_names: t.server_names.clone(),
    })
}
