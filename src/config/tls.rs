//! `[tls]`: the HTTPS listener, its certificate pair, and what HTTPS changes for plain HTTP
//! (the redirect) and for responses (HSTS).

use gatehouse_proxy::{HttpsRedirect, TlsBehaviour, TlsListener};

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

pub fn validate(t: &RawTls, source: &Source) -> Result<Tls, ConfigError> {
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
    let hsts = source.off_or(t.hsts.trim(), "tls.hsts")?;
    if let Some(value) = hsts {
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
    let behaviour = TlsBehaviour {
        redirect: listener
            .as_ref()
            .filter(|_| t.redirect_http)
            .map(|l| HttpsRedirect {
                server_name: t.server_names.first().cloned(),
                https_port: t.redirect_port.unwrap_or(l.listen.port()),
            }),
        hsts: listener.as_ref().and(hsts).map(str::to_string),
    };
    Ok(Tls {
        listener,
        behaviour,
        server_names: t.server_names.clone(),
    })
}
