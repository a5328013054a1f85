//! One order for one name (RFC 8555 7.4): the challenge answered, the order finalized with a
//! new key, the certificate fetched. Every answer is taken down when the order ends, and the
//! whole order has one deadline: the ACME client sets none on its own requests.

use std::{sync::Arc, time::Duration};

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy,
};
use rustls::{pki_types::PrivateKeyDer, sign::CertifiedKey};

use super::{ChallengeKind, challenges::Challenges};

/// Longest an order may take, from the new order to the certificate.
pub const ORDER_DEADLINE: Duration = Duration::from_secs(120);

/// How long to wait for the server's checks, and then for the certificate.
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(250))
    .backoff(1.5)
    .timeout(Duration::from_secs(60));

/// A certificate chain and its private key, both PEM.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Orders a certificate for `name`, answering `kind` of challenge through `challenges`.
/// The error is the ACME server's problem document where it sent one.
pub async fn obtain(
    account: &Account,
    name: &str,
    kind: ChallengeKind,
    challenges: &Arc<Challenges>,
) -> Result<Issued, String> {
    match tokio::time::timeout(ORDER_DEADLINE, order(account, name, kind, challenges)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(format!(
            "the order took longer than {}s",
            ORDER_DEADLINE.as_secs()
        )),
    }
}

async fn order(
    account: &Account,
    name: &str,
    kind: ChallengeKind,
    challenges: &Arc<Challenges>,
) -> Result<Issued, String> {
    let acme = |what: &'static str| move |e: instant_acme::Error| format!("{what}: {e}");
    let identifiers = [Identifier::Dns(name.to_owned())];
    let mut order = account
        .new_order(&NewOrder::new(&identifiers))
        .await
        .map_err(acme("new order"))?;
    // Held until the order is done: the server may check more than once.
    let mut answering = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization.map_err(acme("authorization"))?;
        match authorization.status {
            AuthorizationStatus::Pending => {}
            // Reused from an earlier order.
            AuthorizationStatus::Valid => continue,
            status => return Err(format!("authorization is {status:?}")),
        }
        let mut challenge = authorization
            .challenge(kind.acme_type())
            .ok_or_else(|| format!("the server offers no {} challenge", kind.as_str()))?;
        let key_authorization = challenge.key_authorization();
        answering.push(match kind {
            ChallengeKind::Http01 => {
                challenges.answer_http(&challenge.token, key_authorization.as_str())
            }
            ChallengeKind::TlsAlpn01 => {
                let certificate = alpn_certificate(name, key_authorization.digest().as_ref())?;
                challenges.answer_tls_alpn(name, certificate)
            }
        });
        challenge.set_ready().await.map_err(acme("challenge"))?;
    }
    let status = order.poll_ready(&POLL).await.map_err(acme("validation"))?;
    if status != OrderStatus::Ready {
        // The reason is on the failed challenge more often than on the order.
        let mut problem = order.state().error.as_ref().map(ToString::to_string);
        let mut authorizations = order.authorizations();
        while problem.is_none()
            && let Some(Ok(authorization)) = authorizations.next().await
        {
            problem = authorization
                .challenges
                .iter()
                .find_map(|c| c.error.as_ref().map(ToString::to_string));
        }
        return Err(format!(
            "the order is {status:?}: {}",
            problem.as_deref().unwrap_or("the server gave no reason")
        ));
    }
    drop(answering);
    let key_pem = order.finalize().await.map_err(acme("finalize"))?;
    let chain_pem = order
        .poll_certificate(&POLL)
        .await
        .map_err(acme("certificate"))?;
    Ok(Issued { chain_pem, key_pem })
}

/// The self-signed certificate TLS-ALPN-01 asks for: `name` alone, and the digest of the key
/// authorization in the acmeIdentifier extension (RFC 8737 3).
fn alpn_certificate(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let failed = |e: rcgen::Error| format!("challenge certificate: {e}");
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(failed)?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(failed)?;
    let cert = params.self_signed(&key).map_err(failed)?;
    let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing_key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| format!("challenge key: {e}"))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing_key))
}

impl ChallengeKind {
    fn acme_type(self) -> ChallengeType {
        match self {
            ChallengeKind::Http01 => ChallengeType::Http01,
            ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
        }
    }
}
