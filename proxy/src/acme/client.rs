//! The HTTPS client orders go through: rustls with ring, as everywhere else in the proxy; the
//! roots in `acme.trust`, or Mozilla's built in (webpki-roots: the container image has no
//! system roots); a connect deadline, which the ACME client does not set itself.

use std::{path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use instant_acme::{Account, AccountBuilder, BodyWrapper};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// An account builder whose requests trust `trust`'s roots (every certificate in the file),
/// or the built-in ones.
pub fn account_builder(trust: Option<&Path>) -> Result<AccountBuilder, String> {
    let mut roots = RootCertStore::empty();
    match trust {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("acme.trust {}: {e}", path.display()))?;
            for cert in certs {
                roots
                    .add(cert)
                    .map_err(|e| format!("acme.trust {}: {e}", path.display()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let tls =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS settings: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(CONNECT_DEADLINE));
    http.enforce_http(false);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let client: Client<_, BodyWrapper<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https);
    Ok(Account::builder_with_http(Box::new(client)))
}
