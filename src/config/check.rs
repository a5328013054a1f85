//! What a loaded config names, checked without starting anything: the users file (someone
//! must be able to log in), the secrets, and a configured certificate pair. `gatehouse
//! check` runs this, as do `run` and `reload` before they act and the supervisor before a
//! reload or upgrade.

use std::path::Path;

use gatehouse_backend::Users;
use gatehouse_proxy::TlsListener;

use super::{Config, ConfigError, ENV_ADMIN_PASSWORD_FILE, process_env};

/// [`Config::load`], then [`check`].
pub fn load_checked(file: &Path) -> Result<(Config, Users), ConfigError> {
    check(Config::load(file)?)
}

pub fn check(config: Config) -> Result<(Config, Users), ConfigError> {
    let users = Users::load(&config.backend.users_file)
        .map_err(|e| config.error_at("backend.users_file", e.to_string()))?;
    // Redis is seeded from these whenever it has no users: with nobody to seed, nobody could
    // ever log in.
    if users.is_empty() && config.backend.admin_password.is_none() {
        return Err(config.error_at(
            "backend.users_file",
            format!(
                "{} has no users and no admin password is set (backend.admin_password_file \
                 or {ENV_ADMIN_PASSWORD_FILE}): nobody could log in; add a user, or set the \
                 admin password",
                config.backend.users_file.display(),
            ),
        ));
    }
    // The secrets are read here and by the backends, never by the proxy.
    config.backend.jwt_secret(&process_env)?;
    config.backend.admin_password(&process_env)?;
    config.redis.client_url(&config.managed_redis_socket())?;
    if let Some(tls) = &config.proxy.tls
        && !certificate_missing(tls)
    {
        crate::certs::validate(&tls.cert, &tls.key)
            .map_err(|e| config.error_at("tls.cert", e.to_string()))?;
    }
    // Each of the other pairs, as the proxy will read it (the default pair may be missing,
    // to be generated).
    for (i, (cert, key)) in config
        .proxy
        .tls
        .iter()
        .flat_map(|t| &t.certificates)
        .enumerate()
    {
        gatehouse_proxy::tls::Certificates::load(&gatehouse_proxy::TlsListener {
            listen: config.proxy.listen,
            cert: cert.clone(),
            key: key.clone(),
            certificates: vec![(cert.clone(), key.clone())],
            client_auth: None,
        })
        .map_err(|e| config.error_at(&format!("tls.certificates[{i}]"), e.to_string()))?;
    }
    Ok((config, users))
}

/// Both files absent: `run` makes a development certificate, `check` says it will.
pub fn certificate_missing(tls: &TlsListener) -> bool {
    !tls.cert.exists() && !tls.key.exists()
}
