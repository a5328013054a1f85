//! `[acme]`: certificates for the HTTPS listener's names from an ACME server.

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path, time::Duration};

use gatehouse_proxy::{
    Route,
    acme::{AcmeSettings, ChallengeKind},
    https_redirect::is_dns_name,
};
use rustls::pki_types::{CertificateDer, pem::PemObject};

use super::{
    error::{ConfigError, Source},
    raw::RawAcme,
};

/// `server_names` (from `[tls]`) and the exact hosts of `routes` are the names ordered;
/// `https`: the HTTPS listener is on.
pub fn validate(
    a: &RawAcme,
    server_names: &[String],
    routes: &[Route],
    https: bool,
    data_dir: &Path,
    source: &Source,
) -> Result<AcmeSettings, ConfigError> {
    if !https {
        return Err(source.at(
            "acme",
            "certificates are for the HTTPS listener, and tls.listen is \"off\"".into(),
        ));
    }
    let directory = a.directory.trim();
    let uri = directory.parse::<http::Uri>().ok();
    if uri.as_ref().and_then(http::Uri::scheme_str) != Some("https")
        || uri.as_ref().and_then(http::Uri::host).is_none()
    {
        return Err(source.at(
            "acme.directory",
            format!("{directory:?} is not an https:// URL (RFC 8555 asks for HTTPS)"),
        ));
    }
    let mut contact = Vec::new();
    for (i, address) in a.contact.iter().enumerate() {
        let email = address.strip_prefix("mailto:").unwrap_or(address);
        let valid = email
            .split_once('@')
            .is_some_and(|(user, host)| !user.is_empty() && is_dns_name(host));
        if !valid {
            return Err(source.at(
                &format!("acme.contact[{i}]"),
                format!("{address:?} is not an email address"),
            ));
        }
        contact.push(format!("mailto:{email}"));
    }
    let trust = a.trust.as_ref().map(|p| source.path("acme.trust", p));
    if let Some(path) = &trust
        && let Err(e) = CertificateDer::from_pem_file(path)
    {
        return Err(source.at(
            "acme.trust",
            format!("{}: no PEM certificate read: {e}", path.display()),
        ));
    }
    let challenge = match a.challenge.as_str() {
        "http-01" => ChallengeKind::Http01,
        "tls-alpn-01" => ChallengeKind::TlsAlpn01,
        other => {
            return Err(source.at(
                "acme.challenge",
                format!("{other:?}: choose \"http-01\" or \"tls-alpn-01\""),
            ));
        }
    };
    // Past a failed order's first retries (2, 4, 8 minutes...), so one failure cannot let a
    // certificate expire.
    let renew_before = source.duration(
        a.renew_before.0,
        Duration::from_secs(3600)..=Duration::from_secs(90 * 24 * 3600),
        "acme.renew_before",
    )?;
    // Left out: wildcards (they need DNS-01, which gatehouse does not answer), IP addresses
    // and single labels such as `localhost` (no public CA issues for them).
    let mut names: Vec<String> = Vec::new();
    let hosts = routes.iter().flat_map(|r| &r.hosts);
    for name in server_names.iter().chain(hosts) {
        let name = super::routes::host_name(name);
        let orderable = !name.starts_with("*.")
            && name.contains('.')
            && name.parse::<std::net::IpAddr>().is_err();
        if orderable && !names.contains(&name) {
            names.push(name);
        }
    }
    if names.is_empty() {
        return Err(source.at(
            "acme",
            "no name to order a certificate for: list them in tls.server_names, or give \
             routes hosts (IP addresses, single labels such as localhost and wildcards are \
             left out)"
                .into(),
        ));
    }
    let storage = match &a.storage {
        Some(path) => source.path("acme.storage", path),
        None => data_dir.join("acme"),
    };
    // Found by `check`, not first by `run`: a read-only image without a volume, say.
    if let Err(message) = can_write(&storage) {
        let key = if a.storage.is_some() {
            "acme.storage"
        } else {
            "acme"
        };
        let message = format!("certificates are kept in {}: {message}", storage.display());
        return Err(source.at(key, message));
    }
    Ok(AcmeSettings {
        directory: directory.to_owned(),
        contact,
        trust,
        challenge,
        storage,
        renew_before,
        names,
        // Filled in by the proxy's process, which alone reads the Redis password for it.
        redis: None,
    })
}

/// Whether `dir` can be made or written to, checked without making anything: its nearest
/// existing ancestor must be a directory this process may write to.
fn can_write(dir: &Path) -> Result<(), String> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .ok_or("no part of the path exists")?;
    if !existing.is_dir() {
        return Err(format!("{} is not a directory", existing.display()));
    }
    let path = CString::new(existing.as_os_str().as_bytes())
        .map_err(|_| "the path holds a NUL byte".to_string())?;
    // SAFETY: access(2) only reads the NUL-terminated path it is given.
    if unsafe { libc::access(path.as_ptr(), libc::W_OK) } != 0 {
        let error = std::io::Error::last_os_error();
        return Err(format!("{} is not writable ({error})", existing.display()));
    }
    Ok(())
}
